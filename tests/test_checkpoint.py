"""Checkpoints (save under one plan, restore under another; bad folders) and expert placement applied to a model."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import models
from autoshard import checkpoint
from autoshard.api import pipeline_spec, rule_plan
from autoshard.place import apply_placement
from autoshard.routing import expert_axes, routing_trace
from autoshard.train import make_optimizer, parallelize
from planner import placement as pl
from planner.errors import AutoshardError
from planner.params import path_str


def _flat(state) -> dict[str, np.ndarray]:
    return {path_str(k): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


def test_pipeline_checkpoint_restores_under_another_plan(tmp_path, token_batch):
    name = "gpt-tiny:layers=3"
    abstract = models.abstract(name)
    plan = rule_plan(abstract, "pipe=2,data=4", pipeline=pipeline_spec(abstract, 2, microbatches=2))
    trainer = parallelize(models.create(name), make_optimizer(lr=1e-3), plan)  # built: no initialiser to compile
    trainer.step(token_batch)
    trained = nnx.state(trainer.model(), nnx.Param)
    checkpoint.save(tmp_path / "ck", trained, model=name, step=1, plan=plan.to_dict())
    params, meta = checkpoint.restore(tmp_path / "ck", abstract)
    assert meta["step"] == 1 and meta["model"] == name
    want, got = _flat(trained), _flat(params)
    assert set(want) == set(got) and all(np.array_equal(want[k], got[k]) for k in want)
    # the restored weights train under a different plan
    model = nnx.merge(nnx.graphdef(abstract), params, nnx.split(abstract, nnx.Param, ...)[2])
    other = parallelize(model, make_optimizer(), rule_plan(abstract, "fsdp=8"))
    # a step reports the loss of the weights it starts from: the trained ones, under the pipeline (the program
    # already compiled); under fsdp=8 the loss alone (a forward, no gradients to compile)
    np.testing.assert_allclose(other.loss(token_batch), trainer.step(token_batch)["loss"], rtol=1e-5)


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    abstract = models.abstract("gpt-tiny")
    with pytest.raises(AutoshardError, match="not an autoshard checkpoint"):
        checkpoint.restore(tmp_path, abstract)
    other = models.create("gpt-tiny:hidden=32,heads=2")
    checkpoint.save(tmp_path / "small", nnx.state(other, nnx.Param), model="gpt-tiny:hidden=32,heads=2", step=0)
    with pytest.raises(AutoshardError, match="does not match this model.*--model gpt-tiny:hidden=32,heads=2"):
        checkpoint.restore(tmp_path / "small", abstract)
    (tmp_path / "small" / checkpoint.META).write_text("{not json")
    with pytest.raises(AutoshardError, match="damaged"):
        checkpoint.restore(tmp_path / "small", abstract)
    # a damaged array store (metadata intact)
    model = models.create("gpt-tiny")
    checkpoint.save(tmp_path / "ck", nnx.state(model, nnx.Param), model="gpt-tiny", step=0)
    for f in (tmp_path / "ck").rglob("*"):  # (the arrays of its step, under ck/<step>/params)
        if f.is_file() and "manifest" in f.name:
            f.write_bytes(b"garbage")
    with pytest.raises(AutoshardError, match="damaged"):
        checkpoint.restore(tmp_path / "ck", abstract)


def test_applied_placement_keeps_the_model_function(tmp_path, token_batch):
    name = "moe-tiny:capacity_factor=1.0"
    model = models.create(name)
    ids = routing_trace(model, [token_batch])
    cfg = model.cfg
    assert ids.shape == (cfg.layers, token_batch["inputs"].size, cfg.top_k)
    assert ids.min() >= 0 and ids.max() < cfg.experts
    assert expert_axes(model) == {"blocks/mlp/router": 2, "blocks/mlp/w_up": 1, "blocks/mlp/w_down": 1}

    routing = pl.Routing.from_trace(ids, cfg.experts)
    placement = pl.ilp(routing, 2, balance=None, time_limit=5).placement
    placement[0] = placement[0][::-1]  # make sure layer 0 really moves (any valid placement must keep the function)
    checkpoint.save(tmp_path / "ck", nnx.state(model, nnx.Param), model=name, step=0)
    params, meta = checkpoint.restore(tmp_path / "ck", models.abstract(name))
    apply_placement(str(tmp_path / "placed"), placement, 2, models.abstract(name), params, meta)
    placed, placed_meta = checkpoint.restore(tmp_path / "placed", models.abstract(name))
    assert placed_meta["plan"]["placement_applied"] == {"ep": 2}

    def loss_of(p):
        m = nnx.merge(nnx.graphdef(model), p, nnx.split(model, nnx.Param, ...)[2])
        loss, metrics = jax.jit(lambda b: m.loss(b))(token_batch)
        return float(loss), float(metrics["dropped_tokens"]), np.sort(np.asarray(metrics["expert_load"]), axis=-1)

    before, after = loss_of(params), loss_of(placed)
    assert before[0] == pytest.approx(after[0], rel=1e-6)
    assert before[1] == after[1]
    np.testing.assert_array_equal(before[2], after[2])   # the same loads, renumbered
    moved = _flat(placed)["blocks/mlp/w_up"]
    perms = pl.placement_permutations(placement, 2)
    np.testing.assert_array_equal(moved[0], _flat(params)["blocks/mlp/w_up"][0][perms[0]])
    assert json.loads((tmp_path / "placed" / checkpoint.META).read_text())["model"] == name


def test_plan_from_a_checkpoint_places_its_experts_and_train_applies_it(tmp_path, capsys):
    """`plan --checkpoint` records the checkpoint's routing and puts the ILP placement in the experts section;
    `train --plan P --restore DIR` reorders the restored experts by it: the first step's loss is the unplaced
    model's on the same batch, and the weights it saves are the placed order."""
    from autoshard import cli, data
    from autoshard.place import placed

    name = "moe-tiny"
    model = models.create(name)
    checkpoint.save(tmp_path / "ck", nnx.state(model, nnx.Param), model=name, step=0)
    plan_file = tmp_path / "p.json"
    assert cli.main(["plan", "--model", name, "--cluster", "cpu:8", "--batch", "16", "--seq", "32", "--mesh",
                     "expert=2", "--checkpoint", str(tmp_path / "ck"), "--routing-batches", "1",
                     "-o", str(plan_file)]) == 0
    section = json.loads(plan_file.read_text())["experts"]
    assert section["degree"] == 2 and len(section["placement"]) == model.cfg.layers
    assert section["ilp"]["cross_device_fraction"] <= section["round_robin"]["cross_device_fraction"]
    section["placement"][0] = section["placement"][0][::-1]  # make layer 0 move whatever the ILP chose
    plan_json = json.loads(plan_file.read_text())
    plan_json["experts"] = section
    plan_file.write_text(json.dumps(plan_json))

    assert cli.main(["train", "--plan", str(plan_file), "--restore", str(tmp_path / "ck"),  # its model: the plan's
                     "--steps", "1", "--batch", "16", "--seq", "32", "--lr", "1e-12", "--checkpoint",
                     str(tmp_path / "out"), "--out", str(tmp_path / "run")]) == 0
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    batch = data.TextData(data.load(None), 16, 32, seed=0).next()
    loss, _ = jax.jit(lambda b: model.loss(b))(batch)
    assert first["loss"] == pytest.approx(float(loss), rel=1e-5)
    saved, _ = checkpoint.restore(tmp_path / "out", models.abstract(name))
    want = placed(nnx.state(model, nnx.Param), section["placement"], 2, models.abstract(name))
    np.testing.assert_allclose(_flat(saved)["blocks/mlp/w_up"], _flat(want)["blocks/mlp/w_up"],
                               rtol=1e-6, atol=1e-9)  # one step at lr 1e-12

    capsys.readouterr()
    assert cli.main(["train", "--model", name, "--plan", str(plan_file), "--steps", "1", "--batch", "16",
                     "--seq", "32", "--out", str(tmp_path / "run2")]) == 2
    assert "--restore DIR" in capsys.readouterr().err


KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
import numpy as np
from orbax.checkpoint._src.handlers import json_checkpoint_handler
from orbax.checkpoint._src.path import atomicity
from autoshard import checkpoint

folder, point = Path(sys.argv[1]), sys.argv[2]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "writing":  # amid the step's files: the meta record is written beside the arrays
    real_json = json_checkpoint_handler.JsonCheckpointHandler._save_fn
    async def save_json(self, x, directory):
        if x.get("step") == 4:
            die()
        return await real_json(self, x, directory)
    json_checkpoint_handler.JsonCheckpointHandler._save_fn = save_json
elif point == "renaming":  # every file written, the rename into place not done
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self):
        if self._final_path.name == "4":
            die()
        return await real_finalize(self)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
else:  # "deleting": step 4 in place, the third file of step 2 (beyond keep=1) being deleted
    real_unlink, seen = os.unlink, []
    def unlink(*args, **kwargs):
        if (folder / "4").is_dir() and (folder / "2").is_dir():
            seen.append(1)
            if len(seen) == 3:
                die()
        return real_unlink(*args, **kwargs)
    os.unlink = unlink
ckpt = checkpoint.Checkpoints.create(folder, model="test", keep=1)
for step in (2, 4):
    ckpt.save(step, {"params": {"w": np.full((64, 64), step, np.float32), "b": np.arange(3 * step, dtype=np.float32)}}, {})
    ckpt.wait()
ckpt.close()
"""


@pytest.mark.parametrize("point, survivor", [("writing", 2), ("renaming", 2), ("deleting", 4)])
def test_a_save_killed_at_any_point_leaves_a_restorable_step(tmp_path, point, survivor):
    import subprocess
    import sys

    folder = tmp_path / "ck"
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(folder), point], capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    names = sorted(p.name for p in folder.iterdir())  # what the kill left: step 4 half-written, or step 2 half-deleted
    half_done = ("2" in names and "4" in names) if point == "deleting" else any(
        n.startswith("4" + checkpoint.TMP) for n in names)
    assert half_done, names
    ckpt = checkpoint.Checkpoints.open(folder)
    assert ckpt.latest() == survivor
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets = {"params": {"w": jax.ShapeDtypeStruct((64, 64), np.float32, sharding=cpu),
                          "b": jax.ShapeDtypeStruct((3 * survivor,), np.float32, sharding=cpu)}}
    got = ckpt.read(survivor, targets, items=["params"])["params"]
    np.testing.assert_array_equal(np.asarray(got["w"]), np.full((64, 64), survivor, np.float32))
    # the folder takes the next save, whatever the kill left of a step being written or deleted
    again = checkpoint.Checkpoints.create(folder, model="test", keep=1)
    again.save(6, {"params": {"w": np.full((64, 64), 6, np.float32), "b": np.arange(18, dtype=np.float32)}}, {})
    again.wait()
    again.close()
    assert checkpoint.Checkpoints.open(folder).steps() == [6]
