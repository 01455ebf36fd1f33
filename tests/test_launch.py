"""Multi-process runs: `autoshard launch` (losses equal one device's, failures, signals), the settings a process
joins with, the mesh's device order across hosts, and each process's share of the data.

Each launched process costs seconds to start, so only four tests start any: the two loss comparisons (a
`data x fsdp x tensor` plan and a pipeline, 2 processes x 4 devices), a failing process (real: it fails while its
peer waits for it), and signal forwarding (plain Python children, no jax). Every wait is bounded; a test's processes
carry a token in their environment, so whatever outlives a test is found and killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from autoshard import cli, data, distributed, emit, launch
from planner.errors import AutoshardError, PlanError

ENTRY = "import sys; from autoshard.cli import main; sys.exit(main())"
TINY = ["--steps", "3", "--seed", "0", "--batch", "8", "--seq", "32", "--no-checkpoint"]
TOKEN = "AUTOSHARD_TEST_TOKEN"


# ---------------------------------------------------------------------------------------------------------------
# helpers


def survivors(token: str) -> list[int]:
    """Processes whose environment holds `token` (Linux /proc; elsewhere none are found)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if f"{TOKEN}={token}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def start_launch(*args: str, token: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ENTRY, "launch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, TOKEN: token, **(env or {})})


def run_launch(*args: str, timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, str, float, list]:
    """`autoshard launch ARGS` in a subprocess: (status, stdout, stderr, seconds, processes it left behind)."""
    token = uuid.uuid4().hex
    t0 = time.monotonic()
    proc = start_launch(*args, token=token, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        kill_all(survivors(token))
        pytest.fail(f"launch ran past {timeout} s:\n{out}\n{err}")
    seconds = time.monotonic() - t0
    left = survivors(token)
    kill_all(left)
    return proc.returncode, out, err, seconds, left


def printed_losses(out: str) -> dict[int, float]:
    rows = [line.split() for line in out.splitlines() if line.startswith("step ")]
    assert rows and all(len(r) == 4 and r[2] == "loss" for r in rows), out
    return {int(r[1]): float(r[3]) for r in rows}


def metrics(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_device(tiny_text, tmp_path_factory) -> list[float]:
    """The reference: `autoshard train --devices 1` (in this process), its losses at full precision."""
    run = tmp_path_factory.mktemp("one") / "run"
    assert cli.main(["train", "--devices", "1", *TINY, "--data", tiny_text, "--out", str(run)]) == 0
    return metrics(run)


# ---------------------------------------------------------------------------------------------------------------
# launch: the same losses as one device


@pytest.mark.parametrize("mesh", ["pipe=2,fsdp=2,tensor=2"])  # a pipeline of ZeRO-3 and tensor-split stages
def test_launch_matches_one_device(mesh, one_device, tiny_text, tmp_path):
    run = tmp_path / "run"
    status, out, err, seconds, left = run_launch(
        "--processes", "2", "--devices-per-process", "4", "--", "train", "--mesh", mesh, *TINY, "--data", tiny_text,
        "--out", str(run), timeout=300)
    assert status == 0, err
    assert not left
    assert "launched 2 processes x 4 CPU device(s)" in err
    assert f"on 8 cpu device(s), mesh {mesh}" in err
    assert "[process 1]" not in err + out  # the console is process 0's
    assert "[Gloo]" not in out
    printed = printed_losses(out)
    assert sorted(printed) == [1, 2, 3]
    np.testing.assert_allclose([printed[s] for s in (1, 2, 3)], one_device, rtol=1e-5)
    np.testing.assert_allclose(metrics(run), one_device, rtol=1e-5)  # written once, by process 0
    assert json.loads((run / "config.json").read_text())["devices"] == 8


# ---------------------------------------------------------------------------------------------------------------
# launch: failures and signals


def test_a_failing_process_ends_the_run_with_its_status(tiny_text, tmp_path):
    """Process 1 fails (its --data does not exist) while process 0 waits for it in a collective: launch stops
    process 0, exits with process 1's status, and leaves no process behind."""
    script = ('if [ "$AUTOSHARD_PROCESS_ID" = 1 ]; then D=/nonexistent/text; else D="$TEXT"; fi; '
              'exec "$PY" -c "$ENTRY" train --mesh data=4 --steps 3 --batch 8 --seq 32 --no-checkpoint '
              '--out "$OUT" --data "$D"')
    env = {"PY": sys.executable, "ENTRY": ENTRY, "TEXT": tiny_text, "OUT": str(tmp_path / "run")}
    status, out, err, seconds, left = run_launch("--processes", "2", "--devices-per-process", "2", "--",
                                                 "sh", "-c", script, timeout=120, env=env)
    assert status == 2, err
    assert "[process 1] error: data path /nonexistent/text does not exist" in err
    assert "process 1 failed with exit status 2: stopping the others" in err
    assert not left
    assert seconds < 60, err  # about 3 s here: process 1's start, then at most FAILURE_GRACE_S for process 0


CHILD = r"""
import os, pathlib, signal, sys, time
where, me = pathlib.Path(sys.argv[1]), os.environ["AUTOSHARD_PROCESS_ID"]
def on_term(signum, frame):
    (where / f"term{me}").write_text("")
    if me == "0":
        sys.exit(143)  # process 1 notes the signal and carries on: the launcher's SIGKILL ends it
signal.signal(signal.SIGTERM, on_term)
(where / f"ready{me}").write_text(str(os.getpid()))
time.sleep(120)
"""


@pytest.mark.smoke
def test_sigterm_is_forwarded_then_killed_after_the_grace(tmp_path):
    token = uuid.uuid4().hex
    proc = start_launch("--processes", "2", "--grace", "1", "--", sys.executable, "-c", CHILD, str(tmp_path),
                        token=token)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{i}").exists() for i in (0, 1)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the children did not start"
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        seconds = time.monotonic() - t0
        assert (tmp_path / "term0").exists() and (tmp_path / "term1").exists()  # both got the signal
        assert proc.returncode == 143, err  # process 0's status
        assert "SIGTERM: forwarded to 2 processes" in err
        assert 1 <= seconds < 15, err  # process 1 had the 1 s grace, then SIGKILL
        assert "1 process(es) still running 1 s after the signal: killed" in err
        assert not survivors(token)
    finally:
        proc.kill()
        kill_all(survivors(token))


@pytest.mark.smoke
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_children_die_with_a_killed_launcher(tmp_path):
    token = uuid.uuid4().hex
    sleeper = "import os, pathlib, sys, time; (pathlib.Path(sys.argv[1]) / str(os.getpid())).touch(); time.sleep(120)"
    proc = start_launch("--processes", "2", "--", sys.executable, "-c", sleeper, str(tmp_path), token=token)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.iterdir())) < 2:  # both children run the sleeper (past fork, prctl and exec)
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        assert len(survivors(token)) == 3  # the launcher and its two children
        proc.kill()  # SIGKILL: no handler of the launcher's runs
        proc.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while survivors(token) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not survivors(token)
    finally:
        proc.kill()
        kill_all(survivors(token))


