"""Composite ops with swappable parallel implementations: attention, mixture-of-experts, layer boundaries, remat.

Models call these instead of writing attention or expert dispatch inline. Each op runs under a named scope
(`autoshard.attention`, `autoshard.moe`) so the planner sees it as one node, and the runtime picks the
implementation the plan names by tracing under `ops.context(...)`. Outside a context they are plain
single-device math.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class OpsContext:
    """What the runtime tells the ops while it traces a step."""

    mesh: Mesh | None = None
    activations: dict[str, PartitionSpec] = dataclasses.field(default_factory=dict)
    attention: str = "dense"
    moe: str = "dense"
    remat: str = "none"
    record_routing: bool = False
    """MoE ops also return each token's chosen experts (`MoEStats.choices`), for routing traces."""


_stack: list[OpsContext] = [OpsContext()]


@contextlib.contextmanager
def context(ctx: OpsContext) -> Iterator[OpsContext]:
    _stack.append(ctx)
    try:
        yield ctx
    finally:
        _stack.pop()


def current() -> OpsContext:
    return _stack[-1]


# -- layer boundaries and remat --------------------------------------------------------------------------------------
def boundary(x: Array, name: str) -> Array:
    """Mark a named activation (e.g. `layer_input`); the plan's spec for it is applied as a sharding constraint."""
    spec = current().activations.get(name)
    return x if spec is None else constrain(x, spec)


def constrain(x: Array, spec: PartitionSpec) -> Array:
    """A sharding constraint on the context's mesh (its abstract form inside a shard_map, where the manual axes
    must not appear in `spec`)."""
    mesh = current().mesh
    if mesh is None:
        return x
    inner = jax.sharding.get_abstract_mesh()
    if not inner.empty and inner.manual_axes:
        return jax.lax.with_sharding_constraint(x, NamedSharding(inner, spec))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


REMAT_POLICIES: dict[str, Any] = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(fn: Callable) -> Callable:
    """Wrap one layer's function in the plan's rematerialisation policy."""
    name = current().remat
    if name == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[name], prevent_cse=False)


def positions(length: int) -> Array:
    """Positions [length] of the tokens an op sees: 0..length-1, offset by this device's place on `seq` when an
    enclosing shard_map (the pipeline executor's) has made the sequence axis manual and `length` is a local block."""
    am = jax.sharding.get_abstract_mesh()
    if not am.empty and "seq" in am.manual_axes:
        return jax.lax.axis_index("seq") * length + jnp.arange(length)
    return jnp.arange(length)


# -- attention -------------------------------------------------------------------------------------------------------
def attention(q: Array, k: Array, v: Array, *, causal: bool = True, key_mask: Array | None = None,
              window: int | None = None, softcap: float | None = None) -> Array:
    """Softmax attention. q: [B, S, H, D]; k, v: [B, T, Hkv, D] with Hkv dividing H (grouped-query); T = S for
    self-attention, any T for cross-attention (keys and values of another sequence: not causal).

    key_mask: None or [B, T] bool, True where a key may be attended (a padding mask), combined with `causal`. A row
    left with no key to attend gets the mean of all the values, as a dense softmax over a constant very negative
    fill gives (`dense_attention`), so that rewritten models keep their losses (`autoshard.attention_rewrite`).
    window: None, or with `causal` a sliding window (local attention): query i sees keys j with
    i - window < j <= i (`autoshard.sequence.causal_mask`), ring and Ulysses attention included.
    softcap: None, or soft-capped logits (gemma-2): softcap * tanh(logits / softcap) before the mask and softmax.

    Its ops run under the scope `autoshard.attention`, and `autoshard.attention/causal` when causal (windowed or
    not: the ring balances and exchanges both alike): the planner reads whether the ring must balance it from that
    (`planner.seq_expert.op_shapes`; the mask's own ops sit in jitted helpers, whose equations do not carry the
    caller's scope)."""
    _sequence.check_attention(q, k, causal=causal, window=window, softcap=softcap)
    impl = ATTENTION_IMPLS[current().attention]
    extra = {} if key_mask is None else {"key_mask": key_mask}  # implementations registered elsewhere may not mask
    if window is not None:
        extra["window"] = window
    if softcap is not None:
        extra["softcap"] = softcap
    with jax.named_scope("autoshard.attention"), jax.named_scope("causal" if causal else "full"):
        return impl(q, k, v, causal=causal, **extra)


def dense_attention(q: Array, k: Array, v: Array, *, causal: bool = True, key_mask: Array | None = None,
                    window: int | None = None, softcap: float | None = None) -> Array:
    """Attention with the [B, H, S, T] logits in memory (soft-capped first, with `softcap`); masked logits are set
    to the float32 minimum (a finite fill: a row with every key masked gets uniform probabilities, not NaN)."""
    _sequence.check_attention(q, k, causal=causal, window=window, softcap=softcap)
    b, s, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, s, hkv, h // hkv, d)
    logits = jnp.einsum("bskgd,btkd->bkgst", qg, k).astype(jnp.float32) / math.sqrt(d)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    keep = _causal_mask(s, k.shape[1], window) if causal else None
    if key_mask is not None:
        keys = key_mask.astype(bool)[:, None, None, None, :]
        keep = keys if keep is None else keys & keep
    if keep is not None:
        logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(b, s, h, d)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _causal_mask(s: int, t: int, window: int | None) -> Array:
    """`autoshard.sequence.causal_mask` [s, t] of positions 0.., in a jitted helper: its equations do not carry the
    caller's `autoshard.attention` scope (the planner reads the op's shapes off the scoped ones)."""
    return _sequence.causal_mask(jnp.arange(s), jnp.arange(t), window)


