"""The post-optimisation HLO of a compiled SPMD step, as data: its instructions and call graph, how often each
computation runs (loop trip counts, and the conditional branches actually taken, per partition), matmul FLOPs,
collectives' replica groups as mesh axes, and the reduce-scatters XLA:CPU writes as an all-reduce read through
partition-indexed slices. `autoshard.analysis` turns this into per-device figures.

Replica groups (iota, Shardy mesh or explicit lists) are expanded to partition ids; partition id p is the device at
position p of `mesh.devices.flat`. A conditional's branch index computed from constants, the enclosing loops'
induction variables and partition-id (a pipeline's per-tick `lax.switch` over its schedule table) is evaluated for
every iteration and partition (`device_multiplicities`); where it cannot be, every branch counts.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from planner import jax_internals

COLLECTIVES: tuple[str, ...] = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                                "ragged-all-to-all", "collective-broadcast")
"""HLO collective opcodes (their async `-start` forms are counted, `-done` ones are not)."""

_DTYPE_BYTES = {"pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "token": 0}
_ARRAY_RE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+[a-z0-9]*)?)\[([0-9,]*)\]")
_CALL_KEYS = ("body", "condition", "to_apply", "calls", "true_computation", "false_computation")
_SHAPE_PRESERVING = ("bitcast", "copy", "reshape", "transpose", "convert")
"""Ops between an all-reduce and its partition-indexed dynamic-slice that keep every element (layout changes)."""


# -- HLO text -----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Instr:
    """One HLO instruction: enough of it to follow data flow and read collective attributes."""

    name: str
    comp: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    root: bool = False
    args: str = ""
    """The raw text between the opcode's parentheses (a constant's literal, a parameter's number)."""


@dataclasses.dataclass
class HloModule:
    """The computations of a module, an index by instruction name and the call graph."""

    comps: dict[str, list[Instr]]
    entry: str
    num_partitions: int
    by_name: dict[str, Instr] = dataclasses.field(default_factory=dict)
    users: dict[str, list[Instr]] = dataclasses.field(default_factory=dict)
    callers: dict[str, list[tuple[Instr, str]]] = dataclasses.field(default_factory=dict)

    def root(self, comp: str) -> Instr | None:
        instrs = self.comps.get(comp, [])
        return next((i for i in instrs if i.root), instrs[-1] if instrs else None)

    def parameter(self, comp: str, index: int) -> Instr | None:
        return next((i for i in self.comps.get(comp, []) if i.opcode == "parameter" and parameter_index(i) == index),
                    None)


def parameter_index(ins: Instr) -> int:
    """The argument number of a `parameter` instruction (-1 if unreadable)."""
    m = re.match(r"\s*(\d+)", ins.args)
    return int(m.group(1)) if m else -1


def _split_shape(rest: str) -> tuple[str, str]:
    """'(f32[2], f32[3]) all-gather-start(%a), ...' -> ('(f32[2], f32[3])', 'all-gather-start(%a), ...')."""
    rest = rest.strip()
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                return rest[: i + 1], rest[i + 1:].strip()
    sp = rest.find(" ")
    return (rest, "") if sp < 0 else (rest[:sp], rest[sp + 1:].strip())


def _split_call(tail: str) -> tuple[str, list[str], str, str]:
    """'fusion(%a, %b), kind=kLoop' -> ('fusion', ['a', 'b'], 'kind=kLoop', '%a, %b')."""
    m = re.match(r"([\w\-]+)\(", tail)
    if not m:
        return "", [], tail, ""
    depth, start = 0, m.end() - 1
    end = len(tail)
    for i in range(start, len(tail)):
        depth += (tail[i] == "(") - (tail[i] == ")")
        if depth == 0:
            end = i
            break
    inner = tail[start + 1:end]
    operands = re.findall(r"%([\w.\-]+)", inner)
    return m.group(1), operands, tail[end + 1:].lstrip(", "), inner


def parse_hlo(text: str) -> HloModule:
    """Parse post-optimisation HLO text (`compiled.as_text()`) into computations and a use/call index."""
    comps: dict[str, list[Instr]] = {}
    cur, entry = None, ""
    m = re.search(r"num_partitions=(\d+)", text)
    num_partitions = int(m.group(1)) if m else 1
    for line in text.splitlines():
        if cur is None:
            m = jax_internals.HLO_COMPUTATION.match(line)
            if m and "=" not in line.split("(")[0]:
                cur = m.group(2)
                comps[cur] = []
                if m.group(1):
                    entry = cur
            continue
        if line.startswith("}"):
            cur = None
            continue
        m = jax_internals.HLO_INSTRUCTION.match(line)
        if not m:
            continue
        root, name, rest = m.groups()
        shape, tail = _split_shape(rest)
        opcode, operands, attrs, args = _split_call(tail)
        comps[cur].append(Instr(name, cur, shape, opcode, operands, attrs, root=bool(root), args=args))
    mod = HloModule(comps, entry or next(iter(comps), ""), num_partitions)
    for instrs in comps.values():
        for ins in instrs:
            mod.by_name[ins.name] = ins
            for o in ins.operands:
                mod.users.setdefault(o, []).append(ins)
            for key, child in called_computations(ins):
                mod.callers.setdefault(child, []).append((ins, key))
    return mod


