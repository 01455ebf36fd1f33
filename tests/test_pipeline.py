"""Pipeline parallelism: schedule tables, and the shard_map executor against a single-device run (8 devices)."""

import jax
import numpy as np
import pytest
from flax import nnx

import models
from autoshard.api import pipeline_spec, rule_plan
from autoshard.pipeline import StageLayout, even_stages
from autoshard.train import make_optimizer, parallelize
from planner.errors import PlanError
from planner.params import path_str
from planner.plan import PipelineSpec, Plan
from planner.schedule import FWD, IDLE, check, make_schedule, mode_settings

MODEL = "gpt-tiny:layers=8"
LR = 1e-4  # small steps keep AdamW's sign-like first updates from amplifying reduction-order noise (test_parallel)


# -- schedule tables --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, P, M, V", [("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("1f1b", 2, 3, 1),
                                           ("interleaved", 4, 8, 2), ("interleaved", 2, 4, 3)])
def test_schedule_respects_dependencies(kind, P, M, V):
    s = make_schedule(kind, P, M, V)
    when = {}
    for t in range(s.ticks):
        for p in range(P):
            if s.phase[t, p]:
                when[("FB"[s.phase[t, p] - 1], int(s.chunk[t, p]) * P + p, int(s.microbatch[t, p]))] = t
    S = P * V
    assert len(when) == 2 * S * M  # every stage runs every microbatch forward and backward once
    for (op, st, i), t in when.items():
        if op == "F" and st > 0:
            assert when[("F", st - 1, i)] < t
        if op == "B":
            assert when[("F", st, i)] < t
            if st < S - 1:
                assert when[("B", st + 1, i)] < t
    assert s.bubble == pytest.approx(1 - 2 * M * V / s.ticks)


def test_schedule_costs():
    gpipe, one_f = make_schedule("gpipe", 4, 8), make_schedule("1f1b", 4, 8)
    assert gpipe.ticks == one_f.ticks == 2 * (8 + 4 - 1)       # unit-time ops: same bubble, 1F1B saves memory
    assert gpipe.act_slots == 8 and one_f.act_slots == 4         # GPipe holds every microbatch, 1F1B the in-flight
    inter = make_schedule("interleaved", 4, 8, 2)
    assert inter.bubble < one_f.bubble                           # virtual stages shorten the bubble
    assert one_f.code[3, 3] == IDLE and one_f.phase[3, 3] == 1   # the last stage's forward is folded into its backward
    assert one_f.code[0, 0] != FWD                               # the first stage embeds (FWD_FIRST)
    assert len(one_f.timeline()) == 4
    # GPipe runs every forward before the first backward (a whole-batch statistic is ready in time), 1F1B does not
    assert gpipe.forwards_first and not one_f.forwards_first and not inter.forwards_first
    assert gpipe.forward_ticks == 8 + 4 - 1 and (gpipe.phase[gpipe.forward_ticks:] != 1).all()


@pytest.mark.parametrize("args, match", [
    (("zigzag", 2, 4, 1), "unknown pipeline schedule"),
    (("1f1b", 2, 4, 2), "need --schedule interleaved"),
    (("interleaved", 4, 6, 2), "divisible by pipe"),
    (("1f1b", 4, 4, 1, 3), "only 3 layers"),
    (("interleaved", 2, 4, 2, 6), None),
    (("interleaved", 2, 4, 2, 5), "must divide the 5 layers"),
])
def test_schedule_bad_input(args, match):
    if match is None:
        check(*args)
        return
    with pytest.raises(PlanError, match=match):
        check(*args)


def test_stage_layout_round_trip():
    layout = StageLayout.from_stages([[0, 3], [3, 4], [4, 5], [5, 8]], devices=2, virtual=2)
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    staged = np.asarray(layout.to_staged(x))
    assert staged.shape == (2, 2, 3, 3)
    assert np.all(staged[1, 0, 1:] == 0)                            # stage 1 (device 1, chunk 0) has one layer
    np.testing.assert_array_equal(np.asarray(layout.from_staged(staged)), x)
    assert even_stages(10, 4) == [[0, 3], [3, 6], [6, 8], [8, 10]]
    with pytest.raises(PlanError, match="only 3 layers"):
        even_stages(3, 4)


