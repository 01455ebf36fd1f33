"""The zero-bubble schedule "zb" (`planner.schedule`): its tick table keeps every dependency and 1F1B's memory bound,
its buffer slots hold every value until its last read, it beats 1F1B's bubble, and the other kinds are unchanged."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from planner.errors import PlanError
from planner.plan import PipelineSpec
from planner.schedule import (BWD, BWD_FIRST, BWD_LAST, FWD, FWD_FIRST, IDLE, WGT, W, check, device_orders,
                              make_schedule, step_time)

SHAPES = [(2, 2), (2, 4), (4, 4), (4, 8), (3, 5), (8, 16), (4, 2)]


def _zb(P: int, M: int, stash_last: bool = False):
    return make_schedule.__wrapped__("zb", P, M, 1, True, stash_last)  # uncached: each test colours its own


def _op_ticks_from_table(sched) -> dict[str, np.ndarray]:
    """The tick of each F, B and W, [device, microbatch], read off the code / phase tables (not `op_ticks`)."""
    P, M = sched.devices, sched.microbatches
    out = {op: np.full((P, M), -1) for op in "FBW"}
    for t in range(sched.ticks):
        for p in range(P):
            if sched.phase[t, p]:
                op, i = "_FBW"[sched.phase[t, p]], sched.microbatch[t, p]
                assert out[op][p, i] == -1, (op, p, i, "twice")
                out[op][p, i] = t
    return out


@pytest.mark.parametrize("P,M", SHAPES)
def test_zb_keeps_every_dependency_and_the_1f1b_memory_bound(P, M):
    sched = _zb(P, M)
    ops = _op_ticks_from_table(sched)
    f, b, w = ops["F"], ops["B"], ops["W"]
    assert (f >= 0).all() and (b >= 0).all() and (w >= 0).all()  # M of each on every device
    busy = (sched.phase > 0).sum(axis=0)
    assert (busy == 3 * M).all()  # one op a tick: a second op in a cell would have overwritten one
    assert (f[1:] > f[:-1]).all()  # F of stage s after F of s-1
    assert (b > f).all() and (b[:-1] > b[1:]).all()  # B after its own F and after B of s+1
    assert (w > b).all()  # W after its own B (same device: a column)
    assert (w == b + 1).all()  # and under this bound right after it (`_place_zb`): one grad slot
    np.testing.assert_array_equal(sched.op_ticks[:, 0], f)
    np.testing.assert_array_equal(sched.op_ticks[:, 1], b)
    np.testing.assert_array_equal(sched.w_ticks, w)
    # F / B keep 1F1B's order; W in microbatch order
    for p in range(P):
        fb = sorted([(t, "F", i) for i, t in enumerate(f[p])] + [(t, "B", i) for i, t in enumerate(b[p])])
        one = [(op, i) for op, _, i in device_orders("1f1b", P, M)[p]]
        assert [(op, i) for _, op, i in fb] == one
        assert (np.diff(w[p]) > 0).all()
    # in flight (forward run, W not yet) within 1F1B's bound, at every tick
    for p in range(P):
        for t in range(sched.ticks):
            assert (f[p] <= t).sum() - (w[p] <= t).sum() <= min(P - p, M), (p, t)
    # the least ticks under that bound (`_place_zb`), three unit ops a microbatch
    assert sched.ticks == 3 * M + 2 * (P - 1)
    assert sched.bubble == pytest.approx(1 - 3 * M / sched.ticks)
    # op codes
    for p in range(P):
        for i in range(M):
            assert sched.code[f[p, i], p] == (FWD_FIRST if p == 0 else IDLE if p == P - 1 else FWD)
            assert sched.code[b[p, i], p] == (BWD_FIRST if p == 0 else BWD_LAST if p == P - 1 else BWD)
            assert sched.code[w[p, i], p] == WGT and sched.chunk[w[p, i], p] == 0
    assert (sched.code[sched.phase == 0] == IDLE).all()
    # device_orders lists the W ops where the table runs them
    for p, order in enumerate(device_orders("zb", P, M)):
        assert [(op, i) for op, _, i in order] == [("_FBW"[sched.phase[t, p]], sched.microbatch[t, p])
                                                   for t in range(sched.ticks) if sched.phase[t, p]]
        assert sum(op == W for op, _, _ in order) == M


def _simulate(sched) -> dict[str, np.ndarray]:
    """Walks the ticks with every device's slots: reads during a tick (each must find the value of its (stage,
    microbatch)), then the end-of-tick writes (each must land in a slot whose value has no read left). Returns the
    most slots of each kind a device held at once, [P]."""
    P, M, S = sched.devices, sched.microbatches, sched.stages
    assert sched.virtual == 1
    last_res_from_fwd = sched.stash_last
    reads_of = {"act": lambda s: 2 if s == S - 1 else 1, "cot": lambda s: 1, "grad": lambda s: 1,
                "res": lambda s: 1 if s == S - 1 and not last_res_from_fwd else 2}
    slots = {k: [dict() for _ in range(P)] for k in reads_of}  # kind -> device -> slot -> [stage, mb, reads left]
    counts = {"act": sched.act_slots, "cot": sched.cot_slots, "res": sched.stash_slots, "grad": sched.grad_slots}
    live = {k: np.zeros(P, int) for k in reads_of}
    n_reads = {k: 0 for k in reads_of}

    def read(kind, p, slot, s, i):
        assert 0 <= slot < counts[kind], (kind, p, slot)
        held = slots[kind][p].get(slot)
        assert held is not None and held[:2] == [s, i] and held[2] > 0, (kind, p, slot, s, i, held)
        held[2] -= 1
        n_reads[kind] += 1

    def write(kind, p, slot, s, i):
        assert 0 <= slot < counts[kind], (kind, p, slot)
        held = slots[kind][p].get(slot)
        assert held is None or held[2] == 0, (kind, p, slot, "overwritten before its read", held, (s, i))
        slots[kind][p][slot] = [s, i, reads_of[kind](s)]

    for t in range(sched.ticks):
        writes = []
        for p in range(P):
            ph, s, i = sched.phase[t, p], p, sched.microbatch[t, p]
            in_slot, cot_slot = sched.in_slot[t, p], sched.cot_slot[t, p]
            res_slot, grad_slot = sched.stash_slot[t, p], sched.grad_slot[t, p]
            if ph == 0:
                assert in_slot == cot_slot == res_slot == grad_slot == -1
                continue
            if ph == 1:
                assert cot_slot == grad_slot == -1
                if s > 0:
                    read("act", p, in_slot, s, i)
                else:
                    assert in_slot == -1  # the first stage reads the batch
                if s < S - 1 or last_res_from_fwd:
                    writes.append(("res", p, res_slot, s, i))
                else:
                    assert res_slot == -1
                if s < S - 1:
                    writes.append(("act", p + 1, sched.recv_act[t, p + 1], s + 1, i))
            elif ph == 2:
                if s == S - 1:
                    assert cot_slot == -1  # from the loss
                    read("act", p, in_slot, s, i)  # recomputes its forward
                else:
                    assert in_slot == -1
                    read("cot", p, cot_slot, s, i)
                if s < S - 1 or last_res_from_fwd:
                    read("res", p, res_slot, s, i)
                else:
                    writes.append(("res", p, res_slot, s, i))  # the last stage's B keeps what its W needs
                writes.append(("grad", p, grad_slot, s, i))
                if s > 0:
                    writes.append(("cot", p - 1, sched.recv_cot[t, p - 1], s - 1, i))
            else:
                assert in_slot == cot_slot == -1
                read("res", p, res_slot, s, i)
                read("grad", p, grad_slot, s, i)
        for kind, p, slot, s, i in writes:
            write(kind, p, slot, s, i)
        for kind in slots:
            for p in range(P):
                live[kind][p] = max(live[kind][p], sum(v[2] > 0 for v in slots[kind][p].values()))
    # every value written was read as often as it should be, and nothing arrived that the tables did not say
    for kind in slots:
        assert all(v[2] == 0 for d in slots[kind] for v in d.values()), kind
    assert (sched.recv_act >= 0).sum() == (S - 1) * M and (sched.recv_cot >= 0).sum() == (S - 1) * M
    assert n_reads == {"act": S * M, "cot": (S - 1) * M, "grad": S * M,
                       "res": (2 * S - (0 if last_res_from_fwd else 1)) * M}
    return live


@pytest.mark.parametrize("P,M", SHAPES)
def test_zb_buffers_hold_every_value_until_read(P, M):
    sched = _zb(P, M)
    live = _simulate(sched)
    # the colouring uses the fewest slots: some device holds that many at once
    assert live["res"].max() == sched.stash_slots and live["grad"].max() == sched.grad_slots
    assert live["act"].max() == sched.act_slots and live["cot"].max() == sched.cot_slots


def test_the_simulator_catches_bad_slots():
    """The simulator fails a W reading another microbatch's residuals and a forward writing over residuals still to
    be read."""
    sched = _zb(4, 8)
    F, W = sched.op_ticks[0, 0], sched.w_ticks[0]

    def corrupt(table: int, t: int, slot: int):
        tables = [a.copy() for a in sched._slot_tables]
        tables[table][t, 0] = slot
        bad = dataclasses.replace(sched)  # uncoloured: give it the corrupted tables
        bad.__dict__["_slot_tables"] = tuple(tables)
        return bad

    with pytest.raises(AssertionError):
        _simulate(corrupt(4, W[3], (sched.stash_slot[W[3], 0] + 1) % sched.stash_slots))
    with pytest.raises(AssertionError, match="overwritten"):
        _simulate(corrupt(4, F[1], sched.stash_slot[F[0], 0]))
    with pytest.raises(AssertionError):
        _simulate(corrupt(5, W[2], -1))
    _simulate(sched)


def test_zb_buffers_with_the_last_stage_stashed_by_a_sweep():
    for P, M in ((2, 4), (4, 8)):
        sched = _zb(P, M, stash_last=True)
        assert sched.stash_last and sched.stash_slot[sched.op_ticks[-1, 0], P - 1].min() >= 0
        _simulate(sched)


@pytest.mark.parametrize("P,M", SHAPES)
def test_zb_residuals_within_1f1b(P, M):
    zb, one = _zb(P, M), make_schedule("1f1b", P, M, stash=True)
    live = _simulate(zb)
    assert (live["res"] <= one.stash_slots).all() and zb.stash_slots <= one.stash_slots
    assert zb.grad_slots == 1  # W follows its B before the next B needs the slot
    assert zb.act_slots <= one.act_slots and zb.cot_slots <= one.cot_slots


@pytest.mark.parametrize("P,M", [(4, 4), (4, 8), (8, 8), (8, 16), (4, 16)])
def test_zb_bubble_below_1f1b(P, M):
    """Unit F, B and W against 1F1B's fused backward (B + W = 2): zb's lockstep step is shorter, and so is its
    table's idle share."""
    zb, one = _zb(P, M), make_schedule("1f1b", P, M, stash=True)
    ones = np.ones(P)
    t_zb, t_one = step_time(zb, ones, ones, wgt=ones), step_time(one, ones, 2 * ones)
    print(f"P={P} M={M}: zb {t_zb:g} ({zb.ticks} ticks, bubble {zb.bubble:.3f}), 1f1b {t_one:g} ({one.ticks} ticks, "
          f"bubble {one.bubble:.3f})")
    assert t_zb == zb.ticks == 3 * M + 2 * (P - 1) < t_one
    assert zb.bubble < one.bubble
    # a W costs its own seconds: a slow W on one stage lengthens the step
    slow = ones.copy()
    slow[1] = 3.0
    assert step_time(zb, ones, ones, wgt=slow) > t_zb
    # a tick pays for the sends it makes (half the per-tick transfer each): zb's W-only ticks send nothing
    n = int(zb.sends.sum())
    assert n < 2 * zb.ticks
    assert step_time(zb, ones, ones, 0.5, wgt=ones) == pytest.approx(t_zb + 0.25 * n)


