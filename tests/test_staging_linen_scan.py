"""Pipelines for Linen models whose blocks are an `nn.scan` stack (`staging.LinenStaged`, scanned): the stacked
weights are the pipeline's blocks as they are, the code before the scan its prologue and after it its epilogue. A
tiny LM trains under pipe=2 (GPipe, 1F1B) as a plain single-device optax loop does, its variables keep the user's
structure and boxes, a scan over x alone cuts as well, and what cannot be cut is refused in one line."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import autoshard
from autoshard import staging, state
from planner.errors import PlanError
from zoo import ZooModel

V, D, L, B, S = 32, 16, 2, 8, 8
STEPS = 3
logical = nn.with_logical_partitioning


_scan = functools.partial(nn.scan, variable_axes={"params": 0}, split_rngs={"params": True}, length=L,
                          metadata_params={nn.PARTITION_NAME: "layers"})
"""nn.scan as the models here use it (keywords may be overridden)."""


class Block(nn.Module):
    """Pre-norm MLP with a residual, kernels named for the rules; `(x, _) -> (x, None)` as nn.scan calls it."""

    @nn.compact
    def __call__(self, x, _=None):
        init = nn.initializers.lecun_normal()
        h = nn.gelu(nn.Dense(2 * D, kernel_init=logical(init, ("embed", "mlp")), name="up")(nn.LayerNorm()(x)))
        return x + nn.Dense(D, kernel_init=logical(init, ("mlp", "embed")), name="down")(h), None


class XBlock(Block):
    """The same block over x alone (`nn.scan(..., in_axes=())`, called as `blocks(x)`)."""

    def __call__(self, x):
        return super().__call__(x)


class DropBlock(nn.Module):
    """A block with dropout."""

    rate: float

    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dropout(self.rate, deterministic=False)(jnp.tanh(nn.Dense(D)(x))), None


class YBlock(nn.Module):
    """A block with a per-layer output besides its carry."""

    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(D)(x), x


class LM(nn.Module):
    """Embedding -> nn.scan of L blocks -> LayerNorm -> vocabulary head, with the scan written several ways:
    "pair" (x, None), "x" (over x alone), "dropout" (a key per layer), and the ones a pipeline refuses."""

    how: str = "pair"
    rate: float = 0.5

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(V, D, embedding_init=logical(nn.initializers.normal(1.0), ("vocab", "embed")))(tokens)
        scan = _scan
        if self.how == "pair":
            x, _ = scan(Block)(name="blocks")(x, None)
        elif self.how == "nested":  # the stack inside a submodule: decoder/blocks
            x = _Decoder(name="decoder")(x)
        elif self.how == "x":
            x, _ = scan(XBlock, in_axes=())(name="blocks")(x)
        elif self.how == "xs":  # a per-layer input
            x, _ = scan(Block, in_axes=0)(name="blocks")(x, jnp.ones((L, D)))
        elif self.how == "two carries":
            (x, _), _ = scan(_TwoCarries)(name="blocks")((x, x), None)
        elif self.how in ("dropout", "shared dropout"):
            split = {"params": True, "dropout": self.how == "dropout"}
            x, _ = scan(DropBlock, split_rngs=split)(self.rate, name="blocks")(x, None)
        elif self.how == "ys":
            x, _ = scan(YBlock)(name="blocks")(x, None)
        elif self.how == "function":  # the scan's body does work besides calling the block
            body = lambda block, x, _: (block(x)[0] * 0.5, None)  # noqa: E731
            x, _ = scan(body)(Block(name="blocks"), x, None)
        return nn.Dense(V, name="head")(nn.LayerNorm()(x))


class _Decoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _scan(Block)(name="blocks")(x, None)[0]


class _TwoCarries(nn.Module):
    @nn.compact
    def __call__(self, carry, _):
        x, y = carry
        x = x + nn.Dense(D)(y)
        return (x, y), None


def _loss(how: str):
    def loss_fn(variables, batch):
        logits = LM(how).apply(variables, batch["inputs"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    return loss_fn


def _dropout_loss(how: str, rate: float = 0.5):
    def loss_fn(variables, batch, rng):
        logits = LM(how, rate).apply(variables, batch["inputs"], rngs={"dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    return loss_fn


@functools.cache
def _variables(how: str = "pair"):
    return LM(how).init(jax.random.key(0), np.zeros((B, S), np.int32))


def _batch() -> dict[str, np.ndarray]:
    tokens = np.random.default_rng(3).integers(0, V, size=(B, S + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


MODEL = ZooModel("scan_lm", _batch, lambda: optax.adam(1e-2), loss_fn=_loss("pair"), variables=_variables)
CASES = {"gpipe": {"pipe": 2, "data": 4}, "1f1b": {"pipe": 2, "data": 2}}


@pytest.fixture(scope="module")
def trained():
    """{schedule: (trainer, losses)} after STEPS steps."""
    out = {}
    for schedule, mesh in CASES.items():
        plan = MODEL.plan(_batch(), cluster="cpu:8", mesh=mesh, schedule=schedule, microbatches=2)
        trainer = MODEL.parallelize(plan)
        out[schedule] = trainer, [float(trainer.step(_batch())["loss"]) for _ in range(STEPS)]
    return out


@pytest.mark.parametrize("schedule", list(CASES))
def test_an_nn_scan_stack_pipelines_as_one_device_trains(trained, schedule):
    trainer, losses = trained[schedule]
    assert trainer.plan.pipeline.schedule == schedule and trainer.plan.mesh["pipe"] == 2
    assert {p.split("/")[0] for p in trainer.plan.params} == {"outer", "blocks"}
    want_losses, want = MODEL.reference(_batch(), STEPS)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    got = MODEL.trained(trainer)
    assert sorted(got) == sorted(want)
    for path, value in want.items():
        np.testing.assert_allclose(got[path], value, rtol=1e-5, atol=1e-6, err_msg=path)


def test_variables_keep_the_users_structure_and_boxes(trained):
    got, want = trained["1f1b"][0].variables(), _variables()
    assert jax.tree.structure(got) == jax.tree.structure(want)  # boxes (and their names) included
    shape = lambda t: jax.tree.map(np.shape, nn.unbox(t))  # noqa: E731
    assert shape(got) == shape(want)
    assert got["params"]["blocks"]["up"]["kernel"].names == ("layers", "embed", "mlp")
    # checkpoints are keyed by the user's own paths too: the stack whole, as the user's init holds it
    keys = {jax.tree_util.keystr(p, simple=True, separator="/")
            for p, _ in jax.tree_util.tree_flatten_with_path(nn.unbox(want)["params"])[0]}
    assert set(state.model_layout(trained["1f1b"][0])["params"]) == keys


def test_dropout_keys_are_split_per_layer():
    """With split_rngs={"dropout": True} a dropout key is planned for (the cut checked with keys) and the staged
    loss draws masks (it is not rate 0's; how the pipeline derives each layer's key from the stacked stream is
    tests/test_staging_linen_rng.py's); a scan sharing one key across its layers is refused in one line."""
    key, batch = jax.random.key(7), _batch()
    variables = _variables("dropout")
    plan = autoshard.plan(_dropout_loss("dropout"), batch, params=variables, rng=key, cluster="cpu:8",
                          mesh={"pipe": 2, "data": 1}, schedule="gpipe", microbatches=2)
    assert plan.pipeline is not None
    loss = float(staging.LinenStaged(_dropout_loss("dropout"), variables, key).loss(batch)[0])
    assert np.isfinite(loss) and abs(loss - float(_dropout_loss("dropout", 0.0)(variables, batch, key))) > 1e-4
    with pytest.raises(PlanError, match="the scan over blocks gives its layers one dropout key") as info:
        autoshard.plan(_dropout_loss("shared dropout"), batch, params=_variables("shared dropout"), rng=key,
                       cluster="cpu:8", mesh={"pipe": 2}, schedule="gpipe", microbatches=2)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("how, path", [("pair", ("blocks",)), ("x", ("blocks",)),
                                       ("nested", ("decoder",))])
def test_the_cut_runs_the_users_loss(how, path):
    """prologue -> one block per layer -> epilogue is the loss, for both carry forms and a stack inside a submodule
    (checked on shapes by the planner's `check_cut`, here on values)."""
    variables, batch = _variables(how), _batch()
    staged = staging.LinenStaged(_loss(how), variables)
    staged.check_cut(variables, batch)
    assert staged.scanned and staged.list_path == path and staged.layers == L
    want = _loss(how)(variables, batch)
    np.testing.assert_allclose(float(staged.loss(batch)[0]), float(want), rtol=1e-6)
    assert jax.tree.map(np.shape, staged.user_params()) == jax.tree.map(np.shape, nn.unbox(variables)["params"])


@pytest.mark.parametrize("how, message", [
    ("xs", r"the scan over blocks takes array inputs besides its carry \(in_axes\)"),
    ("two carries", "the scan over blocks carries 2 arrays in a tuple: a pipeline passes one activation"),
    ("ys", r"the blocks of the scan over blocks return more than \(carry, None\)"),
    ("function", r"blocks is not run as nn.scan of its block class \(variable_axes=\{'params': 0\}, forwards\)"),
])
def test_what_cannot_be_cut_is_one_line(how, message):
    with pytest.raises(PlanError, match=message) as info:
        autoshard.plan(_loss(how), _batch(), params=_variables(how), cluster="cpu:8", mesh={"pipe": 2},
                       schedule="gpipe", microbatches=2)
    assert "\n" not in str(info.value)


class _WideBlock(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x, _=None):
        return x + nn.Dense(self.d)(nn.gelu(nn.Dense(4 * self.d)(x))), None


class _WideLM(nn.Module):
    d: int
    layers: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(V, self.d)(tokens)
        return nn.Dense(V)(_scan(_WideBlock, length=self.layers)(self.d, name="blocks")(x, None)[0])


def test_the_free_search_pipelines_an_nn_scan_stack_restaged():
    """With no pipe fixed, on two nodes, the search proposes the pipeline the trainer runs: the restaged model's
    (`outer` / `blocks` parameters), not the user's own program's scan, which would not run (on shapes only)."""
    wide = _WideLM(1024, 8)
    batch = {"inputs": np.zeros((64, 128), np.int32), "targets": np.zeros((64, 128), np.int32)}

    def loss_fn(variables, batch):
        logits = wide.apply(variables, batch["inputs"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    variables = jax.eval_shape(lambda: wide.init(jax.random.key(0), batch["inputs"]))
    plan = autoshard.plan(loss_fn, batch, params=variables, cluster="a100-80g:16")
    assert plan.mesh["pipe"] > 1 and plan.pipeline is not None
    assert {p.split("/")[0] for p in plan.params} == {"outer", "blocks"}
