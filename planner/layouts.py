"""How each primitive can be split over one mesh axis: its sharding strategies.

A layout of a value over the axis is `None` (replicated), an int `d` (split along dimension d) or `"P"` (each
device holds a partial sum). A strategy of an op fixes the layout of its outputs, the layout it needs of each
operand, and the layout in which the backward pass hands back each operand's cotangent. Rules come from which
output dimension corresponds to which operand dimension (and which dimensions a contraction or reduction sums
over), so one mechanism covers elementwise ops, reshapes, dot_general, reductions and gathers. An op with no rule
is replicated, with a warning.
"""

from __future__ import annotations

import dataclasses
import math


from planner.trace import Op, Value, dtype_kind, itemsize

Layout = int | str | None
PARTIAL = "P"

ELEMENTWISE = {
    "add", "sub", "mul", "div", "max", "min", "pow", "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh",
    "logistic", "rsqrt", "sqrt", "cbrt", "integer_pow", "square", "abs", "sign", "erf", "erfc", "erf_inv", "sin",
    "cos", "tan", "atan2", "select_n", "convert_element_type", "stop_gradient", "ge", "gt", "le", "lt", "eq", "ne",
    "and", "or", "not", "xor", "clamp", "copy", "copy_p", "floor", "ceil", "round", "is_finite", "rem", "nextafter",
    "reduce_precision", "real", "imag", "shift_left", "shift_right_logical", "shift_right_arithmetic",
    "population_count", "custom_jvp_call", "optimization_barrier", "layer_boundary",
}
RESHAPES = {"reshape", "squeeze", "expand_dims"}
REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "argmax", "argmin"}
ALONG_AXIS = {"cumsum": "axis", "cumprod": "axis", "cummax": "axis", "cummin": "axis", "cumlogsumexp": "axis",
              "sort": "dimension", "top_k": None, "split": "axis", "concatenate": "dimension"}
WINDOWED = {"reduce_window_sum", "reduce_window_max", "reduce_window_min"}
"""Pooling: a dimension the window neither spans nor strides keeps its split."""
SOURCES = {"iota", "rng_bit_generator", "random_bits", "random_seed", "random_wrap", "random_unwrap", "empty"}
LINEAR_ALL = {"add", "sub", "neg", "convert_element_type", "reshape", "squeeze", "expand_dims", "transpose", "copy",
              "copy_p"}
"""Ops a partial sum may flow through unreduced (the reduction is deferred to where it is needed)."""


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    outs: tuple[Layout, ...]
    ins: tuple[Layout, ...]
    """Layout required of each operand (None also for literals)."""
    cots: tuple[Layout, ...]
    """Layout of each operand's cotangent as the backward of this op produces it."""
    split: bool
    """Whether the op's work is divided over the axis."""


