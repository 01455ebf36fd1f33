"""The Plan format: JSON round trip, validation, and checks of a plan against a model and the devices."""

import json

import jax
import pytest

import models
from autoshard.api import rule_plan
from autoshard.emit import check_plan_against_model, check_supported, make_mesh
from planner.errors import PlanError
from planner.params import param_table
from planner.plan import AXES, Plan, PipelineSpec, parse_mesh


def full_plan() -> Plan:
    return Plan(
        mesh={"pipe": 2, "data": 2, "tensor": 2},
        params={"blocks/attn/wq": [None, "fsdp", "tensor", None], "embed": [["tensor", "fsdp"], None]},
        activations={"layer_input": [["data", "fsdp"], None, None]},
        pipeline=PipelineSpec(stages=[[0, 1], [1, 2]], microbatches=4, schedule="1f1b"),
        sequence={"method": "ring"}, experts={"placement": {"blocks/mlp": [1, 0, 3, 2]}}, remat="full",
        predicted={"step_seconds": 0.5, "memory_bytes_per_device": 123, "comm_bytes": {"tensor/all-reduce": 7.0}},
        alternatives=[{"mesh": {"data": 8}, "predicted": {"step_seconds": 0.7}}],
        provenance={"model": "gpt-tiny", "cluster": "cpu:8"})


def test_json_round_trip(tmp_path):
    plan = full_plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again == plan
    assert again.to_dict() == json.loads(path.read_text())
    assert list(json.loads(path.read_text()))[0] == "version"
    assert again.mesh == {"pipe": 2, "data": 2, "fsdp": 1, "expert": 1, "seq": 1, "tensor": 2}
    assert list(again.mesh) == list(AXES)


def test_mesh_strings():
    assert parse_mesh("data=2, fsdp=2,tensor=2") == {"data": 2, "fsdp": 2, "tensor": 2}
    for bad, words in [("model=2", "unknown mesh axis 'model'"), ("data=x", "axis=size"), ("data=2,data=2", "twice"),
                       ("", "empty mesh")]:
        with pytest.raises(PlanError, match=words):
            parse_mesh(bad)


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d.update(colour="red"), "unknown field"),
    (lambda d: d["params"].update(x=["model"]), "unknown mesh axis 'model'"),
    (lambda d: d["params"].update(x=["data", "data"]), "twice"),
    (lambda d: d.update(remat="sometimes"), "unknown remat"),
    (lambda d: d["pipeline"].update(schedule="zigzag"), "unknown pipeline schedule"),
    (lambda d: d["pipeline"].update(stages=[[0, 2]]), "needs 2"),
    (lambda d: d.update(mesh={"data": 0}), "positive integer"),
])
def test_invalid_plans_are_one_line_errors(edit, words):
    d = full_plan().to_dict()
    edit(d)
    with pytest.raises(PlanError, match=words) as e:
        Plan.from_json(json.dumps(d))
    assert "\n" not in str(e.value)


def test_unreadable_and_corrupt_plan_files(tmp_path):
    with pytest.raises(PlanError, match="cannot read plan file"):
        Plan.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{\"mesh\": {\"data\": 2},")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(PlanError, match="not a plan"):
        Plan.load(tmp_path / "list.json")


def test_plan_must_fit_model_and_devices():
    table = param_table(models.abstract("gpt-tiny"))
    plan = rule_plan(models.abstract("gpt-tiny"), "data=2,tensor=4")
    plan.params["blocks/attn/w_nope"] = [None]
    with pytest.raises(PlanError, match="'blocks/attn/w_nope' that the model lacks"):
        check_plan_against_model(plan, table)
    plan = Plan(mesh={"tensor": 8}, params={"blocks/attn/wq": [None, None, "tensor", None]})
    with pytest.raises(PlanError, match="cannot be split 8 ways"):
        check_plan_against_model(plan, table)
    with pytest.raises(PlanError, match="needs 6 devices but 8 are available"):
        make_mesh(Plan(mesh={"data": 3, "tensor": 2}))
    with pytest.raises(PlanError, match="tensor=8 does not divide the 4 heads"):
        rule_plan(models.abstract("gpt-tiny"), "tensor=8")


def test_unsupported_sections_are_rejected_not_ignored():
    with pytest.raises(PlanError, match="placement reorders a trained checkpoint"):
        check_supported(full_plan())
    with pytest.raises(PlanError, match="degree 4 but the mesh has expert=2"):
        check_supported(Plan(mesh={"expert": 2}, experts={"degree": 4}))
    with pytest.raises(PlanError, match="no sequence section"):
        Plan(mesh={"seq": 2}).validate()


def test_mesh_puts_tensor_on_neighbouring_devices():
    mesh = make_mesh(Plan(mesh={"data": 2, "fsdp": 2, "tensor": 2}))
    ids = [[d.id for d in row] for row in mesh.devices.reshape(-1, 2)]
    assert ids == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert mesh.axis_names == AXES
    assert len(jax.devices()) == 8
