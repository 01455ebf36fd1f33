"""Trace a loss function to a dataflow graph the planner can reason about.

The forward loss is traced with `jax.make_jaxpr` on abstract inputs (shapes only) and flattened into one list of ops
over SSA values. Calls (`jit`, `remat`, `custom_jvp`/`custom_vjp`) are inlined; a `scan` over stacked parameters
(the layer stack) is inlined once with a trip count, so a repeated layer is solved once; any other loop body (a
`scan`, a `while` loop) is inlined once with its trip count (a `while` loop's where the jaxpr fixes it, else one,
with a warning), and a `cond`'s branches are all inlined, their results joined by a `select_n`. A Python loop over
identical blocks (`for b in self.blocks: x = b(x)`) is folded into the same form (`fold_blocks`): its per-block
parameters become one virtual stacked parameter per family. Each value knows which of its dimensions is the global
batch (split over the batch mesh axes) and, if it is a parameter or a layer slice of one, which parameter dimension
each of its dimensions is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from planner import jax_internals as jint
from planner.rules import ParamInfo

PARAM_VIEWS = ("convert_element_type", "copy", "copy_p", "transpose")
"""Ops whose output is still the parameter they read, for layout purposes."""
CONTRACTIONS = frozenset({"dot_general", "conv_general_dilated"})
"""Ops whose work is multiply-adds over a contracted dimension (matmuls, convolutions): costed by their FLOPs."""
BOUNDARY = "layer_boundary"
"""A virtual op at the input of the layer stack: the point where a plan's `layer_input` spec is applied."""


@functools.cache
def itemsize(dtype: str) -> int:
    """Bytes per element; extended dtypes (PRNG keys) count as their underlying words."""
    try:
        return jnp.dtype(dtype).itemsize
    except TypeError:
        return 8


@functools.cache
def dtype_kind(dtype: str) -> str:
    """'float' (bfloat16 and float8 included), 'int' or 'other' (bool, PRNG keys, ...)."""
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        return "other"
    if jnp.issubdtype(d, jnp.floating) or jnp.issubdtype(d, jnp.complexfloating):
        return "float"
    return "int" if jnp.issubdtype(d, jnp.integer) else "other"


@dataclasses.dataclass
class Value:
    id: int
    shape: tuple[int, ...]
    dtype: str
    batch_dim: int | None = None
    token_dims: tuple[int, ...] = ()
    """Dimensions that index tokens (batch, sequence): split by batch axes, never by tensor parallelism."""
    param: str | None = None
    param_dims: tuple[int | None, ...] | None = None
    """For a parameter (or a slice of a stacked one): the parameter dimension behind each dimension."""
    producer: int | None = None
    consumers: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    """(op index, operand position) of every use."""


@dataclasses.dataclass
class Op:
    index: int
    primitive: str
    params: dict[str, Any]
    inputs: list[int | None]
    """Value ids of the operands (None for literals)."""
    outputs: list[int]
    scope: str
    count: int
    """Executions per step (the layer-stack trip count inside the scan body)."""
    in_layer: bool
    flops: float
    eqns: tuple[tuple[int, ...], ...] = ()
    """The jaxpr equations this op is, each by its index at every level of inlined calls (`jax_internals.
    equation_keys`; `eval_jaxpr_hooked` names them the same way): one, or one per block of a folded loop; none
    inside a body the runtime runs whole (a scan, a remat, a custom derivative) or an `ops.attention` it replaces."""


