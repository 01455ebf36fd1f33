"""Softmax attention written by hand, found in a jaxpr: q.k^T -> (scale) -> (mask) -> softmax -> probs.v.

Sequence parallelism (`autoshard.sequence`) runs `ops.attention`; models that write attention themselves
(`jax.nn.dot_product_attention`, flax's `dot_product_attention` / `MultiHeadAttention`, einsums) are found here so
that `autoshard.attention_rewrite` can run them as that op. The search is an abstract interpretation: from each
`dot_general` A it follows the values computed from A's output (the scores), tracking for each which score axis
each of its axes is and what it is of the scores: `lin` (scale * scores + bias, where a mask keeps them, else a
very negative fill), `row` (constant along the key axis: the row max and whatever the softmax does with it),
`exp`, `sum` (its row sum), `inv` (1 / sum) and `prob` (exp / sum). A `dot_general` B that contracts a `prob`
with an outside value v over the key axis ends the match. Masks, fills, scales and biases must be constants of
the program (literals, closed-over arrays, `iota` arithmetic): they are folded with numpy (`Scope.fold`), kept
compact (size 1 along the axes they do not vary on), so a [S, T] causal mask costs [S, T], not [B, H, S, T].
One exception: a `jnp.where` mask computed from the inputs that is, possibly ANDed with constants, one value
varying over batch and key positions only (a padding mask, `_dynamic_select`, `_mask_operand`) becomes the match's
`key_mask`, which `ops.attention` takes; ANDed with one more value varying over batch and query positions only (flax's
`make_attention_mask(keep, keep)`: keep[b, q] & keep[b, k]) that one becomes its `query_mask` (the rewrite gives
masked query rows what the dense softmax over a finite fill gives them: the mean of the values). Other masks from the
inputs (varying over heads, or over query and key positions in one value) stay dense.

A tanh of the scaled scores before any mask or bias (gemma-2's soft cap, cap * tanh(scores / cap)) is folded into
`lin` as well (`_Sym.cap`) and becomes the match's `softcap`. Queries and keys may come from sequences of different
lengths (cross-attention: `Match.kv_len`), unmasked or with a key mask; a causal or other constant mask between
them stays dense.

The module is read-only over jaxprs (it imports neither `autoshard` nor the model) and sees through calls
(`jit`, `custom_jvp_call`, `remat`, ...) inside a match; `find` also looks inside the bodies of inlined calls,
`scan` loops and `remat`, where the rewrite can reach (`Level`).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from planner import jax_internals as jint

FOLD_LIMIT = 1 << 26
"""The most elements a folded constant may have (a [8192, 8192] mask); larger masks are left unknown."""
VERY_NEGATIVE = -1e4
"""A masked score at or below this has probability 0 after the softmax (exp underflows in float32)."""
RECURSE = frozenset({*jint.INLINE_CALLS, "scan", "remat", "remat2", "checkpoint"})
"""Equations whose bodies the rewrite can re-run with a match replaced (`autoshard.attention_rewrite`)."""
_LAYOUT = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision"})
_ROW_OK = frozenset({"max", "min", "add", "sub", "mul", "div", "neg", "select_n", "is_finite", "stop_gradient",
                     "convert_element_type", "log", "not", "and", "or", "eq", "ne", "gt", "ge", "lt", "le",
                     "copy", "copy_p"})
"""Elementwise ops that keep a row statistic a row statistic (softmax subtracts any of them: it cancels)."""


class _NoMatch(Exception):
    """The values followed from a dot_general are not attention (or not in a form this module knows)."""


# -- constants of the program, folded with numpy -------------------------------------------------------------------
_NUMPY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "max": np.maximum, "min": np.minimum, "neg": np.negative,
    "abs": np.abs, "eq": np.equal, "ne": np.not_equal, "gt": np.greater, "ge": np.greater_equal, "lt": np.less,
    "le": np.less_equal, "exp": np.exp, "log": np.log, "sign": np.sign, "floor": np.floor, "ceil": np.ceil,
    "is_finite": np.isfinite, "stop_gradient": lambda x: x, "copy": lambda x: x, "copy_p": lambda x: x,
}


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """lax.div: true division for floats, rounding toward zero for integers."""
    if np.issubdtype(np.result_type(a, b), np.integer):
        return np.fix(np.true_divide(a, b)).astype(np.result_type(a, b))
    return np.true_divide(a, b)


def _logical(name: str, *xs: np.ndarray) -> np.ndarray:
    """lax.and/or/xor/not: logical on booleans, bitwise on integers."""
    boolean = all(x.dtype == np.bool_ for x in xs)
    fn = {"and": (np.logical_and, np.bitwise_and), "or": (np.logical_or, np.bitwise_or),
          "xor": (np.logical_xor, np.bitwise_xor), "not": (np.logical_not, np.invert)}[name][0 if boolean else 1]
    return fn(*xs)


class Scope:
    """One jaxpr level: which of its values are constants of the program, and their values (`fold`).

    `links` ties the level's inputs to values of the level that calls it (a call's operands, a scan's consts), so a
    mask built outside a layer body is still a constant inside it."""

    def __init__(self, body: jint.Body, links: dict[Any, tuple[Scope, Any]] | None = None):
        self.body = body
        self.links = links or {}
        self.consts = dict(zip(body.jaxpr.constvars, body.consts))
        self.producer: dict[Any, tuple[int, Any]] = {}
        self.consumers: dict[Any, list[int]] = {}
        for i, eqn in enumerate(body.jaxpr.eqns):
            for v in eqn.outvars:
                self.producer[v] = (i, eqn)
            for v in eqn.invars:
                if not jint.is_literal(v):
                    self.consumers.setdefault(v, []).append(i)
        self._dynamic: set[Any] | None = None
        self._folded: dict[Any, np.ndarray | None] = {}

    def is_dynamic(self, var: Any) -> bool:
        """Whether `var` depends on the program's inputs (not a constant of it)."""
        if jint.is_literal(var):
            return False
        if self._dynamic is None:
            self._dynamic = self._find_dynamic()
        return var in self._dynamic

    def _find_dynamic(self) -> set[Any]:
        """Forward pass: inputs not linked to a constant outside, and everything computed from them."""
        dynamic = {v for v in self.body.jaxpr.invars
                   if v not in self.links or self.links[v][0].is_dynamic(self.links[v][1])}
        for eqn in self.body.jaxpr.eqns:
            if eqn.effects or any(not jint.is_literal(v) and v in dynamic for v in eqn.invars):
                dynamic.update(eqn.outvars)
        return dynamic

    def fold(self, var: Any) -> np.ndarray | None:
        """The value of a constant `var`, compact (the full value broadcasts from it; size 1 along the axes it
        does not vary on), None if it is not a constant or too large to fold."""
        if jint.is_literal(var):
            return np.asarray(var.val)
        if var in self._folded:
            return self._folded[var]
        out = None
        if not self.is_dynamic(var):
            try:
                out = self._fold(var)
            except (TypeError, ValueError, KeyError, NotImplementedError, OverflowError):
                out = None
        if out is not None and out.size > FOLD_LIMIT:
            out = None
        self._folded[var] = out
        return out

    def _fold(self, var: Any) -> np.ndarray | None:
        if var in self.consts:
            return np.asarray(self.consts[var])
        if var in self.links:
            scope, outer = self.links[var]
            return scope.fold(outer)
        if var not in self.producer:
            return None
        _, eqn = self.producer[var]
        return _fold_eqn(self, eqn, list(eqn.outvars).index(var))


