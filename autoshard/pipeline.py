"""Pipeline parallelism: a `shard_map` program over the `pipe` axis that runs a static schedule table.

A model pipelines when it comes in three parts (`autoshard.protocols.StagedModel`, as `models.decoder.Decoder`):

- `model.embed_inputs(batch) -> x`: the first stage's prologue (embedding);
- `model.blocks`: an NNX module whose parameters are stacked on a leading layers axis; called on one layer's slice
  it maps `x -> (x, aux)`, aux None or an `ops.MoEStats` (MoE layers: the model is then an
  `autoshard.protocols.MoEModel`, with the `aux_loss_weight` of its balancing loss);
- `model.head_loss(x, batch) -> (loss, metrics)`: the last stage's epilogue (final norm, head, loss).

Layer parameters live in a *staged layout* [P, V, Lmax, ...]: device p holds chunk v of stage s = v*P + p, padded to
the longest stage (padded layers are skipped, their weights stay zero, their gradients are zero). The rest of the
parameters (embedding, head, norms) are replicated over `pipe`; only the stages that use them contribute gradients.

Each step runs inside one `shard_map` that is manual over `pipe`, the batch axes (`expert`, `data`, `fsdp`) and
`seq` (those of size > 1) and leaves `tensor` to XLA's partitioner, so tensor parallelism inside a stage composes
unchanged. `seq` and `expert` are manual here because jax 0.10 cannot differentiate a shard_map nested in a
partially manual one: the attention and MoE ops see them manual (`sequence.is_manual`) and run their per-device
bodies directly, on the local sequence block (positions offset by `ops.positions`) and the local experts. The local
batch is cut into M microbatches; at every tick each device looks up its op in the table and runs it under
`lax.switch` (idle, forward, first-stage forward, last-stage forward, backward, last-stage backward, first-stage
backward, and zb's weight gradients: `_DeviceProgram`), then activations move to the next device and cotangents
to the previous one with `ppermute`, on the ticks where some device sends one. Collectives of the ops inside the
switch run on devices of one stage only; on XLA:CPU a ppermute there would deadlock, so the sequence ops build
theirs from all-to-alls (`sequence.ppermute_deadlocks`). A forward tick keeps its stage's `jax.vjp` residuals (the
closure's leaves, weights left out: `_Stash`) in a residual slot until its backward tick, which then runs the
backward alone: the step does the unpipelined step's work (runs/benchmarks/pipeline_efficiency.md). The last
stage's forward is then an op of its own too (FWD_LAST: its output kept where its input was, for its backward:
the head, loss and backward). In modes "recompute" and "full" (`planner.schedule.stashes`) a backward recomputes
its stage's forward from the stage input instead, only stage inputs are kept, and the last stage's forward tick is
empty: its backward runs its forward through the head and loss. Either way a device holds as many slots as the
table says, which is what makes 1F1B lighter than GPipe. Parameters are made varying over the batch and seq axes
once before the loop, so the gradient reduction is one all-reduce after it, not one per tick (expert weights, split
over `expert`, are not summed over it). Parameters sharded over fsdp are gathered by XLA once per step on entry
(inside a pipeline fsdp behaves like ZeRO-2: it shards optimizer state, not live weights).

The loss is the mean over all tokens: each device's head loss is a mean over its tokens (its sequences, or its
block of each sequence under seq), all of equal count, scaled by 1 / (microbatches x shards). MoE layers' balancing
loss is not such a mean (E * sum_e f_e p_e, both over the whole batch), so for MoE models a forward-only sweep over
the same table first counts every layer's expert assignments over the whole batch; the step then differentiates
sum_e c_e * prob_sum_e per microbatch with those global counts in c, which is exactly the whole-batch loss's
gradient (f carries none), and reports the whole-batch balancing loss, dropped tokens and expert loads. Under
GPipe every forward tick comes before every backward one, so the sweep is the forward phase itself: the main table
then runs only the backward ticks, from the activations and residuals the sweep kept (a stage's forward does not
need the counts: it returns the probability sums, whose cotangent is the coefficient), the last stage's too (its
output kept where its input was): moe-tiny pipe=2 does the unpipelined step's FLOPs over the devices, against
1.34x with a separate sweep and recompute. Under 1F1B and interleaved schedules a stage's first backward
comes before the batch's last forward, so the counts are not complete in time: the sweep stays there and costs one
more forward of every layer per step (1.20x).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from autoshard import emit, ops, protocols
from planner.jax_internals import (BackwardSplit, eval_jaxpr, split_backward, split_on_last_input,
                                   varying_axes)
from planner.errors import PlanError
from planner.params import path_str
from planner.plan import BATCH_AXES, Plan, SpecEntry
from planner.rules import ParamInfo
from planner.schedule import (BWD, BWD_FIRST, BWD_LAST, FWD, FWD_FIRST, FWD_LAST, WGT, Schedule, check,
                              make_schedule, pipeline_mode, receive_permutations, stashes)

LAYERS = "blocks"
"""Attribute (and state-path prefix) of the stacked layer module a pipelinable model exposes."""
PRE_LAST = 3
"""Op code of the last stage's forward in the statistics sweep (FWD_LAST in the main table, or without the stash
folded into its backward); the sweep's other codes are IDLE, FWD and FWD_FIRST."""


def is_layer_param(path: str) -> bool:
    return path == LAYERS or path.startswith(LAYERS + "/")


def check_pipelinable(model: nnx.Module) -> int:
    """The number of stacked layers; a one-line error when the model lacks the three pipeline parts."""
    lacks = protocols.missing(model, protocols.StagedModel)
    if lacks:
        raise PlanError(f"{type(model).__name__} cannot be pipelined: it lacks {', '.join(lacks)} (a pipelinable "
                        f"model has embed_inputs(batch), stacked layers in .{LAYERS}, and head_loss(x, batch): "
                        f"autoshard.protocols.StagedModel)")
    leaves = jax.tree.leaves(nnx.state(getattr(model, LAYERS), nnx.Param))
    if not leaves:
        raise PlanError(f"{type(model).__name__}.{LAYERS} has no parameters to split into pipeline stages")
    return int(np.shape(leaves[0])[0])


def even_stages(layers: int, stages: int) -> list[list[int]]:
    """Contiguous [start, end) ranges, as even as possible (earlier stages take the remainder)."""
    if stages > layers:
        raise PlanError(f"{stages} pipeline stages but the model has only {layers} layers: use fewer stages "
                        f"(pipe x virtual <= layers)")
    base, extra = divmod(layers, stages)
    out, start = [], 0
    for s in range(stages):
        end = start + base + (1 if s < extra else 0)
        out.append([start, end])
        start = end
    return out


