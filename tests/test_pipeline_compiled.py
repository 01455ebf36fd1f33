"""Pipeline programs as XLA compiles them (8 devices): MoE layers in the stages against a single-device run, and
the compiled point-to-point transfers, work and memory of GPipe and 1F1B against the schedule table and the
planner's predictions (apart from tests/test_pipeline.py so that the two halves of the pipeline tests can run on two
workers)."""

import jax
import numpy as np
import pytest
from flax import nnx

import models
from autoshard.api import pipeline_spec, predict, rule_plan
from autoshard.analysis import analyze
from autoshard.train import make_optimizer, parallelize
from planner.params import path_str
from planner.schedule import make_schedule

MODEL = "gpt-tiny:layers=8"
LR = 1e-4  # as tests/test_pipeline.py


def _flat(state) -> dict[str, np.ndarray]:
    return {path_str(k): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def built():
    return models.create(MODEL)


@pytest.fixture(scope="module")
def built_moe():
    return models.create("moe-tiny")


@pytest.fixture(scope="module")
def moe_reference(token_batch, built_moe):
    """moe-tiny's 3 unpipelined steps (metrics and gradients) and the step's FLOPs, shared by both schedules'
    checks."""
    plan = rule_plan(models.abstract("moe-tiny"), "data=1")
    trainer = parallelize(built_moe, make_optimizer(lr=LR), plan, devices=jax.devices()[:1])
    runs = [trainer.step_with_grads(token_batch) for _ in range(3)]
    return runs, analyze(trainer.compile(token_batch, grads=True), trainer.mesh)["flops_per_device"]


# (1F1B is not run here: each MoE branch of its step is one of these two's. Its separate forward-only sweep, then
# forward ticks in the main table, is zb's; its backward from the stash with the probability sums' cotangent is
# GPipe's. 1F1B's table itself runs dense in tests/test_pipeline.py, with sequence parallelism too.)
@pytest.mark.parametrize("schedule", ["gpipe", "zb"])
def test_pipeline_with_moe_layers(schedule, token_batch, built_moe, moe_reference):
    """Expert parallelism inside the stages (expert manual in the executor), and the balancing loss of the whole
    batch (not a mean over microbatches), with the MoE metrics of the unpipelined step: under zb (its backward
    split into B and W, the cotangent of the probability sums included) from a forward-only statistics sweep
    before the table (as under 1F1B and interleaved), under GPipe from the forward phase itself, which keeps the
    residuals for the backward ticks (no sweep and no recompute: the unpipelined step's FLOPs over the 8 devices,
    where the sweep made it 1.34x). The planner's prediction of the plan's point-to-point sends and gradient sums
    (expert weights over data, the rest over data x expert) is the compiled program's, within 1%."""
    abstract = models.abstract("moe-tiny")
    plan = rule_plan(abstract, "pipe=2,data=2,expert=2",
                     pipeline=pipeline_spec(abstract, 2, schedule=schedule, microbatches=2))
    shapes = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in token_batch.items()}
    predicted = predict(plan, abstract, shapes, "cpu:8")
    trainer = parallelize(built_moe, make_optimizer(lr=LR), plan, devices=jax.devices()[:plan.num_devices])
    runs = [trainer.step_with_grads(token_batch) for _ in range(3)]
    reference, flops = moe_reference
    (ref, ref_grads), (got, grads) = reference[-1], runs[-1]
    np.testing.assert_allclose([m["loss"] for m, _ in runs], [m["loss"] for m, _ in reference], rtol=1e-5)
    np.testing.assert_allclose(got["moe_aux_loss"], ref["moe_aux_loss"], rtol=1e-5)
    assert got["dropped_tokens"] == ref["dropped_tokens"] and got["expert_load"] == ref["expert_load"]
    ref_grads, grads = _flat(ref_grads), _flat(grads)
    assert set(grads) == set(ref_grads)
    for path, g in grads.items():
        scale = np.max(np.abs(ref_grads[path])) + 1e-12
        assert np.max(np.abs(g - ref_grads[path])) <= 1e-5 * scale, path
    stats = analyze(trainer.compile(token_batch, grads=True), trainer.mesh)
    if schedule == "gpipe":  # no sweep: the compiled step does less than the sweep's 1.34x
        work = sum(stats["flops_by_device"]) / flops
        assert work <= 1.01, work
    assert ("statistics sweep" in predicted["time_breakdown"]) == (schedule == "zb")
    # (pipe/all-reduce: this program returns the gradients whole over pipe, which the train step does not)
    judged = [k for k, v in stats["comm_bytes"].items() if v > 1000 and k != "pipe/all-reduce" and (
        k.startswith("pipe") or k.endswith("all-reduce"))]
    assert {"pipe/collective-permute", "data/all-reduce", "data+expert/all-reduce"} <= set(judged), judged
    for k in judged:
        assert predicted["comm_bytes"].get(k, 0.0) == pytest.approx(stats["comm_bytes"][k], rel=0.01), k


MICRO = 8  # 1F1B holds 2 stage inputs per device where GPipe holds all 8


