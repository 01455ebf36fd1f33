"""Python entry points that take a model rather than a parameter table."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from autoshard import emit, protocols, staging
from autoshard.emit import batch_size
from planner.cluster import ClusterSpec, load_cluster
from planner.errors import AutoshardError, PlanError
from planner.params import param_table
from planner.plan import AXES, REMAT, PipelineSpec, Plan, normalize_mesh
from planner.rules import ParamInfo, rule_plan as _rule_plan
from planner.search import plan_graph, predict as _predict, trace_model
from planner.seq_expert import op_shapes
from planner.trace import Graph


def rule_plan(model: nnx.Module | Callable, mesh: dict[str, int] | str, *, params: Any = None, **fields) -> Plan:
    """The hand-written strategy for `mesh` (data / ZeRO-3 fsdp / Megatron tensor) applied to `model` (an NNX
    module, or a loss function with its `params` as for `plan`), read from its parameters' logical axis names.

    With `pipe` > 1 and no `pipeline=` given, the layers are split evenly into 1F1B stages over `pipe`
    microbatches (see `pipeline_spec` for the other choices).
    """
    mesh = normalize_mesh(mesh)
    if params is not None:
        from autoshard.functional import FunctionModel

        table = FunctionModel(model, params).table()
        return _rule_plan(table, mesh, provenance=_recorded(table, fields.pop("provenance", None)), **fields)
    if mesh["pipe"] > 1 and fields.get("pipeline") is None:
        fields["pipeline"] = pipeline_spec(model, mesh["pipe"])
    table = param_table(_abstract(model))
    return _rule_plan(table, mesh, provenance=_recorded(table, fields.pop("provenance", None)), **fields)


def _recorded(table: dict[str, ParamInfo], provenance: dict | None) -> dict:
    """A plan's provenance with the model's parameter table (shape, logical axes) that `explain` shows."""
    params = {p: [list(i.shape), list(i.axes) if i.axes else None] for p, i in table.items()}
    return {**(provenance or {}), "params": params}


def pipeline_spec(model: nnx.Module, pipe: int, *, schedule: str = "1f1b", microbatches: int | None = None,
                  virtual: int = 1, stage_layers: list[int] | None = None, stash: bool = True) -> PipelineSpec:
    """A pipeline section for `model` over `pipe` devices: even stages unless `stage_layers` gives each stage's
    layer count (pipe x virtual of them, in stage order), `microbatches` defaulting to `pipe`; `stash=False` makes
    each backward recompute its stage's forward instead of keeping its residuals (less memory, more work)."""
    from autoshard.pipeline import check_pipelinable, even_stages
    from planner.schedule import check

    layers = check_pipelinable(_abstract(model))
    microbatches = microbatches or pipe
    check(schedule, pipe, microbatches, virtual, layers)
    if stage_layers is None:
        stages = even_stages(layers, pipe * virtual)
    else:
        if len(stage_layers) != pipe * virtual or sum(stage_layers) != layers or min(stage_layers) < 1:
            raise AutoshardError(f"--stages {','.join(map(str, stage_layers))} must give {pipe * virtual} positive "
                                 f"layer counts (pipe x virtual) summing to the model's {layers} layers")
        ends = np.cumsum(stage_layers).tolist()
        stages = [[e - n, e] for e, n in zip(ends, stage_layers)]
    return PipelineSpec(stages=stages, microbatches=microbatches, schedule=schedule, virtual=virtual, stash=stash)


def _abstract(model: nnx.Module | Callable[[], nnx.Module]) -> nnx.Module:
    return model if isinstance(model, nnx.Module) else nnx.eval_shape(model)


def local_cluster(num_devices: int | None = None) -> ClusterSpec:
    """A cluster description of the local devices (CPU figures unless a profile calibrates them)."""
    n = num_devices or len(jax.devices())
    return load_cluster(f"cpu:{n}")