@dataclasses.dataclass(frozen=True)
class StageLayout:
    """Where each layer lives in the staged layout [P, V, Lmax]."""

    index: np.ndarray
    """[P, V, Lmax]: the model layer held at each position, -1 for padding."""
    counts: np.ndarray
    """[P, V]: layers in each (device, chunk) stage."""

    @classmethod
    def from_stages(cls, stages: list[list[int]], devices: int, virtual: int) -> "StageLayout":
        lmax = max(end - start for start, end in stages)
        index = np.full((devices, virtual, lmax), -1, np.int32)
        counts = np.zeros((devices, virtual), np.int32)
        for s, (start, end) in enumerate(stages):
            v, p = divmod(s, devices)
            index[p, v, : end - start] = np.arange(start, end)
            counts[p, v] = end - start
        return cls(index, counts)

    @property
    def even(self) -> bool:
        return bool(np.all(self.index >= 0))

    @property
    def positions(self) -> np.ndarray:
        """[L]: the flat staged position of each model layer."""
        flat = self.index.reshape(-1)
        pos = np.zeros(int(flat.max()) + 1, np.int32)
        pos[flat[flat >= 0]] = np.nonzero(flat >= 0)[0]
        return pos

    def to_staged(self, x: jax.Array) -> jax.Array:
        """[L, ...] -> [P, V, Lmax, ...] (padding zero)."""
        idx = jnp.asarray(np.maximum(self.index, 0))
        staged = jnp.take(x, idx, axis=0)
        if self.even:
            return staged
        mask = jnp.asarray(self.index >= 0).reshape(self.index.shape + (1,) * (x.ndim - 1))
        return jnp.where(mask, staged, jnp.zeros((), x.dtype))

    def from_staged(self, x: jax.Array) -> jax.Array:
        """[P, V, Lmax, ...] -> [L, ...]."""
        flat = x.reshape((-1,) + x.shape[3:])
        return jnp.take(flat, jnp.asarray(self.positions), axis=0)


