"""Pipelines for models whose blocks are a Python loop (`autoshard.staging`): the zoo's NNX encoder (an `nnx.List`
of blocks with `nnx.MultiHeadAttention`, [B] labels) and its Linen LM (a plain loss function over variables with
logical partitioning boxes) train under pipe=2 as on one device, their weights and checkpoints keep the model's own
structure, the free search pipelines such a model where it pays, and what cannot be cut into stages is refused in
one line."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn, nnx

import autoshard
from autoshard import staging, state
from planner.errors import PlanError
from zoo import MODELS, WideBlock

STEPS = 3
CASES = {"gpipe": {"pipe": 2, "data": 4}, "1f1b": {"pipe": 2, "data": 2, "tensor": 2}}
NAMES = ("encoder", "linen_lm")
"""The zoo's NNX encoder (an `nnx.List` of blocks) and its Linen LM (numbered `layers_i` submodules, logical
partitioning metadata, through the function path)."""


@pytest.fixture(scope="module")
def references():
    return {name: MODELS[name].reference(MODELS[name].batch(), STEPS) for name in NAMES}


PAIRS = [("encoder", "gpipe"), ("linen_lm", "1f1b")]
"""Each model under one schedule (GPipe with data, 1F1B with data and tensor); both ran both when this was
written, all equal to one device."""


@pytest.fixture(scope="module")
def trained():
    """One trainer per (model, schedule) pair, trained STEPS steps: {(model, schedule): (trainer, losses)}."""
    out = {}
    for name, schedule in PAIRS:
        model, batch = MODELS[name], MODELS[name].batch()
        plan = model.plan(batch, cluster="cpu:8", mesh=CASES[schedule], schedule=schedule, microbatches=2)
        trainer = model.parallelize(plan)
        out[name, schedule] = trainer, [float(trainer.step(batch)["loss"]) for _ in range(STEPS)]
    return out


@pytest.mark.parametrize("name, schedule", PAIRS)
def test_a_python_loop_of_blocks_pipelines_as_one_device_trains(references, trained, name, schedule):
    model = MODELS[name]
    ref_losses, ref_params = references[name]
    trainer, losses = trained[name, schedule]
    assert trainer.plan.pipeline.schedule == schedule and trainer.plan.mesh["pipe"] == 2
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    got = model.trained(trainer)  # the user's own structure: blocks/0/..., layers_1/...
    assert sorted(got) == sorted(ref_params)
    for path, want in ref_params.items():
        np.testing.assert_allclose(got[path], want, rtol=1e-5, atol=1e-6, err_msg=path)


def test_the_pipelined_plans_verify(trained):
    result = autoshard.verify(trained["linen_lm", "1f1b"][0], MODELS["linen_lm"].batch())
    assert result.ok, str(result)


def test_checkpoints_keep_the_models_own_paths_and_restore_under_another_plan(trained):
    model = MODELS["encoder"]
    batch = model.batch()
    trainer = trained["encoder", "gpipe"][0]
    tables = state.model_layout(trainer)
    user = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model.factory(), nnx.Param))}
    assert set(tables["params"]) == user
    assert set(state.targets(trainer)["params"]) == user
    # optimizer state by weight too (adam's moments end with the weight's path)
    adam = {f"0/mu/{k}": v for k, v in state.model_layout(trainer)["params"].items()}
    staged = staging.staged_tables(trainer.abstract, adam, state._weights(trainer))
    assert set(staged) == {f"0/mu/{k}" for k in state._weights(trainer)}
    assert set(staging.user_tables(trainer.abstract, staged, state._weights(trainer))) == set(adam)
    flat = lambda tree: {"/".join(map(str, p)): np.asarray(v.get_value())  # noqa: E731
                         for p, v in nnx.to_flat_state(nnx.state(tree, nnx.Param))}
    # the same tables into a trainer of another plan (no pipeline): the weights arrive where they belong
    other = model.parallelize(model.plan(batch, cluster="cpu:8", mesh={"data": 8}))
    host = {k: {p: np.asarray(v) for p, v in t.items()} for k, t in tables.items()}
    state.load(other, {**host, "opt_state": state.model_layout(other)["opt_state"]}, step=STEPS)
    want, got = flat(trainer.model()), flat(other.model())
    assert set(want) == set(got)
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)
    # and back into the pipelined trainer, blocks stacked again
    state.load(trainer, host, step=STEPS)
    for path, value in flat(trainer.model()).items():
        np.testing.assert_array_equal(value, want[path], err_msg=path)
    # a Linen loss function's tables are keyed as its unpipelined trainer keys them (layers_0/..., Embed_0/...)
    linen = trained["linen_lm", "1f1b"][0]
    keys = {jax.tree_util.keystr(p, simple=True, separator="/")
            for p, _ in jax.tree_util.tree_flatten_with_path(nn.unbox(MODELS["linen_lm"].variables())["params"])[0]}
    assert set(state.model_layout(linen)["params"]) == keys


class _Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x, scale=None):
        return jnp.tanh(self.w(x)) if scale is None else jnp.tanh(self.w(x)) * scale


class _Loop(nnx.Module):
    """Blocks in a Python loop, written three ways: plainly, with an array passed to every block, and with work
    between the blocks that a cut around them would lose."""

    def __init__(self, how: str, rngs: nnx.Rngs):
        self.how = how
        self.blocks = nnx.List([_Block(rngs) for _ in range(2)])

    def loss(self, batch):
        x = batch["x"]
        for block in self.blocks:
            x = block(x, batch["x"]) if self.how == "side input" else block(x)
            if self.how == "between":
                x = x * 0.5
        return jnp.mean(x ** 2), {}


@pytest.mark.parametrize("how, message", [
    ("side input", "the blocks take array inputs besides x"),
    ("between", "does more than call them in turn"),
    ("plain", "pipe=4 exceeds the model.s 2 layers: use pipe <= 2"),
])
def test_what_cannot_be_cut_into_stages_is_one_line(how, message):
    batch = {"x": np.ones((8, 8), np.float32)}
    pipe = 4 if how == "plain" else 2
    with pytest.raises(Exception, match=message) as info:
        autoshard.plan(lambda: _Loop(how, nnx.Rngs(0)), batch, cluster="cpu:8", mesh={"pipe": pipe},
                       schedule="gpipe")
    assert "\n" not in str(info.value)


def test_a_pipeline_of_a_models_own_blocks_runs_with_seq_1():
    """Its hand-written attention becomes ops.attention only outside a pipeline: inside one it would attend within
    each device's block of the sequence, so the plan is refused, and so is a trainer given such a plan."""
    model = MODELS["encoder"]
    with pytest.raises(PlanError, match="a pipeline of a model's own blocks runs with seq=1"):
        model.plan(model.batch(), cluster="cpu:8", mesh={"pipe": 2, "seq": 2, "data": 2}, schedule="gpipe")
    plan = model.plan(model.batch(), cluster="cpu:8", mesh={"pipe": 2, "data": 4}, schedule="gpipe")
    plan = dataclasses.replace(plan, mesh={**plan.mesh, "data": 2, "seq": 2}, sequence={"method": "ring"})
    with pytest.raises(PlanError, match="a pipeline of a model's own blocks runs with seq=1"):
        model.parallelize(plan)


