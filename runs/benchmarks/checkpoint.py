"""Checkpoint cost for gpt-small: save and restore time and size, and the per-step overhead of asynchronous against
synchronous saving.

The whole training state (weights, AdamW's two moments, step, data position, plan) of gpt-small (124M parameters,
float32 weights) under an fsdp=4 rule plan on 4 emulated CPU devices, written by `autoshard.checkpoint.Checkpoints`
(orbax's CheckpointManager). Then the training loop (`autoshard.loop.fit`) runs the same steps three times: with
no checkpoints, saving every second step asynchronously, and saving every second step synchronously; the overhead
of a save is the extra loop time over the steps without checkpoints, per save.

Reproduce (from the repository root; about 10 minutes on 2 CPU cores):

    .venv/bin/python runs/benchmarks/checkpoint.py

Writes runs/benchmarks/checkpoint.json and runs/benchmarks/checkpoint.md next to this file.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import jax  # noqa: E402

import models  # noqa: E402
from autoshard import checkpoint, data, state  # noqa: E402
from autoshard.api import rule_plan  # noqa: E402
from autoshard.loop import fit  # noqa: E402
from autoshard.train import make_optimizer, parallelize  # noqa: E402

MODEL, MESH, BATCH, SEQ = "gpt-small", "fsdp=4", 4, 64
STEPS, EVERY = 6, 2


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _trainer():
    plan = rule_plan(models.abstract(MODEL), MESH)
    return parallelize(models.factory(MODEL), make_optimizer(1e-4, 100), plan, devices=jax.devices()[:4])


class TimedCheckpoints(checkpoint.Checkpoints):
    """Checkpoints that record how long each `save` kept the loop waiting."""

    blocked: list[float]

    def save(self, step, tables, meta):
        t0 = time.perf_counter()
        super().save(step, tables, meta)
        self.blocked.append(time.perf_counter() - t0)


def _loop_seconds(trainer, corpus, folder: Path | None, async_save: bool) -> tuple[float, list[float], list[float]]:
    """Wall time of STEPS steps (after a first step that compiles), saving every EVERY steps into `folder` (the
    final wait for the last save included); the step times; the time each save blocked the loop."""
    batches = data.TextData(corpus, BATCH, SEQ, seed=0)
    trainer.step(batches.next())  # compile outside the timing
    while trainer.steps_done % EVERY:  # start on a multiple of EVERY: each loop then saves STEPS // EVERY times
        trainer.step(batches.next())
    times: list[float] = []
    ckpt = TimedCheckpoints.create(folder, keep=2, async_save=async_save) if folder else None
    if ckpt is not None:
        ckpt.blocked = []
    t0 = time.perf_counter()
    fit(trainer, batches, steps=trainer.steps_done + STEPS, checkpoint=ckpt, checkpoint_every=EVERY if ckpt else None,
        callbacks=[lambda r: times.append(r["step_time_s"])], start_step=trainer.steps_done)
    if ckpt is not None:
        ckpt.wait()
        ckpt.close()
    return time.perf_counter() - t0, times, (ckpt.blocked if ckpt is not None else [])


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="autoshard-ckpt-bench-"))
    corpus = data.load(None)
    trainer = _trainer()
    trainer.step(data.TextData(corpus, BATCH, SEQ, seed=0).next())
    tables = state.model_layout(trainer)
    n_params = sum(int(v.size) for v in tables["params"].values())
    result: dict = {"model": MODEL, "mesh": MESH, "devices": 4, "params": n_params, "jax": jax.__version__,
                    "load_average_before": [round(x, 1) for x in os.getloadavg()]}

    # one save, synchronous: the time until the step is complete on disk; and an asynchronous one: the time the
    # loop waits (device-to-host copy) and the time until written
    sync_dir, async_dir = work / "sync", work / "async"
    ckpt = checkpoint.Checkpoints.create(sync_dir, async_save=False)
    ckpt.save(0, tables, {"note": "warm-up"})  # orbax's first save compiles its copy programs: not timed
    ckpt.wait()
    t0 = time.perf_counter()
    ckpt.save(1, state.model_layout(trainer), {"plan": trainer.plan.to_dict()})
    result["save_sync_s"] = time.perf_counter() - t0
    ckpt.close()
    result["size_bytes"] = _size(sync_dir / "1")
    ckpt = checkpoint.Checkpoints.create(async_dir, async_save=True)
    ckpt.save(0, tables, {"note": "warm-up"})
    ckpt.wait()
    t0 = time.perf_counter()
    ckpt.save(1, state.model_layout(trainer), {"plan": trainer.plan.to_dict()})
    result["save_async_blocking_s"] = time.perf_counter() - t0
    ckpt.wait()
    result["save_async_total_s"] = time.perf_counter() - t0
    ckpt.close()

    # restore the whole state into a fresh trainer (as --resume does), and the weights only (as --restore does)
    fresh = _trainer()
    t0 = time.perf_counter()
    opened = checkpoint.Checkpoints.open(sync_dir)
    state.load(fresh, opened.read(1, state.targets(fresh)), 1)
    jax.block_until_ready(fresh.params)
    result["restore_s"] = time.perf_counter() - t0
    opened.close()
    t0 = time.perf_counter()
    checkpoint.restore(sync_dir, models.abstract(MODEL))
    result["restore_weights_s"] = time.perf_counter() - t0
    del fresh

    # the loop: no checkpoints, async saves, sync saves
    for name, folder, async_save in (("none", None, True), ("async", work / "loop-async", True),
                                     ("sync", work / "loop-sync", False)):
        seconds, steps, blocked = _loop_seconds(trainer, corpus, folder, async_save)
        result[f"loop_{name}_s"] = seconds
        result[f"loop_{name}_step_times"] = steps
        result[f"loop_{name}_save_blocked"] = blocked
    saves = STEPS // EVERY
    for name in ("async", "sync"):
        result[f"overhead_{name}_per_save_s"] = (result[f"loop_{name}_s"] - result["loop_none_s"]) / saves
        result[f"overhead_{name}_per_step_pct"] = 100 * (result[f"loop_{name}_s"] / result["loop_none_s"] - 1)
    result["load_average_after"] = [round(x, 1) for x in os.getloadavg()]  # other jobs on the machine skew the times
    shutil.rmtree(work, ignore_errors=True)
    (HERE / "checkpoint.json").write_text(json.dumps(result, indent=1) + "\n")
    (HERE / "checkpoint.md").write_text(report(result))
    print(report(result))


def report(r: dict) -> str:
    gib = r["size_bytes"] / 2**30
    per_step = r["loop_none_s"] / STEPS
    return f"""# Checkpoint cost: {r['model']} ({r['params'] / 1e6:.0f}M parameters), whole training state