def restore_constants(mod: HloModule, compiled: Any) -> None:
    """Fill in the integer literals `as_text()` elided, when a conditional's branch index may need them."""
    elided = {i.name for instrs in mod.comps.values() for i in instrs
              if i.opcode == "constant" and "{...}" in i.args and _is_int(i.shape)}  # indices are integers
    if not elided or not any(i.opcode == "conditional" for instrs in mod.comps.values() for i in instrs):
        return
    for line in (jax_internals.hlo_text_with_constants(compiled) or "").splitlines():
        m = jax_internals.HLO_INSTRUCTION.match(line) if " constant(" in line else None
        if m and m.group(2) in elided:
            opcode, _, _, args = _split_call(_split_shape(m.group(3))[1])
            if opcode == "constant":
                mod.by_name[m.group(2)].args = args


def called_computations(ins: Instr) -> list[tuple[str, str]]:
    """(how, computation) for every computation `ins` calls."""
    out = [(key, c) for key in _CALL_KEYS for c in re.findall(rf"\b{key}=%?([\w.\-]+)", ins.attrs)]
    for grp in re.findall(r"branch_computations=\{([^}]*)\}", ins.attrs):
        out += [("branch", c.strip().lstrip("%")) for c in grp.split(",") if c.strip()]
    return out


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape string, summed over tuple elements."""
    total = 0.0
    for dt, dims in _ARRAY_RE.findall(shape):
        total += _DTYPE_BYTES.get(dt, 1 if dt.startswith("f8") else 4) * math.prod(int(d) for d in dims.split(",") if d)
    return total


def elements(shape: str) -> int:
    return sum(math.prod(int(d) for d in dims.split(",") if d) for _, dims in _ARRAY_RE.findall(shape))


def _trip_count(loop: Instr) -> float | None:
    """A while loop's trip count as XLA annotated it (`known_trip_count`), None when XLA could not derive one."""
    t = jax_internals.HLO_TRIP_COUNT.search(loop.attrs)
    return float(t.group(1)) if t else None


def _call_edges(mod: HloModule) -> dict[str, list[tuple[str, float, Instr, str]]]:
    """caller computation -> (callee, runs per run of the caller, calling instruction, how it calls).

    The one place trip counts enter: a while body runs trip-count times (once when unknown), its condition once
    more; everything else once per run of its caller (every branch of a conditional: the upper bound).
    """
    edges: dict[str, list[tuple[str, float, Instr, str]]] = defaultdict(list)
    for comp, instrs in mod.comps.items():
        for ins in instrs:
            trip = (_trip_count(ins) or 1.0) if ins.opcode == "while" else 1.0
            for how, child in called_computations(ins):
                if child in mod.comps:
                    runs = trip if how == "body" else trip + 1 if how == "condition" else 1.0
                    edges[comp].append((child, runs, ins, how))
    return edges


def _callers_first(mod: HloModule, edges: Mapping[str, list[tuple[str, float, Instr, str]]]) -> list[str]:
    """The computations reachable from the entry, every caller before its callees (reverse post-order)."""
    order: list[str] = []
    seen = {mod.entry}
    stack = [(mod.entry, iter(edges.get(mod.entry, [])))]
    while stack:
        node, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            order.append(node)
            stack.pop()
        elif nxt[0] not in seen:
            seen.add(nxt[0])
            stack.append((nxt[0], iter(edges.get(nxt[0], []))))
    return order[::-1]


def device_multiplicities(mod: HloModule) -> tuple[dict[str, np.ndarray], bool]:
    """How many times each computation runs on each partition per execution of the entry ([num_partitions] each),
    and whether that is exact.

    While bodies run their known trip count. A conditional's branch runs as often as it is taken, where its index
    can be evaluated for every loop iteration and partition (`branch_shares`: a pipeline's per-tick `lax.switch`
    over a schedule table); where it cannot, every branch counts as if it always ran (an upper bound) and the
    second result is False.
    """
    edges = _call_edges(mod)
    mult: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(mod.num_partitions))
    mult[mod.entry] = np.ones(mod.num_partitions)
    shares: dict[str, dict[str, np.ndarray] | None] = {}
    exact = True
    for comp in _callers_first(mod, edges):
        for child, runs, ins, how in edges.get(comp, []):
            factor: float | np.ndarray = runs
            if how in _BRANCH_KEYS:
                if ins.name not in shares:
                    shares[ins.name] = branch_shares(mod, ins)
                    exact = exact and (shares[ins.name] is not None or not mult[comp].any())
                got = shares[ins.name]
                factor = got[child] / _branches(ins).count(child) if got is not None else runs
            mult[child] = mult[child] + mult[comp] * factor
    return dict(mult), exact