@pytest.mark.smoke
def test_launch_usage_errors(capsys):
    assert cli.main(["launch", "--processes", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: give the command after --") and "\n" not in err
    assert cli.main(["launch", "--", "launch", "train"]) == 2
    assert "cannot launch itself" in capsys.readouterr().err


@pytest.mark.smoke
def test_child_environment():
    base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_foo=1", "HOME": "/h"}
    env = launch.child_env(base, 1, 3, 4, 1234)
    assert env["XLA_FLAGS"].split() == ["--xla_cpu_foo=1", "--xla_force_host_platform_device_count=4"]
    assert (env["JAX_COORDINATOR_ADDRESS"], env["AUTOSHARD_NUM_PROCESSES"], env["AUTOSHARD_PROCESS_ID"]) == (
        "127.0.0.1:1234", "3", "1")
    assert env["JAX_PLATFORMS"] == "cpu" and env["HOME"] == "/h"
    assert launch.child_env({"JAX_PLATFORMS": "cuda"}, 0, 1, 1, 1)["JAX_PLATFORMS"] == "cuda"
    assert distributed.settings(environ=env) == distributed.Settings("127.0.0.1:1234", 3, 1, "autoshard launch")


@pytest.mark.smoke
def test_gloo_notes_are_dropped_even_when_interleaved():
    note = "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : "
    clean = launch.NoiseFilter()
    lines = [note + "3\n", "step 1 loss 5.5\n", note + note + "1\n", "1\n", "12\n", note, "4\n", "7\n"]
    assert "".join(clean(line) for line in lines) == "step 1 loss 5.5\n12\n7\n"


# ---------------------------------------------------------------------------------------------------------------
# joining: where the settings come from, and the errors


@pytest.mark.smoke
def test_settings_from_flags_and_environment():
    assert distributed.settings(environ={}) is None
    s = distributed.settings("h:9", 4, 3, environ={})
    assert (s.coordinator, s.num_processes, s.process_id, s.detect) == ("h:9", 4, 3, False)
    assert distributed.settings(None, 2, 0, environ={"JAX_COORDINATOR_ADDRESS": "c:1"}).coordinator == "c:1"
    for args, match in [(("h:9", None, None), "needs --num-processes N, --process-id I"),
                        ((None, 2, 1), "needs --coordinator HOST:PORT"),
                        (("h", 2, 1), "is not HOST:PORT"), (("h:0", 2, 1), "is not HOST:PORT"),
                        (("h:9", 2, 2), "process id 2 is not in 0..1")]:
        with pytest.raises(AutoshardError, match=match):
            distributed.settings(*args, environ={})
    assert distributed.settings(environ={"JAX_COORDINATOR_ADDRESS": "c:1"}).detect
    assert distributed.settings(force=True, environ={}).detect
    assert distributed.settings(environ={"OMPI_COMM_WORLD_SIZE": "4"}).detect
    assert distributed.settings(environ={"TPU_WORKER_HOSTNAMES": "t0,t1"}).detect
    assert distributed.settings(environ={"TPU_WORKER_HOSTNAMES": "t0"}) is None
    with pytest.raises(AutoshardError, match="JAX_COORDINATOR_ADDRESS"):
        distributed.settings(environ={"AUTOSHARD_NUM_PROCESSES": "2", "AUTOSHARD_PROCESS_ID": "0"})


@pytest.mark.smoke
def test_slurm_one_process_per_node_uses_every_device_of_the_node():
    env = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "gpu[007-008],cpu1", "SLURM_NTASKS": "2",
           "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    s = distributed.settings(environ=env)
    assert s == distributed.Settings(f"gpu007:{1234 % 4096 + 61440}", 2, 1, "SLURM (one process per node)")
    assert not s.detect  # jax's own SLURM detection would give this task only device 0 (its local rank)
    assert distributed.settings(environ={**env, "SLURM_STEP_NUM_NODES": "1"}).detect  # a task per device: jax's
    assert distributed.settings(environ={**env, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}) is None
    assert [distributed.first_host(x) for x in ("n1", "n1,n2", "n[003-007,012],g1", "n[7]", "a1,n[1-3]")] == [
        "n1", "n1", "n003", "n7", "a1"]


@pytest.mark.smoke
def test_multi_process_flag_errors_are_one_line(capsys):
    assert cli.main(["train", "--coordinator", "127.0.0.1:9", "--num-processes", "2", "--process-id", "0",
                     "--devices", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--devices does not apply to a multi-process run" in err and "\n" not in err
    assert cli.main(["train", "--num-processes", "2"]) == 2
    assert "needs --coordinator HOST:PORT, --process-id I as well" in capsys.readouterr().err
    assert cli.main(["plan", "--process-id", "-1"]) == 2
    assert "expected an integer 0 or more" in capsys.readouterr().err


def test_unreachable_coordinator_is_one_line_not_a_native_abort(tmp_path):
    port = str(launch.free_port())
    proc = subprocess.run([sys.executable, "-c", ENTRY, "train", "--coordinator", f"127.0.0.1:{port}",
                           "--num-processes", "2", "--process-id", "1", "--coordinator-timeout", "1"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot reach the coordinator at 127.0.0.1:{port} within 1 s (--coordinator): process 0 must be "
        f"running there and this host must reach that port"]


@pytest.mark.smoke
def test_followers_print_errors_only():
    class Sink:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    sink = Sink()
    quiet = distributed._ErrorsOnly(sink)
    quiet.write("step 1/3  loss 5.5\nwarning: something process 0 says too\nerror: bad")
    quiet.write(" input\nnoise\nTraceback (most recent call last):\n  File x\nValueError: y\n")
    assert sink.text == "error: bad input\nTraceback (most recent call last):\n  File x\nValueError: y\n"


# ---------------------------------------------------------------------------------------------------------------
# the mesh across hosts


@dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int
    platform: str = "cpu"


def hosts(processes: int, local: int) -> list[FakeDevice]:
    return [FakeDevice(100 * p + i, p) for p in range(processes) for i in range(local)]


def owner(grid: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda d: d.process_index)(grid)


def shape_of(**axes: int) -> tuple[int, ...]:
    from planner.plan import AXES

    return tuple(axes.get(a, 1) for a in AXES)


@pytest.mark.smoke
def test_tensor_and_the_fastest_axes_stay_inside_a_host():
    # 2 hosts x 4: data crosses hosts, fsdp and tensor stay inside
    grid = emit.device_grid(shape_of(data=2, fsdp=2, tensor=2), hosts(2, 4)).reshape(2, 2, 2)
    assert (owner(grid) == np.arange(2)[:, None, None]).all()
    assert [d.id for d in grid[1].flat] == [100, 101, 102, 103]  # a host's own order inside its block
    # 4 hosts x 2: only tensor fits inside; (pipe, data) picks the host
    grid = emit.device_grid(shape_of(pipe=2, data=2, tensor=2), hosts(4, 2)).reshape(2, 2, 2)
    assert (owner(grid) == np.arange(4).reshape(2, 2)[:, :, None]).all()
    # tensor larger than a host: split over two, each holding a contiguous half
    grid = emit.device_grid(shape_of(tensor=8), hosts(2, 4)).reshape(8)
    assert owner(grid).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # the order devices come in does not matter, only their process
    mixed = sorted(hosts(2, 4), key=lambda d: (d.id % 100, d.process_index))
    assert (emit.device_grid(shape_of(data=2, tensor=4), mixed) ==
            emit.device_grid(shape_of(data=2, tensor=4), hosts(2, 4))).all()
    assert emit.host_block(shape_of(data=4, seq=2, tensor=2), 8) == shape_of(data=2, seq=2, tensor=2)


@pytest.mark.smoke
def test_device_grid_is_for_several_processes():
    assert emit.device_grid(shape_of(data=2, tensor=2), hosts(1, 4)) is None  # jax.make_mesh's layout
    assert emit.device_grid(shape_of(data=2, tensor=2), [FakeDevice(i, i // 2, "tpu") for i in range(4)]) is None
    with pytest.raises(PlanError, match="different numbers of devices"):
        emit.device_grid(shape_of(data=2, tensor=2), [*hosts(1, 3), FakeDevice(7, 1)])


# ---------------------------------------------------------------------------------------------------------------
# each process's share of the data


@pytest.mark.smoke
def test_text_rows_are_the_full_batches_rows():
    tokens = np.frombuffer(bytes(range(256)) * 40, dtype=np.uint8)
    full, part = data.TextData(tokens, 8, 16, seed=3), data.TextData(tokens, 8, 16, seed=3, rows=[2, 3, 6, 7])
    for _ in range(3):  # the same global stream: a process's rows are the one-process run's rows
        a, b = full.next(), part.next()
        for k in ("inputs", "targets"):
            assert b[k].shape == a[k].shape == (8, 16)
            np.testing.assert_array_equal(b[k][[2, 3, 6, 7]], a[k][[2, 3, 6, 7]])
            assert not b[k][[0, 1, 4, 5]].any()  # never read
    part.select_rows(None)
    np.testing.assert_array_equal(part.next()["inputs"], full.next()["inputs"])
    for bad in ([3, 2], [8], [-1]):
        with pytest.raises(AutoshardError, match="rows must be increasing indices into the batch of 8"):
            data.TextData(tokens, 8, 16, rows=bad)


@pytest.mark.smoke
def test_one_process_holds_every_row():
    import jax.numpy as jnp

    import autoshard

    params = {"w": np.zeros((4, 4), np.float32)}  # a small function model: cheap to lay out
    loss = lambda v, b: jnp.mean((b["x"] @ v["w"]) ** 2)  # noqa: E731
    plan = autoshard.rule_plan(loss, "data=2,fsdp=2,tensor=2", params=params)
    trainer = autoshard.parallelize(loss, autoshard.make_optimizer(), plan, params=params)
    assert trainer.process_rows(16).tolist() == list(range(16))
    with pytest.raises(PlanError, match="batch size 6 is not divisible by the 4 batch shards"):
        trainer.process_rows(6)


@pytest.mark.smoke
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_child_whose_launcher_died_before_prctl_kills_itself():
    # The death signal is armed in the child after fork; if the launcher died in between, no signal will come.
    # Simulated: a process other than the launcher starts the child, so its parent is not the launcher.
    code = """
import os, subprocess, sys
from autoshard.launch import _die_with_parent
arm = _die_with_parent()
assert subprocess.Popen([sys.executable, "-c", "pass"], preexec_fn=arm).wait() == 0  # the launcher's own child runs
if os.fork() == 0:
    os._exit(0 if subprocess.Popen([sys.executable, "-c", "pass"], preexec_fn=arm).wait() == -9 else 1)
sys.exit(os.waitstatus_to_exitcode(os.wait()[1]))
"""
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