def _fold_eqn(scope: Scope, eqn: Any, out: int) -> np.ndarray | None:
    """Fold output `out` of a constant equation (numpy rules for the primitives masks are made of; any other
    small one is run by jax itself)."""
    name, p = eqn.primitive.name, eqn.params
    body = jint.call_body(eqn) if name in jint.CALLS else None
    if body is not None:
        skip = len(eqn.invars) - len(body.jaxpr.invars)
        child = Scope(body, {v: (scope, o) for v, o in zip(body.jaxpr.invars, eqn.invars[skip:])})
        return child.fold(body.jaxpr.outvars[out])
    shape = tuple(eqn.outvars[out].aval.shape)
    if name == "iota":
        d = p["dimension"]
        return np.arange(shape[d], dtype=np.dtype(p["dtype"])).reshape([-1 if i == d else 1 for i in range(len(shape))])
    ins = [scope.fold(v) for v in eqn.invars]
    if any(x is None for x in ins):
        return None
    return _fold_values(eqn, ins, shape)


def _fold_values(eqn: Any, ins: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray | None:
    name, p = eqn.primitive.name, eqn.params
    if name == "broadcast_in_dim":
        dims = list(p["broadcast_dimensions"])
        x = ins[0]
        return x.reshape([x.shape[dims.index(d)] if d in dims else 1 for d in range(len(shape))])
    if name == "convert_element_type":
        return ins[0].astype(np.dtype(p["new_dtype"]))
    if name == "transpose":
        return np.transpose(ins[0], p["permutation"])
    if name == "squeeze":
        return np.squeeze(ins[0], axis=tuple(p["dimensions"]))
    if name in _NUMPY:
        return np.asarray(_NUMPY[name](*ins))
    if name == "div":
        return _div(*ins)
    if name in ("and", "or", "xor", "not"):
        return _logical(name, *ins)
    if name == "select_n":
        which, cases = ins[0], ins[1:]
        out = np.asarray(cases[0])
        for i, case in enumerate(cases[1:], 1):
            out = np.where(which == i if which.dtype != np.bool_ else which == bool(i), case, out)
        return out
    if math.prod(shape) > (1 << 20):
        return None
    return _fold_with_jax(eqn, [np.broadcast_to(x, v.aval.shape) for x, v in zip(ins, eqn.invars)])


def _fold_with_jax(eqn: Any, ins: list[np.ndarray]) -> np.ndarray | None:
    """Any other constant equation (a `reshape`, `cumsum`, ...), run eagerly by jax."""
    import jax

    if eqn.primitive.multiple_results:
        return None
    with jax.ensure_compile_time_eval():
        return np.asarray(jint.bind_eqn(eqn, ins)[0])


# -- what a value is of the scores ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Sym:
    """A value computed from the scores S of dot A. `dims`: per axis, the score axis it is (None: an axis of size
    1, or for row statistics an axis they are constant along). `lin` = where(keep, scale * S + bias, fill)."""

    kind: str
    dims: tuple[int | None, ...]
    scale: float = 1.0
    keep: np.ndarray | None = None
    bias: np.ndarray | None = None
    fill: float = -math.inf
    token: int = 0
    """Which `exp` an exp / sum / inv / prob comes from (the division must be by that exp's own sum)."""
    problems: tuple[str, ...] = ()
    masks: tuple[tuple[Any, tuple[int | None, ...]], ...] = ()
    """Masks computed from the inputs that `keep` is ANDed with: values of the match's level and, per axis, the
    score axis it is (None: size 1). `_finish` checks they are a key mask (batch and key axes only) and at most one
    query mask (batch and query axes only)."""
    mixed_fill: bool = False
    """Whether masked scores are set to more than one fill value (a fully masked row is then not uniform)."""
    cap: float | None = None
    """A soft cap (gemma-2): the scale inside its tanh, `lin` = where(keep, scale * tanh(cap * S) + bias, fill)
    (`scale` is then the cap's own multiplier)."""


@dataclasses.dataclass
class _Region:
    """One candidate: dot A at `start`, what is known so far."""

    scope: Scope
    start: int
    rank: int
    key: int | None = None
    tokens: int = 0
    covered: set[int] = dataclasses.field(default_factory=set)


def _to_scores(region: _Region, dims: tuple[int | None, ...], value: np.ndarray) -> np.ndarray:
    """A compact constant laid out like a value with `dims`, in score-axis order (compact, rank of the scores)."""
    value = np.asarray(value)
    if value.ndim == 0:
        return value.reshape((1,) * region.rank)
    if value.ndim != len(dims):
        raise _NoMatch("constant of another rank")
    out_shape = [1] * region.rank
    order, keep_axes = [], []
    for axis, d in enumerate(dims):
        if d is None:
            if value.shape[axis] != 1:
                raise _NoMatch("constant varies along a broadcast axis")
            continue
        keep_axes.append(axis)
        order.append(d)
        out_shape[d] = value.shape[axis]
    squeezed = value.reshape([value.shape[a] for a in keep_axes])
    perm = sorted(range(len(order)), key=lambda i: order[i])
    full = np.transpose(squeezed, perm)
    return full.reshape(out_shape)


def _scalar(value: np.ndarray | None) -> float | None:
    """The single value a constant holds everywhere, None if it varies (or is unknown)."""
    if value is None:
        return None
    flat = np.asarray(value, dtype=np.float64).ravel()
    return float(flat[0]) if flat.size and np.all(flat == flat[0]) else None


# -- following the scores ---------------------------------------------------------------------------------------------
_ROWLIKE = frozenset({"row", "sum", "inv"})


def _relayout(eqn: Any, sym: _Sym) -> _Sym:
    """A transpose, reshape, broadcast or cast of a tracked value: which score axis each new axis is."""
    name, p = eqn.primitive.name, eqn.params
    src = tuple(eqn.invars[0].aval.shape)
    out = tuple(eqn.outvars[0].aval.shape)
    if name in _LAYOUT:
        return sym
    if name == "transpose":
        return dataclasses.replace(sym, dims=tuple(sym.dims[i] for i in p["permutation"]))
    if name == "squeeze":
        gone = {d % len(src) for d in p["dimensions"]}
        return dataclasses.replace(sym, dims=tuple(d for i, d in enumerate(sym.dims) if i not in gone))
    if name == "broadcast_in_dim":
        where = list(p["broadcast_dimensions"])
        dims: list[int | None] = [None] * len(out)
        for i, j in enumerate(where):
            dims[j] = sym.dims[i]
            if src[i] != out[j] and sym.kind not in _ROWLIKE:
                raise _NoMatch("scores broadcast")
        if sym.kind not in _ROWLIKE and any(out[j] != 1 for j in range(len(out)) if j not in where):
            raise _NoMatch("scores broadcast")
        return dataclasses.replace(sym, dims=tuple(dims))
    if name == "reshape" and [n for n in src if n != 1] == [n for n in out if n != 1]:
        big = iter(d for d, n in zip(sym.dims, src) if n != 1)
        return dataclasses.replace(sym, dims=tuple(next(big) if n != 1 else None for n in out))
    raise _NoMatch(f"{name} of the scores")


def _reduce(region: _Region, eqn: Any, sym: _Sym) -> _Sym:
    """reduce_max of the scores (a row statistic) or reduce_sum of their exp (the softmax's denominator)."""
    axes = {a % len(sym.dims) for a in eqn.params["axes"]}
    shape = eqn.invars[0].aval.shape
    reduced = {sym.dims[a] for a in axes if shape[a] != 1}
    if len(reduced) != 1 or None in reduced:
        raise _NoMatch("not a reduction over one score axis")
    key = reduced.pop()
    if region.key is not None and region.key != key:
        raise _NoMatch("reductions over different axes")
    region.key = key
    want = {"reduce_max": "lin", "reduce_sum": "exp"}[eqn.primitive.name]
    if sym.kind != want:
        raise _NoMatch(f"{eqn.primitive.name} of a {sym.kind}")
    dims = tuple(d for i, d in enumerate(sym.dims) if i not in axes)
    return _Sym("row" if want == "lin" else "sum", dims, token=sym.token, problems=sym.problems)


def _agree(region: _Region, big: _Sym, row: _Sym) -> None:
    """A row statistic combined with scores must be constant along the key axis and line up axis by axis."""
    if len(big.dims) != len(row.dims):
        raise _NoMatch("operands of different rank")
    for b, r in zip(big.dims, row.dims):
        if r is not None and (r != b or r == region.key):
            raise _NoMatch("a row statistic that varies along the key axis")


def _merge_rows(syms: list[_Sym], kind: str = "row", token: int = 0) -> _Sym:
    dims = list(syms[0].dims)
    for s in syms[1:]:
        if len(s.dims) != len(dims):
            raise _NoMatch("row statistics of different rank")
        for i, d in enumerate(s.dims):
            if d is not None and dims[i] not in (None, d):
                raise _NoMatch("row statistics over different axes")
            dims[i] = dims[i] if d is None else d
    return _Sym(kind, tuple(dims), token=token, problems=tuple(p for s in syms for p in s.problems))


def _combine(region: _Region, scope: Scope, eqn: Any, ins: list[_Sym | None]) -> _Sym:
    """An elementwise equation with at least one tracked operand."""
    name = eqn.primitive.name
    tracked = [s for s in ins if s is not None]
    kinds = sorted(s.kind for s in tracked)
    if all(s.kind in _ROWLIKE for s in tracked):
        return _rows(scope, eqn, ins)
    if name == "select_n":
        return _select(region, scope, eqn, ins)
    if kinds == ["lin"]:
        return _lin_const(region, scope, eqn, ins)
    if kinds == ["lin", "row"] and name in ("sub", "add"):
        big, row = (ins[0], ins[1]) if ins[0].kind == "lin" else (ins[1], ins[0])
        _agree(region, big, row)
        return big
    if (name, kinds) in (("div", ["exp", "sum"]), ("mul", ["exp", "inv"])):
        e = next(s for s in tracked if s.kind == "exp")
        d = next(s for s in tracked if s.kind != "exp")
        if e.token != d.token or (name == "div" and ins[0] is not e):
            raise _NoMatch("normalised by another sum")
        _agree(region, e, d)
        return dataclasses.replace(e, kind="prob")
    if kinds == ["prob"] and name in ("mul", "div"):
        p = tracked[0]
        return dataclasses.replace(p, problems=p.problems + ("the probabilities are scaled or dropped out "
                                                             "(dropout) before the product with the values",))
    raise _NoMatch(f"{name} of {kinds}")


def _rows(scope: Scope, eqn: Any, ins: list[_Sym | None]) -> _Sym:
    """Elementwise ops of row statistics (and constants): still a row statistic; 1 / sum is its inverse."""
    name = eqn.primitive.name
    tracked = [s for s in ins if s is not None]
    if name == "div" and ins[0] is None and ins[1].kind == "sum" and _scalar(scope.fold(eqn.invars[0])) == 1.0:
        return dataclasses.replace(ins[1], kind="inv")
    if name == "integer_pow" and eqn.params.get("y") == -1 and tracked[0].kind == "sum":
        return dataclasses.replace(tracked[0], kind="inv")
    if name not in _ROW_OK or any(s.kind != "row" for s in tracked):
        raise _NoMatch(f"{name} of a softmax statistic")
    if any(s is None and scope.is_dynamic(v) for s, v in zip(ins, eqn.invars)):
        raise _NoMatch("a row statistic mixed with an input")
    return _merge_rows(tracked)


def _lin_const(region: _Region, scope: Scope, eqn: Any, ins: list[_Sym | None]) -> _Sym:
    """Scores times / over a constant (the scale), plus / minus a constant (an additive mask or bias), exp."""
    name = eqn.primitive.name
    sym = next(s for s in ins if s is not None)
    if name == "exp":
        region.tokens += 1
        return dataclasses.replace(sym, kind="exp", token=region.tokens)
    if name == "tanh":
        return _soft_cap(sym)
    if len(ins) != 2:
        raise _NoMatch(f"{name} of the scores")
    other = eqn.invars[1] if ins[0] is sym else eqn.invars[0]
    value = scope.fold(other)
    if value is None:
        if name in ("add", "sub") and scope.is_dynamic(other):
            return dataclasses.replace(sym, problems=sym.problems + ("an additive mask computed from the inputs",))
        raise _NoMatch(f"{name} of the scores by an input")
    if name in ("mul", "div") and (ins[0] is sym or name == "mul"):
        c = _scalar(value)
        if c is None or c <= 0:
            raise _NoMatch("scores scaled by a non-constant")
        c = c if name == "mul" else 1.0 / c
        bias = None if sym.bias is None else sym.bias * c
        return dataclasses.replace(sym, scale=sym.scale * c, bias=bias, fill=sym.fill * c)
    if name == "add" or (name == "sub" and ins[0] is sym):
        m = _to_scores(region, sym.dims, value.astype(np.float64)) * (1 if name == "add" else -1)
        return dataclasses.replace(sym, bias=m if sym.bias is None else sym.bias + m)
    raise _NoMatch(f"{name} of the scores")


def _soft_cap(sym: _Sym) -> _Sym:
    """tanh of the scaled scores, the soft cap of gemma-2 (cap * tanh(scores / cap)): elementwise, so ring and
    Ulysses cap each block. Only of scores not yet masked, biased or capped (tanh of a mask's fill is no mask)."""
    if sym.cap is not None or sym.keep is not None or sym.bias is not None or sym.masks:
        return dataclasses.replace(sym, problems=sym.problems + ("a tanh of masked, biased or capped scores",))
    return dataclasses.replace(sym, cap=sym.scale, scale=1.0)


def _select(region: _Region, scope: Scope, eqn: Any, ins: list[_Sym | None]) -> _Sym:
    """jnp.where(mask, scores, fill): a constant mask keeps the scores where it picks them."""
    cases = ins[1:]
    picked = [i for i, s in enumerate(cases) if s is not None]
    if ins[0] is not None or len(picked) != 1 or cases[picked[0]].kind != "lin":
        raise _NoMatch("select of the scores")
    sym, case = cases[picked[0]], picked[0]
    fills = [_scalar(scope.fold(v)) for i, v in enumerate(eqn.invars[1:]) if i != case]
    if any(f is None for f in fills):
        raise _NoMatch("scores selected against a non-constant")
    pred = scope.fold(eqn.invars[0])
    masked = sym.keep is not None or bool(sym.masks)
    fill = max(fills) if not masked else max(max(fills), sym.fill)
    mixed = sym.mixed_fill or len(set(fills)) > 1 or (masked and fills[0] != sym.fill)
    sym = dataclasses.replace(sym, mixed_fill=mixed)
    if pred is None:
        return _dynamic_select(region, scope, eqn.invars[0], sym, case, fill)
    pred = _to_scores(region, sym.dims, pred)
    keep = (pred == case) if pred.dtype != np.bool_ else (pred == bool(case))
    return dataclasses.replace(sym, keep=keep if sym.keep is None else sym.keep & keep, fill=fill)


def _dynamic_select(region: _Region, scope: Scope, pred: Any, sym: _Sym, case: int, fill: float) -> _Sym:
    """jnp.where(mask, scores, fill) with a mask computed from the inputs: split into its constant part (a causal
    mask, kept in `keep`) and the values of the match's level it is ANDed with (`masks`), which `_finish` accepts
    if they are a key (padding) mask and at most one query mask. Anything else stays dense: "a mask computed from
    the inputs"."""
    unsupported = dataclasses.replace(sym, problems=sym.problems + ("a mask computed from the inputs",))
    if case != 1 or sym.masks or pred.aval.dtype != np.bool_:
        return unsupported
    try:
        keep, leaves = _mask_terms(region, scope, pred, sym.dims)
    except _NoMatch:
        return unsupported
    if not leaves:  # a constant too large to fold
        return unsupported
    if keep is not None:
        keep = keep if sym.keep is None else sym.keep & keep
    return dataclasses.replace(sym, keep=keep if keep is not None else sym.keep, fill=fill, masks=leaves)


_TRUTH = frozenset({"convert_element_type", "copy", "copy_p"})
_MASK_LAYOUT = frozenset({"broadcast_in_dim", "transpose", "reshape", "squeeze"})


_Leaf = tuple[Any, tuple[int | None, ...]]


def _mask_terms(region: _Region, scope: Scope, var: Any, dims: tuple[int | None, ...]
                ) -> tuple[np.ndarray | None, tuple[_Leaf, ...]]:
    """A boolean mask (`var` of `scope`, its axes the score axes `dims`) as a constant keep in score layout (or
    None) AND at most two values of the match's level (with their score axes), by following it back through
    relayouts, `and`, truthiness-preserving casts, `x != 0` and calls. A dynamic value is the deepest one reached
    at the match's level, so a mask broadcast from [B, T] is found as [B, T]."""
    value = scope.fold(var)
    if value is not None:
        return _to_scores(region, dims, np.asarray(value) != 0), ()
    if scope is not region.scope and var in scope.links:
        parent, outer = scope.links[var]
        return _mask_terms(region, parent, outer, dims)
    eqn = scope.producer.get(var, (None, None))[1]
    name = None if eqn is None else eqn.primitive.name
    try:
        if name in jint.CALLS and jint.call_body(eqn) is not None:
            body = jint.call_body(eqn)
            skip = len(eqn.invars) - len(body.jaxpr.invars)
            child = Scope(body, {v: (scope, o) for v, o in zip(body.jaxpr.invars, eqn.invars[skip:])})
            return _mask_terms(region, child, body.jaxpr.outvars[list(eqn.outvars).index(var)], dims)
        if name == "and":
            return _and_terms(region, scope, eqn, dims)
        if name in _MASK_LAYOUT or (name in _TRUTH and _keeps_truth(eqn)):
            return _mask_terms(region, scope, eqn.invars[0], _mask_dims(eqn, dims))
        if name == "ne" and _scalar(scope.fold(eqn.invars[1])) == 0.0 and not jint.is_literal(eqn.invars[0]):
            return _mask_terms(region, scope, eqn.invars[0], dims)
    except _NoMatch:
        pass
    if scope is not region.scope:
        raise _NoMatch("a mask computed inside a call")
    return None, ((var, dims),)


def _and_terms(region: _Region, scope: Scope, eqn: Any, dims: tuple[int | None, ...]
               ) -> tuple[np.ndarray | None, tuple[_Leaf, ...]]:
    """Both operands of a mask's `and`: their constant parts ANDed, at most two dynamic values between them."""
    keep, leaves = None, ()
    shape = tuple(eqn.outvars[0].aval.shape)
    for operand in eqn.invars:
        src = tuple(operand.aval.shape)
        if src and len(src) != len(shape):
            raise _NoMatch("an and of masks of other ranks")
        # operands broadcast along their axes of size 1 (and scalars everywhere)
        k, lf = _mask_terms(region, scope, operand, tuple(d if n == m else None for d, n, m in zip(dims, src, shape)))
        leaves += lf
        if len(leaves) > 2:
            raise _NoMatch("more than two masks computed from the inputs")
        if k is not None:
            keep = k if keep is None else keep & k
    return keep, leaves


def _keeps_truth(eqn: Any) -> bool:
    """Whether a cast keeps which elements are nonzero: from bool, to bool, or from an integer."""
    src, dst = np.dtype(eqn.invars[0].aval.dtype), np.dtype(eqn.outvars[0].aval.dtype)
    return src == np.bool_ or dst == np.bool_ or np.issubdtype(src, np.integer)


def _mask_dims(eqn: Any, dims: tuple[int | None, ...]) -> tuple[int | None, ...]:
    """The score axes of a relayout's operand, given those of its result (None: the operand has size 1 there)."""
    name, p = eqn.primitive.name, eqn.params
    src = tuple(eqn.invars[0].aval.shape)
    out = tuple(eqn.outvars[0].aval.shape)
    if name in _TRUTH:
        return dims
    if name == "broadcast_in_dim":
        return tuple(dims[j] if src[i] == out[j] else None for i, j in enumerate(p["broadcast_dimensions"]))
    if name == "transpose":
        inv = [0] * len(src)
        for j, i in enumerate(p["permutation"]):
            inv[i] = dims[j]
        return tuple(inv)
    if name == "squeeze":
        gone = {d % len(src) for d in p["dimensions"]}
        it = iter(dims)
        return tuple(None if i in gone else next(it) for i in range(len(src)))
    if name == "reshape" and [n for n in src if n != 1] == [n for n in out if n != 1]:
        big = iter(d for d, n in zip(dims, out) if n != 1)
        return tuple(next(big) if n != 1 else None for n in src)
    raise _NoMatch(f"{name} of a mask")


def _call(region: _Region, scope: Scope, eqn: Any, ins: list[_Sym | None]) -> list[_Sym | None]:
    """A call (jit, custom_jvp, remat, ...) inside the match: follow the scores through its body."""
    body = jint.call_body(eqn)
    skip = len(eqn.invars) - len(body.jaxpr.invars)
    child = Scope(body, {v: (scope, o) for v, o in zip(body.jaxpr.invars, eqn.invars[skip:])})
    states = {v: s for v, s in zip(body.jaxpr.invars, ins[skip:]) if s is not None}
    for inner in body.jaxpr.eqns:
        if any(not jint.is_literal(v) and v in states for v in inner.invars):
            for v, s in zip(inner.outvars, _step(region, child, inner, states)):
                if s is not None:
                    states[v] = s
    return [None if jint.is_literal(v) else states.get(v) for v in body.jaxpr.outvars]


def _step(region: _Region, scope: Scope, eqn: Any, states: dict[Any, _Sym]) -> list[_Sym | None]:
    """What each output of `eqn` is of the scores, given what its tracked operands are."""
    name = eqn.primitive.name
    ins = [None if jint.is_literal(v) else states.get(v) for v in eqn.invars]
    if name in jint.CALLS:
        return _call(region, scope, eqn, ins)
    if len(eqn.outvars) != 1 or name == "dot_general":
        raise _NoMatch(f"{name} of the scores")
    sym = next(s for s in ins if s is not None)
    if name in _LAYOUT or name in ("transpose", "squeeze", "broadcast_in_dim", "reshape"):
        return [_relayout(eqn, sym)]
    if name in ("reduce_max", "reduce_sum"):
        return [_reduce(region, eqn, sym)]
    if name == "stop_gradient" and sym.kind not in _ROWLIKE:
        raise _NoMatch("gradient stopped on the scores")
    return [_combine(region, scope, eqn, ins)]


# -- a match, in the canonical layout of `ops.attention` --------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Operand:
    """An input of the match and how it becomes canonical: transpose by `perm`, then reshape to `shape`
    (q: [B, S, H, D]; k, v: [B, T, Hkv, D])."""

    var: Any
    perm: tuple[int, ...]
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Match:
    """One attention found at one jaxpr level (equation indices are that level's)."""

    dots: tuple[int, int]
    """The q.k^T and probs.v dot_generals."""
    covered: frozenset[int]
    """Every equation the attention replaces (the dots and what lies between them on the scores)."""
    q: Operand
    k: Operand
    v: Operand
    scale: float
    """The logits are scale * q.k (canonical q and k), before the soft cap when there is one."""
    mask: str
    """"none", "causal", or what else it is ("sliding window of 4", "arbitrary", ...)."""
    problems: tuple[str, ...]
    """Why it cannot run as `ops.attention` (empty: it can)."""
    out: Any
    """The probs.v result: canonical [B, S, H, D] reshaped to `out_shape`, then transposed by `out_perm`."""
    out_shape: tuple[int, ...]
    out_perm: tuple[int, ...]
    key_mask: Operand | None = None
    """A key (padding) mask computed from the inputs, ANDed with `mask`: its value becomes [B or 1, T or 1] by
    `perm` and `shape`, nonzero = attend; it broadcasts to `ops.attention`'s key_mask [B, T]."""
    query_mask: Operand | None = None
    """A query mask computed from the inputs, ANDed with `mask` and `key_mask` (flax's `make_attention_mask(keep,
    keep)`): its value becomes [B or 1, S or 1]; a query row where it is zero has every key masked by a finite
    very negative fill, so the model's softmax is uniform there: its output is the mean of v over all keys."""
    window: int | None = None
    """With a causal sliding-window `mask`, its width w (query i sees keys i-w < j <= i): `ops.attention`'s
    `window`."""
    softcap: float | None = None
    """A soft cap (gemma-2): the logits are softcap * tanh(scale * q.k / softcap) before the mask and softmax,
    `ops.attention`'s `softcap`."""

    @property
    def supported(self) -> bool:
        return not self.problems

    @property
    def causal(self) -> bool:
        """Whether ops.attention runs it causal (plain, or within `window`)."""
        return self.mask == "causal" or self.window is not None

    @property
    def heads(self) -> int:
        return self.q.shape[2]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def seq_len(self) -> int:
        return self.q.shape[1]

    @property
    def kv_len(self) -> int:
        """The key length: seq_len for self-attention, the other sequence's for cross-attention."""
        return self.k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]