def multiplicities(mod: HloModule) -> dict[str, float]:
    """How many times each computation runs per execution of the entry, averaged over partitions (while bodies x
    known trip count; conditional branches as `device_multiplicities` counts them)."""
    return {c: float(np.mean(m)) for c, m in device_multiplicities(mod)[0].items()}


def computation_flops(mod: HloModule) -> dict[str, float]:
    """Matmul FLOPs of one run of each computation: 2 x output elements x contracted size of every dot and
    convolution in it (not in the computations it calls)."""
    out: dict[str, float] = {}
    for comp, instrs in mod.comps.items():
        total = 0.0
        for ins in instrs:
            if ins.opcode == "convolution" and len(ins.operands) > 1 and ins.operands[1] in mod.by_name:
                kernel = _dims(mod.by_name[ins.operands[1]].shape)
                m = re.search(r"dim_labels=\w+_(\w+)->", ins.attrs)
                out_features = kernel[m.group(1).index("o")] if m and "o" in m.group(1) else 1
                total += 2.0 * elements(ins.shape) * math.prod(kernel) / max(out_features, 1)
            elif ins.opcode == "dot" and ins.operands:
                lhs = _dims(mod.by_name[ins.operands[0]].shape) if ins.operands[0] in mod.by_name else []
                m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
                contracted = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m and lhs else 1
                total += 2.0 * elements(ins.shape) * contracted
        if total:
            out[comp] = total
    return out


def dot_flops(mod: HloModule, mult: Mapping[str, Any] | None = None) -> Any:
    """Matmul FLOPs of the module (`computation_flops`), times how often each computation runs (`mult`, default
    `multiplicities`; per-partition arrays give per-partition FLOPs).

    XLA's `cost_analysis()` counts a while body once whatever its trip count (so a scanned N-layer model looks like
    one layer); this count follows the trip counts. Elementwise work is not included (it is small next to matmuls).
    """
    mult = multiplicities(mod) if mult is None else mult
    return sum((f * mult[c] for c, f in computation_flops(mod).items() if c in mult), 0.0)


# -- replica groups -----------------------------------------------------------------------------------------------

def _ints(s: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", s)]


def _iota(dims: list[int], perm: list[int] | None) -> np.ndarray:
    a = np.arange(math.prod(dims)).reshape(dims)
    return a.transpose(perm) if perm else a


def _mesh_groups(axes_part: str, devices_part: str | None, grouped: str) -> np.ndarray:
    """Shardy `mesh['a'=2,'b'=4], device_ids=(...) {'b'}` (axes may be sub-axes `'a':(1)2`) -> [groups, size]."""
    names, sizes = [], []
    for name, size in re.findall(r"'?([^'=,\s]+)'?\s*=\s*(\d+)", axes_part):
        names.append(name)
        sizes.append(int(size))
    n = math.prod(sizes)
    if devices_part:
        m = re.fullmatch(r"\s*\[([\d,]+)\](?:T\(([\d,]+)\))?\s*", devices_part)
        ids = (_iota(_ints(m.group(1)), _ints(m.group(2)) if m.group(2) else None).ravel() if m
               else np.asarray(_ints(devices_part)))
    else:
        ids = np.arange(n)
    refs = [(a, int(p) if p else None, int(s) if s else None)
            for a, p, s in re.findall(r"'?([^'{},:\s]+)'?(?::\((\d+)\)(\d+))?", grouped)]
    # split every mesh dimension into the factors the grouped (sub-)axes need, as XLA's MeshAxesReplicaGroupList does
    dims, group_dims = [], []
    for name, size in zip(names, sizes):
        mine = [(p, s, k) for k, (a, p, s) in enumerate(refs) if a == name]
        if not mine:
            dims.append(size)
            continue
        if len(mine) == 1 and mine[0][0] is None:
            group_dims.append((mine[0][2], len(dims)))
            dims.append(size)
            continue
        prefix = 1
        for p, s, k in sorted(mine):
            if p != prefix:
                dims.append(p // prefix)
                prefix = p
            group_dims.append((k, len(dims)))
            dims.append(s)
            prefix *= s
        if prefix != size:
            dims.append(size // prefix)
    grouped_axes = [d for _, d in sorted(group_dims)]
    rest = [d for d in range(len(dims)) if d not in grouped_axes]
    size = math.prod(dims[d] for d in grouped_axes)
    return ids.reshape(dims).transpose(rest + grouped_axes).reshape(-1, size)


def replica_groups(attrs: str, num_partitions: int) -> np.ndarray:
    """The replica groups of a collective's attributes as an int array [groups, group_size] of partition ids.

    Handles the iota form `[G,S]<=[dims]T(perm)`, the Shardy form `mesh[...], device_ids=(...) {axes}`, explicit
    `{{0,1},{2,3}}` and `{}` (all partitions in one group).
    """
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        shape = _ints(m.group(1))
        return _iota(_ints(m.group(2)), _ints(m.group(3)) if m.group(3) else None).reshape(-1, shape[-1])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(((?:[^()]|\([^()]*\))*)\))?\s*"
                  r"\{([^}]*)\}", attrs)
    if m:
        return _mesh_groups(m.group(1), m.group(2), m.group(3))
    m = re.search(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}", attrs)
    if m and m.group(1).strip():
        groups = [_ints(g) for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
        if len({len(g) for g in groups}) == 1:
            return np.asarray(groups)
        return np.asarray([groups[0]])  # ragged groups: not mesh-aligned; the first stands for all
    return np.arange(num_partitions).reshape(1, -1)


def source_target_pairs(attrs: str) -> list[tuple[int, int]]:
    """`source_target_pairs={{0,1},{1,2}}` of a collective-permute."""
    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attrs)
    return [(int(a), int(b)) for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))] if m else []