def plan(model: nnx.Module | Callable, example_batch: Any, *, params: Any = None, rng: jax.Array | None = None,
         optimizer: optax.GradientTransformation | None = None,
         mesh: jax.sharding.Mesh | dict[str, int] | str | None = None, cluster: ClusterSpec | str | None = None,
         memory_budget: float | None = None, remat: str | None = None, loss_fn: Callable | None = None,
         pin: dict[str, list] | None = None, progress: Callable[[str], None] | None = None,
         provenance: dict | None = None, schedule: str | None = None, microbatches: int | None = None,
         virtual: int | None = None, sequence: str | None = None) -> Plan:
    """The fastest plan for `model` that fits the memory budget, found by the planner's integer program.

    `model` is an NNX module (or a function building one) whose `loss_fn(model, batch) -> (loss, metrics)` defaults
    to `model.loss(batch)`; or, with `params=`, a plain `loss_fn(variables, batch) -> loss | (loss, aux)` over
    `params` (Linen `init` output with its boxes, or any pytree of arrays: see `autoshard.functional`), taking a
    dropout key as third argument when `rng` is given. `optimizer` sizes its state in the memory prediction
    (default: AdamW's two moments, what `autoshard train` runs).

    Pipelines are considered for models with a layer stack (pipe > 1 in the mesh); `schedule` ("gpipe", "1f1b",
    "interleaved"), `microbatches` and `virtual` fix pipeline choices (and restrict the search to pipelines unless
    `mesh` fixes pipe). `sequence` ("ring", "ulysses") fixes the attention of meshes with seq > 1.

    `mesh` fixes some axes (`{"tensor": 8}`, `"tensor=8"`) or, as a `jax.sharding.Mesh`, all of them; `cluster`
    describes the hardware (a preset like `"a100-80g:64"`, a file, or a ClusterSpec; default: the local devices);
    `pin` fixes some parameters' specs (`{"blocks/mlp/w_up": [None, None, "tensor"]}`) and searches the rest.
    """
    if remat is not None and remat not in REMAT:
        raise PlanError(f"remat={remat!r}: use None (the planner decides) or one of {', '.join(map(repr, REMAT))}")
    if isinstance(mesh, jax.sharding.Mesh):
        fixed = {a: int(n) for a, n in mesh.shape.items()}
        fixed = {a: n for a, n in normalize_mesh({a: n for a, n in fixed.items() if a in AXES}).items()}
        cluster = cluster or local_cluster(mesh.size)
    elif mesh is not None:
        fixed = dict(normalize_mesh(mesh)) if isinstance(mesh, str) else dict(mesh)
        fixed = {a: n for a, n in fixed.items() if isinstance(mesh, dict) or n > 1}
    else:
        fixed = {}
    cluster = load_cluster(cluster) if cluster is not None and not isinstance(cluster, ClusterSpec) else cluster
    cluster = cluster or local_cluster()
    pipelined = fixed.get("pipe", 1) > 1 or any(x is not None for x in (schedule, microbatches, virtual))
    # a loss function over variables, and an NNX model unless it is a StagedModel, pipeline only restaged
    # (`autoshard.staging`): their own program's pipelines (a scanned stack's, under its own names) would not run
    restaged = params is not None or bool(protocols.missing(_abstract(model), protocols.StagedModel))

    def search(pipelined: bool, attention: bool) -> tuple[Graph, Plan | None, AutoshardError | None]:
        graph, dtype = _trace(model, example_batch, loss_fn, params, rng, optimizer, attention=attention,
                              pipelined=pipelined)
        recorded = _recorded((graph.unfolded or graph).params, provenance)  # real names, not a folded loop's
        mesh = {**fixed, "pipe": 1} if restaged and not pipelined else fixed
        try:
            return graph, plan_graph(graph, cluster, batch_size(example_batch), mesh=mesh,
                                     memory_budget=memory_budget, remat=remat, progress=progress,
                                     provenance=recorded, compute_dtype=dtype, pin=pin, schedule=schedule,
                                     microbatches=microbatches, virtual=virtual, sequence=sequence), None
        except AutoshardError as e:
            if "no plan fits" not in str(e):
                raise
            return graph, None, e

    graph, best, error = search(pipelined, fixed.get("seq", 1) > 1)
    for axis in _restaged_axes(graph, fixed, pipelined, best, cluster, restaged):
        try:
            _, alternative, _ = search(axis == "pipe", axis == "seq")
        except AutoshardError:  # the model cannot be restaged for this axis: the plan without it stands
            continue
        if alternative is not None and alternative.mesh[axis] > 1 and (
                best is None or alternative.predicted["step_seconds"] < best.predicted["step_seconds"]):
            best = alternative
    if best is None:
        raise error
    return best


def _restaged_axes(graph: Graph, fixed: dict[str, int], pipelined: bool, best: Plan | None, cluster: ClusterSpec,
                   restaged: bool = False) -> list[str]:
    """Axes a user's model gets only through a restaged program (`autoshard.staging` for pipe: blocks in a Python
    loop, NNX or Linen, or an NNX model's scanned stack (`restaged`: its own program's
    pipelines would not run); `autoshard.attention_rewrite` for seq: attention written by hand),
    worth a second search when memory calls for them (no plan fits, or the best one recomputes its layers) or the
    cluster spans several nodes. An axis the mesh fixes is not searched again, nor one the traced program already
    offers."""
    if best is not None and best.remat == "none" and cluster.num_nodes <= 1:
        return []
    out = []
    if "pipe" not in fixed and not pipelined and (
            graph.stack == "loop" or restaged and graph.stack == "scan"):
        out.append("pipe")
    if "seq" not in fixed and not op_shapes(graph).has_attention:
        out.append("seq")
    return out


