"""The sharded train step: `parallelize(model, optimizer, plan)` -> a Trainer whose `step(batch)` returns metrics."""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from autoshard import attention_rewrite, distributed, emit, ops, protocols, staging
from autoshard.pipeline import Pipeline
from autoshard.functional import FunctionModel
from planner.errors import AutoshardError, PlanError
from planner.params import param_table
from planner.plan import Plan
from planner import jax_internals as jint
from planner.search import activation_specs, key_path
from planner.trace import trace

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

    def __init__(self, model: nnx.Module | Callable, optimizer: optax.GradientTransformation, plan: Plan, *,
                 loss_fn: LossFn | None = None, devices: list | None = None, params: Any = None,
                 rng: jax.Array | None = None):
        plan.validate()
        emit.check_supported(plan)
        if jax.process_count() > 1:  # every process must run the same program: a plan that differs would hang
            distributed.check_same(_layout_json(plan), "plan")
        self.plan = plan
        self.optimizer = optimizer
        self.mesh = emit.make_mesh(plan, devices)
        self.pipeline: Pipeline | None = None
        self.staged_from: nnx.Module | FunctionModel | None = None
        """A model whose blocks are a Python loop (or a Linen loss function), pipelined as restaged by
        `autoshard.staging` (its structure: what `model()` / `variables()` return and checkpoints store)."""
        self.function: FunctionModel | None = None
        """The plain loss function and its variables, on the function path (`params=`)."""
        self._attention: attention_rewrite.AttentionRewrite | None = None
        """With seq > 1: the loss with the attention the model writes itself run as `ops.attention`."""
        if params is not None and plan.pipeline is not None:  # a loss function over Linen variables, restaged
            self._init_staged_function(model, loss_fn, params, rng)
        elif params is not None:
            self._init_function(model, loss_fn, params, rng)
        else:
            self._init_module(model, loss_fn)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        abstract_opt = jax.eval_shape(optimizer.init, self.params)
        self.opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, self.param_shardings,
                                                   transform_non_params=lambda _: replicated)
        self.opt_state = jax.jit(optimizer.init, out_shardings=self.opt_shardings)(self.params)
        self.ops_context = emit.ops_context(plan, self.mesh)
        self._by_batch: dict[Any, _Programs] = {}
        self._traced: set[Any] = set()  # batch signatures a program has been traced on (`_first_trace`)
        self._activation_specs: dict[Any, dict] = {}
        self.steps_done = 0

    def _init_module(self, model: nnx.Module | Callable[[], nnx.Module], loss_fn: LossFn | None) -> None:
        """Parameters (`self.params`) and non-parameter state (`self.rest`) of an NNX model, laid out by the plan."""
        plan = self.plan
        built = isinstance(model, nnx.Module)
        abstract = model if built else nnx.eval_shape(model)
        if plan.pipeline is not None and protocols.missing(abstract, protocols.StagedModel):
            staging.check_seq(plan.mesh["seq"])
            self.staged_from, user_loss, loss_fn = abstract, loss_fn, None
            factory = model
            model = staging.Staged(model, user_loss) if built else (lambda: staging.Staged(factory(), user_loss))
            abstract = staging.Staged(abstract, user_loss)
        self.loss_fn = loss_fn or _default_loss
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
            self.params = jax.jit(to_stored, out_shardings=self.param_shardings)(self._onto_mesh(params))
            self.rest = jax.device_put(self._onto_mesh(rest), replicated)
        else:  # initialise under jit: weights are born sharded, never whole on one device
            self.params = jax.jit(lambda: to_stored(nnx.state(model(), nnx.Param)),
                                  out_shardings=self.param_shardings)()
            self.rest = jax.jit(lambda: nnx.split(model(), nnx.Param, ...)[2], out_shardings=replicated)()

    def _init_staged_function(self, loss_fn: Callable, unused: Any, variables: Any, rng: jax.Array | None) -> None:
        """A plain loss function over Linen variables under a pipeline: trained as the NNX model
        `staging.LinenStaged` makes of it; `variables()` gives the user's structure back."""
        if unused is not None or isinstance(loss_fn, nnx.Module):
            raise AutoshardError("with params=, pass the loss function itself in the model's place: "
                                 "autoshard.parallelize(loss_fn, optimizer, plan, params=variables)")
        staging.check_seq(self.plan.mesh["seq"])
        self._init_module(staging.LinenStaged(loss_fn, variables, rng), None)
        self.staged_from = FunctionModel(loss_fn, variables)

    def _init_function(self, loss_fn: Callable, unused: Any, variables: Any, rng: jax.Array | None) -> None:
        """Trained parameters and carried state (other collections, the dropout key) of a plain loss function."""
        if unused is not None or isinstance(loss_fn, nnx.Module):
            raise AutoshardError("with params=, pass the loss function itself in the model's place: "
                                 "autoshard.parallelize(loss_fn, optimizer, plan, params=variables)")
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(variables)):
            raise AutoshardError("params= holds shapes only: pass the initialised variables (model.init(...))")
        self.function = FunctionModel(loss_fn, variables, rng)
        self.abstract, self.loss_fn = loss_fn, None
        self.specs = emit.check_plan_against_model(self.plan, self.function.table())
        params, state = self.function.split()
        self.param_shardings = jax.tree_util.tree_map_with_path(
            lambda kp, _: NamedSharding(self.mesh, emit.partition_spec(self.specs[key_path(kp)])), params)
        copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (the step donates: never the caller's arrays)
        self.params = jax.jit(copy, out_shardings=self.param_shardings)(self._onto_mesh(params))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.rest = jax.jit(copy, out_shardings=replicated)(self._onto_mesh({"state": state, "rng": rng}))

    def _onto_mesh(self, tree: Any) -> Any:
        """Arrays committed to other devices (a checkpoint restored on one device) come in through the host."""
        devices = set(self.mesh.devices.flat)

        def via_host(x):
            if not isinstance(x, jax.Array) or x.sharding.device_set == devices:
                return x
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(np.asarray(jax.random.key_data(x)), impl=jax.random.key_impl(x))
            return np.asarray(x)

        return jax.tree.map(via_host, tree)

    def _programs(self, batch: Any) -> "_Programs":
        """The jitted step, step-with-gradients and gradients for batches of this structure and these leaf ranks
        (each leaf laid out by `emit.batch_spec`), built on first use."""
        key = _batch_key(batch)
        if key in self._by_batch:
            return self._by_batch[key]
        self._activation_specs[key] = self._specs_for(batch)
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
                          out_shardings=(replicated, grads)),
            loss=jax.jit(self._forward_loss, in_shardings=(self.param_shardings, replicated, data),
                         out_shardings=replicated))
        self._by_batch[key] = programs
        return programs

    # -- traced functions ---------------------------------------------------------------------------------------
    def _loss(self, params, rest, batch):
        """`_plain_loss`, re-run equation by equation with every activation the plan lays out constrained to its
        layout (`planner.search.activation_specs`), so XLA compiles the program the planner priced."""
        specs = self._activation_specs.get(_batch_key(batch))
        if not specs:
            return self._plain_loss(params, rest, batch)
        # (a lambda: under seq the attention rewrite traces `_plain_loss` itself inside this trace)
        closed, shapes = jax.make_jaxpr(lambda *a: self._plain_loss(*a), return_shape=True)(params, rest, batch)

        def constrained(key, values, position):
            want = specs.get(key, {})
            return [jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, emit.partition_spec(want[k])))
                    if (k := position(j)) in want and len(want[k]) == np.ndim(x) else x for j, x in enumerate(values)]

        outs = jint.eval_jaxpr_hooked(
            jint.open_jaxpr(closed), jax.tree.leaves((params, rest, batch)),
            lambda key, eqn, outs: constrained(key, outs, lambda j: j),
            before=lambda key, eqn, ins: constrained(key, ins, lambda j: -1 - j))
        return jax.tree.unflatten(jax.tree.structure(shapes), outs)

    def _specs_for(self, batch: Any) -> dict:
        """The activation constraints for batches like `batch` (none where the runtime leaves layouts to XLA:
        pipelines, expert parallelism, a scanned layer stack that places its own boundary). Under seq, read off the
        program with its attention dense, as the planner priced it: the ring's or Ulysses' equations have no keys
        (`planner.jax_internals.equation_keys`), so those around them keep theirs."""
        mesh = self.plan.mesh
        if self.pipeline is not None or mesh["expert"] > 1 or self.plan.num_devices == 1:
            return {}
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), self.params)
        rest = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), self.rest)
        data = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), _dtype(x)), batch)
        paths = [key_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        table = self.function.table() if self.function is not None else param_table(self.abstract)
        dims = {"rest": jax.tree.map(lambda _: -1, rest), "batch": jax.tree.map(lambda _: 0, data)}
        with warnings.catch_warnings():  # (what the planner would warn of, it said when it planned)
            warnings.simplefilter("ignore")
            dense = dataclasses.replace(self.ops_context, attention="dense")
            graph = trace(lambda p, inputs: self._plain_loss(p, inputs["rest"], inputs["batch"], dense), params,
                          {"rest": rest, "batch": data}, paths, table, dims)
        if graph.stack == "scan":
            return {}
        try:
            return activation_specs(self.plan, graph)
        except AutoshardError as e:  # a hand-written plan the planner cannot price still trains, as XLA lays it out
            warnings.warn(f"activations left to XLA's layout: {e}", stacklevel=2)
            return {}

    def _plain_loss(self, params, rest, batch, context: ops.OpsContext | None = None):
        """Loss, metrics and the model's non-parameter state after the call (RNG counters, statistics), run under
        `context` (default: the plan's). With seq > 1, attention the model writes itself runs as `ops.attention`
        (`autoshard.attention_rewrite`), so as the plan's ring or Ulysses attention; the rewrite traces this method
        again, which then runs as written, in its caller's context."""
        with ops.context(context or (ops.current() if attention_rewrite.active() else self.ops_context)):
            if self.plan.mesh["seq"] > 1 and not attention_rewrite.active():
                if self._attention is None:  # one instance: it warns once about attention it leaves dense
                    self._attention = attention_rewrite.AttentionRewrite.of_model(self._plain_loss, self.abstract)
                return self._attention(params, rest, batch)
            if self.function is not None:
                key, sub = jax.random.split(rest["rng"]) if rest["rng"] is not None else (None, None)
                loss, metrics, state = self.function.call(params, rest["state"], batch, sub)
                return loss, (metrics, {"state": state, "rng": key})
            model = nnx.merge(self.graphdef, params, rest, copy=True)
            loss, metrics = self.loss_fn(model, batch)
            return loss, (metrics, nnx.split(model, nnx.Param, ...)[2])

    def _value_and_grad(self, params, rest, batch):
        """((loss, (metrics, rest)), grads) of the stored parameters, pipelined when the plan says so."""
        if self.pipeline is not None:
            loss, metrics, grads, rest = self.pipeline.loss_and_grads(params, rest, batch, self.ops_context)
            return (loss, (metrics, rest)), grads
        return jax.value_and_grad(self._loss, has_aux=True)(params, rest, batch)

    def _forward_loss(self, params, rest, batch):
        """The loss alone; a pipeline has no forward-only schedule, so it runs its whole one."""
        if self.pipeline is not None:
            return self.pipeline.loss_and_grads(params, rest, batch, self.ops_context)[0]
        return self._loss(params, rest, batch)[0]

    def _loss_and_grads(self, params, rest, batch):
        (loss, _), grads = self._value_and_grad(params, rest, batch)
        return loss, (self.pipeline.from_staged(grads) if self.pipeline is not None else grads)

    def _train_step(self, params, opt_state, rest, batch, with_grads: bool = False):
        (loss, (metrics, rest)), grads = self._value_and_grad(params, rest, batch)
        if self._activation_specs.get(_batch_key(batch)):  # gradients synced into their parameters' layout, where
            # the planner prices the sync, and the optimizer's update runs in that layout too
            grads = jax.lax.with_sharding_constraint(grads, self.param_shardings)
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
        if jax.process_count() == 1:
            return programs, jax.device_put(jax.tree.map(jnp.asarray, batch), programs.data)
        return programs, self._global_batch(batch, programs.data, size)

    def process_rows(self, batch_size: int) -> np.ndarray:
        """The rows of a global batch of `batch_size` that this process's devices hold, in order (every row in a
        one-process run): what this process's data reader has to read (`autoshard.data.TextData(rows=...)`)."""
        emit.check_batch(self.plan, jax.ShapeDtypeStruct((batch_size,), np.int32))
        sharding = NamedSharding(self.mesh, emit.batch_spec(self.plan, 1))
        held = sharding.addressable_devices_indices_map((batch_size,)).values()
        return np.asarray(sorted({r for index in held for r in range(*index[0].indices(batch_size)[:2])}), np.int64)

    def _global_batch(self, batch: Any, shardings: Any, size: int) -> Any:
        """A multi-process run's global batch: each process hands over only the rows its devices hold
        (`process_rows`; the others may be anything, e.g. the zeros of `TextData(rows=...)`), and
        `jax.make_array_from_process_local_data` assembles the global arrays without moving data between hosts."""
        rows = self.process_rows(size)

        def place(x: Any, sharding: NamedSharding) -> jax.Array:
            if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already a global array
                return jax.device_put(x, sharding)
            local = np.asarray(x)
            return jax.make_array_from_process_local_data(sharding, local[rows] if rows.size < size else local,
                                                          local.shape)

        return jax.tree.map(place, batch, shardings)

    def step(self, batch: Any) -> dict[str, Any]:
        """One optimizer step; returns metrics as Python floats (arrays as lists)."""
        self.params, self.opt_state, self.rest, metrics = self._run(batch, "step", self.params, self.opt_state,
                                                                    self.rest, check=True)
        self.steps_done += 1
        return _floats(metrics)

    def _run(self, batch: Any, program: str, *args: Any, check: bool = False) -> Any:
        """`program` (a `_Programs` field) on `args` and the placed batch, after the model's own check if `check`;
        a batch its loss cannot read is one line (`_first_trace`)."""

        def run():
            if check:
                self._check_inputs(batch)
            programs, placed = self._place(batch)
            return getattr(programs, program)(*args, placed)

        return self._first_trace(batch, run)

    def _first_trace(self, batch: Any, run: Callable[[], Any]) -> Any:
        """`run()`. The first run on a batch of new keys, shapes or dtypes traces the model's loss on it: a key the
        loss lacks or a shape it does not take is then one line naming the batch (`emit.batch_error`), raised
        before any step runs (no weights donated), not an error from inside jax's tracing."""
        signature = _batch_signature(batch)
        if signature in self._traced:
            return run()
        try:
            out = run()
        except emit.TRACE_ERRORS as e:
            raise emit.batch_error(batch, e) from None
        self._traced.add(signature)
        return out

    def _check_inputs(self, batch: Any) -> None:
        """The model's own check of a host batch (`Decoder.check_batch`: token ids inside the vocabulary), if it
        has one: a bad batch is a one-line error, not NaN weights."""
        check = getattr(self.abstract, "check_batch", None) if self.function is None else None
        if callable(check):
            check(batch)

    def fit(self, data: Any, *, steps: int, **options: Any):
        """Train until step `steps` on batches from `data` (`data.next()`, or any iterable): the loop
        `autoshard train` runs, with checkpoints, resume, preemption and metrics (see `autoshard.loop.fit` for the
        options). Returns a `FitResult`."""
        from autoshard.loop import fit

        return fit(self, data, steps=steps, **options)

    def step_with_grads(self, batch: Any) -> tuple[dict[str, Any], nnx.State]:
        """`step`, also returning the gradients it applied (model layout): one compiled program for checks."""
        self.params, self.opt_state, self.rest, metrics, grads = self._run(batch, "step_and_grads", self.params,
                                                                           self.opt_state, self.rest)
        self.steps_done += 1
        return _floats(metrics), grads

    def loss(self, batch: Any) -> float:
        """The loss of `batch` under the plan, updating nothing (no gradients computed, except in a pipeline)."""
        return float(self._run(batch, "loss", self.params, self.rest, check=True))

    def loss_and_grads(self, batch: Any) -> tuple[jax.Array, nnx.State]:
        """Loss and gradients (in the model's layout) under the plan, without updating anything (for checks)."""
        return self._run(batch, "grads", self.params, self.rest)

    def compile(self, batch: Any, *, grads: bool = False):
        """The compiled train step for batches shaped like `batch` (for `autoshard.analysis`); `grads`: the
        program `step_with_grads` runs (the same step, its gradients also returned). A program that already ran
        on such batches is not compiled again."""
        emit.check_batch(self.plan, batch)

        def run():
            programs = self._programs(batch)
            abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), _dtype(x), sharding=s),
                                    batch, programs.data)
            program = programs.step_and_grads if grads else programs.step
            return program.lower(self.params, self.opt_state, self.rest, abstract).compile()

        return self._first_trace(batch, run)

    def model(self) -> nnx.Module:
        """The model with the current (sharded) parameters."""
        if self.function is not None or isinstance(self.staged_from, FunctionModel):
            raise AutoshardError("this trainer runs a plain loss function: its trained values are "
                                 "trainer.variables()")
        return self._model()

    def _model(self) -> nnx.Module:
        if self.pipeline is not None:
            model = nnx.merge(self.graphdef, jax.jit(self.pipeline.from_staged)(self.params), self.rest)
            return model.to_user(self.staged_from) if isinstance(self.staged_from, nnx.Module) else model
        return nnx.merge(self.graphdef, self.params, self.rest)


    def variables(self) -> Any:
        """On the function path: the trained variables in the structure `params=` had (Linen boxes included),
        state collections as the last step left them."""
        if isinstance(self.staged_from, FunctionModel):
            return self.staged_from.rebox(self._model().user_params(), None)
        if self.function is None:
            raise AutoshardError("this trainer runs an NNX model: its trained values are trainer.model()")
        return self.function.rebox(self.params, self.rest["state"])


