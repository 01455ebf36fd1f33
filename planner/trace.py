"""Trace a loss function to a dataflow graph the planner can reason about.

The forward loss is traced with `jax.make_jaxpr` on abstract inputs (shapes only) and flattened into one list of
ops over SSA values. Calls (`jit`, `remat`, `custom_jvp`/`custom_vjp`) are inlined; a `scan` over stacked parameters
(the layer stack) is inlined once with a trip count, so a repeated layer is solved once. Each value knows which of
its dimensions is the global batch (split over the batch mesh axes) and, if it is a parameter or a layer slice of
one, which parameter dimension each of its dimensions is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
    step_flops: float | None = None
    """Matmul FLOPs of the whole training step (forward and backward, traced), when known."""

    def passes(self) -> float:
        """Training work over forward work: measured on the traced step, else the usual 3 (backward ~ 2x)."""
        fwd = sum(op.flops * op.count for op in self.ops if op.primitive in CONTRACTIONS)
        return self.step_flops / fwd if self.step_flops and fwd else 3.0



class _Tracer:
    def __init__(self) -> None:
        self.values: dict[int, Value] = {}
        self.ops: list[Op] = []
        self.layers = 1
        self.carries: list[tuple[int, int]] = []
        self.notes: list[str] = []

    def new_value(self, aval, **kw) -> int:
        vid = len(self.values)
        self.values[vid] = Value(vid, tuple(int(d) for d in aval.shape), str(aval.dtype), **kw)
        return vid

    def walk(self, jaxpr, env: dict, count: int, in_layer: bool) -> None:
        for eqn in jaxpr.eqns:
            ins = [None if jint.is_literal(v) else env[v] for v in eqn.invars]
            name = eqn.primitive.name
            body = jint.call_body(eqn)
            if body is not None:
                sub = body.jaxpr
                inner = dict(zip(sub.invars, ins[len(ins) - len(sub.invars):]))
                for v in sub.constvars:
                    inner[v] = self.new_value(v.aval)
                self.walk(sub, inner, count, in_layer)
                for out, sv in zip(eqn.outvars, sub.outvars):
                    env[out] = self._lookup(inner, sv)
            elif name == "scan":
                self._scan(eqn, ins, env, count, in_layer)
            else:
                if name in ("while", "cond"):
                    self.notes.append(f"{name} at {jint.name_stack(eqn)}: planned as one replicated op")
                self._op(eqn, ins, env, count, in_layer)

    def _lookup(self, env, var) -> int:
        if jint.is_literal(var):
            return self.new_value(var.aval)
        return env[var]

    def _op(self, eqn, ins, env, count, in_layer) -> None:
        index = len(self.ops)
        outs = []
        for v in eqn.outvars:
            vid = self.new_value(v.aval, producer=index)
            env[v] = vid
            outs.append(vid)
        params = jint.op_params(eqn)
        op = Op(index, eqn.primitive.name, params, ins, outs, jint.name_stack(eqn), count, in_layer,
                _flops(eqn))
        src = self.values[ins[0]] if len(ins) == 1 and ins[0] is not None else None
        if src is not None and src.param is not None and op.primitive in PARAM_VIEWS:
            # a cast or transpose of a weight is that weight, laid out the same way (a bf16 copy, a tied head)
            perm = params.get("permutation", range(len(src.param_dims)))
            self.values[outs[0]].param = src.param
            self.values[outs[0]].param_dims = tuple(src.param_dims[i] for i in perm)
        self.ops.append(op)
        for pos, vid in enumerate(ins):
            if vid is not None:
                self.values[vid].consumers.append((index, pos))

    def _boundary(self, vid: int, aval, count: int) -> int:
        index = len(self.ops)
        out = self.new_value(aval, producer=index)
        self.ops.append(Op(index, BOUNDARY, {}, [vid], [out], "layer_input", count, False, 0.0))
        self.values[vid].consumers.append((index, 0))
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
        self.walk(sub, inner, count * length, in_layer or is_layers)
        outs = [self._lookup(inner, v) for v in sub.outvars]
        for k, (out, vid) in enumerate(zip(eqn.outvars, outs)):
            if k < ncarry:
                env[out] = vid
                self.carries.append((vid, inner[sub.invars[nc + k]]))
            else:  # stacked per-iteration outputs: a fresh value with the leading trip-count dimension
                env[out] = self.new_value(out.aval)


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
          param_infos: dict[str, ParamInfo], batch_dims: Any = 0) -> Graph:
    """Trace `fn(params, batch) -> scalar loss`. `param_paths` names the leaves of `params` in flatten order.

    `batch_dims`: the batch dimension of each batch leaf (an int for all leaves, or a matching pytree; -1 for an
    input without one).
    """
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
    _propagate_batch_dims(t)
    for note in t.notes:
        warnings.warn(note, stacklevel=2)
    return Graph(t.values, t.ops, dict(param_infos), param_values, inputs, out, t.layers, t.carries, t.notes)


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


def _propagate_batch_dims(t: _Tracer) -> None:
    """Forward pass: which output dimension carries the batch, from the operands' batch dimensions."""
    from planner.layouts import map_dim  # shared dimension-mapping rules

    for op in t.ops:
        ins = [t.values[i] if i is not None else None for i in op.inputs]
        for k, out in enumerate(op.outputs):
            dims = []
            for pos, v in enumerate(ins):
                if v is not None and v.batch_dim is not None:
                    d = map_dim(op, t.values, pos, v.batch_dim, k)
                    if d is not None:
                        dims.append(d)
            if dims:
                t.values[out].batch_dim = dims[0]
            tokens = {map_dim(op, t.values, pos, d, k) for pos, v in enumerate(ins) if v is not None
                      for d in v.token_dims}
            t.values[out].token_dims = tuple(sorted(d for d in tokens if d is not None))
