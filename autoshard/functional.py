"""A plain loss function over a variables pytree (Linen `init` output, hand-written JAX) as a model autoshard plans
and trains.

`loss_fn(variables, batch)`, or `loss_fn(variables, batch, rng)` when a dropout key is given, returns a loss or
`(loss, aux)`. Variables shaped like Linen's (a dict with a `params` collection) train their `params`; the other
collections (`batch_stats`, ...) are state. A dict `aux` may hold new values for state collections under their
names (what `model.apply(..., mutable=["batch_stats"])` returns as its second output): they replace the state after
the step; its other entries are metrics. Any other variables pytree trains every leaf.

Parameters are named by their pytree path joined with `/` (`Dense_0/kernel`; Linen's `params` collection is not part
of the name). Flax's metadata boxes (`nn.with_logical_partitioning`) are unboxed for the step and put back around
the trained values; their logical axis names reach the planner's rules and `explain`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax.core import meta

from planner.errors import AutoshardError
from planner.rules import ParamInfo
from planner.search import key_path

PARAMS = "params"
"""The collection a Linen-style variables dict trains."""


def _is_box(x: Any) -> bool:
    return isinstance(x, meta.AxisMetadata)


def unbox(tree: Any) -> Any:
    """`tree` with every flax metadata box replaced by the value it holds."""
    return jax.tree.map(lambda x: x.unbox() if _is_box(x) else x, tree, is_leaf=_is_box)


def _shape(x: Any) -> jax.ShapeDtypeStruct:
    return x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(np.shape(x), x.dtype)


@dataclasses.dataclass(frozen=True)
class FunctionModel:
    """A loss function and the variables it takes, split into what trains and what is carried along.

    Attributes:
      loss_fn: `loss_fn(variables, batch[, rng]) -> loss | (loss, aux)`.
      variables: as the user holds them (boxes kept): arrays, or ShapeDtypeStructs for planning only.
      rng: a dropout key: the step passes a fresh split of it as `loss_fn`'s third argument.
    """

    loss_fn: Callable
    variables: Any
    rng: jax.Array | None = None

    @property
    def linen(self) -> bool:
        """Whether the variables are Linen-style collections (train `params`, carry the rest)."""
        return isinstance(self.variables, Mapping) and PARAMS in self.variables

    def split(self) -> tuple[Any, Any]:
        """(trained parameters, state), unboxed, in the user's structure."""
        plain = unbox(self.variables)
        if self.linen:
            return plain[PARAMS], {k: v for k, v in plain.items() if k != PARAMS} or None
        for kp, x in jax.tree_util.tree_flatten_with_path(plain)[0]:
            if not np.issubdtype(np.dtype(x.dtype), np.inexact):
                raise AutoshardError(f"variables leaf {key_path(kp) or '(root)'} has dtype {x.dtype}: only floating "
                                     f"arrays can be trained; pass Linen-style variables {{'params': ..., 'state': "
                                     f"...}} to carry other arrays along")
        return plain, None

    def merge(self, params: Any, state: Any) -> Any:
        """The variables `loss_fn` takes (unboxed), from trained parameters and state."""
        if self.linen:
            return {**(state or {}), PARAMS: params}
        return params

    def rebox(self, params: Any, state: Any) -> Any:
        """Trained values in the user's own structure, metadata boxes put back where they were."""
        return jax.tree.map(lambda old, new: old.replace_boxed(new) if _is_box(old) else new,
                            self.variables, self.merge(params, state), is_leaf=_is_box)

    def table(self) -> dict[str, ParamInfo]:
        """Every trained parameter: shape, dtype and the logical axis names of a `LogicallyPartitioned` box."""
        trained = self.variables[PARAMS] if self.linen else self.variables
        table = {}
        for kp, x in jax.tree_util.tree_flatten_with_path(trained, is_leaf=_is_box)[0]:
            names = getattr(x, "names", None) if _is_box(x) else None
            value = x.unbox() if _is_box(x) else x
            axes = tuple(names) if names is not None and len(names) == len(np.shape(value)) else None
            table[key_path(kp)] = ParamInfo(tuple(np.shape(value)), str(value.dtype), axes)
        return table

    def call(self, params: Any, state: Any, batch: Any, rng: jax.Array | None) -> tuple[jax.Array, dict, Any]:
        """(loss, metrics, state after the step) of one call of `loss_fn`."""
        variables = self.merge(params, state)
        out = self.loss_fn(variables, batch) if rng is None else self.loss_fn(variables, batch, rng)
        loss, aux = out if isinstance(out, tuple) else (out, None)
        if not isinstance(aux, Mapping):
            return loss, {}, state
        names = set(state or {})
        metrics = {k: v for k, v in aux.items() if k not in names}
        if names & set(aux):
            state = {**state, **{k: v for k, v in aux.items() if k in names}}
        return loss, metrics, state

    def abstract(self) -> "FunctionModel":
        """The same model with shapes only (for planning and prediction)."""
        to_shape = lambda x: x.replace_boxed(_shape(x.unbox())) if _is_box(x) else _shape(x)  # noqa: E731
        rng = None if self.rng is None else _shape(self.rng)
        return FunctionModel(self.loss_fn, jax.tree.map(to_shape, self.variables, is_leaf=_is_box), rng)


def trace(model: FunctionModel, batch: Any, rewrite: Callable[[Callable], Callable] | None = None):
    """The planner's dataflow graph of `model`'s loss on batches like `batch` (shapes only); `rewrite` wraps the
    loss before it is traced (as `planner.search.trace_model`'s)."""
    from planner.trace import trace as trace_fn

    model = model.abstract()
    params, state = model.split()
    paths = [key_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

    def loss(p, inputs):
        return model.call(p, inputs["state"], inputs["batch"], inputs["rng"])[0]

    inputs = {"batch": jax.tree.map(_shape, batch), "state": state, "rng": model.rng}
    batch_dims = {"batch": jax.tree.map(lambda _: 0, batch), "state": jax.tree.map(lambda _: -1, state),
                  "rng": None if model.rng is None else -1}
    return trace_fn(loss if rewrite is None else rewrite(loss), params, inputs, paths, model.table(), batch_dims)