def _correspondence(op: Op, values: dict[int, Value]) -> tuple[list[list[dict[int, int]]], list[dict[int, int]]]:
    """Per output, per output dim: {operand position: operand dim}; and the summed-over dims as such dicts."""
    name, p = op.primitive, op.params
    ins = [values[i] if i is not None else None for i in op.inputs]
    outs = [values[o] for o in op.outputs]
    out0 = outs[0] if outs else None
    reduced: list[dict[int, int]] = []
    if name == "dot_general":
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        lhs, rhs = ins
        lf = [i for i in range(len(lhs.shape)) if i not in lc and i not in lb]
        rf = [i for i in range(len(rhs.shape)) if i not in rc and i not in rb]
        dims = [{0: a, 1: b} for a, b in zip(lb, rb)] + [{0: a} for a in lf] + [{1: b} for b in rf]
        reduced = [{0: a, 1: b} for a, b in zip(lc, rc)]
        return [dims], reduced
    if name == "conv_general_dilated":
        lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
        dims = [{} for _ in out0.shape]
        if p.get("batch_group_count", 1) == 1:
            dims[out_spec[0]] = {0: lhs_spec[0]}  # the batch
        if p.get("feature_group_count", 1) == 1:  # output features: column parallel; input features: partial sums
            dims[out_spec[1]] = {1: rhs_spec[0]}
            reduced = [{0: lhs_spec[1], 1: rhs_spec[1]}]
        return [dims], reduced
    if name in WINDOWED:
        window, strides = p["window_dimensions"], p["window_strides"]
        return [[{0: j} if window[j] == 1 and strides[j] == 1 and ins[0].shape[j] == out0.shape[j] else {}
                 for j in range(len(out0.shape))]], []
    if name in ELEMENTWISE:
        dims = []
        for j, size in enumerate(out0.shape):
            dims.append({k: j for k, v in enumerate(ins) if v is not None and len(v.shape) == len(out0.shape)
                         and v.shape[j] == size})
        return [dims] * len(outs), []
    if name in RESHAPES:
        return [_reshape_dims(ins[0].shape, out0.shape)], []
    if name == "transpose":
        return [[{0: i} for i in p["permutation"]]], []
    if name == "broadcast_in_dim":
        dims = [{} for _ in out0.shape]
        for i, j in enumerate(p["broadcast_dimensions"]):
            if ins[0].shape[i] == out0.shape[j]:
                dims[j] = {0: i}
        return [dims], []
    if name in REDUCTIONS:
        axes = tuple(p["axes"])
        kept = [i for i in range(len(ins[0].shape)) if i not in axes]
        if name in ("reduce_sum", "reduce_max", "reduce_min"):  # partial results, then an all-reduce
            reduced = [{0: a} for a in axes]
        return [[{0: i} for i in kept]] * len(outs), reduced
    if name in ALONG_AXIS:
        key = ALONG_AXIS[name]
        axis = p.get(key, len(ins[0].shape) - 1) if key else len(ins[0].shape) - 1
        dims = []
        for j in range(len(out0.shape)):
            ok = j != axis and all(len(v.shape) == len(out0.shape) for v in ins if v is not None)
            dims.append({k: j for k, v in enumerate(ins) if v is not None} if ok else {})
        return [dims] * len(outs), []
    if name in ("slice", "dynamic_slice", "pad", "dynamic_update_slice", "rev"):
        src = ins[0]
        dims = []
        for j, size in enumerate(out0.shape):
            same = {k: j for k, v in enumerate(ins) if v is not None and len(v.shape) == len(out0.shape)
                    and v.shape[j] == size}
            dims.append(same if src.shape[j] == size else {})
        return [dims], []
    if name == "gather":  # a table split along an indexed dimension: masked local lookups summed (partial)
        collapsed = [{0: d} for d in p["dimension_numbers"].collapsed_slice_dims]
        return [_gather_dims(p, ins, out0)], collapsed
    if name in SOURCES:
        return [[{} for _ in o.shape] for o in outs], []
    return [], []


def _reshape_dims(src: tuple[int, ...], dst: tuple[int, ...]) -> list[dict[int, int]]:
    """Output dim -> operand dim where a split along it is the same block split of the data (major factors)."""
    dims: list[dict[int, int]] = [{} for _ in dst]
    i = j = 0
    while i < len(src) and j < len(dst):
        gi, gj = [i], [j]
        pi, pj = src[i], dst[j]
        while pi != pj:
            if pi < pj:
                i += 1
                gi.append(i)
                pi *= src[i]
            else:
                j += 1
                gj.append(j)
                pj *= dst[j]
        mi = next((a for a in gi if src[a] > 1), gi[0])
        mj = next((b for b in gj if dst[b] > 1), gj[0])
        dims[mj] = {0: mi}
        i, j = i + 1, j + 1
    return dims


def _gather_dims(p, ins, out) -> list[dict[int, int]]:
    dn = p["dimension_numbers"]
    operand, indices = ins[0], ins[1]
    offset = list(dn.offset_dims)
    skip = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
    operand_dims = [i for i in range(len(operand.shape)) if i not in skip]
    index_dims = list(range(len(indices.shape) - 1))
    dims: list[dict[int, int]] = []
    it_o, it_i = iter(operand_dims), iter(index_dims)
    for j in range(len(out.shape)):
        if j in offset:
            i = next(it_o)
            dims.append({0: i} if p["slice_sizes"][i] == operand.shape[i] else {})
        else:
            dims.append({1: next(it_i)})
    return dims