@dataclasses.dataclass
class Graph:
    values: dict[int, Value]
    ops: list[Op]
    params: dict[str, ParamInfo]
    param_values: dict[str, int]
    inputs: list[int]
    """Value ids of the non-parameter inputs (the batch)."""
    output: int
    layers: int
    """Trip count of the layer stack (1 if the model has none)."""
    carries: list[tuple[int, int]]
    """(carry-out value, carry-in value) pairs of the layer scan: their layouts must agree."""
    warnings: list[str] = dataclasses.field(default_factory=list)
    stack: str | None = None
    """How the layer stack is written: "scan" (a `lax.scan` over stacked parameters), "loop" (a Python loop over
    identical blocks, folded by `fold_blocks`) or None (no stack)."""
    blocks: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """For a folded loop: virtual stacked parameter -> the model's real parameters it stands for, in block order."""
    unfolded: Graph | None = dataclasses.field(default=None, repr=False)
    """For a folded loop: the graph op by op, for what the fold cannot express (blocks with different specs)."""
    optimizer_copies: float | None = None
    """The optimizer's state per parameter, in copies of it (Adam: 2, SGD: 0); None: the planner's default,
    `planner.ilp.OPT_STATE_COPIES` (AdamW, what `autoshard train` runs). Set with `with_optimizer`."""
    jaxpr: Any = dataclasses.field(default=None, repr=False, compare=False)
    """The traced loss (a ClosedJaxpr over the parameters, then the batch), for what needs JAX itself on it:
    `planner.stages.stash_share` linearizes it."""

    def with_optimizer(self, copies: float) -> "Graph":
        """This graph (and the op-by-op one behind a folded loop) priced for an optimizer keeping `copies`."""
        for g in (self, self.unfolded):
            if g is not None:
                g.optimizer_copies = copies
        return self

    def passes(self) -> float:
        """Training work over forward work (`training_flops`; 3 when the model has no contraction)."""
        fwd = sum(op.flops * op.count for op in self.ops if op.primitive in CONTRACTIONS)
        return self.training_flops() / fwd if fwd else 3.0

    def compute_dtype(self) -> str:
        """The dtype the model multiplies in: that of its contractions' outputs, weighted by their FLOPs (float32
        without any). Read off the trace, so a model needs no dtype attribute for the planner to price its matmuls
        at the right peak."""
        work: dict[str, float] = {}
        for op in self.ops:
            if op.primitive in CONTRACTIONS:
                dtype = self.values[op.outputs[0]].dtype
                work[dtype] = work.get(dtype, 0.0) + op.flops * op.count
        return max(work, key=work.get) if work else "float32"

    def training_flops(self) -> float:
        """Contraction FLOPs of a training step, from the forward graph: each matmul or convolution once forward,
        and once more for each operand that needs a gradient (a floating value computed from a parameter), which
        is what reverse-mode differentiation adds; a layer stack's carries pass the need from layer to layer."""
        needs = {vid for vid, v in self.values.items() if v.param is not None}
        carried = dict((cin, cout) for cout, cin in self.carries)
        for _ in range(2):  # a second sweep for what reaches a layer's input only through the previous layer
            needs |= {cin for cin, cout in carried.items() if cout in needs}
            for op in self.ops:
                if op.primitive != "stop_gradient" and any(i in needs for i in op.inputs if i is not None):
                    needs |= {o for o in op.outputs if dtype_kind(self.values[o].dtype) == "float"}
        return sum(op.flops * op.count * (1 + sum(i in needs for i in op.inputs[:2]))
                   for op in self.ops if op.primitive in CONTRACTIONS)



@functools.lru_cache(maxsize=None)
def _aval_shape_dtype(shape: tuple, dtype: Any) -> tuple[tuple[int, ...], str]:
    """(shape as ints, dtype name) of an abstract value: avals repeat, and numpy's dtype names are slow to print."""
    return tuple(int(d) for d in shape), str(dtype)