def mesh_shape(mesh: Any) -> dict[str, int]:
    if isinstance(mesh, Mapping):
        return {str(k): int(v) for k, v in mesh.items()}
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def group_axes(groups: np.ndarray, mesh: Any) -> str:
    """The mesh axes (size > 1, joined with '+' in mesh order) along which group members differ.

    'mixed' when the groups are not exactly the groups of those axes (a sub-axis, a strided or ragged set);
    'none' for groups of one. `mesh` is a jax Mesh or an ordered {axis: size}; partition p is position p.
    """
    shape = mesh_shape(mesh)
    names, sizes = list(shape), list(shape.values())
    groups = np.asarray(groups)
    if groups.size == 0 or groups.shape[-1] <= 1:
        return "none"
    if groups.max() >= math.prod(sizes):
        return "mixed"
    coords = np.stack(np.unravel_index(groups, sizes), axis=-1)  # [groups, size, axes]
    varies = [k for k in range(len(names)) if sizes[k] > 1 and np.any(coords[:, :, k] != coords[:, :1, k])]
    if math.prod(sizes[k] for k in varies) != groups.shape[1]:
        return "mixed"
    return "+".join(names[k] for k in varies)


def permute_axes(pairs: list[tuple[int, int]], mesh: Any) -> str:
    """Mesh axes a collective-permute moves data along (union over its non-trivial source->target pairs)."""
    shape = mesh_shape(mesh)
    names, sizes = list(shape), list(shape.values())
    moving = [(s, t) for s, t in pairs if s != t]
    if not moving:
        return "none"
    if max(max(p) for p in moving) >= math.prod(sizes):
        return "mixed"
    src = np.stack(np.unravel_index([s for s, _ in moving], sizes), -1)
    dst = np.stack(np.unravel_index([t for _, t in moving], sizes), -1)
    return "+".join(names[k] for k in range(len(names)) if np.any(src[:, k] != dst[:, k]))


# -- all-reduce + dynamic-slice(partition-id) == reduce-scatter ----------------------------------------------------

def _depends_on_partition(mod: HloModule, name: str) -> bool:
    """Whether a value is computed from partition-id / replica-id, following tuples, loops, fusions and calls."""
    stack: list[tuple[str, int | None]] = [(name, None)]
    seen: set[tuple[str, int | None]] = set()
    while stack:
        key = stack.pop()
        if key in seen or key[0] not in mod.by_name:
            continue
        seen.add(key)
        ins, idx = mod.by_name[key[0]], key[1]
        op = ins.opcode
        if op in ("partition-id", "replica-id"):
            return True
        if op == "parameter":
            j = parameter_index(ins)
            for caller, how in mod.callers.get(ins.comp, []):
                if how in ("body", "condition"):  # the loop-carried tuple: initial value and the body's next value
                    stack += [(o, idx) for o in caller.operands[:1]]
                    body = re.search(r"\bbody=%?([\w.\-]+)", caller.attrs)
                    r = mod.root(body.group(1)) if body else None
                    if r is not None:
                        stack.append((r.name, idx))
                elif j < len(caller.operands):
                    stack.append((caller.operands[j], idx))
        elif op == "get-tuple-element":
            m = re.search(r"\bindex=(\d+)", ins.attrs)
            stack += [(o, int(m.group(1)) if m else None) for o in ins.operands[:1]]
        elif op == "tuple" and idx is not None and idx < len(ins.operands):
            stack.append((ins.operands[idx], None))
        elif op in ("while", "fusion", "call", "conditional"):
            for how, child in called_computations(ins):
                if how in ("body", "calls", "to_apply", "branch", "true_computation", "false_computation"):
                    r = mod.root(child)
                    if r is not None:
                        stack.append((r.name, idx))
            if op != "fusion":
                stack += [(o, idx if op == "while" else None) for o in ins.operands]
        else:
            stack += [(o, None) for o in ins.operands]
    return False


