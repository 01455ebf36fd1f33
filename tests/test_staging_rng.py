"""Dropout in a restaged pipeline (`autoshard.staging`, `pipeline.stream_state`): every microbatch and layer draws
its own mask from (the step's draw of its stream, the global microbatch, the layer), a backward uses its forward's
mask (kept residuals, or the forward recomputed), and the streams advance once per step. One device draws one mask
over the whole batch, so the pipeline is compared with a plain single-device loop over the microbatches that gives
each the same keys; at rate 0 it equals one device outright."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import autoshard
from planner.errors import PlanError

MICRO = 2


class _Block(nnx.Module):
    def __init__(self, rate: float, rngs: nnx.Rngs):
        self.w = nnx.Linear(8, 8, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)

    def __call__(self, x):
        return x + self.drop(jnp.tanh(self.w(x)))


class _Net(nnx.Module):
    """Dropout before the blocks (the first stage's prologue) and in each of four blocks in a Python loop."""

    def __init__(self, rate: float, rngs: nnx.Rngs, norm: bool = False):
        self.inp = nnx.Linear(8, 8, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.blocks = nnx.List([_Block(rate, rngs) for _ in range(4)])
        self.head = nnx.Linear(8, 1, rngs=rngs)
        if norm:
            self.norm = nnx.BatchNorm(8, rngs=rngs)

    def loss(self, batch):
        x = self.drop(self.inp(batch["x"]))
        for block in self.blocks:
            x = block(x)
        return jnp.mean((self.head(x)[..., 0] - batch["y"]) ** 2), {}


def _batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(8, 8)).astype(np.float32), "y": rng.normal(size=(8,)).astype(np.float32)}


def _trainer(rate: float, schedule: str, stash: bool = True, data: int = 1):
    plan = autoshard.plan(lambda: _Net(rate, nnx.Rngs(0)), _batch(), cluster="cpu:8", mesh={"pipe": 2, "data": data},
                          schedule=schedule, microbatches=MICRO)
    plan = dataclasses.replace(plan, pipeline=dataclasses.replace(plan.pipeline, stash=stash))
    return autoshard.parallelize(_Net(rate, nnx.Rngs(0)), optax.sgd(0.05), plan)


def _microbatch_streams(model: nnx.Module, g: int, same: bool = False) -> nnx.Module:
    """A copy of the user's model whose streams draw what the pipeline gives microbatch g: key fold_in(fold_in(key,
    count), g) (block l: then l), count 0 (`same`: microbatch 0's for every microbatch)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = dict(nnx.to_flat_state(rest))
    out = {}
    for path, v in flat.items():
        if isinstance(v, nnx.RngKey):
            key = jax.random.fold_in(jax.random.fold_in(v.get_value(), flat[path[:-1] + ("count",)].get_value()),
                                     0 if same else g)
            out[path] = v.replace(jax.random.fold_in(key, path[1]) if path[0] == "blocks" else key)
        elif isinstance(v, nnx.RngCount):
            out[path] = v.replace(jnp.zeros_like(v.get_value()))
    return nnx.merge(graphdef, params, nnx.from_flat_state(out))


def _reference(model: nnx.Module, batch, data: int = 1, same: bool = False) -> tuple[float, dict[str, np.ndarray]]:
    """(loss, gradients by the user's paths) of a plain single-device loop over the global microbatches (data
    shard d's microbatch i is global microbatch d * MICRO + i), each with the keys the pipeline gives it: the mean
    of the microbatches' losses."""
    n = MICRO * data
    size = len(batch["y"]) // n
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        total = 0.0
        for g in range(n):
            m = _microbatch_streams(nnx.merge(graphdef, p, rest), g, same)
            total = total + m.loss(jax.tree.map(lambda a: a[g * size:(g + 1) * size], batch))[0]
        return total / n

    value, grads = jax.value_and_grad(loss)(params)
    return float(value), {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


def _check_grads(grads, want: dict[str, np.ndarray]) -> None:
    """The trainer's gradients (the staged model's paths, blocks stacked) against the user's, block by block."""
    for path, v in nnx.to_flat_state(grads):
        name = "/".join(map(str, path))
        got = np.asarray(v.get_value())
        if name.startswith("blocks/"):
            expect = np.stack([want[f"blocks/{i}/{name[len('blocks/'):]}"] for i in range(len(got))])
        else:
            expect = want[name[len("outer/"):]]
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("schedule, stash, data", [("gpipe", True, 1), ("1f1b", False, 2)])
def test_dropout_masks_are_per_microbatch_and_layer_and_backwards_reuse_them(schedule, stash, data):
    """Loss and gradients equal the single-device loop with the same per-microbatch keys (kept residuals under
    GPipe, the forward recomputed under 1F1B without the stash, data shards' microbatches numbered apart), not the
    one where microbatches share a mask; the streams advance once per step, so the second step draws new masks,
    continuing the streams of the user's model that `trainer.model()` returns."""
    batch = _batch()
    trainer = _trainer(0.5, schedule, stash, data)
    user = _Net(0.5, nnx.Rngs(0))
    metrics, grads = trainer.step_with_grads(batch)  # one program for both steps: the step and its gradients
    want_loss, want_grads = _reference(user, batch, data)
    assert np.isfinite(metrics["loss"])
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
    _check_grads(grads, want_grads)
    assert abs(_reference(user, batch, data, same=True)[0] - want_loss) > 1e-3  # a repeated mask would show
    counts = [v.get_value() for _, v in nnx.to_flat_state(trainer.rest) if isinstance(v, nnx.RngCount)]
    assert counts and all(np.all(np.asarray(c) == 1) for c in counts)
    moved = trainer.model()  # the user's structure: trained weights, streams one step on
    metrics, grads = trainer.step_with_grads(batch)
    want2, want_grads2 = _reference(moved, batch, data)
    np.testing.assert_allclose(metrics["loss"], want2, rtol=1e-5)
    _check_grads(grads, want_grads2)


def test_dropout_rate_0_equals_one_device_and_rate_half_is_deterministic():
    batch = _batch()
    plain = _Net(0.0, nnx.Rngs(0))
    zero, _ = _trainer(0.0, "1f1b").loss_and_grads(batch)
    np.testing.assert_allclose(float(zero), float(plain.loss(batch)[0]), rtol=1e-5)
    a, b = _trainer(0.5, "gpipe"), _trainer(0.5, "gpipe")
    la, lb = [[t.step_with_grads(batch)[0]["loss"] for _ in range(2)] for t in (a, b)]
    assert la == lb and la[0] != la[1]
    assert abs(la[0] - float(zero)) > 1e-3


def test_batch_statistics_stay_refused_in_one_line():
    with pytest.raises(PlanError, match="holds state other than weights and RNG streams") as info:
        autoshard.plan(lambda: _Net(0.1, nnx.Rngs(0), norm=True), _batch(), cluster="cpu:8", mesh={"pipe": 2},
                       schedule="gpipe")
    assert "\n" not in str(info.value)
