"""Every jax surface autoshard reads that carries no compatibility promise, in one place.

jax keeps its public API (`jax.jit`, `jax.shard_map`, `NamedSharding`, ...) stable across releases, but the planner
also reads what those build: jaxprs (primitive names, their parameter keys, how call and loop primitives hold their
bodies), `source_info.name_stack`, `jax.extend.core`, `jax.core.eval_jaxpr`, the varying-manual-axes type
`jax.typeof(x).mat`, and the text and statistics of a compiled executable. Any of these may change in a release
(between jax 0.10 and 0.12 the scan primitive's `num_consts`/`num_carry` became an `ft_in` flat tree, and call
primitives came to hold an open `Jaxpr` with its consts instead of a `ClosedJaxpr`), so everything else goes through
the functions here, `tests/test_jax_internals.py` exercises each surface on the installed jax, and a release that
changes one fails here, with a `JaxInternalsError` that names the surface, the jax version and what was found.

Supported: jax and jaxlib 0.10.2 up to (not including) 0.13 (`SUPPORTED_JAX`); pyproject.toml pins the same range.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

SUPPORTED_JAX = ((0, 10, 2), (0, 13))
"""[oldest, first unsupported) jax release; keep in step with pyproject.toml."""


class JaxInternalsError(RuntimeError):
    """A jax internal that autoshard reads is not what this module expects: the installed jax changed it."""

    def __init__(self, surface: str, found: str):
        super().__init__(f"jax {jax.__version__}: {surface} changed ({found}); autoshard supports jax "
                         f"{_version_str(SUPPORTED_JAX[0])} to <{_version_str(SUPPORTED_JAX[1])}: "
                         f"update planner/jax_internals.py for this release")


def _version_str(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


def jax_version() -> tuple[int, ...]:
    """The installed jax's release as a tuple of ints (0.12.0.1 -> (0, 12, 0, 1))."""
    return tuple(int(x) for x in re.findall(r"\d+", jax.__version__.split("+")[0].split(".dev")[0]))


# -- jaxprs ---------------------------------------------------------------------------------------------------------

CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
         "call": "call_jaxpr", "remat": "jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr",
         "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}
"""Call-like primitives (their body runs once, on the call's trailing operands) and the parameter holding it."""

PARAM_KEYS: dict[str, tuple[str, ...]] = {
    "dot_general": ("dimension_numbers",),
    "conv_general_dilated": ("dimension_numbers", "feature_group_count", "batch_group_count"),
    "reduce_window_sum": ("window_dimensions", "window_strides"),
    "reduce_window_max": ("window_dimensions", "window_strides"),
    "reduce_window_min": ("window_dimensions", "window_strides"),
    "transpose": ("permutation",),
    "broadcast_in_dim": ("broadcast_dimensions",),
    "reduce_sum": ("axes",), "reduce_max": ("axes",), "reduce_min": ("axes",),
    "gather": ("dimension_numbers",),
    "cumsum": ("axis",), "concatenate": ("dimension",), "split": ("axis",), "sort": ("dimension",),
    "scan": ("length", "jaxpr"),
}
"""Parameters the planner's rules read, per primitive (`planner.layouts`, `planner.trace`)."""


@dataclasses.dataclass(frozen=True)
class Body:
    """An open jaxpr and the values of its constvars: what a call or loop primitive runs."""

    jaxpr: Any
    consts: tuple[Any, ...]

    @property
    def in_avals(self) -> list[Any]:
        return [v.aval for v in self.jaxpr.invars]


@dataclasses.dataclass(frozen=True)
class Scan:
    """A `lax.scan` equation: operands are consts, then carries, then the scanned-over xs."""

    length: int
    num_consts: int
    num_carry: int
    body: Body


Literal = jcore.Literal
"""The type of a jaxpr's inline literal operands (`is_literal`, for loops that test many operands)."""


def is_literal(var: Any) -> bool:
    """Whether a jaxpr operand is an inline literal (it has no binding in an environment)."""
    return isinstance(var, Literal)


def open_jaxpr(jaxpr: Any) -> Body:
    """A `ClosedJaxpr` (jax 0.10) or an open `Jaxpr` that holds its own consts (0.12) as one `Body`."""
    if hasattr(jaxpr, "eqns"):
        return Body(jaxpr, tuple(getattr(jaxpr, "consts", ()) or ()))
    if hasattr(jaxpr, "jaxpr") and hasattr(jaxpr.jaxpr, "eqns"):
        return Body(jaxpr.jaxpr, tuple(jaxpr.consts))
    raise JaxInternalsError("the jaxpr type", f"{type(jaxpr).__name__} has neither .eqns nor .jaxpr.eqns")


