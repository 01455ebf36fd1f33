"""Pipeline schedules as static tables: which stage does what, tick by tick, and what that costs.

A schedule is computed in Python once, from the number of pipeline devices P, virtual stages per device V and
microbatches M. Each device runs an ordered list of forward (F) and backward (B) ops on (chunk, microbatch) pairs:

- `gpipe`: every forward, then every backward (holds all M microbatches' activations);
- `1f1b`: P-p-1 warm-up forwards on device p, then one forward / one backward alternately, then the rest of the
  backwards (holds at most P-p microbatches);
- `interleaved`: 1F1B over V chunks per device (stage s = v*P + p lives on device p as chunk v), forwards and
  backwards walking the chunks in groups of P microbatches (Narayanan et al. 2021); it shortens the bubble by V.

The lists are placed on a common clock by greedy list scheduling with unit-time ops: an op runs at the first tick
at which its inputs have arrived (a forward needs the previous stage's forward of that microbatch, a backward the
next stage's backward and its own forward, each at an earlier tick). Buffer slots for arriving activations and
cotangents are assigned per device by interval colouring, so the executor holds exactly the live buffers the
schedule needs. The same table is the planner's cost: ticks, bubble fraction, peak live buffers, transfers.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq

import numpy as np

from planner.errors import PlanError
from planner.plan import SCHEDULES

IDLE, FWD, FWD_FIRST, BWD, BWD_LAST, BWD_FIRST = range(6)
"""Op codes in the executor's table. The last stage's forward is IDLE in the code table (its backward recomputes
the forward through the head and loss), but it still occupies its tick and orders the schedule."""

F, B = "F", "B"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A static pipeline schedule over T ticks for P devices (all tables are int32 [T, P])."""

    kind: str
    devices: int
    virtual: int
    microbatches: int
    code: np.ndarray
    """What each device computes at each tick (IDLE, FWD, FWD_FIRST, BWD, BWD_LAST, BWD_FIRST)."""
    chunk: np.ndarray
    """Which of the device's V layer chunks the op runs (0 when idle)."""
    microbatch: np.ndarray
    in_slot: np.ndarray
    """Activation buffer slot the op reads its stage input from (-1: none; the first stage reads the batch)."""
    cot_slot: np.ndarray
    """Cotangent buffer slot a backward reads (-1: none; the last stage starts from the loss)."""
    recv_act: np.ndarray
    """Activation slot the value arriving at the end of this tick is written to (-1: nothing arrives)."""
    recv_cot: np.ndarray
    """Cotangent slot the value arriving at the end of this tick is written to (-1: nothing arrives)."""
    act_slots: int
    cot_slots: int
    phase: np.ndarray
    """0 idle, 1 forward, 2 backward: the schedule's own view (the last stage's forward counts as a forward)."""

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
        """Idle fraction of device-ticks under unit-time ops: 1 - 2*M*V / T."""
        return 1.0 - 2.0 * self.microbatches * self.virtual / self.ticks

    def timeline(self) -> list[str]:
        """Rows `stage p: F0 F1 . B0 ...` (stage x tick), chunk as a suffix letter when V > 1."""
        rows = []
        for p in range(self.devices):
            cells = []
            for t in range(self.ticks):
                if not self.phase[t, p]:
                    cells.append(".")
                    continue
                tag = f"{'.FB'[self.phase[t, p]]}{self.microbatch[t, p]}"
                cells.append(tag + ("abcdefgh"[self.chunk[t, p]] if self.virtual > 1 else ""))
            width = max(len(c) for c in cells)
            rows.append(f"device {p}: " + " ".join(c.ljust(width) for c in cells))
        return rows



