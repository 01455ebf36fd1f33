"""Sequence parallelism for `ops.attention`: Ulysses (all-to-all) and zigzag ring attention (ppermute).

Both take the global view of `ops.dense_attention` (q: [B, S, H, D]; k, v: [B, S, Hkv, D], Hkv dividing H) and read
the mesh from `ops.current().mesh`; their degree n is the size of its `seq` axis. Each is a `jax.shard_map` that is
manual over `seq` only: the batch (data/fsdp) and heads (tensor) stay with XLA's partitioner, so they compose with
data and tensor parallelism outside. Activations arrive sequence-sharded contiguously (device i of `seq` holds
tokens [i*S/n, (i+1)*S/n)) and leave the same way. Inside another shard_map (the pipeline executor, manual over
`pipe`) the ops run on the context's abstract mesh, which is what nested shard_maps need.

XLA does not partition an all-to-all over the axes such a shard_map leaves automatic (it all-gathers the operand
over them), so with data/fsdp/tensor > 1 the Ulysses exchange is done with ppermutes instead (`all_to_all`).

`ulysses_bytes`, `ring_bytes` give the bytes each device sends per step (forward + backward) under the convention
of `autoshard.inspect`, for the planner's cost model (defined in `planner.seq_expert`, re-exported here).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from planner.errors import PlanError
from planner.seq_expert import ring_bytes, ulysses_bytes  # noqa: F401 (re-exported)

Array = jax.Array

_NEG = -1e30
"""Finite 'minus infinity' for masked logits: exp(_NEG - m) underflows to 0 without inf - inf = NaN."""


# -- mesh helpers (shared with autoshard.experts) ------------------------------------------------------------------
def shard_map_mesh(mesh: Any) -> Any:
    """The mesh to give a shard_map: the context's abstract mesh when one is active (inside another shard_map, e.g.
    the pipeline executor's, manual over `pipe`, a concrete mesh is rejected), else the concrete one."""
    am = jax.sharding.get_abstract_mesh()
    if not am.empty and tuple(am.axis_names) == tuple(mesh.axis_names):
        return am
    return mesh


def is_manual(axis: str) -> bool:
    """Whether an enclosing shard_map already made `axis` manual (the pipeline executor does so for `seq`: autodiff
    of a shard_map nested in a partially manual one fails to lower in jax 0.10, so the ops then run their
    per-device bodies directly)."""
    am = jax.sharding.get_abstract_mesh()
    return not am.empty and axis in am.manual_axes


def manual_over(axis: str, body: Any, in_specs: Any, out_specs: Any, mesh: Any, *args: Any) -> Any:
    """`body(*args)` on per-device blocks: in a shard_map manual over `axis`, or directly when `axis` is manual."""
    if is_manual(axis):
        return body(*args)
    return jax.shard_map(body, mesh=shard_map_mesh(mesh), axis_names={axis}, in_specs=in_specs,
                         out_specs=out_specs)(*args)


def axis_size(mesh: Any, axis: str) -> int:
    if mesh is None or axis not in mesh.axis_names:
        return 1
    return int(dict(zip(mesh.axis_names, mesh.axis_sizes))[axis])


def free_axes(mesh: Any, manual: str) -> list[str]:
    """Mesh axes of size > 1 that XLA still partitions inside a shard_map manual over `manual` (and over whatever
    an enclosing shard_map made manual)."""
    am = jax.sharding.get_abstract_mesh()
    outer = set(am.manual_axes) if not am.empty else set()
    return [a for a, n in zip(mesh.axis_names, mesh.axis_sizes) if n > 1 and a != manual and a not in outer]


