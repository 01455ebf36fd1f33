"""Sequence (`seq`) and expert (`expert`) parallelism in the planner: the degrees a model admits and what they cost.

Both are strategies of one composite op (`ops.attention`, `ops.moe`), run by the runtime as shard_maps
(`autoshard.sequence`, `autoshard.experts`). The traced graph holds the dense versions of those ops, so the
integer program (`planner.ilp`) prices seq and expert as extra token splitting (`seq` splits every activation's
sequence, `expert` the batch) and this module adds what the dense graph cannot show:

- the exchanges of the op (Ulysses all-to-alls, ring collective-permutes, MoE dispatch/combine), from the byte
  formulas below, which the runtime's tests check against compiled programs; each attention by its own shapes
  (a cross-attention's K/V over its keys' length T, or whole with dK/dV all-reduced over seq: `whole_kv_bytes`);
- the attention's memory: ring attention and Ulysses' local attention have custom (flash-style, recomputing)
  backwards that keep per layer only q, k, v, output and log-sum-exp blocks, O(S/n) per device, instead of what
  the traced dense attention would save (the integer program leaves those out, `dense_residuals`), plus a
  transient working set: a few float32 probability chunks [B, H, chunk, chunk] (and for the ring the travelling
  K/V with their dK/dV accumulators).

The byte formulas live here (not in `autoshard`) because the planner must not import the runtime; the runtime
modules re-export them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from planner.errors import PlanError
from planner.trace import dtype_kind

SEQUENCE_METHODS = ("ulysses", "ring")

RING_CHUNK = 1024
"""Query / key chunk (tokens) of ring attention's block products (`autoshard.sequence` imports it)."""


def dense_residuals(method: str | None) -> bool:
    """Whether the attention keeps what the traced dense attention's autodiff would (plain dense attention); ring
    attention and Ulysses' local attention have recomputing custom backwards (`ring_memory`, `ulysses_memory`)."""
    return method not in SEQUENCE_METHODS


def ring_memory(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, n: int, *, itemsize: int = 4,
                kv_seq: int | None = None) -> tuple[float, float]:
    """(residuals per layer, transient) bytes per device of ring attention with the runtime's custom backward.

    batch and heads are what one device holds, seq the global length, n the seq degree. Residuals: the local
    (zigzag) q, k, v and output blocks and the float32 log-sum-exp of each query row. Transient (one layer at a
    time): four float32 [batch, heads, chunk, chunk] blocks of the backward (logits, probabilities, their
    cotangent and the logits' cotangent), the travelling K/V and float32 dK/dV accumulators twice (sent and
    received) and the float32 dq accumulator. Checked against compiled train steps (gpt-tiny:heads=2, seq=4 on
    CPU): batch 2 x 1024 predicted 18.1 MB in all vs 17.2 MB compiled; 2 x 4096 with chunk 256 57.8 vs 55.0 MB.
    kv_seq: the keys' length T of a cross-attention (default seq): the K/V blocks are T/n long.
    """
    tokens = seq // n
    keys = (seq if kv_seq is None else kv_seq) // n
    chunk = min(RING_CHUNK, tokens)
    residuals = (batch * head_dim * itemsize * (2 * heads * tokens + 2 * kv_heads * keys)
                 + batch * heads * tokens * 4)
    kv = 2 * batch * keys * kv_heads * head_dim
    transient = (4 * batch * heads * chunk * min(RING_CHUNK, keys) * 4 + 2 * kv * (itemsize + 4)
                 + batch * tokens * heads * head_dim * 4)
    return float(residuals), float(transient)


