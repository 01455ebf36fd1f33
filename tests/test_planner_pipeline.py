"""The planner's side of pipeline parallelism: when it pipelines, how it splits stages, and its predictions against
the compiled pipelined step (8 emulated CPU devices)."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import models
from autoshard import api, cli
from planner import stages
from planner.cluster import load_cluster
from planner.plan import PipelineSpec
from planner.schedule import make_schedule, step_time
from planner.search import NEAR_TIE, _pipeline_costs, trace_model
from checks import assert_one_line_error

CPU8 = load_cluster("cpu:8")
DEEP = "gpt-tiny:layers=8"


def shapes(batch: int, seq: int) -> dict:
    return {k: jax.ShapeDtypeStruct((batch, seq), np.int32) for k in ("inputs", "targets")}


def test_memory_forces_a_pipeline_and_everything_fitting_does_not():
    model = models.abstract(DEEP)
    roomy = api.plan(model, shapes(16, 64), cluster=CPU8, mesh={"tensor": 1, "fsdp": 1})
    assert roomy.mesh["pipe"] == 1 and roomy.pipeline is None
    why = roomy.provenance["pipeline_choice"]
    assert why["chosen"] == "no pipeline" and why["best_with_pipeline"]["step_seconds"] > roomy.predicted["step_seconds"]
    # the account is of realised plans: the chosen one is the fastest of each kind's best (up to a near tie)
    for kind in ("best_without_pipeline", "best_with_pipeline"):
        assert roomy.predicted["step_seconds"] <= why[kind]["step_seconds"] * (1 + NEAR_TIE)
    # with remat the layers' weights and Adam state dominate; 60% of that does not fit without splitting the stack
    lean = api.plan(model, shapes(16, 64), cluster=CPU8, mesh={"tensor": 1, "fsdp": 1}, remat="full")
    assert lean.mesh["pipe"] == 1
    budget = 0.6 * lean.predicted["memory_bytes_per_device"]
    tight = api.plan(model, shapes(16, 64), cluster=CPU8, mesh={"tensor": 1, "fsdp": 1}, memory_budget=budget,
                     remat="full")
    assert tight.mesh["pipe"] > 1 and tight.pipeline is not None
    assert tight.predicted["memory_bytes_per_device"] <= budget
    assert tight.predicted["memory_bytes_per_device"] == max(tight.predicted["memory_per_stage_device"])
    tight.validate()
    assert tight.provenance["pipeline_choice"]["best_without_pipeline"]["fits"] is False


def test_fixed_pipeline_choices_plan_a_pipeline():
    """A schedule (or microbatch count) fixed without pipe in the mesh restricts the search to pipelines: gpt-tiny's
    best plan on 8 CPU devices is otherwise data x seq (the seq meshes, pipe=1, once escaped the restriction)."""
    batch = shapes(16, 128)
    assert api.plan(models.abstract("gpt-tiny"), batch).pipeline is None
    for fixes in ({"schedule": "1f1b"}, {"microbatches": 4}):
        plan = api.plan(models.abstract("gpt-tiny"), batch, **fixes)
        assert plan.mesh["pipe"] > 1 and plan.pipeline is not None, (fixes, plan.mesh_string())


def test_stage_split_balances_a_heavy_head():
    model = models.abstract("gpt-tiny:layers=8,vocab=8192")
    graph = trace_model(model, shapes(16, 64))
    costs = _pipeline_costs(graph, CPU8, {"pipe": 2, "data": 4, "fsdp": 1, "expert": 1, "seq": 1, "tensor": 1},
                            None, "float32")
    assert costs.work["head"] > 2 * costs.work["layer"]  # the 8192-way head outweighs a layer
    # GPipe in lockstep: forward ticks cost the slowest forward, backward ticks the slowest backward (the last
    # stage's backward carries the head and loss)
    best = stages.choose(costs, CPU8, 1e12, local_batch=4, schedule="gpipe", microbatches=4, remats=("none",))
    counts = [e - s for s, e in best.spec.stages]
    assert counts[-1] < counts[0] and sum(counts) == 8
    even = stages.evaluate(costs, PipelineSpec([[0, 4], [4, 8]], 4, "gpipe"), CPU8)

    def spread(choice):  # the gap between the busiest and the idlest stage per microbatch
        p = choice.predicted["pipeline"]
        total = np.add(p["stage_forward_seconds"], p["stage_backward_seconds"])
        return float(total.max() - total.min())

    assert spread(best) < spread(even)
    assert best.step_seconds < 0.97 * even.step_seconds


def test_the_stash_gives_way_to_recomputing_when_it_does_not_fit():
    """Without remat a pipeline keeps each forward's residuals (fastest); where they do not fit, each backward
    recomputes its stage's forward (more work, less memory) before remat is tried."""
    graph = trace_model(models.abstract(DEEP), shapes(16, 64))
    costs = _pipeline_costs(graph, CPU8, {"pipe": 2, "data": 4, "fsdp": 1, "expert": 1, "seq": 1, "tensor": 1},
                            None, "float32")
    kw = dict(local_batch=4, schedule="1f1b", microbatches=4, remats=("none",))
    fast = stages.choose(costs, CPU8, 1e12, **kw)
    assert fast.spec.stash and fast.predicted["pipeline"]["stash"]
    redo = stages.evaluate(costs, dataclasses.replace(fast.spec, stash=False), CPU8, "recompute")
    assert redo.step_seconds > fast.step_seconds and max(redo.memory) < max(fast.memory)
    budget = (max(redo.memory) + max(fast.memory)) / 2
    tight = stages.choose(costs, CPU8, budget, **kw)
    assert not tight.spec.stash and tight.predicted["remat"] == "none" and max(tight.memory) <= budget