@dataclasses.dataclass(frozen=True)
class _Programs:
    """The jitted programs of one batch structure, and that batch's shardings."""

    data: Any
    step: Callable
    step_and_grads: Callable
    grads: Callable
    loss: Callable


def _layout_json(plan: Plan) -> str:
    """What a plan lays out (its predictions and provenance may differ between processes that planned alone)."""
    d = plan.to_dict()
    return json.dumps({k: v for k, v in d.items() if k not in ("predicted", "alternatives", "provenance")},
                      sort_keys=True, default=str)


def _batch_key(batch: Any) -> tuple:
    """What a step program depends on in a batch: its structure and each leaf's rank."""
    return jax.tree.structure(batch), tuple(len(np.shape(x)) for x in jax.tree.leaves(batch))


def _batch_signature(batch: Any) -> tuple:
    """What makes jax trace a step program anew: the batch's structure and each leaf's shape and dtype."""
    return jax.tree.structure(batch), tuple((np.shape(x), str(_dtype(x))) for x in jax.tree.leaves(batch))


def _dtype(x: Any) -> Any:
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _floats(metrics: dict[str, jax.Array]) -> dict[str, Any]:
    return {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in jax.device_get(metrics).items()}


def parallelize(model: nnx.Module | Callable, optimizer: optax.GradientTransformation, plan: Plan, *,
                loss_fn: LossFn | None = None, devices: list | None = None, params: Any = None,
                rng: jax.Array | None = None) -> Trainer:
    """Lay out `model` and `optimizer` state by `plan` and build the sharded train step.

    Args:
      model: a built NNX module, or a zero-argument function that builds one (then it is initialised under jit
        directly into its shardings, so models larger than one device fit); or, with `params`, a plain
        `loss_fn(variables, batch[, rng]) -> loss | (loss, aux)` (see `autoshard.functional`).
      optimizer: any optax transformation; its state is laid out like the parameters.
      plan: from `autoshard.plan` or `rule_plan` for this model.
      loss_fn: for an NNX model, `loss_fn(model, batch) -> (loss, metrics)`; default `model.loss(batch)`.
      devices: the devices of the mesh (default: all).
      params: the variables a plain loss function takes, as `model.init` returns them (boxes kept).
      rng: a dropout key for a plain loss function: each step passes a fresh split of it.

    Returns:
      A `Trainer`: `step(batch)` -> metrics; `model()` (NNX) or `variables()` (function path) the trained values.
    """
    return Trainer(model, optimizer, plan, loss_fn=loss_fn, devices=devices, params=params, rng=rng)