def call_body(eqn: Any) -> Body | None:
    """The body of a call-like equation (`jit`, `remat`, `custom_vjp_call`, ...), None for any other primitive."""
    key = CALLS.get(eqn.primitive.name)
    if key is None:
        return None
    if key not in eqn.params:
        raise JaxInternalsError(f"the `{eqn.primitive.name}` primitive",
                                f"no parameter {key!r}; it has {sorted(eqn.params)}")
    return open_jaxpr(eqn.params[key])


def scan(eqn: Any) -> Scan:
    """The structure of a `scan` equation: `num_consts`/`num_carry` parameters (jax 0.10) or the `ft_in` flat tree
    of (consts, carries, xs) (jax 0.12)."""
    p = eqn.params
    if "num_consts" in p and "num_carry" in p:
        nc, ncarry = int(p["num_consts"]), int(p["num_carry"])
    elif "ft_in" in p and hasattr(p["ft_in"], "unpack"):
        try:
            consts, carry, _ = p["ft_in"].unpack()
        except (TypeError, ValueError) as e:
            raise JaxInternalsError("the `scan` primitive's ft_in", f"not (consts, carry, xs): {e}") from None
        nc, ncarry = len(consts), len(carry)
    else:
        raise JaxInternalsError("the `scan` primitive", f"no num_consts/num_carry nor ft_in; it has {sorted(p)}")
    return Scan(int(p["length"]), nc, ncarry, open_jaxpr(p["jaxpr"]))


@dataclasses.dataclass(frozen=True)
class Cond:
    """A `lax.cond` / `lax.switch` equation: operand 0 is the branch index (int32), the rest are every branch's
    operands; branch k runs when the index is k."""

    branches: tuple[Body, ...]


@dataclasses.dataclass(frozen=True)
class While:
    """A `lax.while_loop` equation: operands are the predicate's consts, then the body's consts, then the carries
    (the predicate and the body both read the carries after their consts)."""

    cond: Body
    body: Body
    cond_nconsts: int
    body_nconsts: int


def cond(eqn: Any) -> Cond:
    """The branches of a `cond` equation (`branches`: a tuple of `ClosedJaxpr`s on jax 0.10 and 0.12)."""
    branches = eqn.params.get("branches")
    if not isinstance(branches, (tuple, list)) or not branches:
        raise JaxInternalsError("the `cond` primitive", f"no tuple parameter 'branches'; it has {sorted(eqn.params)}")
    return Cond(tuple(open_jaxpr(b) for b in branches))


def while_loop(eqn: Any) -> While:
    """The structure of a `while` equation (`cond_jaxpr`, `body_jaxpr`, `cond_nconsts`, `body_nconsts`)."""
    p = eqn.params
    missing = [k for k in ("cond_jaxpr", "body_jaxpr", "cond_nconsts", "body_nconsts") if k not in p]
    if missing:
        raise JaxInternalsError("the `while` primitive", f"no parameter(s) {missing}; it has {sorted(p)}")
    return While(open_jaxpr(p["cond_jaxpr"]), open_jaxpr(p["body_jaxpr"]), int(p["cond_nconsts"]),
                 int(p["body_nconsts"]))


def int_literal(var: Any) -> int | None:
    """The value of an integer scalar literal operand, None for anything else."""
    if not is_literal(var):
        return None
    val = getattr(var, "val", None)
    try:
        arr = np.asarray(val)
    except Exception:  # noqa: BLE001 (an extended dtype's literal: not a count)
        return None
    return int(arr) if arr.shape == () and np.issubdtype(arr.dtype, np.integer) else None