def all_to_all(x: Array, axis: str, split_axis: int, concat_axis: int, *, native: bool) -> Array:
    """`jax.lax.all_to_all(..., tiled=True)` inside a shard_map manual over `axis`.

    XLA's partitioner (jax 0.10.2, Shardy) does not partition an all-to-all over the axes a partially manual
    shard_map leaves automatic: it all-gathers the operand over them first (the whole batch over data, all heads
    over tensor). With such axes present (`native=False`) the exchange is done as n-1 cyclic-shift ppermutes
    (send chunk me+r to device me+r, receive chunk me from device me-r), which XLA partitions like any
    elementwise op. The bytes each device sends are the same, (n-1)/n of the operand, as n-1 collective-permutes
    of 1/n of it instead of one all-to-all.
    """
    if native:
        return jax.lax.all_to_all(x, axis, split_axis, concat_axis, tiled=True)
    n = jax.lax.axis_size(axis)
    me = jax.lax.axis_index(axis)
    size = x.shape[split_axis] // n
    out_shape = list(x.shape)
    out_shape[split_axis] = size
    block = list(out_shape)
    out_shape[concat_axis] *= n
    out = jax.lax.pcast(jnp.zeros(out_shape, x.dtype), axis, to="varying")
    for r in range(n):
        dest = (me + r) % n
        chunk = jax.lax.dynamic_slice_in_dim(x, dest * size, size, axis=split_axis)
        if r:
            chunk = jax.lax.ppermute(chunk, axis, [(j, (j + r) % n) for j in range(n)])
        src = (me - r) % n
        out = jax.lax.dynamic_update_slice_in_dim(out, chunk, src * block[concat_axis], axis=concat_axis)
    return out


