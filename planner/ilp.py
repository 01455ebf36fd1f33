"""The intra-op integer program for one mesh: how the `tensor` axis splits every op and parameter.

Batch axes (`data`, `fsdp`) always split the batch dimension; what remains open is, per op, which strategy of
`planner.layouts` it runs over the `tensor` axis, and per parameter, its tensor layout and whether `fsdp` shards it
(ZeRO-3). In Alpa's form: one-hot strategy variables per op and per parameter, resharding costs on the dataflow
edges (forward conversions of each value, paid once per distinct conversion since XLA reuses a converted value;
backward conversions of each use's cotangent, paid per use since XLA reduces each use's contribution separately), a per-device memory constraint, and predicted step time as the objective.
`Problem.cost(assignment)` evaluates the same objective for a fixed assignment, so brute force can check the solver.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import weakref
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from ortools.sat.python import cp_model

from planner.calibration import WORKING_SET
from planner.cluster import ClusterSpec, dtype_name
from planner.collectives import axis_collective_time, bytes_sent
from planner.plan import AXES
from planner.layouts import ELEMENTWISE, PARTIAL, SOURCES, Layout, Strategy, conversion, has_rule, local_nbytes, strategies
from planner.trace import BLOCK_INDEX, BOUNDARY, CONTRACTIONS, Graph, Op, Value, dtype_kind, itemsize

PRODUCT_OPS = CONTRACTIONS | {"mul", "div", "integer_pow", "pow"}
SAVES_OUTPUT = {"exp", "tanh", "logistic", "rsqrt", "sqrt", "log", "log1p", "expm1", "erf"}
OPT_STATE_COPIES = 2  # Adam: first and second moments
"""Optimizer state per parameter, in copies of it, when the plan is not told the optimizer (AdamW, what
`autoshard train` runs); `Graph.optimizer_copies` holds the real one's (`autoshard.api.optimizer_copies`)."""


def optimizer_copies(graph: Graph) -> float:
    """The optimizer state a graph's training step keeps per parameter, in copies of it."""
    return OPT_STATE_COPIES if graph.optimizer_copies is None else graph.optimizer_copies


FUSED = ELEMENTWISE | {"broadcast_in_dim", "reshape", "squeeze", "expand_dims", "iota", "select_n"}
EXPENSIVE = SAVES_OUTPUT | {"div", "pow", "cbrt", "atan2", "tan", "layer_boundary", "custom_jvp_call",
                            "optimization_barrier"}
"""Elementwise ops XLA will not duplicate into a second fusion (its `IsExpensive`), plus our barriers: their
outputs are stored for the backward; a cheaper elementwise result is recomputed there from what they read."""


_SHARED: dict[int, tuple[weakref.ref, dict]] = {}


def _shared(graph: Graph, key: tuple, make: Callable[[], Any]) -> Any:
    """`make()`, computed once per graph and key: what a problem derives from the graph alone (or from the graph and
    the tensor degree) is the same for every mesh, and the search builds a problem for each of hundreds of meshes.
    Held as long as the graph lives; the tables are read-only."""
    gid = id(graph)
    entry = _SHARED.get(gid)
    if entry is None or entry[0]() is not graph:
        entry = (weakref.ref(graph, functools.partial(_forget, gid)), {})
        _SHARED[gid] = entry
    store = entry[1]
    if key not in store:
        store[key] = make()
    return store[key]


def _forget(gid: int, ref: weakref.ref) -> None:
    if _SHARED.get(gid, (None,))[0] is ref:
        del _SHARED[gid]


def stacked_params(graph: Graph) -> set[str]:
    """Parameters read per layer inside the stack (a slice of them enters the scan): ZeRO-3 gathers them in the
    forward and again in the backward loop, and a pipeline splits them over its stages. Shared, read-only."""
    def find() -> set[str]:
        return {v.param for v in graph.values.values() if v.param is not None and v.producer is None
                and v.id != graph.param_values[v.param]}
    return _shared(graph, ("stacked",), find)


TIGHTENINGS = 3
"""How many times `_Model.solve` tightens the budget constraint after a plan that fitted only by rounding."""


def exceeds(floor: float, limit: float) -> bool:
    """Whether a lower bound is above `limit` by more than the rounding of its sums (1e-12 of it): then so is
    every figure it bounds."""
    return floor * (1 - 1e-12) > limit


@dataclasses.dataclass(frozen=True)
class ParamChoice:
    layout: Layout
    """Split of the parameter over `tensor` (a parameter dimension, or None)."""
    fsdp_dim: int | None
    """Parameter dimension split over `fsdp` (ZeRO-3), or None for replicated over fsdp."""


@dataclasses.dataclass
class Solution:
    ops: dict[int, Strategy]
    params: dict[str, ParamChoice]
    step_seconds: float
    memory_bytes: float
    breakdown: dict[str, float]
    """Seconds by component: compute, tensor comm, gradient sync, fsdp gathers."""
    comm_bytes: dict[str, float]
    """Bytes sent per device per step, keyed `axes/collective` as `autoshard.analysis` reports them."""
    memory: dict[str, float]
    solver: dict


