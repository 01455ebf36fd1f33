"""Pipeline schedules as static tables: which stage does what, tick by tick, and what that costs.

A schedule is computed in Python once, from the number of pipeline devices P, virtual stages per device V and
microbatches M. Each device runs an ordered list of forward (F) and backward (B) ops on (chunk, microbatch) pairs:

- `gpipe`: every forward, then every backward (holds all M microbatches' activations);
- `1f1b`: P-p-1 warm-up forwards on device p, then one forward / one backward alternately, then the rest of the
  backwards (holds at most P-p microbatches);
- `interleaved`: 1F1B over V chunks per device (stage s = v*P + p lives on device p as chunk v), forwards and
  backwards walking the chunks in groups of P microbatches (Narayanan et al. 2021); it shortens the bubble by V;
- `zb`: zero bubble (after ZB-H1 of Qi et al. 2023): each backward split into B, the input gradient the previous
  stage waits for, and W, the weight gradient nothing waits for. F and B keep 1F1B's order; W ops fill the ticks a
  device would idle (`_place_zb`), a microbatch "in flight" (its residuals held) from its forward to its W, at most
  1F1B's P-p on device p. With unit F, B, W that is 3M + 2(P-1) ticks, a bubble of (P-1)(F+B) against 1F1B's
  (P-1)(F+B+W) with the fused backward, and one grad slot a device. It needs V=1 and the stash (mode "none"): W
  reads the forward's residuals and the cotangents its B saved ("grad" slots), never recomputing;
- `zb-h1`: zb with every device bounded by device 0's in-flight count, as ZB-H1 does: the later devices defer
  their Ws, 3M + P - 1 ticks, up to P grad slots a device (the same residual slots: every device's buffers are the
  largest device's).

The lists are placed on a common clock by greedy list scheduling with unit-time ops: an op runs at the first tick
at which its inputs have arrived (a forward needs the previous stage's forward of that microbatch, a backward the
next stage's backward and its own forward, each at an earlier tick). Buffer slots for arriving activations and
cotangents are assigned per device by interval colouring, so the executor holds exactly the live buffers the
schedule needs (coloured when first asked for: the planner needs only how many, counted without colouring). The same
table is the planner's cost: ticks, bubble fraction, peak live buffers, transfers.

In pipeline mode "none" (`PIPELINE_MODES`, `stashes`) a forward keeps its stage's vjp residuals in a stash slot
until its backward, which then runs the backward alone; an arriving stage input is then held only until its forward
reads it. The last stage's forward is an op of its own too (FWD_LAST): its output takes its input's slot until its
backward, which runs the head, the loss and the backward. (Folded into that backward, as it was before, every
lockstep tick holding the last stage's backward paid its forward too: gpt-tiny:layers=8 pipe=4 x data=2 1F1B was
predicted 27.93 ms a step with it folded, 23.84 ms without; runs/benchmarks/zero_bubble.md at 65be34f and bbdf0fd.)
Under "recompute" and "full" a backward recomputes its stage's forward from the stage input, held until then.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq

import numpy as np

from planner.errors import PlanError
from planner.plan import SCHEDULES

IDLE, FWD, FWD_FIRST, BWD, BWD_LAST, BWD_FIRST, WGT, FWD_LAST = range(8)
"""Op codes in the executor's table. With the stash the last stage's forward is FWD_LAST, an op of its own that
keeps its residuals and leaves its output where its input was, for its backward (BWD_LAST: the head, loss and
backward). Without it the last stage's forward is IDLE in the code table (its backward recomputes the forward
through the head and loss), but it still occupies its tick and orders the schedule. In a zb table the
BWD codes are the B op only (the input gradient, saving what W needs in a grad slot) and WGT is the W op: the
weight gradient of (chunk, microbatch) from its stashed residuals and the grad slot its B wrote."""

F, B, W = "F", "B", "W"

ZERO_BUBBLE = ("zb", "zb-h1")
"""The schedules that split each backward into B and W (`_place_zb`): "zb" defers a W only into a tick its device
would idle, one grad slot a device; "zb-h1" (ZB-H1 of Qi et al. 2023) defers them further, up to P grad slots, for
P - 1 fewer ticks."""


PIPELINE_MODES = ("none", "recompute", "full")
"""How a pipeline's backward gets its stage's residuals, fastest first: "none" keeps them from the forward (the
stash; no remat), "recompute" runs the stage's forward again from its input (no remat inside), "full" recomputes
under full remat (the least memory). The planner tries them in this order (`planner.stages.choose`)."""


def pipeline_mode(remat: str, stash: bool = True) -> str:
    """The mode of a plan's pipeline: its remat, and for remat "none" its spec's `stash`."""
    return "full" if remat == "full" else "none" if stash else "recompute"


def mode_settings(mode: str) -> tuple[str, bool]:
    """(the plan's remat, its pipeline spec's `stash`) of a pipeline mode: `pipeline_mode` the other way."""
    return ("full", True) if mode == "full" else ("none", mode == "none")


def stashes(mode: str) -> bool:
    """Whether a pipeline's forward ticks keep their stage's vjp residuals for the backward tick (no recompute there).

    The one place that decides it, for the executor (`autoshard.pipeline`) and the planner (`planner.stages`): mode
    "none" only. Under "recompute" and "full" a backward tick recomputes its stage's forward from the stage input,
    the only activation held per microbatch in flight (keeping the remat's residuals instead, the layer inputs,
    would hold one per layer for one forward less). Measured on gpt-tiny pipe=2 x data=4 1F1B
    (runs/benchmarks/pipeline_efficiency.md): "none" 1.00x the unpipelined step's FLOPs and 8.0 MiB a device;
    "full" 1.38x, 3.4 MiB; "full" with the stash 1.22x, 3.5 MiB; "recompute" (the executor before the stash)
    1.16x."""
    return mode == "none"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A static pipeline schedule over T ticks for P devices (all tables are int32 [T, P])."""

    kind: str
    devices: int
    virtual: int
    microbatches: int
    code: np.ndarray
    """What each device computes at each tick (IDLE, FWD, FWD_FIRST, BWD, BWD_LAST, BWD_FIRST, WGT, FWD_LAST)."""
    chunk: np.ndarray
    """Which of the device's V layer chunks the op runs (0 when idle)."""
    microbatch: np.ndarray
    act_slots: int
    cot_slots: int
    phase: np.ndarray
    """0 idle, 1 forward, 2 backward (zb: its B), 3 weight gradient (zb's W): the schedule's own view (the last
    stage's forward counts as a forward)."""
    op_ticks: np.ndarray
    """The tick of every op, [stage, forward / backward, microbatch]: what the buffer tables are coloured from (zb:
    the backward is the B op)."""
    stash: bool = False
    """Forwards keep their vjp residuals for their backward (`stashes`): stage inputs are held only to the forward."""
    stash_slots: int = 0
    """Residual slots per device: the most microbatches whose forward (of a stage other than the last, unless
    `stash_last`) has run on a device and their backward not yet (0 without stash)."""
    stash_last: bool = False
    """The last stage's forward keeps its residuals too, an op of its own (FWD_LAST; a MoE statistics sweep runs it
    under GPipe): its backward then runs the head and the backward alone (the default with the stash)."""
    w_ticks: np.ndarray | None = None
    """zb: the tick of every W op, [stage, microbatch] (None for the other kinds, whose backward is one op)."""
    grad_slots: int = 0
    """zb: slots per device for what a B saves for its W (the most microbatches between the two); 0 otherwise."""

    @functools.cached_property
    def _slot_tables(self) -> tuple[np.ndarray, ...]:
        """(in_slot, cot_slot, recv_act, recv_cot, stash_slot, grad_slot), coloured when first asked for (the
        executor needs them, the planner only the slot counts)."""
        return _slot_tables(self)

    @property
    def in_slot(self) -> np.ndarray:
        """Activation buffer slot the op reads its stage input from (-1: none; the first stage reads the batch)."""
        return self._slot_tables[0]

    @property
    def cot_slot(self) -> np.ndarray:
        """Cotangent buffer slot a backward reads (-1: none; the last stage starts from the loss)."""
        return self._slot_tables[1]

    @property
    def recv_act(self) -> np.ndarray:
        """Activation slot the value arriving at the end of this tick is written to (-1: nothing arrives)."""
        return self._slot_tables[2]

    @property
    def recv_cot(self) -> np.ndarray:
        """Cotangent slot the value arriving at the end of this tick is written to (-1: nothing arrives)."""
        return self._slot_tables[3]

    @property
    def stash_slot(self) -> np.ndarray:
        """The residual slot a forward writes (at the end of its tick) and its backward reads (-1: none); zb: its W
        reads it too (without `stash_last`, the last stage's B, its forward folded in, writes it for its W)."""
        return self._slot_tables[4]

    @property
    def grad_slot(self) -> np.ndarray:
        """zb: the grad slot a B writes (at the end of its tick) and its W reads (-1: none; all -1 for other kinds)."""
        return self._slot_tables[5]

    @functools.cached_property
    def sends(self) -> np.ndarray:
        """[T, 2] bool: whether some device sends a stage input (column 0: a forward of a stage other than the
        last) or a cotangent (column 1: a backward of a stage other than the first) at the end of each tick. The
        executor runs a tick's ppermute only then: one of nothing would still move a microbatch's bytes (GPipe's
        ticks send one or the other, never both)."""
        out = np.zeros((self.ticks, 2), bool)
        out[self.op_ticks[:-1, 0].ravel(), 0] = True
        out[self.op_ticks[1:, 1].ravel(), 1] = True
        return out

    @property
    def ticks(self) -> int:
        return int(self.code.shape[0])

    @property
    def stages(self) -> int:
        return self.devices * self.virtual

    @property
    def forward_ticks(self) -> int:
        """Ticks up to the last one in which some device runs a forward."""
        rows = np.nonzero(np.any(self.phase == 1, axis=1))[0]
        return int(rows[-1]) + 1 if len(rows) else 0

    @property
    def forwards_first(self) -> bool:
        """Whether every forward op runs before the first backward op (GPipe's table; 1F1B's interleaves them):
        a statistic over the whole batch's forwards is then complete before any backward needs it."""
        rows = np.nonzero(np.any(self.phase == 2, axis=1))[0]
        return self.forward_ticks > 0 and len(rows) > 0 and self.forward_ticks <= rows[0]

    @property
    def bubble(self) -> float:
        """Idle fraction of device-ticks under unit-time ops: 1 - 2*M*V / T (zb, three ops a microbatch: 3*M*V)."""
        ops = 3.0 if self.w_ticks is not None else 2.0
        return 1.0 - ops * self.microbatches * self.virtual / self.ticks

    def timeline(self) -> list[str]:
        """Rows `stage p: F0 F1 . B0 ... W0` (stage x tick), chunk as a suffix letter when V > 1."""
        rows = []
        for p in range(self.devices):
            cells = []
            for t in range(self.ticks):
                if not self.phase[t, p]:
                    cells.append(".")
                    continue
                tag = f"{'.FBW'[self.phase[t, p]]}{self.microbatch[t, p]}"
                cells.append(tag + ("abcdefgh"[self.chunk[t, p]] if self.virtual > 1 else ""))
            width = max(len(c) for c in cells)
            rows.append(f"device {p}: " + " ".join(c.ljust(width) for c in cells))
        return rows