_BINARY = {"add": np.add, "subtract": np.subtract, "multiply": np.multiply, "maximum": np.maximum,
           "minimum": np.minimum, "and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor,
           "shift-left": np.left_shift, "shift-right-logical": np.right_shift, "power": np.power}
_COMPARE = {"EQ": np.equal, "NE": np.not_equal, "LT": np.less, "LE": np.less_equal, "GT": np.greater,
            "GE": np.greater_equal}


def _dims(shape: str) -> list[int]:
    m = _ARRAY_RE.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _is_int(shape: str) -> bool:
    return bool(re.match(r"\s*[su]\d+\[|\s*pred\[", shape))


def _loop_invariant(mod: HloModule, body: str | None, index: int) -> bool:
    """Whether element `index` of a while loop's carried tuple passes through the body unchanged."""
    root = mod.root(body) if body else None
    if root is None or root.opcode != "tuple" or index >= len(root.operands):
        return False
    v = mod.by_name.get(root.operands[index])
    while v is not None and v.opcode in ("copy", "bitcast") and v.operands:
        v = mod.by_name.get(v.operands[0])
    if v is None or v.opcode != "get-tuple-element":
        return False
    m = re.search(r"\bindex=(\d+)", v.attrs)
    src = mod.by_name.get(v.operands[0]) if v.operands else None
    return bool(m and int(m.group(1)) == index and src is not None and src.opcode == "parameter")


@dataclasses.dataclass
class _Points:
    """Where `PartitionEval` evaluates: one point per (partition, iteration of each enclosing loop).

    `partition[k]` is point k's partition id; `loops[while name] = (tuple index of its induction variable, the
    variable's value at each point)`. Without loops there is one point per partition.
    """

    partition: np.ndarray
    loops: dict[str, tuple[int, np.ndarray]] = dataclasses.field(default_factory=dict)


_MAX_ELEMENTS = 1 << 24
"""Largest intermediate (points x elements) the evaluator computes; bigger ones are given up on."""


