"""Training you can stop and resume: atomic checkpoints, exact resume, preemption, locked run folders, metrics.

One uninterrupted 6-step run is the reference. Runs stopped by a real SIGTERM / SIGINT (in-process: the loop's own
handlers take the signal) or by `kill -9` (a subprocess) are resumed with `--resume` and must reproduce the
reference's per-step losses exactly on the same plan, and within rtol 1e-5 under another plan and device count.
(A save killed while writing, renaming or deleting: tests/test_checkpoint.py.)
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from autoshard import checkpoint, cli, data, metrics, runs
from autoshard.launch import with_device_count
from planner.errors import AutoshardError

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--steps", "6", "--batch", "8", "--seq", "32", "--mesh", "data=2", "--devices", "2", "--seed", "3"]


def train(capsys, *args):
    code = cli.main(["train", *args])
    out, err = capsys.readouterr()
    return code, out, err


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def reference(tiny_text, tmp_path_factory):
    """The uninterrupted run (its default checkpoint folder holds step 6)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(["train", *RUN, "--data", tiny_text, "--out", str(run)]) == 0
    return run


def signal_at(monkeypatch, step: int, signum: int) -> None:
    """Send this process `signum` in the middle of train step `step` (counted from this run's first)."""
    from autoshard.train import Trainer

    real, calls = Trainer.step, []

    def step_with_signal(self, batch):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return real(self, batch)

    monkeypatch.setattr(Trainer, "step", step_with_signal)


def test_sigterm_saves_the_step_it_finished_and_resume_is_exact(reference, tiny_text, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    signal_at(monkeypatch, 3, signal.SIGTERM)
    code, out, err = train(capsys, *RUN, "--data", tiny_text, "--out", str(run))
    monkeypatch.undo()
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM after step 3/6: checkpoint of step 3" in err and "Traceback" not in err
    ckpt = checkpoint.Checkpoints.open(run / "checkpoints")
    assert ckpt.steps() == [3] and ckpt.meta()["step"] == 3 and ckpt.meta()["data_position"]["drawn"] == 3
    assert not (run / runs.LOCK).exists()

    code, out, err = train(capsys, "--out", str(run), "--resume")  # every setting comes from the checkpoint
    assert code == 0, err
    assert "resumed at step 3" in err
    assert losses(run) == losses(reference)  # exactly: same plan, same state, same batches
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]

    # the same checkpoint (copied at step 3) resumed under a pipeline plan on 4 devices
    other = tmp_path / "other-ckpt"
    shutil.copytree(run / "checkpoints", other)
    shutil.rmtree(other / "6")
    code, out, err = train(capsys, "--checkpoint", str(other), "--resume", "--mesh", "pipe=2,data=2", "--devices",
                           "4", "--out", str(tmp_path / "pipe"))
    assert code == 0, err
    got, want = losses(tmp_path / "pipe"), losses(reference)
    assert sorted(got) == [4, 5, 6]
    np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [want[s] for s in (4, 5, 6)], rtol=1e-5)
    # what the pipeline saved is in the model's layout: it matches the reference's final state, optimizer included
    from autoshard import state
    import models
    from autoshard.api import rule_plan
    from autoshard.train import make_optimizer, parallelize

    trainer = parallelize(models.factory("gpt-tiny"), make_optimizer(1e-2, 6), rule_plan(models.abstract("gpt-tiny"),
                                                                                          "data=2"),
                          devices=__import__("jax").devices()[:2])
    targets = state.targets(trainer)
    mine = checkpoint.Checkpoints.open(other).read(6, targets)
    theirs = checkpoint.Checkpoints.open(reference / "checkpoints").read(6, targets)
    for table in ("params", "opt_state"):
        for key in theirs[table]:
            np.testing.assert_allclose(np.asarray(mine[table][key]), np.asarray(theirs[table][key]), rtol=2e-3,
                                       atol=1e-6, err_msg=f"{table}/{key}")