def while_trip_count(eqn: Any) -> int | None:
    """How often a `while` equation runs its body, when the jaxpr fixes it: the loop `i < n` (or `n > i`) on an
    integer carry `i` that starts at a literal and that the body steps by a positive literal, `n` a literal (or a
    predicate const, or a carry the body passes through, that is a literal where the loop starts), as
    `lax.while_loop(lambda c: c[0] < 3, ...)` writes it; None when the count depends on values (a `fori_loop` with
    traced bounds, a convergence test)."""
    info = while_loop(eqn)
    cj, bj = info.cond.jaxpr, info.body.jaxpr
    carries = eqn.invars[info.cond_nconsts + info.body_nconsts:]
    if len(cj.outvars) != 1 or len(cj.eqns) != 1:
        return None
    test = cj.eqns[0]
    if test.primitive.name not in ("lt", "gt") or test.outvars[0] is not cj.outvars[0]:
        return None
    i_var, n_var = test.invars if test.primitive.name == "lt" else test.invars[::-1]

    def carry_index(var) -> int | None:  # which carry a predicate operand is
        k = next((k for k, v in enumerate(cj.invars) if v is var), None)
        return None if k is None or k < info.cond_nconsts else k - info.cond_nconsts

    def start(var) -> int | None:  # the value a predicate operand has throughout the loop, if fixed
        if is_literal(var):
            return int_literal(var)
        k = next((k for k, v in enumerate(cj.invars) if v is var), None)
        if k is None:
            return None
        if k < info.cond_nconsts:
            return int_literal(eqn.invars[k])
        c = k - info.cond_nconsts
        passes = bj.outvars[c] is bj.invars[info.body_nconsts + c]
        return int_literal(carries[c]) if passes else None

    k = carry_index(i_var)
    n = start(n_var)
    if k is None or n is None:
        return None
    i0 = int_literal(carries[k])
    out = bj.outvars[k]
    step_eqn = next((e for e in bj.eqns if out in e.outvars), None)
    if i0 is None or step_eqn is None or step_eqn.primitive.name != "add":
        return None
    a, b = step_eqn.invars
    own = bj.invars[info.body_nconsts + k]
    step = int_literal(b) if a is own else int_literal(a) if b is own else None
    if not step or step <= 0:
        return None
    return max(0, -(-(n - i0) // step))


def sub_jaxprs(eqn: Any) -> Iterator[Any]:
    """Every jaxpr held in an equation's parameters (bodies of calls, loops, branches)."""
    for sub in jcore.jaxprs_in_params(eqn.params):
        yield open_jaxpr(sub).jaxpr


def trip_count(eqn: Any) -> int:
    """How often an equation's sub-jaxprs run per execution of it: a scan's length, a while loop's count where the
    jaxpr fixes it (`while_trip_count`), else 1."""
    if eqn.primitive.name == "scan":
        return int(eqn.params["length"])
    if eqn.primitive.name == "while":
        count = while_trip_count(eqn)
        return 1 if count is None else count
    return 1


def op_params(eqn: Any) -> dict[str, Any]:
    """An equation's parameters without its sub-jaxprs, checked for the keys the planner reads (`PARAM_KEYS`)."""
    name = eqn.primitive.name
    missing = [k for k in PARAM_KEYS.get(name, ()) if k not in eqn.params]
    if missing:
        raise JaxInternalsError(f"the `{name}` primitive", f"no parameter(s) {missing}; it has {sorted(eqn.params)}")
    return {k: v for k, v in eqn.params.items()
            if type(v) in _PLAIN or not (hasattr(v, "eqns") or hasattr(v, "jaxpr"))}


_PLAIN = frozenset({type(None), bool, int, float, str, tuple})
"""Parameter types that cannot hold a jaxpr attribute (no instance dict): `op_params` keeps them unasked."""


def name_stack(eqn: Any) -> str:
    """The transformation/scope path of an equation (`jit(f)/transpose(...)`), '' where jax records none."""
    info = getattr(eqn, "source_info", None)
    return str(getattr(info, "name_stack", "")) if info is not None else ""


class NameStacks:
    """`name_stack` for many equations: jax gives the equations of one scope the same name stack object, so each
    is printed once (the object is kept, so its id is not reused while it is remembered)."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[Any, str]] = {}

    def __call__(self, eqn: Any) -> str:
        info = getattr(eqn, "source_info", None)
        if info is None:
            return ""
        stack = getattr(info, "name_stack", "")
        hit = self._seen.get(id(stack))
        if hit is None or hit[0] is not stack:
            hit = self._seen[id(stack)] = (stack, str(stack))
        return hit[1]


def eval_jaxpr(body: Body, *args: Any) -> list[Any]:
    """Run an open jaxpr on `args` (traceable: jit it to compile one layer body on its own)."""
    return jax.core.eval_jaxpr(body.jaxpr, list(body.consts), *args)


INLINE_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "call"})
"""Calls whose body can run equation by equation in the caller without changing the program: no custom derivative
(`custom_jvp_call`, `custom_vjp_call`) and no rematerialisation policy (`remat2`) to lose."""


def split_on_last_input(closed: Any) -> tuple[list[bool], Body]:
    """Which outputs of a closed jaxpr depend on its last input, and the jaxpr cut down to the outputs that do not
    (dead code removed; its consts become its first inputs: run it as `eval_jaxpr(rest, *consts, *args)`). What a
    pipeline stage keeps from its forward (the residuals that depend on the stage input) and what its backward makes
    again from the weights (`autoshard.pipeline`)."""
    from jax._src.interpreters.partial_eval import convert_constvars_jaxpr, dce_jaxpr

    jaxpr = convert_constvars_jaxpr(closed.jaxpr)
    n = len(jaxpr.outvars)
    needs = [dce_jaxpr(jaxpr, [j == k for j in range(n)])[1][-1] for k in range(n)]
    rest, _ = dce_jaxpr(jaxpr, [not k for k in needs], instantiate=True)
    return needs, Body(rest, ())


def stacked_residual_bytes(closed: Any, n_params: int, stacked: int) -> int:
    """Bytes, at the traced shapes, of the residuals JAX's vjp of the closed jaxpr's first output with respect to
    its first `n_params` inputs keeps that depend on the other inputs (the batch) and are stacked by a loop of
    `stacked` iterations (leading dimension `stacked`): a layer stack's per-layer residuals x `stacked`, what a
    pipeline stage's forward keeps for its backward (`autoshard.pipeline._Stash`: the closure's leaves that
    depend on the stage input; those made from the weights alone are made again). Traced, never run. A leaf of
    another region whose leading dimension happens to equal `stacked` is counted too."""
    from jax._src.interpreters.partial_eval import convert_constvars_jaxpr, dce_jaxpr

    body = open_jaxpr(closed)

    def leaves(*args):
        _, vjp_fn = jax.vjp(lambda *p: eval_jaxpr(body, *p, *args[n_params:])[0], *args[:n_params])
        return [x for x in jax.tree.leaves(vjp_fn) if isinstance(x, jax.Array)]

    lin = jax.make_jaxpr(leaves)(*[jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in body.jaxpr.invars])
    jaxpr = convert_constvars_jaxpr(lin.jaxpr)
    batch = range(len(lin.jaxpr.constvars) + n_params, len(jaxpr.invars))
    n, total = len(jaxpr.outvars), 0
    for k, v in enumerate(jaxpr.outvars):
        shape = getattr(v.aval, "shape", ())
        if len(shape) < 2 or shape[0] != stacked or is_literal(v):
            continue
        _, used = dce_jaxpr(jaxpr, [j == k for j in range(n)])
        if any(used[i] for i in batch):
            total += int(np.prod(shape)) * np.dtype(v.aval.dtype).itemsize
    return total


UNNUMBERED_SCOPES = ("autoshard.attention",)
"""Scopes whose equations the runtime replaces by others (`ops.attention` traced dense for the planner, run as ring
or Ulysses attention): they get no key (`equation_keys`), so every equation around them keeps the key it has in the
program that runs."""


def equation_keys(eqns: Any, path: tuple[int, ...] | None) -> list[tuple[int, ...] | None]:
    """The key of each equation at one level of a jaxpr whose equations at enclosing levels have keys `path` (None:
    none): the path plus its index among the level's equations outside `UNNUMBERED_SCOPES`, or None for one inside
    (and, through `path`, for everything in its body). `planner.trace.Op.eqns` and `eval_jaxpr_hooked` number
    equations this way."""
    keys: list[tuple[int, ...] | None] = []
    stacks = NameStacks()
    i = 0
    for eqn in eqns:
        if path is None or any(s in stacks(eqn) for s in UNNUMBERED_SCOPES):
            keys.append(None)
            continue
        keys.append((*path, i))
        i += 1
    return keys


def eval_jaxpr_hooked(body: Body, args: list[Any], hook: Callable[[tuple[int, ...], Any, list[Any]], list[Any]],
                      path: tuple[int, ...] = (), before: Callable | None = None) -> list[Any]:
    """Run an open jaxpr on `args` as `jax.core.eval_jaxpr` does, the bodies of `INLINE_CALLS` inlined, passing
    every numbered equation's outputs through `hook(key, eqn, outputs)` (and, given `before`, its operands through
    `before(key, eqn, operands)`); `key` is `equation_keys`' (`planner.trace.Op.eqns` names equations the same
    way). Equations without a key run as they are."""
    env: dict[Any, Any] = {}
    read = lambda v: v.val if is_literal(v) else env[v]  # noqa: E731
    for v, x in zip([*body.jaxpr.constvars, *body.jaxpr.invars], [*body.consts, *args]):
        env[v] = x
    for key, eqn in zip(equation_keys(body.jaxpr.eqns, path), body.jaxpr.eqns):
        ins = [read(v) for v in eqn.invars]
        if key is None:
            outs = _bind_eqn(eqn, ins)
        elif (inner := call_body(eqn) if eqn.primitive.name in INLINE_CALLS else None) is not None:
            outs = hook(key, eqn, eval_jaxpr_hooked(inner, ins[len(ins) - len(inner.jaxpr.invars):], hook, key,
                                                    before))
        else:
            outs = hook(key, eqn, _bind_eqn(eqn, before(key, eqn, ins) if before is not None else ins))
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in body.jaxpr.outvars]


# -- shard_map types ------------------------------------------------------------------------------------------------

def varying_axes(x: Any) -> frozenset[str]:
    """The manual mesh axes over which `x` varies inside a shard_map (its VMA type), empty outside one."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    if mat is None or not hasattr(mat, "varying"):
        raise JaxInternalsError("jax.typeof(x).mat.varying", f"{type(aval).__name__} has no .mat.varying")
    return frozenset(mat.varying)


