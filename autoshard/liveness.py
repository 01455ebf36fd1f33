"""What a compiled step holds at its memory peak: XLA's buffer liveness, simulated from the scheduled HLO.

`compiled.memory_analysis()` gives one figure for the step's temporaries; this says what they are, so that a memory
prediction that misses can be traced to the values it miscounts (`autoshard verify`, `analysis.format_report`).

Post-optimisation HLO is scheduled: each computation lists its instructions in the order they run. Walking that
order, an instruction allocates its output, unless the output is a view or an in-place update of an operand (a
bitcast, a tuple, a get-tuple-element, a while loop's state, a dynamic-update-slice, a fusion whose root updates its
operand in place, an elementwise fusion that takes over an operand dying there, as XLA's buffer sharing allows); a
buffer is freed once nothing that aliases it is used again; a while loop, a conditional or a call adds its
computations' own peak while it runs. Entry parameters, the step's outputs and constants are not temporaries. This
is not XLA's heap simulator (no fragmentation or alignment, no reuse across computations): against the temporaries
XLA allocated it read -4.7% to +8.8% on the straight-line steps of 38 plans of users' models, 35 of them within 2%
(runs/benchmarks/memory_breakdown.md), and +2.3%, +5.1% and 0.0% on layer scans (gpt-tiny data=8 and
data=2,fsdp=2,tensor=2, moe-tiny data=4,tensor=2: tests/test_inspect.py), +8.2% on a scan under full remat (gpt-tiny
fsdp=4,tensor=2), where it counts the recomputed layer's slices of the stacked residuals that XLA partly shares.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

from autoshard.hlo import HloModule, Instr, called_computations, parameter_index, shape_bytes

VIEWS = {"bitcast", "get-tuple-element", "tuple", "while", "copy-done", "opt-barrier", "optimization-barrier",
         "add-dependency"}
"""Opcodes whose output is (part of) an operand's buffer: they allocate nothing and keep their operands alive."""
NOT_TEMPORARY = {"parameter", "constant"}
"""Entry arguments and literals: not temporaries (a body's parameters are its caller's buffers)."""
SHAREABLE = {"add", "subtract", "multiply", "divide", "select", "convert", "copy", "negate", "exp", "maximum",
             "minimum"}
"""Elementwise opcodes whose output may take over an operand buffer of the same size that dies there."""
KINDS = ("forward values", "backward values", "argument copies", "in a loop or branch body", "other")
"""How `Buffer.kind` sorts a buffer by the op_name jax gave it: the forward pass (`jit(f)/jvp(...)`), the backward
(`transpose(jvp(...))`), a copy of an argument (named by its path, e.g. `params['blocks'][0]['wq']`: a layout copy
or gather of a weight), what the loop or branch running at the peak holds, and anything without a name."""
_LEAF = re.compile(r"[a-z]+\d*\[[\d,]*\]")
_UNNAMED = re.compile(r"[\w.\-]*$")
"""An op_name that is empty or only an HLO instruction's name (what XLA gives the buffers it creates)."""


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One temporary buffer live at the peak."""

    name: str
    nbytes: float
    shape: str
    op_name: str

    @property
    def kind(self) -> str:
        if "transpose(" in self.op_name:
            return "backward values"
        if self.op_name.startswith("jit("):
            return "forward values"
        return "other" if _UNNAMED.match(self.op_name) else "argument copies"


@dataclasses.dataclass(frozen=True)
class PeakLiveSet:
    """The entry computation's temporaries at the simulated peak, and the peak of a body running there."""

    temp_bytes: float
    """The simulated peak of the step's temporaries (compare `memory_analysis().temp_size_in_bytes`)."""
    at: str
    """The instruction during which the peak is reached."""
    buffers: tuple[Buffer, ...]
    """The entry computation's buffers live there, largest first."""
    body_bytes: float
    """The peak of the while loop, conditional or call running at that instruction (0 for an ordinary op)."""

    def by_kind(self) -> dict[str, float]:
        """Bytes per `KINDS` entry (those with any)."""
        out: dict[str, float] = defaultdict(float)
        for b in self.buffers:
            out[b.kind] += b.nbytes
        if self.body_bytes:
            out["in a loop or branch body"] += self.body_bytes
        return {k: out[k] for k in KINDS if out.get(k)}


def _bytes(shape: str) -> float:
    return sum(shape_bytes(leaf) for leaf in _LEAF.findall(shape))


def _op_name(ins: Instr) -> str:
    m = re.search(r'op_name="([^"]*)"', ins.attrs)
    return m.group(1).replace("\\'", "'") if m else ""