def device_orders(kind: str, devices: int, microbatches: int, virtual: int = 1) -> list[list[tuple[str, int, int]]]:
    """Per device, its ordered ops (F or B, chunk, microbatch)."""
    P, M, V = devices, microbatches, virtual
    orders = []
    for p in range(P):
        if kind == "gpipe":
            order = [(F, 0, i) for i in range(M)] + [(B, 0, i) for i in range(M)]
        elif kind == "1f1b":
            warm = min(P - p - 1, M)
            order = [(F, 0, i) for i in range(warm)]
            for i in range(M - warm):
                order += [(F, 0, warm + i), (B, 0, i)]
            order += [(B, 0, i) for i in range(M - warm, M)]
        else:  # interleaved: the k-th forward is chunk (k // P) % V of microbatch (k // (P*V)) * P + k % P
            fwd = [(F, (k // P) % V, (k // (P * V)) * P + k % P) for k in range(M * V)]
            bwd = [(B, V - 1 - (k // P) % V, (k // (P * V)) * P + k % P) for k in range(M * V)]
            warm = min((P - p - 1) * 2 + (V - 1) * P, M * V)
            order = fwd[:warm]
            for j in range(M * V - warm):
                order += [fwd[warm + j], bwd[j]]
            order += bwd[M * V - warm:]
        orders.append(order)
    return orders


def check(kind: str, devices: int, microbatches: int, virtual: int = 1, layers: int | None = None) -> None:
    """One-line errors for a pipeline shape that cannot be scheduled."""
    if kind not in SCHEDULES:
        raise PlanError(f"unknown pipeline schedule {kind!r}: use one of {', '.join(SCHEDULES)}")
    if microbatches < 1 or virtual < 1:
        raise PlanError("pipeline microbatches and virtual stages must be >= 1")
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
def make_schedule(kind: str, devices: int, microbatches: int, virtual: int = 1) -> Schedule:
    """The tick table of `kind` for P=`devices`, M=`microbatches`, V=`virtual` (cached: tables are immutable)."""
    check(kind, devices, microbatches, virtual)
    P, M, V = devices, microbatches, virtual
    orders = device_orders(kind, P, M, V)
    tick = _place(orders, P, M, V)
    if None in tick:
        raise AssertionError(f"{kind} schedule deadlocked at tick {max(t for t in tick if t is not None) + 1} "
                             f"(P={P}, M={M}, V={V})")
    T = max(tick) + 1
    code, chunk, mb, phase = _op_tables(tick, T, P, M, V)
    in_slot, cot_slot, recv_act, recv_cot = (np.full((T, P), -1, np.int32) for _ in range(4))
    act_slots = cot_slots = 0
    for p in range(P):
        acts, act_readers, cots, cot_readers = _buffer_intervals(tick, p, P, M, V)
        act_slots = max(act_slots, _colour(acts, in_slot, recv_act, act_readers, p))
        cot_slots = max(cot_slots, _colour(cots, cot_slot, recv_cot, cot_readers, p))
    # the sender's tick is when the value is written on the receiver; tables above index the receiver's column
    return Schedule(kind, P, V, M, code, chunk, mb, in_slot, cot_slot, recv_act, recv_cot,
                    max(act_slots, 1), max(cot_slots, 1), phase)


def _op_id(op: str, stage: int, microbatch: int, M: int) -> int:
    """Index of an op in `_place`'s tick list: forward and backward of each stage, M microbatches each."""
    return (2 * stage + (op == B)) * M + microbatch


def _place(orders: list[list[tuple[str, int, int]]], P: int, M: int, V: int) -> list[int | None]:
    """Each op's tick (by `_op_id`; None: never placed, a deadlock), by greedy list scheduling with unit-time ops:
    a device runs its next op at the first tick after its previous op at which the op's inputs were produced at
    earlier ticks (a forward needs the previous stage's forward, a backward its own forward and the next stage's
    backward), i.e. at max(previous op, inputs) + 1. A device waits on a missing input until the op producing it
    is placed, so this is one pass over the ops, not over the table."""
    S = P * V
    none = 2 * S * M  # an input that is always there: the last entry, at tick -1
    tick: list[int | None] = [None] * none + [-1]
    plan = []
    for p, order in enumerate(orders):
        backward = np.fromiter((op == B for op, _, _ in order), bool, len(order))
        s = np.fromiter((c for _, c, _ in order), int, len(order)) * P + p
        i = np.fromiter((i for _, _, i in order), int, len(order))
        key = (2 * s + backward) * M + i
        first = np.where(backward, (2 * s) * M + i, np.where(s > 0, (2 * s - 2) * M + i, none))
        second = np.where(backward & (s < S - 1), (2 * s + 3) * M + i, none)
        plan.append(list(zip(key.tolist(), first.tolist(), second.tolist())))
    pos, last = [0] * P, [-1] * P
    waiting: dict[int, list[int]] = {}
    ready = list(range(P))
    while ready:
        p = ready.pop()
        rows, k, t = plan[p], pos[p], last[p]
        while k < len(rows):
            key, a, b = rows[k]
            ta, tb = tick[a], tick[b]
            if ta is None or tb is None:
                waiting.setdefault(a if ta is None else b, []).append(p)
                break
            t = tick[key] = max(t, ta, tb) + 1
            k += 1
            if key in waiting:
                ready.extend(waiting.pop(key))
        pos[p], last[p] = k, t
    return tick[:none]


def _op_tables(tick: list[int], T: int, P: int, M: int, V: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(code, chunk, microbatch, phase) tables of the placed ops."""
    S = P * V
    ids = np.arange(2 * S * M)
    s, backward, i = ids // (2 * M), (ids // M) % 2 == 1, ids % M
    t, p = np.asarray(tick), s % P
    fwd_code = np.where(s == 0, FWD_FIRST, np.where(s == S - 1, IDLE, FWD))
    bwd_code = np.where(s == 0, BWD_FIRST, np.where(s == S - 1, BWD_LAST, BWD))
    code, chunk, mb, phase = (np.zeros((T, P), np.int32) for _ in range(4))
    code[t, p] = np.where(backward, bwd_code, fwd_code)
    chunk[t, p], mb[t, p] = s // P, i
    phase[t, p] = np.where(backward, 2, 1)
    return code, chunk, mb, phase


def _buffer_intervals(tick: list[int], p: int, P: int, M: int, V: int):
    """Device p's buffers: it holds stage s's input for microbatch i from its arrival (end of the previous stage's
    forward tick) to its backward; a cotangent from the next stage's backward tick to its own backward. Returns
    (activation intervals, their reading ticks, cotangent intervals, their reading ticks), keyed by (chunk,
    microbatch)."""
    S = P * V
    t = np.asarray(tick).reshape(S, 2, M)  # [stage, forward / backward, microbatch]
    acts, cots = [], []
    act_readers: dict[tuple[int, int], list[int]] = {}
    cot_readers: dict[tuple[int, int], list[int]] = {}
    for c in range(V):
        s = c * P + p
        fwd, bwd = t[s, 0].tolist(), t[s, 1].tolist()
        if s > 0:
            acts += [(a, b, (c, i)) for i, (a, b) in enumerate(zip(t[s - 1, 0].tolist(), bwd))]
            act_readers.update(((c, i), [f, b]) for i, (f, b) in enumerate(zip(fwd, bwd)))
        if s < S - 1:
            cots += [(a, b, (c, i)) for i, (a, b) in enumerate(zip(t[s + 1, 1].tolist(), bwd))]
            cot_readers.update(((c, i), [b]) for i, b in enumerate(bwd))
    return acts, act_readers, cots, cot_readers


def _colour(intervals: list[tuple[int, int, tuple[int, int]]], read_table: np.ndarray, recv_table: np.ndarray,
            readers: dict[tuple[int, int], list[int]], p: int) -> int:
    """Interval colouring in order of arrival, each value to the lowest slot free by then (a slot read during tick
    r may be rewritten at the end of tick r: reads precede the end-of-tick receive); returns the slot count. Heaps
    of busy and free slots give the same slots as scanning every slot for each value, in O(n log n)."""
    busy: list[tuple[int, int]] = []  # (free from tick, slot)
    free: list[int] = []
    slots = 0
    for start, end, key in sorted(intervals):
        while busy and busy[0][0] <= start:
            heapq.heappush(free, heapq.heappop(busy)[1])
        if free:
            slot = heapq.heappop(free)
        else:
            slot, slots = slots, slots + 1
        heapq.heappush(busy, (end, slot))
        recv_table[start, p] = slot
        for r in readers[key]:
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


def step_time(sched: Schedule, fwd: np.ndarray, bwd: np.ndarray, transfer: float = 0.0) -> float:
    """Seconds per step: the ticks run in lockstep (each ends with the ppermutes), so a tick costs its slowest op.

    fwd / bwd: [stages] seconds of one microbatch's forward / backward on each stage (the backward including its
    recomputed forward); transfer: seconds for one tick's point-to-point sends.
    """
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
        total += longest + transfer
    return total