class Problem:
    def __init__(self, graph: Graph, mesh: dict[str, int], cluster: ClusterSpec, *, remat: str = "none",
                 compute_dtype: str = "float32", fixed_params: dict[str, ParamChoice] | None = None,
                 fixed_layouts: dict[int, Layout] | None = None,
                 fixed_uses: dict[tuple[int, int], Layout] | None = None, objective: str = "time",
                 attention_residuals: bool = True, tensor_weights: bool = False):
        self.g, self.mesh, self.cluster, self.remat, self.dtype = graph, mesh, cluster, remat, compute_dtype
        self._comm_costs: dict[tuple, float] = {}
        self.objective = objective
        """"time" (plan for speed), "bytes" (predict what XLA's partitioner does with a given plan: it follows the
        given shardings and moves as few bytes as it can, whatever the links) or "memory" (the least memory)."""
        self.fixed_layouts = dict(fixed_layouts or {})
        """Values whose layout is given (a plan's activation constraints, a sequence method's output)."""
        self.attention_residuals = attention_residuals
        """False when the runtime's attention keeps its own residuals (ring attention's custom backward saves only
        q, k, v, out and the log-sum-exp, priced by `planner.seq_expert`): nothing the traced dense attention's ops
        (scope `autoshard.attention`) would save is counted."""
        self.tensor_weights = tensor_weights
        """Every weight a contraction reads is split over tensor (the solver picks the dimension): asked for when
        the user fixes a tensor degree that the free solution would leave idle."""
        self.t = mesh["tensor"]
        self.batch_shards = mesh["data"] * mesh["fsdp"] * mesh.get("expert", 1)
        self.b = self.batch_shards * mesh.get("seq", 1)
        """Token split of every activation: the batch over data x fsdp x expert, the sequence over seq (sizes
        divide by it as floats; shapes keep their integer batch split)."""
        self.values = graph.values
        self._op_costs: dict[tuple[int, bool], float] = {}
        self._convs: dict[tuple, tuple[str | None, float]] = {}
        self._floors: dict[str, float] = {}
        shared = lambda key, make: _shared(graph, key, make)  # noqa: E731
        self.passes = shared(("passes",), graph.passes)
        self.expert_params = shared(("expert params",), lambda: {
            p for p, info in graph.params.items() if info.axes and "experts" in info.axes})
        """Parameters with an `experts` dimension: split over `expert`, their gradients not reduced over it."""
        self._live = shared(("live",), self._live_values)
        degree = ("strategies", self.t, self.batch_shards if shared(("batch split",), self._batch_split_matters)
                  else None)
        self.op_strats, unplanned, self.followers = shared(degree, self._strategy_tables)
        self.unplanned: list[str] = list(unplanned)
        self.needs_grad = shared(("grad",), self._grad_values)
        self._lookups = shared(("lookups",), self._lookup_tables)
        self._tied = shared(("tied",), lambda: {v.param for v in self.values.values() if v.param is not None
                                                for c, pos in v.consumers
                                                if self.g.ops[c].primitive == "gather" and pos == 0})
        """Parameters looked up by a gather (embeddings): with another use, a tied one (`moves_weight`)."""
        self._use_edges = shared(("use edges",), self._find_use_edges)
        self.param_choices = {path: self.param_options(path) for path in graph.param_values}
        self._uses = shared(("uses",), lambda: {path: self._count_uses(path) for path in graph.param_values})
        self._kernel_regathers = shared(("kernel regathers",), lambda: {
            path: self._reversed_kernel_uses(path) for path in graph.param_values})
        self._kept_gathers = shared(("kept gathers",), lambda: {
            path: self._input_gradient_uses(path) for path in graph.param_values})
        self._transposed = shared(("transposed kernels",), lambda: {
            path for path in graph.param_values if self._transposed_for_input_gradient(path)})
        """Kernels of three or more dimensions that XLA keeps a transposed copy of for the backward
        (`_transposed_for_input_gradient`)."""
        self._reductions = shared(("reductions",), lambda: {
            path: self._gradient_reductions(path) for path in graph.param_values})
        self._token_params = shared(("token params",), lambda: {
            path for path in graph.param_values if self._reads_tokens(path)})
        """Parameters that compute over the sequence (`_reads_tokens`): only their gradients are reduced over seq."""
        for path, choice in (fixed_params or {}).items():  # a given plan: its layouts, whatever the rules allow
            self.param_choices[path] = [choice]
        self._stacked = stacked_params(graph)
        self._read_as_given(fixed_uses or {})

    def _read_as_given(self, uses: dict[tuple[int, int], Layout]) -> None:
        """Keep only the strategies of an op that read an operand in the layout `uses` gives (op, operand) (the
        runtime converts it first: a sequence method's q, k, v), where one does. A layout `fixed_layouts` gives a
        value that no strategy produces (heads over tensor where a reshape merges them from a dimension tensor
        does not divide) is left free: the prediction can only approximate that program."""
        strats = dict(self.op_strats)  # (the table is shared with other meshes of the same tensor degree)
        for (index, pos), lay in uses.items():
            kept = [st for st in strats[index] if st.ins[pos] == lay]
            strats[index] = kept or strats[index]
        self.op_strats = strats
        self.fixed_layouts = {v: lay for v, lay in self.fixed_layouts.items() if lay in self.value_layout_options(v)}

    def _batch_split_matters(self) -> bool:
        """Whether a value's batch dimension is a model dimension (not a token one) somewhere: only then does the
        batch split change which dimensions `strategies` finds divisible by the tensor degree."""
        return any(v.batch_dim is not None and v.batch_dim not in v.token_dims for v in self.values.values())

    def _strategy_tables(self) -> tuple[dict[int, list[Strategy]], tuple[str, ...], dict[int, int]]:
        """(strategies per op, primitives without a rule, followers): what the tensor degree alone decides, shared
        by every mesh with that degree."""
        op_strats: dict[int, list[Strategy]] = {}
        unplanned: list[str] = []
        for op in self.g.ops:
            strats = strategies(op, self.values, self.t, self._local_shape)
            if self.t > 1 and not has_rule(op, self.values) and op.primitive not in unplanned:
                unplanned.append(op.primitive)
            # ops on constants only (position tables, masks) are tiny: keep them replicated
            op_strats[op.index] = strats if any(o in self._live for o in op.outputs) else strats[:1]
        self.op_strats = op_strats
        followers = {op.index: k for op in self.g.ops if (k := self._follower_operand(op, self._live)) is not None}
        return op_strats, tuple(unplanned), followers

    def _live_values(self) -> set[int]:
        """Values that depend on a parameter or on the batch."""
        live = {v.id for v in self.values.values() if v.param is not None or v.batch_dim is not None}
        live |= set(self.g.inputs)
        for op in self.g.ops:
            if any(i in live for i in op.inputs if i is not None):
                live.update(op.outputs)
        return live

    def _find_use_edges(self) -> dict[str, list[tuple[int, int, int]]]:
        """Parameter -> (view, op, operand) of each use that computes with it: an op reading the parameter or a
        cast or transpose of it (a view), other than the ops that make those views."""
        out: dict[str, list[tuple[int, int, int]]] = {path: [] for path in self.g.param_values}
        for v in self.values.values():
            if v.param is not None:
                out.setdefault(v.param, []).extend(
                    (v.id, c, pos) for c, pos in v.consumers
                    if not all(self.values[o].param == v.param for o in self.g.ops[c].outputs))
        return out

    def _count_uses(self, path: str) -> int:
        """Ops that compute with a parameter, looking through casts and transposes of it."""
        return max(1, len({c for _, c, _ in self._use_edges.get(path, [])}))

    def _reversed_kernel_uses(self, path: str) -> int:
        """Convolutions whose input gradient a parameter's kernel computes: that gradient convolves with the kernel
        reversed, and XLA reverses the ZeRO-3 shard before gathering it, so the forward's gather is not reused and
        the kernel is gathered once more (as compiled on XLA:CPU: 2304 B more `fsdp/all-gather` for the zoo CNN's
        second kernel under fsdp=2, `runs/benchmarks/model_zoo.md`)."""
        return sum(1 for v in self.values.values() if v.param == path for c, pos in v.consumers
                   if pos == 1 and self.g.ops[c].primitive == "conv_general_dilated"
                   and self.g.ops[c].inputs[0] in self.needs_grad)

    def _input_gradient_uses(self, path: str) -> int:
        """Matmuls with a parameter whose other operand needs a gradient (its input gradient reads the weight)."""
        return sum(1 for v in self.values.values() if v.param == path for c, pos in v.consumers
                   if self.g.ops[c].primitive == "dot_general" and self.g.ops[c].inputs[1 - pos] in self.needs_grad)

    def _transposed_for_input_gradient(self, path: str) -> bool:
        """Whether the input gradient of some matmul with this weight reads it transposed: a weight of three or
        more dimensions (a DenseGeneral or einsum projection, `[d, heads, head_dim]`, `[heads, head_dim, d]`) whose
        dimensions left free by the forward matmul do not all come before those it contracts. The input gradient
        contracts the free ones, and XLA lays a >2-D operand out with its contracted dimensions first
        (DotDecomposer): it copies the weight transposed at the start of the step and keeps the copy until the
        backward reads it (seen on every such kernel of the zoo's and the held-out attention models; a 2-D kernel
        is read transposed in place)."""
        for v in self.values.values():
            if v.param != path or len(v.shape) < 3:
                continue
            for c, pos in v.consumers:
                op = self.g.ops[c]
                if op.primitive != "dot_general" or op.inputs[1 - pos] not in self.needs_grad:
                    continue
                (lc, rc), (lb, rb) = op.params["dimension_numbers"]
                contracted, batch = (lc, lb) if pos == 0 else (rc, rb)
                free = [d for d in range(len(v.shape)) if d not in contracted and d not in batch]
                if (len(free) > 1 or len(contracted) > 1) and free and contracted and max(free) > min(contracted):
                    return True
        return False

    def _gradient_reductions(self, path: str) -> int:
        """How many all-reduces over the batch axes a parameter's gradient takes: for a table both looked up and
        computed with (a tied embedding), one per lookup and one for the dense uses (XLA reduces each lookup's
        scatter-added gradient apart and adds them after: the zoo's GQA decoder, one lookup, two; the
        encoder-decoder of tests/test_attention_rewrite.py, inputs and context looked up, three), else one (dense
        uses' gradients are summed first)."""
        lookups = {c for _, c, pos in self._use_edges.get(path, []) if self.g.ops[c].primitive == "gather"
                   and pos == 0}
        dense = {c for _, c, _ in self._use_edges.get(path, [])} - lookups
        return len(lookups) + 1 if lookups and dense else 1

    def _reads_tokens(self, path: str) -> bool:
        """Whether the parameter computes over the sequence: the first ops that combine it (or what is computed
        from it alone: a broadcast scale) with the batch have an output with token dimensions. Only then is its
        gradient a partial sum over seq. Keys and values projected from learned memory slots broadcast over the
        batch are whole over seq; their gradients come from dK and dV, already all-reduced over seq
        (`seq_expert.whole_kv_bytes`), and XLA reduces them no further (the encoder-decoder of
        tests/test_attention_rewrite.py at data=4,seq=2)."""
        todo = [c for _, c, _ in self._use_edges.get(path, [])]
        seen: set[int] = set()
        while todo:
            c = todo.pop()
            if c in seen:
                continue
            seen.add(c)
            for o in self.g.ops[c].outputs:
                v = self.values[o]
                if v.token_dims:
                    return True
                if v.batch_dim is None:  # still the parameter's alone: follow it to where it meets the batch
                    todo += [k for k, _ in v.consumers]
        return False

    def _lookup_tables(self) -> dict[str, tuple[list[int], set[int]]]:
        """Parameters used only as the table of gathers -> the gathers' outputs, and the indexed dimensions."""
        out: dict[str, tuple[list[int], set[int]]] = {}
        for path in self.g.param_values:
            uses = [(self.g.ops[c], pos, v) for v in self.values.values() if v.param == path
                    for c, pos in v.consumers]
            if uses and all(op.primitive == "gather" and pos == 0 for op, pos, _ in uses):
                indexed = {v.param_dims[d] for op, _, v in uses
                           for d in op.params["dimension_numbers"].collapsed_slice_dims}
                out[path] = ([op.outputs[0] for op, _, _ in uses], indexed)
        return out

    def _grad_values(self) -> set[int]:
        """Values whose cotangent the backward pass computes (they depend on a parameter)."""
        grad = {v.id for v in self.values.values() if v.param is not None}
        for op in self.g.ops:
            if any(i in grad for i in op.inputs if i is not None):
                grad.update(o for o in op.outputs if dtype_kind(self.values[o].dtype) == "float")
        return grad

    def _follower_operand(self, op, live: set[int]) -> int | None:
        """The operand whose layout alone decides this op's strategy (an elementwise/reshape chain link), if any.

        Followers get no variables of their own (Alpa's graph simplification): their output layout is a function
        of that operand's layout, they never need a conversion of it in either direction, and their other operands
        are constants (free to slice, no gradient).
        """
        strats = self.op_strats[op.index]
        live_ids = {i for i in op.inputs if i is not None and i in live}
        if op.primitive == BOUNDARY:  # where a layout may be imposed: keep it a decision of its own
            return None
        if len(strats) < 2 or len(live_ids) != 1 or len(op.outputs) != 1:
            return None
        vid = live_ids.pop()
        positions = [k for k, i in enumerate(op.inputs) if i == vid]
        k = positions[0]
        reqs = [st.ins[k] for st in strats]
        if len(set(reqs)) != len(reqs):
            return None
        if any(st.ins[j] != st.ins[k] or st.cots[j] != st.ins[k] for st in strats for j in positions):
            return None
        return k

    # -- shapes and sizes ----------------------------------------------------------------------------------------
    def _local_shape(self, v: Value) -> tuple[int, ...]:
        if v.batch_dim is None:
            return v.shape
        s = list(v.shape)
        s[v.batch_dim] //= self.batch_shards
        return tuple(s)

    def param_options(self, path: str) -> list[ParamChoice]:
        """The choices a parameter has on this mesh: its tensor split and ZeRO-3 (fsdp) dimension."""
        info = self.g.params[path]
        skip = {0} if self.g.layers > 1 and info.shape and info.shape[0] == self.g.layers and info.axes \
            and info.axes[0] == "layers" else set()
        if self.g.layers > 1 and info.shape and info.shape[0] == self.g.layers and not info.axes:
            skip = {0}  # never split the layer-stack axis: the scan would gather the whole stack
        if self.mesh.get("expert", 1) > 1 and path in self.expert_params:
            skip |= {info.axes.index("experts")}  # the expert axis owns it
        dims = [d for d in range(len(info.shape)) if d not in skip]
        # vectors (norm scales, biases) stay whole over tensor: splitting them saves nothing worth a collective
        t_opts: list[Layout] = [None] + [d for d in dims if self.t > 1 and info.shape[d] % self.t == 0
                                         and len(dims) >= 2]
        if self.tensor_weights and len(t_opts) > 1 and self._contracted(path):
            t_opts = t_opts[1:]
        f = self.mesh["fsdp"]
        # measured: a matmul weight that could be split over tensor but is left whole beside it has its ZeRO-3
        # shard moved through the tensor axis (collective-permutes, its gradient all-reduced over fsdp), not
        # gathered as priced (the zoo's GQA decoder at fsdp=2,seq=2,tensor=2: communication -24.8%): no ZeRO-3 then
        whole_over_tensor = self.t > 1 and len(t_opts) > 1 and self._contracted(path)
        out = []
        for lay in t_opts:
            out.append(ParamChoice(lay, None))
            if f > 1 and not (lay is None and whole_over_tensor):
                free = sorted((d for d in dims if d != lay and info.shape[d] % f == 0 and not (
                    # measured: with tensor > 1, XLA re-lays a table sharded along its looked-up rows (permutes
                    # and all-reduces); along a row's length it exchanges the lookups (all-to-all), as priced
                    self.t > 1 and path in self._lookups and d in self._lookups[path][1])),
                              key=lambda d: (-(info.shape[d] // (self.t if d == lay else 1)), d))
                if free:
                    out.append(ParamChoice(lay, free[0]))
        return out

    def whole_weights(self, params: dict[str, ParamChoice]) -> list[str]:
        """The matmul weights a solution leaves whole over tensor though they could be split over it."""
        return [path for path, c in params.items() if c.layout is None and self._contracted(path)
                and any(o.layout is not None for o in self.param_choices[path])]

    def _contracted(self, path: str) -> bool:
        """Whether a contraction (matmul, convolution) reads the parameter, through casts and transposes of it."""
        return any(self.g.ops[c].primitive in CONTRACTIONS for _, c, _ in self._use_edges.get(path, []))

    def value_layout_options(self, vid: int) -> list[Layout]:
        v = self.values[vid]
        if v.param is not None:
            return sorted({self._slice_layout(v, c.layout) for c in self.param_choices[v.param]}, key=str)
        if v.producer is None:
            return [None]
        k = self.g.ops[v.producer].outputs.index(vid)
        return sorted({s.outs[k] for s in self.op_strats[v.producer]}, key=str)

    @staticmethod
    def _slice_layout(v: Value, param_layout: Layout) -> Layout:
        if param_layout is None:
            return None
        return v.param_dims.index(param_layout) if param_layout in v.param_dims else None

    def _count(self, op_index: int) -> int:
        return self.g.ops[op_index].count

    def _forward_count(self, vid: int, op_index: int) -> int:
        """Executions of the forward conversion of `vid` for op `op_index`: twice per layer under full remat when
        the recompute needs it (XLA drops the rest of the recomputed forward, e.g. the layer's last all-reduce)."""
        again = self.remat == "full" and any(c in self._recomputed for c, _ in self.values[vid].consumers)
        return self._count(op_index) * (2 if again else 1)

    def _regathers(self, vid: int, op_index: int, kind: str | None) -> bool:
        """Whether the backward gathers this dot operand again: the weight gradient needs it in the layout the
        forward gathered it to, and XLA keeps the ungathered value, not the gathered one. Not a convolution's:
        its kernel gradient reads a transposed copy (`conv_copies`) XLA makes of the gathered input, once (as
        compiled on XLA:CPU: the zoo CNN's pooled activations gathered over tensor once, 4 KiB, not twice)."""
        op = self.g.ops[op_index]
        return (kind == "all-gather" and op.primitive == "dot_general" and vid in self.needs_grad
                and any(i is not None and i != vid and self.values[i].param is not None for i in op.inputs))

    def moves_weight(self, vid: int, op_index: int, src: Layout, dst: Layout) -> bool:
        """Whether XLA's partitioner gathers weight `vid` whole over tensor for the matmul `op_index` instead of
        computing where it lies. It does for a tied embedding (a weight both looked up and multiplied) split on
        its model dimension: the lookup keeps that split, and `attend` gathers the weight rather than leave the
        whole logits as a partial sum (4 KiB gathered for 16 KiB of all-reduce in the zoo's GQA decoder). Other
        weights stay where they lie (allowing every weight to move, the byte count gathers them all, where XLA,
        choosing dot by dot from the layouts it propagated, all-reduces). Only in the byte-counting objective
        that predicts what XLA compiles for a given plan: when planning, a weight is used where it lies."""
        return (self.objective == "bytes" and isinstance(src, int) and dst is None
                and self.g.ops[op_index].primitive == "dot_general" and self.values[vid].param in self._tied)

    def _cotangent_uses(self, vid: int) -> int:
        """Backward ops that read the cotangent of `vid`: each operand gradient of the matmul that made it (XLA
        converts it for each of them, the two transposed products wanting different layouts), else one."""
        producer = self.values[vid].producer
        if producer is None or self.g.ops[producer].primitive not in CONTRACTIONS:
            return 1
        return max(1, sum(1 for i in self.g.ops[producer].inputs if i is not None and i in self.needs_grad))

    @functools.cached_property
    def _recomputed(self) -> set[int]:
        """Layer ops that full remat runs again in the backward: those the layer's saved values depend on (the
        layer's output is the next layer's stored input, not recomputed)."""
        return _shared(self.g, ("recomputed", type(self), self.attention_residuals), self._recomputed_ops)

    def _recomputed_ops(self) -> set[int]:
        outs = {cout for cout, _ in self.g.carries}
        ops, stack = set(), [vid for vid in self.saved() if self.values[vid].producer is not None and vid not in outs]
        while stack:
            v = self.values[stack.pop()]
            if v.producer is None or v.producer in ops or not self.g.ops[v.producer].in_layer:
                continue
            ops.add(v.producer)
            stack += [i for i in self.g.ops[v.producer].inputs if i is not None and i in self._live]
        return ops

    # -- costs ---------------------------------------------------------------------------------------------------
    def comm_seconds(self, kind: str, operand_bytes: float, axes: tuple[str, ...]) -> float:
        """Cost of one collective: seconds, or (objective="bytes") bytes sent. Each collective also pays a tiny
        fixed charge, so that between equal costs the plan with fewer collectives wins (as XLA's would)."""
        key = (kind, operand_bytes, tuple(axes))
        cost = self._comm_costs.get(key)
        if cost is None:  # memoised: the same few collectives are priced for every op, strategy and use
            if self.objective == "bytes":
                cost = bytes_sent(kind, operand_bytes, math.prod(self.mesh[a] for a in axes)) + 1.0
            else:
                cost = axis_collective_time(kind, operand_bytes, self.mesh, axes, self.cluster) + 1e-9
            self._comm_costs[key] = cost
        return cost

    def _conv(self, src: Layout, dst: Layout, v: Value) -> tuple[str | None, float]:
        """(collective, operand bytes) to turn layout src into dst over tensor (memoised: asked per use and
        strategy)."""
        key = (src, dst, v.id)
        hit = self._convs.get(key)
        if hit is None:
            kind, _ = conversion(src, dst, 1.0, self.t)
            if kind is None:
                hit = None, 0.0
            else:  # (in the backend's collective dtype: XLA:CPU moves bfloat16 activations as float32)
                whole = local_nbytes(v, self.b) * self.cluster.wire_itemsize(v.dtype) / itemsize(v.dtype)
                hit = kind, whole / self.t if kind in ("all-gather", "all-to-all") else whole
            self._convs[key] = hit
        return hit

    def use_allowed(self, vid: int, op_index: int, src: Layout, dst: Layout) -> bool:
        """Whether a use may read value `vid` (in layout `src`) as operand layout `dst`: a weight is used where it
        lies (the partitioner computes where the weights are; it does not move them, but see `moves_weight`), and a
        whole value cannot stand in for a partial sum (it would count n times)."""
        if self.values[vid].param is not None and dst != src and not self.moves_weight(vid, op_index, src, dst):
            return False
        return not (src is None and dst == PARTIAL)

    def use_conversions(self, vid: int, src: Layout, op_index: int, pos: int, s: Strategy
                        ) -> list[tuple[tuple, str, float, int]]:
        """The tensor conversions one use of value `vid` (layout `src`, operand `pos` of op `op_index` under
        strategy `s`) pays, as (key, collective, operand bytes, executions): the forward conversion (once per value,
        layout and forward count, whichever uses need it: XLA converts a value once), a dot operand's re-gather
        for its weight gradient, and the backward conversion of its cotangent per use and operand gradient. The one
        statement of these rules: the integer program, `evaluate` and the pipeline's stage costs all read it."""
        v, out = self.values[vid], []
        want = s.ins[pos]
        kind, nb = self._conv(src, want, v)
        if kind:
            fc = self._forward_count(vid, op_index)
            out.append((("f", vid, src, want, fc), kind, nb, fc))
            if self._regathers(vid, op_index, kind):
                count = self._count(op_index)
                out.append((("g", vid, src, want, count), kind, nb, count))
        if vid in self.needs_grad:
            kind, nb = self._conv(s.cots[pos], None if src == PARTIAL else src, v)
            if kind:
                count = self._count(op_index)
                out.append((("b", vid, src, s.cots[pos], count, op_index, pos), kind, nb,
                            count * self._cotangent_uses(vid)))
        return out

    def carry_conversions(self, src: Layout, dst: Layout, v: Value) -> list[tuple[str, float, int]]:
        """(collective, operand bytes, executions) of a layer output in layout `src` feeding the next layer's input
        in layout `dst`: the conversion forward and its cotangent's back, once per layer."""
        out = []
        for a, b in ((src, dst), (dst if dst != PARTIAL else None, src if src != PARTIAL else None)):
            kind, nb = self._conv(a, b, v)
            if kind:
                out.append((kind, nb, self.g.layers))
        return out

    def value_memory_items(self) -> list[tuple[str, int, float]]:
        """(breakdown entry, value, copies) of the values the step's memory holds: each residual as many times as
        the layers store it, and the backward's working set. What `evaluate`, the integer program's memory
        constraint and `memory_floor` all count (with the parameters, the batch and the convolution copies).

        The working set of a layer scan's backward without remat is counted: one layer's residuals once more (the
        backward of a layer makes as many bytes as the residuals it reads, their cotangents; measured against the
        compiled steps of tests/test_predictions.py and runs/benchmarks/memory_accuracy.md, docs/cost-model.md).
        Under full remat and in straight-line code it is `WORKING_SET` x one layer's (one block's) matmul outputs.
        """
        residuals = self.residuals()
        items = [("activations", vid, n) for vid, n in residuals.items()]
        if self.remat != "full" and self.g.stack == "scan" and self.g.layers > 1:
            return items + [("backward working set", vid, 1) for vid, n in residuals.items() if n >= self.g.layers]
        return items + [("backward working set", vid, WORKING_SET) for vid in self.working_set()]

    def op_cost(self, op_index: int, s: Strategy) -> float:
        """Forward + backward (about twice the forward) seconds of one op on one device.

        Matmuls by roofline; reductions, gathers and layout changes by memory traffic; elementwise ops are free,
        as XLA fuses them into their neighbours. It depends on the strategy only through whether it splits the
        work, so it is priced once per op and kind.
        """
        key = (op_index, s.split)
        cost = self._op_costs.get(key)
        if cost is None:
            cost = self._op_costs[key] = self._price_op(self.g.ops[op_index], s.split)
        return cost

    def _price_op(self, op, split: bool) -> float:
        if op.primitive in FUSED or op.primitive in SOURCES:
            return 0.0
        touches_batch = any(self.values[i].batch_dim is not None for i in op.inputs + op.outputs if i is not None)
        div = (self.b if touches_batch else 1) * (self.t if split else 1)
        io = sum(local_nbytes(self.values[i], self.b) for i in op.inputs + op.outputs if i is not None)
        io /= self.t if split else 1
        flops = op.flops / div if op.primitive in CONTRACTIONS else 0.0
        passes = self.passes + (1.0 if self.remat == "full" and op.in_layer else 0.0)  # remat: a 2nd forward
        if self.objective == "bytes":  # splitting work is still better than repeating it, all else equal
            return 1e-9 * passes * op.count * (flops + io)
        return passes * op.count * self.cluster.roofline_seconds(flops, io, self.dtype)

    def param_sync(self, path: str, c: ParamChoice) -> list[tuple[str, tuple[str, ...], float, int]]:
        """(collective, axes, operand bytes, executions) that keep a parameter's gradient and shards in step.

        ZeRO-3 as XLA compiles it: a stacked layer weight is gathered in the forward and again in the backward
        loop, a weight outside the stack once (per use: a tied embedding twice). A table only looked up (an
        embedding) and split along a looked-up row's length is either gathered like any weight or, where that is
        cheaper, left in place while the lookups move to its owners (`_exchanges_lookups`).
        A weight computed with in a dtype the backend widens (bfloat16 on XLA:CPU) has its gradient all-reduced
        whole over fsdp and sliced afterwards (`_reduced_whole`).
        """
        nbytes = self.fsdp_whole_bytes(path, c)
        # seq splits tokens in a dimension of its own: XLA reduces gradients over it in all-reduces of their own,
        # as many as over the batch axes (a tied embedding's two: measured on the zoo's GQA decoder under seq=2),
        # for a weight that computes with the sequence (`_token_params`)
        seq = [("all-reduce", ("seq",), nbytes / (self.mesh["fsdp"] if c.fsdp_dim is not None else 1),
                self._reductions[path])] if self.mesh.get("seq", 1) > 1 and path in self._token_params else []
        # expert doubles as data parallelism outside the experts: one batch dimension with data (and fsdp)
        rep = ("data", "expert") if path not in self.expert_params else ("data",)
        batch_axes = tuple(a for a in ("data", "fsdp", "expert") if self.mesh.get(a, 1) > 1
                           and (a != "expert" or path not in self.expert_params))
        if not batch_axes:
            return seq
        if c.fsdp_dim is None:
            return [("all-reduce", batch_axes, nbytes, self._reductions[path])] + seq
        rep = tuple(a for a in rep if self.mesh.get(a, 1) > 1)
        f = self.mesh["fsdp"]
        out = []
        if self._exchanges_lookups(path, c, nbytes, tie=not rep):
            for vid in self._lookups[path][0]:
                out.append(("all-to-all", ("fsdp",), local_nbytes(self.values[vid], self.b), 2))
            if rep:  # (as compiled: over data alone; beside tensor, over data x fsdp)
                axes = tuple(sorted(rep + ("fsdp",), key=AXES.index)) if self.t > 1 else rep
                out.append(("all-reduce", axes, nbytes / f, 1))
            return out + seq
        uses = self._uses[path]  # XLA gathers a weight for each use, and reduces each use's gradient
        gathers = uses * 2 if path in self._stacked else uses + self._kernel_regathers[path]
        whole = min(uses, self._reduced_whole(path))
        out += [("all-gather", ("fsdp",), nbytes / f, gathers), ("reduce-scatter", ("fsdp",), nbytes, uses - whole),
                ("all-reduce", ("fsdp",), nbytes, whole)]
        out = [x for x in out if x[3] > 0]
        if rep and seq and path not in self._lookups:  # (as compiled: the shard's gradient over data and seq at once)
            return out + [("all-reduce", tuple(sorted(rep + ("seq",), key=AXES.index)), nbytes / f,
                           self._reductions[path])]
        if rep and seq:  # a gathered table's: over data, then over seq twice (as compiled)
            seq = [(kind, axes, b, 2 * n) for kind, axes, b, n in seq]
        if rep:
            out.append(("all-reduce", rep, nbytes / f, self._reductions[path]))
        return out + seq

    def _exchanges_lookups(self, path: str, c: ParamChoice, nbytes: float, tie: bool) -> bool:
        """Whether XLA exchanges a ZeRO-3 table's lookups (an all-to-all each way) instead of gathering the table:
        when the table is only looked up, split along a row's length, and each lookup on a device is smaller than
        the whole table (the cheaper of the two, as XLA's partitioner weighs them); at equal size, when fsdp is
        the only batch axis (`tie`). Compiled: gpt-tiny at sequence 64 (lookups half the table) exchanges them at
        data=2,fsdp=4 and fsdp=8, at sequence 256 (twice the table) gathers the table at both, at sequence 128
        (equal) exchanges at fsdp=8 and gathers at data=2,fsdp=4; the zoo encoder (a quarter) exchanges. Beside
        tensor the lookups are exchanged (the zoo encoder at data=2,fsdp=2,tensor=2, lookups the table's size)."""
        if path not in self._lookups or c.fsdp_dim in self._lookups[path][1]:
            return False
        if self.t > 1:
            return True
        # (weighed over the batch axes' split alone: under seq, gpt-tiny's lookups half the table were gathered)
        sizes = [local_nbytes(self.values[vid], self.batch_shards) for vid in self._lookups[path][0]]
        return all(size < nbytes or (tie and size == nbytes) for size in sizes)

    def _reduced_whole(self, path: str) -> int:
        """How many of a weight's uses have their gradient reduced over fsdp as a whole all-reduce rather than a
        reduce-scatter: those computing with the weight cast to a dtype the backend widens (`collective_dtypes`).
        On XLA:CPU that gradient is computed in float32 and cast back; XLA all-reduces it whole and takes the
        shard only after the cast (after the backward loop for a stacked weight), which it does not fuse into a
        reduce-scatter (compiled: gpt-tiny:dtype=bfloat16's layer weights and head at fsdp=8, data=4,fsdp=2,
        data=2,fsdp=4; a table's lookups, cast after the lookup, keep the reduce-scatter, and so do float32
        models)."""
        views = {(vid, c) for vid, c, _ in self._use_edges.get(path, [])}
        return sum(1 for vid, _ in views if dtype_name(self.values[vid].dtype) in self.cluster.collective_dtypes)

    def batch_reductions(self) -> list[tuple[tuple[str, ...], int, int]]:
        """(axes, value, executions) of the all-reduces over the batch axes that reductions across the batch need
        (BatchNorm's statistics, a mean over examples): one in the forward, and one more in the backward when the
        result needs a gradient (its broadcast back over the batch transposes to a sum over it); each moves the
        result as its layout leaves it on a device."""
        axes = tuple(a for a in ("data", "fsdp", "expert") if self.mesh.get(a, 1) > 1)
        if not axes:
            return []
        out = []
        for op in self.g.ops:
            src = self.values[op.inputs[0]] if op.inputs and op.inputs[0] is not None else None
            if (src is None or src.batch_dim is None or not op.primitive.startswith("reduce_")
                    or src.batch_dim not in tuple(op.params.get("axes", ()))):
                continue
            out += [(axes, vid, self._count(op.index) * (2 if vid in self.needs_grad else 1)) for vid in op.outputs
                    if vid in self._live and dtype_kind(self.values[vid].dtype) == "float"]
        return out

    def expert_split(self, path: str) -> int:
        """How many ways the parameter is split over `expert` (its expert axis), else 1."""
        return self.mesh.get("expert", 1) if path in self.expert_params else 1

    def param_cost(self, path: str, c: ParamChoice) -> tuple[float, dict[tuple, float]]:
        """Seconds of a parameter's synchronisation: the part it pays alone (bandwidth), and the fixed part per
        (collective, axes), which XLA's combiner pays once for all parameters that sync the same way."""
        own: float = 0.0
        shared: dict[tuple, float] = {}
        for (kind, axes, b, n), copies in Counter(self.param_sync(path, c)).items():  # (a loop's blocks: alike)
            fixed = self.comm_seconds(kind, 0.0 if self.objective == "bytes" else 1.0, axes)
            own += copies * n * (self.comm_seconds(kind, b, axes) - fixed)
            shared[(kind, axes, n)] = n * fixed
        return own, shared

    def param_memory(self, path: str, c: ParamChoice) -> float:
        info = self.g.params[path]
        shards = (self.t if c.layout is not None else 1) * (self.mesh["fsdp"] if c.fsdp_dim is not None else 1)
        shards *= self.expert_split(path)
        return info.size * itemsize(info.dtype) / shards * (2 + optimizer_copies(self.g))

    def fsdp_whole_bytes(self, path: str, c: ParamChoice) -> float:
        """Bytes of a parameter under choice `c` split over tensor (and expert), whole over fsdp: what a ZeRO-3
        gather makes and a gradient reduction moves."""
        info = self.g.params[path]
        return info.size * itemsize(info.dtype) / (self.t if c.layout is not None else 1) / self.expert_split(path)

    def kept_weight_memory(self, path: str, c: ParamChoice) -> float:
        """Bytes of a weight's copies that straight-line code keeps from the forward to the backward, for the input
        gradients of its matmuls: a ZeRO-3 weight's gathered copy per such use (each matmul use whose other operand
        needs a gradient reads the gathered weight again, and XLA keeps the forward's gather rather than gather
        once more; `param_sync` counts one gather per use), else one transposed copy of a kernel read transposed
        there (`_transposed_for_input_gradient`; a kept gather is already that copy). A stacked weight is gathered
        and copied again in the backward loop, a convolution's kernel gathered again reversed
        (`_reversed_kernel_uses`), a table only looked up never gathered: none of them is kept."""
        if path in self._stacked:
            return 0.0
        if c.fsdp_dim is not None and self.mesh["fsdp"] > 1 and not (
                path in self._lookups and c.fsdp_dim not in self._lookups[path][1]) and self._kept_gathers[path]:
            return self.fsdp_whole_bytes(path, c) * self._kept_gathers[path]
        return self.fsdp_whole_bytes(path, c) if path in self._transposed else 0.0

    def grad_memory(self, path: str, c: ParamChoice) -> float:
        """The gradient's share of `param_memory` (one copy of the parameter's shard)."""
        return self.param_memory(path, c) / (2 + optimizer_copies(self.g))

    def reusable_grad_memory(self, path: str, c: ParamChoice) -> float:
        """The part of `grad_memory` the backward writes after it has freed residuals (`_first_gradients`)."""
        return self.grad_memory(path, c) * (1 - self._first_gradients[path])

    @property
    def grads_reuse_activations(self) -> bool:
        """Whether gradients are written into memory the backward has freed. Straight-line code (no layer scan)
        produces each gradient as its layer's backward runs, while the residuals that layer read are freed: the
        peak holds at most max(activations, gradients) of the two, not both (measured on the zoo's unrolled
        models). A scan's backward keeps its stacked gradient accumulator and its stacked residuals for the
        whole loop: both at once."""
        return self.g.stack != "scan"

    def residuals(self) -> dict[int, int]:
        """Values stored for the backward pass -> how many copies (the layer count inside the stack); the table is
        shared by every problem of the graph with the same remat (read-only)."""
        return _shared(self.g, ("residuals", type(self), self.remat, self.attention_residuals), self._residuals)

    def _residuals(self) -> dict[int, int]:
        keep = self._stored(self.saved())
        if self.remat == "full" and self.g.layers > 1:
            per_layer = {i: 1 for i, n in keep.items() if n >= self.g.layers}
            keep = {i: n for i, n in keep.items() if n < self.g.layers}
            keep.update(per_layer)  # one layer's residuals live at a time during recompute
            for _, cin in self.g.carries:
                keep[cin] = keep.get(cin, 0) + self.g.layers
        return keep

    def saved(self) -> dict[int, int]:
        """Values JAX's linearization keeps for the backward pass -> how many copies (the layer count in the stack).

        JAX's product rule: an operand of a product (dot_general, convolution, mul, div) is saved only when its
        partner carries a tangent (a scaling by a constant saves nothing, a matmul with a frozen input saves only
        what the weight's gradient needs); a power (`integer_pow`, `pow`) saves its derivative, a value the size
        of its output; transcendental functions save their output. Parameters are counted with the state, the
        batch with the inputs. Checked against the compiled scan's stacked residuals (docs/cost-model.md).
        """
        keep: dict[int, int] = {}

        def save(vid, count):
            v = self.values[vid]
            if vid in self._live and v.param is None and v.shape and vid not in self.g.inputs:
                keep[vid] = max(keep.get(vid, 0), count)

        for op in self.g.ops:
            if not self.attention_residuals and "autoshard.attention" in op.scope:
                continue
            ins = [i for i in op.inputs if i is not None]
            tangent = [i in self.needs_grad for i in ins]
            if not any(tangent):
                continue
            if op.primitive in ("integer_pow", "pow", "square"):
                for o in op.outputs:  # the derivative, n * x ** (n - 1): as large as the output
                    save(o, op.count)
            elif op.primitive in PRODUCT_OPS:
                for k, i in enumerate(ins):
                    if any(t for j, t in enumerate(tangent) if j != k):  # the partner's tangent needs this operand
                        save(i, op.count)
            elif op.primitive in SAVES_OUTPUT:
                for o in op.outputs:
                    save(o, op.count)
        return keep

    def _stored(self, keep: dict[int, int]) -> dict[int, int]:
        """What XLA stores for the residuals `keep`: outside the layer scan a cheap elementwise result is fused into
        its backward consumer and recomputed there, so the values it is computed from (through cheap elementwise
        ops) are stored instead. Inside the scan, the loop's outputs are what JAX's linearization saved: kept, unless
        the layer is rematerialised (its recompute and its backward are then one loop body that XLA fuses)."""
        stored: dict[int, int] = {}
        scan_saves = self.remat != "full"
        for vid, n in keep.items():
            producer = self.values[vid].producer
            if scan_saves and producer is not None and self.g.ops[producer].in_layer:
                stored[vid] = max(stored.get(vid, 0), n)
                continue
            stack, seen = [vid], set()
            while stack:
                v = stack.pop()
                if v in seen:
                    continue
                seen.add(v)
                val = self.values[v]
                op = self.g.ops[val.producer] if val.producer is not None else None
                if op is None or (scan_saves and op.in_layer) or self._stores_output(op):
                    if v in self._live and val.param is None and val.shape and v not in self.g.inputs:
                        stored[v] = max(stored.get(v, 0), n)
                    continue
                stack += [i for i in op.inputs if i is not None and i in self._live]
        return stored

    def _stores_output(self, op: Op) -> bool:
        """Whether XLA stores this op's output for the backward rather than recompute it there from its inputs:
        anything but cheap elementwise work, and a cast to a narrower dtype (float32 -> bfloat16: recomputing it
        would keep the wider value; gpt-tiny:dtype=bfloat16's softmax under full remat keeps the bfloat16
        probabilities, not the float32 quotient)."""
        if op.primitive not in FUSED or op.primitive in EXPENSIVE:
            return True
        return (op.primitive == "convert_element_type" and op.inputs[0] is not None
                and itemsize(self.values[op.outputs[0]].dtype) < itemsize(self.values[op.inputs[0]].dtype))

    def working_set(self) -> list[int]:
        """Matmul outputs of one layer (of the whole graph when there is no layer stack): what the backward's
        working set is made of, on top of the residuals (`WORKING_SET` bytes each); shared, read-only."""
        return _shared(self.g, ("working set", type(self), self.attention_residuals), self._working_set)

    def _working_set(self) -> list[int]:
        body = [op for op in self.g.ops if op.in_layer] or self._largest_block()
        if not self.attention_residuals:  # a sequence method's attention: its own transient (planner.seq_expert)
            body = [op for op in body if "autoshard.attention" not in op.scope]
        return [o for op in body if op.primitive in CONTRACTIONS for o in op.outputs
                if o in self._live and dtype_kind(self.values[o].dtype) == "float"]

    def _largest_block(self) -> list[Op]:
        """The ops of the largest numbered block (`_numbered_blocks`) of straight-line code that is not a layer
        stack (blocks that differ, a Linen loss function): the backward runs one block at a time, so its working
        set is one block's, as a stack's is one layer's. With no numbered blocks, every op."""
        size = lambda ops: sum(math.prod(self.values[o].shape) for op in ops  # noqa: E731
                               if op.primitive in CONTRACTIONS for o in op.outputs)
        return max(self._numbered_blocks, key=size, default=self.g.ops)

    @property
    def _numbered_blocks(self) -> list[list[Op]]:
        return _shared(self.g, ("numbered blocks",), self._find_numbered_blocks)

    def _find_numbered_blocks(self) -> list[list[Op]]:
        """The ops of each numbered block (`blocks/3/...`, `layers_3/...`, at least two numbered alike), in
        program order: an op belongs to the block whose parameter it last read (attention's products read none)."""
        numbered: dict[str, tuple[str, str, int]] = {}
        for path in self.g.params:
            m = BLOCK_INDEX.search(path)
            if m is not None and m.start() > 0:
                numbered[path] = (path[:m.start()], m.group(1), int(m.group(2)))
        families = Counter(key[:2] for key in set(numbered.values()))
        groups: dict[tuple, list[Op]] = {}
        current = None
        for op in self.g.ops:
            params = [self.values[i].param for i in op.inputs if i is not None and self.values[i].param is not None]
            if params:
                key = numbered.get(params[0])
                current = key if key is not None and families[key[:2]] > 1 else None
            if current is not None:
                groups.setdefault(current, []).append(op)
        return list(groups.values())

    @property
    def _first_gradients(self) -> dict[str, float]:
        return _shared(self.g, ("first gradients",), self._find_first_gradients)

    def _find_first_gradients(self) -> dict[str, float]:
        """Per parameter, the share of its gradient the backward writes before it frees any residual: that of the
        last block (one layer of a folded loop's stacked weights, the last numbered block's, else the last op
        that reads a weight) and of every weight read after it. Only the rest can be written over freed
        activations (`grads_reuse_activations`)."""
        reads = [op.index for op in self.g.ops if any(i is not None and self.values[i].param is not None
                                                        for i in op.inputs)]
        if any(op.in_layer for op in self.g.ops):
            start = min(op.index for op in self.g.ops if op.in_layer)
        elif self._numbered_blocks:
            start = self._numbered_blocks[-1][0].index
        else:
            start = max(reads, default=0)
        first: dict[str, int] = {}
        for v in self.values.values():
            if v.param is not None:
                for c, _ in v.consumers:
                    first[v.param] = min(first.get(v.param, c), c)
        return {path: (1 / self.g.layers if path in self.g.blocks else 1.0) if first.get(path, -1) >= start else 0.0
                for path in self.g.params}

    def conv_copies(self) -> list[tuple[int, ...]]:
        """Per convolution whose kernel trains, the values XLA lays out anew for the kernel's gradient: it computes
        that gradient as a convolution over the batch, with a transposed copy of the convolution's input and one of
        its output's cotangent (as measured on XLA:CPU: `f32[3,16,16,2]` beside `[2,16,16,3]` images,
        `runs/benchmarks/model_zoo.md`). Each pair lives only while its own kernel gradient is computed, so the
        step's memory holds the largest pair (`transient_memory`), not their sum. Shared, read-only."""
        return _shared(self.g, ("conv copies",), self._conv_copies)

    def _conv_copies(self) -> list[tuple[int, ...]]:
        return [(op.inputs[0],) + tuple(op.outputs) for op in self.g.ops if op.primitive == "conv_general_dilated"
                and op.inputs[1] in self.needs_grad and op.inputs[0] is not None]

    def transient_memory(self, size: Callable[[int], float]) -> float:
        """The largest of the convolutions' layout copies (`conv_copies`), each value of `size(value)` bytes."""
        return max((sum(size(v) for v in group) for group in self.conv_copies()), default=0.0)

    def batch_memory(self) -> float:
        """The device's share of the batch the step reads (an argument of the compiled step, like the weights)."""
        return sum(local_nbytes(self.values[vid], self.b) for vid in self.g.inputs if self.values[vid].shape)

    def value_memory(self, vid: int, layout: Layout) -> float:
        return local_nbytes(self.values[vid], self.b) / (self.t if isinstance(layout, int) else 1)

    # -- lower bounds (what lets the search skip a mesh without solving it) ---------------------------------------
    def compute_floor(self) -> float:
        """A lower bound on the step time of every assignment (`evaluate`'s `step_seconds`): each op at its cheapest
        strategy. The argument: `evaluate` adds to the chosen strategies' `op_cost` only terms that are not
        negative (conversions, gradient sync and gathers, batch reductions), and no op costs less than its cheapest
        strategy."""
        if "compute" not in self._floors:
            self._floors["compute"] = sum(min(self.op_cost(i, s) for s in strats)
                                          for i, strats in self.op_strats.items())
        return self._floors["compute"]

    def sync_floor(self) -> float:
        """A lower bound on the gradient sync and fsdp gathers of every assignment: each parameter at the choice
        whose own part (`param_cost`) is cheapest; the fixed parts that XLA's combiner shares are not negative."""
        return sum(min(self.param_cost(path, c)[0] for c in choices) for path, choices in self.param_choices.items())

    def memory_floor(self) -> float:
        """A lower bound on the memory of every assignment, as `evaluate` counts it and as the integer program's
        constraint does (it rounds each term up): each parameter at its cheapest choice, each residual and
        working-set value at its smallest layout (its fixed one, if fixed), and the batch. Where gradients are written over freed
        activations (`grads_reuse_activations`) the total is P + A - min(A, G) = max(P, (P - G) + A), which is
        smallest where P, P - G and A are: so it is bounded by the floors of each."""
        if "memory" not in self._floors:
            self._floors["memory"] = self._memory_floor()
        return self._floors["memory"]

    def _memory_floor(self) -> float:
        def least(vid: int) -> float:  # (a fixed layout is the only one the program allows)
            if vid in self.fixed_layouts:
                return self.value_memory(vid, self.fixed_layouts[vid])
            return min(self.value_memory(vid, lay) for lay in self.value_layout_options(vid))

        choices = self.param_choices.items()
        params = sum(min(self.param_memory(p, c) + self.kept_weight_memory(p, c) for c in ch) for p, ch in choices)
        items = [(name, copies * least(vid)) for name, vid, copies in self.value_memory_items()]
        acts = sum(nb for name, nb in items if name == "activations")
        fixed = self.batch_memory() + sum(nb for name, nb in items if name != "activations") \
            + self.transient_memory(least)
        if not self.grads_reuse_activations:
            return fixed + params + acts
        kept = sum(min(self.param_memory(p, c) + self.kept_weight_memory(p, c) - self.reusable_grad_memory(p, c)
                       for c in ch)
                   for p, ch in choices)
        return fixed + max(params, kept + acts)

    # -- the integer program ---------------------------------------------------------------------------------------
    def solve(self, memory_budget: float | None = None, time_limit: float = 20.0, workers: int = 8) -> Solution | None:
        """Optimal assignment under the budget (CP-SAT), or None when nothing fits. `workers`: CP-SAT's portfolio
        has its LP- and core-based subsolvers from 8 up, which prove a budget-tight problem optimal where 2 time out
        (docs/cost-model.md)."""
        model = _Model(self)
        if not model.build():
            return None
        model.minimise()
        if memory_budget is not None:
            model.fit(memory_budget)
        return model.solve(time_limit, workers)

    def _is_source(self, idx: int) -> bool:
        return not any(i is not None and i in self._live for i in self.g.ops[idx].inputs)

    # -- evaluation of a fixed assignment (the same objective, spelt out) -------------------------------------------
    def layout_of(self, vid: int, ops: dict[int, Strategy], params: dict[str, ParamChoice]) -> Layout:
        """The layout a value has under a full assignment."""
        v = self.values[vid]
        if v.param is not None:
            return self._slice_layout(v, params[v.param].layout)
        if v.producer is None:
            return None
        return ops[v.producer].outs[self.g.ops[v.producer].outputs.index(vid)]

    def evaluate(self, ops: dict[int, Strategy], params: dict[str, ParamChoice]) -> Solution:
        def layout(vid: int) -> Layout:
            return self.layout_of(vid, ops, params)

        comm_bytes: dict[str, float] = defaultdict(float)
        times = defaultdict(float)
        times["compute"] = sum(self.op_cost(i, s) for i, s in ops.items())
        shared_paid: dict[tuple, tuple[str, float]] = {}
        for path, c in params.items():
            own, shared = self.param_cost(path, c)
            for (kind, axes, nb, n), copies in Counter(self.param_sync(path, c)).items():
                key = "gradient sync" if kind != "all-gather" else "fsdp gathers"
                shared_paid[(kind, axes, n)] = (key, shared[(kind, axes, n)])
                times[key] += copies * n * (self.comm_seconds(kind, nb, axes) - shared[(kind, axes, n)] / n)
                comm_bytes[f"{'+'.join(axes)}/{kind}"] += copies * n * bytes_sent(
                    kind, nb, math.prod(self.mesh[a] for a in axes))
        for key, seconds in shared_paid.values():
            times[key] += seconds
        for axes, vid, n in self.batch_reductions():  # (not in the solver's objective: small, priced here)
            nb = self.value_memory(vid, layout(vid))
            # their bandwidth only: XLA combines small all-reduces, so their latency is not charged one by one
            # (unmeasured; charged, three scalar means outweighed a whole CPU step and turned plans around)
            latency = self.comm_seconds("all-reduce", 1.0, axes)
            times["batch reductions"] += n * max(0.0, self.comm_seconds("all-reduce", nb, axes) - latency)
            comm_bytes[f"{'+'.join(axes)}/all-reduce"] += n * bytes_sent(
                "all-reduce", nb, math.prod(self.mesh[a] for a in axes))
        paid = set()

        def pay(kind, nb, count):
            times["tensor comm"] += count * self.comm_seconds(kind, nb, ("tensor",))
            comm_bytes[f"tensor/{kind}"] += count * bytes_sent(kind, nb, self.t)

        for vid, v in self.values.items():
            lay = layout(vid)
            for cidx, pos in v.consumers:
                for key, kind, nb, count in self.use_conversions(vid, lay, cidx, pos, ops[cidx]):
                    if key not in paid:
                        paid.add(key)
                        pay(kind, nb, count)
        for cout, cin in self.g.carries:
            la, lb = layout(cout), layout(cin)
            if la != lb:
                for kind, nb, count in self.carry_conversions(la, lb, self.values[cout]):
                    pay(kind, nb, count)
        mem = {"parameters and optimizer state": sum(self.param_memory(p_, c) for p_, c in params.items()),
               "activations": 0.0, "backward working set": 0.0}
        kept = sum(self.kept_weight_memory(p_, c) for p_, c in params.items())
        if kept:
            mem["weight copies kept for the backward"] = kept
        for name, vid, copies in self.value_memory_items():
            mem[name] += copies * self.value_memory(vid, layout(vid))
        copies = self.transient_memory(lambda vid: self.value_memory(vid, layout(vid)))
        if copies:
            mem["convolution layout copies"] = copies
        mem["batch"] = self.batch_memory()
        if self.grads_reuse_activations:
            grads = sum(self.reusable_grad_memory(p_, c) for p_, c in params.items())
            mem["gradients written over freed activations"] = -min(mem["activations"], grads)
        return Solution(ops=ops, params=params, step_seconds=sum(times.values()), memory_bytes=sum(mem.values()),
                        breakdown=dict(times), comm_bytes=dict(comm_bytes), memory=mem, solver={})

    def consistent(self, ops: dict[int, Strategy], params: dict[str, ParamChoice]) -> bool:
        """The rules the integer program imposes, checked on a full assignment (for brute force)."""
        def layout(vid: int) -> Layout:
            return self.layout_of(vid, ops, params)

        for vid, want in self.fixed_layouts.items():
            if layout(vid) != want:
                return False
        for op in self.g.ops:
            s = ops[op.index]
            lays = [layout(i) if i is not None else None for i in op.inputs]
            k = self.followers.get(op.index)
            if k is not None and set(self.value_layout_options(op.inputs[k])) <= {
                    st.ins[k] for st in self.op_strats[op.index]}:
                if s.ins[k] != lays[k]:
                    return False
                continue
            for pos, i in enumerate(op.inputs):
                if i is not None and not self.use_allowed(i, op.index, lays[pos], s.ins[pos]):
                    return False
            if (len(self.op_strats[op.index]) > 1 and s.name != "R" and op.primitive != BOUNDARY
                    and not self._is_source(op.index)
                    and not any(lay is not None and s.ins[pos] == lay for pos, lay in enumerate(lays))):
                return False
        return True

    def brute_force(self, memory_budget: float | None = None) -> Solution | None:
        """Exhaustive search over the same space (for tests on small graphs)."""
        op_ids = [i for i, s in self.op_strats.items() if len(s) > 1]
        paths = list(self.param_choices)
        best = None
        fixed_ops = {i: s[0] for i, s in self.op_strats.items() if len(s) == 1}
        for combo in itertools.product(*(self.op_strats[i] for i in op_ids)):
            for pcombo in itertools.product(*(self.param_choices[pth] for pth in paths)):
                assignment = {**fixed_ops, **dict(zip(op_ids, combo))}
                params = dict(zip(paths, pcombo))
                if not self.consistent(assignment, params):
                    continue
                sol = self.evaluate(assignment, params)
                if memory_budget is not None and sol.memory_bytes > memory_budget:
                    continue
                if best is None or sol.step_seconds < best.step_seconds - 1e-15:
                    best = sol
        return best


class _Model:
    """The CP-SAT encoding of one `Problem` (Alpa's form, see the module docstring): one-hot literals per
    parameter and per op strategy (a follower reads its operand's layout literals), a literal per layout a value
    can take, pair literals linking each edge's operand layout to the consumer's strategy, and an indicator per
    conversion key, paid once whichever literals need it. Costs and memory are collected as (coefficient,
    literal) arrays and handed to CP-SAT as weighted sums."""

    def __init__(self, problem: Problem) -> None:
        self.pr = problem
        self.m = cp_model.CpModel()
        self.true = self.m.new_constant(1)
        self.p = {path: self._one_hot(f"p{path}_", len(ch)) for path, ch in problem.param_choices.items()}
        self.false = self.m.new_constant(0)
        self.x: dict[int, list] = {}
        self.followers: dict[int, int] = {}
        self.lay_of: dict[int, dict[Layout, Any]] = {}
        self.cost: list[tuple[float, Any]] = []
        self.memory: list[tuple[float, Any]] = []
        self.grads: list[tuple[float, Any]] = []
        self.acts: list[tuple[float, Any]] = []
        self.reused: Any = 0
        self.transient: Any = 0
        self.held: Any = None
        self.slack = 0
        self.budget: float | None = None
        self.indicators: dict[tuple, Any] = {}
        self.arrives: dict[tuple[int, int], list] = defaultdict(list)

    def build(self) -> bool:
        """The constraints and cost terms; False when a fixed layout is impossible."""
        self._strategies()
        self._memory_terms()
        self._sync()
        self._edges()
        self._propagation()
        self._carries()
        return self._fixed()

    # -- variables -------------------------------------------------------------------------------------------------
    def _one_hot(self, name: str, n: int) -> list:
        if n == 1:
            return [self.true]
        lits = [self.m.new_bool_var(f"{name}{k}") for k in range(n)]
        self.m.add_exactly_one(lits)
        return lits

    def _source(self, vid: int) -> dict[Layout, list]:
        """Layout -> the literals (parameter choices or producer strategies) that give the value that layout."""
        pr, v = self.pr, self.pr.values[vid]
        out: dict[Layout, list] = defaultdict(list)
        if v.param is not None:
            for c, lit in zip(pr.param_choices[v.param], self.p[v.param]):
                out[pr._slice_layout(v, c.layout)].append(lit)
        elif v.producer is None:
            out[None].append(self.true)
        else:
            k = pr.g.ops[v.producer].outputs.index(vid)
            for st, lit in zip(pr.op_strats[v.producer], self.x[v.producer]):
                out[st.outs[k]].append(lit)
        return out

    def layouts(self, vid: int) -> dict[Layout, Any]:
        """One literal per possible layout of the value (made once)."""
        lays = self.lay_of.get(vid)
        if lays:
            return lays
        lays = {}
        for lay, lits in self._source(vid).items():
            if len(lits) == 1:
                lays[lay] = lits[0]
            else:
                b = self.m.new_bool_var(f"v{vid}")
                self.m.add(cp_model.LinearExpr.Sum(lits) == b)
                lays[lay] = b
        self.lay_of[vid] = lays
        return lays

    def _strategies(self) -> None:
        """Strategy literals in program order (a follower's operand is decided before it), and their op costs."""
        pr = self.pr
        for idx, strats in pr.op_strats.items():
            k = pr.followers.get(idx)
            if k is not None:
                lays = self.layouts(pr.g.ops[idx].inputs[k])
                if set(lays) <= {st.ins[k] for st in strats}:
                    self.x[idx] = [lays.get(st.ins[k], self.false) for st in strats]
                    self.followers[idx] = k
                    continue
            self.x[idx] = self._one_hot(f"x{idx}_", len(strats))
        for idx, strats in pr.op_strats.items():
            self.cost += [(pr.op_cost(idx, s), lit) for s, lit in zip(strats, self.x[idx])]

    def _memory_terms(self) -> None:
        """Parameters with their optimizer state, residuals, the batch and the backward working set; with the
        gradients written over freed activations, `reused` = min(activations, gradients) comes off."""
        pr = self.pr
        for path, choices in pr.param_choices.items():
            self.memory += [(pr.param_memory(path, c) + pr.kept_weight_memory(path, c), lit)
                            for c, lit in zip(choices, self.p[path])]
            self.grads += [(pr.reusable_grad_memory(path, c), lit) for c, lit in zip(choices, self.p[path])]
        for name, vid, copies in pr.value_memory_items():
            terms = [(copies * pr.value_memory(vid, lay), lit) for lay, lit in self.layouts(vid).items()]
            (self.acts if name == "activations" else self.memory).extend(terms)
        self.memory += self.acts
        self.memory.append((pr.batch_memory(), self.true))
        groups = [[(pr.value_memory(v, lay), lit) for v in group for lay, lit in self.layouts(v).items()]
                  for group in pr.conv_copies()]
        if groups:  # transient = the largest group (the solver takes the least it may)
            top = int(math.ceil(max(sum(b for b, _ in g) for g in groups))) + 1
            self.transient = self.m.new_int_var(0, top, "transient")
            for g in groups:
                self.m.add(self.transient >= _weighted([(int(math.ceil(b)), lit) for b, lit in g if b > 0]))
        if pr.grads_reuse_activations:  # reused = min(activations, gradients): the solver takes the most it may
            self.reused = self.m.new_int_var(0, int(sum(b for b, _ in self.grads if b > 0)) + 1, "reused")
            self.m.add(self.reused <= _weighted([(int(round(b)), lit) for b, lit in self.acts if b > 0]))
            self.m.add(self.reused <= _weighted([(int(round(b)), lit) for b, lit in self.grads if b > 0]))

    def pay(self, key: tuple, seconds: float, lit) -> None:
        """Charge `seconds` once if any literal paying under `key` is true."""
        if seconds <= 0:
            return
        if key not in self.indicators:
            self.indicators[key] = self.m.new_bool_var(f"y{len(self.indicators)}")
            self.cost.append((seconds, self.indicators[key]))
        self.m.add_implication(lit, self.indicators[key])

    def _sync(self) -> None:
        """Each parameter choice's own synchronisation, and the fixed parts shared by all that sync alike."""
        pr = self.pr
        for path, choices in pr.param_choices.items():
            for c, lit in zip(choices, self.p[path]):
                own, shared = pr.param_cost(path, c)
                self.cost.append((own, lit))
                for key, seconds in shared.items():
                    self.pay(("sync",) + key, seconds, lit)

    def link(self, a: dict[Layout, Any], b: list[tuple[Any, Any]]) -> dict[tuple[Layout, int], Any]:
        """Pair variables e[(la, kb)] with row/column sums equal to the two one-hot sides (a tight linking)."""
        if len(a) == 1 and len(b) == 1:
            return {(next(iter(a)), 0): self.true}
        e = {(la, k): self.m.new_bool_var("e") for la in a for k in range(len(b))}
        for la, lit_a in a.items():
            self.m.add(cp_model.LinearExpr.Sum([e[(la, k)] for k in range(len(b))]) == lit_a)
        for k, (_, lit_b) in enumerate(b):
            self.m.add(cp_model.LinearExpr.Sum([e[(la, k)] for la in a]) == lit_b)
        return e

    def _edges(self) -> None:
        """Each use of a value: which operand layout meets which consumer strategy, and the conversions paid."""
        pr = self.pr
        for vid, v in pr.values.items():
            if v.consumers:
                lays = self.layouts(vid)
                for cidx, pos in v.consumers:
                    if self.followers.get(cidx) != pos:
                        self._edge(vid, v, lays, cidx, pos)

    def _edge(self, vid: int, v: Value, lays: dict[Layout, Any], cidx: int, pos: int) -> None:
        pr, m = self.pr, self.m
        strats = pr.op_strats[cidx]
        for (lay, k), lit in self.link(lays, list(zip(strats, self.x[cidx]))).items():
            want = strats[k].ins[pos]
            if not pr.use_allowed(vid, cidx, lay, want):
                m.add(lit == 0)
                continue
            if lay is not None and want == lay:
                self.arrives[(cidx, k)].append(lit)
            for key, kind, nb, n in pr.use_conversions(vid, lay, cidx, pos, strats[k]):
                self.pay(key, n * pr.comm_seconds(kind, nb, ("tensor",)), lit)

    def _propagation(self) -> None:
        """The partitioner propagates shardings forward: an op is split only the way some operand already is, so
        that a plan (parameter specs and layer-boundary specs) determines every op's strategy."""
        pr = self.pr
        for idx, strats in pr.op_strats.items():
            if idx in self.followers or len(strats) == 1 or pr.g.ops[idx].primitive == BOUNDARY:
                continue
            for k, st in enumerate(strats):
                if st.name != "R" and not (st.outs and pr._is_source(idx)):
                    self.m.add(self.x[idx][k] <= cp_model.LinearExpr.Sum(self.arrives.get((idx, k), [])))

    def _carries(self) -> None:
        """The layer's output feeds the next layer's input: a conversion between their layouts is paid per layer."""
        pr = self.pr
        for cout, cin in pr.g.carries:
            a, b = self.layouts(cout), self.layouts(cin)
            blays = list(b)
            for (la, k), lit in self.link(a, list(b.items())).items():
                lb = blays[k]
                if la != lb:
                    seconds = sum(n * pr.comm_seconds(kind, nb, ("tensor",))
                                  for kind, nb, n in pr.carry_conversions(la, lb, pr.values[cout]))
                    self.pay(("c", cout, la, lb), seconds, lit)

    def _fixed(self) -> bool:
        for vid, want in self.pr.fixed_layouts.items():
            lays = self.layouts(vid)
            if want not in lays:
                return False
            self.m.add(lays[want] == 1)
        return True

    # -- objective, budget and solution -----------------------------------------------------------------------------
    def minimise(self) -> None:
        """The problem's objective: nanoseconds ("time"), bytes moved ("bytes") or bytes held ("memory")."""
        pr, m, cost, memory = self.pr, self.m, self.cost, self.memory
        if pr.objective == "memory":
            m.minimize(_weighted([(int(math.ceil(b)), lit) for b, lit in memory if b > 0]) - self.reused
                       + self.transient)
        elif pr.objective == "bytes":  # between plans that move the same bytes, the partitioner splits more
            # CP-SAT needs the objective's range within int64: in bytes x 1000 a 175B model's terms overflow it,
            # so large models count in coarser units (exact for everything below ~2^50 bytes in total)
            unit = max(1.0, (1000 * sum(c for c, _ in cost if c > 0) + sum(b for b, _ in memory if b > 0)) / 2**50)
            m.minimize(_weighted([(1000 * int(round(c / unit)), lit) for c, lit in cost if c > 0]
                                 + [(int(math.ceil(b / unit)), lit) for b, lit in memory if b > 0])
                       + ((self.transient - self.reused) if unit == 1.0 else 0))
        else:  # CP-SAT wants integers: nanoseconds
            m.minimize(_weighted([(int(round(c * 1e9)), lit) for c, lit in cost if c > 0]))

    def fit(self, budget: float) -> None:
        """The per-device memory constraint. CP-SAT counts whole bytes: each term is rounded to the nearest, and
        the bound allows the half byte per term that rounding may add, so a plan exactly at the budget is not
        turned away; `solve` checks the exact figure and tightens the bound when a plan only fitted by rounding."""
        terms = [(int(round(b)), lit) for b, lit in self.memory if b > 0]
        self.held = _weighted(terms) - self.reused + self.transient
        self.budget = budget
        # (the reused and transient bytes are sums of rounded terms too)
        self.slack = (len(terms) + len(self.acts) + len(self.grads) + 1) // 2 + 1
        self.m.add(self.held <= int(budget) + self.slack)

    def solve(self, time_limit: float, workers: int) -> Solution | None:
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = time_limit
        solver.parameters.num_workers = workers
        solver.parameters.random_seed = 0
        pick = lambda lits: next(k for k, lit in enumerate(lits) if solver.value(lit))  # noqa: E731
        pr = self.pr
        for attempt in range(TIGHTENINGS + 1):
            status = solver.solve(self.m)
            if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                return None
            ops = {idx: strats[pick(self.x[idx])] for idx, strats in pr.op_strats.items()}
            params = {path: ch[pick(self.p[path])] for path, ch in pr.param_choices.items()}
            sol = pr.evaluate(ops, params)
            if self.budget is None or not exceeds(sol.memory_bytes, self.budget):
                break
            # over the budget by less than the rounding allowed: exclude this figure and what is as large; the
            # last time, leave the rounding no room at all
            over = max(1, math.ceil(sol.memory_bytes - self.budget))
            last = attempt == TIGHTENINGS - 1
            self.m.add(self.held <= (int(self.budget) - self.slack if last else solver.value(self.held) - over))
        else:
            return None
        proto = self.m.proto
        sol.solver = {"status": "optimal" if status == cp_model.OPTIMAL else "feasible",
                      "variables": len(proto.variables), "constraints": len(proto.constraints),
                      "wall_seconds": round(solver.wall_time, 4)}
        return sol


def _weighted(terms: list[tuple[int, Any]]) -> Any:
    """sum(coefficient x literal) as one CP-SAT expression (built at once, not term by term)."""
    return cp_model.LinearExpr.weighted_sum([lit for _, lit in terms], [c for c, _ in terms])


class LoopProblem(Problem):
    """The integer program of a folded Python loop, costed as the unrolled program XLA compiles for it: the same
    figures as the op-by-op graph, from one block's variables. Where `Problem` models a `lax.scan` stack it is
    overridden: ZeRO-3 gathers each use's weight once (no backward loop gathers it again), the residuals XLA
    stores are those of straight-line code (cheap elementwise results recomputed from what they read, across
    block boundaries), ZeRO-3 gathers and transposed kernels are kept for the backward (`kept_weight_memory`), and
    a parameter outside the blocks whose first dimension happens to equal the block count may still be split along
    it."""

    def __init__(self, graph: Graph, *args, **kw) -> None:
        super().__init__(graph, *args, **kw)
        self._stacked = set()

    def param_sync(self, path: str, c: ParamChoice) -> list[tuple[str, tuple[str, ...], float, int]]:
        """A stacked parameter syncs as its blocks' parameters, one collective each (the fixed part of each is
        shared, as `Problem.param_cost` charges it)."""
        out = super().param_sync(path, c)
        if path not in self.g.blocks:
            return out
        n = self.g.layers
        lookup = path in self._lookups  # its all-to-alls move the (per-block) lookups: already every block's
        return [(kind, axes, b if lookup and kind == "all-to-all" else b / n, k) for kind, axes, b, k in out
                for _ in range(n)]

    def param_options(self, path: str) -> list[ParamChoice]:
        if path in self.g.blocks:
            return super().param_options(path)
        graph, self.g = self.g, dataclasses.replace(self.g, layers=1)  # the rule reads only the layer count
        try:
            return super().param_options(path)
        finally:
            self.g = graph

    def _stored(self, keep: dict[int, int]) -> dict[int, int]:
        """`Problem._stored` outside a scan, block by block: a block value stands for one value per block (a bit
        mask of blocks); through a boundary op block 0 reaches the loop's input, block i block i-1's carry."""
        blocks: dict[int, int] = {}
        stored: dict[int, int] = {}
        stack = [(vid, (1 << self.g.layers) - 1 if self._in_loop(vid) else n) for vid, n in keep.items()]
        while stack:
            vid, n = stack.pop()
            inside = self._in_loop(vid)
            if inside:
                if blocks.get(vid, 0) | n == blocks.get(vid, 0):
                    continue
                blocks[vid] = blocks.get(vid, 0) | n
            val = self.values[vid]
            op = self.g.ops[val.producer] if val.producer is not None else None
            crossing = self._loop_input(vid) if op is not None and op.primitive == BOUNDARY else None
            if crossing is not None:
                stack += ([(crossing[1], 1)] if n & 1 else []) + ([(crossing[0], n >> 1)] if n >> 1 else [])
                continue
            if op is None or self._stores_output(op):
                if vid in self._live and val.param is None and val.shape and vid not in self.g.inputs:
                    stored[vid] = bin(blocks[vid]).count("1") if inside else max(stored.get(vid, 0), n)
                continue
            last = 1 << (self.g.layers - 1)  # an op after the loop reads the last block's value
            stack += [(i, n if self._in_loop(i) == inside else last if self._in_loop(i) else 1)
                      for i in op.inputs if i is not None and i in self._live]
        return stored

    def _in_loop(self, vid: int) -> bool:
        """A value of the blocks (one per block), the boundary's output (each block's input) included."""
        p = self.values[vid].producer
        return p is not None and (self.g.ops[p].in_layer or self.g.ops[p].primitive == BOUNDARY)

    def _loop_input(self, vid: int) -> tuple[int, int] | None:
        """(carry-out, loop input) behind a boundary op's output."""
        out = next((cout for cout, cin in self.g.carries if cin == vid), None)
        return None if out is None else (out, self.g.ops[self.values[vid].producer].inputs[0])


def new_problem(graph: Graph, *args, **kw) -> Problem:
    """The integer program of `graph`: `LoopProblem` for a folded Python loop."""
    return (LoopProblem if graph.stack == "loop" else Problem)(graph, *args, **kw)