@pytest.fixture(scope="module")
def compiled(token_batch, built):
    """The compiled-program reports of MODEL on pipe=2 x data=2 x tensor=2, MICRO microbatches, under GPipe, 1F1B
    and zb (shared by the point-to-point, work and memory tests), and the planner's predictions of each plan
    (`predicted`: what the search predicts for such a plan, tests/test_planner_pipeline.py
    test_predict_reproduces_the_search_for_a_pipeline_plan)."""
    abstract = models.abstract(MODEL)
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in token_batch.items()}
    out, predicted = {}, {}
    for schedule in ("gpipe", "1f1b", "zb"):
        plan = rule_plan(abstract, "pipe=2,data=2,tensor=2",
                         pipeline=pipeline_spec(abstract, 2, schedule=schedule, microbatches=MICRO))
        trainer = parallelize(built, make_optimizer(), plan, devices=jax.devices()[:plan.num_devices])
        out[schedule] = analyze(trainer.compile(token_batch), trainer.mesh)
        predicted[schedule] = predict(plan, abstract, shapes, "cpu:8")
    out["predicted"] = predicted
    out["stash_bytes_per_slot"] = predicted["1f1b"]["pipeline"]["stash_bytes_per_slot"]
    return out


def _stage_input_bytes(batch) -> int:
    """One microbatch's activations between stages: [batch / data / MICRO, S, D] float32 (whole over tensor)."""
    return batch["inputs"].shape[0] // 2 // MICRO * batch["inputs"].shape[1] * models.abstract(MODEL).cfg.hidden * 4


@pytest.mark.parametrize("schedule", ["1f1b", "zb"])
def test_collective_permutes_match_the_table(compiled, token_batch, schedule):
    report = compiled[schedule]
    sched = make_schedule(schedule, 2, MICRO, stash=True)
    micro_bytes = _stage_input_bytes(token_batch)
    # a tick's ppermute runs only where some device sends (`Schedule.sends`), fewer than two every tick
    sends = int(sched.sends.sum())
    assert sends < 2 * sched.ticks and report["branches_exact"] is True
    assert report["comm_counts"]["pipe/collective-permute"] == sends
    assert report["comm_bytes"]["pipe/collective-permute"] == sends * micro_bytes
    # the gradient reduction over data is one all-reduce per step for the layer weights and one for the rest
    assert report["comm_counts"].get("data/all-reduce", 0) + report["comm_counts"].get("pipe+data/all-reduce", 0) <= 3


def test_pipeline_flops_are_the_single_device_flops(compiled, token_batch, built):
    # `analyze` counts each branch of the per-tick switch as often as the table takes it on each device: the work
    # one device does (the forward ticks keep their residuals, so a backward tick does not recompute the forward;
    # it did, at 1.16x), not every branch every tick (about 8x); pipe=2 x data=2 x tensor=2 splits the work 8 ways
    # (the unpipelined step as tests/test_pipeline.py's reference runs it, its gradients returned too: the same
    # FLOPs, and one program compiled once a session)
    single = parallelize(built, make_optimizer(lr=LR), rule_plan(models.abstract(MODEL), "data=1"),
                         devices=jax.devices()[:1])
    one = analyze(single.compile(token_batch, grads=True), single.mesh)["flops_per_device"]
    for report in (compiled["gpipe"], compiled["1f1b"], compiled["zb"]):  # zb: B and W split with nothing twice
        assert len(report["flops_by_device"]) == 8 and report["branches_exact"] is True
        assert 0.99 <= sum(report["flops_by_device"]) / one <= 1.01


def test_1f1b_uses_less_memory_than_gpipe(compiled, token_batch):
    """GPipe holds every microbatch's stage input and residuals, 1F1B those in flight: the difference is those
    slots. A residual slot as the planner prices it (`planner.stages.stash_bytes`: what the vjp closure keeps,
    `Problem.saved` less `unkept_bytes`, counted by linearizing the traced loss; with tensor=2 here, the values
    dropped taken off as split over tensor)."""
    memory = {schedule: compiled[schedule]["memory_bytes_per_device"] for schedule in ("gpipe", "1f1b")}
    gpipe, one_f = (make_schedule(kind, 2, MICRO, stash=True) for kind in ("gpipe", "1f1b"))
    slots, kept = gpipe.act_slots - one_f.act_slots, gpipe.stash_slots - one_f.stash_slots
    saved = memory["gpipe"] - memory["1f1b"]
    assert slots > 0 and kept > 0
    priced = slots * _stage_input_bytes(token_batch) + kept * compiled["stash_bytes_per_slot"]
    assert saved <= priced <= 1.01 * saved  # measured +0.01%


# The planner's predictions of these programs (moved from tests/test_planner_pipeline.py, where a planned pipe=2 x
# data=4 pipeline was compiled for them: the same two schedules, data parallel alone; these add tensor and zb)
def test_predicted_point_to_point_bytes_equal_the_compiled(compiled):
    for kind in ("gpipe", "1f1b", "zb"):
        predicted, stats = compiled["predicted"][kind]["comm_bytes"], compiled[kind]["comm_bytes"]
        key = "pipe/collective-permute"
        assert predicted[key] == stats[key], kind
        # the once-per-step gradient all-reduces too (layer weights over data, the rest over pipe x data)
        for k in ("data/all-reduce", "pipe+data/all-reduce"):
            assert predicted[k] == pytest.approx(stats[k], rel=0.01), (kind, k)


def test_gpipe_minus_1f1b_memory_matches_the_compiled_difference(compiled):
    gp, op = compiled["predicted"]["gpipe"], compiled["predicted"]["1f1b"]
    predicted = gp["memory_bytes_per_device"] - op["memory_bytes_per_device"]
    difference = compiled["gpipe"]["memory_bytes_per_device"] - compiled["1f1b"]["memory_bytes_per_device"]
    assert difference > 0
    # the residual slots hold what the vjp closure keeps (`planner.stages.stash_bytes`): measured +0.01%
    assert difference <= predicted <= 1.01 * difference