def test_a_pipelined_loss_function_takes_no_dropout_key():
    model = MODELS["linen_lm"]
    with pytest.raises(PlanError, match="a pipelined loss function takes no dropout key"):
        autoshard.plan(model.loss_fn, model.batch(), params=model.variables(), rng=jax.random.key(0),
                       cluster="cpu:8", mesh={"pipe": 2})


def test_blocks_that_differ_are_refused():
    with pytest.raises(PlanError, match="the blocks of blocks are not identical"):
        autoshard.plan(MODELS["gqa"].factory, MODELS["gqa"].batch(), cluster="cpu:8", mesh={"pipe": 2},
                       schedule="gpipe")


class _Wide(nnx.Module):
    """A deep stack of wide MLP blocks in a Python loop (planned on shapes only: 8.6B parameters)."""

    def __init__(self, rngs: nnx.Rngs, d: int = 8192, layers: int = 32):
        self.inp = nnx.Linear(d, d, rngs=rngs)
        self.blocks = nnx.List([WideBlock(d, rngs) for _ in range(layers)])

    def loss(self, batch):
        x = self.inp(batch["x"])
        for block in self.blocks:
            x = block(x)
        return jnp.mean((x - batch["y"]) ** 2), {}


def test_the_free_search_pipelines_a_python_loop_when_it_pays():
    """Across 8 nodes the search also plans the restaged model and keeps its pipeline: faster than any plan of
    the unpipelined program (the plan names the restaged weights, which `parallelize` restages the same way)."""
    shape = jax.ShapeDtypeStruct((64, 2048, 8192), jnp.float32)
    plan = autoshard.plan(lambda: _Wide(nnx.Rngs(0)), {"x": shape, "y": shape}, cluster="a100-80g:64")
    assert plan.mesh["pipe"] > 1 and plan.pipeline is not None
    assert set(plan.params) == {"outer/inp/kernel", "outer/inp/bias", "blocks/up/kernel", "blocks/up/bias",
                                "blocks/down/kernel", "blocks/down/bias"}
    flat = autoshard.plan(lambda: _Wide(nnx.Rngs(0)), {"x": shape, "y": shape}, cluster="a100-80g:64",
                          mesh={"pipe": 1})
    assert plan.predicted["step_seconds"] < flat.predicted["step_seconds"]