def test_vectorised_step_time_is_the_schedule_step_time():
    rng = np.random.default_rng(0)
    for kind, P, M, V in (("gpipe", 4, 8, 1), ("1f1b", 4, 6, 1), ("interleaved", 2, 4, 2)):
        sched = make_schedule(kind, P, M, V)
        fwd, bwd = rng.random(P * V), rng.random(P * V)
        assert stages.lockstep_seconds(sched, fwd, bwd, 0.1) == pytest.approx(step_time(sched, fwd, bwd, 0.1))


@pytest.fixture(scope="module")
def planned_pair():
    """One planned pipeline (pipe=2 x data=4, 4 microbatches) under GPipe and under 1F1B (the same plan with only the
    schedule changed, re-predicted): planned only. Predictions of such plans against the compiled programs:
    tests/test_pipeline_compiled.py (point-to-point and gradient bytes, the GPipe - 1F1B memory), as predicted by
    `api.predict`, which this file checks reproduces the search's own prediction."""
    model = models.abstract(DEEP)
    planned = api.plan(model, shapes(16, 64), cluster=CPU8, mesh={"pipe": 2, "data": 4}, schedule="gpipe",
                       microbatches=4)
    other = dataclasses.replace(planned, pipeline=dataclasses.replace(planned.pipeline, schedule="1f1b"))
    other.predicted = api.predict(other, model, shapes(16, 64), cluster=CPU8)
    return {"gpipe": planned, "1f1b": other}


def test_predict_reproduces_the_search_for_a_pipeline_plan(planned_pair):
    for kind, plan in planned_pair.items():  # gpipe: the search's own prediction
        again = api.predict(plan, models.abstract(DEEP), shapes(16, 64), cluster=CPU8)
        assert again["pipeline"]["stages"] == plan.pipeline.stages
        for key in ("pipe/collective-permute", "data/all-reduce", "pipe+data/all-reduce"):
            assert again["comm_bytes"][key] == plan.predicted["comm_bytes"][key], (kind, key)
        assert again["memory_bytes_per_device"] == pytest.approx(plan.predicted["memory_bytes_per_device"], rel=1e-6)


@pytest.mark.parametrize("schedule", ["gpipe", "zb"])
def test_moe_pipeline_plans_a_statistics_sweep_only_where_the_schedule_needs_it(schedule):
    """moe-tiny on pipe=2 x expert=2 (fixed; the search picks the rest): under GPipe no separate statistics sweep
    (the forward phase is the sweep), under zb the sweep before the table. The predictions of such plans against
    the compiled program: tests/test_pipeline_compiled.py's MoE pipelines."""
    plan = api.plan(models.abstract("moe-tiny"), shapes(16, 64), cluster=CPU8, mesh={"pipe": 2, "expert": 2},
                    schedule=schedule, microbatches=4)
    assert plan.pipeline is not None and plan.experts == {"degree": 2}
    assert ("statistics sweep" in plan.predicted["time_breakdown"]) == (schedule == "zb")


@pytest.mark.parametrize("args, words", [
    (["--microbatches", "5"], "--microbatches 5 does not divide --batch 16"),
    (["--virtual-stages", "2", "--schedule", "1f1b"], "needs --schedule interleaved"),
    (["--mesh", "pipe=16"], "exceeds the model's 2 layers"),
    (["--mesh", "pipe=1", "--schedule", "gpipe"], "fixes pipe=1"),
    (["--virtual-stages", "3"], "must divide the model's 2 layers"),
])
def test_plan_pipeline_user_errors(capsys, args, words):
    code = cli.main(["plan", "--model", "gpt-tiny", "--cluster", "cpu:16", "--batch", "16", "--seq", "64", *args])
    _, err = capsys.readouterr()
    assert code == 2
    assert_one_line_error(err, words)


def test_plan_explain_plot_and_verify_a_pipeline(capsys, tmp_path):
    path, png = tmp_path / "plan.json", tmp_path / "schedule.png"
    code = cli.main(["plan", "--model", "gpt-tiny:layers=4", "--cluster", "cpu:8", "--batch", "16", "--seq", "64",
                     "--mesh", "pipe=2,tensor=2", "--schedule", "1f1b", "--microbatches", "4", "-o", str(path)])
    out, _ = capsys.readouterr()
    assert code == 0 and "pipeline" in out and "1f1b, 4 microbatches" in out and "layers per stage" in out and "why" in out
    assert cli.main(["explain", str(path), "--plot", str(png)]) == 0
    out, _ = capsys.readouterr()
    assert "device 0: F0" in out and "device 1:" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"IHDR" in data[:16] and data.endswith(b"IEND\xaeB`\x82")
    code = cli.main(["verify", str(path), "--json", "--plot", str(tmp_path / "verify.png")])
    report = json.loads(capsys.readouterr().out)
    assert (tmp_path / "verify.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["comm"]["pipe/collective-permute"]["ok"] and report["comm"]["pipe/collective-permute"]["judged"]
    assert all(not r["judged"] for k, r in report["comm"].items() if k.startswith("tensor/"))
    assert report["comm"]["data/all-reduce"]["ok"]
