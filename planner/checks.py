"""Checks of plain values that the CLI, the Python API, the models and the data all take: one place for each rule,
each a one-line `AutoshardError` that says what to pass instead."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from planner.errors import AutoshardError

MAX_SEED = 2**63 - 1
"""jax keys and numpy generators take any seed in [0, 2^63): a larger one overflows jax's int64, a negative one
numpy refuses."""


def check_seed(seed: Any, what: str = "seed") -> int:
    """`seed` as an int in [0, 2^63)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise AutoshardError(f"{what} must be an integer, got {seed!r}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise AutoshardError(f"{what} must be between 0 and 2^63-1 = {MAX_SEED}, got {seed}")
    return int(seed)


def check_finite(value: Any, what: str, *, positive: bool = False, non_negative: bool = False) -> float:
    """`value` as a finite float (and > 0 / >= 0 when asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AutoshardError(f"{what} must be a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x) or (positive and not x > 0) or (non_negative and not x >= 0):
        need = "a positive" if positive else "a non-negative" if non_negative else "a finite"
        raise AutoshardError(f"{what} must be {need} finite number, got {value!r}")
    return x