class _Tracer:
    def __init__(self) -> None:
        self.values: dict[int, Value] = {}
        self.ops: list[Op] = []
        self.layers = 1
        self.carries: list[tuple[int, int]] = []
        self.notes: list[str] = []
        self.scope = jint.NameStacks()

    def new_value(self, aval, **kw) -> int:
        vid = len(self.values)
        try:
            shape, dtype = _aval_shape_dtype(aval.shape, aval.dtype)
        except TypeError:  # an unhashable shape or dtype
            shape, dtype = tuple(int(d) for d in aval.shape), str(aval.dtype)
        self.values[vid] = Value(vid, shape, dtype, **kw)
        return vid

    def walk(self, jaxpr, env: dict, count: int, in_layer: bool, path: tuple[int, ...] | None = ()) -> None:
        """Flatten `jaxpr`'s equations into ops; `path` names them as the runtime does (None: it cannot)."""
        literal = jint.Literal
        for key, eqn in zip(jint.equation_keys(jaxpr.eqns, path), jaxpr.eqns):
            ins = [None if isinstance(v, literal) else env[v] for v in eqn.invars]
            name = eqn.primitive.name
            body = jint.call_body(eqn) if name in jint.CALLS else None
            if body is not None:
                sub = body.jaxpr
                inner = dict(zip(sub.invars, ins[len(ins) - len(sub.invars):]))
                for v in sub.constvars:
                    inner[v] = self.new_value(v.aval)
                self.walk(sub, inner, count, in_layer, key if name in jint.INLINE_CALLS else None)
                for out, sv in zip(eqn.outvars, sub.outvars):
                    env[out] = self._lookup(inner, sv)
            elif name == "scan":
                self._scan(eqn, ins, env, count, in_layer)
            elif name == "cond":
                self._cond(eqn, ins, env, count, in_layer)
            elif name == "while":
                self._while(eqn, ins, env, count, in_layer)
            else:
                self._op(eqn, ins, env, count, in_layer, key)

    def _lookup(self, env, var) -> int:
        if jint.is_literal(var):
            return self.new_value(var.aval)
        return env[var]

    def _op(self, eqn, ins, env, count, in_layer, key: tuple[int, ...] | None = None) -> None:
        index = len(self.ops)
        params = jint.op_params(eqn)
        outs = []
        for v in eqn.outvars:
            vid = self.new_value(v.aval, producer=index)
            env[v] = vid
            outs.append(vid)
        op = Op(index, eqn.primitive.name, params, ins, outs, self.scope(eqn), count, in_layer, _flops(eqn),
                () if key is None else (key,))
        src = self.values[ins[0]] if len(ins) == 1 and ins[0] is not None else None
        if src is not None and src.param is not None and op.primitive in PARAM_VIEWS:
            # a cast or transpose of a weight is that weight, laid out the same way (a bf16 copy, a tied head)
            perm = params.get("permutation", range(len(src.param_dims)))
            self.values[outs[0]].param = src.param
            self.values[outs[0]].param_dims = tuple(src.param_dims[i] for i in perm)
        self._append(op)

    def _append(self, op: Op) -> None:
        self.ops.append(op)
        for pos, vid in enumerate(op.inputs):
            if vid is not None:
                self.values[vid].consumers.append((op.index, pos))

    def _boundary(self, vid: int, aval, count: int) -> int:
        index = len(self.ops)
        out = self.new_value(aval, producer=index)
        self._append(Op(index, BOUNDARY, {}, [vid], [out], "layer_input", count, False, 0.0))
        return out

    def _scan(self, eqn, ins, env, count, in_layer) -> None:
        info = jint.scan(eqn)
        body, sub = info.body, info.body.jaxpr
        nc, ncarry, length = info.num_consts, info.num_carry, info.length
        xs = ins[nc + ncarry:]
        stacks_params = any(i is not None and self.values[i].param is not None for i in xs)
        is_layers = stacks_params and not in_layer and length > 1
        if is_layers:
            self.layers = length
        inner: dict = {}
        for v, vid in zip(sub.invars[:nc], ins[:nc]):
            inner[v] = vid if vid is not None else self.new_value(v.aval)
        for v, vid in zip(sub.invars[nc:nc + ncarry], ins[nc:nc + ncarry]):
            # the layer input: a boundary op where a plan's activation constraint applies
            inner[v] = self._boundary(vid, v.aval, count) if vid is not None else self.new_value(v.aval)
        for v, vid in zip(sub.invars[nc + ncarry:], xs):
            src = self.values[vid] if vid is not None else None
            kw = {}
            if src is not None and src.param is not None:
                kw = dict(param=src.param, param_dims=src.param_dims[1:])
            if src is not None and src.batch_dim not in (None, 0):
                kw["batch_dim"] = src.batch_dim - 1
            if src is not None and src.token_dims:
                kw["token_dims"] = tuple(d - 1 for d in src.token_dims if d > 0)
            inner[v] = self.new_value(v.aval, **kw)
        for v, c in zip(sub.constvars, body.consts):
            inner[v] = self.new_value(v.aval)
        self.walk(sub, inner, count * length, in_layer or is_layers, None)
        outs = [self._lookup(inner, v) for v in sub.outvars]
        for k, (out, vid) in enumerate(zip(eqn.outvars, outs)):
            if k < ncarry:
                env[out] = vid
                self.carries.append((vid, inner[sub.invars[nc + k]]))
            else:  # stacked per-iteration outputs: a fresh value with the leading trip-count dimension
                env[out] = self.new_value(out.aval)

    def _cond(self, eqn, ins, env, count, in_layer) -> None:
        """A `lax.cond` / `lax.switch`: every branch's ops, each at the cond's count, and per output a `select_n`
        of the branches' results by the index (what the cond returns). The branch a literal index picks is the
        only one planned; otherwise the union is, each branch priced as if it ran: an upper bound on the work
        (one branch runs), and the residuals JAX keeps for the backward (every branch's, zeros for those not taken)."""
        info = jint.cond(eqn)
        index, operands = ins[0], ins[1:]
        picked = jint.int_literal(eqn.invars[0])
        branches = info.branches
        if picked is not None:
            branches = (branches[min(max(picked, 0), len(branches) - 1)],)
        results = []
        for branch in branches:
            sub = branch.jaxpr
            inner = dict(zip(sub.invars, operands[len(operands) - len(sub.invars):]))
            for v in sub.constvars:
                inner[v] = self.new_value(v.aval)
            self.walk(sub, inner, count, in_layer, None)
            results.append([self._lookup(inner, v) for v in sub.outvars])
        scope = self.scope(eqn)
        for k, out in enumerate(eqn.outvars):
            picks = [r[k] for r in results]
            if all(p == picks[0] for p in picks):  # one branch, or every branch passes the same value through
                env[out] = picks[0]
                continue
            index_op = len(self.ops)
            vid = self.new_value(out.aval, producer=index_op)
            self._append(Op(index_op, "select_n", {}, [index, *picks], [vid], scope, count, in_layer, 0.0))
            env[out] = vid

    def _while(self, eqn, ins, env, count, in_layer) -> None:
        """A `lax.while_loop`: its body (and predicate) walked once, at the loop's trip count where the jaxpr fixes
        it (`jax_internals.while_trip_count`), else once with a warning; carries as a scan's."""
        info = jint.while_loop(eqn)
        trips = jint.while_trip_count(eqn)
        if trips is None:
            self.notes.append(f"while at {self.scope(eqn) or 'the top level'}: its trip count depends on "
                              f"values; planned as if its body ran once")
            trips = 1
        ncc, nbc = info.cond_nconsts, info.body_nconsts
        init = ins[ncc + nbc:]
        sub = info.body.jaxpr
        inner: dict = {}
        for v, vid in zip(sub.invars[:nbc], ins[ncc:ncc + nbc]):
            inner[v] = vid if vid is not None else self.new_value(v.aval)
        carries_in = []
        for v, vid in zip(sub.invars[nbc:], init):
            inner[v] = self._boundary(vid, v.aval, count) if vid is not None else self.new_value(v.aval)
            carries_in.append(inner[v])
        for v in sub.constvars:
            inner[v] = self.new_value(v.aval)
        n = count * max(trips, 1)
        self.walk(sub, inner, n, in_layer, None)
        outs = [self._lookup(inner, v) for v in sub.outvars]
        pred = info.cond.jaxpr  # the test, on the consts it reads and the carries of each iteration
        penv: dict = {}
        for v, vid in zip(pred.invars, [*ins[:ncc], *carries_in]):
            penv[v] = vid if vid is not None else self.new_value(v.aval)
        for v in pred.constvars:
            penv[v] = self.new_value(v.aval)
        self.walk(pred, penv, n, in_layer, None)
        for out, vid, cin in zip(eqn.outvars, outs, carries_in):
            env[out] = vid
            self.carries.append((vid, cin))