# -- bytes sent per device per step (convention of `autoshard.analysis`) ---------------------------------------------
def ulysses_bytes(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, n: int, *, itemsize: int = 4,
                  backward: bool = True, kv_seq: int | None = None) -> float:
    """Bytes one device sends per step in Ulysses all-to-alls (convention of `autoshard.analysis`).

    batch and heads are what one device holds (global batch / data*fsdp shards, heads / tensor shards); seq is the
    global sequence length and n the seq degree. Forward: four all-to-alls (q, k, v in; output back), each of a
    [batch, seq/n, heads_x, head_dim] operand of which (n-1)/n leaves the device. The backward pass runs their
    transposes (dq, dk, dv, d_out), the same sizes again. Remat of the attention would add the forward part once
    more. kv_seq: the keys' length T of a cross-attention (default seq): k and v go through the exchange as
    [batch, T/n, kv_heads, head_dim] blocks, q and the output as [batch, seq/n, heads, head_dim].
    """
    if n <= 1:
        return 0.0
    block = batch * (seq // n) * head_dim * itemsize
    if kv_seq is None or kv_seq == seq:
        fwd = (n - 1) / n * block * (2 * heads + 2 * kv_heads)
    else:
        fwd = (n - 1) / n * (block * 2 * heads + batch * (kv_seq // n) * head_dim * itemsize * 2 * kv_heads)
    return fwd * (2 if backward else 1)


def ring_bytes(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, n: int, *, itemsize: int = 4,
               causal: bool = True, backward: bool = True, kv_seq: int | None = None) -> float:
    """Bytes one device sends per step in ring attention's collective-permutes (convention of `autoshard.analysis`:
    a collective-permute counts its operand bytes once per execution).

    batch and heads are what one device holds (global batch / data*fsdp shards, heads / tensor shards); seq is the
    global length, n the seq degree; one local block of one head is batch * seq/n * head_dim * itemsize bytes.
    Forward: n-1 rotations of the local K and V (2 * kv_heads blocks each); causal adds the zigzag relayout of q, k,
    v in and of the output back (2 * heads + 2 * kv_heads blocks; half that for n = 2, where the even chunks already
    sit at home). Backward (the runtime's flash-style custom_vjp): the ring runs again, n-1 rotations of K and V
    travelling with their dK/dV accumulators, which are float32 (4 bytes whatever `itemsize`) and take one more
    rotation to come home (n of them); causal adds the relayouts' transposes (dq, dk, dv in, d_out back), the
    forward's sizes (K/V are sent again at n = 2 too: the backward waits for its cotangent, so XLA cannot merge
    its rotation with the forward's, `autoshard.sequence._after_cotangent`). Remat of the attention
    would add the forward part once more. A causal sliding window (`ops.attention(window=...)`) sends the same: K/V
    travel the whole ring, only block products the window leaves nothing of are skipped. kv_seq: the keys' length T
    of a cross-attention (default seq, never causal): the travelling K/V blocks are batch * T/n * head_dim.
    """
    if n <= 1:
        return 0.0
    qblock = batch * (seq // n) * head_dim
    block = batch * ((seq if kv_seq is None else kv_seq) // n) * head_dim  # one K/V block of one head
    relayout = ((2 * heads * qblock + 2 * kv_heads * block) * itemsize * (0.5 if n == 2 else 1.0) if causal
                else 0.0)
    fwd = (n - 1) * 2 * kv_heads * block * itemsize + relayout
    if not backward:
        return fwd
    kv_again = (n - 1) * 2 * kv_heads * block * itemsize
    return fwd + kv_again + n * 2 * kv_heads * block * 4 + relayout


def ulysses_memory(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, n: int, *, itemsize: int = 4,
                   kv_seq: int | None = None) -> tuple[float, float]:
    """(residuals per layer, transient) bytes per device of Ulysses' chunked local attention (same arguments as
    `ring_memory`): the head-sharded q, k, v and output [batch, seq, heads/n, head_dim] and the float32
    log-sum-exp, the same bytes as the ring's; transient: four float32 [batch, heads/n, chunk, chunk] blocks and the
    float32 dq accumulator (no travelling K/V); kv_seq: a cross-attention's key length T (chunks of T's keys)."""
    residuals, _ = ring_memory(batch, seq, heads, kv_heads, head_dim, n, itemsize=itemsize, kv_seq=kv_seq)
    local = max(1, heads // n)
    chunk = min(RING_CHUNK, seq)
    keys = min(RING_CHUNK, seq if kv_seq is None else kv_seq)
    return residuals, float(4 * batch * local * chunk * keys * 4 + batch * seq * local * head_dim * 4)


def whole_kv_bytes(batch: int, kv_seq: int, kv_heads: int, head_dim: int, n: int, *, itemsize: int = 4) -> float:
    """Bytes one device sends per step for a cross-attention whose keys' length T (kv_seq) seq does not divide
    (`autoshard.sequence._whole_kv`): K/V stay whole on every device, so the forward exchanges nothing; the
    backward sums the devices' dK and dV [batch, T, kv_heads, head_dim] over `seq` (the transpose of making them
    device-varying, `lax.pcast`: an all-reduce each), 2 (n-1)/n of each operand (`autoshard.analysis`'s ring
    convention). batch and kv_heads are what one device holds."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * 2 * batch * kv_seq * kv_heads * head_dim * itemsize


def whole_kv_memory(batch: int, seq: int, kv_seq: int, heads: int, kv_heads: int, head_dim: int, n: int, *,
                    itemsize: int = 4) -> tuple[float, float]:
    """(residuals per layer, transient) bytes per device of `whole_kv_bytes`' cross-attention: the local queries'
    q and output blocks [batch, seq/n, heads, head_dim], the whole k and v [batch, T, kv_heads, head_dim], the
    float32 log-sum-exp of the local queries; transient: four float32 [batch, heads, chunk, T-chunk] blocks and the
    float32 dq accumulator (`_local_flash`'s backward, as Ulysses')."""
    tokens = seq // n
    residuals = (batch * head_dim * itemsize * (2 * heads * tokens + 2 * kv_heads * kv_seq)
                 + batch * heads * tokens * 4)
    transient = (4 * batch * heads * min(RING_CHUNK, tokens) * min(RING_CHUNK, kv_seq) * 4
                 + batch * tokens * heads * head_dim * 4)
    return float(residuals), float(transient)


def moe_all_to_all_bytes(experts: int, batch: int, capacity: int, hidden: int, n: int, *, itemsize: int = 4,
                         backward: bool = True) -> float:
    """Bytes one device sends per step in expert-parallel dispatch and combine (convention of `autoshard.analysis`).

    batch is the number of sequences one device holds (global batch / (expert * data * fsdp)); capacity is
    `ops.capacity(seq, experts, top_k, capacity_factor)` (slots per sequence and expert); n is the expert degree.
    Forward: dispatch and combine each move a [experts, batch, capacity, hidden] buffer of which (n-1)/n leaves the
    device; backward: their transposes, the same again. Padding slots travel too (the exchange is dense, not
    ragged). With other mesh axes > 1 the exchange is n-1 collective-permutes of 1/n each instead of one
    all-to-all (see `autoshard.sequence.all_to_all`): the same bytes. Remat of the MoE layer would add the forward
    part once more.
    """
    if n <= 1:
        return 0.0
    fwd = 2 * (n - 1) / n * experts * batch * capacity * hidden * itemsize
    return fwd * (2 if backward else 1)


# -- what the traced graph says about attention and MoE ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Attention:
    """One kind of `ops.attention` in a traced graph, by its own shapes (global: q [B, S, H, D], k/v [B, T, Hkv, D])
    and how often it runs per step (`layers`: the ops' count, summed over the attentions of these shapes)."""

    seq_len: int
    """S, the queries' length (what seq splits)."""
    kv_len: int
    """T, the keys' length: S for self-attention, another sequence's for cross-attention."""
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    dtype: str
    layers: int


@dataclasses.dataclass(frozen=True)
class OpShapes:
    """Sizes of a traced model's attention and MoE ops (zeros when it has none)."""

    seq_len: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    attention_layers: int = 0
    causal: bool = True
    """Whether the attention is causal, within a sliding window or not (ring attention then balances it over
    2 x seq chunks, zigzag, and both exchange the same)."""
    dtype: str = "float32"
    """The attention inputs' dtype (what a collective moves of it is the cluster's to say: `wire_itemsize`)."""
    experts: int = 0
    capacity: int = 0
    hidden: int = 0
    moe_layers: int = 0
    expert_params: frozenset[str] = frozenset()
    """Parameters with a leading-ish `experts` axis (split over `expert`)."""
    attentions: tuple[Attention, ...] = ()
    """Every `ops.attention` of the graph by its own shapes (`_attentions`), which `extras` prices one by one; the
    fields above are the first attention's (what seq must divide, the methods it admits)."""
    scanned: bool = False
    """Whether the attention runs inside a layer scan (`Graph.stack == "scan"`)."""

    @property
    def itemsize(self) -> int:
        """Bytes per element of `dtype`, as the attention's buffers hold it."""
        from planner.trace import itemsize

        return itemsize(self.dtype)

    @property
    def has_attention(self) -> bool:
        return self.attention_layers > 0 and self.heads > 0

    def attention_kinds(self) -> tuple[Attention, ...]:
        """`attentions`, or (a graph whose attention ops' shapes were not read) one self-attention of the fields'
        shapes run `attention_layers` times."""
        if self.attentions:
            return self.attentions
        return (Attention(self.seq_len, self.seq_len, self.heads, self.kv_heads, self.head_dim, self.causal,
                          self.dtype, self.attention_layers),)

    @property
    def is_moe(self) -> bool:
        return self.moe_layers > 0 and self.experts > 0


def op_shapes(graph: Any) -> OpShapes:
    """Read attention heads / sequence length and MoE experts / capacity off a traced graph (`planner.trace`):
    parameters' logical axis names give head and expert counts (where they carry none, the attention ops' own q
    and k shapes do: `_attentions`), the ops under the `autoshard.attention` / `autoshard.moe` scopes give how
    often they run, whether the attention is causal and the MoE buffer [experts, batch, capacity, hidden]."""
    sizes: dict[str, int] = {}
    expert_params = set()
    for path, info in graph.params.items():
        for size, name in zip(info.shape, info.axes or ()):
            if name is not None:
                sizes.setdefault(name, size)
            if name == "experts":
                expert_params.add(path)
    scoped = [op for op in graph.ops if "autoshard.attention" in op.scope]
    attn = [op for op in scoped if op.primitive == "dot_general"]
    moe = [op for op in graph.ops if op.primitive == "dot_general" and "autoshard.moe" in op.scope
           and any(i is not None and graph.values[i].param in expert_params for i in op.inputs)]
    found = _attentions(graph, scoped)
    seen = found[0] if found else Attention(0, 0, 0, 0, 0, False, "float32", 0)
    heads = sizes.get("heads") or seen.heads
    # the queries' length is what seq splits: a batch's first leaf may be another sequence (a cross-attention's
    # context); without an attention op, the first token-shaped leaf of the batch
    seq_len = seen.seq_len or next((graph.values[i].shape[1] for i in graph.inputs
                                    if graph.values[i].batch_dim == 0 and len(graph.values[i].shape) >= 2), 0)
    out = dict(seq_len=seq_len, heads=heads, scanned=graph.stack == "scan",
               kv_heads=sizes.get("kv_heads") or ((seen.kv_heads or heads) if "heads" not in sizes else heads),
               head_dim=sizes.get("head_dim") or seen.head_dim, expert_params=frozenset(expert_params))
    if attn:  # each attention is two products (q.k, probs.v), each run `count` times per step
        dtype = graph.values[attn[0].inputs[0]].dtype
        out.update(attention_layers=max(1, round(sum(op.count for op in attn) / 2)), dtype=str(dtype),
                   causal=any("autoshard.attention/causal" in op.scope for op in attn),
                   attentions=found)
    if moe and sizes.get("experts"):
        h = graph.values[next(i for i in moe[0].inputs if graph.values[i].param is None)]
        if len(h.shape) == 4:  # [E, B, C, D]
            out.update(experts=sizes["experts"], capacity=h.shape[2], hidden=h.shape[3], moe_layers=moe[0].count)
    return OpShapes(**out)


def attention_layouts(graph: Any, mesh: dict[str, int]
                      ) -> tuple[dict[int, int | None], dict[tuple[int, int], int | None]]:
    """How the runtime lays out each `ops.attention`'s q, k, v and output [B, S, H, D] around its sequence method
    (`autoshard.sequence._as_priced`; `ring_bytes` / `ulysses_bytes` price that layout): the heads over tensor
    where it divides them, else whole. Returns (output value -> layout, (op, operand) -> the layout the attention's
    op reads q, k or v in): the inputs are converted on entry, from whatever layout their producers give them.
    Empty without seq x tensor, or inside a pipeline (whose stages leave the layout to XLA)."""
    t = mesh.get("tensor", 1)
    if mesh.get("seq", 1) == 1 or t == 1 or mesh.get("pipe", 1) > 1:
        return {}, {}

    def layout(vid: int) -> tuple[bool, int | None]:
        v = graph.values[vid]
        wanted = len(v.shape) == 4 and v.param is None and dtype_kind(v.dtype) == "float"
        return wanted, (2 if wanted and splits_heads(v.shape[2], t) else None)

    scoped = {op.index for op in graph.ops if "autoshard.attention" in op.scope}
    outputs: dict[int, int | None] = {}
    uses: dict[tuple[int, int], int | None] = {}
    for i in sorted(scoped):
        op = graph.ops[i]
        for pos, vid in enumerate(op.inputs):
            if vid is not None and graph.values[vid].producer not in scoped and (lay := layout(vid))[0]:
                uses[(i, pos)] = lay[1]
        for vid in op.outputs:
            if any(c not in scoped for c, _ in graph.values[vid].consumers) and (lay := layout(vid))[0]:
                outputs[vid] = lay[1]
    return outputs, uses


def _attentions(graph: Any, scoped: list[Any]) -> tuple[Attention, ...]:
    """Every `ops.attention` in the graph by its own shapes: each `ops.dense_attention` starts with its grouping
    of q ([B, S, H, D] -> [B, S, Hkv, H/Hkv, D]) and then multiplies it with k [B, T, Hkv, D] (its first
    dot_general: T, how often it runs, causal or not from its scope). Attentions of equal shapes are one entry,
    their counts summed. Empty where no grouping is found."""
    kinds: dict[tuple, int] = {}
    grouped = None
    for op in scoped:
        if op.primitive == "reshape" and op.inputs and op.inputs[0] is not None:
            src, dst = graph.values[op.inputs[0]].shape, graph.values[op.outputs[0]].shape
            if len(src) == 4 and len(dst) == 5:
                grouped = (src, dst)
        elif op.primitive == "dot_general" and grouped is not None:
            keys = [graph.values[i] for i in op.inputs if i is not None and len(graph.values[i].shape) == 4]
            qg = [graph.values[i] for i in op.inputs if i is not None and len(graph.values[i].shape) == 5]
            if not keys or not qg:
                continue
            (src, dst), grouped = grouped, None
            key = (src[1], keys[0].shape[1], src[2], dst[2], src[3], "autoshard.attention/causal" in op.scope,
                   str(qg[0].dtype))
            kinds[key] = kinds.get(key, 0) + op.count
    return tuple(Attention(*key, layers=max(1, count)) for key, count in kinds.items())


# -- which degrees are valid ------------------------------------------------------------------------------------------
def sequence_methods(shapes: OpShapes, n: int, tensor: int) -> list[str]:
    """Sequence methods the runtime can run at seq degree n (with `tensor` splitting heads) for every attention of
    the model (`OpShapes.attention_kinds`): ring needs each queries' length divisible by 2n (causal: zigzag) or n,
    Ulysses each attention's heads and kv_heads divisible by tensor x n (each tensor shard splits its own heads;
    otherwise XLA all-gathers heads around the exchange) and its queries' length by n. A keys' length seq does not
    divide is no bar: that attention reads whole K/V."""
    if n == 1:
        return [None]
    if not shapes.has_attention:
        return []
    kinds = shapes.attention_kinds()
    out = []
    if all(_ulysses_fault(a, n, tensor) is None for a in kinds):
        out.append("ulysses")
    if all(_ring_fault(a, n) is None for a in kinds):
        out.append("ring")
    return out


def _ring_fault(a: Attention, n: int) -> str | None:
    """Why ring attention cannot run attention `a` at seq degree n (one line), or None."""
    if a.seq_len % (2 * n if a.causal else n) == 0:
        return None
    if a.causal:
        return (f"causal ring attention needs the sequence length ({a.seq_len}) divisible by 2 x seq = {2 * n}: "
                f"change the seq degree or use sequence ulysses")
    return f"ring attention needs the sequence length ({a.seq_len}) divisible by seq={n}: change the seq degree"


def _ulysses_fault(a: Attention, n: int, tensor: int) -> str | None:
    """Why Ulysses cannot run attention `a` at seq degree n beside `tensor` (one line), or None."""
    if a.seq_len % n:
        return f"ulysses needs the sequence length ({a.seq_len}) divisible by seq={n}: change the seq degree"
    if a.heads % (tensor * n) or a.kv_heads % (tensor * n):
        return (f"ulysses needs heads ({a.heads}) and kv heads ({a.kv_heads}) of the attention divisible by "
                f"tensor x seq = {tensor * n}: use sequence ring or a smaller seq degree")
    return None


def expert_ok(shapes: OpShapes, n: int) -> bool:
    """Expert degree n splits the experts evenly (the batch check is the mesh enumeration's)."""
    return n == 1 or (shapes.is_moe and shapes.experts % n == 0)


def check_fixed(shapes: OpShapes, fixed: dict[str, int], method: str | None, batch: int) -> None:
    """One-line errors for a user-fixed seq / expert degree or sequence method the model cannot run."""
    s, e, t = fixed.get("seq", 1), fixed.get("expert", 1), fixed.get("tensor", 1)
    if method is not None and method not in SEQUENCE_METHODS:
        raise PlanError(f"unknown sequence method {method!r}: use one of {', '.join(SEQUENCE_METHODS)}")
    if s > 1 and not shapes.has_attention:
        raise PlanError(f"seq={s} but the model has no attention to split (ops.attention, or softmax attention with "
                        f"no mask, a causal, sliding-window or padding one): drop seq from the mesh")
    if s > 1 and shapes.seq_len % s:
        raise PlanError(f"seq={s} does not divide the sequence length {shapes.seq_len}: choose a seq degree that "
                        f"divides it")
    if s > 1 and method in SEQUENCE_METHODS:
        fault = _ring_fault if method == "ring" else functools.partial(_ulysses_fault, tensor=t)
        faults = [f for f in (fault(a, s) for a in shapes.attention_kinds()) if f is not None]
        if faults:
            raise PlanError(faults[0])
    if e > 1 and not shapes.is_moe:
        raise PlanError(f"expert={e} but the model has no mixture-of-experts layer: drop expert from the mesh")
    if e > 1 and shapes.experts % e:
        raise PlanError(f"expert={e} does not divide the model's {shapes.experts} experts: use an expert degree "
                        f"dividing {shapes.experts}")
    if e > 1 and batch % e:
        raise PlanError(f"expert={e} splits the batch, but batch {batch} is not divisible by it: change the batch "
                        f"size or the expert degree")


# -- what they cost beyond the token split ----------------------------------------------------------------------------
@dataclasses.dataclass
class Extras:
    """Analytic terms of one mesh's sequence and expert ops, per device per step."""

    comm_bytes: dict[str, float] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    memory: dict[str, float] = dataclasses.field(default_factory=dict)
    within_working_set: str | None = None
    """A `memory` entry the solution's backward working set already holds, up to that working set's size
    (`apply`); the search's budgets count it whole (an upper bound)."""


def _alone(mesh: dict[str, int], axis: str) -> bool:
    """Whether `axis` is the only automatic axis of size > 1 around its op (inside a pipeline the executor makes
    every axis but `tensor` manual): then its exchange compiles as a native all-to-all."""
    if mesh["pipe"] > 1:
        return mesh["tensor"] == 1
    return all(n == 1 for a, n in mesh.items() if a != axis)


def splits_heads(heads: int, tensor: int) -> bool:
    """Whether the runtime splits an attention's heads (or kv heads) over `tensor`: where it divides them; else
    they stay whole on every tensor shard (`autoshard.sequence._as_priced`, `attention_layouts`)."""
    return tensor > 1 and heads % tensor == 0


def _local_heads(heads: int, tensor: int) -> int:
    return heads // tensor if splits_heads(heads, tensor) else heads


def extras(shapes: OpShapes, mesh: dict[str, int], batch: int, method: str | None, cluster: Any,
           remat: str = "none") -> Extras:
    """The attention exchanges (seq > 1), MoE dispatch/combine (expert > 1) and ring attention's own memory.

    Keys follow `autoshard.analysis`: with every other automatic mesh axis of size 1 the exchanges compile as
    all-to-alls, otherwise as collective-permutes (the runtime's ppermute form, the same bytes); ring attention is
    collective-permutes. Inside a pipeline (pipe > 1) only `tensor` stays automatic, and on XLA:CPU the ring's
    permutes are all-to-alls that carry n-1 blocks each (`autoshard.sequence.ppermute_deadlocks`), the
    Ulysses exchange a native all-to-all.
    """
    from planner.collectives import axis_collective_time
    from planner.trace import itemsize as itemsize_of

    out = Extras()
    local_batch = batch // math.prod(mesh[a] for a in ("data", "fsdp", "expert"))
    s, e, t = mesh["seq"], mesh["expert"], mesh["tensor"]
    if s > 1 and shapes.has_attention and method is not None:
        cpu_pipe = mesh["pipe"] > 1 and cluster.name.startswith("cpu")
        alone = _alone(mesh, "seq")
        comm: dict[str, float] = {}
        seconds, residuals, transient = 0.0, [], 0.0
        for a in shapes.attention_kinds():
            if a.seq_len % s:  # queries seq does not divide: dense, laid out by XLA (`_unsplit_cross`)
                continue
            h, hkv = _local_heads(a.heads, t), _local_heads(a.kv_heads, t)
            wire, item = cluster.wire_itemsize(a.dtype), itemsize_of(a.dtype)
            if a.kv_len != a.seq_len and a.kv_len % s:  # whole K/V on every device, dK/dV summed over seq
                kind, calls = "all-reduce", 2  # dK and dV
                nbytes = whole_kv_bytes(local_batch, a.kv_len, hkv, a.head_dim, s, itemsize=wire)
                operand = nbytes / calls * s / (2 * (s - 1))
                saved, working = whole_kv_memory(local_batch, a.seq_len, a.kv_len, h, hkv, a.head_dim, s,
                                                 itemsize=item)
            else:
                args = (local_batch, a.seq_len, h, hkv, a.head_dim, s)
                kv = None if a.kv_len == a.seq_len else a.kv_len
                if method == "ring":
                    nbytes = ring_bytes(*args, itemsize=wire, causal=a.causal, kv_seq=kv)
                    kind = "collective-permute"
                    if cpu_pipe:
                        kind, nbytes = "all-to-all", nbytes * (s - 1)
                    # per layer: n-1 K/V rotations forward, n backward (K/V with dK/dV, then dK/dV home), relayouts
                    calls = 2 * s - 1 + (4 if a.causal else 0)
                    saved, working = ring_memory(*args, itemsize=item, kv_seq=kv)
                else:
                    nbytes = ulysses_bytes(*args, itemsize=wire, kv_seq=kv)
                    kind = "all-to-all" if alone or cpu_pipe else "collective-permute"
                    calls = 8 if kind == "all-to-all" else 8 * (s - 1)
                    saved, working = ulysses_memory(*args, itemsize=item, kv_seq=kv)
                per_call = nbytes / calls
                operand = per_call if kind == "collective-permute" else per_call * s / (s - 1)
            comm[f"seq/{kind}"] = comm.get(f"seq/{kind}", 0.0) + nbytes * a.layers
            seconds += calls * a.layers * axis_collective_time(kind, operand, mesh, ("seq",), cluster)
            residuals.append((saved, a.layers))
            transient = max(transient, working)
        name = "ring" if method == "ring" else "ulysses"
        # full remat keeps one layer's attention at a time: the largest
        out.memory[f"{name} attention residuals"] = (max((r for r, _ in residuals), default=0.0) if remat == "full"
                                                     else sum(r * n for r, n in residuals))
        out.memory[f"{name} attention transient"] = transient
        if method == "ring" and shapes.scanned and remat != "full" and mesh["pipe"] == 1:
            # a layer scan's backward without remat holds one layer's residuals once more (`Problem.
            # value_memory_items`); the ring's backward blocks fit inside it: counted on top, gpt-tiny's ring
            # plans were over-predicted by 14-26% (data=4,seq=2: 9.92 MB vs 8.47 MB compiled), within it they are
            # -4.7..+4.0% (eight plans: heads, kv heads, bfloat16, fsdp, tensor, sequence 128 and 256). Ulysses'
            # full-sequence chunks do not (gpt-tiny:heads=8 at seq=2 and 4: +2.0% counted on top)
            out.within_working_set = f"{name} attention transient"
        out.comm_bytes.update(comm)
        out.seconds["sequence comm"] = seconds
    if e > 1 and shapes.is_moe:
        alone = _alone(mesh, "expert")
        kind = "all-to-all" if alone else "collective-permute"
        total = shapes.moe_layers * moe_all_to_all_bytes(shapes.experts, local_batch, shapes.capacity, shapes.hidden,
                                                         e, itemsize=cluster.wire_itemsize(shapes.dtype))
        out.comm_bytes[f"expert/{kind}"] = total
        calls = 4 if alone else 4 * (e - 1)
        per_call = total / (calls * shapes.moe_layers)
        operand = per_call if kind == "collective-permute" else per_call * e / (e - 1)
        out.seconds["expert comm"] = calls * shapes.moe_layers * axis_collective_time(kind, operand, mesh,
                                                                                     ("expert",), cluster)
    return out


def apply(sol: Any, ext: Extras) -> Any:
    """A `planner.ilp.Solution` with the extras added to its time, memory and communication."""
    if not (ext.comm_bytes or ext.seconds or ext.memory):
        return sol
    comm = dict(sol.comm_bytes)
    for k, v in ext.comm_bytes.items():
        comm[k] = comm.get(k, 0.0) + v
    breakdown = {**sol.breakdown, **ext.seconds}
    memory = {**sol.memory, **ext.memory}
    if ext.within_working_set is not None:
        key = ext.within_working_set
        memory[key] = max(0.0, memory[key] - sol.memory.get("backward working set", 0.0))
    return dataclasses.replace(sol, comm_bytes=comm, breakdown=breakdown, memory=memory,
                               step_seconds=sol.step_seconds + sum(ext.seconds.values()),
                               memory_bytes=sol.memory_bytes + sum(memory[k] for k in ext.memory))


__all__ = ["Attention", "Extras", "OpShapes", "SEQUENCE_METHODS", "apply", "attention_layouts", "check_fixed",
           "expert_ok", "extras", "splits_heads",
           "moe_all_to_all_bytes", "op_shapes", "RING_CHUNK", "dense_residuals",
           "ring_bytes", "ring_memory", "sequence_methods", "ulysses_bytes", "ulysses_memory", "whole_kv_bytes",
           "whole_kv_memory"]