@dataclasses.dataclass(frozen=True)
class _QK:
    """Roles of dot A's axes: which operand is q, which k, and what each of their axes is."""

    q: Any
    k: Any
    batch: tuple[int, int, int] | None
    """(q axis, k axis, score axis) of the batch, None when there is none."""
    heads: tuple[tuple[int, int, int], ...]
    """(q axis, k axis, score axis) of the kv heads, in k's order."""
    q_seq: tuple[int, int]
    """(q axis, score axis) of the query positions."""
    groups: tuple[tuple[int, int], ...]
    """(q axis, score axis) of the query heads per kv head (grouped-query)."""
    k_seq: int
    k_ones: tuple[int, ...]
    """Other free axes of k (size 1)."""
    q_dim: int
    k_dim: int


def _qk_roles(a: Any, key: int) -> _QK:
    """Read q and k off dot A, given which score axis the softmax runs over (the key positions)."""
    (lc, rc), (lb, rb) = a.params["dimension_numbers"]
    if len(lc) != 1:
        raise _NoMatch("not one contracted axis")
    lhs, rhs = a.invars
    lfree = [i for i in range(len(lhs.aval.shape)) if i not in lc and i not in lb]
    rfree = [i for i in range(len(rhs.aval.shape)) if i not in rc and i not in rb]
    nb = len(lb)
    if nb <= key < nb + len(lfree):
        q, k, qb, kb, qfree, kfree, qc, kc = rhs, lhs, rb, lb, rfree, lfree, rc, lc
        kpos, qbase = lfree[key - nb], nb + len(lfree)
    elif key >= nb + len(lfree):
        q, k, qb, kb, qfree, kfree, qc, kc = lhs, rhs, lb, rb, lfree, rfree, lc, rc
        kpos, qbase = rfree[key - nb - len(lfree)], nb
    else:
        raise _NoMatch("softmax over a batch axis")
    if any(k.aval.shape[i] != 1 for i in kfree if i != kpos):
        raise _NoMatch("k has more than one free axis")
    seq = _q_seq_axis(q, qfree, k.aval.shape[kpos])
    pairs = sorted(((qb[i], kb[i], i) for i in range(nb)), key=lambda x: x[1])
    qscore = {ax: qbase + n for n, ax in enumerate(qfree)}
    return _QK(q, k, pairs[0] if pairs else None, tuple(pairs[1:]), (seq, qscore[seq]),
               tuple((i, qscore[i]) for i in qfree if i != seq), kpos,
               tuple(i for i in kfree if i != kpos), qc[0], kc[0])


