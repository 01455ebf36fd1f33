"""Check a trainer's plan against the step XLA compiled for it: `autoshard.verify(trainer, example_batch)`.

Works for any model a Trainer runs (the shipped presets, an NNX model of your own with its `loss_fn`): the planner
predicts memory and communication for this plan and batch, the train step is compiled for that batch, and
`comparison.compare` judges the two under the tolerances `autoshard verify` uses. Printing the result shows the same
table as the CLI command.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from autoshard import comparison
from autoshard.analysis import analyze, format_bytes, peak_line

PIPELINE_BRANCH_KEYS = ("tensor/", "seq/", "expert/")
"""Collectives of the ops inside a pipeline executor's per-stage `lax.switch` branches: `autoshard.analysis` counts
them as often as each branch is taken, but the planner does not yet price them kind by kind as XLA compiles them
inside a stage (gpt-tiny pipe=2,data=2,tensor=2: 2.8 MiB of tensor collectives predicted and compiled, but as
all-reduces where XLA forms reduce-scatters and all-gathers; seq/expert exchanges 20-33% over): shown, not judged."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One judged (or shown) figure: bytes per device per step."""

    name: str
    predicted: float
    compiled: float
    error: float | None
    """(predicted - compiled) / compiled; None when only the compiled figure is 0."""
    tolerance: float | None
    """None for a figure shown but not judged (a small share of the total, or a pipeline branch's)."""
    ok: bool | None


@dataclasses.dataclass(frozen=True)
class Verification:
    """The outcome of `verify`: `.ok`, one `Row` per figure, the raw comparison and the compiled statistics."""

    comparison: dict[str, Any]
    compiled: dict[str, Any]
    predicted: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.comparison["pass"])

    @property
    def rows(self) -> list[Row]:
        c = self.comparison
        named = [("memory/device", c["memory"]), ("communication total", c["comm_total"]),
                 *((k, r) for k, r in c["comm"].items())]
        return [Row(name, r["predicted"], r["compiled"], r["error"], r["tolerance"], r["ok"]) for name, r in named]

    def __str__(self) -> str:
        lines = comparison.format_comparison(self.comparison).splitlines()
        if self.comparison["memory"]["ok"] is False:  # what each side is made of, above the verdict
            parts = self.predicted.get("memory_breakdown") or {}
            lines[-1:-1] = ["memory predicted: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items()),
                            "compiled " + peak_line(self.compiled)]
        return "\n".join(lines)


def compare_compiled(plan: Any, predicted: Mapping[str, Any], compiled: Mapping[str, Any]) -> dict[str, Any]:
    """`comparison.compare` with the figures a plan of this kind can be judged on (not a pipeline's branch ops)."""
    if plan.pipeline is None:
        return comparison.compare(predicted, compiled)
    return comparison.compare(predicted, compiled, not_judged=PIPELINE_BRANCH_KEYS)


def verify(trainer: Any, example_batch: Any, *, cluster: Any = None,
           predicted: Mapping[str, Any] | None = None) -> Verification:
    """Compile `trainer`'s step for batches like `example_batch` and judge the plan's predictions against it.

    Args:
      trainer: an `autoshard.Trainer` (from `autoshard.parallelize`), with the loss function it trains.
      example_batch: a batch pytree of arrays or ShapeDtypeStructs (every leaf leads with the batch).
      cluster: the hardware the prediction is made for (default: the local devices); memory and communication
        bytes do not depend on it.
      predicted: figures to judge instead of a fresh `autoshard.predict` (e.g. a plan's own `plan.predicted`).

    Returns:
      A `Verification`: `.ok`, `.rows`, and `str()` gives the table `autoshard verify` prints.
    """
    from autoshard.api import local_cluster, predict

    plan = trainer.plan
    if predicted is None:
        cluster = cluster or local_cluster(plan.num_devices)
        fn = trainer.function  # a plain loss function is traced with its variables, an NNX model with its loss
        model = dict(params=fn.variables, rng=fn.rng) if fn is not None else dict(loss_fn=trainer.loss_fn)
        predicted = predict(plan, trainer.abstract, example_batch, cluster=cluster, optimizer=trainer.optimizer,
                            **model)
    compiled = analyze(trainer.compile(example_batch), trainer.mesh)
    return Verification(compare_compiled(plan, predicted, compiled), compiled, dict(predicted))
