"""What `autoshard plan` and `explain` say about a choice: why this remat (the same plan under the other one,
against the budget), runners-up over the budget marked as such, and one bubble figure for a pipeline, the one the
time breakdown shows."""

import re

import pytest

import models
from autoshard import api, explain
from planner.plan import Plan

CPU8 = "cpu:8"


@pytest.fixture(scope="module")
def plans(token_batch):
    model = models.abstract("gpt-tiny")
    free = api.plan(model, token_batch, cluster=CPU8)
    budget = 0.75 * free.predicted["memory_bytes_per_device"]
    return {"free": free, "tight": api.plan(model, token_batch, cluster=CPU8, memory_budget=budget),
            "pipe": api.plan(model, token_batch, cluster=CPU8, mesh={"pipe": 2})}


def test_the_budget_the_search_used_is_recorded(plans):
    assert plans["free"].provenance["memory_budget"] == pytest.approx(0.9 * 4 * 2**30)  # cpu:8's headroom
    tight = plans["tight"]
    assert tight.provenance["memory_budget"] == pytest.approx(0.75 * plans["free"].predicted["memory_bytes_per_device"])


def test_remat_says_why(plans):
    free, tight = plans["free"], plans["tight"]
    assert free.remat == "none" and tight.remat == "full"
    why = free.provenance["remat_choice"]
    assert why["other"] == "full" and why["fits"]
    assert why["memory_bytes_per_device"] < free.predicted["memory_bytes_per_device"]
    assert why["step_seconds"] > free.predicted["step_seconds"]
    assert explain.remat_line(free).startswith("none: the plan fits without it; full remat would hold ")
    why = tight.provenance["remat_choice"]
    assert why["other"] == "none" and not why["fits"]
    assert why["memory_bytes_per_device"] > tight.provenance["memory_budget"]
    line = explain.remat_line(tight)
    assert line == (f"full: without it this plan would hold {explain.format_bytes(why['memory_bytes_per_device'])} "
                    f"per device, over the budget")
    assert f"remat          {line}"[:60] in explain.summary(tight, width=200)
    assert f"remat: {line}" in explain.explain(tight, width=200)


def test_a_fixed_remat_says_so(token_batch):
    plan = api.plan(models.abstract("gpt-tiny"), token_batch, cluster=CPU8, mesh={"data": 8}, remat="full")
    assert explain.remat_line(plan) == "full, as fixed"


def test_runners_up_over_the_budget_are_marked():
    def predicted(seconds, memory):
        return {"step_seconds": seconds, "memory_bytes_per_device": memory, "comm_bytes": {"data/all-reduce": 1.0}}

    plan = Plan(mesh={"data": 8}, params={}, predicted=predicted(1.0, 900.0),
                provenance={"memory_budget": 1000.0},
                alternatives=[{"mesh": {"fsdp": 8}, "remat": "none", "predicted": predicted(0.9, 1200.0)},
                              {"mesh": {"data": 4, "fsdp": 2}, "remat": "none", "predicted": predicted(1.1, 1000.0)}])
    rows = explain.alternatives_table(plan, width=200)
    faster = next(r for r in rows if "fsdp=8" in r)
    fits = next(r for r in rows if "data=4,fsdp=2" in r)
    assert "-10.0%" in faster and f"{explain.format_bytes(1200)} over budget" in faster
    assert "over budget" not in fits and "over budget" not in next(r for r in rows if "chosen" in r)


def test_one_bubble_figure(plans):
    plan = plans["pipe"]
    pred = plan.predicted
    share = pred["time_breakdown"]["pipeline bubble"] / pred["step_seconds"]
    assert pred["pipeline"]["bubble"] == pytest.approx(share)
    text = explain.summary(plan, width=200)
    shown = [float(x) for x in re.findall(r"bubble (\d+(?:\.\d+)?)%", text)]
    assert len(shown) == 2 and all(abs(x - 100 * share) <= 0.5 for x in shown), text  # breakdown, pipeline line
