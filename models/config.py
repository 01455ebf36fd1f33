"""Model configurations: one dataclass, named presets, and `name:field=value,...` overrides."""

from __future__ import annotations

import dataclasses
import math

from planner.errors import AutoshardError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A GPT-style decoder; `experts > 0` replaces every MLP by a routed mixture of experts."""

    name: str = "gpt"
    vocab: int = 256
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 0
    """Grouped-query attention: KV heads shared by groups of query heads (0: as many as `heads`)."""
    head_dim: int = 0
    """0: hidden // heads."""
    mlp: int = 0
    """MLP (or per-expert) inner width; 0: 4 * hidden."""
    activation: str = "gelu"
    """gelu or swiglu."""
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = "float32"
    """Compute dtype of activations; parameters are always float32."""
    experts: int = 0
    top_k: int = 2
    capacity_factor: float = 1.25
    aux_loss_weight: float = 0.01

    def __post_init__(self) -> None:
        fix = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        if not self.kv_heads:
            fix("kv_heads", self.heads)
        if not self.head_dim and self.heads:
            fix("head_dim", self.hidden // self.heads)
        if not self.mlp:
            fix("mlp", 4 * self.hidden)
        self.check()

    def check(self) -> None:
        """Every field's type and range: a nonsense config is a one-line error here, not NaN losses later."""
        positive = ("vocab", "hidden", "layers", "heads", "kv_heads", "head_dim", "mlp")
        for f in (*positive, "experts", "top_k"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int):
                raise AutoshardError(f"model {self.name}: {f} must be an integer, got {v!r}")
        for f in positive:
            if getattr(self, f) < 1:
                raise AutoshardError(f"model {self.name}: {f} must be positive, got {getattr(self, f)}")
        if self.experts < 0:
            raise AutoshardError(f"model {self.name}: experts must be 0 (dense) or positive, got {self.experts}")
        ranges = {"rope_theta": "a positive", "norm_eps": "a positive", "init_std": "a positive",
                  "capacity_factor": "a positive", "aux_loss_weight": "a non-negative"}
        for f, need in ranges.items():
            v = getattr(self, f)
            ok = (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
                  and (v >= 0 if need == "a non-negative" else v > 0))
            if not ok:
                raise AutoshardError(f"model {self.name}: {f} must be {need} finite number, got {v!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise AutoshardError(f"model {self.name}: tie_embeddings must be true or false, got "
                                 f"{self.tie_embeddings!r}")
        if self.heads % self.kv_heads:
            raise AutoshardError(f"model {self.name}: kv_heads={self.kv_heads} must divide heads={self.heads}")
        if self.head_dim % 2:
            raise AutoshardError(f"model {self.name}: head_dim={self.head_dim} must be even for rotary positions")
        if self.activation not in ("gelu", "swiglu"):
            raise AutoshardError(f"model {self.name}: activation must be gelu or swiglu, got {self.activation!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise AutoshardError(f"model {self.name}: dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.experts and not 1 <= self.top_k <= self.experts:
            raise AutoshardError(f"model {self.name}: top_k={self.top_k} must be between 1 and experts="
                                 f"{self.experts}")

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    def param_count(self) -> int:
        """Exact number of parameters (the same count the model creates)."""
        d, hd = self.hidden, self.head_dim
        attn = d * self.heads * hd * 2 + d * self.kv_heads * hd * 2
        mlp_one = d * self.mlp * (3 if self.activation == "swiglu" else 2)
        mlp = self.experts * mlp_one + d * self.experts if self.is_moe else mlp_one
        per_layer = attn + mlp + 2 * d
        embed = self.vocab * d * (1 if self.tie_embeddings else 2)
        return self.layers * per_layer + embed + d

    def flops_per_token(self, seq: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), matmuls and attention scores."""
        d, hd = self.hidden, self.head_dim
        attn_proj = 2 * d * hd * (2 * self.heads + 2 * self.kv_heads)
        attn_scores = 2 * 2 * seq * self.heads * hd
        mlp_one = 2 * d * self.mlp * (3 if self.activation == "swiglu" else 2)
        mlp = self.top_k * mlp_one + 2 * d * self.experts if self.is_moe else mlp_one
        head = 2 * d * self.vocab
        return 3.0 * (self.layers * (attn_proj + attn_scores + mlp) + head)


PRESETS: dict[str, dict] = {
    # bases for `gpt:field=value` and `moe:field=value`
    "gpt": dict(),
    "moe": dict(experts=4, top_k=2),
    # byte-level toy models for tests and the default job
    "gpt-tiny": dict(vocab=256, hidden=64, layers=2, heads=4, mlp=256),
    "moe-tiny": dict(vocab=256, hidden=64, layers=2, heads=4, mlp=128, experts=4, top_k=2),
    # GPT-3 family shapes (Brown et al. 2020), vocabulary padded to a multiple of 128
    "gpt-small": dict(vocab=50304, hidden=768, layers=12, heads=12, tie_embeddings=True, dtype="bfloat16"),
    "gpt-1.3b": dict(vocab=50304, hidden=2048, layers=24, heads=16, tie_embeddings=True, dtype="bfloat16"),
    "gpt-6.7b": dict(vocab=50304, hidden=4096, layers=32, heads=32, tie_embeddings=True, dtype="bfloat16"),
    "gpt-13b": dict(vocab=50304, hidden=5120, layers=40, heads=40, tie_embeddings=True, dtype="bfloat16"),
    "gpt-175b": dict(vocab=50304, hidden=12288, layers=96, heads=96, tie_embeddings=True, dtype="bfloat16"),
    # Mixtral-8x7B shapes
    "moe-8x7b": dict(vocab=32000, hidden=4096, layers=32, heads=32, kv_heads=8, mlp=14336, activation="swiglu",
                     experts=8, top_k=2, rope_theta=1e6, dtype="bfloat16"),
}


def config_from_name(spec: str) -> ModelConfig:
    """`gpt-175b`, `gpt-175b:layers=2` or `gpt:layers=4,hidden=256,heads=8,vocab=51200`."""
    base, _, overrides = spec.partition(":")
    base = base.strip()
    if base not in PRESETS:
        raise AutoshardError(f"unknown model {base!r}: use one of {', '.join(PRESETS)} (with optional "
                             f":field=value overrides)")
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    values = dict(PRESETS[base], name=spec.strip())
    for part in filter(None, (p.strip() for p in overrides.split(","))):
        key, eq, raw = part.partition("=")
        key, raw = key.strip(), raw.strip()
        if not eq or key not in fields or key == "name":
            raise AutoshardError(f"bad model override {part!r}: write field=value with field one of "
                                 f"{', '.join(k for k in fields if k != 'name')}")
        values[key] = _parse_value(key, raw, fields[key].type)
    return ModelConfig(**values)


def _parse_value(key: str, raw: str, typ) -> object:
    typ = typ if isinstance(typ, str) else typ.__name__
    try:
        if typ == "int":
            return int(raw)
        if typ == "float":
            v = float(raw)
            if not math.isfinite(v):
                raise ValueError
            return v
        if typ == "bool":
            if raw.lower() in ("1", "true", "yes"):
                return True
            if raw.lower() in ("0", "false", "no"):
                return False
            raise ValueError
        return raw
    except ValueError:
        raise AutoshardError(f"bad model override {key}={raw!r}: expected a {typ}") from None