def strategies(op: Op, values: dict[int, Value], axis_size: int, local_shape=lambda v: v.shape,
               model_dims_only: bool = True) -> list[Strategy]:
    """The ways `op` can run over a mesh axis of `axis_size` devices; the first is always replicated."""
    n_in = len(op.inputs)
    ins = [values[i] if i is not None else None for i in op.inputs]
    outs = [values[o] for o in op.outputs]
    grad = [v is not None and dtype_kind(v.dtype) == "float" for v in ins]
    cot_of = lambda layout, k: layout if grad[k] else None  # noqa: E731
    result = [Strategy("R", (None,) * len(outs), (None,) * n_in, (None,) * n_in, False)]
    if axis_size == 1:
        return result
    corr, reduced = _correspondence(op, values)
    if not corr:
        return result
    def divides(v: Value, d: int) -> bool:
        if model_dims_only and d in v.token_dims:
            return False
        return local_shape(v)[d] % axis_size == 0 and local_shape(v)[d] >= axis_size

    # split along an output dimension
    for j in range(len(outs[0].shape)):
        if not all(j < len(o.shape) and divides(o, j) for o in outs):
            continue
        maps = corr[0][j]
        if not all(divides(ins[k], d) for k, d in maps.items()):
            continue
        req = tuple(maps.get(k) for k in range(n_in))
        cots = tuple(cot_of(maps[k] if k in maps else (PARTIAL if ins[k] is not None and ins[k].shape else None), k)
                     for k in range(n_in))
        result.append(Strategy(f"S{j}", (j,) * len(outs), req, cots, True))
    # split a summed-over dimension: partial sums
    for m, maps in enumerate(reduced):
        if not all(divides(ins[k], d) for k, d in maps.items()):
            continue
        req = tuple(maps.get(k) for k in range(n_in))
        cots = tuple(cot_of(maps[k] if k in maps else None, k) for k in range(n_in))
        result.append(Strategy(f"P{m}", (PARTIAL,) * len(outs), req, cots, True))
    # partial sums flow through linear ops
    name = op.primitive
    live = [k for k in range(n_in) if ins[k] is not None and ins[k].shape and grad[k]]
    if name in LINEAR_ALL and live:
        req = tuple(PARTIAL if k in live else None for k in range(n_in))
        result.append(Strategy("P*", (PARTIAL,) * len(outs), req, tuple(cot_of(None, k) for k in range(n_in)), False))
    return result


def has_rule(op: Op, values: dict[int, Value]) -> bool:
    return bool(_correspondence(op, values)[0]) or op.primitive in SOURCES


def map_dim(op: Op, values: dict[int, Value], pos: int, dim: int, out: int = 0) -> int | None:
    """The output dimension that operand `pos`'s dimension `dim` becomes (None if it is summed away or lost)."""
    corr, _ = _correspondence(op, values)
    if out >= len(corr):
        return None
    for j, maps in enumerate(corr[out]):
        if maps.get(pos) == dim:
            return j
    return None


def out_dims(op: Op, values: dict[int, Value]) -> list[dict[tuple[int, int], int]]:
    """`map_dim` for every operand dimension at once: per output, (operand position, operand dimension) -> the
    output dimension it becomes (missing where it is summed away or lost)."""
    corr, _ = _correspondence(op, values)
    out = []
    for per_dim in corr:
        found: dict[tuple[int, int], int] = {}
        for j, maps in enumerate(per_dim):
            for pos, d in maps.items():
                found.setdefault((pos, d), j)
        out.append(found)
    return out


def conversion(src: Layout, dst: Layout, nbytes: float, n: int) -> tuple[str | None, float]:
    """The collective that turns layout `src` into `dst` for a value of `nbytes` (whole over this axis of `n`),
    and the bytes each device sends (ring algorithms)."""
    if src == dst or n == 1 or (src is None and dst in (PARTIAL,)) or (src is None and isinstance(dst, int)):
        return None, 0.0
    if src == PARTIAL:
        if dst is None:
            return "all-reduce", 2.0 * (n - 1) / n * nbytes
        return "reduce-scatter", (n - 1) / n * nbytes
    if isinstance(src, int):
        if dst is None or dst == PARTIAL:
            return "all-gather", (n - 1) / n * nbytes
        return "all-to-all", (n - 1) / n * nbytes / n
    return None, 0.0



def local_nbytes(v: Value, batch_shards: int) -> float:
    """Bytes of a value per device after the batch split (before any split over the solved axis)."""
    div = batch_shards if v.batch_dim is not None else 1
    return float(math.prod(v.shape)) * itemsize(v.dtype) / div
