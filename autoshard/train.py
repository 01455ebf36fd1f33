"""The sharded train step: `parallelize(model, optimizer, plan)` -> a Trainer whose `step(batch)` returns metrics."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from autoshard import emit, ops
from autoshard.pipeline import Pipeline
from planner.errors import PlanError
from planner.params import param_table
from planner.plan import Plan

LossFn = Callable[[nnx.Module, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


def make_schedule(lr: float = 1e-3, steps: int = 1000, warmup: int | None = None) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine decay to 10% of it by `steps`."""
    warmup = max(1, min(steps // 10, 100)) if warmup is None else max(0, warmup)
    if warmup == 0:
        return optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.1)
    return optax.warmup_cosine_decay_schedule(lr / warmup, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.1)


def make_optimizer(lr: float = 1e-3, steps: int = 1000, warmup: int | None = None, weight_decay: float = 0.1,
                   clip: float = 1.0, b1: float = 0.9, b2: float = 0.95) -> optax.GradientTransformation:
    """AdamW on `make_schedule`, after global-norm gradient clipping; no weight decay on vectors (norm scales)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(make_schedule(lr, steps, warmup), b1=b1, b2=b2, weight_decay=weight_decay,
                                   mask=decay_mask))


def _default_loss(model: nnx.Module, batch: dict[str, jax.Array]):
    return model.loss(batch)


class Trainer:
    """Parameters and optimizer state laid out by a Plan, and the jitted (donating) train step over them."""

    def __init__(self, model: nnx.Module | Callable[[], nnx.Module], optimizer: optax.GradientTransformation,
                 plan: Plan, *, loss_fn: LossFn | None = None, devices: list | None = None):
        plan.validate()
        emit.check_supported(plan)
        self.plan = plan
        self.optimizer = optimizer
        self.loss_fn = loss_fn or _default_loss
        self.mesh = emit.make_mesh(plan, devices)
        built = isinstance(model, nnx.Module)
        abstract = model if built else nnx.eval_shape(model)
        self.abstract = abstract
        """The model's structure (shapes only when built from a constructor): what the planner traces."""
        table = param_table(abstract)
        # with a pipeline, the layer weights live in its staged layout [pipe, virtual, layers per stage, ...]
        self.pipeline = Pipeline(plan, abstract, self.mesh, loss_fn) if plan.pipeline is not None else None
        if self.pipeline is not None:
            emit.check_plan_against_model(plan, table, check_shapes=False)
            staged = dataclasses.replace(plan, params=self.pipeline.staged_specs(
                {path: plan.params.get(path, [None] * len(info.shape)) for path, info in table.items()}))
            self.specs = emit.check_plan_against_model(staged, self.pipeline.staged_table(table))
        else:
            self.specs = emit.check_plan_against_model(plan, table)
        self.graphdef, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
        to_stored = self.pipeline.to_staged if self.pipeline is not None else (lambda p: p)
        self.param_shardings = emit.state_shardings(jax.eval_shape(to_stored, abstract_params), self.specs,
                                                    self.mesh)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        if built:
            _, params, rest = nnx.split(model, nnx.Param, ...)
            devices = set(self.mesh.devices.flat)
            # arrays committed elsewhere (a restored checkpoint on one device) come in through the host
            params = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array)
                                  and x.sharding.device_set != devices else x, params)
            self.params = jax.jit(to_stored, out_shardings=self.param_shardings)(params)
            self.rest = jax.device_put(rest, replicated)
        else:  # initialise under jit: weights are born sharded, never whole on one device
            self.params = jax.jit(lambda: to_stored(nnx.state(model(), nnx.Param)),
                                  out_shardings=self.param_shardings)()
            self.rest = jax.jit(lambda: nnx.split(model(), nnx.Param, ...)[2], out_shardings=replicated)()
        abstract_opt = jax.eval_shape(optimizer.init, self.params)
        self.opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, self.param_shardings,
                                                   transform_non_params=lambda _: replicated)
        self.opt_state = jax.jit(optimizer.init, out_shardings=self.opt_shardings)(self.params)
        self.ops_context = emit.ops_context(plan, self.mesh)
        self._by_batch: dict[Any, _Programs] = {}
        self.steps_done = 0

    def _programs(self, batch: Any) -> "_Programs":
        """The jitted step, step-with-gradients and gradients for batches of this structure and these leaf ranks
        (each leaf laid out by `emit.batch_spec`), built on first use."""
        key = (jax.tree.structure(batch), tuple(len(np.shape(x)) for x in jax.tree.leaves(batch)))
        if key in self._by_batch:
            return self._by_batch[key]
        replicated = NamedSharding(self.mesh, PartitionSpec())
        data = jax.tree.map(lambda s: NamedSharding(self.mesh, s), emit.batch_specs(self.plan, batch))
        grads = None if self.pipeline else self.param_shardings
        state = (self.param_shardings, self.opt_shardings, replicated)
        programs = _Programs(
            data=data,
            step=jax.jit(self._train_step, donate_argnums=(0, 1), in_shardings=state + (data,),
                         out_shardings=state + (replicated,)),
            step_and_grads=jax.jit(  # the step that also returns the gradients it applied (for checks)
                lambda *a: self._train_step(*a, with_grads=True), donate_argnums=(0, 1),
                in_shardings=state + (data,), out_shardings=state + (replicated, grads)),
            grads=jax.jit(self._loss_and_grads, in_shardings=(self.param_shardings, replicated, data),
                          out_shardings=(replicated, grads)))
        self._by_batch[key] = programs
        return programs

    # -- traced functions ---------------------------------------------------------------------------------------
    def _loss(self, params, rest, batch):
        """Loss, metrics and the model's non-parameter state after the call (RNG counters, statistics)."""
        with ops.context(self.ops_context):
            model = nnx.merge(self.graphdef, params, rest, copy=True)
            loss, metrics = self.loss_fn(model, batch)
            return loss, (metrics, nnx.split(model, nnx.Param, ...)[2])

    def _value_and_grad(self, params, rest, batch):
        """((loss, (metrics, rest)), grads) of the stored parameters, pipelined when the plan says so."""
        if self.pipeline is not None:
            loss, metrics, grads = self.pipeline.loss_and_grads(params, rest, batch, self.ops_context)
            return (loss, (metrics, rest)), grads
        return jax.value_and_grad(self._loss, has_aux=True)(params, rest, batch)

    def _loss_and_grads(self, params, rest, batch):
        (loss, _), grads = self._value_and_grad(params, rest, batch)
        return loss, (self.pipeline.from_staged(grads) if self.pipeline is not None else grads)

    def _train_step(self, params, opt_state, rest, batch, with_grads: bool = False):
        (loss, (metrics, rest)), grads = self._value_and_grad(params, rest, batch)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        out = new_params, opt_state, rest, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        if with_grads:
            return out + (self.pipeline.from_staged(grads) if self.pipeline is not None else grads,)
        return out

    # -- public -------------------------------------------------------------------------------------------------
    def shard_batch(self, batch: Any) -> Any:
        """A batch pytree (every leaf leading with the batch) placed on the mesh, leaf by leaf (`emit.batch_spec`);
        a batch the plan cannot split is a one-line `AutoshardError` before any work."""
        return self._place(batch)[1]

    def _place(self, batch: Any) -> tuple["_Programs", Any]:
        """The programs for this batch's structure and the batch placed on the mesh for them."""
        size = emit.check_batch(self.plan, batch)
        replicas = self.plan.batch_shards  # a pipeline's batch is split over expert too (each device its own tokens)
        if self.pipeline is not None and (size // replicas) % self.pipeline.M:
            raise PlanError(f"{self.pipeline.M} microbatches do not divide the per-replica batch of "
                            f"{size // replicas} (batch {size} / expert x data x fsdp {replicas}): change "
                            f"--microbatches or --batch")
        programs = self._programs(batch)
        return programs, jax.device_put(jax.tree.map(jnp.asarray, batch), programs.data)

    def step(self, batch: Any) -> dict[str, Any]:
        """One optimizer step; returns metrics as Python floats (arrays as lists)."""
        programs, placed = self._place(batch)
        self.params, self.opt_state, self.rest, metrics = programs.step(self.params, self.opt_state, self.rest,
                                                                        placed)
        self.steps_done += 1
        return _floats(metrics)

    def step_with_grads(self, batch: Any) -> tuple[dict[str, Any], nnx.State]:
        """`step`, also returning the gradients it applied (model layout): one compiled program for checks."""
        programs, placed = self._place(batch)
        self.params, self.opt_state, self.rest, metrics, grads = programs.step_and_grads(
            self.params, self.opt_state, self.rest, placed)
        self.steps_done += 1
        return _floats(metrics), grads

    def loss_and_grads(self, batch: Any) -> tuple[jax.Array, nnx.State]:
        """Loss and gradients (in the model's layout) under the plan, without updating anything (for checks)."""
        programs, placed = self._place(batch)
        return programs.grads(self.params, self.rest, placed)

    def compile(self, batch: Any):
        """The compiled train step for batches shaped like `batch` (for `autoshard.inspect`)."""
        emit.check_batch(self.plan, batch)
        programs = self._programs(batch)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), _dtype(x), sharding=s),
                                batch, programs.data)
        return programs.step.lower(self.params, self.opt_state, self.rest, abstract).compile()

    def model(self) -> nnx.Module:
        """The model with the current (sharded) parameters."""
        if self.pipeline is not None:
            return nnx.merge(self.graphdef, jax.jit(self.pipeline.from_staged)(self.params), self.rest)
        return nnx.merge(self.graphdef, self.params, self.rest)


@dataclasses.dataclass(frozen=True)
class _Programs:
    """The jitted programs of one batch structure, and that batch's shardings."""

    data: Any
    step: Callable
    step_and_grads: Callable
    grads: Callable


def _dtype(x: Any) -> Any:
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _floats(metrics: dict[str, jax.Array]) -> dict[str, Any]:
    return {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in jax.device_get(metrics).items()}


def parallelize(model: nnx.Module | Callable[[], nnx.Module], optimizer: optax.GradientTransformation, plan: Plan,
                *, loss_fn: LossFn | None = None, devices: list | None = None) -> Trainer:
    """Lay out `model` and `optimizer` state by `plan` and build the sharded train step.

    `model` is a built NNX module, or a zero-argument function that builds one (then it is initialised under jit
    directly into its shardings, so models larger than one device fit). `loss_fn(model, batch) -> (loss, metrics)`
    defaults to `model.loss(batch)`.
    """
    return Trainer(model, optimizer, plan, loss_fn=loss_fn, devices=devices)