def _q_seq_axis(q: Any, qfree: list[int], t: int) -> int:
    """Which free axis of q is the query positions: the one as long as the keys (self-attention), else
    (cross-attention: keys of another sequence) q's first free axis longer than 1, positions coming before the
    query heads of a kv head in the layouts models write ([B, S, Hkv, G, D]). Either way q's other free axes are
    query heads, and picking one of them instead would still give every query row its own softmax (the rewrite
    runs cross-attention unmasked over its queries), only split otherwise over `seq`."""
    same = [i for i in qfree if q.aval.shape[i] == t]
    big = [i for i in qfree if q.aval.shape[i] != 1]
    if same or big:
        return (same or big)[0]
    if not qfree:
        raise _NoMatch("q has no positions axis")
    return qfree[0]


def _size(var: Any, axis: int | None) -> int:
    return 1 if axis is None else int(var.aval.shape[axis])


def _q_k(r: _QK) -> tuple[Operand, Operand]:
    """The canonical q [B, S, H, D] (H = kv heads x groups) and k [B, T, Hkv, D]."""
    qb, kb = (r.batch[0], r.batch[1]) if r.batch else (None, None)
    qperm = [*([qb] if r.batch else []), r.q_seq[0], *(h[0] for h in r.heads), *(g[0] for g in r.groups), r.q_dim]
    kperm = [*([kb] if r.batch else []), r.k_seq, *(h[1] for h in r.heads), *r.k_ones, r.k_dim]
    heads = math.prod(_size(r.k, h[1]) for h in r.heads)
    groups = math.prod(_size(r.q, g[0]) for g in r.groups)
    d = _size(r.q, r.q_dim)
    q = Operand(r.q, tuple(qperm), (_size(r.q, qb), _size(r.q, r.q_seq[0]), heads * groups, d))
    k = Operand(r.k, tuple(kperm), (_size(r.k, kb), _size(r.k, r.k_seq), heads, d))
    return q, k