def test_sigint_after_planning_in_process_still_checkpoints(tiny_text, tmp_path, capsys, monkeypatch):
    """The default `autoshard train` runs the planner (OR-Tools) in the same process: Ctrl-C still saves."""
    run = tmp_path / "run"
    signal_at(monkeypatch, 2, signal.SIGINT)
    code, out, err = train(capsys, "--steps", "5", "--batch", "8", "--seq", "16", "--devices", "2", "--data", tiny_text,
                           "--out", str(run), "--eval-every", "1")
    assert code == 130, err
    assert "planned for cpu:2" in err
    assert f"stopped by SIGINT after step 2/5: checkpoint of step 2 in {(run / 'checkpoints').absolute()}" in err
    assert checkpoint.Checkpoints.open(run / "checkpoints").steps() == [2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the loop's handlers are gone again
    # --eval-every: the held-out loss on the console, in metrics.jsonl and in TensorBoard
    assert [line.split()[3] for line in out.splitlines() if line.startswith("eval")] == ["1:", "2:"]
    assert [s for s, _ in metrics.read_events(run)["eval/loss"]] == [1, 2]


def _child(script: str, *args: str) -> subprocess.Popen:
    # (the script may import jax before cli.main; conftest's other flags kept: the programs the reference compiled)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=with_device_count(os.environ.get("XLA_FLAGS", ""), 2))
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


SLOW = """
import sys, time
from autoshard import cli, data
real = data.TextData.next
def slow(self):
    time.sleep(0.3)
    return real(self)
data.TextData.next = slow
sys.exit(cli.main(["train", *sys.argv[1:]]))
"""


def _wait_for_step(folder: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not (folder / str(step)).is_dir():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step} was saved:\n{proc.stderr.read()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"no checkpoint of step {step} after {timeout} s")
        time.sleep(0.02)


def test_kill_9_mid_run_then_resume_reproduces_the_run(reference, tiny_text, tmp_path, capsys):
    run = tmp_path / "run"
    proc = _child(SLOW, *RUN, "--data", tiny_text, "--out", str(run), "--checkpoint-every", "2")
    _wait_for_step(run / "checkpoints", 4, proc)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.wait(timeout=60)
    assert (run / runs.LOCK).exists()  # left behind, but its flock died with the process
    code, out, err = train(capsys, "--out", str(run), "--resume")
    assert code == 0, err
    assert "resumed at step 4" in err
    assert losses(run) == losses(reference)


def test_a_second_run_on_a_folder_in_use_is_refused(reference, tiny_text, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "ck").mkdir()
    lock = runs.Lock(tmp_path / "run").acquire()  # as another run holds it (flock: per open file, so this works
    try:                                            # in one process too)
        code, out, err = train(capsys, *RUN, "--data", tiny_text, "--out", str(tmp_path / "run"), "--resume")
        assert code == 2 and err.startswith("error: run folder") and "in use by another run (pid" in err, err
        ck = tmp_path / "ck"
        held = runs.Lock(ck, "checkpoint folder").acquire()
        code, out, err = train(capsys, *RUN, "--data", tiny_text, "--out", str(tmp_path / "run2"), "--checkpoint",
                               str(ck))
        held.release()
        assert code == 2 and "checkpoint folder" in err and "in use by another run" in err, err
        assert not (tmp_path / "run2").exists()  # refused before the first step: nothing left behind
        assert os.listdir(ck) == []
    finally:
        lock.release()
    # an existing run folder without --resume, and a checkpoint folder of another run
    code, out, err = train(capsys, *RUN, "--data", tiny_text, "--out", str(reference))
    assert code == 2 and "already exists and holds files: pass --resume" in err, err
    code, out, err = train(capsys, *RUN, "--data", tiny_text, "--out", str(tmp_path / "run3"), "--checkpoint",
                           str(reference / "checkpoints"))
    assert code == 2 and "already holds step 6 of another run" in err, err
    assert not (tmp_path / "run3").exists()
    # a folder of the user's is never written into, let alone deleted
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "params").mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, out, err = train(capsys, *RUN, "--data", tiny_text, "--out", str(tmp_path / "run4"), "--checkpoint", str(mine))
    assert code == 2 and "not an autoshard checkpoint folder" in err, err
    assert sorted(os.listdir(mine)) == ["notes.txt", "params"] and (mine / "notes.txt").read_text() == "keep me"