def _trace(model: Any, example_batch: Any, loss_fn: Callable | None, params: Any, rng: Any,
           optimizer: optax.GradientTransformation | None = None, attention: bool = False,
           pipelined: bool = False) -> tuple[Graph, str]:
    """The traced graph of an NNX model or (with `params`) a plain loss function, priced for `optimizer`'s state
    (default: AdamW's), and its compute dtype. With `attention` (a mesh with seq > 1: only then does the runtime
    rewrite it), attention the model writes itself is traced as the `ops.attention` it will run as
    (`autoshard.attention_rewrite`); other plans keep the model's own program, which is what they compile.
    `pipelined` (a plan with a pipeline): an NNX model whose blocks are a Python loop is traced as the
    `autoshard.staging.Staged` model the trainer will pipeline."""
    try:
        graph, trained = _trace_graph(model, example_batch, loss_fn, params, rng, attention, pipelined)
    except emit.TRACE_ERRORS as e:  # a batch the model's loss cannot read: one line naming it
        raise emit.batch_error(example_batch, e) from None
    if optimizer is not None:
        graph.with_optimizer(optimizer_copies(optimizer, trained))
    return graph, graph.compute_dtype()


def _trace_graph(model: Any, example_batch: Any, loss_fn: Callable | None, params: Any, rng: Any, attention: bool,
                 pipelined: bool) -> tuple[Graph, Any]:
    """`_trace`'s graph, and the trained weights (shapes) the optimizer state is priced for."""
    rewrite = _attention_rewrite(model) if attention else None
    if params is not None and loss_fn is None and not isinstance(model, nnx.Module) and pipelined:
        staging.check_seq(2 if attention else 1)
        model, params = _linen_staged(model, params, rng, example_batch), None  # traced as the NNX model it trains as
    if params is not None:
        from autoshard.functional import FunctionModel, trace

        if loss_fn is not None or isinstance(model, nnx.Module):
            raise AutoshardError("with params=, pass the loss function itself as the model: "
                                 "autoshard.plan(loss_fn, batch, params=variables)")
        function = FunctionModel(model, params, rng)
        graph = trace(function, example_batch, rewrite)
        trained = function.abstract().split()[0]
    else:
        abstract = _abstract(model)
        if pipelined and protocols.missing(abstract, protocols.StagedModel):
            staging.check_seq(2 if attention else 1)
            staged = staging.Staged(abstract, loss_fn)
            staged.check_cut(abstract, example_batch)
            abstract, loss_fn = staged, None
        graph = trace_model(abstract, example_batch, loss_fn, rewrite=rewrite)
        trained = nnx.state(abstract, nnx.Param)
    return graph, trained


def _linen_staged(loss_fn: Callable, variables: Any, rng: Any, example_batch: Any) -> nnx.Module:
    """A plain loss function over Linen variables restaged for a pipeline (`staging.LinenStaged`, on shapes)."""
    from autoshard.functional import FunctionModel

    abstract = FunctionModel(loss_fn, variables).abstract().variables
    staged = staging.LinenStaged(loss_fn, abstract, rng)
    staged.check_cut(abstract, example_batch)
    return staged


def _attention_rewrite(model: Any) -> Callable[[Callable], Callable]:
    """What wraps the traced loss so that hand-written attention is planned as `ops.attention`."""
    from autoshard.attention_rewrite import AttentionRewrite

    return lambda fn: AttentionRewrite.of_model(fn, model)


def optimizer_copies(optimizer: optax.GradientTransformation, params: Any) -> float:
    """How many copies of the parameters `optimizer` keeps as state (Adam 2, momentum 1, SGD 0): its state's array
    bytes over the parameters' (scalars such as step counts do not count)."""
    nbytes = lambda tree: sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize  # noqa: E731
                              for x in jax.tree.leaves(tree) if hasattr(x, "shape") and x.shape)
    state = jax.eval_shape(optimizer.init, jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params))
    total = nbytes(params)
    return nbytes(state) / total if total else 0.0


def predict(plan: Plan, model: nnx.Module | Callable, example_batch: Any, cluster: ClusterSpec | str | None = None,
            loss_fn: Callable | None = None, *, params: Any = None, rng: jax.Array | None = None,
            optimizer: optax.GradientTransformation | None = None) -> dict[str, Any]:
    """The planner's predictions (time, memory, communication) for a given plan, e.g. a hand-written one; `model`,
    `loss_fn`, `params`, `rng` and `optimizer` as for `plan`."""
    graph, dtype = _trace(model, example_batch, loss_fn, params, rng, optimizer, attention=plan.mesh["seq"] > 1,
                          pipelined=plan.pipeline is not None)
    cluster = load_cluster(cluster) if isinstance(cluster, str) else (cluster or local_cluster(plan.num_devices))
    return _predict(plan, graph, cluster, dtype)


def plan_function(loss_fn: Callable[[Any, Any], Any], params: Any, example_batch: Any, **kwargs) -> Plan:
    """`plan(loss_fn, example_batch, params=params, **kwargs)`: the function path under its earlier name."""
    return plan(loss_fn, example_batch, params=params, **kwargs)
