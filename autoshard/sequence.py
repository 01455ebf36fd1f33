"""Sequence parallelism for `ops.attention`: Ulysses (all-to-all) and zigzag ring attention (ppermute).

Both take the global view of `ops.dense_attention` (q: [B, S, H, D]; k, v: [B, T, Hkv, D], Hkv dividing H, T = S but
for cross-attention) and read the mesh from `ops.current().mesh`; their degree n is the size of its `seq` axis. Each
is a `jax.shard_map` that is manual over `seq` only: the batch (data/fsdp) and heads (tensor) stay with XLA's
partitioner, so they compose with data and tensor parallelism outside. Activations arrive sequence-sharded
contiguously (device i of `seq` holds tokens [i*S/n, (i+1)*S/n)) and leave the same way. Inside another shard_map
the ops run on the context's abstract mesh, which is what nested shard_maps need; when that shard_map is already
manual over `seq` (the pipeline executor: jax 0.10 cannot differentiate a shard_map nested in a partially manual
one) they run their per-device bodies directly on the local blocks (`is_manual`, `manual_over`). Their ppermutes go
through `ppermute`, which on XLA:CPU inside the pipeline executor builds the exchange from an all-to-all
(`ppermute_deadlocks` says why).

XLA does not partition an all-to-all over the axes such a shard_map leaves automatic (it all-gathers the operand
over them), so with data/fsdp/tensor > 1 the Ulysses exchange is done with ppermutes instead (`all_to_all`).

`ulysses_bytes`, `ring_bytes` give the bytes each device sends per step (forward + backward) under the convention
of `autoshard.analysis`, for the planner's cost model (defined in `planner.seq_expert`, re-exported here).
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from planner.errors import PlanError
from planner.plan import BATCH_AXES
from planner.seq_expert import RING_CHUNK, ring_bytes, splits_heads, ulysses_bytes  # noqa: F401 (re-exported)

Array = jax.Array

_NEG = -1e30
"""Finite 'minus infinity' for masked logits: exp(_NEG - m) underflows to 0 without inf - inf = NaN."""


# -- causal and sliding-window masks ---------------------------------------------------------------------------------
def causal_mask(rows: Array, cols: Array, window: int | None = None) -> Array:
    """Which keys each query may attend, [Tq, Tk] bool, from their global positions rows [Tq] and cols [Tk]: the
    keys at or before the query (causal) and, with a `window` w, only the last w of them (i - w < j <= i: a
    sliding window, the query's own key included). The one definition dense, ring and Ulysses attention share."""
    keep = rows[:, None] >= cols[None, :]
    if window is not None:
        keep = keep & (rows[:, None] - cols[None, :] < window)
    return keep


def check_window(window: Any, causal: bool) -> None:
    """One-line errors for a window the attention ops cannot take (they would fail deep inside jax, or ignore it)."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"window must be a positive integer (the keys each query sees, its own included), "
                         f"got {window!r}")
    if not causal:
        raise ValueError(f"window={window} needs causal=True: a sliding window looks back from each query")


def check_attention(q: Array, k: Array, *, causal: bool, window: Any, softcap: Any) -> None:
    """One-line errors for arguments the attention ops cannot take: a bad window (`check_window`), a causal mask
    between queries and keys of different lengths (cross-attention is not causal), a soft cap that is not a
    positive number."""
    check_window(window, causal)
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention needs keys as long as the queries ({q.shape[1]}), got {k.shape[1]}: "
                         f"cross-attention (keys of another sequence) takes causal=False")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real)
                                or not softcap > 0):
        raise ValueError(f"softcap must be a positive number (logits become softcap * tanh(logits / softcap)), "
                         f"got {softcap!r}")


class Causal(NamedTuple):
    """Causal masking of one block of attention by global token positions: the query rows at `rows` [Tq] see the
    keys at `cols` [Tk] that `causal_mask` keeps. Positions increase along a block (the zigzag layout keeps them in
    order: chunk i before chunk 2n-1-i), which `_all_masked` relies on."""

    rows: Array
    cols: Array
    window: int | None = None


def _at(causal: Causal | None, rows: Array, cols: Array) -> Causal | None:
    """The same masking for a sub-block at positions rows, cols (None stays None: nothing masked)."""
    return None if causal is None else Causal(rows, cols, causal.window)


def _window(rows: Array, cols: Array, window: int | None) -> Causal | None:
    """The masking of a block whose keys all precede its queries (the ring's visiting K/V): none, or the window."""
    return None if window is None else Causal(rows, cols, window)


def _all_masked(causal: Causal) -> Array:
    """Whether the mask leaves nothing of the block (a bool scalar): every key after every query, or every key at
    least `window` before every query. Exact for contiguous positions; a sufficient test otherwise."""
    out = causal.cols[0] > causal.rows[-1]
    if causal.window is not None:
        out = out | (causal.rows[0] - causal.cols[-1] >= causal.window)
    return out


def _causal_keep(x: Array, causal: Causal | None) -> Array | None:
    """The float32 keep factor [Tq, Tk] (1 attend, 0 masked) of `causal_mask` over a block's positions; None for
    None.

    The row positions are tied to the data `x` by an optimization barrier (no computation, no communication), and
    the mask is applied by arithmetic rather than `jnp.where` with a constant: under a scan over layers, jax's scan
    partial evaluation hoists data-independent values out of the loop, and masks built inside the chunk loops were
    hoisted stacked, [chunks, chunks, B, H, chunk, chunk] per layer (measured).
    """
    if causal is None:
        return None
    rows, _ = jax.lax.optimization_barrier((causal.rows, x))
    return causal_mask(rows, causal.cols, causal.window).astype(jnp.float32)


def _unless_masked(causal: Causal | None, compute: Any, skipped: Any) -> Any:
    """compute(), or skipped() where a window masks the whole block (`lax.cond` on a device-varying predicate: the
    ring's visiting K/V beyond every local query's window). Without a window the blocks given here are never all
    masked (the diagonal, or keys all before the queries), so no cond is built."""
    if causal is None or causal.window is None:
        return compute()
    return jax.lax.cond(_all_masked(causal), skipped, compute)


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


def ppermute_deadlocks() -> bool:
    """Whether a `ppermute` over an op's manual axis would deadlock here: on XLA:CPU inside the pipeline executor.

    The executor runs each tick's work under a `lax.switch` whose branch depends on the device's pipeline stage, so
    devices of different stages run different collectives at the same time. XLA:CPU's collective-permute has no
    replica groups: its rendezvous waits for every device of the program, and the devices in another branch never
    arrive (a 20 s rendezvous warning, then a hang; measured with jax 0.10.2 on pipe=2 x seq=2). all-to-all and
    all-gather rendezvous per replica group (the devices of one `seq` group are on the same stage and take the
    same branch), so there the exchanges are built from all-to-alls instead (`ppermute`, `all_to_all`). GPU and
    TPU keep the native op, as does everything outside the executor (the only caller that makes `pipe` manual).
    Unverified on GPU: XLA:GPU also acquires a collective-permute's communicator over all the devices of its
    pairs (openxla/xla#44530 shows that rendezvous), so if pipelines with seq > 1 hang there, return True there too.
    """
    return jax.default_backend() == "cpu" and is_manual("pipe")


def ppermute(x: Any, axis: str, perm: list[tuple[int, int]]) -> Any:
    """`jax.lax.ppermute(x, axis, perm)` (x a pytree; pairs are (source, destination), devices receiving nothing
    get zeros), or, where that would deadlock (`ppermute_deadlocks`), the same exchange as one all-to-all per leaf:
    each device puts its block in the slot of its destination of an [n, ...] buffer of zeros, the all-to-all
    delivers slot d to device d, and each device keeps the slot of its source. Each device sends n-1 blocks (all
    but one of them zeros) where a ppermute sends one, the same bytes for n = 2: the price of not deadlocking on
    XLA:CPU, paid nowhere else (it shows as `seq/all-to-all` in the compiled step)."""
    if not ppermute_deadlocks():
        return jax.lax.ppermute(x, axis, perm)
    n = jax.lax.axis_size(axis)
    me = jax.lax.axis_index(axis)
    dest, src = [-1] * n, [-1] * n
    for i, j in perm:
        dest[i], src[j] = j, i
    to, frm = jnp.asarray(dest)[me], jnp.asarray(src)[me]

    def one(leaf: Array) -> Array:
        buf = jnp.zeros((n,) + leaf.shape, leaf.dtype)
        buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(to >= 0, leaf, jnp.zeros_like(leaf)),
                                                  jnp.maximum(to, 0), 0)
        got = jax.lax.all_to_all(buf, axis, 0, 0, tiled=False)  # got[s] = device s's slot for us
        mine = jax.lax.dynamic_index_in_dim(got, jnp.maximum(frm, 0), 0, keepdims=False)
        return jnp.where(frm >= 0, mine, jnp.zeros_like(mine))

    return jax.tree.map(one, x)


def all_to_all(x: Array, axis: str, split_axis: int, concat_axis: int, *, native: bool) -> Array:
    """`jax.lax.all_to_all(..., tiled=True)` inside a shard_map manual over `axis`.

    XLA's partitioner (jax 0.10.2, Shardy) does not partition an all-to-all over the axes a partially manual
    shard_map leaves automatic: it all-gathers the operand over them first (the whole batch over data, all heads
    over tensor). With such axes present (`native=False`) the exchange is done as n-1 cyclic-shift ppermutes
    (send chunk me+r to device me+r, receive chunk me from device me-r), which XLA partitions like any
    elementwise op. The bytes each device sends are the same, (n-1)/n of the operand, as n-1 collective-permutes
    of 1/n of it instead of one all-to-all.
    """
    if native or ppermute_deadlocks():  # the latter: XLA gathers over the automatic axes, but does not deadlock
        return jax.lax.all_to_all(x, axis, split_axis, concat_axis, tiled=True)
    return _cyclic_all_to_all(x, axis, split_axis, concat_axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _cyclic_all_to_all(x: Array, axis: str, split_axis: int, concat_axis: int) -> Array:
    """`all_to_all` as n-1 cyclic-shift ppermutes. Its transpose is the same exchange with the two axes swapped
    (a permutation of blocks), which the custom backward runs: autodiff's transpose of the chunks' dynamic slices
    would write each into a zero buffer of the whole operand, n buffers per exchange, that XLA allocates early
    (the zoo's Linen LM under Ulysses at data=2,seq=2,tensor=2: 58 KiB of them at the step's peak)."""
    return _cyclic_shifts(x, axis, split_axis, concat_axis)


def _cyclic_all_to_all_fwd(x: Array, axis: str, split_axis: int, concat_axis: int) -> tuple[Array, None]:
    return _cyclic_shifts(x, axis, split_axis, concat_axis), None


def _cyclic_all_to_all_bwd(axis: str, split_axis: int, concat_axis: int, _: None, g: Array) -> tuple[Array]:
    return (_cyclic_shifts(g, axis, concat_axis, split_axis),)


_cyclic_all_to_all.defvjp(_cyclic_all_to_all_fwd, _cyclic_all_to_all_bwd)


def _cyclic_shifts(x: Array, axis: str, split_axis: int, concat_axis: int) -> Array:
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
def ulysses_attention(q: Array, k: Array, v: Array, *, causal: bool = True, key_mask: Array | None = None,
                      window: int | None = None, softcap: float | None = None) -> Array:
    """All-to-all sequence parallelism (DeepSpeed-Ulysses).

    Per device: all_to_all q, k, v from sequence-sharded [B, S/n, H, D] to head-sharded [B, S, H/n, D], attention
    over the whole sequence for the local heads, all_to_all the output back. The local attention is chunked with a
    recomputing backward (`_local_flash`): it keeps no [B, H/n, S, S] probabilities. Needs heads and kv_heads
    divisible by n. When heads are also split over `tensor` (t ways) and both head counts divide by t*n, heads are
    split as [t, n, H/(t n)] so that each tensor shard splits its own heads (no resharding between the two); when
    they do not, the result is still right but XLA all-gathers the heads over `tensor` around the exchange
    (measured: heads 4, kv_heads 2 on seq=2 x tensor=2), so plans should keep both divisible by tensor*seq.

    With other mesh axes > 1 left to XLA (data, fsdp, tensor, ...) the exchanges are `all_to_all`'s ppermute form
    (compiled as `seq/collective-permute`, same bytes); otherwise native all-to-alls (`seq/all-to-all`).

    A key mask [B, S] (`ops.attention`) is all-gathered over `seq` (B*S bools): each device attends over the whole
    sequence (and fills rows with no key to attend with its heads' mean values, `_fill_empty_rows`).

    A causal `window` (`ops.attention`) needs nothing more: after the exchange each device has the whole sequence
    of its heads and masks it there (`causal_mask`); the exchanges are those of plain causal attention. Neither
    does a `softcap`: it caps each block of logits before its mask and softmax (`_capped`).

    Cross-attention (k, v [B, T, Hkv, D] of another length than q) exchanges K/V over T as it does q over S; when
    seq does not divide T its K/V stay whole and each device attends its own queries over them (`_whole_kv`), when
    it does not divide S the attention runs dense (`_unsplit_cross`).
    """
    from autoshard import ops  # imported here: ops imports this module to register it

    check_attention(q, k, causal=causal, window=window, softcap=softcap)
    mesh = ops.current().mesh
    n = axis_size(mesh, "seq")
    if n == 1:
        return ops.dense_attention(q, k, v, causal=causal, key_mask=key_mask, window=window, softcap=softcap)
    cross = _unsplit_cross(mesh, n, q, k, v, key_mask, softcap)
    if cross is not None:
        return cross
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

    def body(q: Array, k: Array, v: Array, keys: Array | None = None) -> Array:
        whole = _gather_keys(keys)
        q, k, v = seq_to_heads(q), seq_to_heads(k), seq_to_heads(v)
        o = _local_flash(causal, window, softcap)(q, k, v, whole)
        if whole is not None:  # the whole sequence is here: the values' mean needs no exchange
            o = _fill_empty_rows(o, jnp.mean(v.astype(jnp.float32), axis=1), whole, causal, 0, window)
        return heads_to_seq(o)

    return _run_seq(body, mesh, q, k, v, key_mask)



# -- ring attention --------------------------------------------------------------------------------------------------
def _scores(q: Array, k: Array) -> Array:
    """Scaled logits [B, Hkv, G, Tq, Tk] (float32) of q [B, Tq, H, D] against k [B, Tk, Hkv, D] (grouped query)."""
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, tq, hkv, h // hkv, d)
    return jnp.einsum("bqkgd,btkd->bkgqt", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)


def _capped(s: Array, softcap: float | None) -> Array:
    """Soft-capped logits softcap * tanh(s / softcap) (gemma-2), or s itself without a cap. Elementwise on the
    scores, so capping each block before its mask and softmax is exactly capping the whole [S, T] logits."""
    return s if softcap is None else softcap * jnp.tanh(s / softcap)


def _block(q: Array, k: Array, v: Array, keep: Array | None,
           softcap: float | None = None) -> tuple[Array, Array, Array]:
    """Unnormalised attention of q [B, Tq, H, D] over k, v [B, Tk, Hkv, D] (grouped query, no KV repeat), its
    logits soft-capped (`_capped`) before the mask.

    keep: None or a float32 of 1 (attend) and 0 (masked) broadcasting to [B, Hkv, G, Tq, Tk] (`_keep`: [Tq, Tk]
    causal, [B, 1, 1, 1, Tk] keys, or their product). Returns o [B, Tq, H, D] (float32, sum of p*v),
    m [B, Hkv, G, Tq] (row max) and l [B, Hkv, G, Tq] (sum of p). Fully masked rows give m=_NEG, l=0, o=0. Only
    the forward of the ring's custom_vjp runs it (never autodiff).
    """
    b, tq, h, d = q.shape
    s = _capped(_scores(q, k), softcap)
    if keep is not None:  # arithmetic, not jnp.where: see `_causal_keep`
        s = s * keep + (1.0 - keep) * _NEG
    m = jnp.max(s, axis=-1)
    p = jnp.exp(s - m[..., None])
    if keep is not None:
        p = p * keep
    l = jnp.sum(p, axis=-1)
    o = jnp.einsum("bkgqt,btkd->bqkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, tq, h, d), m, l


def _keep(causal: Array | None, keys: Array | None) -> Array | None:
    """The float32 keep factor of one block: its causal [Tq, Tk] (or None) times its key mask [B, Tk] (or None)
    laid out over the scores [B, Hkv, G, Tq, Tk]."""
    if keys is None:
        return causal
    keys = keys.astype(jnp.float32)[:, None, None, None, :]
    return keys if causal is None else keys * causal


def _block_grads(q: Array, k: Array, v: Array, do: Array, lse: Array, delta: Array, keep: Array | None,
                 softcap: float | None = None) -> tuple[Array, Array, Array]:
    """Flash-attention backward of one (query block, key block) pair, recomputing the probabilities from lse (and
    with a `softcap`, the logits' gradient through the cap: d cap*tanh(s/cap) / ds = 1 - tanh(s/cap)^2).

    q, do [B, Tq, H, D]; k, v [B, Tk, Hkv, D]; lse, delta [B, Hkv, G, Tq] (float32: log-sum-exp of the query rows
    over all keys, and rowsum(do * o)). Returns the float32 contributions dq [B, Tq, H, D], dk, dv [B, Tk, Hkv, D].
    """
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    logits = _capped(_scores(q, k), softcap)
    p = jnp.exp(logits - lse[..., None])
    if keep is not None:
        p = p * keep
    dog = do.reshape(b, tq, hkv, h // hkv, d)
    qg = q.reshape(b, tq, hkv, h // hkv, d)
    dv = jnp.einsum("bkgqt,bqkgd->btkd", p.astype(do.dtype), dog, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bqkgd,btkd->bkgqt", dog, v, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None])
    if softcap is not None:
        ds = ds * (1.0 - jnp.square(logits / softcap))
    ds = (ds / math.sqrt(d)).astype(q.dtype)
    dq = jnp.einsum("bkgqt,btkd->bqkgd", ds, k, preferred_element_type=jnp.float32).reshape(b, tq, h, d)
    dk = jnp.einsum("bkgqt,bqkgd->btkd", ds, qg, preferred_element_type=jnp.float32)
    return dq, dk, dv


def _chunk(t: int) -> int:
    """The largest divisor of t that is at most `RING_CHUNK` (t itself when t fits): one step's transient
    probabilities are [B, H, chunk, chunk] float32 per chunk pair instead of [B, H, S/n, S/n] (tests lower
    `RING_CHUNK` here to exercise the chunk loops)."""
    return next(c for c in range(min(t, RING_CHUNK), 0, -1) if t % c == 0)


def _chunks(x: Array, c: int) -> Array:
    """[B, T, ...] -> [T/c, B, c, ...]: chunks along the sequence, leading (for scan)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // c, c, *x.shape[2:]), 1, 0)


def _unchunk(x: Array) -> Array:
    """Inverse of `_chunks`."""
    n, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * c, *x.shape[3:])


def _row_chunks(x: Array, c: int) -> Array:
    """Row statistics [B, Hkv, G, T] -> [T/c, B, Hkv, G, c]."""
    return jnp.moveaxis(x.reshape(*x.shape[:3], x.shape[3] // c, c), 3, 0)


def _row_unchunk(x: Array) -> Array:
    """Inverse of `_row_chunks`."""
    return jnp.moveaxis(x, 0, 3).reshape(*x.shape[1:4], x.shape[0] * x.shape[4])


def _flash_forward(q: Array, k: Array, v: Array, causal: Causal | None, keys: Array | None = None,
                   softcap: float | None = None) -> tuple[Array, Array, Array]:
    """`_block` over chunks (online softmax across key chunks), so the transient is one chunk pair's probabilities;
    with `causal` (the global positions of q's and k's rows) chunk pairs it masks entirely are skipped (above the
    diagonal, or beyond a window). keys: None or the key mask [B, Tk] (bool) of k's rows; softcap: `_capped`."""
    tq, tk = q.shape[1], k.shape[1]
    cq, ck = _chunk(tq), _chunk(tk)
    if cq == tq and ck == tk:
        return _unless_masked(causal, lambda: _block(q, k, v, _keep(_causal_keep(q, causal), keys), softcap),
                              lambda: _nothing(q, k))
    rows, cols = _position_chunks(causal, cq, ck)

    def row(args: tuple[Array, Array | None]) -> tuple[Array, Array, Array]:
        qc, qpos = args

        def block(kc: Array, vc: Array, kpos: Array | None, mc: Array | None) -> tuple[Array, Array, Array]:
            return _block(qc, kc, vc, _keep(_causal_keep(qc, _at(causal, qpos, kpos)), mc), softcap)

        # start from key chunk 0 (never skipped) rather than zeros: constants would be hoisted (`_causal_keep`)
        init = block(k[:, :ck], v[:, :ck], None if cols is None else cols[0], None if keys is None else keys[:, :ck])

        def step(acc, x):
            kc, vc, kpos, mc = x
            if causal is None:
                return _merge(acc, block(kc, vc, kpos, mc)), None
            return jax.lax.cond(_all_masked(_at(causal, qpos, kpos)), lambda a: a,
                                lambda a: _merge(a, block(kc, vc, kpos, mc)), acc), None

        xs = (_chunks(k, ck)[1:], _chunks(v, ck)[1:], None if cols is None else cols[1:],
              None if keys is None else _chunks(keys, ck)[1:])
        return jax.lax.scan(step, init, xs)[0]

    o, m, l = jax.lax.map(row, (_chunks(q, cq), rows))
    return _unchunk(o), _row_unchunk(m), _row_unchunk(l)


def _nothing(q: Array, k: Array) -> tuple[Array, Array, Array]:
    """`_block`'s result for a block with every key masked: o = 0, m = _NEG, l = 0 [B, Hkv, G, Tq]."""
    b, tq, h, _ = q.shape
    hkv = k.shape[2]
    # zeros_like of q's values, not jnp.zeros: they vary over `seq` as q does (lax.cond wants both branches alike)
    stats = jnp.zeros_like(jnp.moveaxis(q[..., 0], 1, 2).reshape(b, hkv, h // hkv, tq), jnp.float32)
    return jnp.zeros_like(q, jnp.float32), stats + _NEG, stats


def _position_chunks(causal: Causal | None, cq: int, ck: int) -> tuple[Array | None, Array | None]:
    """The query and key positions in chunks of cq and ck, [Tq/cq, cq] and [Tk/ck, ck] (None, None without mask)."""
    if causal is None:
        return None, None
    return causal.rows.reshape(-1, cq), causal.cols.reshape(-1, ck)


def _flash_grads(q: Array, k: Array, v: Array, do: Array, lse: Array, delta: Array, causal: Causal | None,
                 keys: Array | None = None, softcap: float | None = None) -> tuple[Array, Array, Array]:
    """`_block_grads` over chunks: per key chunk, a loop over query chunks accumulates its dK/dV and emits dq
    contributions; chunk pairs `causal` masks entirely are skipped. keys, softcap: as in `_flash_forward`."""
    tq, tk = q.shape[1], k.shape[1]
    cq, ck = _chunk(tq), _chunk(tk)
    if cq == tq and ck == tk:
        return _unless_masked(
            causal, lambda: _block_grads(q, k, v, do, lse, delta, _keep(_causal_keep(q, causal), keys), softcap),
            lambda: tuple(jnp.zeros_like(x, jnp.float32) for x in (q, k, v)))
    qpos, kpos = _position_chunks(causal, cq, ck)
    rows = (_chunks(q, cq), _chunks(do, cq), _row_chunks(lse, cq), _row_chunks(delta, cq), qpos)

    def col(dq, x):
        kc, vc, kp, mc = x

        def row(acc, y):
            qc, doc, lc, dc, qp = y
            mask = _at(causal, qp, kp)

            def compute(acc):
                gq, gk, gv = _block_grads(qc, kc, vc, doc, lc, dc, _keep(_causal_keep(qc, mask), mc), softcap)
                return (acc[0] + gk, acc[1] + gv), gq

            if mask is None:
                return compute(acc)
            return jax.lax.cond(_all_masked(mask), lambda a: (a, jnp.zeros_like(qc, jnp.float32)), compute, acc)

        init = (jnp.zeros_like(kc, jnp.float32), jnp.zeros_like(vc, jnp.float32))
        (gk, gv), gq = jax.lax.scan(row, init, rows)
        return dq + _unchunk(gq), (gk, gv)

    dq, (dk, dv) = jax.lax.scan(col, jnp.zeros_like(q, jnp.float32),
                                (_chunks(k, ck), _chunks(v, ck), kpos, None if keys is None else _chunks(keys, ck)))
    return dq, _unchunk(dk), _unchunk(dv)


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


def _rows(x: Array, like: Array) -> Array:
    """Per-row statistics [B, Hkv, G, Tq] -> [B, Tq, H, 1], to broadcast over an output shaped like `like`."""
    b, tq, h, _ = like.shape
    return jnp.moveaxis(x.reshape(b, h, tq), 1, 2)[..., None]


def _stats(x: Array, like: Array) -> Array:
    """Inverse of `_rows` for a [B, Tq, H] row quantity: -> [B, Hkv, G, Tq] with the grouping of `lse`."""
    return jnp.moveaxis(x, 1, 2).reshape(like.shape)


def _zigzag_perms(n: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """ppermute pairs moving the even / odd one of each device's two contiguous chunks to its zigzag home.

    The sequence is cut into 2n chunks; contiguously device d holds chunks 2d, 2d+1, in zigzag order device i holds
    chunks i and 2n-1-i (one of them even, the other odd). Chunk c's zigzag home is device c if c < n else 2n-1-c.
    """
    home = [c if c < n else 2 * n - 1 - c for c in range(2 * n)]
    return [(d, home[2 * d]) for d in range(n)], [(d, home[2 * d + 1]) for d in range(n)]


def _zigzag_positions(d: Array | int, n: int, c: int) -> Array:
    """Global positions [2c] of the tokens device d holds in the zigzag layout: chunk d, then chunk 2n-1-d, of c
    tokens each (`_to_zigzag`); increasing."""
    return jnp.concatenate([d * c + jnp.arange(c), (2 * n - 1 - d) * c + jnp.arange(c)])


def _ppermute(x: Array, perm: list[tuple[int, int]]) -> Array:
    """ppermute over `seq`, skipped when every device keeps its own block (the even chunks when n = 2)."""
    return x if all(i == j for i, j in perm) else ppermute(x, "seq", perm)


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


def _ring(n: int) -> list[tuple[int, int]]:
    return [(j, (j + 1) % n) for j in range(n)]


def _ring_forward(q: Array, k: Array, v: Array, n: int, causal: bool, window: int | None,
                  keys: Array | None, softcap: float | None = None) -> tuple[Array, Array]:
    """Output o [B, T, H, D] (q.dtype) and log-sum-exp [B, Hkv, G, T] (float32) of the local (zigzag) queries.
    keys: None or the whole key mask [B, S] (contiguous order), indexed by each visiting block's source. A window
    masks the visiting blocks by their global positions; blocks wholly beyond it are skipped (`_unless_masked`)."""
    me = jax.lax.axis_index("seq")
    c = q.shape[1] // 2
    mine = _zigzag_positions(me, n, c)
    diagonal = Causal(mine, mine, window) if causal else None
    acc = _flash_forward(q, k, v, diagonal, _key_block(keys, me, n, causal), softcap)  # the diagonal step

    def visit(kv: tuple[Array, Array], src: Array) -> tuple[Array, Array, Array]:
        mask = _key_block(keys, src, n, causal)
        if not causal:
            return _flash_forward(q, *kv, None, mask, softcap)
        theirs = _zigzag_positions(src, n, c)

        def earlier(k, v):  # src < i: both query chunks see K/V chunk src only
            return _flash_forward(q, k[:, :c], v[:, :c], _window(mine, theirs[:c], window),
                                  None if mask is None else mask[:, :c], softcap)

        def later(k, v):  # src > i: query chunk 2n-1-i sees both K/V chunks; chunk i sees none
            o, m, l = _flash_forward(q[:, c:], k, v, _window(mine[c:], theirs, window), mask, softcap)
            pad = [(0, 0)] * 3 + [(c, 0)]
            return (jnp.pad(o, [(0, 0), (c, 0), (0, 0), (0, 0)]), jnp.pad(m, pad, constant_values=_NEG),
                    jnp.pad(l, pad))

        return jax.lax.cond(src < me, earlier, later, *kv)

    def step(carry, t):
        acc, kv = carry
        kv = ppermute(kv, "seq", _ring(n))
        return (_merge(acc, visit(kv, (me - t) % n)), kv), None

    (acc, _), _ = jax.lax.scan(step, (acc, (k, v)), jnp.arange(1, n))
    return _normalise(*acc, q.dtype)


def _normalise(o: Array, m: Array, l: Array, dtype: Any) -> tuple[Array, Array]:
    """Output (o / l, in `dtype`) and float32 log-sum-exp (m + log l) of an online-softmax accumulator. A row with
    no key to attend (l = 0: its output is 0, replaced by `_fill_empty_rows`) gets lse = +inf, so the backward's
    exp(scores - lse) is 0 there rather than exp(score - _NEG) = inf times a 0 mask = NaN."""
    safe = jnp.where(l == 0.0, 1.0, l)
    return (o / _rows(safe, o)).astype(dtype), jnp.where(l == 0.0, jnp.inf, m + jnp.log(safe))


def _delta(do: Array, o: Array, lse: Array) -> Array:
    """rowsum(do * o) [B, Hkv, G, T] (float32), the softmax backward's per-row term."""
    return _stats(jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1), lse)


def _ring_backward(q: Array, k: Array, v: Array, o: Array, lse: Array, keys: Array | None, do: Array, n: int,
                   causal: bool, window: int | None, softcap: float | None = None) -> tuple[Array, Array, Array]:
    """dq, dk, dv of the local blocks: K/V travel the ring again with their float32 dK/dV accumulators; each step
    recomputes its probability block from q, k and lse; after n-1 steps one more rotation brings dK/dV home. The
    blocks are masked and skipped as in `_ring_forward`."""
    me = jax.lax.axis_index("seq")
    c = q.shape[1] // 2
    delta = _delta(do, o, lse)
    mine = _zigzag_positions(me, n, c)
    diagonal = Causal(mine, mine, window) if causal else None
    dq, dk, dv = _flash_grads(q, k, v, do, lse, delta, diagonal, _key_block(keys, me, n, causal), softcap)

    def visit(kv: tuple[Array, Array], src: Array) -> tuple[Array, Array, Array]:
        mask = _key_block(keys, src, n, causal)
        if not causal:
            return _flash_grads(q, *kv, do, lse, delta, None, mask, softcap)
        theirs = _zigzag_positions(src, n, c)

        def earlier(k, v):  # src < i: both query chunks, K/V chunk src only
            dq, dk, dv = _flash_grads(q, k[:, :c], v[:, :c], do, lse, delta, _window(mine, theirs[:c], window),
                                      None if mask is None else mask[:, :c], softcap)
            pad = [(0, 0), (0, c), (0, 0), (0, 0)]
            return dq, jnp.pad(dk, pad), jnp.pad(dv, pad)

        def later(k, v):  # src > i: query chunk 2n-1-i, both K/V chunks
            dq, dk, dv = _flash_grads(q[:, c:], k, v, do[:, c:], lse[..., c:], delta[..., c:],
                                      _window(mine[c:], theirs, window), mask, softcap)
            return jnp.pad(dq, [(0, 0), (c, 0), (0, 0), (0, 0)]), dk, dv

        return jax.lax.cond(src < me, earlier, later, *kv)

    def step(carry, t):
        dq, kv, dkv = carry
        kv, dkv = ppermute((kv, dkv), "seq", _ring(n))
        gq, gk, gv = visit(kv, (me - t) % n)
        return (dq + gq, kv, (dkv[0] + gk, dkv[1] + gv)), None

    (dq, _, dkv), _ = jax.lax.scan(step, (dq, (k, v), (dk, dv)), jnp.arange(1, n))
    dk, dv = ppermute(dkv, "seq", _ring(n))  # the n-th rotation: dK/dV of our own K/V come home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# -- key (padding) masks ---------------------------------------------------------------------------------------------
def _gather_keys(keys: Array | None) -> Array | None:
    """The whole key mask [B, S] from each device's contiguous block [B, S/n] (an all-gather over `seq` of B*S
    bools, negligible next to the attention's exchanges): Ulysses attends over the whole sequence, the ring indexes
    it by each visiting block's source, and both need it to find rows with no key to attend."""
    return None if keys is None else jax.lax.all_gather(keys, "seq", axis=1, tiled=True)


def _key_block(keys: Array | None, src: Array | int, n: int, causal: bool) -> Array | None:
    """The key mask of the K/V block device `src` holds, laid out as the ring carries it: contiguous block src,
    or with `causal` its zigzag chunks src and 2n-1-src (`_to_zigzag`). None when there is no mask."""
    if keys is None:
        return None
    if not causal:
        size = keys.shape[1] // n
        return jax.lax.dynamic_slice_in_dim(keys, src * size, size, axis=1)
    c = keys.shape[1] // (2 * n)
    return jnp.concatenate([jax.lax.dynamic_slice_in_dim(keys, src * c, c, axis=1),
                            jax.lax.dynamic_slice_in_dim(keys, (2 * n - 1 - src) * c, c, axis=1)], axis=1)


def _fill_empty_rows(o: Array, mean: Array, keys: Array, causal: bool, first_row: Array | int,
                     window: int | None = None) -> Array:
    """The output block o [B, T, H, D] (rows first_row.. of the sequence) with each row that has no key to attend
    (every key masked, or with `causal` every key up to the row's position, or in its `window`) set to the mean of
    all values, which is what dense attention with a finite fill gives the model (all logits equal the fill:
    uniform probabilities); the flash kernels leave such rows 0.

    mean: the mean of all values [B, Hkv, D] (float32); keys: the whole key mask [B, S] (`_gather_keys`)."""
    b, t, h, _ = o.shape
    if causal:
        empty = _seen_keys(keys, first_row, t, window) == 0
    else:
        empty = jnp.broadcast_to(~jnp.any(keys, axis=1)[:, None], (b, t))
    mean = jnp.repeat(mean, h // mean.shape[1], axis=1)[:, None].astype(o.dtype)  # [B, 1, H, D], query head order
    return jnp.where(empty[:, :, None, None], mean, o)


def _seen_keys(keys: Array, first_row: Array | int, t: int, window: int | None) -> Array:
    """How many unmasked keys each causal row first_row..first_row+t-1 may attend, [B, t] int32: those at or before
    it (`causal_mask`), within the last `window` positions, from a running count of the key mask [B, S]."""
    w = keys.shape[1] if window is None else window  # a window as long as the sequence: plain causal
    # count[:, w + 1 + p] = unmasked keys at positions <= p; the w + 1 leading zeros stand for positions < 0
    count = jnp.pad(jnp.cumsum(keys, axis=1, dtype=jnp.int32), ((0, 0), (w + 1, 0)))
    upto = jax.lax.dynamic_slice_in_dim(count, first_row + w + 1, t, axis=1)  # keys at positions <= row
    before = jax.lax.dynamic_slice_in_dim(count, first_row + 1, t, axis=1)  # keys at positions <= row - w
    return upto - before


def _after_cotangent(res: tuple, do: Array) -> tuple:
    """The residuals, made to wait for the output's cotangent. Without it XLA may recompute every layer's
    probability blocks from the residuals as soon as the forward ends (in straight-line code, and for a ring step
    outside a loop) and hold them all at once (the zoo encoder at data=4,seq=2: 1.2 MiB more than with the wait,
    more than its dense plan), and at seq=2 it merges the backward's K/V rotation with the forward's, keeping each
    layer's received K/V until its backward. A backward now holds one layer's blocks and sends K/V again, in
    every model as in a layer scan, as `planner.seq_expert` prices."""
    return jax.lax.optimization_barrier((res, do))[0]


def _local_flash(causal: bool, window: int | None = None, softcap: float | None = None) -> Any:
    """Chunked attention of local q [B, Tq, H, D] over k, v [B, T, Hkv, D] (and a key mask [B, T] or None) as a
    `jax.custom_vjp` (Ulysses' per-device attention over the whole sequence, and cross-attention's local queries
    over whole K/V, `_whole_kv`): it keeps q, k, v, the output and the float32 log-sum-exp, not the [B, H, Tq, T]
    probabilities, and recomputes them chunk by chunk in the backward. With `causal` the rows are the whole
    sequence, positions 0..T-1, so the causal `window` applies as it is."""

    def mask(t: int) -> Causal | None:
        return Causal(jnp.arange(t), jnp.arange(t), window) if causal else None

    def forward(q: Array, k: Array, v: Array, keys: Array | None) -> tuple[Array, tuple]:
        o, lse = _normalise(*_flash_forward(q, k, v, mask(q.shape[1]), keys, softcap), q.dtype)
        return o, (q, k, v, o, lse, keys)

    def backward(res: tuple, do: Array) -> tuple[Array, Array, Array, None]:
        q, k, v, o, lse, keys = _after_cotangent(res, do)
        dq, dk, dv = _flash_grads(q, k, v, do, lse, _delta(do, o, lse), mask(q.shape[1]), keys, softcap)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None

    @jax.custom_vjp
    def attend(q: Array, k: Array, v: Array, keys: Array | None) -> Array:
        return forward(q, k, v, keys)[0]

    attend.defvjp(forward, backward)
    return attend


def _ring_vjp(n: int, causal: bool, window: int | None = None, softcap: float | None = None) -> Any:
    """Ring attention of per-device (sequence-sharded contiguous) blocks, for a shard_map manual over `seq`, as a
    `jax.custom_vjp`: the forward keeps only the local (zigzag when causal) q, k, v, output and float32
    log-sum-exp blocks (and the whole key mask, when there is one), the backward runs the ring again
    (`_ring_backward`). The zigzag relayouts are inside both.
    """

    def forward(q: Array, k: Array, v: Array, keys: Array | None) -> tuple[Array, tuple]:
        me = jax.lax.axis_index("seq")
        if causal:
            q, k, v = (_to_zigzag(x, n, me) for x in (q, k, v))
        o, lse = _ring_forward(q, k, v, n, causal, window, keys, softcap)
        return (_from_zigzag(o, n, me) if causal else o), (q, k, v, o, lse, keys)

    def backward(res: tuple, do: Array) -> tuple[Array, Array, Array, None]:
        me = jax.lax.axis_index("seq")
        res = _after_cotangent(res, do)
        grads = _ring_backward(*res, _to_zigzag(do, n, me) if causal else do, n, causal, window, softcap)
        return (*(tuple(_from_zigzag(g, n, me) for g in grads) if causal else grads), None)

    @jax.custom_vjp
    def attend(q: Array, k: Array, v: Array, keys: Array | None) -> Array:
        return forward(q, k, v, keys)[0]

    attend.defvjp(forward, backward)
    return attend


def _ring_body(n: int, causal: bool, window: int | None = None, softcap: float | None = None) -> Any:
    """The ring's per-device body, with an optional key mask block [B, S/n]: `_ring_vjp` on the whole key mask,
    then rows with no key to attend filled as dense attention fills them (`_fill_empty_rows`; the values' mean
    costs an all-reduce of [B, Hkv, D] over `seq`, forward and backward)."""
    attend = _ring_vjp(n, causal, window, softcap)

    def body(q: Array, k: Array, v: Array, keys: Array | None = None) -> Array:
        whole = _gather_keys(keys)
        o = attend(q, k, v, whole)
        if whole is None:
            return o
        mean = jax.lax.psum(jnp.sum(v.astype(jnp.float32), axis=1), "seq") / whole.shape[1]
        return _fill_empty_rows(o, mean, whole, causal, jax.lax.axis_index("seq") * o.shape[1], window)

    return body


def _run_seq(body: Any, mesh: Any, q: Array, k: Array, v: Array, key_mask: Array | None) -> Array:
    """`body` manual over `seq` on sequence-sharded q, k, v (and key mask [B, S], when there is one)."""
    spec = P(None, "seq")
    q, k, v = (_as_priced(mesh, x, seq=True) for x in (q, k, v))
    args = (q, k, v) if key_mask is None else (q, k, v, key_mask.astype(bool))
    return _as_priced(mesh, manual_over("seq", body, (spec,) * len(args), spec, mesh, *args), seq=True)


def _as_priced(mesh: Any, x: Array, *, seq: bool) -> Array:
    """q, k, v or the output [B, S, H, D] of a sequence method constrained to the layout `planner.seq_expert`
    prices: the batch over the batch axes, the sequence over `seq` (`seq`: else whole), the heads over `tensor`
    where it divides them. The region manual over `seq` leaves the other axes to XLA, which otherwise may gather the
    heads before it (a user's attention under seq=2 x tensor=2: the ring sent every head, 2x the priced bytes).
    Inside another shard_map (the pipeline executor's) the layout is its own: left as it is."""
    am = jax.sharding.get_abstract_mesh()
    if (not am.empty and am.manual_axes) or not isinstance(mesh, jax.sharding.Mesh):
        return x
    batch = tuple(a for a in BATCH_AXES if axis_size(mesh, a) > 1)  # in the batch's own order (`emit.batch_spec`)
    heads = "tensor" if splits_heads(x.shape[2], axis_size(mesh, "tensor")) else None
    spec = P(batch or None, "seq" if seq else None, heads)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def ring_attention(q: Array, k: Array, v: Array, *, causal: bool = True, key_mask: Array | None = None,
                   window: int | None = None, softcap: float | None = None) -> Array:
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
    with their Hkv heads (no repeat). The backward pass is flash-style (`_ring_vjp`, a custom_vjp): it keeps only
    the local q, k, v, output and log-sum-exp, and runs the ring again, K/V travelling with their float32 dK/dV
    accumulators (n-1 rotations of K/V, n of dK/dV) and each step recomputing its probabilities, with the same
    zigzag skipping. Within a step, queries and keys go in chunks of up to `RING_CHUNK` tokens (online softmax
    across key chunks; causal chunk pairs above the diagonal skipped), so per device the op holds O(S/n)
    residuals plus a transient of a few [B, H, chunk, chunk] float32 blocks (`planner.seq_expert.ring_memory`).

    A key mask [B, S] (`ops.attention`) does not travel: it is all-gathered once (B*S bools) and each step takes
    the block of the visiting K/V's source (`_key_block`), in the zigzag layout when causal.

    A causal `window` (`ops.attention`) masks each block pair by its global query and key positions
    (`causal_mask`); K/V still travel the whole ring (the same exchanges as plain causal), but block products, and
    chunk pairs within them, that the window leaves nothing of are skipped. A `softcap` caps each block of logits
    before its mask and softmax (`_capped`: elementwise, so exact blockwise), forward and backward.

    Cross-attention (k, v [B, T, Hkv, D] of another length than q, not causal) rotates the K/V blocks of T/n keys
    past the local S/n queries as it does self-attention's; when seq does not divide T its K/V stay whole and each
    device attends its own queries over them (`_whole_kv`), when it does not divide S the attention runs dense
    (`_unsplit_cross`).
    """
    from autoshard import ops  # imported here: ops imports this module to register it

    check_attention(q, k, causal=causal, window=window, softcap=softcap)
    mesh = ops.current().mesh
    n = axis_size(mesh, "seq")
    if n == 1:
        return ops.dense_attention(q, k, v, causal=causal, key_mask=key_mask, window=window, softcap=softcap)
    cross = _unsplit_cross(mesh, n, q, k, v, key_mask, softcap)
    if cross is not None:
        return cross
    s = q.shape[1] * (n if is_manual("seq") else 1)  # the global length
    parts = 2 * n if causal else n
    if s % parts:
        raise PlanError(f"{'causal ' if causal else ''}ring attention needs the sequence length ({s}) divisible by "
                        f"{parts} (= {'2 x ' if causal else ''}seq={n}): change the seq degree or the sequence length")
    return _run_seq(_ring_body(n, causal, window, softcap), mesh, q, k, v, key_mask)


def _unsplit_cross(mesh: Any, n: int, q: Array, k: Array, v: Array, key_mask: Array | None,
                   softcap: float | None) -> Array | None:
    """Cross-attention (keys of another length than the queries) that the ring and Ulysses cannot split: keys seq
    does not divide stay whole (`_whole_kv`); queries it does not divide (a few learned latents attending over the
    sequence) run dense, laid out by XLA, with a warning. None for attention they split. Inside a shard_map already
    manual over `seq` (the pipeline executor) q and K/V are local blocks and go round the ring as they are."""
    from autoshard import ops  # imported here: ops imports this module to register it

    if is_manual("seq") or q.shape[1] == k.shape[1]:
        return None
    if q.shape[1] % n:
        warnings.warn(f"cross-attention of {q.shape[1]} queries over {k.shape[1]} keys stays dense (not split over "
                      f"seq): seq={n} does not divide the queries", stacklevel=3)
        return ops.dense_attention(q, k, v, causal=False, key_mask=key_mask, softcap=softcap)
    if k.shape[1] % n:
        return _whole_kv(mesh, q, k, v, key_mask, softcap)
    return None


def _whole_kv(mesh: Any, q: Array, k: Array, v: Array, key_mask: Array | None, softcap: float | None) -> Array:
    """Cross-attention of sequence-sharded queries [B, S, H, D] over whole k, v [B, T, Hkv, D] (and key mask
    [B, T]): each device attends its S/n queries over all T keys with no exchange in the forward; the K/V gradients
    of the devices' queries are summed over `seq` (the transpose of making them device-varying: an all-reduce of
    dK and dV)."""
    attend = _local_flash(False, None, softcap)

    def body(q: Array, k: Array, v: Array, keys: Array | None = None) -> Array:
        k, v = (jax.lax.pcast(x, "seq", to="varying") for x in (k, v))
        o = attend(q, k, v, keys)
        if keys is None:
            return o
        return _fill_empty_rows(o, jnp.mean(v.astype(jnp.float32), axis=1), keys, False, 0)

    whole = P()
    q, k, v = _as_priced(mesh, q, seq=True), _as_priced(mesh, k, seq=False), _as_priced(mesh, v, seq=False)
    args = (q, k, v) if key_mask is None else (q, k, v, key_mask.astype(bool))
    specs = (P(None, "seq"), whole, whole, whole)[:len(args)]
    return _as_priced(mesh, manual_over("seq", body, specs, P(None, "seq"), mesh, *args), seq=True)


__all__ = ["Causal", "all_to_all", "axis_size", "causal_mask", "check_attention", "check_window", "free_axes",
           "ring_attention", "ring_bytes", "shard_map_mesh", "ulysses_attention", "ulysses_bytes"]