def test_zb_timeline_shows_weight_ops():
    rows = _zb(4, 8).timeline()
    assert len(rows) == 4 and all(sum(c.startswith("W") for c in r.split()[2:]) == 8 for r in rows)
    assert "W3" in rows[0].split()


def test_zb_errors():
    with pytest.raises(PlanError, match="zb") as err:
        make_schedule("zb", 4, 8, 2, True)
    assert "\n" not in str(err.value) and "virtual" in str(err.value)
    with pytest.raises(PlanError, match="zb") as err:
        make_schedule("zb", 4, 8)  # no stash: mode "recompute" / "full"
    assert "\n" not in str(err.value) and "stash" in str(err.value)
    with pytest.raises(PlanError, match="zb"):
        check("zb", 4, 8, 1, stash=False)
    with pytest.raises(PlanError, match="zb"):
        check("zb", 4, 8, 2, 16)
    check("zb", 4, 8, 1, 16)  # the stash not known yet: make_schedule checks it
    PipelineSpec([[0, 1], [1, 2]], 4, "zb").validate(2)
    with pytest.raises(ValueError, match="wgt"):
        step_time(_zb(2, 2), np.ones(2), np.ones(2))


BASELINE = [  # computed by the module before zb: (kind, P, M, V, stash, stash_last), (T, act, cot, stash slots,
    # bubble), digest of the tables, step time for fwd = 1 + 0.1 s, bwd = 2.5 - 0.05 s, transfer 0.01, orders digest
    # (the first: its last stage's forward an op of its own since, FWD_LAST, which its step now pays: 39.12 before)
    (("gpipe", 4, 8, 1, True, True), (22, 8, 1, 8, 0.272727), "1c9e5f8a06771c13", 41.12, "487b956daf99e8a9"),
    (("1f1b", 4, 8, 1, False, False), (22, 4, 1, 0, 0.272727), "216b2d9f7129dbca", 49.07, "1bd9bdffe8f416b5"),
    (("1f1b", 4, 8, 1, True, False), (22, 2, 1, 4, 0.272727), "a919932233fedd5d", 49.07, "1bd9bdffe8f416b5"),
    (("1f1b", 3, 5, 1, True, False), (14, 2, 1, 3, 0.285714), "a68f836fa96df6f7", 30.49, "ef3d47a1b6ba2c29"),
    (("1f1b", 8, 16, 1, True, False), (46, 2, 1, 8, 0.304348), "92d3a6495b7d6caf", 104.01, "35b4a1bcbe0d4c69"),
    (("interleaved", 4, 8, 2, True, False), (38, 2, 2, 11, 0.157895), "5a84c1608c40bdac", 82.03, "3bd78d33e625cf4e"),
    (("interleaved", 2, 6, 3, False, False), (38, 6, 2, 0, 0.052632), "f46aaf922ca21aae", 83.78, "113847106cc122f2"),
]