def device_orders(kind: str, devices: int, microbatches: int, virtual: int = 1) -> list[list[tuple[str, int, int]]]:
    """Per device, its ordered ops (F or B, chunk, microbatch): `_order_ids` decoded; zb's with its W ops, read off
    its placement (where a W goes depends on when the Bs around it can run)."""
    M = microbatches
    if kind in ZERO_BUBBLE:
        ticks, w = _place_zb(devices, M, kind == "zb-h1")
        return [[op for _, op in sorted([((int(ticks[p, b, i]), b), (B if b else F, 0, i))
                                         for b in (0, 1) for i in range(M)]
                                        + [((int(w[p, i]), 2), (W, 0, i)) for i in range(M)])] for p in range(devices)]
    ids = _order_ids(kind, devices, M, virtual)
    stage, backward, mb = (ids // (2 * M)).tolist(), ((ids // M) % 2).tolist(), (ids % M).tolist()
    return [[(B if b else F, s // devices, i) for s, b, i in zip(*rows)] for rows in zip(stage, backward, mb)]


def warmup(kind: str, devices: int, microbatches: int, virtual: int, device: int) -> int:
    """How many forwards `device` runs before it alternates one forward and one backward: all of them under GPipe,
    the microbatches still to enter the later devices under 1F1B (and zb, whose F / B order is 1F1B's), and with V
    chunks (Narayanan et al. 2021) two a later device plus one round of the other chunks."""
    P, M, V, p = devices, microbatches, virtual, device
    if kind == "gpipe":
        return M * V
    if kind in ("1f1b", *ZERO_BUBBLE):
        return min(P - p - 1, M)
    return min(2 * (P - p - 1) + (V - 1) * P, M * V)


def _op_id(op: str, stage, microbatch, M: int):
    """Index of an op (stage and microbatch: ints or arrays) among all ops: forward and backward of each stage, M
    microbatches each."""
    return (2 * stage + (op == B)) * M + microbatch


def _order_ids(kind: str, P: int, M: int, V: int) -> np.ndarray:
    """Per device, its ordered ops as `_op_id`s, [P, 2 M V]: `warmup` forwards, then one forward and one backward
    alternately, then the remaining backwards. Forwards go through the microbatches in order (interleaved: the k-th
    forward is chunk (k // P) mod V of microbatch (k // (P V)) P + k mod P), backwards alike with the chunks in
    reverse."""
    n = M * V
    k = np.arange(n)
    out = np.empty((P, 2 * n), np.int64)
    for p in range(P):
        if kind == "interleaved":
            chunk, mb = (k // P) % V, (k // (P * V)) * P + k % P
            fwd, bwd = _op_id(F, chunk * P + p, mb, M), _op_id(B, (V - 1 - chunk) * P + p, mb, M)
        else:
            fwd, bwd = _op_id(F, p, k, M), _op_id(B, p, k, M)
        w = warmup(kind, P, M, V, p)
        out[p, :w] = fwd[:w]
        out[p, w:2 * n - w:2] = fwd[w:]
        out[p, w + 1:2 * n - w:2] = bwd[:n - w]
        out[p, 2 * n - w:] = bwd[n - w:]
    return out


def check(kind: str, devices: int, microbatches: int, virtual: int = 1, layers: int | None = None,
          stash: bool | None = None) -> None:
    """One-line errors for a pipeline shape that cannot be scheduled; `stash`: whether the forwards keep their
    residuals (`stashes`), None where not known yet (`make_schedule` checks it)."""
    if kind not in SCHEDULES:
        raise PlanError(f"unknown pipeline schedule {kind!r}: use one of {', '.join(SCHEDULES)}")
    if microbatches < 1 or virtual < 1:
        raise PlanError("pipeline microbatches and virtual stages must be >= 1")
    if kind in ZERO_BUBBLE and virtual != 1:
        raise PlanError(f"the {kind} schedule needs one stage per device, not virtual stages {virtual}: drop "
                        f"--virtual-stages or use --schedule interleaved")
    if kind in ZERO_BUBBLE and stash is False:
        raise PlanError(f"the {kind} schedule needs the stash (pipeline mode \"none\": remat none, pipeline stash "
                        "true; its weight gradients reuse the forward's residuals): change them or use --schedule 1f1b")
    if kind != "interleaved" and virtual != 1:
        raise PlanError(f"virtual stages ({virtual}) need --schedule interleaved, not {kind}")
    if kind == "interleaved" and microbatches % devices:
        raise PlanError(f"the interleaved schedule needs microbatches ({microbatches}) divisible by pipe "
                        f"({devices}): change --microbatches")
    if layers is not None and devices * virtual > layers:
        raise PlanError(f"{devices * virtual} pipeline stages (pipe={devices} x virtual={virtual}) but the model has "
                        f"only {layers} layers: use fewer stages")
    if layers is not None and virtual > 1 and layers % virtual:
        raise PlanError(f"virtual stages ({virtual}) must divide the {layers} layers: change --virtual-stages")


@functools.lru_cache(maxsize=256)
def make_schedule(kind: str, devices: int, microbatches: int, virtual: int = 1, stash: bool = False,
                  stash_last: bool | None = None) -> Schedule:
    """The tick table of `kind` for P=`devices`, M=`microbatches`, V=`virtual` (cached: tables are immutable);
    `stash`: forwards keep their residuals for their backward (`stashes`), which changes the buffers only (zb needs
    it); `stash_last`: the last stage's forward too, an op of its own (FWD_LAST; default: with the stash)."""
    check(kind, devices, microbatches, virtual, stash=stash)
    P, M, V = devices, microbatches, virtual
    stash_last = stash and (stash_last is None or stash_last)
    ticks, w = _place_zb(P, M, kind == "zb-h1") if kind in ZERO_BUBBLE else (_place(kind, P, M, V), None)
    T = int(ticks.max() if w is None else max(ticks.max(), w.max())) + 1
    code, chunk, mb, phase = _op_tables(ticks, T, P, w, stash_last)
    acts, cots, kept, grads = _buffer_intervals(ticks, P, stash, stash_last, w)
    return Schedule(kind, P, V, M, code, chunk, mb, max(_most_live(*acts[:3]), 1), max(_most_live(*cots[:3]), 1),
                    phase, ticks, stash, max(_most_live(*kept[:3]), 1) if stash else 0, stash_last, w,
                    max(_most_live(*grads[:3]), 1) if w is not None else 0)


def _place(kind: str, P: int, M: int, V: int) -> np.ndarray:
    """The tick of every op, [stage, forward / backward, microbatch], by greedy list scheduling with unit-time ops:
    at each tick, each device runs the next op of its order if that op's inputs were produced at earlier ticks (a
    forward needs the previous stage's forward, a backward its own forward and the next stage's backward). One
    step of the loop is one tick of every device at once."""
    n = 2 * M * V
    ids, backward, first, second, done = _dependencies(kind, P, M, V)
    none = len(done) - 1
    pos, rows, t = np.zeros(P, np.int64), np.arange(P), 0
    while (active := pos < n).any():
        k = np.minimum(pos, n - 1)
        ready = active & (done[first[rows, k]] < t) & (done[second[rows, k]] < t)
        if not ready.any():
            raise AssertionError(f"{kind} schedule deadlocked at tick {t} (P={P}, M={M}, V={V})")
        done[ids[rows[ready], k[ready]]] = t
        pos += ready
        t += 1
    return done[:none].reshape(P * V, 2, M)


def _dependencies(kind: str, P: int, M: int, V: int) -> tuple[np.ndarray, ...]:
    """(each device's ordered op ids `_order_ids`, whether each is a backward, the op it waits for first and second
    (a forward the previous stage's forward, a backward its own forward and the next stage's backward; the last
    entry, at tick -1, where there is none), the tick each op ran, all not yet but that last entry): what the
    greedy placements `_place` and `_place_zb` start from."""
    S = P * V
    ids = _order_ids(kind, P, M, V)
    s, backward, i = ids // (2 * M), (ids // M) % 2 == 1, ids % M
    none = 2 * S * M  # an input that is always there: the last entry, at tick -1
    first = np.where(backward, _op_id(F, s, i, M), np.where(s > 0, _op_id(F, s - 1, i, M), none))
    second = np.where(backward & (s < S - 1), _op_id(B, s + 1, i, M), none)
    done = np.full(none + 1, np.iinfo(np.int64).max)
    done[none] = -1
    return ids, backward, first, second, done


def _place_zb(P: int, M: int, h1: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """zb's (ticks of the F and B ops as `_place`'s [stage, 2, M], ticks of the W ops [stage, M]), by greedy list
    scheduling with unit ops: at each tick a device runs the next F / B of 1F1B's order if its inputs were produced
    at earlier ticks and, for an F, if that keeps its microbatches in flight (forward run, W not yet) within 1F1B's
    min(P - p, M); else the oldest W whose B has run; else it idles. After its last B it drains its Ws.

    No deadlock: 1F1B's order runs the k-th F after the first k - (P-p-1) Bs, so an F held back by the bound finds a
    W whose B has run. No shorter table under this bound: the last device's bound of one forces F0 B0 W0 F1 B1 W1
    ..., its last B at tick P + 3(M-1) at the earliest, each earlier device's last B a tick after the next's and
    device 0's last W a tick later: T >= 3M + 2(P-1). This placement meets it, and runs each W in the tick after its
    B (the next F held back by the bound, or the next B waiting for the next device's), so one grad slot a device
    (both checked for P <= 12, M < 40). ZB-H1 proper bounds every device by device 0's P (the same peak stash
    slots) and reaches 3M + P-1, the last device's fill and its 3M ops, but its later devices run their last Bs back
    to back, their Ws deferred: up to P grad slots a device, against one here; `h1` places that ("zb-h1")."""
    n = 2 * M
    ids, backward, first, second, done = _dependencies("zb", P, M, 1)
    none = len(done) - 1
    rows = np.arange(P)
    w_done = np.full((P, M), -1, np.int64)
    bound = np.minimum(np.full(P, P) if h1 else P - rows, M)
    pos, forwards, wpos, t = np.zeros(P, np.int64), np.zeros(P, np.int64), np.zeros(P, np.int64), 0
    while (wpos < M).any():
        k = np.minimum(pos, n - 1)
        ready = (pos < n) & (done[first[rows, k]] < t) & (done[second[rows, k]] < t)
        ready &= backward[rows, k] | (forwards - wpos < bound)
        weight = ~ready & (wpos < M) & (done[_op_id(B, rows, np.minimum(wpos, M - 1), M)] < t)
        if not (ready | weight).any():
            raise AssertionError(f"zb schedule deadlocked at tick {t} (P={P}, M={M})")
        done[ids[rows[ready], k[ready]]] = t
        forwards += ready & ~backward[rows, k]
        pos += ready
        w_done[rows[weight], wpos[weight]] = t
        wpos += weight
        t += 1
    return done[:none].reshape(P, 2, M), w_done


def _op_tables(ticks: np.ndarray, T: int, P: int, w_ticks: np.ndarray | None = None, stash_last: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(code, chunk, microbatch, phase) tables of the placed ops (zb: with its W ops, `w_ticks`; `stash_last`: the
    last stage's forward an op of its own)."""
    S, _, M = ticks.shape
    s, backward, i = np.meshgrid(np.arange(S), [False, True], np.arange(M), indexing="ij")
    t, p = ticks, s % P
    fwd_code = np.where(s == 0, FWD_FIRST, np.where(s == S - 1, FWD_LAST if stash_last else IDLE, FWD))
    bwd_code = np.where(s == 0, BWD_FIRST, np.where(s == S - 1, BWD_LAST, BWD))
    code, chunk, mb, phase = (np.zeros((T, P), np.int32) for _ in range(4))
    code[t, p] = np.where(backward, bwd_code, fwd_code)
    chunk[t, p], mb[t, p] = s // P, i
    phase[t, p] = np.where(backward, 2, 1)
    if w_ticks is not None:  # V = 1: chunk 0
        s, i = np.meshgrid(np.arange(S), np.arange(M), indexing="ij")
        code[w_ticks, s], mb[w_ticks, s], phase[w_ticks, s] = WGT, i, 3
    return code, chunk, mb, phase


def _buffer_intervals(ticks: np.ndarray, P: int, stash: bool = False, stash_last: bool = False,
                      w_ticks: np.ndarray | None = None) -> tuple[tuple[np.ndarray, ...], ...]:
    """The buffers, as (start, end, device, stage, microbatch) arrays for activations, cotangents, residuals and
    (zb) grads: a device holds stage s's input for microbatch i from its arrival (end of the previous stage's
    forward tick) to its backward, or with `stash` to its forward (the last stage's to its backward, which
    recomputes the forward); a cotangent from the next stage's backward tick to its own backward; with `stash`, the
    residuals of a forward of a stage other than the last (with `stash_last`, of every stage) from its tick to its
    backward (none without); the last stage's input slot then holds its output from its forward to its backward.
    zb (`w_ticks`, the W ops' ticks): residuals are held to the W, and the last stage's (unless `stash_last`) from
    its B, which recomputes its forward; what a B saves for its W from the B to the W, on every stage."""
    S, _, M = ticks.shape
    s, i = np.meshgrid(np.arange(S), np.arange(M), indexing="ij")
    reader = np.concatenate([ticks[1:-1, 0], ticks[-1:, 1]]) if stash else ticks[1:, 1]
    acts = (ticks[:-1, 0], reader, s[1:] % P, s[1:], i[1:])
    cots = (ticks[1:, 1], ticks[:-1, 1], s[:-1] % P, s[:-1], i[:-1])
    n = S if stash_last else S - 1
    kept = (ticks[:n, 0], ticks[:n, 1], s[:n] % P, s[:n], i[:n]) if stash else (np.zeros((0, M), int),) * 5
    grads = (np.zeros((0, M), int),) * 5
    if w_ticks is not None:
        writer = np.concatenate([ticks[:n, 0], ticks[n:, 1]])
        kept, grads = (writer, w_ticks, s % P, s, i), (ticks[:, 1], w_ticks, s % P, s, i)
    return tuple(tuple(a.ravel() for a in b) for b in (acts, cots, kept, grads))


def _most_live(start: np.ndarray, end: np.ndarray, device: np.ndarray) -> int:
    """The most buffers one device holds at once (each from its start tick to, not including, its end tick: a slot
    read during tick r may be rewritten at the end of tick r); `_colour`, which gives each value the lowest slot
    free at its arrival in order of arrival, uses exactly this many (first fit in that order is optimal on
    intervals)."""
    if not len(start):
        return 0
    span = int(end.max()) + 1  # devices apart: each device's ticks shifted past every earlier device's
    a, e = np.sort(start + device * span), np.sort(end + device * span)
    return int((np.searchsorted(a, a, "right") - np.searchsorted(e, a, "right")).max())


def _slot_tables(sched: Schedule) -> tuple[np.ndarray, ...]:
    """(in_slot, cot_slot, recv_act, recv_cot, stash_slot, grad_slot) of a schedule: each device's buffers coloured
    (`_colour`); the receive tables index the receiver's column (the sender's tick is when the value is written on
    the receiver); a residual slot is written by its forward's tick and read by its backward's (one table); zb: read
    by its W's too (the last stage's written by its B, read by its W), and a grad slot written by a B, read by its
    W (one table)."""
    T, P = sched.code.shape
    S = P * sched.virtual
    in_slot, cot_slot, recv_act, recv_cot, stash_slot, grad_slot = (np.full((T, P), -1, np.int32) for _ in range(6))
    wt = sched.w_ticks
    acts, cots, kept, grads = _buffer_intervals(sched.op_ticks, P, sched.stash, sched.stash_last, wt)
    fwd, bwd = sched.op_ticks[:, 0], sched.op_ticks[:, 1]
    act_readers = (lambda s, i: (fwd[s, i],) if s < S - 1 else (fwd[s, i], bwd[s, i])) if sched.stash \
        else (lambda s, i: (fwd[s, i], bwd[s, i]))
    kept_readers = (lambda s, i: (bwd[s, i],)) if wt is None else \
        (lambda s, i: (bwd[s, i], wt[s, i]) if s < S - 1 or sched.stash_last else (wt[s, i],))
    for (start, end, dev, s, i), read, recv, readers, count in (
            (acts, in_slot, recv_act, act_readers, sched.act_slots),
            (cots, cot_slot, recv_cot, lambda s, i: (bwd[s, i],), sched.cot_slots),
            (kept, stash_slot, stash_slot, kept_readers, sched.stash_slots),
            (grads, grad_slot, grad_slot, lambda s, i: (wt[s, i],), sched.grad_slots)):
        most = max((_colour(sorted(zip(start[dev == p].tolist(), end[dev == p].tolist(), (s[dev == p] // P).tolist(),
                                       i[dev == p].tolist())), read, recv, readers, p, P) for p in range(P)), default=0)
        assert (max(most, 1) if len(start) else 0) == count, (sched.kind, P, sched.microbatches, sched.virtual, most,
                                                              count)  # `_most_live`
    return in_slot, cot_slot, recv_act, recv_cot, stash_slot, grad_slot


def _colour(intervals: list[tuple[int, int, int, int]], read_table: np.ndarray, recv_table: np.ndarray,
            readers, p: int, P: int) -> int:
    """Interval colouring of device p's (start, end, chunk, microbatch) buffers in order of arrival, each value to
    the lowest slot free by then (a slot read during tick r may be rewritten at the end of tick r: reads precede the
    end-of-tick receive); `readers(stage, microbatch)`: the ticks that read it. Returns the slot count. Heaps of
    busy and free slots give the same slots as scanning every slot for each value, in O(n log n)."""
    busy: list[tuple[int, int]] = []  # (free from tick, slot)
    free: list[int] = []
    slots = 0
    for start, end, c, i in intervals:
        while busy and busy[0][0] <= start:
            heapq.heappush(free, heapq.heappop(busy)[1])
        if free:
            slot = heapq.heappop(free)
        else:
            slot, slots = slots, slots + 1
        heapq.heappush(busy, (end, slot))
        recv_table[start, p] = slot
        for r in readers(c * P + p, i):
            read_table[r, p] = slot
    return slots


def receive_permutations(devices: int, virtual: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """ppermute pairs for activations (to the next device) and cotangents (to the previous one).

    With virtual stages the last device's chunk v feeds the first device's chunk v + 1, so the ring closes.
    """
    P = devices
    if virtual > 1:
        return [(p, (p + 1) % P) for p in range(P)], [(p, (p - 1) % P) for p in range(P)]
    return [(p, p + 1) for p in range(P - 1)], [(p + 1, p) for p in range(P - 1)]


def step_time(sched: Schedule, fwd: np.ndarray, bwd: np.ndarray, transfer: float = 0.0,
              wgt: np.ndarray | None = None) -> float:
    """Seconds per step: the ticks run in lockstep (each ends with the ppermutes), so a tick costs its slowest op.

    fwd / bwd: [stages] seconds of one microbatch's forward / backward on each stage (the backward including its
    recomputed forward; zb: the B op only); transfer: seconds of a tick's two point-to-point sends (a tick pays
    for those it makes, `Schedule.sends`); wgt: [stages]
    seconds of a W op (zb only, and needed there).
    """
    if sched.w_ticks is not None and wgt is None:
        raise ValueError("step_time of a zb schedule needs wgt, the seconds of each stage's weight gradient")
    total = 0.0
    P = sched.devices
    for t in range(sched.ticks):
        longest = 0.0
        for p in range(P):
            s = sched.chunk[t, p] * P + p
            if sched.phase[t, p] == 1:
                longest = max(longest, fwd[s] if sched.code[t, p] != IDLE else 0.0)
            elif sched.phase[t, p] == 2:
                longest = max(longest, bwd[s])
            elif sched.phase[t, p] == 3:
                longest = max(longest, wgt[s])
        total += longest + transfer / 2 * int(sched.sends[t].sum())
    return total