class PartitionEval:
    """Evaluates small integer expressions (slice offsets, branch indices) at every point at once: values are
    [K, *shape] for the K points of `_Points` (default: one per partition, [N, *shape]).

    Follows fusion, call and branch parameters to their operands, loop-carried tuple elements to their
    (loop-invariant) initial values, and a loop's induction variable to its value at each point. Returns None for
    anything it does not understand, so callers can fall back to a coarser rule.
    """

    def __init__(self, mod: HloModule, points: _Points | None = None):
        self.mod = mod
        self.points = points or _Points(np.arange(mod.num_partitions))
        self.n = len(self.points.partition)
        self.memo: dict[tuple[str, int | None], np.ndarray | None] = {}

    def __call__(self, name: str, idx: int | None = None, depth: int = 0) -> np.ndarray | None:
        key = (name, idx)
        if key not in self.memo:
            self.memo[key] = None  # cycle guard
            try:
                self.memo[key] = self._eval(name, idx, depth) if depth < 200 else None
            except (ValueError, IndexError, TypeError, ZeroDivisionError, FloatingPointError):
                self.memo[key] = None
        return self.memo[key]

    def _eval(self, name: str, idx: int | None, depth: int) -> np.ndarray | None:
        ins = self.mod.by_name.get(name)
        if ins is None:
            return None
        ev = lambda o, i=None: self(o, i, depth + 1)  # noqa: E731
        op = ins.opcode
        if op == "partition-id":
            return self.points.partition
        if op == "replica-id":
            return np.zeros(self.n, dtype=np.int64)
        if op == "constant":
            return self._constant(ins)
        if op == "parameter":
            return self._parameter(ins, idx, ev)
        if op == "get-tuple-element":
            m = re.search(r"\bindex=(\d+)", ins.attrs)
            return ev(ins.operands[0], int(m.group(1))) if m and idx is None else None
        if op == "tuple":
            return ev(ins.operands[idx]) if idx is not None and idx < len(ins.operands) else None
        if op in ("fusion", "call"):
            child = next((c for how, c in called_computations(ins) if how in ("calls", "to_apply")), None)
            r = self.mod.root(child) if child else None
            return ev(r.name, idx) if r is not None else None
        if op == "while":
            body = re.search(r"\bbody=%?([\w.\-]+)", ins.attrs)
            if idx is None or not _loop_invariant(self.mod, body.group(1) if body else None, idx):
                return None
            return ev(ins.operands[0], idx)
        if math.prod(_dims(ins.shape)) * self.n > _MAX_ELEMENTS:
            return None
        args = [ev(o) for o in ins.operands]
        if any(a is None for a in args):
            return None
        out = self._compute(ins, args)
        return out if out is not None and out.shape == (self.n, *_dims(ins.shape)) else None

    def _constant(self, ins: Instr) -> np.ndarray | None:
        """A constant's literal at every point (None when `as_text()` elided it as `{...}`)."""
        dims = _dims(ins.shape)
        lit = ins.args.replace("true", "1").replace("false", "0")
        vals = [float(x) for x in re.findall(r"-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?", lit)]
        if len(vals) != math.prod(dims):
            return None
        a = np.asarray(vals, dtype=np.int64 if _is_int(ins.shape) else np.float64).reshape(dims)
        return np.broadcast_to(a, (self.n, *dims))

    def _parameter(self, ins: Instr, idx: int | None, ev: Any) -> np.ndarray | None:
        """A parameter is what its (only) caller passes: a loop's induction variable or loop-invariant initial
        value, a fusion's or call's operand, a branch's operand."""
        caller_how = _only_caller(self.mod, ins.comp)
        if caller_how is None:
            return None
        caller, how = caller_how
        if how in ("body", "condition"):
            loop = self.points.loops.get(caller.name)
            if loop is not None and idx == loop[0]:
                return loop[1]
            body = re.search(r"\bbody=%?([\w.\-]+)", caller.attrs)
            if idx is None or not _loop_invariant(self.mod, body.group(1) if body else None, idx):
                return None
            return ev(caller.operands[0], idx)
        if how in _BRANCH_KEYS:
            passed = {caller.operands[1 + k] for k, b in enumerate(_branches(caller)) if b == ins.comp}
            return ev(passed.pop(), idx) if len(passed) == 1 and parameter_index(ins) == 0 else None
        j = parameter_index(ins)
        passes = how == "calls" or (how == "to_apply" and caller.opcode == "call")
        return ev(caller.operands[j], idx) if passes and j < len(caller.operands) else None

    def _compute(self, ins: Instr, args: list[np.ndarray]) -> np.ndarray | None:
        """An elementwise, shape or indexing op on evaluated operands."""
        op, n, dims = ins.opcode, self.n, _dims(ins.shape)
        if op in ("copy", "bitcast", "reshape"):
            return args[0].reshape(n, *dims)
        if op == "convert":
            return args[0] != 0 if ins.shape.lstrip().startswith("pred") else args[0].astype(
                np.int64 if _is_int(ins.shape) else np.float64)
        if op == "negate":
            return -args[0]
        if op == "not":
            return np.logical_not(args[0]) if ins.shape.lstrip().startswith("pred") else np.invert(args[0])
        if op in _BINARY:
            return _BINARY[op](args[0], args[1])
        if op == "divide":
            return np.trunc(args[0] / args[1]).astype(np.int64) if _is_int(ins.shape) else args[0] / args[1]
        if op == "remainder":
            return np.fmod(args[0], args[1])
        if op == "clamp":
            return np.minimum(np.maximum(args[1], args[0]), args[2])
        if op == "select":
            return np.where(args[0], args[1], args[2])
        if op == "compare":
            m = re.search(r"direction=(\w+)", ins.attrs)
            return _COMPARE[m.group(1)](args[0], args[1]) if m and m.group(1) in _COMPARE else None
        if op == "iota":
            m = re.search(r"iota_dimension=(\d+)", ins.attrs)
            d = int(m.group(1)) if m else 0
            axis = np.arange(dims[d]).reshape([-1 if k == d else 1 for k in range(len(dims))])
            return np.broadcast_to(axis, (n, *dims))
        return self._reshape_op(ins, args)

    def _reshape_op(self, ins: Instr, args: list[np.ndarray]) -> np.ndarray | None:
        """broadcast, slice and dynamic-slice on evaluated operands."""
        op, n, dims = ins.opcode, self.n, _dims(ins.shape)
        if op == "broadcast":
            m = re.search(r"dimensions=\{([\d,]*)\}", ins.attrs)
            src = [int(d) for d in m.group(1).split(",") if d] if m else []
            shape = [1] * len(dims)
            for k, d in enumerate(src):
                shape[d] = args[0].shape[1 + k]
            return np.broadcast_to(args[0].reshape(n, *shape), (n, *dims))
        if op == "slice":
            spans = [_ints(s) for s in re.findall(r"\[([\d:]+)\]", ins.attrs.split("slice=", 1)[-1])]
            return args[0][(slice(None), *(slice(s[0], s[1], s[2] if len(s) > 2 else 1) for s in spans))]
        if op == "dynamic-slice":
            m = re.search(r"dynamic_slice_sizes=\{([\d,]*)\}", ins.attrs)
            return _dynamic_slice(args[0], args[1:], _ints(m.group(1)) if m else [])
        return None


