"""Plan -> plain JAX: a `Mesh`, `NamedSharding`s for parameters, optimizer state and batch, and plan checks."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from planner.errors import AutoshardError, PlanError
from planner.params import path_str
from planner.plan import AXES, BATCH_AXES, Plan, SpecEntry, shard_count
from planner.rules import ParamInfo

if TYPE_CHECKING:  # (imported where used: autoshard.ops imports this module's users)
    from autoshard.ops import OpsContext


def make_mesh(plan: Plan, devices: list | None = None) -> Mesh:
    """A mesh over all six vocabulary axes (size 1 where unused); `tensor` is innermost, on neighbouring devices.

    Devices of several processes (hosts) are laid out by `device_grid`: the fastest axes inside a host."""
    devices = list(jax.devices() if devices is None else devices)
    need = plan.num_devices
    if need != len(devices):
        raise PlanError(f"mesh {plan.mesh_string()} needs {need} devices but {len(devices)} are available: "
                        f"make the mesh sizes multiply to {len(devices)}")
    shape = tuple(plan.mesh[a] for a in AXES)
    auto = (AxisType.Auto,) * len(AXES)
    grid = device_grid(shape, devices)
    if grid is not None:
        return Mesh(grid, AXES, axis_types=auto)
    try:
        return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
    except (ValueError, NotImplementedError):  # a device set the topology-aware layout does not handle
        return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def device_grid(shape: tuple[int, ...], devices: list) -> np.ndarray | None:
    """Devices of several processes arranged as `shape` (axes slowest first) so that each process holds one block
    of the mesh, filled from the fastest axis out: `tensor`, then `seq`, `expert`, `fsdp`, `data`, `pipe`. The
    collectives of the inner axes (tensor's, every layer) then stay on a host's links (NVLink, a TPU host's ICI),
    the outer axes' (data's gradient reduction, pipe's sends) cross hosts. None for one process (or one TPU slice,
    whose interconnect spans its hosts: jax's topology-aware layout knows it better).

    Inside a block, a TPU host's devices follow jax's topology-aware layout, others the order given. Process
    blocks follow process index, the block grid laid out like the mesh (slowest axis first).
    """
    groups: dict[int, list] = {}
    for d in devices:
        groups.setdefault(int(d.process_index), []).append(d)
    if len(groups) == 1 or (devices[0].platform == "tpu" and len({getattr(d, "slice_index", 0) for d in devices}) == 1):
        return None
    sizes = {len(g) for g in groups.values()}
    if len(sizes) > 1:
        raise PlanError(f"the processes hold different numbers of devices ({sorted(sizes)}): give every process "
                        f"as many devices")
    local = sizes.pop()
    block = host_block(shape, local)
    if block is None:  # the host's devices cannot be one block: processes in order, row-major
        warnings.warn(f"mesh {shape} cannot give each process a block of its {local} devices: laid out in process "
                      f"order, an axis may cross hosts unevenly", stacklevel=3)
        ordered = [d for p in sorted(groups) for d in groups[p]]
        return np.asarray(ordered, dtype=object).reshape(shape)
    grid = tuple(n // b for n, b in zip(shape, block))
    out = np.empty(shape, dtype=object)
    for k, process in enumerate(sorted(groups)):
        at = np.unravel_index(k, grid)
        out[tuple(slice(i * b, (i + 1) * b) for i, b in zip(at, block))] = _host_devices(block, groups[process])
    return out


def host_block(shape: tuple[int, ...], local: int) -> tuple[int, ...] | None:
    """The block of `shape` one process's `local` devices hold, filled from the fastest axis out (as much of each
    axis as divides what is left); None if that leaves devices over."""
    block, left = [1] * len(shape), local
    for i in reversed(range(len(shape))):
        f = math.gcd(left, shape[i])
        block[i], left = f, left // f
    return tuple(block) if left == 1 else None


def _host_devices(block: tuple[int, ...], devices: list) -> np.ndarray:
    if devices[0].platform == "tpu":
        from jax.experimental import mesh_utils

        try:
            return mesh_utils.create_device_mesh(block, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            pass
    return np.asarray(devices, dtype=object).reshape(block)


def partition_spec(spec: list[SpecEntry]) -> PartitionSpec:
    return PartitionSpec(*(tuple(e) if isinstance(e, list) else e for e in spec))


def batch_spec(plan: Plan, ndim: int = 2) -> PartitionSpec:
    """One batch leaf of rank `ndim` (tokens [B, S], labels [B], images [B, H, W, C], ...): its leading dimension,
    the global batch, over expert x data x fsdp; its second, the sequence of a [B, S, ...] leaf, over seq."""
    used = tuple(a for a in BATCH_AXES if plan.mesh[a] > 1)
    return PartitionSpec(*[used or None, "seq" if plan.mesh["seq"] > 1 else None][:ndim])


def batch_specs(plan: Plan, batch: Any) -> Any:
    """`batch_spec` for every leaf of a batch pytree (arrays or ShapeDtypeStructs), in its structure."""
    return jax.tree.map(lambda x: batch_spec(plan, len(np.shape(x))), batch)


def batch_size(batch: Any) -> int:
    """The batch size of a batch pytree (arrays or ShapeDtypeStructs): the leading dimension every leaf shares.
    A scalar leaf, leaves that disagree, or no leaf at all is a one-line `AutoshardError` naming the leaf."""
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not leaves:
        raise AutoshardError("the batch has no arrays: pass a pytree of arrays whose leading dimension is the batch")
    for kp, x in leaves:
        if not np.shape(x):
            raise AutoshardError(f"{_leaf_name(kp)} is a scalar: every batch leaf needs the batch as its leading "
                                 f"dimension (pass constants to the model or the loss function instead)")
    (kp0, x0), size = leaves[0], np.shape(leaves[0][1])[0]
    for kp, x in leaves[1:]:
        if np.shape(x)[0] != size:
            raise AutoshardError(f"{_leaf_name(kp)} has leading dimension {np.shape(x)[0]} {tuple(np.shape(x))} but "
                                 f"{_leaf_name(kp0)} has {size} {tuple(np.shape(x0))}: every batch leaf must lead with "
                                 f"the batch")
    return int(size)


def _leaf_name(key_path: Any) -> str:
    """How an error names a batch leaf: `batch['label']`."""
    return f"batch{jax.tree_util.keystr(key_path)}"


TRACE_ERRORS = (KeyError, IndexError, TypeError, ValueError)
"""What tracing a model's loss raises on a batch it cannot read (jax's shape and dtype checks included)."""


def batch_error(batch: Any, error: Exception) -> AutoshardError:
    """The one-line error for a batch the model's loss could not be traced on (a key it lacks, a shape or dtype it
    does not take): what the batch holds, and what failed."""
    leaves = ", ".join(f"{_leaf_name(kp)} {getattr(x, 'dtype', type(x).__name__)}{list(np.shape(x))}"
                       for kp, x in jax.tree_util.tree_flatten_with_path(batch)[0])
    missing = error.args[0] if isinstance(error, KeyError) and error.args else None
    if isinstance(batch, dict) and isinstance(missing, str) and missing not in batch:
        return AutoshardError(f"the model's loss reads batch[{missing!r}], which this batch lacks ({leaves}): give "
                              f"the batch every key the loss reads")
    cause = (str(error).strip().splitlines() or [""])[0]
    return AutoshardError(f"the train step could not be traced on this batch ({leaves}): {type(error).__name__}: "
                          f"{cause}: give the batch the keys, shapes and dtypes the model's loss reads")


def check_batch(plan: Plan, batch: Any) -> int:
    """The global batch size of a batch pytree (`batch_size`), after a one-line `PlanError` if the plan cannot
    split it: a batch the batch shards do not divide, a sequence the seq axis does not divide."""
    size = batch_size(batch)
    if size % plan.batch_shards:
        raise PlanError(f"batch size {size} is not divisible by the {plan.batch_shards} batch shards "
                        f"(expert x data x fsdp) of mesh {plan.mesh_string()}: change --batch or the mesh")
    seq = plan.mesh["seq"]
    for kp, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
        if seq > 1 and len(np.shape(x)) >= 2 and np.shape(x)[1] % seq:
            raise PlanError(f"{_leaf_name(kp)} has sequence length {np.shape(x)[1]}, which "
                            f"seq={seq} does not divide: change --seq or the mesh")
    return int(size)


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


def ops_context(plan: Plan, mesh: Mesh) -> OpsContext:
    """What the model's composite ops need from the plan: the mesh, activation specs, attention and MoE kinds."""
    from autoshard.ops import OpsContext

    attention = plan.sequence["method"] if plan.mesh["seq"] > 1 and plan.sequence else "dense"
    return OpsContext(mesh=mesh, remat=plan.remat, attention=attention,
                      moe="expert" if plan.mesh["expert"] > 1 else "dense",
                      activations={k: partition_spec(v) for k, v in plan.activations.items()})


def state_shardings(state: nnx.State, specs: dict[str, list[SpecEntry]], mesh: Mesh) -> nnx.State:
    """NamedShardings with the structure of an nnx.State of parameters."""
    return nnx.map_state(lambda path, v: v.replace(NamedSharding(mesh, partition_spec(specs[path_str(path)]))), state)
