"""A GPT-style decoder in Flax NNX, dense or mixture-of-experts.

Pre-norm (RMSNorm) blocks with rotary positions, grouped-query attention, a GELU or SwiGLU MLP (or a top-k routed
mixture of experts), tied or untied embeddings and a causal LM loss. The N blocks are stored stacked on a leading
`layers` axis and run with `jax.lax.scan`, so the planner solves one layer and pipeline stages are slices of that
axis. Every parameter carries logical axis names (`axes=` metadata) that sharding rules map to mesh axes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autoshard import ops
from models.config import ModelConfig
from planner.errors import AutoshardError

Array = jax.Array


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float) -> nnx.Param:
    # drawn flat and reshaped: the same numbers as drawing in `shape`, and XLA compiles one flat draw much faster
    return nnx.Param(std * jax.random.normal(rngs.params(), (math.prod(shape),), jnp.float32).reshape(shape), axes=axes)


def _ones(shape: tuple[int, ...], axes: tuple[str | None, ...]) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, jnp.float32), axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, lead: tuple[int, ...] = (), lead_axes: tuple[str, ...] = ()):
        self.eps = cfg.norm_eps
        self.scale = _ones(lead + (cfg.hidden,), lead_axes + ("embed",))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def rotary(x: Array, theta: float) -> Array:
    """Rotate pairs (i, i + D/2) of x: [B, S, H, D] by position-dependent angles."""
    s, d = x.shape[1], x.shape[-1]
    freqs = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
    angles = ops.positions(s).astype(jnp.float32)[:, None] * freqs[None, :]      # [S, D/2]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        L, d, h, hkv, hd, std = cfg.layers, cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.init_std
        self.theta = cfg.rope_theta
        self.wq = _param(rngs, (L, d, h, hd), ("layers", "embed", "heads", "head_dim"), std)
        self.wk = _param(rngs, (L, d, hkv, hd), ("layers", "embed", "kv_heads", "head_dim"), std)
        self.wv = _param(rngs, (L, d, hkv, hd), ("layers", "embed", "kv_heads", "head_dim"), std)
        self.wo = _param(rngs, (L, h, hd, d), ("layers", "heads", "head_dim", "embed"), std / (2 * L) ** 0.5)

    def __call__(self, x: Array) -> Array:
        dt = x.dtype
        q = rotary(jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(dt)), self.theta)
        k = rotary(jnp.einsum("bsd,dhk->bshk", x, self.wk[...].astype(dt)), self.theta)
        v = jnp.einsum("bsd,dhk->bshk", x, self.wv[...].astype(dt))
        o = ops.attention(q, k, v, causal=True)
        return jnp.einsum("bshk,hkd->bsd", o, self.wo[...].astype(dt))


def _activate(cfg: ModelConfig, up: Array, gate: Array | None) -> Array:
    if cfg.activation == "swiglu":
        return jax.nn.silu(gate) * up
    return jax.nn.gelu(up)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        L, d, f, std = cfg.layers, cfg.hidden, cfg.mlp, cfg.init_std
        self.cfg = cfg
        self.w_up = _param(rngs, (L, d, f), ("layers", "embed", "mlp"), std)
        if cfg.activation == "swiglu":
            self.w_gate = _param(rngs, (L, d, f), ("layers", "embed", "mlp"), std)
        self.w_down = _param(rngs, (L, f, d), ("layers", "mlp", "embed"), std / (2 * L) ** 0.5)

    def __call__(self, x: Array) -> Array:
        dt = x.dtype
        up = jnp.einsum("bsd,df->bsf", x, self.w_up[...].astype(dt))
        gate = jnp.einsum("bsd,df->bsf", x, self.w_gate[...].astype(dt)) if self.cfg.activation == "swiglu" else None
        return jnp.einsum("bsf,fd->bsd", _activate(self.cfg, up, gate), self.w_down[...].astype(dt))


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        L, d, f, e, std = cfg.layers, cfg.hidden, cfg.mlp, cfg.experts, cfg.init_std
        self.cfg = cfg
        self.router = _param(rngs, (L, d, e), ("layers", "embed", "router_experts"), std)
        self.w_up = _param(rngs, (L, e, d, f), ("layers", "experts", "embed", "mlp"), std)
        if cfg.activation == "swiglu":
            self.w_gate = _param(rngs, (L, e, d, f), ("layers", "experts", "embed", "mlp"), std)
        self.w_down = _param(rngs, (L, e, f, d), ("layers", "experts", "mlp", "embed"), std / (2 * L) ** 0.5)

    def __call__(self, x: Array) -> tuple[Array, ops.MoEStats]:
        cfg, dt = self.cfg, x.dtype
        weights = {"w_up": self.w_up[...], "w_down": self.w_down[...]}
        if cfg.activation == "swiglu":
            weights["w_gate"] = self.w_gate[...]

        def experts(w, h):  # h: [E, B, C, D]
            up = jnp.einsum("ebcd,edf->ebcf", h, w["w_up"].astype(dt))
            gate = jnp.einsum("ebcd,edf->ebcf", h, w["w_gate"].astype(dt)) if "w_gate" in w else None
            return jnp.einsum("ebcf,efd->ebcd", _activate(cfg, up, gate), w["w_down"].astype(dt))

        return ops.moe(x, self.router[...], weights, experts, top_k=cfg.top_k, capacity_factor=cfg.capacity_factor)


class Blocks(nnx.Module):
    """All N decoder blocks, parameters stacked on a leading `layers` axis; `__call__` runs one layer's slice."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        lead = ((cfg.layers,), ("layers",))
        self.attn_norm = RMSNorm(cfg, *lead)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg, *lead)
        self.mlp = MoE(cfg, rngs=rngs) if cfg.is_moe else MLP(cfg, rngs=rngs)

    def __call__(self, x: Array) -> tuple[Array, ops.MoEStats | None]:
        x = x + self.attn(self.attn_norm(x))
        h = self.mlp(self.mlp_norm(x))
        h, stats = h if isinstance(h, tuple) else (h, None)
        return x + h, stats


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab, cfg.hidden), ("vocab", "embed"), cfg.init_std)
        self.blocks = Blocks(cfg, rngs=rngs)
        self.final_norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            self.head = _param(rngs, (cfg.hidden, cfg.vocab), ("embed", "vocab"), cfg.init_std)

    # The model in three parts, so a pipeline can put them on different stages: `embed_inputs` (first stage),
    # `blocks` (one layer per call on a slice of the stacked parameters), `head_loss` (last stage).
    def embed_inputs(self, batch: dict[str, Array]) -> Array:
        """Token embeddings [B, S, D] of `batch["inputs"]` in the compute dtype."""
        return jnp.take(self.embed[...], batch["inputs"], axis=0).astype(jnp.dtype(self.cfg.dtype))

    def logits(self, x: Array) -> Array:
        x = self.final_norm(x)
        head = self.embed[...].T if self.cfg.tie_embeddings else self.head[...]
        return jnp.einsum("bsd,dv->bsv", x, head.astype(x.dtype)).astype(jnp.float32)

    def head_loss(self, x: Array, batch: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
        """Mean next-token cross-entropy of the last layer's output x against `batch["targets"]`."""
        logp = jax.nn.log_softmax(self.logits(x), axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        ce = jnp.mean(nll)
        return ce, {"ce": ce}

    def layer_stack(self, x: Array) -> tuple[Array, ops.MoEStats | None]:
        """All blocks over x: a `lax.scan` over the stacked layer parameters (rematerialised per the plan)."""
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x, layer_state):
            x = ops.boundary(x, "layer_input")
            return nnx.merge(graphdef, layer_state)(x)

        return jax.lax.scan(ops.remat(layer), ops.boundary(x, "layer_input"), stacked)

    def __call__(self, tokens: Array) -> tuple[Array, dict[str, Array]]:
        """tokens: [B, S] int -> logits [B, S, V] (float32) and auxiliary outputs (MoE statistics)."""
        x, stats = self.layer_stack(self.embed_inputs({"inputs": tokens}))
        return self.logits(x), ops.moe_metrics(stats)

    @property
    def aux_loss_weight(self) -> float:
        """Weight of the MoE balancing loss in the training loss (`autoshard.protocols.MoEModel`)."""
        return self.cfg.aux_loss_weight

    def check_batch(self, batch: dict[str, Any]) -> None:
        """A one-line error for token ids outside [0, vocab) in a host batch: the embedding lookup would read
        garbage rows (NaN loss, and weights that stay NaN) instead of failing."""
        for key in ("inputs", "targets"):
            ids = batch.get(key) if isinstance(batch, dict) else None
            if ids is None or isinstance(ids, jax.Array) or not np.size(ids):
                continue  # device arrays are the caller's own (checking them would wait for the device)
            ids = np.asarray(ids)
            if not np.issubdtype(ids.dtype, np.integer):
                raise AutoshardError(f"batch[{key!r}] holds {ids.dtype} values: token ids must be integers")
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.cfg.vocab:
                bad = high if high >= self.cfg.vocab else low
                raise AutoshardError(f"batch[{key!r}] holds token id {bad}, outside the model's vocabulary [0, "
                                     f"{self.cfg.vocab}): use a model with vocab > {max(high, 0)}, or fix the data")

    def loss(self, batch: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
        """Mean next-token cross-entropy (plus the weighted MoE balancing loss) and metrics."""
        x, stats = self.layer_stack(self.embed_inputs(batch))
        ce, metrics = self.head_loss(x, batch)
        aux = ops.moe_metrics(stats)
        metrics = {**metrics, **aux}
        loss = ce + self.aux_loss_weight * aux["moe_aux_loss"] if "moe_aux_loss" in aux else ce
        return loss, metrics
