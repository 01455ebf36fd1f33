"""Plan -> plain JAX: a `Mesh`, `NamedSharding`s for parameters, optimizer state and batch, and plan checks."""

from __future__ import annotations

import warnings

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from planner.errors import PlanError
from planner.params import path_str
from planner.plan import AXES, BATCH_AXES, Plan, SpecEntry, shard_count
from planner.rules import ParamInfo


def make_mesh(plan: Plan, devices: list | None = None) -> Mesh:
    """A mesh over all six vocabulary axes (size 1 where unused); `tensor` is innermost, on neighbouring devices."""
    devices = list(jax.devices() if devices is None else devices)
    need = plan.num_devices
    if need != len(devices):
        raise PlanError(f"mesh {plan.mesh_string()} needs {need} devices but {len(devices)} are available: "
                        f"make the mesh sizes multiply to {len(devices)}")
    shape = tuple(plan.mesh[a] for a in AXES)
    try:
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
    except (ValueError, NotImplementedError):  # a device set the topology-aware layout does not handle
        return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def partition_spec(spec: list[SpecEntry]) -> PartitionSpec:
    return PartitionSpec(*(tuple(e) if isinstance(e, list) else e for e in spec))


def batch_spec(plan: Plan) -> PartitionSpec:
    """Global batch [B, S]: B over expert x data x fsdp, S over seq."""
    used = tuple(a for a in BATCH_AXES if plan.mesh[a] > 1)
    return PartitionSpec(used or None, "seq" if plan.mesh["seq"] > 1 else None)


def check_plan_against_model(plan: Plan, params: dict[str, ParamInfo], *,
                             check_shapes: bool = True) -> dict[str, list[SpecEntry]]:
    """Every parameter's spec (unplanned ones replicated); one-line errors for a plan that does not fit.

    `check_shapes=False` checks only that the plan and the model name the same parameters (a pipeline checks the
    shapes of its staged layout instead).
    """
    unknown = sorted(set(plan.params) - set(params))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise PlanError(f"plan names parameter {unknown[0]!r}{more} that the model lacks: was it made for "
                        f"another model?")
    missing = sorted(set(params) - set(plan.params))
    if missing and plan.params:
        warnings.warn(f"plan has no spec for {len(missing)} parameter(s) (e.g. {missing[0]}); they are replicated",
                      stacklevel=2)
    specs = {}
    if not check_shapes:
        return specs
    for path, info in params.items():
        spec = plan.params.get(path, [None] * len(info.shape))
        if len(spec) > len(info.shape):
            raise PlanError(f"plan spec {spec} for {path} has {len(spec)} entries but the parameter has "
                            f"{len(info.shape)} dimensions {info.shape}")
        spec = list(spec) + [None] * (len(info.shape) - len(spec))
        for dim, (size, entry) in enumerate(zip(info.shape, spec)):
            n = shard_count(entry, plan.mesh)
            if size % n:
                raise PlanError(f"dimension {dim} of {path} (size {size}) cannot be split {n} ways over {entry}: "
                                f"change the mesh or that parameter's spec")
        specs[path] = spec
    return specs


def check_supported(plan: Plan) -> None:
    """Reject plan features this runtime cannot honour, rather than silently ignoring them."""
    if plan.experts and plan.experts.get("degree", plan.mesh["expert"]) != plan.mesh["expert"]:
        raise PlanError(f"plan's experts section says degree {plan.experts['degree']} but the mesh has expert="
                        f"{plan.mesh['expert']}: make them agree")
    if plan.experts and plan.experts.get("placement") is not None:
        raise PlanError("the plan's expert placement reorders a trained checkpoint's experts: train with --restore "
                        "DIR (the checkpoint it was planned from), or apply it with autoshard.place.placed first")


def ops_context(plan: Plan, mesh: Mesh) -> "OpsContext":
    """What the model's composite ops need from the plan: the mesh, activation specs, attention and MoE kinds."""
    from autoshard.ops import OpsContext

    attention = plan.sequence["method"] if plan.mesh["seq"] > 1 and plan.sequence else "dense"
    return OpsContext(mesh=mesh, remat=plan.remat, attention=attention,
                      moe="expert" if plan.mesh["expert"] > 1 else "dense",
                      activations={k: partition_spec(v) for k, v in plan.activations.items()})


def state_shardings(state: nnx.State, specs: dict[str, list[SpecEntry]], mesh: Mesh) -> nnx.State:
    """NamedShardings with the structure of an nnx.State of parameters."""
    return nnx.map_state(lambda path, v: v.replace(NamedSharding(mesh, partition_spec(specs[path_str(path)]))), state)