def _digest(sched) -> str:
    h = hashlib.sha256()
    for a in (sched.code, sched.chunk, sched.microbatch, sched.phase, sched.op_ticks, sched.in_slot, sched.cot_slot,
              sched.recv_act, sched.recv_cot, sched.stash_slot):
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("case,counts,digest,seconds,orders", BASELINE)
def test_other_kinds_unchanged(case, counts, digest, seconds, orders):
    sched = make_schedule.__wrapped__(*case)
    assert (sched.ticks, sched.act_slots, sched.cot_slots, sched.stash_slots) == counts[:4]
    assert sched.bubble == pytest.approx(counts[4], abs=1e-6)
    assert _digest(sched) == digest
    S = sched.stages
    # (`seconds` recorded with a transfer of 0.01 on every tick; a tick now pays for the sends it makes)
    fwd, bwd = 1.0 + 0.1 * np.arange(S), 2.5 - 0.05 * np.arange(S)
    assert step_time(sched, fwd, bwd, 0.0) == pytest.approx(seconds - 0.01 * sched.ticks)
    assert step_time(sched, fwd, bwd, 0.01) == pytest.approx(seconds - 0.005 * (2 * sched.ticks - sched.sends.sum()))
    kind, P, M, V = case[:4]
    assert hashlib.sha256(repr(device_orders(kind, P, M, V)).encode()).hexdigest()[:16] == orders
    assert sched.w_ticks is None and sched.grad_slots == 0 and (sched.grad_slot == -1).all()
    assert not (sched.phase == 3).any() and not (sched.code == WGT).any()