def _v_and_out(r: _QK, b: Any, prob: _Sym, pi: int) -> tuple[Operand, tuple[int, ...], tuple[int, ...]]:
    """The canonical v [B, T, Hkv, Dv] and how the canonical output becomes dot B's (`out_shape`, `out_perm`):
    each output axis gets its place in the canonical order, the output is reshaped to the sizes in that order and
    transposed back."""
    (blc, brc), (blb, brb) = b.params["dimension_numbers"]
    pb, pc, vb, vc = (blb, blc, brb, brc) if pi == 0 else (brb, brc, blb, blc)
    v = b.invars[1 - pi]
    vscore = {va: prob.dims[pa] for pa, va in zip(pb, vb)}
    batch_axis = r.batch[2] if r.batch else None
    rank = {**({batch_axis: 0} if r.batch else {}), r.q_seq[1]: 1, **{h[2]: 2 + i for i, h in enumerate(r.heads)},
            **{g[1]: 2 + len(r.heads) + i for i, g in enumerate(r.groups)}}
    if any(s is None or s not in rank or s == r.q_seq[1] or s in (g[1] for g in r.groups) for s in vscore.values()):
        raise _NoMatch("values batched over other axes")
    vfree = [i for i in range(len(v.aval.shape)) if i not in vb and i not in vc]
    big = [i for i in vfree if v.aval.shape[i] != 1]
    if len(big) != 1 or len(vc) != 1:
        raise _NoMatch("values with more than one free axis")
    vbatch = [i for i in vb if vscore[i] == batch_axis]
    vheads = sorted((i for i in vb if i not in vbatch), key=lambda i: rank[vscore[i]])
    vperm = (*vbatch, vc[0], *vheads, *(i for i in vfree if i != big[0]), big[0])
    shape = v.aval.shape
    operand = Operand(v, vperm, (math.prod(shape[i] for i in vbatch), shape[vc[0]],
                                 math.prod(shape[i] for i in vheads), shape[big[0]]))
    pfree = [i for i in range(len(prob.dims)) if i not in pb and i not in pc]
    free = [rank[prob.dims[i]] if prob.dims[i] in rank else 1000 + i for i in pfree]
    vranks = [999 if i == big[0] else 2000 + i for i in vfree]
    ranks = [rank[prob.dims[i]] for i in pb] + (free + vranks if pi == 0 else vranks + free)
    order = sorted(range(len(ranks)), key=lambda j: ranks[j])
    out = tuple(b.outvars[0].aval.shape)
    return operand, tuple(out[j] for j in order), tuple(int(x) for x in np.argsort(order))


