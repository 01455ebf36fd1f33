"""Routing traces of a mixture-of-experts model: which experts each token picks in each MoE layer.

The trace feeds expert placement (`planner.placement`): run a (trained) model on sample batches with the ops
context recording routing, and stack every layer's top-k choices. The model is an `autoshard.protocols.MoEModel`
(`embed_inputs`, and `layer_stack` returning per-layer MoE statistics).
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import numpy as np
from flax import nnx

from autoshard import ops, protocols
from planner.errors import AutoshardError

EXPERT_AXES = ("experts", "router_experts")
"""Logical axis names of the expert dimension in expert weights and in the router's columns."""


def routing_trace(model: nnx.Module, batches: Iterable[dict[str, np.ndarray]]) -> np.ndarray:
    """expert_ids [layers, tokens, k] of `model` on `batches` (tokens of all batches, in order)."""
    lacks = [name for name in protocols.missing(model, protocols.MoEModel) if name != "aux_loss_weight"]
    if lacks:
        raise AutoshardError(f"{type(model).__name__} has no {' / '.join(lacks)}: cannot record its routing "
                             f"(autoshard.protocols.MoEModel)")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def choices(params, rest, batch):
        with ops.context(ops.OpsContext(record_routing=True)):
            m = nnx.merge(graphdef, params, rest, copy=True)
            _, stats = m.layer_stack(m.embed_inputs(batch))
        if stats is None or stats.choices is None:
            raise AutoshardError(f"{type(model).__name__} has no routed (MoE) layers: there is no routing to trace")
        return stats.choices                                     # [L, B, S, k]

    parts = []
    for batch in batches:
        c = np.asarray(choices(params, rest, {k: np.asarray(v) for k, v in batch.items()}))
        parts.append(c.reshape(c.shape[0], -1, c.shape[-1]))
    if not parts:
        raise AutoshardError("no batches to trace the routing on: give --routing-batches >= 1")
    return np.concatenate(parts, axis=1)


def expert_axes(model: nnx.Module) -> dict[str, int]:
    """{parameter path: its expert axis} for every parameter with an `experts` or `router_experts` dimension."""
    from planner.params import param_table

    return {path: info.axes.index(name) for path, info in param_table(model).items()
            for name in EXPERT_AXES if info.axes and name in info.axes}
