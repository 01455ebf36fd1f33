"""`autoshard train`: run folder, determinism across meshes, one-line user errors, the console entry point."""

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from autoshard import cli, data
from checks import assert_one_line_error

TINY = ["--steps", "3", "--batch", "8", "--seq", "32"]


def train(capsys, *args):
    """Run `autoshard train ARGS` in-process: (exit code, stdout, stderr)."""
    code = cli.main(["train", *args])
    out, err = capsys.readouterr()
    return code, out, err


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def stdout_losses(out: str) -> dict[int, float]:
    rows = [line.split() for line in out.splitlines() if line.startswith("step ")]
    assert all(len(r) == 4 and r[2] == "loss" for r in rows), out
    return {int(r[1]): float(r[3]) for r in rows}


@pytest.fixture(scope="module")
def mesh_run(tiny_text, tmp_path_factory):
    """One 3-step run on data=2,fsdp=2,tensor=2, shared by the tests that inspect a run folder."""
    run = tmp_path_factory.mktemp("mesh_run")
    code = cli.main(["train", *TINY, "--mesh", "data=2,fsdp=2,tensor=2", "--data", tiny_text, "--out", str(run)])
    assert code == 0
    return run


def test_run_folder(mesh_run, tiny_text):
    from planner.plan import Plan

    assert {p.name for p in mesh_run.iterdir()} >= {"plan.json", "config.json", "metrics.jsonl"}
    plan = Plan.load(mesh_run / "plan.json")
    assert plan.mesh_string() == "data=2,fsdp=2,tensor=2"
    config = json.loads((mesh_run / "config.json").read_text())
    assert config["devices"] == 8 and config["jax_version"] == jax.__version__
    assert config["versions"]["jax"] == jax.__version__ and config["versions"]["python"] == platform.python_version()
    assert config["model"]["name"] == "gpt-tiny" and config["model"]["vocab"] == 256
    assert config["args"]["mesh"] == "data=2,fsdp=2,tensor=2" and config["args"]["steps"] == 3
    assert config["data"]["source"] == tiny_text
    rows = metrics(mesh_run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"loss", "ce", "grad_norm", "lr", "tokens_per_s"} <= set(r)
        assert np.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    assert rows[0]["lr"] == pytest.approx(1e-2) and rows[2]["lr"] < rows[1]["lr"]  # 1 warmup step, then decay


def test_same_losses_on_one_device_and_from_the_saved_plan(mesh_run, tiny_text, tmp_path, capsys):
    """Same seed => same initial weights and data order on any layout."""
    reference = [r["loss"] for r in metrics(mesh_run)]
    code, out, err = train(capsys, *TINY, "--devices", "1", "--data", tiny_text, "--out", str(tmp_path / "one"))
    assert code == 0, err
    assert "planned for cpu:1" in err
    single = [r["loss"] for r in metrics(tmp_path / "one")]
    np.testing.assert_allclose(single, reference, rtol=1e-4)
    assert list(stdout_losses(out)) == [1, 2, 3]
    np.testing.assert_allclose(list(stdout_losses(out).values()), reference, rtol=1e-4)

    code, out, err = train(capsys, *TINY, "--plan", str(mesh_run / "plan.json"), "--data", tiny_text,
                           "--out", str(tmp_path / "replay"))
    assert code == 0, err
    np.testing.assert_allclose([r["loss"] for r in metrics(tmp_path / "replay")], reference, rtol=1e-4)