ATTENTION_IMPLS: dict[str, Callable[..., Array]] = {"dense": dense_attention}


# -- mixture of experts ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MoEStats:
    aux_loss: Array
    """Load-balancing loss: experts * sum_e (fraction of assignments to e) * (mean router probability of e)."""
    dropped: Array
    """Token-expert assignments dropped for lack of capacity."""
    load: Array
    """[experts] token-expert assignments each expert received (before capacity)."""
    choices: Array | None = None
    """[B, S, k] each token's chosen experts, best first (only when the context records routing)."""
    prob_sum: Array | None = None
    """[experts] router probability summed over the tokens (float32, differentiable): with `load`, what a pipeline
    needs to rebuild the balancing loss of the whole batch from its microbatches (the loss is not their mean)."""


jax.tree_util.register_dataclass(MoEStats, data_fields=["aux_loss", "dropped", "load", "choices", "prob_sum"],
                                 meta_fields=[])


def moe_metrics(stats: MoEStats | None) -> dict[str, Array]:
    """The metrics of a stack of MoE layers' statistics (stacked on a leading layers axis): the balancing loss
    averaged over layers, which a model adds to its loss times its `aux_loss_weight`, the dropped assignments and
    each layer's expert loads. One definition for the model's own loss and the pipeline's (which rebuilds `stats`
    for the whole batch from its microbatches); {} without MoE layers."""
    if stats is None:
        return {}
    return {"moe_aux_loss": jnp.mean(stats.aux_loss), "dropped_tokens": jnp.sum(stats.dropped),
            "expert_load": stats.load}


def moe(x: Array, router: Array, experts: Any, expert_fn: Callable[[Any, Array], Array], *, top_k: int,
        capacity_factor: float) -> tuple[Array, MoEStats]:
    """Top-k routed mixture of experts with a capacity per (sequence, expert) and token dropping.

    x: [B, S, D]; router: [D, E]; experts: a pytree whose leaves have a leading expert axis E;
    expert_fn(experts, h) maps h: [E, B, C, D] to [E, B, C, D]. Routing groups are single sequences, so a
    token's fate never depends on how the batch is split across devices.
    """
    impl = MOE_IMPLS[current().moe]
    with jax.named_scope("autoshard.moe"):
        return impl(x, router, experts, expert_fn, top_k=top_k, capacity_factor=capacity_factor)


def capacity(seq: int, experts: int, top_k: int, capacity_factor: float) -> int:
    return max(1, math.ceil(capacity_factor * seq * top_k / experts))


def route(x: Array, router: Array, *, top_k: int, capacity_factor: float) -> tuple[Array, Array, MoEStats]:
    """Dispatch [B, S, E, C] (0/1) and combine [B, S, E, C] (gate weights) tensors, and routing statistics."""
    b, s, _ = x.shape
    e = router.shape[-1]
    c = capacity(s, e, top_k, capacity_factor)
    logits = jnp.einsum("bsd,de->bse", x.astype(jnp.float32), router.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    gate, idx = jax.lax.top_k(probs, top_k)                      # [B, S, k]
    gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
    choice = jax.nn.one_hot(idx, e, dtype=jnp.float32)           # [B, S, k, E]
    # priority: every token's first choice before any token's second choice
    by_rank = jnp.swapaxes(choice, 1, 2).reshape(b, top_k * s, e)
    position = (jnp.cumsum(by_rank, axis=1) - 1.0) * by_rank     # slot within the expert's buffer
    keep = by_rank * (position < c)
    slots = jax.nn.one_hot(position.astype(jnp.int32), c, dtype=jnp.float32) * keep[..., None]
    slots = jnp.swapaxes(slots.reshape(b, top_k, s, e, c), 1, 2)  # [B, S, k, E, C]
    dispatch = jnp.sum(slots, axis=2)
    combine = jnp.einsum("bsk,bskec->bsec", gate, slots)
    fraction = jnp.mean(choice, axis=(0, 1, 2))                   # share of assignments per expert
    prob_sum = jnp.sum(probs, axis=(0, 1))
    stats = MoEStats(aux_loss=e * jnp.sum(fraction * (prob_sum / (b * s))),
                     dropped=jnp.sum(choice) - jnp.sum(dispatch),
                     load=jnp.sum(choice, axis=(0, 1, 2)),
                     choices=idx if current().record_routing else None, prob_sum=prob_sum)
    return dispatch, combine, stats


def dense_moe(x: Array, router: Array, experts: Any, expert_fn: Callable, *, top_k: int,
              capacity_factor: float) -> tuple[Array, MoEStats]:
    dispatch, combine, stats = route(x, router, top_k=top_k, capacity_factor=capacity_factor)
    h = jnp.einsum("bsec,bsd->ebcd", dispatch.astype(x.dtype), x)
    y = expert_fn(experts, h)
    return jnp.einsum("bsec,ebcd->bsd", combine.astype(x.dtype), y), stats


MOE_IMPLS: dict[str, Callable[..., tuple[Array, MoEStats]]] = {"dense": dense_moe}


from autoshard import experts as _experts, sequence as _sequence  # noqa: E402  (register parallel implementations)

ATTENTION_IMPLS.update(ulysses=_sequence.ulysses_attention, ring=_sequence.ring_attention)
MOE_IMPLS.update(expert=_experts.expert_parallel_moe)