class Pipeline:
    """The pipelined loss-and-gradients of one model under one plan (built once; traced inside the train step)."""

    def __init__(self, plan: Plan, abstract: nnx.Module, mesh: jax.sharding.Mesh, loss_fn: Callable | None = None):
        spec = plan.pipeline
        assert spec is not None
        if loss_fn is not None:
            raise PlanError("a custom loss_fn cannot be pipelined: put the loss in the model's head_loss")
        layers = check_pipelinable(abstract)
        self.P, self.V, self.M = plan.mesh["pipe"], spec.virtual, spec.microbatches
        check(spec.schedule, self.P, self.M, self.V, layers)
        if spec.stages[-1][1] != layers:
            raise PlanError(f"pipeline stages cover layers [0, {spec.stages[-1][1]}) but the model has {layers} "
                            f"layers: re-plan for this model")
        self.plan, self.mesh, self.layers, self.abstract = plan, mesh, layers, abstract
        self.stash = stashes(pipeline_mode(plan.remat, spec.stash))
        """Forward ticks keep their residuals for the backward ticks (`planner.schedule.stashes`)."""
        self.schedule: Schedule = make_schedule(spec.schedule, self.P, self.M, self.V, self.stash)
        self.layout = StageLayout.from_stages(spec.stages, self.P, self.V)
        self.batch_axes = tuple(a for a in BATCH_AXES if plan.mesh[a] > 1)
        """expert (major), data, fsdp: the batch split of `emit.batch_spec`."""
        self.seq_axes = ("seq",) if plan.mesh["seq"] > 1 else ()
        self.reduce_axes = self.batch_axes + self.seq_axes
        """Axes the loss and gradients are summed over (each device holds a different part of the tokens)."""
        self.manual = ("pipe",) + self.reduce_axes
        """Manual axes of the executor: size-1 axes stay automatic (nested shard_maps of the ops need that)."""
        self.graphdef, self.param_template, _ = nnx.split(abstract, nnx.Param, ...)
        self.blocks_graphdef, self.blocks_template, self.blocks_rest = nnx.split(getattr(abstract, LAYERS),
                                                                                 nnx.Param, ...)
        """The blocks' weights and their other state (RNG streams stacked per layer: `stream_state`)."""

    def call_block(self, block: nnx.Module, x: jax.Array) -> tuple[jax.Array, Any]:
        """(y, aux) of one layer: the model's own way of calling a block where it has one (`call_block`, as
        `autoshard.staging.Staged`: the loss's other block arguments), and a block returning y alone has aux None."""
        call = getattr(self.abstract, "call_block", None)
        out = call(block, x) if call is not None else block(x)
        return out if isinstance(out, tuple) else (out, None)

    # -- layouts ------------------------------------------------------------------------------------------------
    def staged_table(self, table: dict[str, ParamInfo]) -> dict[str, ParamInfo]:
        """The parameter table in the staged layout (layer parameters [P, V, Lmax, ...])."""
        lmax = self.layout.index.shape[2]
        return {path: dataclasses.replace(info, shape=(self.P, self.V, lmax) + info.shape[1:],
                                          axes=("pipe", None, "layers") + info.axes[1:] if info.axes else None)
                if is_layer_param(path) else info for path, info in table.items()}

    def staged_specs(self, specs: dict[str, list[SpecEntry]]) -> dict[str, list[SpecEntry]]:
        """Plan specs (for the model's [L, ...] arrays) -> specs of the staged arrays; `pipe` only on dim 0."""
        out = {}
        for path, spec in specs.items():
            if any("pipe" in (e if isinstance(e, list) else [e]) for e in (spec[1:] if is_layer_param(path) else spec)):
                raise PlanError(f"spec {spec} of {path} uses the pipe axis: only the layers dimension of a layer "
                                f"parameter can be split into pipeline stages")
            out[path] = (["pipe", None, None] + list(spec[1:])) if is_layer_param(path) else list(spec)
        return out

    def to_staged(self, params: nnx.State) -> nnx.State:
        """Model-layout parameters (or gradients, or anything shaped like them) -> the staged layout."""
        return nnx.map_state(lambda path, v: v.replace(self.layout.to_staged(v.get_value()))
                             if is_layer_param(path_str(path)) else v, params)

    def from_staged(self, params: nnx.State) -> nnx.State:
        return nnx.map_state(lambda path, v: v.replace(self.layout.from_staged(v.get_value()))
                             if is_layer_param(path_str(path)) else v, params)

    # -- the step -----------------------------------------------------------------------------------------------
    def loss_and_grads(self, params: nnx.State, rest: nnx.State, batch: dict[str, jax.Array],
                       ops_context: ops.OpsContext) -> tuple[jax.Array, dict[str, jax.Array], nnx.State, nnx.State]:
        """(loss, metrics, grads, rest after the step) of the staged parameters over the global batch: the model's
        RNG streams one draw further (`_advance_streams`)."""
        flat = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(params)}
        layer_paths = sorted(p for p in flat if is_layer_param(p))
        other_paths = sorted(p for p in flat if not is_layer_param(p))
        own = {p: self._own_axes(p) for p in flat}
        batch_spec = emit.batch_specs(self.plan, batch)  # the layout the trainer placed each leaf in
        metric_names, moe = self._probe(rest, batch)

        def body(layer_vals, other_vals, rest, batch, tables):
            return self._body(dict(zip(layer_paths, layer_vals)), dict(zip(other_paths, other_vals)), rest, batch,
                              tables, metric_names, ops_context, own, moe)

        tables = self._tables(sweep=moe is not None)
        spec_of = lambda p: PartitionSpec(*own[p]) if own[p] else PartitionSpec()  # noqa: E731
        moe_specs = (PartitionSpec("pipe"),) * 3 if moe else ()
        fn = jax.shard_map(body, mesh=self.mesh, axis_names=set(self.manual),
                           in_specs=([spec_of(p) for p in layer_paths], [spec_of(p) for p in other_paths],
                                     PartitionSpec(), batch_spec, PartitionSpec()),
                           out_specs=(PartitionSpec(), {k: PartitionSpec() for k in metric_names},
                                      [spec_of(p) for p in layer_paths], [spec_of(p) for p in other_paths], moe_specs))
        loss, metrics, g_layers, g_other, moe_out = fn([flat[p] for p in layer_paths],
                                                       [flat[p] for p in other_paths], rest, batch, tables)
        if moe:
            loss, metrics = self._moe_loss(loss, metrics, moe, *moe_out)
        grads_flat = {**dict(zip(layer_paths, g_layers)), **dict(zip(other_paths, g_other))}
        grads = _rebuild(params, grads_flat)
        return loss, metrics, grads, _advance_streams(rest)

    def _own_axes(self, path: str) -> tuple:
        """The executor's in_spec of a parameter: its staged spec reduced to the axes it splits manually (`pipe`
        for layer parameters, `expert` for expert weights); the other axes are gathered on entry by XLA (fsdp:
        ZeRO-2-like inside a pipeline) or stay automatic (tensor)."""
        spec = self.plan.params.get(path)
        entries = (["pipe", None, None] + list(spec[1:] if spec else [])) if is_layer_param(path) else list(spec or [])
        keep = {"pipe"} | ({"expert"} if "expert" in self.manual else set())
        out = []
        for e in entries:
            kept = tuple(a for a in ((e,) if isinstance(e, str) else (e or ())) if a in keep)
            out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
        while out and out[-1] is None:
            out.pop()
        return tuple(out)

    def _tables(self, sweep: bool) -> dict[str, Any]:
        s = self.schedule
        names = ("code", "chunk", "microbatch", "in_slot", "cot_slot", "recv_act", "recv_cot") \
            + (("stash_slot",) if self.stash else ()) + (("grad_slot",) if s.w_ticks is not None else ())
        # per tick, whether some device sends a stage input / a cotangent (`Schedule.sends`): the same on every
        # device, so a tick's ppermute runs only where one moves something
        flags = {"send_act": s.sends[:, 0], "send_cot": s.sends[:, 1]}
        if not sweep:
            return {**{name: jnp.asarray(getattr(s, name)) for name in names},
                    **{k: jnp.asarray(v) for k, v in flags.items()}}
        # the forward-only sweep for layer statistics (MoE): the forward ticks in the same order, with the last
        # stage's forward (FWD_LAST in the main table, or IDLE there without the stash) as PRE_LAST
        rows = np.nonzero(np.any(s.phase == 1, axis=1))[0]
        code = np.where(s.phase == 1, np.where((s.code == 0) | (s.code == FWD_LAST), PRE_LAST, s.code), 0)
        pre = {"code": jnp.asarray(code[rows]), **{name: jnp.asarray(getattr(s, name)[rows]) for name in
                                                   ("chunk", "microbatch", "in_slot", "recv_act")
                                                   + (("stash_slot",) if self.stash else ())}}
        # where every forward tick comes before every backward one (GPipe), the sweep IS the forward phase: the
        # main table keeps only the backward ticks and starts from the activations the sweep received
        rest = s.forward_ticks if s.forwards_first else 0
        return {"pre": pre, **{name: jnp.asarray(getattr(s, name)[rest:]) for name in names},
                **{k: jnp.asarray(v[rest:]) for k, v in flags.items()}}

    def _probe(self, rest, batch) -> tuple[tuple[str, ...], dict[str, Any] | None]:
        """Scalar metric names of `head_loss`, and what the layers' auxiliary output is (traced on the global
        shapes): None, or for MoE layers (`ops.MoEStats`) the expert count and the balancing loss weight."""
        def probe(params, rest, batch):
            model = nnx.merge(self.graphdef, params, rest, copy=True)
            x = model.embed_inputs(batch)
            graphdef, stacked = nnx.split(getattr(model, LAYERS))
            _, aux = self.call_block(nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked)), x)
            return model.head_loss(x, batch)[1], aux

        shapes, aux = jax.eval_shape(probe, self.param_template, rest, batch)
        bad = [k for k, v in shapes.items() if v.shape != ()]
        if bad:
            raise PlanError(f"head_loss metric {bad[0]!r} is not a scalar: pipelined steps average scalar metrics "
                            f"over microbatches")
        names = tuple(sorted(shapes))
        if aux is None:
            return names, None
        if not isinstance(aux, ops.MoEStats) or aux.prob_sum is None:
            raise PlanError(f"{LAYERS} returns an auxiliary output of type {type(aux).__name__}: a pipeline carries "
                            f"only ops.MoEStats (from ops.moe) between stages")
        if self.seq_axes:
            raise PlanError(f"pipe={self.P} with seq={self.plan.mesh['seq']} cannot run MoE layers (their routing "
                            f"groups are whole sequences): use seq=1 in a pipeline, or no pipeline")
        if protocols.missing(self.abstract, protocols.MoEModel):
            raise PlanError(f"{type(self.abstract).__name__} has MoE layers but no aux_loss_weight: a pipeline adds "
                            f"aux_loss_weight x the mean balancing loss over layers, as Decoder.loss does "
                            f"(autoshard.protocols.MoEModel)")
        return names, {"experts": int(aux.load.shape[-1]), "weight": float(self.abstract.aux_loss_weight)}

    def _moe_loss(self, ce: jax.Array, metrics: dict[str, jax.Array], moe: dict[str, Any], aux: jax.Array,
                  load: jax.Array, dropped: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The loss and metrics of `Decoder.loss` from the whole batch's per-layer balancing loss, expert loads and
        dropped assignments (staged [P, V, Lmax, ...])."""
        stats = ops.MoEStats(*(self.layout.from_staged(a) for a in (aux, dropped, load)))    # [L, ...]
        extra = ops.moe_metrics(stats)
        return ce + moe["weight"] * extra["moe_aux_loss"], {**metrics, **extra}

    def _body(self, layers: dict[str, jax.Array], other: dict[str, jax.Array], rest: nnx.State,
              batch: dict[str, jax.Array], tables: dict[str, Any], metric_names: tuple[str, ...],
              ops_context: ops.OpsContext, own: dict[str, tuple], moe: dict[str, Any] | None):
        """The executor's shard_map body: this device's ticks (`_DeviceProgram`), then the gradients, loss and
        metrics summed over the devices that hold different parts of them."""
        program = _DeviceProgram(self, layers, other, rest, batch, tables, metric_names, ops_context, moe)
        g_layers, g_other, sums, moe_out = program.run()

        def reduce(g, path, axes):  # a weight split over a manual axis (expert) is not summed over it
            axes = tuple(a for a in axes if a not in _axes_of(own[path]))
            return jax.lax.psum(g, axes) if axes else g

        g_layers = [reduce(g, p, self.reduce_axes)[None] for g, p in zip(g_layers, program.layer_paths)]
        g_other = [reduce(g, p, self.manual) for g, p in zip(g_other, program.other_paths)]
        sums = [jax.lax.psum(s, self.manual) for s in sums]
        return sums[0], dict(zip(metric_names, sums[1:])), g_layers, g_other, moe_out


_Acc = tuple[list[jax.Array], list[jax.Array], list[jax.Array]]
"""What the ticks accumulate: layer gradients ([V, Lmax, ...] each), other gradients, and the loss and metric sums."""


class _DeviceProgram:
    """What one device of the pipe axis runs, traced once inside the executor's shard_map (`Pipeline._body`): its
    layer chunks as functions of their weights, the MoE statistics sweep, and the scan over the schedule table's
    ticks, where `lax.switch` runs this device's op of each tick.

    Every tick op (a branch: `idle`, `fwd` (the last stage's too), `fwd_first`, `bwd`, `bwd_last`, `bwd_first`,
    zb's `wgt`) maps (chunk c,
    microbatch i, stage input h, output cotangent g, accumulators, kept slots) to (the activation sent to the next
    device, the cotangent sent to the previous one, accumulators, kept slots): the one signature `lax.switch` needs,
    with zeros where an op sends nothing. Kept slots are the residuals of the tick's stash slot and (zb) what a B
    saves for its W in the tick's grad slot (`kept_slot`)."""

    def __init__(self, pipeline: Pipeline, layers: dict[str, jax.Array], other: dict[str, jax.Array],
                 rest: nnx.State, batch: dict[str, jax.Array], tables: dict[str, Any], metric_names: tuple[str, ...],
                 ops_context: ops.OpsContext, moe: dict[str, Any] | None):
        self.pipeline, self.schedule, self.tables, self.rest = pipeline, pipeline.schedule, tables, rest
        self.metric_names, self.ops_context, self.moe = metric_names, ops_context, moe
        self.V, self.M, self.vary = pipeline.V, pipeline.M, pipeline.manual
        self.zb = self.schedule.w_ticks is not None
        # Varying over every manual axis up front: the vjp of a device-invariant weight against batch-varying
        # activations would otherwise psum inside every tick (jax-idioms.md, pcast).
        self.layers = {k: _vary_all(v[0], self.vary) for k, v in layers.items()}              # [V, Lmax, ...]
        self.other = {k: _vary_all(v, self.vary) for k, v in other.items()}
        self.me = jax.lax.axis_index("pipe")
        self.counts = jnp.asarray(pipeline.layout.counts)[self.me]                          # [V]
        self.micro = self._microbatches(batch)
        # loss = mean over microbatches and shards: with seq, each device's loss is the mean over its block of
        # every sequence, blocks of equal size, so the mean of the block means is the mean over all tokens
        self.n_shards = math.prod(pipeline.plan.mesh[a] for a in pipeline.reduce_axes)
        self.scale = 1.0 / (self.M * self.n_shards)
        # MoE statistics from the expert-parallel op are already sums over the expert group
        self.group = pipeline.plan.mesh["expert"] if "expert" in self.vary else 1
        self.layer_paths, self.other_paths = sorted(self.layers), sorted(self.other)
        with ops.context(ops_context):  # the plan's remat: the trainer calls the executor outside its context
            self.step_layer = ops.remat(self.layer_fn)
        self.e = moe["experts"] if moe else 0
        # activation specs name only automatic axes here (seq, tensor): without them XLA may move the sequence
        # split of the stage input onto its batch dimension, which the attention ops' shard_maps cannot take
        self.local_specs = {k: _drop_axes(v, self.vary) for k, v in ops_context.activations.items()}
        # What moves between stages has the plan's layer_input layout (its automatic axes): pinned on the
        # sends, so the bytes a tick transfers do not depend on how XLA propagates the embedding's layout.
        self.carried = self.local_specs.get("layer_input")
        self.coef = None
        """MoE: the balancing loss's coefficient of each layer's router probability sums [V, Lmax, E] (`_sweep`)."""
        self.layer_rest = rest[LAYERS] if LAYERS in rest else None
        """The blocks' RNG streams, stacked [L] (`layer_streams`)."""
        self.layer_at = jnp.asarray(np.maximum(pipeline.layout.index, 0))[self.me]          # [V, Lmax]
        batch_axes = pipeline.batch_axes
        self.first_mb = jax.lax.axis_index(batch_axes) * self.M if batch_axes else 0
        """The global index of this device's first microbatch (its batch shard's), for the dropout keys."""

    def run(self) -> tuple[list[jax.Array], list[jax.Array], list[jax.Array], tuple]:
        """(layer gradients, other gradients, loss and metric sums, the MoE sweep's staged outputs) of this
        device's ticks, not yet summed over the devices."""
        with ops.context(dataclasses.replace(self.ops_context, activations=self.local_specs)):
            self._probe_stage()
            swept, swept_bufs, moe_out = self._sweep() if self.moe is not None else (None, [], ())
            g_layers, g_other, sums = self._scan(swept, swept_bufs)
        return g_layers, g_other, sums, moe_out

    def _microbatches(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The local batch cut into M microbatches ([M, batch / M, ...] each leaf)."""
        local_batch = jax.tree.leaves(batch)[0].shape[0]
        if local_batch % self.M:
            raise PlanError(f"{self.M} microbatches do not divide the per-replica batch of {local_batch} (global "
                            f"batch / expert x data x fsdp): change --microbatches or --batch")
        mbs = local_batch // self.M
        return jax.tree.map(lambda v: v.reshape((self.M, mbs) + v.shape[1:]), batch)

    def _probe_stage(self) -> None:
        """The stage input's type, the transfers' permutations, and the structure of what a forward keeps for its
        backward, each found once before the ticks."""
        self.other_list = [self.other[p] for p in self.other_paths]
        self.x_shape = jax.eval_shape(lambda o: self.model_of(dict(zip(self.other_paths, o))).embed_inputs(self.mb(0)),
                                      self.other_list)
        self.zero_x = self.varying(self.x_shape.shape, self.x_shape.dtype)
        self.fwd_pairs, self.bwd_pairs = receive_permutations(self.pipeline.P, self.V)
        # residuals kept from each forward for its backward (`stashes`): their structure, probed once
        c0 = self.tables["chunk"][0][self.me]
        self.stash = _Stash.probe(self.stage_fn, self.chunk_of(0), c0, self.zero_x) if self.pipeline.stash else None
        # zb: the backward cut into B (the input gradient) and W (the weight gradients), which shares what
        # it needs from B through grad slots (`_Split`)
        self.split = _Split.probe(self.stash, self.chunk_of(0), c0, self.zero_x, self.stage_fn, self.varying) \
            if self.zb else None
        self.n_kept = len(self.stash.shapes) if self.stash is not None else 0

    # -- the model's parts on this device's weights -------------------------------------------------------------
    def model_of(self, other_vals: dict[str, jax.Array], i: jax.Array | int = 0) -> nnx.Module:
        """The whole model on this device's non-layer weights (its layer weights are never called), its RNG
        streams those of microbatch i (`stream_state`)."""
        p = self.pipeline
        rest = stream_state(self.rest, lambda a: a, (self.first_mb + i,), skip=LAYERS)
        return nnx.merge(p.graphdef, _rebuild(p.param_template, {**self.layers, **other_vals}), rest, copy=True)

    def layer_streams(self, where: jax.Array) -> nnx.State:
        """The RNG streams of one layer for one microbatch: `where` = [model layer, global microbatch]."""
        layer, g = where[0], where[1]
        return stream_state(self.layer_rest, lambda a: a[layer], (g, layer))

    def where(self, c: jax.Array, j: jax.Array) -> jax.Array:
        """[model layer, global microbatch] of layer j of work unit c (`unit`): what a layer's dropout keys derive
        from, so that a backward that recomputes its forward draws the same masks."""
        return jnp.stack([self.layer_at[self.chunk(c), j], self.first_mb + self.microbatch(c)])

    def layer_fn(self, x: jax.Array, layer_vals: list[jax.Array], where: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """One layer on its weights: (y, its MoE statistics as float32 or None)."""
        prefix = len(LAYERS) + 1
        values = {p[prefix:]: v for p, v in zip(self.layer_paths, layer_vals)}
        streams = (self.pipeline.blocks_rest,) if self.layer_rest is None else (self.layer_streams(where),)
        block = nnx.merge(self.pipeline.blocks_graphdef, _rebuild(self.pipeline.blocks_template, values), *streams)
        y, aux = self.pipeline.call_block(block, ops.boundary(x, "layer_input"))
        if self.moe is None:
            return y, None
        stats = {"load": aux.load, "prob_sum": aux.prob_sum, "dropped": aux.dropped}
        return y, {k: _vary_all(v.astype(jnp.float32), self.vary) for k, v in stats.items()}

    def skip_layer(self, x: jax.Array, *_) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """A padding layer: x unchanged, zero statistics."""
        if self.moe is None:
            return x, None
        z = lambda *s: jax.lax.pcast(jnp.zeros(s, jnp.float32), self.vary, to="varying")  # noqa: E731
        return x, {"load": z(self.e), "prob_sum": z(self.e), "dropped": z()}

    def run_chunk(self, chunk_vals: list[jax.Array], c: jax.Array, x: jax.Array):
        """The layers of work unit c's chunk over x: (y, per-layer MoE statistics [Lmax, ...] or None)."""
        n = self.counts[self.chunk(c)]

        def scan_body(x, xs):
            j, layer_vals = xs
            where = () if self.layer_rest is None else (self.where(c, j),)  # a model without streams: as before
            if self.pipeline.layout.even:
                return self.step_layer(x, layer_vals, *where)
            return jax.lax.cond(j < n, self.step_layer, self.skip_layer, x, layer_vals, *where)
        lmax = chunk_vals[0].shape[0]
        return jax.lax.scan(scan_body, x, (jnp.arange(lmax), chunk_vals))

    def stage_fn(self, w: list[jax.Array], c: jax.Array, h: jax.Array):
        """(the chunk's output, its layers' statistics): with MoE layers the output is (y, router probability sums
        [Lmax, E]); their cotangent is the balancing loss's coefficient (`cotangent`), so the forward does not need
        it (GPipe's forwards run before it is known)."""
        y, st = self.run_chunk(w, c, h)
        return ((y, st["prob_sum"]) if self.moe else y), st

    def embed(self, i: jax.Array) -> jax.Array:
        return self.model_of(dict(zip(self.other_paths, self.other_list)), i).embed_inputs(self.mb(i))

    # -- indexing, zeros and transfers --------------------------------------------------------------------------
    def unit(self, chunk: jax.Array, i: jax.Array) -> jax.Array:
        """The work unit (chunk, microbatch i) as the one integer the tick ops pass as `c`: a stage's function
        takes it whole, so that its dropout keys (`where`) are a function of its arguments, which the stash's
        backward makes again from them (`_Stash.again`)."""
        return chunk + self.V * i

    def chunk(self, c: jax.Array) -> jax.Array:
        return c % self.V

    def microbatch(self, c: jax.Array) -> jax.Array:
        return c // self.V

    def chunk_of(self, c) -> list[jax.Array]:
        if self.V == 1:
            return [self.layers[p][0] for p in self.layer_paths]
        return [jax.lax.dynamic_index_in_dim(self.layers[p], self.chunk(c), 0, keepdims=False)
                for p in self.layer_paths]

    def index(self, a: jax.Array, c) -> jax.Array:
        return a[0] if self.V == 1 else jax.lax.dynamic_index_in_dim(a, self.chunk(c), 0, keepdims=False)

    def add_chunk(self, acc: list[jax.Array], c, g: list[jax.Array]) -> list[jax.Array]:
        if self.V == 1:
            return [a + gi[None] for a, gi in zip(acc, g)]
        k = self.chunk(c)
        return [jax.lax.dynamic_update_index_in_dim(a, jax.lax.dynamic_index_in_dim(a, k, 0, False) + gi, k, 0)
                for a, gi in zip(acc, g)]

    def mb(self, i) -> dict[str, jax.Array]:
        return jax.tree.map(lambda v: jax.lax.dynamic_index_in_dim(v, i, 0, keepdims=False), self.micro)

    def varying(self, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.lax.pcast(jnp.zeros(shape, dtype), self.vary, to="varying")

    def pin(self, x: jax.Array) -> jax.Array:
        return ops.constrain(x, self.carried) if self.carried is not None else x

    def buffer(self, k: int) -> jax.Array:
        """k stage inputs' slots (activations or cotangents), laid out as what moves between stages."""
        buf = self.varying((k,) + self.x_shape.shape, self.x_shape.dtype)
        return ops.constrain(buf, PartitionSpec(None, *self.carried)) if self.carried is not None else buf

    def send(self, x_next: jax.Array) -> jax.Array:
        return self.pin(jax.lax.ppermute(self.pin(x_next), "pipe", self.fwd_pairs))

    def send_back(self, cot: jax.Array) -> jax.Array:
        return self.pin(jax.lax.ppermute(self.pin(cot), "pipe", self.bwd_pairs))

    def kept_slot(self, bufs: list[jax.Array], row: dict[str, jax.Array]):
        """(slots, their values): the residuals a forward tick overwrites or a backward tick reads, then (zb) what
        a B tick saves for its W in its grad slot; every tick writes back what its branch returns (unchanged but
        by a forward or a B), so no buffer is copied whole."""
        if not bufs:
            return [], []
        slots = [jnp.maximum(row["stash_slot"][self.me], 0)] * self.n_kept
        if len(bufs) > self.n_kept:
            slots += [jnp.maximum(row["grad_slot"][self.me], 0)] * (len(bufs) - self.n_kept)
        return slots, [b[k] for b, k in zip(bufs, slots)]

    @staticmethod
    def write_back(bufs: list[jax.Array], slots: list[jax.Array], kept: list[jax.Array]) -> list[jax.Array]:
        return [jax.lax.dynamic_update_index_in_dim(b, v, k, 0) for b, v, k in zip(bufs, kept, slots)]

    # -- a chunk's forward and backward -------------------------------------------------------------------------
    def forward(self, c: jax.Array, h: jax.Array):
        """The chunk's output, statistics and the residuals to keep (none without stash)."""
        if self.stash is None:
            y, st = self.run_chunk(self.chunk_of(c), c, h)
            return y, st, []
        out, st, kept = self.stash.forward(self.stage_fn, self.chunk_of(c), c, h, self.vary)
        return (out[0] if self.moe else out), st, kept

    def cotangent(self, c: jax.Array, g: jax.Array):
        """The cotangent of `stage_fn`'s output (MoE: of the probability sums too, the coefficient)."""
        return (g, self.index(self.coef, c)) if self.moe else g

    def backward(self, c: jax.Array, h: jax.Array, g: jax.Array, kept: list[jax.Array]):
        """(dw, dh, kept) of the chunk: from the kept residuals, or recomputing its forward from h; zb's B: dh alone
        (dw None), what its W needs saved in the kept grad slot."""
        if self.split is not None:
            n = self.n_kept
            dh, saved = self.split.b(kept[:n], self.chunk_of(c), c, h, self.cotangent(c, g), self.vary)
            return None, dh, kept[:n] + saved
        if self.stash is not None:
            dw, dh = self.stash.backward(kept, self.chunk_of(c), c, h, self.cotangent(c, g))
            return dw, dh, kept
        _, vjp, _ = jax.vjp(lambda w, h: self.stage_fn(w, c, h), self.chunk_of(c), h, has_aux=True)
        dw, dh = vjp(self.cotangent(c, g))
        return dw, dh, kept

    def add_grads(self, acc: list[jax.Array], c: jax.Array, dw: list[jax.Array] | None) -> list[jax.Array]:
        """The layer gradients accumulated with the chunk's `dw` (None: zb's B, whose W adds them later)."""
        return acc if dw is None else self.add_chunk(acc, c, dw)

    # -- the MoE statistics sweep -------------------------------------------------------------------------------
    @property
    def sweep_keeps(self) -> bool:
        """Whether the sweep is the forward phase that keeps the residuals for the backward ticks (GPipe, stash)."""
        return self.stash is not None and self.schedule.forwards_first

    def _sweep(self) -> tuple[jax.Array, list[jax.Array], tuple]:
        """(the activations and residuals the sweep leaves, the staged balancing loss, expert loads and dropped
        assignments of the whole batch [1, V, Lmax, ...]); sets `coef`."""
        # The balancing loss of layer l is E * sum_e f_e p_e with f (share of assignments) and p (mean
        # router probability) over the WHOLE batch: not a mean over microbatches. f carries no gradient,
        # so a forward-only sweep first counts every layer's assignments over all microbatches (and all
        # shards); the step then differentiates sum_e c_e * prob_sum_e per microbatch with the global
        # c = weight/L * E * f / tokens, which sums to exactly the gradient of the whole-batch loss.
        # Under GPipe the sweep is the forward phase, and keeps the residuals when the stages stash.
        V, e, group = self.V, self.e, self.group
        lmax = self.pipeline.layout.index.shape[2]
        stats0 = {"load": self.varying((V, lmax, e)), "prob_sum": self.varying((V, lmax, e)),
                  "dropped": self.varying((V, lmax))}
        swept_bufs = self.stash.buffers(self.schedule.stash_slots, self.varying) if self.sweep_keeps else []
        (swept, stats, swept_bufs), _ = jax.lax.scan(self.pre_tick, (self.buffer(self.schedule.act_slots), stats0,
                                                                     swept_bufs), self.tables["pre"])
        # sums over the batch shards; the expert-parallel op's statistics are sums over its group already
        reduce_axes = self.pipeline.reduce_axes
        stats = {k: jax.lax.psum(v, reduce_axes) / group if reduce_axes else v for k, v in stats.items()}
        tokens = math.prod(self.x_shape.shape[:-1]) * self.M * self.n_shards
        n_layers = self.pipeline.layers
        share = stats["load"] / jnp.maximum(jnp.sum(stats["load"], -1, keepdims=True), 1.0)
        aux = e * jnp.sum(share * stats["prob_sum"] / tokens, axis=-1)                             # [V, Lmax]
        self.coef = _vary_all(self.moe["weight"] / n_layers * e * share / tokens / group, self.vary)  # [V, Lmax, E]
        return swept, swept_bufs, tuple(v[None] for v in (aux, stats["load"], stats["dropped"]))

    def add_stats(self, acc: dict[str, jax.Array], c: jax.Array, st: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {k: self.add_chunk([acc[k]], c, [st[k]])[0] for k in acc}

    def pre_idle(self, c, i, h, acc, kept):
        return self.zero_x, acc, kept

    def pre_fwd(self, c, i, h, acc, kept):
        if self.sweep_keeps:
            y, st, kept = self.forward(c, h)
            return y, self.add_stats(acc, c, st), kept
        y, st = self.run_chunk(self.chunk_of(c), c, h)
        return y, self.add_stats(acc, c, st), kept

    def pre_fwd_first(self, c, i, h, acc, kept):
        return self.pre_fwd(c, i, self.embed(i), acc, kept)

    def pre_last(self, c, i, h, acc, kept):
        """Kept (GPipe), its output goes where its input was (`pre_tick`); sent, it is dropped.
        Else the main table runs it again."""
        if self.sweep_keeps:
            y, st, kept = self.forward(c, h)
            return y, self.add_stats(acc, c, st), kept
        y, st = self.run_chunk(self.chunk_of(c), c, h)
        return self.zero_x, self.add_stats(acc, c, st), kept

    def _sweep_branches(self) -> list[Callable]:
        """The sweep's ops by code, each taking its operands as one tuple (for `lax.switch`)."""
        branches = [None] * 4
        for code, fn in ((0, self.pre_idle), (FWD, self.pre_fwd), (FWD_FIRST, self.pre_fwd_first),
                         (PRE_LAST, self.pre_last)):
            branches[code] = fn
        return [lambda a, fn=fn: fn(*a) for fn in branches]

    def pre_tick(self, carry, row):
        """One tick of the sweep: its forward op, then the output sent to the next device."""
        acts, acc, bufs = carry
        me = self.me
        code, read = row["code"][me], row["in_slot"][me]
        h = acts[jnp.maximum(read, 0)]
        slot, kept = self.kept_slot(bufs, row)
        i = row["microbatch"][me]
        out, acc, kept = jax.lax.switch(code, self._sweep_branches(), (self.unit(row["chunk"][me], i), i, h, acc,
                                                                       kept))
        bufs = self.write_back(bufs, slot, kept)
        if self.sweep_keeps:
            acts = _receive(acts, jnp.where(code == PRE_LAST, read, -1), out)
        return (_receive(acts, row["recv_act"][me], self.send(out)), acc, bufs), None

    # -- the tick ops -------------------------------------------------------------------------------------------
    def idle(self, c, i, h, g, acc: _Acc, kept):
        return self.zero_x, self.zero_x, acc, kept

    def fwd(self, c, i, h, g, acc: _Acc, kept):
        y, _, new = self.forward(c, h)
        return y, self.zero_x, acc, new + kept[len(new):]

    def fwd_first(self, c, i, h, g, acc: _Acc, kept):
        return self.fwd(c, i, self.embed(i), g, acc, kept)

    def bwd(self, c, i, h, g, acc: _Acc, kept):
        dw, dh, kept = self.backward(c, h, g, kept)
        return self.zero_x, dh, (self.add_grads(acc[0], c, dw), acc[1], acc[2]), kept

    def wgt(self, c, i, h, g, acc: _Acc, kept):
        """zb's W: the chunk's weight gradients from its residuals and what its B saved."""
        dw = self.split.w(kept[:self.n_kept], self.chunk_of(c), c, kept[self.n_kept:])
        return self.zero_x, self.zero_x, (self.add_chunk(acc[0], c, dw), acc[1], acc[2]), kept

    def bwd_last(self, c, i, h, g, acc: _Acc, kept):
        """The last stage's backward through the head and loss (with the stash its forward ran in its own tick
        and h is its output, else its forward runs here too); the loss and metrics."""
        batch_i, moe, one = self.mb(i), self.moe, self.one

        def head(o, y):
            loss, metrics = self.model_of(dict(zip(self.other_paths, o)), i).head_loss(y, batch_i)
            return loss * self.scale, (loss, metrics)

        def f(w, o, h):
            out, _ = self.stage_fn(w, c, h)
            y, aux = (out[0], jnp.sum(self.index(self.coef, c) * out[1])) if moe else (out, 0.0)
            loss, metrics = head(o, y)
            return loss + aux, metrics
        if self.schedule.stash_last:  # its forward ran in its own tick (or the sweep's): h is its output
            _, vjp, (loss, metrics) = jax.vjp(head, self.other_list, h, has_aux=True)
            do, dy = vjp(one)
            dw, dh, kept = self.backward(c, h, dy, kept)
        else:
            _, vjp, (loss, metrics) = jax.vjp(f, self.chunk_of(c), self.other_list, h, has_aux=True)
            dw, do, dh = vjp(one)
        values = [loss] + [metrics[k] for k in self.metric_names]
        sums = [s + v.astype(jnp.float32) * self.scale for s, v in zip(acc[2], values)]
        return self.zero_x, dh, (self.add_grads(acc[0], c, dw), [a + d for a, d in zip(acc[1], do)], sums), kept

    def bwd_first(self, c, i, h, g, acc: _Acc, kept):
        """The first stage's backward, through the embedding into the other gradients."""
        batch_i = self.mb(i)

        def embed_o(o):
            return self.model_of(dict(zip(self.other_paths, o)), i).embed_inputs(batch_i)
        x, vjp = jax.vjp(embed_o, self.other_list)  # the stage input again: a lookup, no matmul
        dw, dh, kept = self.backward(c, x, g, kept)
        (do,) = vjp(dh)
        return self.zero_x, self.zero_x, (self.add_grads(acc[0], c, dw), [a + d for a, d in zip(acc[1], do)],
                                          acc[2]), kept

    # -- the ticks ----------------------------------------------------------------------------------------------
    def _branches(self) -> list[Callable]:
        """The tick ops by code (`planner.schedule`), each taking its operands as one tuple (for `lax.switch`)."""
        ops_by_code = ((0, self.idle), (FWD, self.fwd), (FWD_FIRST, self.fwd_first), (BWD, self.bwd),
                       (BWD_LAST, self.bwd_last), (BWD_FIRST, self.bwd_first))
        if self.zb or self.schedule.stash_last:  # (a code past the last branch would run the last branch)
            ops_by_code += ((WGT, self.wgt if self.zb else self.idle),)
        if self.schedule.stash_last:  # the last stage's forward: `tick` puts its output where its input was
            ops_by_code += ((FWD_LAST, self.fwd),)
        branches = [None] * len(ops_by_code)
        for code, fn in ops_by_code:
            branches[code] = fn
        return [lambda ops_, fn=fn: fn(*ops_) for fn in branches]

    def tick(self, carry, row):
        """One tick: this device's op, then activations sent to the next device and cotangents to the previous."""
        acts, cots, bufs, acc = carry
        me = self.me
        code, i = row["code"][me], row["microbatch"][me]
        c = self.unit(row["chunk"][me], i)
        h = acts[jnp.maximum(row["in_slot"][me], 0)]
        g = cots[jnp.maximum(row["cot_slot"][me], 0)]
        slot, kept = self.kept_slot(bufs, row)
        send_act, send_cot, acc, kept = jax.lax.switch(code, self._branches(), (c, i, h, g, acc, kept))
        bufs = self.write_back(bufs, slot, kept)
        # the last stage's forward (FWD_LAST) keeps its output where its input was, for its backward (`bwd_last`)
        acts = _receive(acts, jnp.where(code == FWD_LAST, row["in_slot"][me], -1), send_act)
        got_act = jax.lax.cond(row["send_act"], self.send, lambda x: x, send_act)
        got_cot = jax.lax.cond(row["send_cot"], self.send_back, lambda x: x, send_cot)
        acts = _receive(acts, row["recv_act"][me], got_act)
        cots = _receive(cots, row["recv_cot"][me], got_cot)
        return (acts, cots, bufs, acc), None

    def _scan(self, swept: jax.Array | None, swept_bufs: list[jax.Array]) -> _Acc:
        """The main table's ticks from zero accumulators (after a sweep that was the forward phase itself, from the
        activations and residuals it left)."""
        self.one = jax.lax.pcast(jnp.ones((), jnp.float32), self.vary, to="varying")
        """The loss's own cotangent (`bwd_last`)."""
        acc0 = ([self.varying(self.layers[p].shape, self.layers[p].dtype) for p in self.layer_paths],
                [self.varying(self.other[p].shape, self.other[p].dtype) for p in self.other_paths],
                [self.varying(()) for _ in range(1 + len(self.metric_names))])
        main = {k: v for k, v in self.tables.items() if k != "pre"}
        # (after a sweep that was the forward phase itself, the main table holds only the backward ticks)
        if self.moe is not None and self.schedule.forwards_first:
            acts0, bufs0 = swept, swept_bufs
        else:
            acts0 = self.buffer(self.schedule.act_slots)
            bufs0 = self.stash.buffers(self.schedule.stash_slots, self.varying) if self.stash else []
            if self.zb:
                bufs0 += self.split.buffers(self.schedule.grad_slots, self.varying)
        (_, _, _, acc), _ = jax.lax.scan(self.tick, (acts0, self.buffer(self.schedule.cot_slots), bufs0, acc0),
                                         main)
        return acc


@dataclasses.dataclass
class _Stash:
    """How a forward tick keeps its stage's vjp for the backward tick: the residual leaves of the `jax.vjp`
    closure (a pytree, the same structure for every chunk and microbatch) in slot buffers carried by the tick scan.

    Only the leaves that depend on the stage input are kept. Those that do not (the weights themselves, the weights
    cast to the compute dtype, masks, rotary tables) are made again from the live weights by the backward: the
    closure's jaxpr cut down to them (`jax_internals.split_on_last_input`: pass-throughs, casts and iotas, no
    matmul). Kept, they would be a copy of the stage's weights per microbatch in flight."""

    treedef: Any
    fixed: list[Any]
    """The closure's leaves that are not arrays, None where a leaf is an array."""
    kept: list[bool]
    """Per array leaf: kept (it depends on the stage input), else made again by `backward`."""
    shapes: list[Any]
    """Avals of the kept leaves."""
    again: Any
    """The closure's jaxpr (consts first, then weights, chunk, stage input) cut down to the leaves not kept."""
    consts: list[Any]

    @classmethod
    def probe(cls, fn: Callable, w: list[jax.Array], c: jax.Array, h: jax.Array) -> "_Stash":
        """The closure of `fn(w, c, h) -> (out, aux)` differentiated in (w, h): traced, never run."""
        found = {}

        def leaves(w, c, h):
            _, vjp_fn, _ = jax.vjp(lambda w, h: fn(w, c, h), w, h, has_aux=True)
            flat, found["treedef"] = jax.tree.flatten(vjp_fn)
            found["fixed"] = [None if isinstance(x, jax.Array) else x for x in flat]
            return [x for x in flat if isinstance(x, jax.Array)]
        closed = jax.make_jaxpr(leaves)(w, c, h)
        kept, again = split_on_last_input(closed)
        shapes = [v.aval for v, k in zip(closed.jaxpr.outvars, kept) if k]
        return cls(found["treedef"], found["fixed"], kept, shapes, again, list(closed.consts))

    def forward(self, fn: Callable, w: list[jax.Array], c: jax.Array, h: jax.Array, vary: tuple[str, ...]):
        """(out, aux, the leaves to keep) of `fn(w, c, h)`."""
        out, vjp_fn, aux = jax.vjp(lambda w, h: fn(w, c, h), w, h, has_aux=True)
        arrays = [x for x in jax.tree.leaves(vjp_fn) if isinstance(x, jax.Array)]
        return out, aux, [_vary_all(x, vary) for x, k in zip(arrays, self.kept) if k]

    def backward(self, kept: list[jax.Array], w: list[jax.Array], c: jax.Array, h: jax.Array, ct) -> tuple[Any, Any]:
        """(dw, dh): the closure rebuilt from the kept leaves, the others made again from the live weights `w`
        (`h`: any array of the stage input's type, unused), applied to the cotangent `ct`."""
        made = iter(eval_jaxpr(self.again, *self.consts, *jax.tree.leaves(w), c, h))
        stored = iter(kept)
        arrays = iter([next(stored) if k else next(made) for k in self.kept])
        return jax.tree.unflatten(self.treedef, [next(arrays) if x is None else x for x in self.fixed])(ct)

    def buffers(self, slots: int, zeros: Callable) -> list[jax.Array]:
        return [zeros((slots,) + x.shape, x.dtype) for x in self.shapes]


@dataclasses.dataclass
class _Split:
    """zb's backward of a stage cut in two (`jax_internals.split_backward`): B, the stage input's cotangent from
    the kept residuals, and W, the weight gradients from the same residuals and what B saved for it (per layer, the
    cotangents the weight gradients read), so that no equation of the backward runs twice."""

    cut: BackwardSplit
    n_weights: int

    @classmethod
    def probe(cls, stash: _Stash, w: list[jax.Array], c: jax.Array, h: jax.Array, fn: Callable, zeros: Callable
              ) -> "_Split":
        """The stash's backward `(kept, w, c, h, ct) -> (dw, dh)` of `fn(w, c, h) -> (out, aux)` traced once
        (never run) and cut; W is given the residuals, weights and chunk, not the stage input or the cotangent of
        `out` (their buffers are reused by then)."""
        kept = [zeros(a.shape, a.dtype) for a in stash.shapes]
        out = jax.eval_shape(lambda w, h: fn(w, c, h)[0], w, h)
        ct = jax.tree.map(lambda a: zeros(a.shape, a.dtype), out)
        closed = jax.make_jaxpr(lambda k, w, c, h, ct: stash.backward(k, w, c, h, ct))(kept, w, c, h, ct)
        n = len(kept) + len(w) + 1
        cut = split_backward(closed, [False] * len(w) + [True], [True] * n + [False] * (len(closed.jaxpr.invars) - n))
        return cls(cut, len(w))

    def b(self, kept: list[jax.Array], w: list[jax.Array], c: jax.Array, h: jax.Array, ct: jax.Array,
          vary: tuple[str, ...]) -> tuple[jax.Array, list[jax.Array]]:
        """(dh, what W needs)."""
        (dh,), saved = self.cut.b(*kept, *w, c, h, *jax.tree.leaves(ct))
        return dh, [_vary_all(x, vary) for x in saved]

    def w(self, kept: list[jax.Array], w: list[jax.Array], c: jax.Array, saved: list[jax.Array]) -> list[jax.Array]:
        n = len(self.cut.w_inputs) - len(kept) - len(w) - 1  # the stage input and the cotangent's leaves
        return self.cut.w(*kept, *w, c, *[None] * n, *saved)

    def buffers(self, slots: int, zeros: Callable) -> list[jax.Array]:
        return [zeros((slots,) + tuple(a.shape), a.dtype) for a in self.cut.interface_avals]


def _drop_axes(spec: PartitionSpec, axes: tuple[str, ...]) -> PartitionSpec:
    """`spec` without the mesh axes in `axes` (a shard_map's manual axes cannot appear in sharding constraints)."""
    def keep(e):
        if e is None:
            return None
        kept = tuple(a for a in ((e,) if isinstance(e, str) else e) if a not in axes)
        return None if not kept else kept[0] if len(kept) == 1 else kept
    return PartitionSpec(*(keep(e) for e in spec))


def _vary_all(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """`x` made varying over those of `axes` it is not varying over yet."""
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _axes_of(spec: tuple) -> set[str]:
    return {a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)}


def stream_state(state: nnx.State, at: Callable[[jax.Array], jax.Array], salt: tuple[jax.Array, ...],
                 skip: str | None = None) -> nnx.State:
    """`state` with each RNG stream (an RngKey and the RngCount beside it) replaced by one of its own for one
    microbatch (and layer): key fold_in(fold_in(key, count), *salt), count 0, `at` picking a layer's slice of a
    stacked stream. Its first draw is then a function of the step's draw (what one device would draw), the
    global microbatch and the layer: never the same mask twice, the same one when a backward recomputes its
    forward. Streams under `skip` (the blocks', in the whole model) are left as they are."""
    flat = nnx.to_flat_state(state)
    counts = {p[:-1]: v.get_value() for p, v in flat if isinstance(v, nnx.RngCount)}

    def fresh(path: tuple, v: Any) -> Any:
        if skip is not None and path and path[0] == skip:
            return v
        if isinstance(v, nnx.RngKey):
            key = at(v.get_value())
            if path[:-1] in counts:
                key = jax.random.fold_in(key, at(counts[path[:-1]]))
            for s in salt:
                key = jax.random.fold_in(key, s)
            return v.replace(key)
        if isinstance(v, nnx.RngCount):
            return v.replace(jnp.zeros_like(at(v.get_value())))
        return v.replace(at(v.get_value()))
    return nnx.map_state(fresh, state)


def _advance_streams(rest: nnx.State) -> nnx.State:
    """`rest` with each RNG stream's count one further: a step draws once per stream, as the model called on one
    device does (a Dropout draws once per call), so the next step's masks differ and a resumed run continues the
    stream."""
    return nnx.map_state(lambda path, v: v.replace(v.get_value() + 1) if isinstance(v, nnx.RngCount) else v, rest)


def _rebuild(template: nnx.State, values: dict[str, jax.Array]) -> nnx.State:
    """`template` (a State of Variables) with each leaf's value replaced by `values[path]`."""
    return nnx.map_state(lambda path, v: v.replace(values[path_str(path)]), template)


def _receive(buf: jax.Array, slot: jax.Array, value: jax.Array) -> jax.Array:
    """Write `value` into `buf[slot]` when slot >= 0 (a fixed-shape update either way)."""
    k = jnp.maximum(slot, 0)
    return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(slot >= 0, value, buf[k]), k, 0)
