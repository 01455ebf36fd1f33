"""What a run reports per step: `metrics.jsonl` and TensorBoard event files in the run folder, and the figures behind
MFU (the step's training FLOPs and the devices' peak).

MFU is model FLOPs utilisation: the traced training step's FLOPs (`planner.trace.Graph.training_flops`: forward and
backward contractions, no rematerialised recompute) over the measured step time, against the peak FLOP/s of all the
devices in use for the model's compute dtype. The peak comes from the cluster preset the devices are (`h100-80g`,
`a100-80g`, `tpu-v5e`, `tpu-v5p`, recognised by device kind), or from `--cluster`; on CPU it is the `cpu` preset's
placeholder (50 GFLOP/s float32 per emulated device), so a CPU MFU is only a relative figure.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import jax
import numpy as np

from autoshard.runs import METRICS
from planner.cluster import ClusterSpec, load_cluster

TB_TAGS = {"loss": "train/loss", "eval_loss": "eval/loss", "lr": "train/lr", "tokens_per_s": "speed/tokens_per_s",
           "step_time_s": "speed/step_time_s", "mfu": "speed/mfu", "predicted_step_s": "speed/predicted_step_s"}
"""TensorBoard tag of each record field (others: `train/<field>`)."""
_DEVICE_PRESETS = (("h100", "h100-80g"), ("a100", "a100-80g"), ("v5 lite", "tpu-v5e"), ("v5e", "tpu-v5e"),
                   ("v5p", "tpu-v5p"), ("v5", "tpu-v5p"))


def json_value(v: Any) -> Any:
    """A record value as JSON allows (non-finite floats as null / "inf" / "-inf")."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, list):
        return [json_value(x) for x in v]
    return v


class MetricsLog:
    """A `fit` callback: each step's record as one JSON line of `metrics.jsonl` and as TensorBoard scalars.

    Resuming at step S keeps the first S lines of an existing `metrics.jsonl` (a killed run may have logged steps
    past its last checkpoint: they are replaced by the resumed run's), and the event writer purges TensorBoard's
    steps after S the same way.
    """

    def __init__(self, run_dir: str | Path, *, start_step: int = 0, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        path = self.run_dir / METRICS
        if start_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= start_step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
            self.file = open(path, "a")
        else:
            self.file = open(path, "w")
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(logdir=str(self.run_dir), purge_step=start_step + 1 if start_step else None,
                                        flush_secs=10)

    def __call__(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps({k: json_value(v) for k, v in record.items()}) + "\n")
        self.file.flush()
        if self.writer is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(TB_TAGS.get(key, f"train/{key}"), float(value), step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line (a killed run): dropped


def read_events(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of a run folder's TensorBoard event files: {tag: [(step, value), ...]} (as TensorBoard shows
    them: a purge_step marker drops the earlier file's steps from there on)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            body = data[i + 12:i + 12 + length]
            i += 12 + length + 4
            if len(body) < length:
                break  # a torn record at the end of a killed run's file
            event = Event.FromString(body)
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                for tag in out:
                    out[tag] = [(s, v) for s, v in out[tag] if s < event.step]
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return out


def step_work(trainer, batch: Any) -> tuple[float | None, str]:
    """(FLOPs of one training step on batches shaped like `batch`, all devices together; the dtype its matmuls
    run in), both from the traced graph; (None, "float32") when the model cannot be traced for it."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype
                                                         if not hasattr(x, "dtype") else x.dtype), batch)
    try:
        if trainer.function is not None:
            from autoshard.functional import trace

            graph = trace(trainer.function, shapes)
        else:
            from planner.search import trace_model

            loss_fn = None if trainer.loss_fn.__name__ == "_default_loss" else trainer.loss_fn
            graph = trace_model(trainer.abstract, shapes, loss_fn)
    except Exception:  # noqa: BLE001  (MFU is a figure to show, never a reason to stop training)
        return None, "float32"
    return float(graph.training_flops()), graph.compute_dtype()


def device_cluster(devices: list) -> ClusterSpec | None:
    """The cluster preset of these devices by their kind (CPU: the `cpu` placeholder), or None if unknown."""
    n = len(devices)
    if devices[0].platform == "cpu":
        return load_cluster(f"cpu:{n}")
    kind = devices[0].device_kind.lower()
    for key, preset in _DEVICE_PRESETS:
        if key in kind:
            return load_cluster(f"{preset}:{n}")
    return None


def peak_flops(trainer, cluster: ClusterSpec | None = None, dtype: str = "float32") -> float | None:
    """Peak FLOP/s of the trainer's devices together for compute dtype `dtype` (`step_work`'s; `cluster`'s
    figures, else the devices' preset); None when unknown."""
    devices = list(trainer.mesh.devices.flat)
    cluster = cluster or device_cluster(devices)
    if cluster is None:
        return None
    return cluster.peak_flops.get(dtype, cluster.peak_flops["float32"]) * len(devices)