def test_default_run_folder_and_log_every(tiny_text, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = train(capsys, "--steps", "5", "--batch", "8", "--seq", "16", "--log-every", "2",
                           "--data", tiny_text)
    assert code == 0, err
    assert list(stdout_losses(out)) == [1, 2, 4, 5]  # first, every 2nd, last
    (run,) = (tmp_path / "runs" / "local").iterdir()
    assert run.name.startswith("train-") and len(metrics(run)) == 5
    assert "done: 5 steps" in err and "Traceback" not in err


def test_interrupt_keeps_metrics(tiny_text, tmp_path, capsys, monkeypatch):
    real_next = data.TextData.next
    calls = []

    def next_or_interrupt(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(data.TextData, "next", next_or_interrupt)
    # (the settings of test_default_run_folder_and_log_every: the same planned program, compiled once a session)
    code, out, err = train(capsys, "--steps", "5", "--batch", "8", "--seq", "16", "--data", tiny_text,
                           "--out", str(tmp_path))
    assert code == 130
    assert "interrupted at step 3/5" in err and "Traceback" not in err
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "corrupt.json").write_text('{"version": 1, "mesh": ')
    (d / "foreign.json").write_text(json.dumps({"mesh": {"data": 8}, "params": {"encoder/w": [None, None]}}))
    (d / "not_a_plan.json").write_text("[1, 2, 3]")
    return d


BAD = {
    "mesh product != devices": (["--mesh", "data=2,tensor=2"], "needs 4 devices but 8"),
    "tensor does not divide heads": (["--mesh", "data=1,tensor=8"], "does not divide the 4 heads"),
    "unknown axis": (["--mesh", "data=4,model=2"], "unknown mesh axis 'model'"),
    "bad mesh syntax": (["--mesh", "data:8"], "bad mesh entry"),
    "plan names a missing parameter": (["--plan", "{bad}/foreign.json"], "'encoder/w' that the model lacks"),
    "corrupt plan": (["--plan", "{bad}/corrupt.json"], "not valid JSON"),
    "not a plan": (["--plan", "{bad}/not_a_plan.json"], "not a plan"),
    "missing plan": (["--plan", "{bad}/nothing.json"], "cannot read plan file"),
    "glob matches nothing": (["--data", "{bad}/**/*.txt"], "matches no files"),
    "batch not divisible": (["--mesh", "data=2,fsdp=2,tensor=2", "--batch", "6"], "not divisible by the 4 batch"),
    "seq not divisible": (["--mesh", "data=2,seq=4", "--seq", "130"], "sequence length 130, which seq=4 does not"),
    "unknown model": (["--model", "gpt-huge"], "unknown model 'gpt-huge'"),
    "bad model override": (["--model", "gpt-tiny:depth=3"], "bad model override"),
    "vocab too small": (["--model", "gpt-tiny:vocab=128"], "vocabulary of at least 256"),
    "too many devices": (["--devices", "16"], "more devices than the 8 available"),
    "mesh and plan": (["--mesh", "data=8", "--plan", "p.json"], "not allowed with"),
    "bad number": (["--steps", "0"], "positive integer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2(case, bad_files, tmp_path, capsys):
    args, message = BAD[case]
    args = [a.format(bad=bad_files) for a in args]
    code, out, err = train(capsys, *TINY, "--out", str(tmp_path / "run"), *args)
    assert code == 2
    assert_one_line_error(err, message)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_no_subcommand_and_help(capsys):
    assert cli.main([]) == 2
    assert "train" in capsys.readouterr().err
    assert cli.main(["train", "--help"]) == 0
    assert "--mesh" in capsys.readouterr().out


def test_device_flag_replaces_only_the_count(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8 --xla_bar")
    cli.set_device_flag(2)
    assert os.environ["XLA_FLAGS"].split() == ["--xla_cpu_foo=1", "--xla_bar",
                                               "--xla_force_host_platform_device_count=2"]
    monkeypatch.delenv("XLA_FLAGS")
    cli.set_device_flag(3)
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"


def test_console_script_sets_device_count(tiny_text, tmp_path):
    """The real entry point, in a fresh process: --devices 2 overrides an inherited device-count flag (of 1, so a
    flag set after jax started would leave one device and fail)."""
    exe = shutil.which("autoshard", path=str(Path(sys.executable).parent)) or shutil.which("autoshard")
    assert exe, "the autoshard console script is not installed"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    proc = subprocess.run([exe, "train", "--devices", "2", "--steps", "2", "--batch", "4", "--seq", "16",
                           "--data", tiny_text, "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert list(stdout_losses(proc.stdout)) == [1, 2]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["devices"] == 2 and config["plan_source"] == "planned for cpu:2"
    assert config["mesh"]["data"] * config["mesh"]["fsdp"] * config["mesh"]["tensor"] == 2
    # a user error from the real entry point: one line, status 2
    proc = subprocess.run([exe, "train", "--mesh", "data=3"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")


def test_loss_falls_on_default_text(tmp_path, capsys):
    """50 steps of gpt-tiny on the standard library's sources: the loss clearly falls."""
    code, out, err = train(capsys, "--steps", "50", "--batch", "8", "--seq", "64", "--devices", "1",
                           "--out", str(tmp_path))
    assert code == 0, err
    losses = [r["loss"] for r in metrics(tmp_path)]
    assert len(losses) == 50
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"loss {first:.3f} -> {last:.3f}")
    assert last < first - 1.0, (first, last)