def _in_place_source(mod: HloModule, ins: Instr) -> str | None:
    """The operand a dynamic-update-slice (or a fusion whose root is one on a fusion parameter) writes into."""
    if ins.opcode == "dynamic-update-slice":
        return ins.operands[0]
    if ins.opcode != "fusion":
        return None
    m = re.search(r"calls=%([\w.\-]+)", ins.attrs)
    root = mod.root(m.group(1)) if m else None
    if root is None or root.opcode != "dynamic-update-slice":
        return None
    target = mod.by_name.get(root.operands[0])
    if target is None or target.opcode != "parameter":
        return None
    k = parameter_index(target)
    return ins.operands[k] if 0 <= k < len(ins.operands) else None


class _Simulator:
    def __init__(self, mod: HloModule):
        self.mod = mod
        self.peaks: dict[str, float] = {}

    def peak(self, comp: str) -> float:
        if comp not in self.peaks:
            self.peaks[comp] = 0.0  # (a recursive call graph is not HLO, but stay finite)
            self.peaks[comp] = self.run(comp).temp_bytes
        return self.peaks[comp]

    def _body_peak(self, ins: Instr) -> float:
        if ins.opcode == "fusion":
            return 0.0
        return max((self.peak(c) for _, c in called_computations(ins) if c in self.mod.comps), default=0.0)

    def run(self, comp: str) -> PeakLiveSet:
        instrs = self.mod.comps[comp]
        pos = {i.name: k for k, i in enumerate(instrs)}
        end = {}
        for k, ins in enumerate(instrs):
            for o in ins.operands:
                if o in pos:
                    end[o] = k
        root = next((i for i in instrs if i.root), instrs[-1])
        end[root.name] = len(instrs)
        in_place = {i.name: src for i in instrs if (src := _in_place_source(self.mod, i)) is not None}
        # a loop body writes its results into the loop's state (its caller's buffers); the entry computation
        # writes its outputs into output buffers (or into the donated arguments they alias): not temporaries
        if comp == self.mod.entry or any(key == "body" for _, key in self.mod.callers.get(comp, [])):
            for o in root.operands if root.opcode == "tuple" else [root.name]:
                in_place.setdefault(o, o)
        for ins in reversed(instrs):  # an alias keeps what it views alive
            if ins.opcode == "tuple":
                sources = ins.operands
            elif ins.opcode in VIEWS:
                sources = ins.operands[:1]
            else:
                sources = [in_place[ins.name]] if ins.name in in_place else []
            for o in sources:
                if o in pos:
                    end[o] = max(end.get(o, pos[o]), end.get(ins.name, pos[ins.name]))
        alive: dict[str, float] = {}
        live = best = best_body = 0.0
        best_at, best_alive = root.name, {}
        for k, ins in enumerate(instrs):
            own = 0.0 if ins.opcode in VIEWS or ins.opcode in NOT_TEMPORARY or ins.name in in_place \
                else _bytes(ins.shape)
            if own and (ins.opcode in SHAREABLE or (ins.opcode == "fusion" and "kind=kLoop" in ins.attrs)):
                dying = next((o for o in ins.operands if alive.get(o) == own and end.get(o, k) <= k), None)
                if dying is not None:
                    live -= alive.pop(dying)
            if own:
                alive[ins.name] = own
                live += own
            body = self._body_peak(ins)
            if live + body > best:
                best, best_body, best_at, best_alive = live + body, body, ins.name, dict(alive)
            for name in [n for n in alive if end.get(n, k) <= k and n != root.name]:
                live -= alive.pop(name)
        by = self.mod.by_name
        names = {n: _op_name(by[n]) for n in best_alive}
        for ins in instrs:  # a loop's state (stacked residuals, accumulators) is named by the loop
            state = by.get(ins.operands[0]) if ins.opcode == "while" and ins.operands else None
            for o in state.operands if state is not None and state.opcode == "tuple" else []:
                if o in names and _UNNAMED.match(names[o]):
                    names[o] = _op_name(ins)
        buffers = sorted((Buffer(n, b, by[n].shape, names[n]) for n, b in best_alive.items()),
                         key=lambda b: -b.nbytes)
        return PeakLiveSet(best, best_at, tuple(buffers), best_body)


def peak_live_set(mod: HloModule) -> PeakLiveSet:
    """The simulated peak of a compiled module's temporaries (`autoshard.hlo.parse_hlo` of `compiled.as_text()`):
    how large, where, and which buffers of the entry computation make it up."""
    return _Simulator(mod).run(mod.entry)


__all__ = ["Buffer", "KINDS", "PeakLiveSet", "peak_live_set"]
