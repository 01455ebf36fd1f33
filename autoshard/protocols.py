"""What the runtime asks of a model beyond its loss, as `typing.Protocol`s.

Planning, data, tensor, FSDP and sequence parallelism need nothing but the model's loss: they work from the traced
graph. Two features still need the model's cooperation, and these classes are the whole of it (`models.decoder.Decoder`
implements both):

- `StagedModel`: what the pipeline executor (`autoshard.pipeline`) runs on its stages: the first stage's prologue,
  a stack of identical layers whose parameters are stacked on a leading axis, the last stage's epilogue.
- `MoEModel`: what mixture-of-experts layers add: their experts dispatch through `autoshard.ops.moe`, whose
  statistics (`ops.MoEStats`) each layer returns beside its output; the model weighs the balancing loss
  (`ops.moe_metrics`' `moe_aux_loss`) by `aux_loss_weight`, which a pipeline needs to rebuild the whole batch's
  loss from its microbatches; and routing traces (`autoshard.routing`, for expert placement) run the layer stack.

The checks are structural (`isinstance` against these runtime-checkable protocols): a model lacking a member is
refused with one line naming what is missing, before anything compiles.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

from autoshard.ops import MoEStats


@runtime_checkable
class StagedModel(Protocol):
    """A model a pipeline can cut into stages."""

    blocks: Any
    """An NNX module whose parameters are stacked on a leading layers axis; called on one layer's slice it maps
    `x -> (x, aux)` (aux None or the layer's `ops.MoEStats`) or `x -> x`. A model may also say how a block is
    called (`call_block(block, x)`, as `autoshard.staging.Staged` does with the loss's other block arguments).
    A model whose blocks are a Python loop over a list, or a scan over an `nnx.vmap`-built stack, need not
    implement this protocol: `autoshard.staging` restages it."""

    def embed_inputs(self, batch: Any) -> jax.Array:
        """The first block's input for `batch` (the first stage's prologue: embedding)."""
        ...

    def head_loss(self, x: jax.Array, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(mean loss, scalar metrics) from the last block's output (the last stage's epilogue)."""
        ...


@runtime_checkable
class MoEModel(Protocol):
    """A model with mixture-of-experts layers (through `autoshard.ops.moe`)."""

    aux_loss_weight: float
    """Weight of the balancing loss (`ops.moe_metrics(stats)["moe_aux_loss"]`) in the training loss."""

    def embed_inputs(self, batch: Any) -> jax.Array:
        ...

    def layer_stack(self, x: jax.Array) -> tuple[jax.Array, MoEStats | None]:
        """Every layer over x: the output and the layers' statistics stacked on a leading layers axis."""
        ...


def missing(model: Any, protocol: type) -> list[str]:
    """The members of `protocol` that `model` lacks (none when it implements it)."""
    names = [n for n in getattr(protocol, "__protocol_attrs__", None) or _members(protocol)]
    return sorted(n for n in names if not hasattr(model, n))


def _members(protocol: type) -> list[str]:
    """A protocol's members on Pythons without `__protocol_attrs__` (3.11)."""
    own = {**getattr(protocol, "__annotations__", {}), **vars(protocol)}
    return [n for n in own if not n.startswith("_")]
