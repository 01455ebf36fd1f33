"""Expert parallelism for `ops.moe`: experts split over the `expert` mesh axis, tokens exchanged with all-to-all.

`expert_parallel_moe` has the contract of `ops.dense_moe`. Expert weights (leaves of `experts`, leading axis E) are
split over the `expert` axis, and so is the batch: expert parallelism doubles as data parallelism for everything
outside the experts. It is a `jax.shard_map` manual over `expert` only, so `data`/`fsdp` (more batch splitting) and
`tensor` (e.g. the experts' hidden dimension F) stay with XLA's partitioner.

Per device: route the local sequences (`ops.route`; routing groups are single sequences, so this is exactly the
global routing of those tokens), group tokens by expert [E, Bl, C, D], exchange them so that each device holds the
tokens of all devices for its E/n experts [E/n, n*Bl, C, D], run `expert_fn`, exchange back, combine.
`MoEStats` are made global with psums over `expert` (the auto-split batch axes are global already).

Layout: the batch must be split with `expert` as the MAJOR batch axis, P(("expert", "data", "fsdp")): a shard_map
manual over `expert` takes contiguous blocks of the batch per expert device. With P(("data", "expert")) XLA
reshuffles x on entry and the exchange loses the data split (measured on data=2 x expert=2: twice the exchange bytes
plus collective-permutes and all-gathers at the boundary).

`moe_all_to_all_bytes` gives the bytes one device sends per step for the planner's cost model (defined in
`planner.seq_expert`, re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from autoshard.sequence import all_to_all, axis_size, free_axes, is_manual, manual_over
from planner.errors import PlanError
from planner.seq_expert import moe_all_to_all_bytes  # noqa: F401 (re-exported)

Array = jax.Array


def expert_parallel_moe(x: Array, router: Array, experts: Any, expert_fn: Callable[[Any, Array], Array], *,
                        top_k: int, capacity_factor: float) -> tuple[Array, Any]:
    """Top-k routed MoE with experts split over `expert` (see module doc). x: [B, S, D]; router: [D, E].

    Returns (y [B, S, D], ops.MoEStats) with the statistics of the whole global batch.
    """
    from autoshard import ops  # imported here: ops imports this module to register it

    mesh = ops.current().mesh
    n = axis_size(mesh, "expert")
    if n == 1:
        return ops.dense_moe(x, router, experts, expert_fn, top_k=top_k, capacity_factor=capacity_factor)
    b, s, _ = x.shape
    b = b * n if is_manual("expert") else b  # the global batch
    e = router.shape[-1]
    if e % n:
        raise PlanError(f"expert parallelism needs the number of experts ({e}) divisible by expert={n}: use an expert "
                        f"degree dividing {e}")
    if b % n:
        raise PlanError(f"expert parallelism splits the batch over the expert axis: batch {b} is not divisible by "
                        f"expert={n}: change the batch size or the expert degree")
    local_e = e // n if is_manual("expert") else e  # inside the pipeline executor the weights arrive split
    for leaf in jax.tree.leaves(experts):
        if leaf.shape[0] != local_e:
            raise PlanError(f"expert weights must have a leading expert axis of size {e} (split {n} ways when "
                            f"expert is manual), got shape {leaf.shape}")
    native = not free_axes(mesh, "expert")
    el = e // n

    def body(x: Array, router: Array, experts: Any) -> tuple[Array, Any]:
        bl = x.shape[0]
        dispatch, combine, local = ops.route(x, router, top_k=top_k, capacity_factor=capacity_factor)
        c = dispatch.shape[-1]
        # expert = dest * E/n + local. The exchange runs over a dedicated size-n axis placed after the batch axis:
        # [E/n, Bl, n, C, D], so that merging it into the batch, [E/n, Bl*n, C, D], keeps an auto data/fsdp split
        # of Bl (major) intact, and the exchange never slices a dimension XLA has split.
        h = jnp.einsum("bsec,bsd->ebcd", dispatch.astype(x.dtype), x)            # [E, Bl, C, D]
        h = jnp.moveaxis(h.reshape(n, el, bl, c, -1), 0, 2)                        # [E/n, Bl, n(dest), C, D]
        h = all_to_all(h, "expert", split_axis=2, concat_axis=2, native=native)   # [E/n, Bl, n(source), C, D]
        y = expert_fn(experts, h.reshape(el, bl * n, c, -1))                       # local experts, all devices' tokens
        y = all_to_all(y.reshape(el, bl, n, c, -1), "expert", split_axis=2, concat_axis=2, native=native)
        y = jnp.moveaxis(y, 2, 0).reshape(e, bl, c, -1)                            # [E, Bl, C, D] back home
        out = jnp.einsum("bsec,ebcd->bsd", combine.astype(x.dtype), y)
        # global statistics: aux = E * sum_e fraction_e * mean_prob_e, both means over the whole batch
        load = jax.lax.psum(local.load, "expert")
        prob_sum = jax.lax.psum(local.prob_sum, "expert")
        stats = ops.MoEStats(aux_loss=e * jnp.sum(load / (b * s * top_k) * (prob_sum / (b * s))),
                             dropped=jax.lax.psum(local.dropped, "expert"), load=load, prob_sum=prob_sum)
        return out, stats

    stats_spec = ops.MoEStats(aux_loss=P(), dropped=P(), load=P(), prob_sum=P())
    experts_spec = jax.tree.map(lambda _: P("expert"), experts)
    return manual_over("expert", body, (P("expert"), P(), experts_spec), (P("expert"), stats_spec), mesh,
                       x, router, experts)




__all__ = ["expert_parallel_moe", "moe_all_to_all_bytes"]