def _mask_kind(sym: _Sym, s_axis: int, t_axis: int, shape: tuple[int, ...]
               ) -> tuple[str, int | None, tuple[str, ...]]:
    """What the constant mask is over (query, key) positions ("none", "causal", "sliding window of w",
    "arbitrary", ...), its window (w for a causal sliding window: query i sees keys i-w < j <= i, which
    ops.attention takes as `window`; else None) and why it cannot run as ops.attention (a bias, a fill that is not
    very negative, a mask of no kind it takes)."""
    keep, problems = sym.keep, []
    if sym.bias is not None:
        masked = sym.bias <= VERY_NEGATIVE
        keep = ~masked if keep is None else keep & ~masked
        kept = np.broadcast_to(sym.bias, np.broadcast_shapes(sym.bias.shape, keep.shape))[
            np.broadcast_to(keep, np.broadcast_shapes(sym.bias.shape, keep.shape))]
        if kept.size and not np.all(kept == kept.flat[0]):
            problems.append("an additive bias on the scores (relative positions, ALiBi, ...)")
    if (sym.masks or (keep is not None and not keep.all())) and sym.fill > VERY_NEGATIVE:
        problems.append(f"masked scores are set to {sym.fill:g}, not a very negative value")
    if keep is None or keep.all():
        return "none", None, tuple(problems)
    for axis in range(keep.ndim):
        if axis not in (s_axis, t_axis) and keep.shape[axis] > 1:
            if not np.all(keep == np.take(keep, [0], axis=axis)):
                return "a mask that varies over the batch or heads (padding)", None, (*problems, "a padding mask")
            keep = np.take(keep, [0], axis=axis)
    m = np.broadcast_to(keep.reshape(keep.shape[s_axis], keep.shape[t_axis]) if s_axis < t_axis else
                        keep.reshape(keep.shape[t_axis], keep.shape[s_axis]).T, (shape[s_axis], shape[t_axis]))
    i, j = np.indices(m.shape)
    if np.array_equal(m, j <= i):
        return "causal", None, tuple(problems)
    width = int(m.sum(axis=1).max()) if m.any() else 0
    if width and np.array_equal(m, (j <= i) & (i - j < width)):
        return f"sliding window of {width}", width, tuple(problems)
    return "arbitrary", None, (*problems, "an arbitrary mask")


