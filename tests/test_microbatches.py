"""Microbatch counts searched up to the per-replica batch, what one more microbatch costs, and `choose` against an
exhaustive loop over every layout (planner issue 13, item 4). Planner-only: nothing is compiled."""

import jax
import numpy as np
import pytest

import models
from planner import stages
from planner.cluster import Link, load_cluster
from planner.errors import PlanError
from planner.schedule import (PIPELINE_MODES, B, check, device_orders, make_schedule, mode_settings, pipeline_mode,
                              stashes)
from planner.search import _pipeline_costs, trace_model

CPU8 = load_cluster("cpu:8")
LOCAL, SEQ = 64, 16
"""Sequences per replica (pipe=4 x data=2 over a global batch of 128), and their length."""
MESH = {"pipe": 4, "data": 2, "fsdp": 1, "expert": 1, "seq": 1, "tensor": 1}
FREE = CPU8.replace(hbm_bandwidth=1e15, intra=Link(5e9, 0.0), inter=Link(5e9, 0.0))
"""Nothing prices extra microbatches: no link latency, and memory traffic next to free (compute-bound ops)."""
SLOW_MEMORY = CPU8.replace(hbm_bandwidth=5e7)
"""Every microbatch reads the layer weights again, and reading them dominates."""
SLOW_LINK = CPU8.replace(intra=Link(5e9, 2e-3), inter=Link(5e9, 2e-3))
"""Each tick's two sends pay 2 ms of latency."""


@pytest.fixture(scope="module")
def graph():
    shapes = {k: jax.ShapeDtypeStruct((2 * LOCAL, SEQ), np.int32) for k in ("inputs", "targets")}
    return trace_model(models.abstract("gpt-tiny:layers=8"), shapes)


def costs_on(graph, cluster, mesh=MESH):
    return _pipeline_costs(graph, cluster, mesh, None, "float32")


def exhaustive(costs, cluster, budget, local_batch):
    """`choose`'s rule with nothing pruned: every schedule, virtual stage count and divisor of the per-replica
    batch, in `choose`'s order, each stage split by `_fit`; a later layout replaces the best when 1e-9 faster; full
    remat only when nothing fits without."""
    P, L = costs.mesh["pipe"], costs.layers
    layouts = [(kind, V, M) for kind in ("1f1b", "gpipe", "interleaved", "zb", "zb-h1")
               for V in ([1] if kind != "interleaved" else range(2, stages.MAX_VIRTUAL + 1))
               for M in range(1, local_batch + 1) if local_batch % M == 0 and runs(kind, P, M, V, L)]
    for remat in ("none", "full"):
        best = None
        for kind, V, M in layouts:
            if kind.startswith("zb") and not stashes(remat):  # zb and zb-h1 run with the stash only
                continue
            c = stages._fit(costs, cluster, budget, kind, M, V, remat)
            if c is not None and (best is None or c.step_seconds < best.step_seconds * (1 - 1e-9)):
                best = c
        if best is not None:
            return best
    return None


def runs(kind, P, M, V, L):
    try:
        check(kind, P, M, V, L)
    except PlanError:
        return False
    return True


def key(choice):
    return choice.spec.schedule, choice.spec.virtual, choice.spec.microbatches, choice.spec.stages


def slower_with_more(costs, cluster, best):
    """The step time of the chosen schedule at one sequence per microbatch."""
    return stages._fit(costs, cluster, 1e12, best.spec.schedule, LOCAL, best.spec.virtual, "none").step_seconds


def test_every_divisor_of_the_local_batch_is_a_candidate():
    assert stages.microbatch_options(64) == [1, 2, 4, 8, 16, 32, 64]
    assert stages.microbatch_options(12) == [1, 2, 3, 4, 6, 12]