# -- the executor against one device -------------------------------------------------------------------------------
def _flat(state) -> dict[str, np.ndarray]:
    return {path_str(k): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def built():
    """MODEL built once, eagerly (seed 0), for the trainers of this file: `parallelize` lays a built model's weights
    out by the plan, so no trainer compiles an initialiser of its own (on XLA:CPU seconds each, about what its train
    step takes to compile). FACTORY_CASE initialises under jit instead, as `autoshard train` does."""
    return models.create(MODEL)


@pytest.fixture(scope="module")
def built_moe():
    return models.create("moe-tiny")


FACTORY_CASE = "pipe=2,data=2,tensor=2"  # weights born sharded under jit: the same weights as the built model's


def _run(plan: Plan, batch, model, devices=None) -> tuple[list[float], dict[str, np.ndarray], object]:
    """Losses of 3 steps and the gradients of the third (one compiled program)."""
    trainer = parallelize(model, make_optimizer(lr=LR), plan, devices=devices or jax.devices()[:plan.num_devices])
    losses = []
    for _ in range(3):
        metrics, grads = trainer.step_with_grads(batch)
        losses.append(metrics["loss"])
    return losses, _flat(grads), trainer


@pytest.fixture(scope="module")
def reference(token_batch, built):
    abstract = models.abstract(MODEL)
    losses, grads, _ = _run(rule_plan(abstract, "data=1"), token_batch, built, jax.devices()[:1])
    return losses, grads


CASES = [  # (mesh, schedule, microbatches, virtual, layers per stage or None for even, pipeline mode)
    # (1F1B with the stash on pipe=2, 4 microbatches, even stages: SEQ_CASES' ring case, the same table and stash, with
    # data and seq besides; no batch axis to sum over: the pipe=4,tensor=2 case; interleaved once, with uneven
    # stages: its pipe=4 tables are tests/test_microbatches.py's and this file's schedule tests; on the oldest jax
    # (smoke) zb alone: its split backward is the most of jax a pipeline uses)
    ("pipe=2,data=2,tensor=2", "gpipe", 4, 1, [5, 3], "none"),
    ("pipe=2,fsdp=2,tensor=2", "interleaved", 4, 2, [1, 3, 2, 2], "none"),
    ("pipe=4,data=2", "1f1b", 4, 1, [3, 2, 2, 1], "recompute"),  # no stash, no remat: backwards recompute
    ("pipe=4,fsdp=2", "gpipe", 2, 1, None, "full"),  # no stash: the backward ticks recompute the forward
    pytest.param("pipe=4,tensor=2", "zb", 4, 1, None, "none", marks=pytest.mark.smoke),  # B and W apart
    ("pipe=4,data=2", "zb-h1", 8, 1, None, "none"),  # Ws deferred: several grad slots a device
]


@pytest.mark.parametrize("mesh, schedule, micro, virtual, stage_layers, mode", CASES)
def test_pipeline_matches_single_device(mesh, schedule, micro, virtual, stage_layers, mode, reference, token_batch,
                                        built):
    abstract = models.abstract(MODEL)
    pipe = int(mesh.split("pipe=")[1].split(",")[0])
    remat, stash = mode_settings(mode)
    spec = pipeline_spec(abstract, pipe, schedule=schedule, microbatches=micro, virtual=virtual,
                         stage_layers=stage_layers, stash=stash)
    model = models.factory(MODEL) if mesh == FACTORY_CASE else built
    losses, grads, _ = _run(rule_plan(abstract, mesh, pipeline=spec, remat=remat), token_batch, model)
    ref_losses, ref_grads = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert set(grads) == set(ref_grads)
    for path, g in grads.items():
        scale = np.max(np.abs(ref_grads[path])) + 1e-12
        assert np.max(np.abs(g - ref_grads[path])) <= 1e-5 * scale, path


SEQ_CASES = [  # (mesh, sequence method, schedule): the executor makes seq manual; ring/ulysses run per device
    ("pipe=2,seq=2,data=2", "ring", "1f1b"),
    ("pipe=2,seq=2,tensor=2", "ulysses", "gpipe"),
]


@pytest.mark.parametrize("mesh, method, schedule", SEQ_CASES)
def test_pipeline_with_sequence_parallelism(mesh, method, schedule, reference, token_batch, built):
    abstract = models.abstract(MODEL)
    spec = pipeline_spec(abstract, 2, schedule=schedule, microbatches=4)
    losses, grads, _ = _run(rule_plan(abstract, mesh, pipeline=spec, sequence={"method": method}), token_batch,
                            built)
    ref_losses, ref_grads = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for path, g in grads.items():
        scale = np.max(np.abs(ref_grads[path])) + 1e-12
        assert np.max(np.abs(g - ref_grads[path])) <= 1e-5 * scale, path


# -- bad input -----------------------------------------------------------------------------------------------------
def test_pipeline_bad_input(token_batch, built, built_moe):
    abstract = models.abstract(MODEL)
    with pytest.raises(PlanError, match="only 8 layers"):
        pipeline_spec(abstract, 4, schedule="interleaved", microbatches=4, virtual=4)
    with pytest.raises(PlanError, match="unknown pipeline schedule"):
        pipeline_spec(abstract, 2, schedule="zero-bubble")
    with pytest.raises(PlanError, match="divisible by pipe"):
        pipeline_spec(abstract, 2, schedule="interleaved", microbatches=3, virtual=2)
    with pytest.raises(Exception, match="summing to the model's 8 layers"):
        pipeline_spec(abstract, 2, stage_layers=[4, 5])
    with pytest.raises(PlanError, match="pipeline has 3 stages"):
        Plan(mesh={"pipe": 2}, pipeline=PipelineSpec(stages=[[0, 2], [2, 4], [4, 8]])).validate()
    plan = rule_plan(abstract, "pipe=2,data=4", pipeline=pipeline_spec(abstract, 2, microbatches=3))
    trainer = parallelize(built, make_optimizer(), plan)
    with pytest.raises(PlanError, match="3 microbatches do not divide the per-replica batch of 4"):
        trainer.step(token_batch)
    moe = models.abstract("moe-tiny")
    plan = rule_plan(moe, "pipe=2,seq=2,data=2", pipeline=pipeline_spec(moe, 2, microbatches=2))
    trainer = parallelize(built_moe, make_optimizer(), plan)
    with pytest.raises(PlanError, match="cannot run MoE layers"):  # routing groups are whole sequences
        trainer.step(token_batch)
