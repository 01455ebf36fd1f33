"""Pipelines for models whose blocks are a scanned stack (`autoshard.staging`, `nnx.vmap`-built blocks run by
`nnx.scan`, or `jax.lax.scan` over their split state): such a model trains under pipe=2 as on one device, its
weights and checkpoints keep the model's own (stacked) paths, and a scan that does more than `x = block(x)` is
refused in one line."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import autoshard
from autoshard import state
from planner.errors import PlanError
from zoo import WideBlock

STEPS = 3
DIM, LAYERS = 8, 4


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(DIM, rngs=rngs)
        self.mlp = nnx.Linear(DIM, DIM, rngs=rngs)

    def __call__(self, x):
        return x + jnp.tanh(self.mlp(self.norm(x)))


class Scanned(nnx.Module):
    """A user's scanned stack, written as flax's guides write it; `how`: the scan's form ("carry": `x -> x` with
    out_axes=nnx.Carry, "pair": `(x, block) -> (x, None)`, "lax": `jax.lax.scan` over the split state, "count":
    a second carry, which a pipeline cannot pass between stages; "scaled": a per-layer input besides the blocks)."""

    def __init__(self, how: str, rngs: nnx.Rngs):
        self.how = how
        # (inputs as wide as the stack is deep: the embedding's kernel [LAYERS, DIM] is not a layer weight though its
        # leading dimension is the layer count, `planner.stages.is_layer_param`)
        self.embed = nnx.Linear(LAYERS, DIM, rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(DIM, 2, rngs=rngs)
        if how == "scaled":
            self.scales = nnx.Param(jnp.ones((LAYERS,)))

    def loss(self, batch):
        x = self.embed(batch["x"])
        if self.how == "carry":
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def run(x, block):
                return block(x)
            x = run(x, self.blocks)
        elif self.how == "pair":
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
            def run(x, block):
                return block(x), None
            x, _ = run(x, self.blocks)
        elif self.how == "lax":
            graphdef, state = nnx.split(self.blocks)
            x, _ = jax.lax.scan(lambda x, s: (nnx.merge(graphdef, s)(x), None), x, state)
        elif self.how == "scaled":
            @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
            def run(x, block, scale):
                return block(x) * scale
            x = run(x, self.blocks, self.scales.get_value())
        else:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def run(carry, block):
                x, n = carry
                return block(x), n + jnp.sum(x)
            x, n = run((x, jnp.zeros(())), self.blocks)
            x = x + n
        logits = self.head(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), {}


def _batch():
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(16, LAYERS)).astype(np.float32), "y": rng.integers(0, 2, size=(16,)).astype(np.int32)}


def _flat(model: nnx.Module) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _reference(how: str, batch, steps: int):
    """Losses and final weights of a plain single-device optax loop."""
    graphdef, params = nnx.split(Scanned(how, nnx.Rngs(0)), nnx.Param)
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p).loss(batch)[0])(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    with jax.default_device(jax.devices()[0]):
        for _ in range(steps):
            params, state, loss = step(params, state)
            losses.append(float(loss))
    return losses, _flat(nnx.merge(graphdef, params))


CASES = [("carry", "gpipe", {"pipe": 2, "data": 4}), ("pair", "1f1b", {"pipe": 2, "data": 2}),
         ("lax", "1f1b", {"pipe": 2, "data": 2})]


@pytest.mark.parametrize("how, schedule, mesh", CASES)
def test_a_scanned_stack_pipelines_as_one_device_trains(how, schedule, mesh):
    batch = _batch()
    ref_losses, ref_params = _reference(how, batch, STEPS)
    plan = autoshard.plan(lambda: Scanned(how, nnx.Rngs(0)), batch, cluster="cpu:8", mesh=mesh, schedule=schedule,
                          microbatches=2)
    assert plan.mesh["pipe"] == 2 and plan.pipeline.schedule == schedule
    factory = lambda: Scanned(how, nnx.Rngs(0))  # noqa: E731
    # built, or (one case) a constructor, which the trainer restages under jit: weights born sharded
    trainer = autoshard.parallelize(factory if how == "pair" else factory(), optax.adam(1e-2), plan)
    losses = [float(trainer.step(batch)["loss"]) for _ in range(STEPS)]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    model = trainer.model()  # the user's own structure: one stacked blocks module
    assert isinstance(model, Scanned)
    got = _flat(model)
    assert sorted(got) == sorted(ref_params)
    for path, want in ref_params.items():
        np.testing.assert_allclose(got[path], want, rtol=1e-5, atol=1e-6, err_msg=path)
    if how == "carry":  # checkpoints keep the stacked paths and load back into the staged layout
        tables = state.model_layout(trainer)
        assert set(tables["params"]) == set(ref_params)
        state.load(trainer, {k: {p: np.asarray(v) for p, v in t.items()} for k, t in tables.items()}, step=STEPS)
        for path, value in _flat(trainer.model()).items():
            np.testing.assert_array_equal(value, got[path], err_msg=path)


@pytest.mark.parametrize("how, message", [
    ("count", "the scan over Scanned.blocks carries 2 values: a pipeline passes one activation between stages"),
    ("scaled", "the scan over Scanned.blocks does more than `x = block.x.`"),
])
def test_a_scan_a_pipeline_cannot_cut_is_one_line(how, message):
    with pytest.raises(PlanError, match=message) as info:
        autoshard.plan(lambda: Scanned(how, nnx.Rngs(0)), _batch(), cluster="cpu:8", mesh={"pipe": 2},
                       schedule="gpipe")
    assert "\n" not in str(info.value)


class _Wide(nnx.Module):
    """A deep scanned stack of wide MLP blocks (planned on shapes only: 8.6B parameters)."""

    def __init__(self, rngs: nnx.Rngs, d: int = 8192, layers: int = 32):
        self.inp = nnx.Linear(d, d, rngs=rngs)

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return WideBlock(d, rngs)

        self.blocks = make(rngs)

    def loss(self, batch):
        x = nnx.scan(lambda x, block: block(x), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(self.inp(batch["x"]),
                                                                                            self.blocks)
        return jnp.mean((x - batch["y"]) ** 2), {}


def test_the_free_search_pipelines_a_scanned_stack_only_restaged():
    """Across 8 nodes the search pipelines the model as restaged (the plan names the restaged weights, which
    `parallelize` restages the same way), never its own program, whose pipeline would not run."""
    shape = jax.ShapeDtypeStruct((64, 2048, 8192), jnp.float32)
    plan = autoshard.plan(lambda: _Wide(nnx.Rngs(0)), {"x": shape, "y": shape}, cluster="a100-80g:64")
    assert plan.mesh["pipe"] > 1 and plan.pipeline is not None
    assert set(plan.params) == {"outer/inp/kernel", "outer/inp/bias", "blocks/up/kernel", "blocks/up/bias",
                                "blocks/down/kernel", "blocks/down/bias"}