def _finish(region: _Region, b_index: int, b: Any, states: dict[Any, _Sym]) -> Match:
    """The match ending at dot B, if B contracts the probabilities with an outside value over the key axis."""
    tracked = [v in states for v in b.invars]
    if tracked.count(True) != 1 or states[b.invars[tracked.index(True)]].kind != "prob":
        raise _NoMatch("dot of the scores")
    pi = tracked.index(True)
    prob = states[b.invars[pi]]
    (blc, brc), _ = b.params["dimension_numbers"]
    pc = blc if pi == 0 else brc
    if len(pc) != 1 or prob.dims[pc[0]] is None or prob.dims[pc[0]] != region.key:
        raise _NoMatch("probabilities contracted over another axis")
    a = region.scope.body.jaxpr.eqns[region.start]
    roles = _qk_roles(a, region.key)
    q, k = _q_k(roles)
    v, out_shape, out_perm = _v_and_out(roles, b, prob, pi)
    if v.shape[:3] != k.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2] % max(k.shape[2], 1):
        raise _NoMatch("q, k and v do not line up")
    scores = tuple(a.outvars[0].aval.shape)
    mask, window, problems = _mask_kind(prob, roles.q_seq[1], region.key, scores)
    problems = (*prob.problems, *problems)
    if mask != "none" and q.shape[1] != k.shape[1]:
        problems += ("a causal or constant mask between queries and keys of different lengths",)
    key_mask, query_mask, why = _mask_operands(prob, roles, region.key)
    problems += why
    if v.shape[3] != q.shape[3]:
        problems += ("values of another head size than queries and keys",)
    covered = frozenset({region.start, b_index, *region.covered})
    problems += _leaks(region.scope, covered, b_index)
    scale, softcap = (prob.scale, None) if prob.cap is None else (prob.cap * prob.scale, prob.scale)
    return Match((region.start, b_index), covered, q, k, v, scale, mask, tuple(dict.fromkeys(problems)),
                 b.outvars[0], out_shape, out_perm, key_mask, query_mask, window, softcap)


