"""A small zoo of models written the way users write them (issue 11, items 7 and 8), shared by `tests/test_zoo.py`
and `runs/benchmarks/model_zoo.py`.

Four models, each a few thousand to a few tens of thousands of parameters (d_model 32), fast on CPU:

- `encoder`: NNX encoder classifier, `nnx.List` of blocks run in a Python loop, flax's `nnx.MultiHeadAttention`
  (non-causal), mean-pool and a linear head over `[B]` integer labels.
- `gqa`: NNX decoder with a tied embedding (`embed.attend`), grouped-query attention written with einsums (2 KV
  heads for 4 query heads) and alternating local (sliding-window) / global causal layers in a Python loop.
- `linen_lm`: Linen language model whose kernels carry `nn.with_logical_partitioning` names, Python-loop blocks
  (`Block(name=f"layers_{i}")`), trained through the function path (`loss_fn(variables, batch)`).
- `cnn`: NNX CNN with BatchNorm and dropout (`nnx.Rngs(params=0, dropout=1)`), images `[B, 16, 16, 3]`.

Each `ZooModel` knows how to plan, parallelize and train itself, and how to run the same steps in a plain
single-device optax loop written without autoshard (`reference`), so every plan can be checked against it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

import autoshard

VOCAB, D, F, HEADS, CLASSES = 64, 32, 64, 4, 10
BATCH, SEQ = 16, 16


# -- 1. NNX encoder classifier ---------------------------------------------------------------------------------
class EncoderBlock(nnx.Module):
    """LayerNorm -> nnx.MultiHeadAttention (non-causal) -> residual -> LayerNorm -> MLP -> residual."""

    def __init__(self, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, F, rngs=rngs)
        self.down = nnx.Linear(F, D, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x), deterministic=True)
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class EncoderClassifier(nnx.Module):
    """Token embedding -> 2 encoder blocks (a Python loop over `nnx.List`) -> mean over tokens -> linear head."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.blocks = nnx.List([EncoderBlock(rngs) for _ in range(2)])
        self.ln_f = nnx.LayerNorm(D, rngs=rngs)
        self.head = nnx.Linear(D, CLASSES, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x).mean(axis=1))

    def loss(self, batch):
        logits = self(batch["tokens"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return ce, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


def encoder_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {"tokens": rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int32),
            "label": rng.integers(0, CLASSES, size=(BATCH,)).astype(np.int32)}


# -- 2. NNX GQA decoder ----------------------------------------------------------------------------------------
KV_HEADS, HEAD_DIM, WINDOW, GQA_LAYERS = 2, 8, 4, 2


class GQABlock(nnx.Module):
    """RMSNorm -> grouped-query attention (einsums; causal, or causal within a sliding window) -> RMSNorm -> MLP."""

    def __init__(self, rngs: nnx.Rngs, local: bool):
        init = nnx.initializers.lecun_normal()
        self.local = local
        self.norm1 = nnx.RMSNorm(D, rngs=rngs)
        self.wq = nnx.Param(init(rngs.params(), (D, HEADS, HEAD_DIM)))
        self.wk = nnx.Param(init(rngs.params(), (D, KV_HEADS, HEAD_DIM)))
        self.wv = nnx.Param(init(rngs.params(), (D, KV_HEADS, HEAD_DIM)))
        self.wo = nnx.Param(init(rngs.params(), (HEADS, HEAD_DIM, D)))
        self.norm2 = nnx.RMSNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, F, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(F, D, use_bias=False, rngs=rngs)

    def attention(self, x: jax.Array) -> jax.Array:
        b, s, _ = x.shape
        groups = HEADS // KV_HEADS
        q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...]).reshape(b, s, KV_HEADS, groups, HEAD_DIM)
        k = jnp.einsum("bsd,dhk->bshk", x, self.wk[...])
        v = jnp.einsum("bsd,dhk->bshk", x, self.wv[...])
        scores = jnp.einsum("bsngk,btnk->bngst", q, k) / np.sqrt(HEAD_DIM)
        i, j = np.arange(s)[:, None], np.arange(s)[None, :]
        mask = (j <= i) & (i - j < WINDOW) if self.local else (j <= i)
        probs = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
        out = jnp.einsum("bngst,btnk->bsngk", probs, v).reshape(b, s, HEADS, HEAD_DIM)
        return jnp.einsum("bshk,hkd->bsd", out, self.wo[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.norm1(x))
        return x + self.down(nnx.silu(self.up(self.norm2(x))))


class GQADecoder(nnx.Module):
    """Tied embedding, GQA_LAYERS blocks alternating local / global attention in a Python loop, `embed.attend`."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.blocks = nnx.List([GQABlock(rngs, local=i % 2 == 0) for i in range(GQA_LAYERS)])
        self.norm = nnx.RMSNorm(D, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(self.norm(x))

    def loss(self, batch):
        logits = self(batch["inputs"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean(), {}


def token_batch(seed: int) -> dict[str, np.ndarray]:
    tokens = np.random.default_rng(seed).integers(0, VOCAB, size=(BATCH, SEQ + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


# -- 3. Linen LM with logical partitioning names, through the function path ---------------------------------------
logical = nn.with_logical_partitioning
LINEN_LAYERS = 2


class LinenBlock(nn.Module):
    """Pre-norm causal attention (DenseGeneral over named heads) and MLP, kernels named for the rules."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.lecun_normal()
        hd = D // HEADS
        h = nn.LayerNorm()(x)
        # no biases: a key bias has no gradient (softmax ignores it), and adam would turn its rounding noise
        # into full-size steps that differ between any two summation orders
        qkv = [nn.DenseGeneral((HEADS, hd), use_bias=False, kernel_init=logical(init, ("embed", "heads", "kv")),
                               name=n)(h) for n in ("query", "key", "value")]
        scores = jnp.einsum("bshk,bthk->bhst", qkv[0], qkv[1]) / np.sqrt(hd)
        causal = np.tril(np.ones((x.shape[1], x.shape[1]), bool))
        probs = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        out = jnp.einsum("bhst,bthk->bshk", probs, qkv[2])
        x = x + nn.DenseGeneral(D, axis=(-2, -1), kernel_init=logical(init, ("heads", "kv", "embed")),
                                name="out")(out)
        h = nn.LayerNorm()(x)
        h = nn.gelu(nn.Dense(F, kernel_init=logical(init, ("embed", "mlp")), name="up")(h))
        return x + nn.Dense(D, kernel_init=logical(init, ("mlp", "embed")), name="down")(h)


class LinenLM(nn.Module):
    """Embedding (vocab x embed) -> LINEN_LAYERS blocks in a Python loop -> LayerNorm -> vocabulary head."""

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(VOCAB, D, embedding_init=logical(nn.initializers.normal(1.0), ("vocab", "embed")))(tokens)
        for i in range(LINEN_LAYERS):
            x = LinenBlock(name=f"layers_{i}")(x)
        x = nn.LayerNorm()(x)
        return nn.Dense(VOCAB, kernel_init=logical(nn.initializers.lecun_normal(), ("embed", "vocab")),
                        name="head")(x)


LINEN_LM = LinenLM()


def linen_loss(variables, batch) -> jax.Array:
    """The user's loss: a plain function of the Linen variables (boxes and all) and the batch."""
    logits = LINEN_LM.apply(variables, batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


@functools.cache
def linen_variables() -> Any:
    """The variables as `init` returns them, boxes included (built once: the trainers copy, never donate, them)."""
    return LINEN_LM.init(jax.random.key(0), np.zeros((BATCH, SEQ), np.int32))


# -- 4. NNX CNN with BatchNorm and dropout ------------------------------------------------------------------------
class BatchNormCNN(nnx.Module):
    """conv 3x3 (8) -> BatchNorm -> relu -> 2x2 pool -> conv 3x3 (16) -> BatchNorm -> relu -> mean -> dropout ->
    linear: BatchNorm statistics and dropout RNG counters are state the step must carry."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.head = nnx.Linear(16, CLASSES, rngs=rngs)

    def loss(self, batch):
        x = nnx.relu(self.bn1(self.conv1(batch["image"])))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        x = nnx.relu(self.bn2(self.conv2(x))).mean(axis=(1, 2))
        logits = self.head(self.drop(x))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), {}


def image_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(13)
    return {"image": rng.normal(size=(BATCH, 16, 16, 3)).astype(np.float32),
            "label": rng.integers(0, CLASSES, size=(BATCH,)).astype(np.int32)}


# -- the zoo -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: how to build it, a batch for it, the optimizer it trains with, and both training
    loops (autoshard's and a plain single-device one) in a form the tests and the benchmark share."""

    name: str
    batch: Callable[[], dict[str, np.ndarray]]
    optimizer: Callable[[], optax.GradientTransformation]
    factory: Callable[[], nnx.Module] | None = None
    """NNX: a zero-argument constructor (planned on its abstract shapes); None on the function path."""
    loss_fn: Callable | None = None
    """Function path: `loss_fn(variables, batch)`."""
    variables: Callable[[], Any] | None = None
    """Function path: the variables as `model.init` returns them."""
    tight: float = 0.6
    """The tight plan's memory budget as a fraction of the free plan's predicted memory per device: 0.6 where
    some plan fits it, else a round fraction that does (`runs/benchmarks/model_zoo.md` gives the smallest plan
    each model has)."""

    def _kwargs(self) -> dict[str, Any]:
        return {} if self.factory is not None else {"params": self.variables()}

    def plan(self, batch: Any, **kwargs) -> autoshard.Plan:
        """`autoshard.plan` for this model (`kwargs`: mesh, cluster, memory_budget, ...)."""
        model = self.factory if self.factory is not None else self.loss_fn
        return autoshard.plan(model, batch, **self._kwargs(), **kwargs)

    def parallelize(self, plan: autoshard.Plan):
        """A trainer for `plan`. NNX models are handed over built (as a user holding a model does): initialising
        from the constructor under jit compiles one more program per trainer, seconds each on 2 CPU cores."""
        model = self.factory() if self.factory is not None else self.loss_fn
        return autoshard.parallelize(model, self.optimizer(), plan, **self._kwargs())

    def trained(self, trainer) -> dict[str, np.ndarray]:
        """The trainer's parameters (and BatchNorm statistics), flat by path, on the host."""
        if self.factory is not None:
            return _flat_nnx(nnx.state(trainer.model(), TRAINED))
        return _flat_tree(nn.unbox(trainer.variables())["params"])

    def reference(self, batch: dict[str, np.ndarray], steps: int) -> tuple[list[float], dict[str, np.ndarray]]:
        """Losses and final parameters of a plain single-device optax loop, written without autoshard."""
        with jax.default_device(jax.devices()[0]):
            return self._reference_nnx(batch, steps) if self.factory else self._reference_function(batch, steps)

    def _reference_nnx(self, batch, steps):
        graphdef, params, rest = nnx.split(self.factory(), nnx.Param, ...)  # rest: statistics, RNG counters
        opt = self.optimizer()
        state = opt.init(params)

        @jax.jit
        def step(params, state, rest, batch):
            def loss(p):
                model = nnx.merge(graphdef, p, rest, copy=True)
                return model.loss(batch)[0], nnx.split(model, nnx.Param, ...)[2]

            (loss, rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, rest, loss

        losses = []
        for _ in range(steps):
            params, state, rest, loss = step(params, state, rest, batch)
            losses.append(float(loss))
        return losses, _flat_nnx(nnx.state(nnx.merge(graphdef, params, rest), TRAINED))

    def _reference_function(self, batch, steps):
        variables = self.variables()
        params, opt = nn.unbox(variables["params"]), self.optimizer()
        state = opt.init(params)

        @jax.jit
        def step(params, state, batch):
            loss, grads = jax.value_and_grad(lambda p: self.loss_fn({**variables, "params": p}, batch))(params)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        losses = []
        for _ in range(steps):
            params, state, loss = step(params, state, batch)
            losses.append(float(loss))
        return losses, _flat_tree(params)


TRAINED = nnx.Any(nnx.Param, nnx.BatchStat)
"""What a step changes in an NNX model and the tests compare: parameters and running statistics."""


def _flat_nnx(state) -> dict[str, np.ndarray]:
    return {"/".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def _flat_tree(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


MODELS: dict[str, ZooModel] = {
    "encoder": ZooModel("encoder", encoder_batch, lambda: optax.sgd(0.1),
                        factory=lambda: EncoderClassifier(nnx.Rngs(0)), tight=0.8),
    "gqa": ZooModel("gqa", lambda: token_batch(17), lambda: optax.sgd(0.1), factory=lambda: GQADecoder(nnx.Rngs(0)),
                    tight=0.95),
    "linen_lm": ZooModel("linen_lm", lambda: token_batch(19), lambda: optax.adam(1e-2), loss_fn=linen_loss,
                         variables=linen_variables, tight=0.95),
    "cnn": ZooModel("cnn", image_batch, lambda: optax.sgd(0.1),
                    factory=lambda: BatchNormCNN(nnx.Rngs(params=0, dropout=1)), tight=0.95),
}

PLANS: dict[str, dict[str, Any]] = {
    "free": {},
    "tensor": {"mesh": {"tensor": 2}},
    "fsdp": {"mesh": "data=2,fsdp=4"},
    "tight": {},  # memory_budget: ZooModel.tight x the free plan's predicted memory (see `plan_kwargs`)
}


def plan_kwargs(model: ZooModel, name: str, free: autoshard.Plan | None = None,
                fraction: float | None = None) -> dict[str, Any]:
    """`autoshard.plan` arguments of plan `name` on 8 emulated CPU devices; the tight plan needs the free one."""
    kwargs = {"cluster": "cpu:8", **PLANS[name]}
    if name == "tight":
        kwargs["memory_budget"] = (fraction or model.tight) * free.predicted["memory_bytes_per_device"]
    return kwargs


def n_params(model: ZooModel) -> int:
    if model.factory is not None:
        return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(nnx.eval_shape(model.factory), nnx.Param)))
    return sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(nn.unbox(model.variables()["params"])))


class WideBlock(nnx.Module):
    """A wide MLP residual block (d -> 4d -> d): the repeated block of the shape-only models that the free search
    pipelines across nodes (tests/test_staging.py, tests/test_staging_scan.py)."""

    def __init__(self, d: int, rngs: nnx.Rngs):
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(x)))