def _only_caller(mod: HloModule, comp: str) -> tuple[Instr, str] | None:
    """The one instruction that calls `comp` and how (a conditional listing it as several branches counts once)."""
    callers = {(ins.name, how): (ins, how) for ins, how in mod.callers.get(comp, [])}
    return next(iter(callers.values())) if len(callers) == 1 else None


def _dynamic_slice(x: np.ndarray, starts: list[np.ndarray], sizes: list[int]) -> np.ndarray:
    """HLO dynamic-slice at every point at once (x [K, *dims], starts [K] each, or one [K, rank] vector of starts in
    the old form): start indices are clamped so the slice stays in bounds."""
    k, rank = x.shape[0], x.ndim - 1
    if len(starts) == 1 and starts[0].ndim == 2 and rank > 1:
        starts = list(starts[0].T)
    index: list[np.ndarray] = [np.arange(k).reshape(k, *[1] * rank)]
    for d, (s, size) in enumerate(zip(starts, sizes)):
        lo = np.clip(np.asarray(s).reshape(k), 0, x.shape[1 + d] - size)
        shape = [k] + [1] * rank
        shape[1 + d] = size
        index.append((lo[:, None] + np.arange(size)).reshape(shape))
    return x[tuple(index)]


# -- conditionals: which branch runs --------------------------------------------------------------------------------

_BRANCH_KEYS = ("branch", "true_computation", "false_computation")
_MAX_POINTS = 1 << 22
"""Most (partition, iteration) points a branch index is evaluated at; beyond, the conditional is an upper bound."""


def _branches(cond: Instr) -> list[str]:
    """A conditional's branch computations by index (a pred index: [true_computation, false_computation])."""
    return [c for how, c in called_computations(cond) if how in _BRANCH_KEYS]


def _induction(loop: Instr) -> tuple[int, int, int] | None:
    """(tuple index, initial value, step) of a while loop's induction variable, as XLA annotated it."""
    i, s = jax_internals.HLO_INDUCTION.search(loop.attrs), jax_internals.HLO_INIT_STEP.search(loop.attrs)
    return (int(i.group(1)), int(s.group(1)), int(s.group(2))) if i and s else None


def _context(mod: HloModule, comp: str) -> tuple[list[Instr], list[tuple[Instr, str]]] | None:
    """The while loops `comp` runs inside (outermost first) and the (conditional, branch) it sits in, following
    each computation's only caller up to the entry; None when a computation has several callers or runs in a loop
    condition."""
    loops: list[Instr] = []
    guards: list[tuple[Instr, str]] = []
    while comp != mod.entry:
        caller_how = _only_caller(mod, comp)
        if caller_how is None or caller_how[1] == "condition" or len(loops) + len(guards) > 64:
            return None
        caller, how = caller_how
        if how == "body":
            loops.insert(0, caller)
        elif how in _BRANCH_KEYS:
            guards.append((caller, comp))
        comp = caller.comp
    return loops, guards


def _points(mod: HloModule, loops: list[Instr]) -> _Points | None:
    """Every (partition, iteration of each loop) as evaluation points; None when a loop's trip count or induction
    variable is unknown, or there are too many points."""
    trips, inductions = [], []
    for loop in loops:
        trip, ind = _trip_count(loop), _induction(loop)
        if trip is None or ind is None:
            return None
        trips.append(int(trip))
        inductions.append(ind)
    if mod.num_partitions * math.prod(trips) > _MAX_POINTS:
        return None
    grid = np.indices((mod.num_partitions, *trips)).reshape(len(trips) + 1, -1)
    return _Points(grid[0], {loop.name: (ind[0], ind[1] + ind[2] * grid[1 + k])
                             for k, (loop, ind) in enumerate(zip(loops, inductions))})


def _taken(ev: PartitionEval, cond: Instr) -> np.ndarray | None:
    """The branch a conditional takes at each point (an out-of-range index runs the last branch), or None."""
    index = ev(cond.operands[0]) if cond.operands else None
    if index is None:
        return None
    index = index.reshape(ev.n)
    if "true_computation=" in cond.attrs:  # a pred index: true runs branch 0
        return np.where(index != 0, 0, 1)
    last = len(_branches(cond)) - 1
    return np.where((index < 0) | (index > last), last, index)