# -- compiled executables -------------------------------------------------------------------------------------------

HLO_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*(?:->.*)?\{\s*$")
"""A computation header line of HLO text (`ENTRY %main.4 (p: f32[2]) -> f32[2] {`)."""
HLO_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
"""An instruction line of HLO text (`ROOT %add.1 = f32[2]{0} add(%a, %b), metadata={...}`)."""
HLO_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
"""A while loop's trip count in its backend_config."""
HLO_INDUCTION = re.compile(r'"known_induction_variable":\{"tuple_index":"(\d+)"\}')
"""A while loop's counter: its index in the loop's tuple, in its backend_config."""
HLO_INIT_STEP = re.compile(r'"known_init_step":\{"init":"(-?\d+)","step":"(-?\d+)"\}')
"""A while loop counter's first value and step, in its backend_config."""


def hlo_text_with_constants(compiled: Any) -> str | None:
    """The executable's HLO with every constant's literal: `as_text()` prints constants of over 10 elements as
    `{...}`, and a pipeline's schedule tables are such constants. None where the executable does not offer it
    (jaxlib's HloModule printer has no compatibility promise: callers fall back to what `as_text()` gives)."""
    try:
        from jax._src.lib import hlo as xla_hlo

        options = xla_hlo.HloPrintOptions()
        options.print_large_constants = True
        options.print_metadata = False
        return compiled.runtime_executable().hlo_modules()[0].to_string(options)
    except (ImportError, AttributeError, TypeError, IndexError, RuntimeError):
        return None


def hlo_text(compiled: Any) -> str:
    """The post-optimisation HLO text of a compiled executable, checked to be in the form `autoshard.analysis`
    parses (an ENTRY computation whose lines are instructions)."""
    text = compiled.as_text()
    lines = text.splitlines()
    entry = next((i for i, line in enumerate(lines) if line.startswith("ENTRY") and HLO_COMPUTATION.match(line)),
                 None)
    if entry is None:
        raise JaxInternalsError("compiled.as_text()", "no `ENTRY name (...) -> ... {` computation line")
    body = [line for line in lines[entry + 1:entry + 4] if line.strip() and not line.startswith("}")]
    if body and not all(HLO_INSTRUCTION.match(line) for line in body):
        raise JaxInternalsError("compiled.as_text()", f"an instruction line reads {body[0]!r}")
    return text


def memory_stats(compiled: Any) -> dict[str, int]:
    """Per-device bytes of a compiled executable: arguments, outputs, temporaries, aliased and generated code."""
    ma = compiled.memory_analysis()
    keys = {"argument": "argument_size_in_bytes", "output": "output_size_in_bytes", "temp": "temp_size_in_bytes",
            "alias": "alias_size_in_bytes", "generated_code": "generated_code_size_in_bytes"}
    missing = [v for v in keys.values() if not hasattr(ma, v)]
    if ma is None or missing:
        raise JaxInternalsError("compiled.memory_analysis()", f"missing {missing or 'everything'}")
    return {k: int(getattr(ma, v)) for k, v in keys.items()}


def cost_stats(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis as one dict (older jaxlibs returned a list with one dict per program)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, Sequence) and not isinstance(ca, dict):
        ca = ca[0] if ca else {}
    if not isinstance(ca, dict):
        raise JaxInternalsError("compiled.cost_analysis()", f"a {type(ca).__name__}, not a dict")
    return {str(k): float(v) for k, v in ca.items() if isinstance(v, (int, float))}


# -- splitting a backward pass (zero-bubble pipelines) --------------------------------------------------------------

def _bind_eqn(eqn: Any, ins: list[Any]) -> list[Any]:
    """Run one equation on `ins` as `jax.core.eval_jaxpr` does (its name stack and context kept)."""
    from jax._src import source_info_util

    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    with source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack), eqn.ctx.manager:
        out = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


