"""A Trainer's whole training state in the model's layout: what a checkpoint stores and resumes.

Three flat tables of arrays, keyed by readable paths (`blocks/attn/wq`, `1/0/mu/blocks/attn/wq`):
`params` (the weights), `opt_state` (the optimizer's state, its parameter-shaped parts in the same layout as the
weights) and `rest` (the model's non-parameter state: statistics, RNG counters, a dropout key as its raw key data).
A pipeline keeps its layer weights in a staged layout [pipe, virtual, layers per stage, ...]; here they are in the
model's own [layers, ...] layout, so a checkpoint written under one plan restores under any other plan or device
count. Flat tables rather than pytrees: orbax stores any dict of arrays the same way, whatever optax or flax make
their state of.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from autoshard import emit, staging
from autoshard.pipeline import is_layer_param
from planner.errors import AutoshardError
from planner.search import key_path

Tables = dict[str, dict[str, Any]]
"""{"params": {path: array}, "opt_state": {...}, "rest": {...}}."""


def flatten(tree: Any) -> dict[str, Any]:
    """{key path: leaf} of a pytree (None leaves dropped)."""
    out: dict[str, Any] = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = key_path(kp)
        if key in out:
            raise AutoshardError(f"two leaves of the training state share the name {key!r}: cannot checkpoint it")
        out[key] = leaf
    return out


def unflatten(template: Any, flat: dict[str, Any]) -> Any:
    """`template` with each leaf replaced by `flat[its key path]`."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(treedef, [flat[key_path(kp)] for kp, _ in leaves])


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _paths(params: Any) -> Any:
    """The parameter tree with each leaf replaced by its path (to find a parameter inside the optimizer's state)."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: key_path(kp), params)


def _per_param(trainer, fn: Callable[[Any, str], Any], opt_state: Any, other: Callable[[Any], Any]) -> Any:
    """`fn(leaf, parameter path)` on the optimizer state's parameter-shaped leaves, `other(leaf)` on the rest."""
    return optax.tree_map_params(trainer.optimizer, fn, opt_state, _paths(trainer.params),
                                 transform_non_params=other)


def _model_layout_fn(trainer) -> Callable[[Any, Any, Any], tuple[Any, Any, Any]]:
    """(stored params, opt_state, rest) -> the same in the model's layout (jit-able)."""
    pipeline = trainer.pipeline

    def leaf(x, path):
        return pipeline.layout.from_staged(x) if pipeline is not None and is_layer_param(path) else x

    def convert(params, opt_state, rest):
        model_params = pipeline.from_staged(params) if pipeline is not None else params
        model_opt = _per_param(trainer, leaf, opt_state, lambda x: x) if pipeline is not None else opt_state
        return model_params, model_opt, jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, rest)

    return convert


def model_layout(trainer) -> Tables:
    """The trainer's state as flat tables of (device) arrays in the model's layout."""
    convert = _model_layout_fn(trainer)
    if trainer.pipeline is not None:
        convert = jax.jit(convert)
    params, opt_state, rest = convert(trainer.params, trainer.opt_state, trainer.rest)
    return _to_user(trainer, {"params": flatten(params), "opt_state": flatten(opt_state), "rest": flatten(rest)})


def _weights(trainer) -> list[str]:
    """Paths of the trainer's model's weights (and non-parameter state): the names the tables' keys end with."""
    _, params, rest = nnx.split(trainer.abstract, nnx.Param, ...)
    return list(flatten(params)) + list(flatten(rest))


def _to_user(trainer, tables: Tables) -> Tables:
    """Tables of a model pipelined from a Python loop of blocks (`autoshard.staging.Staged`) in the user's own
    structure and paths (one entry per block), so checkpoints do not depend on the plan; others unchanged."""
    if getattr(trainer, "staged_from", None) is None:
        return tables
    names = _weights(trainer)
    return {k: staging.user_tables(trainer.abstract, t, names) for k, t in tables.items()}