def branch_shares(mod: HloModule, cond: Instr) -> dict[str, np.ndarray] | None:
    """For each branch computation of a conditional, the share of the conditional's runs on each partition that take
    it ([num_partitions]); None when the branch index cannot be evaluated.

    The index is evaluated at every iteration of the enclosing loops (known trip counts and induction variables) on
    every partition: a pipeline's `lax.switch` on a schedule table read at the tick and the device's stage. Runs of
    an enclosing conditional's branch count only where that conditional takes it.
    """
    ctx = _context(mod, cond.comp)
    points = _points(mod, ctx[0]) if ctx else None
    if ctx is None or points is None:
        return None
    ev = PartitionEval(mod, points)
    taken = _taken(ev, cond)
    if taken is None:
        return None
    runs = np.ones(ev.n, dtype=bool)
    for outer, inside in ctx[1]:
        outer_taken = _taken(ev, outer)
        if outer_taken is not None:
            runs &= np.isin(outer_taken, [k for k, b in enumerate(_branches(outer)) if b == inside])
    n = mod.num_partitions
    total = np.bincount(points.partition[runs], minlength=n)
    shares = {}
    for b in dict.fromkeys(_branches(cond)):
        hits = runs & np.isin(taken, [k for k, c in enumerate(_branches(cond)) if c == b])
        shares[b] = np.bincount(points.partition[hits], minlength=n) / np.maximum(total, 1)
    return shares


def _slice_readers(mod: HloModule, ar: Instr, element: int | None) -> list[Instr] | None:
    """The dynamic-slices through which an all-reduce result (tuple element `element`) is read, or None if any read
    takes the result whole (followed through layout changes, tuple elements and fusion parameters)."""
    found: list[Instr] = []
    stack: list[tuple[str, int | None]] = [(ar.name, element)]
    seen: set[tuple[str, int | None]] = set()
    while stack:
        key = stack.pop()
        if key in seen:
            continue
        seen.add(key)
        name, idx = key
        ins = mod.by_name[name]
        users = mod.users.get(name, [])
        if ins.root or not users:
            return None  # escapes its computation whole (a program output, a fusion or loop result)
        for u in users:
            if idx is not None:
                if u.opcode != "get-tuple-element":
                    return None
                m = re.search(r"\bindex=(\d+)", u.attrs)
                if m and int(m.group(1)) == idx:
                    stack.append((u.name, None))
            elif u.opcode in _SHAPE_PRESERVING:
                stack.append((u.name, None))
            elif u.opcode == "dynamic-slice" and u.operands[0] == name and name not in u.operands[1:]:
                found.append(u)
            elif u.opcode == "fusion":
                child = next((c for how, c in called_computations(u) if how == "calls"), None)
                for j, o in enumerate(u.operands):
                    if o == name:
                        p = mod.parameter(child, j) if child else None
                        if p is None:
                            return None
                        stack.append((p.name, None))
            else:
                return None
    return found or None


def scatter_pattern(mod: HloModule, ev: PartitionEval, ar: Instr, element: int | None, groups: np.ndarray,
             full_elements: int, mesh: Any) -> tuple[int, str, str] | None:
    """If an all-reduce operand is only read as a partition-dependent slice, (r, scatter_axes, rest_axes): it is a
    reduce-scatter over r members of each group along `scatter_axes`, then an all-reduce of the 1/r shard along
    `rest_axes` ('none' when the whole group scatters). None when it is a genuine all-reduce."""
    readers = _slice_readers(mod, ar, element)
    if not readers:
        return None
    n = groups.shape[1]
    offsets, ratios = [], set()
    for ds in readers:
        ratios.add(full_elements // max(elements(ds.shape), 1))
        starts = [ev(o) for o in ds.operands[1:]]
        offsets.append(None if any(s is None for s in starts) else np.stack([s.reshape(len(s), -1)[:, 0]
                                                                              for s in starts], -1))
    if len(ratios) != 1:
        return None
    ratio = ratios.pop()
    if any(o is None for o in offsets):  # offsets not computable: trust a partition-indexed 1/n slice
        ok = ratio == n and all(any(_depends_on_partition(mod, o) for o in ds.operands[1:]) for ds in readers)
        return (n, group_axes(groups, mesh), "none") if ok else None
    if any(not np.array_equal(o, offsets[0]) for o in offsets[1:]):
        return None
    off = offsets[0]
    classes = []
    for g in groups:
        keys = [tuple(off[p]) for p in g]
        distinct = sorted(set(keys))
        if len(distinct) != ratio or ratio <= 1:
            return None
        members = [[p for p, k in zip(g, keys) if k == d] for d in distinct]
        if len({len(m) for m in members}) != 1:
            return None
        classes += members
    full = group_axes(groups, mesh)
    rest = group_axes(np.asarray(classes), mesh) if n // ratio > 1 else "none"
    if "mixed" in (full, rest):
        return (ratio, "mixed", rest if n // ratio > 1 else "none")
    scatter = "+".join(a for a in full.split("+") if a not in rest.split("+"))
    return ratio, scatter, rest


__all__ = ["COLLECTIVES", "HloModule", "Instr", "PartitionEval", "branch_shares", "called_computations",
           "computation_flops", "device_multiplicities", "dot_flops", "elements", "group_axes", "mesh_shape",
           "multiplicities", "parameter_index", "parse_hlo", "permute_axes", "replica_groups", "restore_constants",
           "scatter_pattern", "shape_bytes", "source_target_pairs"]