Command: `.venv/bin/python runs/benchmarks/checkpoint.py` (jax {r['jax']}, {r['mesh']} on {r['devices']} emulated CPU
devices of a 2-core machine shared with other jobs, load average {r['load_average_before'][0]} before and
{r['load_average_after'][0]} after: figures are wall-clock and noisy). A checkpoint holds the weights
(float32), AdamW's two moments, the step, the data position and the plan, in the model's layout.

| | |
|---|---|
| size on disk | {gib:.2f} GiB ({r['size_bytes']:,} bytes) |
| save, synchronous (until the step is renamed into place) | {r['save_sync_s']:.2f} s |
| save, asynchronous: the loop waits (device-to-host copy) | {r['save_async_blocking_s']:.2f} s |
| save, asynchronous: until written | {r['save_async_total_s']:.2f} s |
| restore the whole state into a fresh trainer (`--resume`) | {r['restore_s']:.2f} s |
| restore the weights only (`--restore`) | {r['restore_weights_s']:.2f} s |

The loop (`autoshard.loop.fit`) over {STEPS} steps of batch {BATCH} x {SEQ} (after a compiling step), saving every
{EVERY} steps ({STEPS // EVERY} saves). "Loop blocked per save" is the time each `save` call held the loop (the
direct per-save overhead); "loop time" is the whole loop including the final wait for the last save, so it also
shows the writer thread's competition for the same 2 cores (and the other jobs' noise):

| saving | loop blocked per save | loop time | per step | loop time over no saving, per save |
|---|---|---|---|---|
| none | | {r['loop_none_s']:.1f} s | {per_step:.2f} s | |
| asynchronous | {_mean(r['loop_async_save_blocked']):.2f} s | {r['loop_async_s']:.1f} s | {r['loop_async_s'] / STEPS:.2f} s | {r['overhead_async_per_save_s']:+.2f} s |
| synchronous | {_mean(r['loop_sync_save_blocked']):.2f} s | {r['loop_sync_s']:.1f} s | {r['loop_sync_s'] / STEPS:.2f} s | {r['overhead_sync_per_save_s']:+.2f} s |

Asynchronous saving holds the loop only for the copy to host memory (and, when saves come faster than they are
written, for the previous save to finish); the writing overlaps the next steps. On this 2-core CPU machine the
writer thread competes with the training step for the same cores, so the loop time does not fall by the whole
write time; on a GPU/TPU host, whose steps do not use the host CPU, the write hides almost completely.
"""


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


if __name__ == "__main__":
    main()
