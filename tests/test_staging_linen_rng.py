"""Dropout in a restaged Linen pipeline (`staging.LinenStaged` with `rng=`): the key becomes two RNG streams (one
for the code around the blocks, one stacked per block) from which the pipeline derives each microbatch's and
layer's key as it does an NNX model's (`pipeline.stream_state`): the loss runs with fold_in(fold_in(fold_in(key0,
count), g), 0) for global microbatch g, block l with fold_in(fold_in(fold_in(fold_in(key1_l, count), g), l), 0),
where key0 = fold_in(rng, 0), key1 = split(fold_in(rng, 1), layers) and count is the steps done. The pipeline is
compared with a plain single-device loop over the microbatches giving each those keys; at rate 0 it equals one
device outright."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn, nnx

import autoshard
from planner.errors import PlanError

MICRO = 2
LAYERS = 4
KEY = jax.random.key(7)


class _Block(nn.Module):
    rate: float

    @nn.compact
    def __call__(self, x, train: bool = True):
        return x + nn.Dropout(self.rate, deterministic=not train)(jnp.tanh(nn.Dense(8)(x)))


class _Net(nn.Module):
    """Dropout before the blocks (the prologue), in each of four numbered blocks and after them (the epilogue)."""

    rate: float

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dropout(self.rate, deterministic=not train)(nn.Dense(8, name="inp")(x))
        for i in range(LAYERS):
            x = _Block(self.rate, name=f"layers_{i}")(x, train)
        x = nn.Dropout(self.rate, deterministic=not train)(x)
        return nn.Dense(1, name="head")(x)[..., 0]


def _loss(rate: float):
    def loss_fn(variables, batch, rng):
        out = _Net(rate).apply(variables, batch["x"], rngs={"dropout": rng})
        return jnp.mean((out - batch["y"]) ** 2)
    return loss_fn


def _batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(8, 8)).astype(np.float32), "y": rng.normal(size=(8,)).astype(np.float32)}


def _variables():
    return _Net(0.0).init(jax.random.key(0), _batch()["x"], train=False)


def _trainer(rate: float, schedule: str, stash: bool = True, key=KEY):
    loss_fn = _loss(rate)
    plan = autoshard.plan(loss_fn, _batch(), params=_variables(), rng=key, cluster="cpu:8",
                          mesh={"pipe": 2, "data": 1}, schedule=schedule, microbatches=MICRO)
    plan = dataclasses.replace(plan, pipeline=dataclasses.replace(plan.pipeline, stash=stash))
    return autoshard.parallelize(loss_fn, optax.sgd(0.01), plan, params=_variables(), rng=key)


def _reference(rate: float, params, batch, step: int, same: bool = False):
    """(loss, gradients by the user's paths) of a single-device loop over the microbatches, each with the keys the
    pipeline gives it (`same`: microbatch 0's for both): the mean of the microbatches' losses. The loss runs once
    per microbatch, its blocks swapped for the same blocks applied with their own keys."""
    size = len(batch["y"]) // MICRO
    key0, key1 = jax.random.fold_in(KEY, 0), jax.random.split(jax.random.fold_in(KEY, 1), LAYERS)

    def draw(key, *salt):
        key = jax.random.fold_in(key, step)
        for s in salt:
            key = jax.random.fold_in(key, s)
        return jax.random.fold_in(key, 0)

    def loss(p):
        total = 0.0
        for g in range(MICRO):
            h = 0 if same else g

            def blocks(next_fun, args, kwargs, context):
                name = context.module.name if context.method_name == "__call__" else None
                if not (isinstance(name, str) and name.startswith("layers_")):
                    return next_fun(*args, **kwargs)
                layer = int(name[len("layers_"):])
                return _Block(rate).apply({"params": p[name]}, *args, rngs={"dropout": draw(key1[layer], h, layer)},
                                          **kwargs)

            with nn.intercept_methods(blocks):
                total = total + _loss(rate)({"params": p}, jax.tree.map(lambda a: a[g * size:(g + 1) * size], batch),
                                            draw(key0, h))
        return total / MICRO

    value, grads = jax.value_and_grad(loss)(params)
    return float(value), grads


def _check_grads(grads, want) -> None:
    """The trainer's gradients (staged paths, blocks stacked) against the user's, block by block."""
    for path, v in nnx.to_flat_state(grads):
        got = np.asarray(v.get_value())
        if path[0] == "blocks":
            expect = np.stack([_at(want[f"layers_{i}"], path[1:]) for i in range(LAYERS)])
        else:
            expect = _at(want, path[1:])
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=2e-6 * np.abs(expect).max(),  # float32 sums' order
                                   err_msg="/".join(map(str, path)))


def _at(tree, path):
    for k in path:
        tree = tree[k]
    return np.asarray(tree)


def _user_params(trainer):
    return jax.tree.map(np.asarray, nn.unbox(trainer.variables())["params"])


def test_dropout_masks_are_per_microbatch_and_layer_backwards_reuse_them_and_steps_draw_anew():
    """1F1B recomputing its forwards (no stash: the backward must draw the forward's masks again): loss and
    gradients equal the single-device loop with the same per-microbatch and per-layer keys, not the one where microbatches share a
    key; the second step draws new masks (the streams one step on); a second trainer built alike gives the same
    losses; rate 0.5 differs from 0. (GPipe keeping the forward's residuals, the easier case, ran here too and
    passed; it runs for the NNX model in tests/test_staging_rng.py, through the same executor.)"""
    batch = _batch()
    trainer = _trainer(0.5, "1f1b", False)
    start = _user_params(trainer)
    metrics, grads = trainer.step_with_grads(batch)
    want_loss, want_grads = _reference(0.5, start, batch, 0)
    assert np.isfinite(metrics["loss"])
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
    _check_grads(grads, want_grads)
    assert abs(_reference(0.5, start, batch, 0, same=True)[0] - want_loss) > 1e-3  # a repeated mask would show
    moved = _user_params(trainer)
    metrics2, grads2 = trainer.step_with_grads(batch)
    want2, want_grads2 = _reference(0.5, moved, batch, 1)
    np.testing.assert_allclose(metrics2["loss"], want2, rtol=1e-5)
    _check_grads(grads2, want_grads2)
    twin = _trainer(0.5, "1f1b", False)
    assert [twin.step_with_grads(batch)[0]["loss"] for _ in range(2)] == [metrics["loss"], metrics2["loss"]]
    rate0 = float(_loss(0.0)(_variables(), batch, KEY))
    assert abs(metrics["loss"] - rate0) > 1e-3


def test_dropout_rate_0_equals_one_device():
    """(The key given as raw key data, which the loss is then given too.)"""
    batch = _batch()
    loss, grads = _trainer(0.0, "1f1b", key=jax.random.PRNGKey(7)).loss_and_grads(batch)
    want, want_grads = jax.value_and_grad(lambda p: _loss(0.0)({"params": p}, batch, KEY))(_variables()["params"])
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    _check_grads(grads, want_grads)


def test_a_loss_function_without_a_key_argument_is_refused_in_one_line():
    with pytest.raises(PlanError, match="takes no dropout key unless it takes a third argument") as info:
        autoshard.plan(lambda variables, batch: _loss(0.0)(variables, batch, KEY), _batch(), params=_variables(),
                       rng=KEY, cluster="cpu:8", mesh={"pipe": 2, "data": 1}, schedule="gpipe", microbatches=MICRO)
    assert "\n" not in str(info.value)