def _flops(eqn) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        a = eqn.invars[0].aval
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(a.shape[i] for i in lc)
    if name == "conv_general_dilated":  # each output element: a multiply-add per kernel element of its group
        kernel = eqn.invars[1].aval.shape
        out_features = kernel[eqn.params["dimension_numbers"][1][0]]
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel) / out_features
    if not eqn.outvars or not hasattr(eqn.outvars[0].aval, "shape"):
        return 0.0
    if name.startswith("reduce_") or name in ("argmax", "argmin", "cumsum", "cumlogsumexp", "cummax"):
        return float(math.prod(eqn.invars[0].aval.shape))
    if name in ("reshape", "transpose", "broadcast_in_dim", "convert_element_type", "squeeze", "expand_dims",
                "slice", "dynamic_slice", "concatenate", "split", "iota", "gather", "copy", "stop_gradient"):
        return 0.0
    return float(math.prod(eqn.outvars[0].aval.shape))


def trace(fn: Callable, params: Any, batch: Any, param_paths: list[str],
          param_infos: dict[str, ParamInfo], batch_dims: Any = 0, fold: bool = True) -> Graph:
    """Trace `fn(params, batch) -> scalar loss`. `param_paths` names the leaves of `params` in flatten order.

    `batch_dims`: the batch dimension of each batch leaf (an int for all leaves, or a matching pytree; -1 for an
    input without one). `fold`: fold a Python loop over identical blocks into a layer stack (`fold_blocks`).
    """
    with _gc_paused():
        return _trace(fn, params, batch, param_paths, param_infos, batch_dims, fold)


