"""The planner's side of the zero-bubble schedule "zb" (`planner.stages`): its F / B / W ticks, its grad slots, its
lower bounds, and where the search offers it (planning only, 8 emulated CPU devices, nothing compiled)."""

import dataclasses
import itertools

import jax
import numpy as np
import pytest

import models
from autoshard import api, cli, explain, figures
from planner import stages
from planner.cluster import load_cluster
from planner.errors import AutoshardError, PlanError
from planner.plan import SCHEDULES, PipelineSpec
from planner.schedule import make_schedule, step_time
from planner.search import _pipeline_costs, trace_model
from checks import assert_one_line_error

CPU8 = load_cluster("cpu:8")
DEEP = "gpt-tiny:layers=8"
MESH = {"pipe": 4, "data": 2}


def shapes(batch: int, seq: int) -> dict:
    return {k: jax.ShapeDtypeStruct((batch, seq), np.int32) for k in ("inputs", "targets")}


@pytest.fixture(scope="module")
def zb_pair():
    """(zb plan, the same plan under 1F1B re-predicted): gpt-tiny with 8 layers on pipe=4 x data=2, 8 microbatches."""
    model = models.abstract(DEEP)
    zb = api.plan(model, shapes(16, 64), cluster=CPU8, mesh=MESH, schedule="zb", microbatches=8)
    one = dataclasses.replace(zb, pipeline=dataclasses.replace(zb.pipeline, schedule="1f1b"))
    one.predicted = api.predict(one, model, shapes(16, 64), cluster=CPU8)
    return zb, one


@pytest.fixture(scope="module")
def costs():
    graph = trace_model(models.abstract(DEEP), shapes(16, 64))
    return _pipeline_costs(graph, CPU8, {"pipe": 4, "data": 2, "fsdp": 1, "expert": 1, "seq": 1, "tensor": 1}, None,
                           "float32")


@pytest.mark.parametrize("P,M", [(2, 2), (4, 8), (3, 5), (8, 16), (4, 1)])
def test_vectorised_step_time_is_the_schedule_step_time_with_w_ops(P, M):
    sched = make_schedule("zb", P, M, stash=True)
    rng = np.random.default_rng(P * 100 + M)
    for _ in range(3):
        fwd, bwd, wgt = rng.random(P), rng.random(P), rng.random(P)
        fwd[-1] = 0.0
        got = stages.lockstep_seconds(sched, fwd, bwd, 0.1, wgt=wgt)
        assert got == pytest.approx(step_time(sched, fwd, bwd, 0.1, wgt=wgt), rel=1e-12)
        # the W ops are priced: costlier W, longer step (here every tick with a W op is also W's own)
        assert stages.lockstep_seconds(sched, fwd, bwd, 0.1, wgt=wgt + 10.0) > got
    with pytest.raises(ValueError, match="wgt"):
        stages.lockstep_seconds(sched, fwd, bwd, 0.1)


def test_zb_is_faster_than_1f1b_and_holds_its_grad_slots(zb_pair):
    zb, one = zb_pair
    assert zb.pipeline.schedule == "zb" and zb.pipeline.stash and zb.remat == "none"
    zp, op = zb.predicted["pipeline"], one.predicted["pipeline"]
    print(f"\nzb {zb.predicted['step_seconds'] * 1e3:.3f} ms {zb.predicted['memory_bytes_per_device'] / 2**20:.3f} MiB, "
          f"1f1b {one.predicted['step_seconds'] * 1e3:.3f} ms {one.predicted['memory_bytes_per_device'] / 2**20:.3f} "
          f"MiB")
    assert zb.predicted["step_seconds"] < one.predicted["step_seconds"]
    assert zp["ticks"] == 3 * 8 + 2 * 3 and op["ticks"] == 2 * 8 + 2 * 3
    # the same work: the bubble is what shrinks
    assert zb.predicted["time_breakdown"]["compute"] == pytest.approx(one.predicted["time_breakdown"]["compute"])
    assert zb.predicted["time_breakdown"]["pipeline bubble"] < one.predicted["time_breakdown"]["pipeline bubble"]
    # memory: 1F1B's residual and carry slots, plus the grad slot; one slot = what B saves for W, counted from the
    # traced graph: per token of a layer the outputs of q, k, v (4 x 16 each), the output projection (64), the MLP's
    # up (256) and down (64) matmuls and the two norm scales (64 each) = 704 floats; 64 tokens a microbatch
    # (16 / data 2 / 8 microbatches x 64), 2 layers a stage
    assert zp["grad_slots"] == 1 and op["grad_slots"] == 0
    assert zp["grad_bytes_per_slot"] == 2 * 64 * 704 * 4
    for k in ("stash_slots", "act_slots", "cot_slots", "stash_bytes_per_slot"):
        assert zp[k] == op[k], k
    grown = zb.predicted["memory_bytes_per_device"] - one.predicted["memory_bytes_per_device"]
    assert grown >= 0 and grown == pytest.approx(zp["grad_slots"] * zp["grad_bytes_per_slot"])
    assert zb.predicted["memory_breakdown"]["activations"] >= 0  # the stash is in the buffers, counted once


def test_b_and_w_split_the_fused_backward(zb_pair):
    zb, one = zb_pair
    assert zb.pipeline.stages == one.pipeline.stages
    zp, op = zb.predicted["pipeline"], one.predicted["pipeline"]
    f, b, w = (np.asarray(zp[k]) for k in ("stage_forward_seconds", "stage_backward_seconds", "stage_weight_seconds"))
    fused = np.asarray(op["stage_backward_seconds"])
    np.testing.assert_allclose(f, op["stage_forward_seconds"])
    assert (w > 0).all() and (w < fused).all() and (b > 0).all()
    np.testing.assert_allclose(b + w, fused, rtol=1e-12)  # every stage: the head's / embedding's W stay in B
    # a weight gradient costs its op's forward, and the weight ops are part of the forward
    assert (w[1:-1] <= f[1:-1]).all()
    assert "stage_weight_seconds" not in op