def _from_user(trainer, tables: Tables) -> Tables:
    """The inverse of `_to_user`: per-block entries stacked back into the staged model's paths."""
    if getattr(trainer, "staged_from", None) is None:
        return tables
    names = _weights(trainer)
    return {k: staging.staged_tables(trainer.abstract, t, names) for k, t in tables.items()}


def _model_sharding(trainer, path: str, ndim: int) -> NamedSharding:
    """Where a model-layout parameter (or a moment of it) lives when restored: its plan spec without `pipe` (a
    pipeline's layer dimension is re-staged afterwards), replicated over pipe."""
    spec = trainer.specs.get(path) if trainer.pipeline is None else trainer.plan.params.get(path)
    if spec is None or len(spec) != ndim:
        return NamedSharding(trainer.mesh, PartitionSpec())
    if trainer.pipeline is not None:
        keep = lambda e: ([a for a in e if a != "pipe"] or None) if isinstance(e, list) else (  # noqa: E731
            None if e == "pipe" else e)
        spec = [keep(e) for e in spec]
    return NamedSharding(trainer.mesh, emit.partition_spec(spec))


def targets(trainer) -> Tables:
    """Shapes, dtypes and shardings (on this trainer's mesh) of `model_layout(trainer)`: what a restore reads into."""
    shapes = jax.eval_shape(_model_layout_fn(trainer), trainer.params, trainer.opt_state, trainer.rest)
    params, opt_state, rest = shapes
    replicated = NamedSharding(trainer.mesh, PartitionSpec())
    sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    params = jax.tree_util.tree_map_with_path(lambda kp, x: sds(x, _model_sharding(trainer, key_path(kp), x.ndim)),
                                              params)
    if trainer.pipeline is not None:
        opt_state = _per_param(trainer, lambda x, path: sds(x, _model_sharding(trainer, path, x.ndim)), opt_state,
                               lambda x: sds(x, replicated))
    else:
        opt_state = jax.tree.map(sds, opt_state, trainer.opt_shardings)
    rest = jax.tree.map(lambda x: sds(x, replicated), rest)
    return _to_user(trainer, {"params": flatten(params), "opt_state": flatten(opt_state), "rest": flatten(rest)})


def load(trainer, tables: Tables, step: int) -> None:
    """Put model-layout `tables` (as `targets` shapes them) into the trainer, in its plan's layout; `step` steps done."""
    pipeline = trainer.pipeline
    tables = _from_user(trainer, tables)
    shapes = jax.eval_shape(_model_layout_fn(trainer), trainer.params, trainer.opt_state, trainer.rest)
    params = unflatten(shapes[0], tables["params"])
    opt_state = unflatten(shapes[1], tables["opt_state"])
    rest = unflatten(shapes[2], tables.get("rest", {}))
    if pipeline is not None:
        def leaf(x, path):
            return pipeline.layout.to_staged(x) if is_layer_param(path) else x

        params, opt_state = jax.jit(lambda p, o: (pipeline.to_staged(p), _per_param(trainer, leaf, o, lambda x: x)),
                                    out_shardings=(trainer.param_shardings, trainer.opt_shardings))(params, opt_state)
    else:
        params = jax.device_put(params, trainer.param_shardings)
        opt_state = jax.device_put(opt_state, trainer.opt_shardings)
    live = jax.tree.leaves(trainer.rest)
    flat_rest = jax.tree.leaves(rest)
    rebuilt = [jax.random.wrap_key_data(np.asarray(r), impl=jax.random.key_impl(x)) if _is_key(x) else r
               for x, r in zip(live, flat_rest)]
    rest = jax.tree.unflatten(jax.tree.structure(trainer.rest), rebuilt)
    replicated = NamedSharding(trainer.mesh, PartitionSpec())
    trainer.params, trainer.opt_state = params, opt_state
    trainer.rest = jax.device_put(rest, replicated)
    trainer.steps_done = int(step)


def describe(tables: Tables) -> dict[str, dict[str, list]]:
    """{table: {path: [shape, dtype]}}: what a checkpoint records to say, before reading any array, whether it
    fits a model."""
    return {name: {k: [list(np.shape(v)), str(v.dtype)] for k, v in table.items()} for name, table in tables.items()}
