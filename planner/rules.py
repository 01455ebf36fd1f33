"""Rule-based plans: the hand-written strategies (DP, ZeRO-3 FSDP, Megatron tensor parallelism) for a given mesh.

`--mesh data=2,fsdp=2,tensor=2` becomes a Plan by these rules, and the planner uses them as baselines. Rules read the
logical axis names that a model attaches to its parameters (`nnx.Param(..., axes=("embed", "mlp"))`):

- batch over `expert` (major), `data` and `fsdp`; with `seq`, the sequence dimension of activations over `seq`
  (ring attention unless the plan's sequence section says ulysses);
- ZeRO-3: the `embed` dimension of every parameter over `fsdp` (or, without names, its largest divisible dimension;
  a vocabulary-parallel table splits its vocabulary over `tensor` x `fsdp` instead);
- Megatron: `heads`, `kv_heads` and `mlp` over `tensor` (column-parallel in, row-parallel out), `vocab` over
  `tensor` for the embedding and the head (vocabulary parallel);
- `experts` over `expert`;
- the stacked `layers` axis over `pipe` (pipeline stages).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

from planner.errors import PlanError
from planner.plan import BATCH_AXES, Plan, SpecEntry, normalize_mesh


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """What the planner knows of one parameter: its shape, dtype and (optional) logical axis names."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    axes: tuple[str | None, ...] | None = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)


TENSOR_AXES = ("heads", "kv_heads", "mlp", "vocab")
"""Logical axes split by tensor parallelism. Heads must divide evenly; the others fall back to unsharded."""
STRICT_TENSOR_AXES = ("heads", "kv_heads", "mlp")


def rule_plan(params: dict[str, ParamInfo], mesh: dict[str, int] | str, **fields) -> Plan:
    """The Plan that the standard rules give for `mesh` (a dict or `data=2,tensor=2` string)."""
    mesh = normalize_mesh(mesh)
    if mesh["tensor"] > 1:  # report the head count before KV heads or MLP width: it is the usual culprit
        for name in STRICT_TENSOR_AXES:
            for path, info in params.items():
                for size, axis in zip(info.shape, info.axes or ()):
                    if axis == name:
                        _require_divisible(path, size, mesh["tensor"], "tensor", name.replace("_", " "))
    specs = {path: param_spec(path, info, mesh) for path, info in params.items()}
    batch: SpecEntry = _batch_entry(mesh)
    seq: SpecEntry = "seq" if mesh["seq"] > 1 else None
    if mesh["seq"] > 1 and fields.get("sequence") is None:
        fields["sequence"] = {"method": "ring"}
    if mesh["expert"] > 1 and fields.get("experts") is None:
        fields["experts"] = {"degree": mesh["expert"]}
    plan = Plan(mesh=mesh, params=specs, activations={"layer_input": [batch, seq, None]}, **fields)
    plan.validate()
    return plan


def param_spec(path: str, info: ParamInfo, mesh: dict[str, int]) -> list[SpecEntry]:
    spec: list[SpecEntry] = [None] * len(info.shape)
    axes = info.axes or (None,) * len(info.shape)
    # tensor / expert axes first: they are dictated by the layer's math
    for i, name in enumerate(axes):
        if name == "layers" and i == 0 and mesh["pipe"] > 1:
            spec[i] = "pipe"  # stages are slices of the layer stack (any split: the runtime pads uneven stages)
        if name == "experts" and mesh["expert"] > 1:
            _require_divisible(path, info.shape[i], mesh["expert"], "expert", "experts")
            spec[i] = "expert"
        if name in TENSOR_AXES and mesh["tensor"] > 1 and "tensor" not in spec:  # one split per parameter: a
            # [mlp, vocab] head is row-parallel over mlp (names from a Linen model need not follow Megatron's pairs)
            if info.shape[i] % mesh["tensor"] == 0:
                spec[i] = "tensor"
            elif name in STRICT_TENSOR_AXES:
                _require_divisible(path, info.shape[i], mesh["tensor"], "tensor", name.replace("_", " "))
            else:
                warnings.warn(f"{path}: {name} dimension {info.shape[i]} is not divisible by tensor="
                              f"{mesh['tensor']}; left unsharded", stacklevel=2)
    if mesh["fsdp"] > 1:
        vocab = [i for i, n in enumerate(axes[:1]) if n == "vocab" and spec[i] == "tensor"]  # a [vocab, ...] table
        if vocab and info.shape[vocab[0]] % (mesh["tensor"] * mesh["fsdp"]) == 0:
            # a vocabulary-parallel table is also ZeRO-3 sharded along the vocabulary: splitting its rows over
            # tensor and its columns over fsdp makes XLA rematerialise the whole table for each lookup
            spec[vocab[0]] = ["tensor", "fsdp"]
        else:
            _place_fsdp(spec, info, axes, mesh["fsdp"])
    return spec


def _place_fsdp(spec: list[SpecEntry], info: ParamInfo, axes, fsdp: int) -> None:
    """ZeRO-3: shard the `embed` dimension over fsdp, else the largest free dimension that divides."""
    candidates = [i for i, n in enumerate(axes) if n == "embed"]
    candidates += sorted((i for i in range(len(info.shape)) if axes[i] not in ("embed", "layers")),
                         key=lambda i: -info.shape[i])
    for i in candidates:
        if spec[i] is None and info.shape[i] % fsdp == 0 and info.shape[i] >= fsdp:
            spec[i] = "fsdp"
            return


def _require_divisible(path: str, size: int, degree: int, axis: str, what: str) -> None:
    if size % degree:
        raise PlanError(f"{axis}={degree} does not divide the {size} {what} of {path}: choose a {axis} degree "
                        f"that divides {size}")


def _batch_entry(mesh: dict[str, int]) -> SpecEntry:
    used = [a for a in BATCH_AXES if mesh[a] > 1]
    if not used:
        return None
    return used[0] if len(used) == 1 else used
