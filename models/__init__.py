"""Flax NNX models shipped with autoshard: a dense GPT-style decoder and its mixture-of-experts variant."""

from __future__ import annotations

from flax import nnx

from models.config import PRESETS, ModelConfig, config_from_name
from models.decoder import Decoder
from planner.checks import check_seed


def create(model: str | ModelConfig, seed: int = 0) -> Decoder:
    """A freshly initialised model (materialised on the default device)."""
    check_seed(seed)
    cfg = config_from_name(model) if isinstance(model, str) else model
    return Decoder(cfg, rngs=nnx.Rngs(seed))


def factory(model: str | ModelConfig, seed: int = 0):
    """A zero-argument constructor: `autoshard.parallelize` runs it under jit so weights are born sharded."""
    check_seed(seed)
    cfg = config_from_name(model) if isinstance(model, str) else model
    return lambda: Decoder(cfg, rngs=nnx.Rngs(seed))


def abstract(model: str | ModelConfig) -> Decoder:
    """The model with shapes only (no memory), for planning presets of any size."""
    return nnx.eval_shape(factory(model))


__all__ = ["PRESETS", "Decoder", "ModelConfig", "abstract", "config_from_name", "create", "factory"]