def _mask_operands(prob: _Sym, roles: _QK, key: int) -> tuple[Operand | None, Operand | None, tuple[str, ...]]:
    """The match's masks from the inputs as a key mask and a query mask (`_mask_operand`), and why they cannot run
    as ops.attention (a value varying over heads or over query and key positions, two of one kind, a query mask with
    fills or a bias that do not leave its masked rows uniform over every key)."""
    if not prob.masks:
        return None, None, ()
    dense = (None, None, ("a mask computed from the inputs",))
    by_key = [_mask_operand(leaf, roles, key) for leaf in prob.masks]
    by_query = [_mask_operand(leaf, roles, roles.q_seq[1]) for leaf in prob.masks]
    key_mask = query_mask = None
    for kop, qop in zip(by_key, by_query):
        if kop is not None and key_mask is None:
            key_mask = kop
        elif qop is not None and query_mask is None:
            query_mask = qop
        else:
            return dense
    if query_mask is not None and (prob.mixed_fill or prob.bias is not None or not math.isfinite(prob.fill)):
        return None, None, ("a query mask whose masked rows are not uniform (several fills, a bias or an "
                            "infinite fill)",)
    return key_mask, query_mask, ()


def _mask_operand(leaf: _Leaf, roles: _QK, axis: int) -> Operand | None:
    """The mask value as an operand [B or 1, N or 1] if it varies over the batch and score axis `axis` (the key or
    the query positions) only; None if it varies over heads or other positions (it then stays dense)."""
    var, dims = leaf
    shape = tuple(var.aval.shape)
    batch = roles.batch[2] if roles.batch else None
    big = [a for a in range(len(shape)) if shape[a] != 1]
    if any(dims[a] is None or dims[a] not in (batch, axis) for a in big):
        return None
    by_batch = [a for a in big if dims[a] == batch]
    by_axis = [a for a in big if dims[a] == axis]
    if len(by_batch) > 1 or len(by_axis) > 1:
        return None
    perm = (*by_batch, *by_axis, *(a for a in range(len(shape)) if a not in big))
    return Operand(var, perm, (shape[by_batch[0]] if by_batch else 1, shape[by_axis[0]] if by_axis else 1))


def _leaks(scope: Scope, covered: frozenset[int], b_index: int) -> tuple[str, ...]:
    """Why the covered equations cannot be dropped: a value between the two dots is used elsewhere."""
    eqns = scope.body.jaxpr.eqns
    outs = {v for v in scope.body.jaxpr.outvars if not jint.is_literal(v)}
    for i in covered - {b_index}:
        for v in eqns[i].outvars:
            if v in outs or any(c not in covered for c in scope.consumers.get(v, ())):
                return ("its scores or probabilities are used elsewhere too",)
    return ()


def _follow(scope: Scope, start: int) -> Match | None:
    """The attention starting at dot_general `start`, if the values computed from its output make one."""
    eqns = scope.body.jaxpr.eqns
    a = eqns[start]
    shape = tuple(a.outvars[0].aval.shape)
    region = _Region(scope, start, len(shape))
    states = {a.outvars[0]: _Sym("lin", tuple(range(len(shape))))}
    heap = list(scope.consumers.get(a.outvars[0], ()))
    heapq.heapify(heap)
    seen: set[int] = set()
    while heap:
        i = heapq.heappop(heap)
        if i in seen:
            continue
        seen.add(i)
        eqn = eqns[i]
        try:
            if eqn.primitive.name == "dot_general":
                return _finish(region, i, eqn, states)
            outs = _step(region, scope, eqn, states)
        except _NoMatch:
            if eqn.primitive.name == "dot_general":
                return None
            continue
        region.covered.add(i)
        for v, s in zip(eqn.outvars, outs):
            if s is not None:
                states[v] = s
                for c in scope.consumers.get(v, ()):
                    heapq.heappush(heap, c)
    return None


# -- every level ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Level:
    """The matches of one jaxpr level and, by equation index, of the bodies below it the rewrite re-runs
    (inlined calls, scans, remat), those that hold a match only."""

    matches: list[Match]
    subs: dict[int, "Level"]

    def __iter__(self) -> Iterator[tuple[tuple[int, ...], Match]]:
        """(path of equation indices to the level, match) of every match, this level's first."""
        for m in self.matches:
            yield (), m
        for i, sub in self.subs.items():
            for path, m in sub:
                yield (i, *path), m

    @property
    def supported(self) -> bool:
        """Whether some match can run as ops.attention."""
        return any(m.supported for _, m in self)


def _sub_links(scope: Scope, eqn: Any, body: jint.Body) -> dict[Any, tuple[Scope, Any]]:
    """Which of a body's inputs stand for which values of the level that runs it (a scan's: its consts only)."""
    if eqn.primitive.name == "scan":
        n = jint.scan(eqn).num_consts
        return {v: (scope, o) for v, o in zip(body.jaxpr.invars[:n], eqn.invars[:n])}
    skip = len(eqn.invars) - len(body.jaxpr.invars)
    return {v: (scope, o) for v, o in zip(body.jaxpr.invars, eqn.invars[skip:])}


def find(body: Any, links: dict[Any, tuple[Scope, Any]] | None = None) -> Level:
    """Every attention in a (closed) jaxpr: at its top level and inside the bodies `RECURSE` names."""
    body = body if isinstance(body, jint.Body) else jint.open_jaxpr(body)
    scope = Scope(body, links)
    names = jint.NameStacks()
    matches, subs, taken = [], {}, set()
    for i, eqn in enumerate(body.jaxpr.eqns):
        name = eqn.primitive.name
        if name == "dot_general" and i not in taken and "autoshard.attention" not in names(eqn):
            m = _follow(scope, i)
            if m is not None:
                matches.append(m)
                taken |= m.covered
        elif name in RECURSE:
            inner = jint.scan(eqn).body if name == "scan" else jint.call_body(eqn)
            level = find(inner, _sub_links(scope, eqn, inner))
            if level.matches or level.subs:
                subs[i] = level
    return Level(matches, subs)


__all__ = ["FOLD_LIMIT", "Level", "Match", "Operand", "Scope", "find"]