@pytest.mark.parametrize("P,M", SHAPES)
def test_zb_h1_defers_weight_gradients_for_the_least_ticks(P, M):
    """zb-h1 (ZB-H1): every device bounded by device 0's in flight, so later devices defer their Ws: every
    dependency holds, every buffer holds its value until read, the residual slots stay 1F1B's (every device's
    buffers are the largest device's, one program), up to P grad slots, and P - 1 fewer ticks than zb's where
    M >= P (3M + P - 1: the last device's fill and its 3M ops)."""
    h1 = make_schedule.__wrapped__("zb-h1", P, M, 1, True, False)
    zb, one = _zb(P, M), make_schedule("1f1b", P, M, stash=True)
    ops = _op_ticks_from_table(h1)
    f, b, w = ops["F"], ops["B"], ops["W"]
    assert (f >= 0).all() and (b >= 0).all() and (w >= 0).all() and ((h1.phase > 0).sum(axis=0) == 3 * M).all()
    assert (f[1:] > f[:-1]).all() and (b > f).all() and (b[:-1] > b[1:]).all() and (w > b).all()
    live = _simulate(h1)
    assert live["grad"].max() == h1.grad_slots <= P and h1.stash_slots == one.stash_slots
    assert h1.ticks <= zb.ticks
    if M >= P:
        assert h1.ticks == 3 * M + P - 1 and h1.ticks == zb.ticks - (P - 1)
    ones = np.ones(P)
    assert step_time(h1, ones, ones, wgt=ones) <= step_time(zb, ones, ones, wgt=ones)
