"""The training loop: `autoshard.fit(trainer, data, steps=...)` (or `trainer.fit(data, steps=...)`), what `autoshard train` runs and the Python API offers.

One loop for both, so a script gets what the command line gets: periodic atomic checkpoints of the whole training
state (`autoshard.checkpoint`), exact resume (weights, optimizer state, step and data position), a clean stop on
SIGTERM / SIGINT at the next step boundary with a checkpoint of the step whose weights it holds, an eval loss every
N steps, and per-step records (loss, tokens/s, step time, MFU, the plan's predicted step time) handed to callbacks
such as `autoshard.metrics.MetricsLog`.

Only process 0 calls the callbacks (it writes the run folder and the console); every process takes part in the
checkpoint saves, which orbax makes collective.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

from autoshard import state as train_state
from autoshard.checkpoint import DEFAULT_KEEP, Checkpoints, check_target
from autoshard.signals import StopSignals
from planner.errors import AutoshardError

Record = dict[str, Any]


class Data(Protocol):
    """What `fit` draws batches from; `state()` / `restore(state)` (as `autoshard.data.TextData` has) make a
    checkpoint hold the data position, so that a resumed run sees the batches an uninterrupted one would."""

    def next(self) -> Any: ...


@dataclasses.dataclass
class FitResult:
    step: int
    """The last step completed (its weights are the trainer's now)."""
    metrics: Record
    """The last step's record."""
    stopped: str | None = None
    """What stopped the loop early: a signal ("SIGTERM", "SIGINT") or `END_OF_DATA`; else None."""
    checkpoint: int | None = None
    """The step of the last checkpoint written, if any."""
    seconds: float = 0.0


END_OF_DATA = "end of data"
"""`FitResult.stopped` when a finite `data` ran out before `steps`."""


@dataclasses.dataclass
class Speed:
    """What turns a step time into MFU and a predicted-vs-measured figure."""

    flops_per_step: float | None = None
    """Training FLOPs of one step, all devices together (the traced graph's `training_flops`)."""
    peak_flops: float | None = None
    """Peak FLOP/s of all devices together (the cluster's per-device peak for the compute dtype x devices)."""
    predicted_step_s: float | None = None
    """The plan's predicted step time."""


def fit(trainer, data: Data | Iterable, *, steps: int, checkpoint: Checkpoints | str | Path | None = None,
        checkpoint_every: int | None = None, keep: int | None = DEFAULT_KEEP, async_save: bool = True,
        resume: bool = False, eval_data: Sequence[Any] | None = None, eval_every: int | None = None,
        callbacks: Sequence[Callable[[Record], None]] = (), schedule: Callable[[int], float] | None = None,
        speed: Speed | None = None, meta: dict[str, Any] | None = None, stop: StopSignals | None = None,
        start_step: int | None = None, stop_on_nonfinite: bool = True) -> FitResult:
    """Train `trainer` on batches of `data` until step `steps`.

    Args:
      trainer: from `autoshard.parallelize`.
      data: an object with `next()` (and `state()` / `restore()` for an exact resume), or any iterable of batches
        (one that runs out before `steps` stops the run there, checkpointed, with a warning: `END_OF_DATA`).
      steps: the last step number (a resumed run continues to it).
      checkpoint: a folder (or `Checkpoints`) to save the whole training state into: every `checkpoint_every`
        steps, at the end, and when a signal stops the loop; `keep` steps are kept (None: all).
      resume: continue from the latest complete step in `checkpoint` (weights, optimizer state, step, data
        position), or start afresh if it has none.
      eval_data: held-out batches; their mean loss is recorded as `eval_loss` every `eval_every` steps and at the
        last step.
      callbacks: called on process 0 with each step's record (`step`, `loss`, the model's metrics, `lr`,
        `tokens_per_s`, `step_time_s`, `elapsed_s`, `mfu`, `predicted_step_s`, `eval_loss`).
      schedule: the learning rate at each step (for the record).
      speed: FLOPs and peak for MFU, and the plan's predicted step time (default: traced from the trainer).
      meta: JSON-able settings to store in each checkpoint (what a resume checks against).
      stop: the signal handlers (default: SIGTERM and SIGINT installed for the loop's duration).
      start_step: the step the trainer's state is at (default: `trainer.steps_done`, or the resumed step).
    """
    start = trainer.steps_done if start_step is None else int(start_step)
    if checkpoint is not None and not resume:  # another run's later steps: refused before any step, not at a save
        check_target(checkpoint.directory if isinstance(checkpoint, Checkpoints) else checkpoint, after=start,
                     advice="pass resume=True to continue it, or save into another folder")
    ckpt = Checkpoints.create(checkpoint, keep=keep, async_save=async_save,
                              model=(meta or {}).get("model")) if isinstance(checkpoint, (str, Path)) else checkpoint
    owned = isinstance(checkpoint, (str, Path))
    if resume:
        if ckpt is None:
            raise AutoshardError("resume needs a checkpoint folder")
        done = resume_from(ckpt, trainer, data, meta)
        start = done if done is not None else start
    if start > steps:
        raise AutoshardError(f"the run is at step {start} already, past steps={steps}")
    own_signals = stop is None
    stop = stop or StopSignals()
    stop.install()  # (again: a native library, such as the planner's solver, may have replaced the handlers)
    stop.defer()
    try:
        return _loop(trainer, data, ckpt, start, steps, checkpoint_every, eval_data, eval_every, callbacks,
                     schedule, speed, meta or {}, stop, stop_on_nonfinite)
    finally:
        if own_signals:
            stop.uninstall()
        if ckpt is not None:
            ckpt.wait()
            if owned:
                ckpt.close()


def _loop(trainer, data, ckpt, start, steps, every, eval_data, eval_every, callbacks, schedule, speed, meta, stop,
          stop_on_nonfinite) -> FitResult:
    writer = jax.process_index() == 0
    draw = data.next if hasattr(data, "next") else iter(data).__next__
    began = time.perf_counter()
    record: Record = {}
    step, saved = start, None

    def save(at: int) -> None:
        nonlocal saved
        if ckpt is not None and saved != at and at > start:
            ckpt.save(at, train_state.model_layout(trainer), checkpoint_meta(trainer, data, meta))
            saved = at

    for step in range(start + 1, steps + 1):
        try:
            batch = draw()
        except StopIteration:  # a finite iterable shorter than the run: it stops there, saved as a signal's stop is
            warnings.warn(f"the data ran out after step {step - 1} of {steps}: training stops there", stacklevel=3)
            save(step - 1)
            return FitResult(step - 1, record, END_OF_DATA, saved, time.perf_counter() - began)
        if speed is None:
            speed = default_speed(trainer, batch)
        t0 = time.perf_counter()
        metrics = trainer.step(batch)
        dt = time.perf_counter() - t0
        record = _record(step, metrics, batch, dt, time.perf_counter() - began, schedule, speed)
        if eval_data is not None and eval_every and (step % eval_every == 0 or step == steps):
            record["eval_loss"] = evaluate(trainer, eval_data)
        if writer:
            for callback in callbacks:
                callback(record)
        if stop_on_nonfinite and not math.isfinite(record["loss"]):
            raise AutoshardError(f"loss became {record['loss']} at step {step}: try a lower learning rate")
        if every and step % every == 0:
            save(step)
        if stop.requested():
            save(step)
            return FitResult(step, record, stop.name, saved, time.perf_counter() - began)
    save(step)
    return FitResult(step, record, None, saved, time.perf_counter() - began)


def _record(step: int, metrics: Record, batch: Any, dt: float, elapsed: float, schedule, speed: Speed) -> Record:
    tokens = _tokens(batch)
    record = {"step": step, "loss": metrics["loss"], **{k: v for k, v in metrics.items() if k != "loss"}}
    if schedule is not None:
        record["lr"] = float(schedule(step - 1))
    record.update({"tokens_per_s": tokens / dt, "step_time_s": dt, "elapsed_s": elapsed})
    if speed.flops_per_step and speed.peak_flops:
        record["mfu"] = speed.flops_per_step / dt / speed.peak_flops
    if speed.predicted_step_s:
        record["predicted_step_s"] = speed.predicted_step_s
    return record


def _tokens(batch: Any) -> int:
    """Tokens in a batch: the targets' elements for a token batch, else the batch size."""
    if isinstance(batch, dict) and "targets" in batch:
        return int(np.size(batch["targets"]))
    return int(np.shape(jax.tree.leaves(batch)[0])[0])


def evaluate(trainer, batches: Sequence[Any]) -> float:
    """Mean loss over held-out batches (no update)."""
    return float(np.mean([trainer.loss(b) for b in batches]))


def checkpoint_meta(trainer, data, meta: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint records beside the arrays: the plan, the data position and the caller's settings."""
    out = {**meta, "plan": trainer.plan.to_dict()}
    if hasattr(data, "state"):
        out["data_position"] = data.state()
    return out


def resume_from(ckpt: Checkpoints, trainer, data, meta: dict[str, Any] | None = None) -> int | None:
    """Load the latest complete step of `ckpt` into `trainer` (and `data`'s position); its step, or None if the
    folder has no step yet. The settings in `meta` that a checkpoint recorded must match (`check_settings`)."""
    step = ckpt.latest()
    if step is None:
        return None
    recorded = ckpt.meta(step)
    check_settings(recorded, meta or {}, ckpt.directory)
    tables = ckpt.read(step, train_state.targets(trainer))
    train_state.load(trainer, tables, step)
    if hasattr(data, "restore"):
        if "data_position" not in recorded:
            raise AutoshardError(f"checkpoint {ckpt.directory} step {step} records no data position: cannot resume "
                                 f"the batch order (start from its weights with --restore instead)")
        data.restore(recorded["data_position"])
    return step


RESUME_KEYS = ("model", "steps", "lr", "warmup", "batch", "seq", "seed", "data")
"""Settings a resumed run must share with the checkpoint: the model, the schedule and the batch order."""


def check_settings(recorded: dict[str, Any], meta: dict[str, Any], where: Any) -> None:
    for key in RESUME_KEYS:
        if key in meta and key in recorded and meta[key] != recorded[key]:
            raise AutoshardError(f"checkpoint {where} was trained with {key} {recorded[key]}, this run has "
                                 f"{meta[key]}: resume with the same {key} (it sets the model, the learning-rate "
                                 f"schedule or the batch order), or start a new run from its weights with --restore")


def default_speed(trainer, batch: Any) -> Speed:
    """Training FLOPs of the step traced on `batch`'s shapes, the local devices' peak (`autoshard.metrics`), and
    the plan's predicted step time."""
    from autoshard.metrics import peak_flops, step_work

    flops, dtype = step_work(trainer, batch)
    return Speed(flops, peak_flops(trainer, dtype=dtype), trainer.plan.predicted.get("step_seconds"))