@contextlib.contextmanager
def _gc_paused():
    """No cyclic garbage collection while tracing. A trace allocates tens of thousands of objects that outlive
    CPython's young generations (the jaxpr, the graph), so collections over the whole heap (jax, flax, the user's
    model) keep running mid-trace and find nothing to free: a sixth of a 48-block model's trace. What the trace
    leaves behind is collected as usual afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _trace(fn, params, batch, param_paths, param_infos, batch_dims, fold) -> Graph:
    closed = jax.make_jaxpr(fn)(params, batch)
    jaxpr = closed.jaxpr
    t = _Tracer()
    env: dict = {}
    param_leaves = jax.tree.leaves(params)
    batch_leaves = jax.tree.leaves(batch)
    if len(param_leaves) != len(param_paths):
        raise ValueError("param_paths must name every parameter leaf")
    bdims = [batch_dims] * len(batch_leaves) if isinstance(batch_dims, int) else jax.tree.leaves(batch_dims)
    param_values = {}
    invars = list(jaxpr.invars)
    for var, path in zip(invars[: len(param_leaves)], param_paths):
        env[var] = t.new_value(var.aval, param=path, param_dims=tuple(range(len(var.aval.shape))))
        param_values[path] = env[var]
    inputs = []
    for var, bd in zip(invars[len(param_leaves):], bdims):
        shape = var.aval.shape
        batch_dim = bd if shape and bd is not None and bd >= 0 else None
        tokens = (batch_dim,) if batch_dim is not None else ()
        if batch_dim == 0 and len(shape) == 2 and dtype_kind(str(var.aval.dtype)) == "int":
            tokens = (0, 1)  # token ids [batch, sequence]: both index tokens
        env[var] = t.new_value(var.aval, batch_dim=batch_dim, token_dims=tokens)
        inputs.append(env[var])
    for var, c in zip(jaxpr.constvars, closed.consts):
        env[var] = t.new_value(var.aval)
    t.walk(jaxpr, env, 1, False)
    out = t._lookup(env, jaxpr.outvars[0])
    reprs: dict[int, tuple[Any, str]] = {}
    sigs = [_signature(op, t.values, reprs) for op in t.ops]
    _propagate_batch_dims(t, sigs)
    for note in t.notes:
        warnings.warn(note, stacklevel=3)  # (at the caller of `trace`)
    graph = Graph(t.values, t.ops, dict(param_infos), param_values, inputs, out, t.layers, t.carries, t.notes,
                  stack="scan" if t.layers > 1 else None, jaxpr=closed)
    return fold_blocks(graph, sigs) if fold else graph


def matmul_flops(jaxpr) -> float:
    """Matmul and convolution FLOPs of a (closed) jaxpr, through calls and loops (times their trip counts)."""
    jaxpr = jint.open_jaxpr(jaxpr).jaxpr
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in CONTRACTIONS:
            total += _flops(eqn)
        trips = jint.trip_count(eqn)
        for sub in jint.sub_jaxprs(eqn):
            total += trips * matmul_flops(sub)
    return total


def _propagate_batch_dims(t: _Tracer, sigs: list[tuple] | None = None) -> None:
    """Forward pass: which output dimension carries the batch, from the operands' batch dimensions. `sigs`: the
    ops' `_signature`s; ops alike (every block of a loop) with operands alike map their dimensions alike, so each
    such kind of op is worked out once."""
    values = t.values
    seen: dict[tuple, list[tuple[int | None, tuple[int, ...]]]] = {}
    for k_op, op in enumerate(t.ops):
        ins = [values[i] if i is not None else None for i in op.inputs]
        dims_in = tuple(None if v is None else (v.batch_dim, v.token_dims) for v in ins)
        key = None if sigs is None else (sigs[k_op], dims_in)
        result = seen.get(key) if key is not None else None
        if result is None:
            result = _output_dims(op, values, ins)
            if key is not None:
                seen[key] = result
        for out, (batch_dim, tokens) in zip(op.outputs, result):
            if batch_dim is not None:
                values[out].batch_dim = batch_dim
            values[out].token_dims = tokens
    _pull_batch_dims(t)


def _pull_batch_dims(t: _Tracer) -> None:
    """Backward pass: a value computed without the batch (from parameters or constants) whose dimension an op lines
    up with its output's batch (learned memory slots or a CLS token broadcast over the batch, then projected or
    concatenated; a mask broadcast over it) carries the batch too. It is as many rows as examples, and the runtime
    splits it with the batch: left whole, XLA computes it on every device and gathers its cotangent over the batch
    axes in the backward (an encoder-decoder's memory-slot keys and values at data=8: 17.9 KB a step). Consumers
    come before producers in reverse program order."""
    from planner.layouts import out_dims

    values = t.values
    for op in reversed(t.ops):
        outs = [(k, values[o]) for k, o in enumerate(op.outputs) if values[o].batch_dim is not None]
        if not outs:
            continue
        maps = None
        for pos, i in enumerate(op.inputs):
            v = values[i] if i is not None else None
            if v is None or v.batch_dim is not None or v.param is not None or v.producer is None:
                continue
            maps = maps if maps is not None else out_dims(op, values)
            for k, out in outs:
                dims = [d for (p, d), j in (maps[k] if k < len(maps) else {}).items()
                        if p == pos and j == out.batch_dim and v.shape[d] == out.shape[out.batch_dim]]
                if dims:
                    v.batch_dim = dims[0]
                    break


def _output_dims(op: Op, values: dict[int, Value], ins: list[Value | None]
                 ) -> list[tuple[int | None, tuple[int, ...]]]:
    """Per output of `op`: the dimension its operands' batch becomes (None: none does) and its token dimensions."""
    from planner.layouts import out_dims  # shared dimension-mapping rules (`map_dim`)

    if not any(v is not None and (v.batch_dim is not None or v.token_dims) for v in ins):
        return [(None, ())] * len(op.outputs)
    maps = out_dims(op, values)
    result = []
    for k in range(len(op.outputs)):
        found = maps[k] if k < len(maps) else {}
        dims = [found[(pos, v.batch_dim)] for pos, v in enumerate(ins)
                if v is not None and v.batch_dim is not None and (pos, v.batch_dim) in found]
        tokens = {found.get((pos, d)) for pos, v in enumerate(ins) if v is not None for d in v.token_dims}
        result.append((dims[0] if dims else None, tuple(sorted(d for d in tokens if d is not None))))
    return result


# -- a Python loop over identical blocks, folded into a layer stack ---------------------------------------------------

BLOCK_INDEX = re.compile(r"(/|_)(\d+)/")
"""Where a parameter path may carry a block index: `blocks/3/attn/kernel` (NNX lists) or `layers_3/kernel` (Linen)."""


@dataclasses.dataclass(frozen=True)
class _Family:
    """Parameters that differ only in a block index: `blocks[i][suffix]` is block i's real path."""

    prefix: str
    sep: str
    blocks: list[dict[str, str]]

    def virtual(self, suffix: str) -> str:
        """The name of the stacked parameter standing for every block's `suffix` (never a real path: `*`)."""
        return f"{self.prefix}{self.sep}*/{suffix}"


@dataclasses.dataclass
class _Match:
    """How one block's ops read their operands, the same for every block (see `_match_head`)."""

    start: int
    period: int
    carries: dict[tuple[int, int], int]
    """(op offset in the block, output position) of a carry-out -> the value the first block reads instead."""
    carry_uses: set[tuple[int, int]]
    """(op offset in the block, operand position) where a block reads the previous block's carry."""


def _families(g: Graph) -> list[_Family]:
    """Candidate block families, the largest (most parameter elements) first: every `prefix/<i>/suffix` or
    `prefix_<i>/suffix` split of the parameter paths whose blocks are consecutive, at least two, and alike (same
    suffixes, shapes and dtypes)."""
    groups: dict[tuple[str, str], dict[int, dict[str, str]]] = {}
    for path in g.params:
        for m in BLOCK_INDEX.finditer(path):
            key = (path[:m.start()], m.group(1))
            groups.setdefault(key, {}).setdefault(int(m.group(2)), {})[path[m.end():]] = path
    out = []
    for (prefix, sep), by_index in groups.items():
        indices = sorted(by_index)
        if not prefix or len(indices) < 2 or indices != list(range(indices[0], indices[0] + len(indices))):
            continue
        blocks = [by_index[i] for i in indices]
        if all(_alike(g, b) == _alike(g, blocks[0]) for b in blocks[1:]):
            out.append(_Family(prefix, sep, blocks))
    size = lambda f: sum(g.params[p].size for b in f.blocks for p in b.values())  # noqa: E731
    return sorted(out, key=lambda f: (-size(f), len(f.prefix)))


def _alike(g: Graph, block: dict[str, str]) -> dict[str, tuple]:
    """What must agree between blocks' parameters: suffix -> shape, dtype, logical axes."""
    return {s: (g.params[p].shape, g.params[p].dtype, g.params[p].axes) for s, p in block.items()}


def _signature(op: Op, values: dict[int, Value], reprs: dict[int, tuple[Any, str]] | None = None) -> tuple:
    """What must agree between an op and its counterpart in the next block (operands are compared separately).
    `reprs`: parameter values printed, by identity (with the value, which keeps its id taken): ops share many
    (dtypes, None), so `repr(sorted(op.params.items()))` is put together from them."""
    items = sorted(op.params.items())  # (by key: keys differ, values are never compared)
    if reprs is None:
        printed = repr(items)
    else:
        parts = []
        for k, v in items:
            hit = reprs.get(id(v))
            if hit is None or hit[0] is not v:
                hit = reprs[id(v)] = (v, repr(v))
            parts.append(f"({k!r}, {hit[1]})")
        printed = f"[{', '.join(parts)}]"
    ins = tuple(None if i is None else (values[i].shape, values[i].dtype) for i in op.inputs)
    return (op.primitive, printed, op.count, op.in_layer, ins,
            tuple((values[o].shape, values[o].dtype) for o in op.outputs))


def fold_blocks(g: Graph, sigs: list[tuple] | None = None) -> Graph:
    """The graph with a Python loop over structurally identical blocks folded into a layer stack, as `_scan` builds
    for `lax.scan`, so the integer program does not grow with depth; `g` itself when there is no such loop (or it
    cannot be folded exactly: blocks that differ, values that skip a block). `sigs`: the ops' `_signature`s, if
    already worked out."""
    if g.layers > 1 or not g.ops:
        return g
    if sigs is None:
        reprs: dict[int, tuple[Any, str]] = {}
        sigs = [_signature(op, g.values, reprs) for op in g.ops]
    for family in _families(g):
        match = _find_cut(g, family, sigs)
        if match is not None:
            return _fold(g, family, match)
    return g


def _find_cut(g: Graph, family: _Family, sigs: list[tuple]) -> _Match | None:
    """Where blocks start: they are a period apart (the distance between their first parameter reads); the cut
    is any offset before that read at which every block's ops match the next block's. A LayerNorm computes its
    statistics before it reads its scale, so the cut may lie before the first read; the ops after the last block
    (a final norm) may look like a block's start, which gives extra carries: the cut with the fewest carries wins
    (of those with one carry, the earliest; else the latest). Each cut's first two blocks are compared first
    (`_match_head`), which gives its carries; the others (`_match_rest`) only for the cut that would win."""
    firsts = []
    for block in family.blocks:
        reads = [c for p in block.values() for c, _ in g.values[g.param_values[p]].consumers]
        if not reads:
            return None
        firsts.append(min(reads))
    n, period = len(firsts), firsts[1] - firsts[0]
    if period <= 0 or any(f != firsts[0] + i * period for i, f in enumerate(firsts)):
        return None
    same = [0]  # prefix sums of "op k matches op k + period"
    for k in range(len(sigs)):
        same.append(same[-1] + (k + period < len(sigs) and sigs[k] == sigs[k + period]))
    slots = {g.param_values[p]: (i, s) for i, b in enumerate(family.blocks) for s, p in b.items()}
    heads: list[tuple[int, _Match, list]] = []
    for offset in range(period):
        start = firsts[0] - offset
        if start < 0:
            break
        end = start + (n - 1) * period
        if end + period > len(g.ops) or same[end] - same[start] != end - start:
            continue
        head = _match_head(g, start, period, slots)
        if head is not None:
            heads.append((offset, *head))
    heads.sort(key=lambda h: (len(h[1].carries), h[0] if len(h[1].carries) == 1 else -h[0]))
    for _, match, kinds in heads:
        if _match_rest(g, family, match, kinds, slots):
            return match
    return None


def _operand_kind(g: Graph, vid: int | None, block: int, start: int, period: int, slots: dict[int, tuple]):
    """What a block-`block` operand is: a literal, its own block's parameter (by suffix), a value of its own block
    or of the previous one (by position), or a value defined before the first block; None: anything else."""
    if vid is None:
        return ("literal",)
    if vid in slots:
        owner, suffix = slots[vid]
        return ("param", suffix) if owner == block else None
    p = g.values[vid].producer
    if p is None or p < start:
        return ("outside", vid)
    j, r = divmod(p - start, period)
    where = (r, g.ops[p].outputs.index(vid))
    return ("inner", *where) if j == block else ("carry", *where) if j == block - 1 else None


def _match_head(g: Graph, start: int, period: int, slots: dict[int, tuple]) -> tuple[_Match, list] | None:
    """The blocks cut at `start`, as far as the first two show: how the second reads its operands (`_operand_kind`)
    the first reads the same way, but for carries (the second reads the first's output where the first reads a
    value from before the loop). The match (None: no such cut) and the second block's operand kinds."""
    if any(op.count != 1 or op.primitive == BOUNDARY for op in g.ops[start:start + period]):
        return None  # a loop inside another loop (a scan, a while loop, even one run once): left op by op
    carries: dict[tuple[int, int], int] = {}
    carry_uses: set[tuple[int, int]] = set()
    kinds: list = []
    for r in range(period):
        first, second = g.ops[start + r].inputs, g.ops[start + period + r].inputs
        for pos in range(len(first)):
            k0 = _operand_kind(g, first[pos], 0, start, period, slots)
            k1 = _operand_kind(g, second[pos], 1, start, period, slots)
            if k0 is None or k1 is None:
                return None
            kinds.append(k1)
            if k1[0] != "carry":
                if k0 != k1:
                    return None
                continue
            if k0[0] != "outside" or carries.setdefault(k1[1:], k0[1]) != k0[1]:
                return None
            carry_uses.add((r, pos))
    return (_Match(start, period, carries, carry_uses), kinds) if carries else None


def _match_rest(g: Graph, family: _Family, match: _Match, kinds: list, slots: dict[int, tuple]) -> bool:
    """The rest of the check `_match_head` begins: every later block reads its operands as the second does, and
    nothing but the last block's carries is used after the loop; a block's weights are read in that block only."""
    n, start, period, carries = len(family.blocks), match.start, match.period, match.carries
    values, ops = g.values, g.ops
    for i in range(2, n):  # `_operand_kind(g, vid, i, ...) == kinds[k]`, written out: this runs per operand
        base = start + i * period
        k = 0
        for r in range(period):
            for vid in ops[base + r].inputs:
                want = kinds[k]
                k += 1
                tag = want[0]
                if tag == "literal":
                    ok = vid is None
                elif tag == "param":
                    ok = slots.get(vid) == (i, want[1])
                elif tag == "outside":
                    ok = vid == want[1]
                else:  # a value of this block ("inner") or of the previous one ("carry"), by position
                    p = start + (i if tag == "inner" else i - 1) * period + want[1]
                    ok = (vid is not None and values[vid].producer == p and want[2] < len(ops[p].outputs)
                          and ops[p].outputs[want[2]] == vid)
                if not ok:
                    return False
    end = start + n * period
    inside = lambda vid: vid is not None and (p := values[vid].producer) is not None and start <= p < end  # noqa: E731
    if inside(g.output):
        return False
    for op in ops[end:]:  # what the ops after the loop read of it: the last block's carries only
        for vid in op.inputs:
            if inside(vid):
                j, r = divmod(values[vid].producer - start, period)
                if j != n - 1 or (r, ops[values[vid].producer].outputs.index(vid)) not in carries:
                    return False
    for vid, (i, _) in slots.items():  # a block's weights are read in that block only (no tied weights)
        if any(not start + i * period <= c < start + (i + 1) * period for c, _ in g.values[vid].consumers):
            return False
    return True


def _fold(g: Graph, family: _Family, match: _Match) -> Graph:
    """Keep the first block's ops (trip count x n, in the layer), a boundary op at each carry-in and one virtual
    stacked parameter per family member whose in-block value skips the layer dimension, like a scanned stack."""
    n, start, period = len(family.blocks), match.start, match.period
    end = start + n * period
    values = {vid: dataclasses.replace(v, consumers=[]) for vid, v in g.values.items()
              if (v.producer is None or v.producer < start + period or v.producer >= end)}
    for block in family.blocks[1:]:
        for path in block.values():
            values.pop(g.param_values[path])
    next_id = max(g.values) + 1
    ops: list[Op] = [dataclasses.replace(op, inputs=list(op.inputs)) for op in g.ops[:start]]
    boundary: dict[tuple[int, int], int] = {}
    for key, vid in match.carries.items():
        src = values[vid]
        boundary[key] = next_id
        values[next_id] = Value(next_id, src.shape, src.dtype, src.batch_dim, src.token_dims, producer=len(ops))
        ops.append(Op(len(ops), BOUNDARY, {}, [vid], [next_id], "layer_input", g.ops[start].count, False, 0.0))
        next_id += 1
    shift = len(ops) - start  # new index = old index + shift (block ops); old index - (n - 1) * period + shift after
    for r, op in enumerate(g.ops[start:start + period]):
        ins = [boundary[_carry_key(g, g.ops[start + period + r].inputs[pos], start)] if (r, pos) in match.carry_uses
               else vid for pos, vid in enumerate(op.inputs)]
        ops.append(dataclasses.replace(op, index=len(ops), inputs=ins, count=op.count * n, in_layer=True,
                                       eqns=tuple(e for j in range(n) for e in g.ops[start + j * period + r].eqns)))
    last = {g.ops[start + (n - 1) * period + r].outputs[o]: g.ops[start + r].outputs[o] for r, o in match.carries}
    for op in g.ops[end:]:
        ops.append(dataclasses.replace(op, index=len(ops), inputs=[last.get(i, i) for i in op.inputs]))
    for v in values.values():
        if v.producer is not None and v.producer >= start and v.id not in boundary.values():
            v.producer += shift if v.producer < start + period else shift - (n - 1) * period
    for op in ops:
        for pos, vid in enumerate(op.inputs):
            if vid is not None:
                values[vid].consumers.append((op.index, pos))
    params, param_values = _stack_params(g, family, values, next_id)
    carries = [(g.ops[start + r].outputs[o], boundary[(r, o)]) for r, o in match.carries]
    return Graph(values, ops, params, param_values, list(g.inputs), last.get(g.output, g.output), n, carries,
                 list(g.warnings), stack="loop", unfolded=g,
                 blocks={family.virtual(s): [b[s] for b in family.blocks] for s in family.blocks[0]})


def _carry_key(g: Graph, vid: int, start: int) -> tuple[int, int]:
    """(op offset in the block, output position) of a second-block operand that is the first block's carry-out."""
    p = g.values[vid].producer
    return p - start, g.ops[p].outputs.index(vid)


def _stack_params(g: Graph, family: _Family, values: dict[int, Value], next_id: int
                  ) -> tuple[dict[str, ParamInfo], dict[str, int]]:
    """Each family member as one stacked parameter [n, *shape]: a new value with no uses (as a scanned stack), and
    the first block's parameter value (and its casts / transposes) become its layer slice, dims shifted by one."""
    n = len(family.blocks)
    virtual = {path: (family.virtual(s), s) for s, path in family.blocks[0].items()}
    dropped = {p for b in family.blocks[1:] for p in b.values()}
    params: dict[str, ParamInfo] = {}
    param_values: dict[str, int] = {}
    for path, info in g.params.items():
        if path in dropped:
            continue
        if path not in virtual:
            params[path] = info
            if path in g.param_values:
                param_values[path] = g.param_values[path]
            continue
        name = virtual[path][0]
        params[name] = ParamInfo((n, *info.shape), info.dtype, ("layers", *info.axes) if info.axes else None)
        values[next_id] = Value(next_id, (n, *info.shape), info.dtype, param=name,
                                param_dims=tuple(range(len(info.shape) + 1)))
        param_values[name] = next_id
        next_id += 1
    for v in values.values():
        if v.param in virtual:
            v.param, v.param_dims = virtual[v.param][0], tuple(d + 1 for d in v.param_dims)
    return params, param_values