def test_metrics_and_tensorboard(reference, tiny_text, tmp_path, capsys):
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert {"loss", "tokens_per_s", "step_time_s", "mfu", "predicted_step_s", "lr"} <= set(r)
        assert 0 < r["mfu"] < 10 and r["predicted_step_s"] > 0
    events = metrics.read_events(reference)
    assert [s for s, _ in events["train/loss"]] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([v for _, v in events["train/loss"]], [r["loss"] for r in rows], rtol=1e-6)
    assert {"speed/mfu", "speed/tokens_per_s", "speed/step_time_s", "train/lr"} <= set(events)



def test_moe_dropped_tokens_reach_the_console(capsys):
    from autoshard.commands.train import Progress

    progress = Progress(total=1, log_every=5)  # (its last step: the progress line is printed, not throttled)
    progress({"step": 1, "loss": 2.5, "tokens_per_s": 1000.0, "step_time_s": 0.5, "dropped_tokens": 37.0,
              "mfu": 0.012, "predicted_step_s": 0.25})
    out, err = capsys.readouterr()
    assert out == "step 1 loss 2.500000\n"
    assert "37 tokens dropped" in err and "MFU 1.2%" in err and "500.0ms/step (predicted 250.0ms)" in err


@pytest.mark.smoke
def test_fit_in_python_resumes_too(reference, tiny_text, tmp_path):
    """`trainer.fit` is the same loop: a script gets checkpoints and an exact resume (the reference's losses)."""
    import jax

    import models
    from autoshard.api import rule_plan
    from autoshard.train import make_optimizer, parallelize

    plan = rule_plan(models.abstract("gpt-tiny"), "data=2")
    trainer = parallelize(models.factory("gpt-tiny", seed=3), make_optimizer(1e-2, 6), plan,
                          devices=jax.devices()[:2])
    corpus, want = data.load(tiny_text), losses(reference)
    seen: list = []
    first = trainer.fit(data.TextData(corpus, 8, 32, seed=3), steps=3, checkpoint=tmp_path / "ck",
                        callbacks=[seen.append])
    assert first.step == 3 and first.checkpoint == 3 and first.stopped is None
    trainer.step(data.TextData(corpus, 8, 32, seed=99).next())  # wander off: the resume must undo it
    rest = trainer.fit(data.TextData(corpus, 8, 32, seed=3), steps=6, checkpoint=tmp_path / "ck", resume=True,
                       callbacks=[seen.append])
    assert rest.step == 6 and [r["step"] for r in seen] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in seen] == [want[s] for s in range(1, 7)]
    # a run from step 0 into that folder would overwrite its steps: refused before it trains, not at the first save
    with pytest.raises(AutoshardError, match=r"already holds step 6 of another run: pass resume=True"):
        trainer.fit(data.TextData(corpus, 8, 32), steps=8, checkpoint=tmp_path / "ck", start_step=0,
                    callbacks=[seen.append])
    assert len(seen) == 6
    # a finite iterable shorter than the run: it stops where the data ends, checkpointed there, with a warning
    batch = data.TextData(corpus, 8, 32, seed=5).next()
    with pytest.warns(UserWarning, match="the data ran out after step 8 of 10: training stops there"):
        short = trainer.fit([batch, batch], steps=10, checkpoint=tmp_path / "short")
    assert (short.step, short.stopped, short.checkpoint) == (8, "end of data", 8)