# -- Ulysses ---------------------------------------------------------------------------------------------------------
def ulysses_attention(q: Array, k: Array, v: Array, *, causal: bool = True) -> Array:
    """All-to-all sequence parallelism (DeepSpeed-Ulysses).

    Per device: all_to_all q, k, v from sequence-sharded [B, S/n, H, D] to head-sharded [B, S, H/n, D], dense
    attention over the whole sequence for the local heads, all_to_all the output back. Needs heads and kv_heads
    divisible by n. When heads are also split over `tensor` (t ways) and both head counts divide by t*n, heads are
    split as [t, n, H/(t n)] so that each tensor shard splits its own heads (no resharding between the two); when
    they do not, the result is still right but XLA all-gathers the heads over `tensor` around the exchange
    (measured: heads 4, kv_heads 2 on seq=2 x tensor=2), so plans should keep both divisible by tensor*seq.

    With other mesh axes > 1 left to XLA (data, fsdp, tensor, ...) the exchanges are `all_to_all`'s ppermute form
    (compiled as `seq/collective-permute`, same bytes); otherwise native all-to-alls (`seq/all-to-all`).
    """
    from autoshard import ops  # imported here: ops imports this module to register it

    mesh = ops.current().mesh
    n = axis_size(mesh, "seq")
    if n == 1:
        return ops.dense_attention(q, k, v, causal=causal)
    b, s, h, d = q.shape
    s = s * n if is_manual("seq") else s  # the global length
    hkv = k.shape[2]
    if h % n or hkv % n:
        raise PlanError(f"ulysses needs heads ({h}) and kv_heads ({hkv}) divisible by seq={n}: use ring, or a seq "
                        f"degree dividing both")
    if s % n:
        raise PlanError(f"ulysses needs the sequence length ({s}) divisible by seq={n}: change the seq degree")
    t = axis_size(mesh, "tensor")
    outer = t if t > 1 and h % (t * n) == 0 and hkv % (t * n) == 0 else 1
    native = not free_axes(mesh, "seq")

    def seq_to_heads(x: Array) -> Array:  # [B, S/n, Hx, D] -> [B, S, Hx/n, D]
        bl, sl, hx, dx = x.shape
        x = x.reshape(bl, sl, outer, n, hx // (outer * n), dx)
        x = all_to_all(x, "seq", split_axis=3, concat_axis=1, native=native)
        return x.reshape(bl, sl * n, hx // n, dx)

    def heads_to_seq(x: Array) -> Array:  # [B, S, H/n, D] -> [B, S/n, H, D]
        bl, sf, hl, dx = x.shape
        x = x.reshape(bl, sf, outer, 1, hl // outer, dx)
        x = all_to_all(x, "seq", split_axis=1, concat_axis=3, native=native)
        return x.reshape(bl, sf // n, hl * n, dx)

    def body(q: Array, k: Array, v: Array) -> Array:
        o = ops.dense_attention(seq_to_heads(q), seq_to_heads(k), seq_to_heads(v), causal=causal)
        return heads_to_seq(o)

    spec = P(None, "seq")
    return manual_over("seq", body, (spec, spec, spec), spec, mesh, q, k, v)




# -- ring attention --------------------------------------------------------------------------------------------------
def _block(q: Array, k: Array, v: Array, mask: Array | None) -> tuple[Array, Array, Array]:
    """Unnormalised attention of q [B, Tq, H, D] over k, v [B, Tk, Hkv, D] (grouped query, no KV repeat).

    Returns o [B, Tq, H, D] (float32, sum of p*v), m [B, Hkv, G, Tq] (row max, constant for autodiff: the merged
    result does not depend on it) and l [B, Hkv, G, Tq] (sum of p). Fully masked rows give m=_NEG, l=0, o=0.
    """
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, tq, hkv, h // hkv, d)
    s = jnp.einsum("bqkgd,btkd->bkgqt", qg, k).astype(jnp.float32) / math.sqrt(d)
    if mask is not None:
        s = jnp.where(mask, s, _NEG)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1))
    p = jnp.exp(s - m[..., None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("bkgqt,btkd->bqkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, tq, h, d), m, l


def _merge(acc: tuple[Array, Array, Array], new: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
    """Online-softmax merge of two partial results over disjoint key sets."""
    o1, m1, l1 = acc
    o2, m2, l2 = new
    m = jnp.maximum(m1, m2)
    a1, a2 = jnp.exp(m1 - m), jnp.exp(m2 - m)
    b, tq, h, d = o1.shape

    def scale(o: Array, a: Array) -> Array:  # a: [B, Hkv, G, Tq] -> broadcast over o [B, Tq, H, D]
        return o * jnp.moveaxis(a.reshape(b, h, tq), 1, 2)[..., None]

    return scale(o1, a1) + scale(o2, a2), m, l1 * a1 + l2 * a2


def _finish(o: Array, l: Array, dtype: Any) -> Array:
    b, tq, h, _ = o.shape
    l = jnp.moveaxis(l.reshape(b, h, tq), 1, 2)[..., None]
    return (o / jnp.where(l == 0.0, 1.0, l)).astype(dtype)


def _zigzag_perms(n: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """ppermute pairs moving the even / odd one of each device's two contiguous chunks to its zigzag home.

    The sequence is cut into 2n chunks; contiguously device d holds chunks 2d, 2d+1, in zigzag order device i holds
    chunks i and 2n-1-i (one of them even, the other odd). Chunk c's zigzag home is device c if c < n else 2n-1-c.
    """
    home = [c if c < n else 2 * n - 1 - c for c in range(2 * n)]
    return [(d, home[2 * d]) for d in range(n)], [(d, home[2 * d + 1]) for d in range(n)]


def _ppermute(x: Array, perm: list[tuple[int, int]]) -> Array:
    """ppermute over `seq`, skipped when every device keeps its own block (the even chunks when n = 2)."""
    return x if all(i == j for i, j in perm) else jax.lax.ppermute(x, "seq", perm)


def _to_zigzag(x: Array, n: int, me: Array) -> Array:
    """Local contiguous [B, 2c, ...] (chunks 2d, 2d+1) -> local zigzag [B, 2c, ...] (chunks i, 2n-1-i)."""
    even_perm, odd_perm = _zigzag_perms(n)
    c = x.shape[1] // 2
    even = _ppermute(x[:, :c], even_perm)
    odd = _ppermute(x[:, c:], odd_perm)
    first_even = me % 2 == 0  # device i's first zigzag chunk is chunk i: even iff i is
    return jnp.concatenate([jnp.where(first_even, even, odd), jnp.where(first_even, odd, even)], axis=1)


def _from_zigzag(x: Array, n: int, me: Array) -> Array:
    """Inverse of `_to_zigzag`."""
    even_perm, odd_perm = _zigzag_perms(n)
    c = x.shape[1] // 2
    first_even = me % 2 == 0
    even = jnp.where(first_even, x[:, :c], x[:, c:])
    odd = jnp.where(first_even, x[:, c:], x[:, :c])
    even = _ppermute(even, [(j, i) for i, j in even_perm])
    odd = _ppermute(odd, [(j, i) for i, j in odd_perm])
    return jnp.concatenate([even, odd], axis=1)


def ring_attention(q: Array, k: Array, v: Array, *, causal: bool = True) -> Array:
    """Ring attention: K/V blocks travel around the `seq` axis (ppermute), online softmax in float32.

    Causal attention is load balanced with the zigzag layout: the sequence is cut into 2n chunks and device i works
    on chunks i and 2n-1-i. The op converts the contiguous layout to zigzag on entry (two ppermutes of half a local
    block per tensor, q, k, v) and back on exit (the output), inside the shard_map: one local block per tensor
    crosses the links, the least any relayout can do (a global-view gather would go through all-gather/all-to-all).
    Then, after the diagonal step (local K/V, causal mask within the two chunk pairs), each of the n-1 ring steps
    does exactly half of a full block product on every device: when the visiting K/V comes from device src < i,
    both query chunks attend its first chunk; when src > i, the second query chunk attends both its chunks; the
    other pairs are entirely masked and skipped (`lax.cond` on a device-varying predicate).

    Non-causal attention needs no balancing and rotates K/V over the contiguous layout. Grouped-query K/V rotate
    with their Hkv heads (no repeat). Gradients come from autodiff through the scan, cond and ppermutes (the
    backward pass sends the dK/dV cotangents around the ring in reverse; the forward K/V of every step are kept as
    residuals, so memory holds the whole sequence's K/V per device — remat bounds that).
    """
    from autoshard import ops  # imported here: ops imports this module to register it

    mesh = ops.current().mesh
    n = axis_size(mesh, "seq")
    if n == 1:
        return ops.dense_attention(q, k, v, causal=causal)
    s = q.shape[1] * (n if is_manual("seq") else 1)  # the global length
    parts = 2 * n if causal else n
    if s % parts:
        raise PlanError(f"{'causal ' if causal else ''}ring attention needs the sequence length ({s}) divisible by "
                        f"{parts} (= {'2 x ' if causal else ''}seq={n}): change the seq degree or the sequence length")
    ring = [(j, (j + 1) % n) for j in range(n)]

    def rotate(kv: tuple[Array, Array]) -> tuple[Array, Array]:
        return jax.lax.ppermute(kv, "seq", ring)

    def body(q: Array, k: Array, v: Array) -> Array:
        me = jax.lax.axis_index("seq")
        if causal:
            q, k, v = (_to_zigzag(x, n, me) for x in (q, k, v))
            c = q.shape[1] // 2
            tril = jnp.tril(jnp.ones((c, c), bool))
            # local K/V: q chunk i sees k chunk i causally, not chunk 2n-1-i; q chunk 2n-1-i sees all of chunk i
            diag = jnp.block([[tril, jnp.zeros((c, c), bool)], [jnp.ones((c, c), bool), tril]])
            acc = _block(q, k, v, diag)

            def visit(q: Array, k: Array, v: Array, src: Array) -> tuple[Array, Array, Array]:
                def earlier(q, k, v):  # src < i: both query chunks see K/V chunk src only
                    return _block(q, k[:, :c], v[:, :c], None)

                def later(q, k, v):  # src > i: query chunk 2n-1-i sees both K/V chunks; chunk i sees none
                    o, m, l = _block(q[:, c:], k, v, None)
                    pad = [(0, 0)] * 3 + [(c, 0)]
                    return (jnp.pad(o, [(0, 0), (c, 0), (0, 0), (0, 0)]), jnp.pad(m, pad, constant_values=_NEG),
                            jnp.pad(l, pad))

                return jax.lax.cond(src < me, earlier, later, q, k, v)
        else:
            acc = _block(q, k, v, None)

            def visit(q, k, v, src):
                return _block(q, k, v, None)

        def step(carry, t):
            acc, kv = carry
            kv = rotate(kv)
            src = (me - t) % n  # the device whose K/V we now hold
            return (_merge(acc, visit(q, *kv, src)), kv), None

        (acc, _), _ = jax.lax.scan(step, (acc, (k, v)), jnp.arange(1, n))
        o = _finish(acc[0], acc[2], q.dtype)
        return _from_zigzag(o, n, me) if causal else o

    spec = P(None, "seq")
    return manual_over("seq", body, (spec, spec, spec), spec, mesh, q, k, v)




__all__ = ["all_to_all", "axis_size", "free_axes", "ring_attention", "ring_bytes", "shard_map_mesh",
           "ulysses_attention", "ulysses_bytes"]