def bind_eqn(eqn: Any, ins: list[Any]) -> list[Any]:
    """Run one equation on `ins` (its outputs as a list), as `jax.core.eval_jaxpr` would: for code that re-runs a
    jaxpr with some equations replaced (`autoshard.attention_rewrite`) or folds constants (`planner.attention_match`)."""
    return _bind_eqn(eqn, ins)


def _mark(atoms: Sequence[Any], flags: Sequence[bool], need: set[Any]) -> None:
    need.update(v for v, f in zip(atoms, flags) if f and not is_literal(v))


def _picked(items: Sequence[Any], flags: Sequence[bool]) -> list[Any]:
    return [x for x, f in zip(items, flags) if f]


@dataclasses.dataclass
class _Step:
    """One equation of a `_Level`: run by B ("b"), by W ("w"), or split between them ("split", `sub` says how)."""

    eqn: Any
    kind: str
    sub: _CallSplit | _ScanSplit | None = None


class _Level:
    """One jaxpr cut into its B and its W part.

    `b_out`/`w_out`: which outputs each part returns (W's never overlap B's); `w_readable`: which inputs W receives
    itself (a scan body's B carries it does not: their per-iteration values are interface). An equation goes to B if
    B needs one of its outputs (or it has effects and nobody does, so that it still runs once), to W if only W does;
    a `scan` or call both need is split (`_split_eqn`); every other one both need runs in B. The interface is, in
    order, this level's values W reads that it does not make or receive itself, then each split equation's own."""

    def __init__(self, body: Body, b_out: Sequence[bool], w_out: Sequence[bool], w_readable: Sequence[bool]):
        self.body, self.b_out, self.w_out, self.w_readable = body, list(b_out), list(w_out), list(w_readable)
        jaxpr = body.jaxpr
        need_b: set[Any] = set()
        need_w: set[Any] = set()
        _mark(jaxpr.outvars, self.b_out, need_b)
        _mark(jaxpr.outvars, self.w_out, need_w)
        steps: list[_Step] = []
        for eqn in reversed(jaxpr.eqns):
            nb = any(v in need_b for v in eqn.outvars)
            nw = any(v in need_w for v in eqn.outvars)
            if not (nb or nw or eqn.effects):
                continue  # dead: neither part runs it
            sub = _split_eqn(eqn, need_b, need_w) if nb and nw else None
            if sub is not None:
                _mark(eqn.invars, sub.b_reads, need_b)
                _mark(eqn.invars, sub.w_reads, need_w)
                steps.append(_Step(eqn, "split", sub))
            else:
                kind = "w" if nw and not nb else "b"
                _mark(eqn.invars, [True] * len(eqn.invars), need_w if kind == "w" else need_b)
                steps.append(_Step(eqn, kind))
        self.steps = steps[::-1]
        w_made = {*jaxpr.constvars, *_picked(jaxpr.invars, self.w_readable)}
        for st in self.steps:
            if st.kind != "b":
                w_made.update(st.eqn.outvars if st.kind == "w" else _picked(st.eqn.outvars, st.sub.w_makes))
        defined = [*jaxpr.invars, *(v for st in self.steps for v in st.eqn.outvars)]
        self.iface = list(dict.fromkeys(v for v in defined if v in need_w and v not in w_made))
        self.b_reads = [v in need_b for v in jaxpr.invars]
        self.w_needs = [v in need_w for v in jaxpr.invars]
        self.w_reads = [n and r for n, r in zip(self.w_needs, self.w_readable)]
        subs = [st.sub for st in self.steps if st.sub is not None]
        self.iface_avals = [v.aval for v in self.iface] + [a for s in subs for a in s.iface_avals]

    def run_b(self, args: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        """B's outputs and the interface, from the inputs (those B does not read may be None)."""
        jaxpr = self.body.jaxpr
        env = dict(zip(jaxpr.constvars, self.body.consts))
        env.update(zip(jaxpr.invars, args))
        inner: list[Any] = []
        for st in self.steps:
            if st.kind == "b":
                env.update(zip(st.eqn.outvars, _bind_eqn(st.eqn, [_read(env, v) for v in st.eqn.invars])))
            elif st.kind == "split":
                outs, iface = st.sub.run_b([_read(env, v, None) for v in st.eqn.invars])
                env.update(zip(_picked(st.eqn.outvars, st.sub.b_makes), outs))
                inner += iface
        return ([_read(env, v) for v in _picked(jaxpr.outvars, self.b_out)],
                [env[v] for v in self.iface] + inner)

    def run_w(self, args: Sequence[Any], iface: Sequence[Any]) -> list[Any]:
        """W's outputs from the inputs (those W does not read may be None) and the interface B made."""
        jaxpr = self.body.jaxpr
        env = dict(zip(jaxpr.constvars, self.body.consts))
        env.update(zip(_picked(jaxpr.invars, self.w_readable), _picked(args, self.w_readable)))
        env.update(zip(self.iface, iface))
        rest = list(iface[len(self.iface):])
        for st in self.steps:
            if st.kind == "w":
                env.update(zip(st.eqn.outvars, _bind_eqn(st.eqn, [_read(env, v) for v in st.eqn.invars])))
            elif st.kind == "split":
                n = len(st.sub.iface_avals)
                outs = st.sub.run_w([_read(env, v, None) for v in st.eqn.invars], rest[:n])
                env.update(zip(_picked(st.eqn.outvars, st.sub.w_makes), outs))
                rest = rest[n:]
        return [_read(env, v) for v in _picked(jaxpr.outvars, self.w_out)]


_MISSING = object()


def _read(env: dict[Any, Any], v: Any, default: Any = _MISSING) -> Any:
    if is_literal(v):
        return v.val
    return env[v] if default is _MISSING else env.get(v, default)


class _CallSplit:
    """A call both parts need, split through: its body runs as a `_Level` in each (no custom derivative is lost:
    a backward pass is not differentiated again)."""

    def __init__(self, eqn: Any, body: Body, need_b: set[Any], need_w: set[Any]):
        skip = len(eqn.invars) - len(body.jaxpr.invars)  # a call's body runs on its trailing operands
        self.skip = skip
        self.b_makes = [v in need_b for v in eqn.outvars]
        self.w_makes = [v in need_w and v not in need_b for v in eqn.outvars]
        self.level = _Level(body, self.b_makes, self.w_makes, [True] * len(body.jaxpr.invars))
        self.b_reads = [False] * skip + self.level.b_reads
        self.w_reads = [False] * skip + self.level.w_reads
        self.iface_avals = self.level.iface_avals

    def run_b(self, ins: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        return self.level.run_b(ins[self.skip:])

    def run_w(self, ins: Sequence[Any], iface: Sequence[Any]) -> list[Any]:
        return self.level.run_w(ins[self.skip:], iface)


class _ScanSplit:
    """A `scan` both parts need, split into a B scan and a W scan of the same length and direction.

    The B scan carries the carries B needs (those whose results B reads, and every carry they read: a fixed point)
    and emits the body's interface as extra stacked outputs; the W scan carries the rest (a weight gradient summed
    over the iterations) and reads the consts and xs it needs and that stacked interface as xs. Interface values
    that do not change between iterations are stacked all the same."""

    def __init__(self, eqn: Any, need_b: set[Any], need_w: set[Any]):
        info = scan(eqn)
        self.eqn, self.info = eqn, info
        nc, nk = info.num_consts, info.num_carry
        nx = len(eqn.invars) - nc - nk
        carry_outs, ys = eqn.outvars[:nk], eqn.outvars[nk:]
        ys_b = [v in need_b for v in ys]
        ys_w = [v in need_w and v not in need_b for v in ys]
        in_b = {k for k, v in enumerate(carry_outs) if v in need_b}
        in_w = {k for k, v in enumerate(carry_outs) if v in need_w} - in_b
        while True:  # grow the carry sets until each part has every carry it reads
            level = _Level(info.body, [k in in_b for k in range(nk)] + ys_b,
                           [k in in_w for k in range(nk)] + ys_w,
                           [True] * nc + [k in in_w for k in range(nk)] + [True] * nx)
            grown_b = in_b | {k for k in range(nk) if level.b_reads[nc + k]}
            grown_w = (in_w | {k for k in range(nk) if level.w_needs[nc + k]}) - grown_b
            if (grown_b, grown_w) == (in_b, in_w):
                break
            in_b, in_w = grown_b, grown_w
        self.level, self.carry_b, self.carry_w = level, sorted(in_b), sorted(in_w)
        self.b_makes = [k in in_b for k in range(nk)] + ys_b
        self.w_makes = [k in in_w for k in range(nk)] + ys_w
        self.b_reads = level.b_reads[:nc] + [k in in_b for k in range(nk)] + level.b_reads[nc + nk:]
        self.w_reads = level.w_reads[:nc] + [k in in_w for k in range(nk)] + level.w_reads[nc + nk:]
        self.iface_avals = [a.update(shape=(info.length, *a.shape)) for a in level.iface_avals]

    def _scan(self, body: Callable, carry: list[Any], xs: Any) -> Any:
        p = self.eqn.params
        return jax.lax.scan(body, carry, xs, length=self.info.length, reverse=bool(p.get("reverse", False)),
                            unroll=p.get("unroll", 1))

    def _body_args(self, ins: Sequence[Any], carries: Sequence[int], carry: Sequence[Any], xs: Sequence[bool],
                   x: Sequence[Any]) -> list[Any]:
        nc, nk = self.info.num_consts, self.info.num_carry
        args = [*ins[:nc], *[None] * (len(ins) - nc)]
        for k, c in zip(carries, carry):
            args[nc + k] = c
        for i, xi in zip(_picked(range(nc + nk, len(ins)), xs), x):
            args[i] = xi
        return args

    def run_b(self, ins: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        nc, nk = self.info.num_consts, self.info.num_carry
        xs = self.level.b_reads[nc + nk:]

        def body(carry, x):
            outs, iface = self.level.run_b(self._body_args(ins, self.carry_b, carry, xs, x))
            return outs[:len(carry)], (outs[len(carry):], iface)

        carry, (ys, iface) = self._scan(body, [ins[nc + k] for k in self.carry_b], _picked(ins[nc + nk:], xs))
        return [*carry, *ys], iface

    def run_w(self, ins: Sequence[Any], iface: Sequence[Any]) -> list[Any]:
        nc, nk = self.info.num_consts, self.info.num_carry
        xs = self.level.w_reads[nc + nk:]

        def body(carry, x):
            outs = self.level.run_w(self._body_args(ins, self.carry_w, carry, xs, x[0]), x[1])
            return outs[:len(carry)], outs[len(carry):]

        carry, ys = self._scan(body, [ins[nc + k] for k in self.carry_w], (_picked(ins[nc + nk:], xs), list(iface)))
        return [*carry, *ys]


def _split_eqn(eqn: Any, need_b: set[Any], need_w: set[Any]) -> _CallSplit | _ScanSplit | None:
    """How an equation both parts need is split between them; None: it is not (it runs in B)."""
    if eqn.primitive.name == "scan":
        return _ScanSplit(eqn, need_b, need_w)
    body = call_body(eqn)
    return None if body is None else _CallSplit(eqn, body, need_b, need_w)


@dataclasses.dataclass(frozen=True)
class BackwardSplit:
    """A backward pass cut into B (the input gradients: on a pipeline's critical path) and W (the weight
    gradients: deferred into the schedule's bubbles), as a zero-bubble schedule (ZB-H1) runs them.

    `b(*inputs) -> (b_outputs, interface)`; `w(*inputs, *interface) -> w_outputs` (W may be given None for the
    inputs it does not read, `w_inputs` says which it does). Both are Python functions that run the backward's
    equations one by one (trace them under `jax.jit`, `jax.shard_map`, or `jax.make_jaxpr` to see what each runs);
    `interface_avals`: the shapes and dtypes of the interface (a pipeline's stash buffers)."""

    level: _Level

    def b(self, *inputs: Any) -> tuple[list[Any], list[Any]]:
        self._check(len(inputs), 0)
        return self.level.run_b(inputs)

    def w(self, *inputs_and_interface: Any) -> list[Any]:
        n = len(self.level.body.jaxpr.invars)
        self._check(n, len(inputs_and_interface) - n)
        return self.level.run_w(inputs_and_interface[:n], inputs_and_interface[n:])

    @property
    def interface_avals(self) -> list[Any]:
        return list(self.level.iface_avals)

    @property
    def n_interface(self) -> int:
        return len(self.level.iface_avals)

    @property
    def w_inputs(self) -> list[bool]:
        return list(self.level.w_reads)

    def _check(self, n_inputs: int, n_interface: int) -> None:
        want = len(self.level.body.jaxpr.invars)
        if n_inputs != want or n_interface not in (0, self.n_interface):
            raise TypeError(f"the backward takes {want} inputs (then {self.n_interface} interface values for W); "
                            f"got {n_inputs} and {n_interface}")


def split_backward(closed: Any, b_outputs: Sequence[bool], w_inputs: Sequence[bool] | None = None
                   ) -> BackwardSplit:
    """Split a backward pass (a `ClosedJaxpr`, as `jax.make_jaxpr` gives it) into B, which makes the outputs
    `b_outputs` marks (the stage input's cotangent), and W, which makes the others (the weight gradients), with no
    equation run by both: B hands W the values it made that W needs (the interface) instead.

    Where one equation feeds both, a `scan` (a layer stack's transposed loop) becomes a B scan and a W scan, and a
    call (`CALLS`: jit, remat, custom_jvp/vjp, ...) is split through its body, both recursively; any other equation
    (`cond`, `while`, a collective's `psum` of both) runs wholly in B and its outputs W needs become interface:
    correct, only less deferred. Returns Python callables rather than jaxprs: a split scan is a new `lax.scan` over
    Python bodies, so no scan equation has to be built by hand (its parameters differ between jax releases).
    `w_inputs`: the inputs W may be given itself (default all); one it needs but is not given is interface (a
    pipeline's W tick has its residuals and weights, not the cotangent its B read, whose buffer is reused)."""
    body = open_jaxpr(closed)
    b_out = [bool(x) for x in b_outputs]
    n = len(body.jaxpr.invars)
    readable = [True] * n if w_inputs is None else [bool(x) for x in w_inputs]
    if len(b_out) != len(body.jaxpr.outvars) or len(readable) != n:
        raise ValueError(f"b_outputs has {len(b_out)} flags for {len(body.jaxpr.outvars)} outputs, w_inputs "
                         f"{len(readable)} for {n} inputs")
    return BackwardSplit(_Level(body, b_out, [not x for x in b_out], readable))