def test_one_sequence_per_microbatch_wins_when_nothing_prices_more_microbatches(graph):
    costs = costs_on(graph, FREE)
    best = stages.choose(costs, FREE, 1e12, LOCAL)
    assert best.spec.microbatches == LOCAL  # the smallest bubble: beyond the old 8 x pipe = 32
    half = stages._fit(costs, FREE, 1e12, best.spec.schedule, LOCAL // 2, best.spec.virtual, "none")
    assert best.step_seconds < half.step_seconds


def test_weights_read_by_every_microbatch_turn_the_choice_to_fewer(graph):
    free, slow = costs_on(graph, FREE), costs_on(graph, SLOW_MEMORY)
    # a microbatch costs more than its share once its ops are memory-bound: the weights are read whole each time
    assert stages.microbatch_seconds(slow, 1) == slow.work
    per_step = [LOCAL // m * stages.microbatch_seconds(slow, LOCAL // m)["layer"] for m in (64, 8, 1)]
    assert per_step[0] < per_step[1] < per_step[2]
    assert LOCAL * stages.microbatch_seconds(free, LOCAL)["layer"] == pytest.approx(free.work["layer"], rel=1e-6)
    best = stages.choose(slow, SLOW_MEMORY, 1e12, LOCAL)
    # priced linearly, the bubble alone would take the most on offer (LOCAL: the free costs' choice below); here 16
    # (8 before the last stage's forward became an op of its own, which shortened every stashing pipeline's ticks)
    assert best.spec.microbatches < LOCAL // 2
    assert key(best) == key(exhaustive(slow, SLOW_MEMORY, 1e12, LOCAL))
    assert best.step_seconds < slower_with_more(slow, SLOW_MEMORY, best)


def test_tick_latency_turns_the_choice_to_fewer_microbatches(graph):
    costs = costs_on(graph, SLOW_LINK)
    # the pipe group fits one node: its neighbours' sends still pay the link's latency (they were free before)
    assert stages.transfer_seconds(costs, 1, SLOW_LINK) >= 2 * 2e-3
    best = stages.choose(costs, SLOW_LINK, 1e12, LOCAL)
    assert best.spec.microbatches <= 8
    assert key(best) == key(exhaustive(costs, SLOW_LINK, 1e12, LOCAL))
    assert best.step_seconds < slower_with_more(costs, SLOW_LINK, best)


@pytest.mark.parametrize("cluster", [FREE, SLOW_MEMORY, SLOW_LINK, CPU8], ids=["free", "memory", "link", "cpu8"])
def test_choose_is_the_exhaustive_loop(graph, cluster):
    costs = costs_on(graph, cluster)
    fits = stages.choose(costs, cluster, 1e12, LOCAL)
    # a budget between the lightest layout and the fastest one's memory: the choice is memory-bound
    budget = (fits.predicted["memory_bytes_per_device"] + stages.least_memory(costs, LOCAL)) / 2
    for b in (1e12, budget):
        got, want = stages.choose(costs, cluster, b, LOCAL), exhaustive(costs, cluster, b, LOCAL)
        assert key(got) == key(want)
        assert got.step_seconds == want.step_seconds and got.predicted["remat"] == want.predicted["remat"]


def test_held_inputs_counts_the_device_orders():
    """The closed form of `held_inputs` against the op orders it summarises."""
    for kind, P, V in (("gpipe", 4, 1), ("1f1b", 3, 1), ("1f1b", 8, 1), ("interleaved", 4, 2), ("interleaved", 2, 3)):
        for M in range(P if kind == "interleaved" else 1, 3 * P + 1, P if kind == "interleaved" else 1):
            most = 0
            for p, order in enumerate(device_orders(kind, P, M, V)):
                ops = list(map(tuple, order))
                first = next((k for k, (op, _, _) in enumerate(ops) if op == B), len(ops))
                most = max(most, sum(c * P + p > 0 for _, c, _ in ops[:first]))
            assert stages.held_inputs(kind, P, M, V) == most, (kind, P, M, V)


def test_slot_counts_are_the_colourings():
    """`make_schedule` counts the buffers without colouring them (the planner's path); the executor's slot tables,
    coloured when first read, use exactly that many (`_slot_tables` checks) and every read finds its value's slot."""
    for kind, P, V in (("gpipe", 4, 1), ("1f1b", 4, 1), ("1f1b", 3, 1), ("interleaved", 4, 2), ("interleaved", 2, 3)):
        for M in (P, 2 * P, 3 * P):
            sched = make_schedule.__wrapped__(kind, P, M, V)
            assert sched.in_slot.max() == sched.act_slots - 1  # colours, checking the counts
            assert sched.cot_slot.max() == sched.cot_slots - 1
            S = P * V  # every stage input but the first stage's arrives once and is read by a forward and a backward
            assert (sched.recv_act >= 0).sum() == (S - 1) * M and (sched.in_slot >= 0).sum() == 2 * (S - 1) * M
            assert (sched.recv_cot >= 0).sum() == (S - 1) * M == (sched.cot_slot >= 0).sum()
            # with the stash a stage input is read by its forward only (the last stage's, whose slot then holds its
            # output, by its backward too), and each forward writes a residual slot that its backward reads
            kept = make_schedule.__wrapped__(kind, P, M, V, True)
            assert kept.in_slot.max() == kept.act_slots - 1 and kept.stash_slot.max() == kept.stash_slots - 1
            assert (kept.in_slot >= 0).sum() == S * M and (kept.stash_slot >= 0).sum() == 2 * S * M
            assert kept.act_slots <= sched.act_slots and stages.held_residuals(kind, P, M, V) <= kept.stash_slots
            # folding the last stage's forward into its backward (the executor before FWD_LAST) held no more slots
            folded = make_schedule.__wrapped__(kind, P, M, V, True, False)
            assert (folded.stash_slot >= 0).sum() == 2 * (S - 1) * M and folded.stash_slots <= kept.stash_slots
            if kind == "gpipe":  # every microbatch in flight on every device, the last one's too
                assert kept.stash_slots == folded.stash_slots == M


def test_pipeline_modes_map_to_plan_settings_and_back():
    """A plan says its pipeline mode with its remat and its spec's `stash`: the two maps are inverse."""
    for mode in PIPELINE_MODES:
        remat, stash = mode_settings(mode)
        assert pipeline_mode(remat, stash) == mode and stashes(mode) == (mode == "none")
    assert pipeline_mode("full", stash=False) == "full"  # remat full recomputes whatever the spec says
