"""autoshard: plan, then train. Automatic parallelization for JAX / Flax NNX models.

The jax-heavy parts load on first use, so the CLI can set XLA flags (emulated device count) before jax starts.
"""

from __future__ import annotations

import importlib

from planner.errors import AutoshardError, PlanError
from planner.plan import AXES, PipelineSpec, Plan

_LAZY = {
    "parallelize": ("autoshard.train", "parallelize"),
    "fit": ("autoshard.loop", "fit"),
    "Trainer": ("autoshard.train", "Trainer"),
    "make_optimizer": ("autoshard.train", "make_optimizer"),
    "make_mesh": ("autoshard.emit", "make_mesh"),
    "rule_plan": ("autoshard.api", "rule_plan"),
    "plan": ("autoshard.api", "plan"),
    "plan_function": ("autoshard.api", "plan_function"),
    "predict": ("autoshard.api", "predict"),
    "analyze": ("autoshard.analysis", "analyze"),
    "verify": ("autoshard.verification", "verify"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'autoshard' has no attribute {name!r}")


__all__ = ["AXES", "AutoshardError", "PipelineSpec", "Plan", "PlanError", *_LAZY]