@pytest.mark.parametrize("kind", ["zb", "zb-h1"])
def test_zb_floors_are_lower_bounds(costs, kind):
    """`layout_floor` (its chains count F + B only for zb; zb-h1's last device's Ws may run beside the earlier
    stages' Bs) and `layout_memory_floor` (its grad slot) under every stage split of every microbatch count."""
    P, L = 4, 8
    for M in stages.microbatch_options(8):
        floor = stages.layout_floor(costs, CPU8, kind, 1, M, "none")
        mem_floor = stages.layout_memory_floor(costs, kind, 1, M, "none")
        best = np.inf
        for cut in itertools.combinations(range(1, L), P - 1):
            ends = [*cut, L]
            spec = PipelineSpec([[s, e] for s, e in zip([0, *cut], ends)], M, kind, 1, stash=True)
            choice = stages.evaluate(costs, spec, CPU8, "none")
            assert floor <= choice.step_seconds * (1 + 1e-12), (M, cut)
            assert mem_floor <= max(choice.memory) * (1 + 1e-12), (M, cut)
            best = min(best, choice.step_seconds)
        assert floor >= 0.5 * best  # and not vacuous
    assert stages.layout_floor(costs, CPU8, kind, 1, 8, "none") < stages.layout_floor(costs, CPU8, "1f1b", 1, 8, "none")


def test_zb_is_a_layout_in_mode_none_only(costs):
    layouts = {m: stages._layouts(costs, 8, None, None, None, m) for m in ("none", "recompute", "full")}
    assert ("zb", 1, 8) in layouts["none"] and ("zb-h1", 1, 8) in layouts["none"]
    assert not any(k == "zb" for m in ("recompute", "full") for k, _, _ in layouts[m])
    assert ("zb", 1, 8) in stages._layouts(dataclasses.replace(costs, sweep=True), 8, None, None, None, "none")
    # a fixed zb that does not fit in mode "none" falls back to nothing, not to a zb that recomputes
    fixed = dict(schedule="zb", microbatches=8)
    fits = stages.choose(costs, CPU8, 1e12, 8, **fixed)
    assert fits.spec.schedule == "zb" and fits.spec.stash and fits.predicted["remat"] == "none"
    assert stages.choose(costs, CPU8, 0.99 * max(fits.memory), 8, **fixed) is None
    # the free choice with zb's memory as the budget is at least as fast as zb (zb is among its layouts)
    free = stages.choose(costs, CPU8, max(fits.memory), 8)
    assert free.step_seconds <= fits.step_seconds * (1 + 1e-9) and max(free.memory) <= max(fits.memory)


def test_zb_refused_without_the_stash(zb_pair):
    model = models.abstract(DEEP)
    with pytest.raises(AutoshardError) as err:
        api.plan(model, shapes(16, 64), cluster=CPU8, mesh=MESH, schedule="zb", microbatches=8, remat="full")
    assert "zb" in str(err.value) and "remat" in str(err.value) and "\n" not in str(err.value)
    zb = zb_pair[0]
    for bad in (dataclasses.replace(zb, pipeline=dataclasses.replace(zb.pipeline, stash=False)),
                dataclasses.replace(zb, remat="full")):
        with pytest.raises(PlanError) as err:
            api.predict(bad, model, shapes(16, 64), cluster=CPU8)
        assert "zb schedule needs the stash" in str(err.value) and "\n" not in str(err.value)


def test_cli_zb_plan_explain_and_refusal(capsys, tmp_path):
    base = ["plan", "--model", DEEP, "--cluster", "cpu:8", "--batch", "16", "--seq", "64", "--mesh", "pipe=4,data=2",
            "--schedule", "zb", "--microbatches", "8"]
    assert cli.main(base + ["--remat", "full"]) == 2
    assert_one_line_error(capsys.readouterr()[1], "the zb schedule needs remat none")
    path = tmp_path / "plan.json"
    assert cli.main(base + ["-o", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert "zb, 8 microbatches" in out and "1 grad slot of" in out
    assert cli.main(["explain", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert "device 0: F0" in out and "W7" in out


def test_figure_times_the_w_ops(zb_pair):
    zb = zb_pair[0]
    st = figures.schedule_times(zb)
    assert st.predicted and (st.phase == 3).sum() == 4 * 8 and (st.busy[st.phase == 3] > 0).all()
    assert st.end + st.once_per_step == pytest.approx(zb.predicted["step_seconds"])
    assert explain.plan_schedule(zb).grad_slots == 1


def test_free_search_may_pick_zb(zb_pair):
    """No schedule given: a valid plan in any case; with the budget of the zb plan's memory on its mesh, the search
    has zb to choose (printed: which it picks)."""
    model = models.abstract(DEEP)
    budget = zb_pair[0].predicted["memory_bytes_per_device"] * 1.001
    plan = api.plan(model, shapes(16, 64), cluster=CPU8, mesh=MESH, memory_budget=budget)
    plan.validate()
    pl = plan.pipeline
    print(f"\nfree search, pipe=4 x data=2, budget {budget / 2**20:.2f} MiB: {pl.schedule}, M={pl.microbatches}, "
          f"V={pl.virtual}, stash {pl.stash}, {plan.predicted['step_seconds'] * 1e3:.3f} ms")
    assert pl.schedule in SCHEDULES and plan.predicted["memory_bytes_per_device"] <= budget
    assert plan.predicted["step_seconds"] <= zb_pair[0].predicted["step_seconds"] * (1 + 1e-6)
