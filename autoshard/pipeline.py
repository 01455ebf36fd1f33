"""Pipeline parallelism: a `shard_map` program over the `pipe` axis that runs a static schedule table.

A model pipelines when it comes in three parts (as `models.decoder.Decoder` does):

- `model.embed_inputs(batch) -> x`: the first stage's prologue (embedding);
- `model.blocks`: an NNX module whose parameters are stacked on a leading layers axis; called on one layer's slice
  it maps `x -> (x, aux)`, aux None or an `ops.MoEStats` (MoE layers; the model then has `cfg.aux_loss_weight`, and
  may have `_aux(stats)` for its metrics, as `Decoder`);
- `model.head_loss(x, batch) -> (loss, metrics)`: the last stage's epilogue (final norm, head, loss).

Layer parameters live in a *staged layout* [P, V, Lmax, ...]: device p holds chunk v of stage s = v*P + p, padded to
the longest stage (padded layers are skipped, their weights stay zero, their gradients are zero). The rest of the
parameters (embedding, head, norms) are replicated over `pipe`; only the stages that use them contribute gradients.

Each step runs inside one `shard_map` that is manual over `pipe`, the batch axes (`expert`, `data`, `fsdp`) and
`seq` (those of size > 1) and leaves `tensor` to XLA's partitioner, so tensor parallelism inside a stage composes
unchanged. `seq` and `expert` are manual here because jax 0.10 cannot differentiate a shard_map nested in a
partially manual one: the attention and MoE ops see them manual (`sequence.is_manual`) and run their per-device
bodies directly, on the local sequence block (positions offset by `ops.positions`) and the local experts. The
local batch is cut into M microbatches; at every tick each device looks up its op in the table and runs it under
`lax.switch` (idle, forward, first-stage forward, backward, last-stage backward, first-stage backward), then
activations move to the next device and cotangents to the previous one with `ppermute`. Collectives of the ops
inside the switch run on devices of one stage only; on XLA:CPU a ppermute there would deadlock, so the sequence
ops build theirs from all-to-alls (`sequence.ppermute_deadlocks`). A backward recomputes its stage's forward
(`jax.vjp`), so only stage inputs are buffered: as many as the table's slot count, which is what makes 1F1B
lighter than GPipe. Parameters are made varying over the batch and seq axes once before the loop, so the gradient
reduction is one all-reduce after it, not one per tick (expert weights, split over `expert`, are not summed over
it). Parameters sharded over fsdp are gathered by XLA once per step on entry (inside a pipeline fsdp behaves like
ZeRO-2: it shards optimizer state, not live weights).

The loss is the mean over all tokens: each device's head loss is a mean over its tokens (its sequences, or its
block of each sequence under seq), all of equal count, scaled by 1 / (microbatches x shards). MoE layers' balancing
loss is not such a mean (E * sum_e f_e p_e, both over the whole batch), so for MoE models a forward-only sweep over
the same table first counts every layer's expert assignments over the whole batch; the step then differentiates
sum_e c_e * prob_sum_e per microbatch with those global counts in c, which is exactly the whole-batch loss's
gradient (f carries none), and reports the whole-batch balancing loss, dropped tokens and expert loads. Under
GPipe every forward tick comes before every backward one, so the sweep is the forward phase itself: the main table
then runs only the backward ticks, from the activations the sweep received (moe-tiny pipe=2: 1.18x the unpipelined
step's FLOPs over the devices, against 1.34x with a separate sweep). Under 1F1B and interleaved schedules a stage's
first backward comes before the batch's last forward, so the counts are not complete in time: the sweep stays there
and costs one more forward of every layer per step.
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

from autoshard import emit, ops
from planner.jax_internals import varying_axes
from planner.errors import PlanError
from planner.params import path_str
from planner.plan import BATCH_AXES, Plan, SpecEntry
from planner.rules import ParamInfo
from planner.schedule import (BWD, BWD_FIRST, BWD_LAST, FWD, FWD_FIRST, Schedule, check, make_schedule,
                              receive_permutations)

LAYERS = "blocks"
"""Attribute (and state-path prefix) of the stacked layer module a pipelinable model exposes."""
PRE_LAST = 3
"""Op code of the last stage's forward in the statistics sweep (its forward is folded into its backward in the
main table); the sweep's other codes are IDLE, FWD and FWD_FIRST."""


def is_layer_param(path: str) -> bool:
    return path == LAYERS or path.startswith(LAYERS + "/")


def check_pipelinable(model: nnx.Module) -> int:
    """The number of stacked layers; a one-line error when the model lacks the three pipeline parts."""
    missing = [name for name in ("embed_inputs", LAYERS, "head_loss") if not hasattr(model, name)]
    if missing:
        raise PlanError(f"{type(model).__name__} cannot be pipelined: it lacks {', '.join(missing)} (a pipelinable "
                        f"model has embed_inputs(batch), stacked layers in .{LAYERS}, and head_loss(x, batch))")
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
        self.schedule: Schedule = make_schedule(spec.schedule, self.P, self.M, self.V)
        self.layout = StageLayout.from_stages(spec.stages, self.P, self.V)
        self.batch_axes = tuple(a for a in BATCH_AXES if plan.mesh[a] > 1)
        """expert (major), data, fsdp: the batch split of `emit.batch_spec`."""
        self.seq_axes = ("seq",) if plan.mesh["seq"] > 1 else ()
        self.reduce_axes = self.batch_axes + self.seq_axes
        """Axes the loss and gradients are summed over (each device holds a different part of the tokens)."""
        self.manual = ("pipe",) + self.reduce_axes
        """Manual axes of the executor: size-1 axes stay automatic (nested shard_maps of the ops need that)."""
        self.graphdef, self.param_template, _ = nnx.split(abstract, nnx.Param, ...)
        self.blocks_graphdef, self.blocks_template = nnx.split(getattr(abstract, LAYERS), nnx.Param)

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
                       ops_context: ops.OpsContext) -> tuple[jax.Array, dict[str, jax.Array], nnx.State]:
        """(loss, metrics, grads) of the staged parameters over the global batch."""
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
        return loss, metrics, grads

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
        names = ("code", "chunk", "microbatch", "in_slot", "cot_slot", "recv_act", "recv_cot")
        if not sweep:
            return {name: jnp.asarray(getattr(s, name)) for name in names}
        # the forward-only sweep for layer statistics (MoE): the forward ticks in the same order, with the last
        # stage's forward (folded into its backward in the main table) as an op of its own
        rows = np.nonzero(np.any(s.phase == 1, axis=1))[0]
        code = np.where(s.phase == 1, np.where(s.code == 0, PRE_LAST, s.code), 0)
        pre = {"code": jnp.asarray(code[rows]), **{name: jnp.asarray(getattr(s, name)[rows]) for name in
                                                   ("chunk", "microbatch", "in_slot", "recv_act")}}
        # where every forward tick comes before every backward one (GPipe), the sweep IS the forward phase: the
        # main table keeps only the backward ticks and starts from the activations the sweep received
        rest = s.forward_ticks if s.forwards_first else 0
        return {"pre": pre, **{name: jnp.asarray(getattr(s, name)[rest:]) for name in names}}

    def _probe(self, rest, batch) -> tuple[tuple[str, ...], dict[str, Any] | None]:
        """Scalar metric names of `head_loss`, and what the layers' auxiliary output is (traced on the global
        shapes): None, or for MoE layers (`ops.MoEStats`) the expert count and the balancing loss weight."""
        def probe(params, rest, batch):
            model = nnx.merge(self.graphdef, params, rest, copy=True)
            x = model.embed_inputs(batch)
            graphdef, stacked = nnx.split(getattr(model, LAYERS))
            _, aux = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked))(x)
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
        weight = getattr(getattr(self.abstract, "cfg", None), "aux_loss_weight", None)
        if weight is None:
            raise PlanError(f"{type(self.abstract).__name__} has MoE layers but no cfg.aux_loss_weight: a pipeline "
                            f"adds weight x the mean balancing loss over layers, as Decoder.loss does")
        return names, {"experts": int(aux.load.shape[-1]), "weight": float(weight)}

    def _moe_loss(self, ce: jax.Array, metrics: dict[str, jax.Array], moe: dict[str, Any], aux: jax.Array,
                  load: jax.Array, dropped: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The loss and metrics of `Decoder.loss` from the whole batch's per-layer balancing loss, expert loads and
        dropped assignments (staged [P, V, Lmax, ...])."""
        stats = ops.MoEStats(*(self.layout.from_staged(a) for a in (aux, dropped, load)))    # [L, ...]
        extra = getattr(self.abstract, "_aux", _moe_metrics)(stats)
        return ce + moe["weight"] * extra["moe_aux_loss"], {**metrics, **extra}

    def _body(self, layers: dict[str, jax.Array], other: dict[str, jax.Array], rest, batch, tables,
              metric_names: tuple[str, ...], ops_context: ops.OpsContext, own: dict[str, tuple],
              moe: dict[str, Any] | None):
        P, V, M = self.P, self.V, self.M
        vary = self.manual
        # Varying over every manual axis up front: the vjp of a device-invariant weight against batch-varying
        # activations would otherwise psum inside every tick (jax-idioms.md, pcast).
        layers = {k: _vary_all(v[0], vary) for k, v in layers.items()}                       # [V, Lmax, ...]
        other = {k: _vary_all(v, vary) for k, v in other.items()}
        me = jax.lax.axis_index("pipe")
        counts = jnp.asarray(self.layout.counts)[me]                                        # [V]
        local_batch = jax.tree.leaves(batch)[0].shape[0]
        if local_batch % M:
            raise PlanError(f"{M} microbatches do not divide the per-replica batch of {local_batch} (global batch / "
                            f"expert x data x fsdp): change --microbatches or --batch")
        mbs = local_batch // M
        micro = jax.tree.map(lambda v: v.reshape((M, mbs) + v.shape[1:]), batch)
        # loss = mean over microbatches and shards: with seq, each device's loss is the mean over its block of
        # every sequence, blocks of equal size, so the mean of the block means is the mean over all tokens
        n_shards = math.prod(self.plan.mesh[a] for a in self.reduce_axes)
        scale = 1.0 / (M * n_shards)
        # MoE statistics from the expert-parallel op are already sums over the expert group
        group = self.plan.mesh["expert"] if "expert" in self.manual else 1

        layer_paths, other_paths = sorted(layers), sorted(other)
        prefix = len(LAYERS) + 1

        def model_of(other_vals: dict[str, jax.Array]) -> nnx.Module:
            """The whole model on this device's non-layer weights (its layer weights are never called)."""
            return nnx.merge(self.graphdef, _rebuild(self.param_template, {**layers, **other_vals}), rest, copy=True)

        def layer_fn(x, layer_vals):
            values = {p[prefix:]: v for p, v in zip(layer_paths, layer_vals)}
            block = nnx.merge(self.blocks_graphdef, _rebuild(self.blocks_template, values))
            y, aux = block(ops.boundary(x, "layer_input"))
            if moe is None:
                return y, None
            stats = {"load": aux.load, "prob_sum": aux.prob_sum, "dropped": aux.dropped}
            return y, {k: _vary_all(v.astype(jnp.float32), vary) for k, v in stats.items()}

        even = self.layout.even
        step_layer = ops.remat(layer_fn)
        e = moe["experts"] if moe else 0

        def run_chunk(chunk_vals: list[jax.Array], n, x):
            """The chunk's layers over x: (y, per-layer MoE statistics [Lmax, ...] or None)."""
            def skip(x, _):
                if moe is None:
                    return x, None
                z = lambda *s: jax.lax.pcast(jnp.zeros(s, jnp.float32), vary, to="varying")  # noqa: E731
                return x, {"load": z(e), "prob_sum": z(e), "dropped": z()}

            def scan_body(x, xs):
                j, layer_vals = xs
                if even:
                    return step_layer(x, layer_vals)
                return jax.lax.cond(j < n, step_layer, skip, x, layer_vals)
            lmax = chunk_vals[0].shape[0]
            return jax.lax.scan(scan_body, x, (jnp.arange(lmax), chunk_vals))

        def chunk_of(c) -> list[jax.Array]:
            if V == 1:
                return [layers[p][0] for p in layer_paths]
            return [jax.lax.dynamic_index_in_dim(layers[p], c, 0, keepdims=False) for p in layer_paths]

        def index(a, c):
            return a[0] if V == 1 else jax.lax.dynamic_index_in_dim(a, c, 0, keepdims=False)

        def add_chunk(acc: list[jax.Array], c, g: list[jax.Array]) -> list[jax.Array]:
            if V == 1:
                return [a + gi[None] for a, gi in zip(acc, g)]
            return [jax.lax.dynamic_update_index_in_dim(a, jax.lax.dynamic_index_in_dim(a, c, 0, False) + gi, c, 0)
                    for a, gi in zip(acc, g)]

        def mb(i) -> dict[str, jax.Array]:
            return jax.tree.map(lambda v: jax.lax.dynamic_index_in_dim(v, i, 0, keepdims=False), micro)

        def varying(shape, dtype=jnp.float32):
            return jax.lax.pcast(jnp.zeros(shape, dtype), vary, to="varying")

        # activation specs name only automatic axes here (seq, tensor): without them XLA may move the sequence
        # split of the stage input onto its batch dimension, which the attention ops' shard_maps cannot take
        local_specs = {k: _drop_axes(v, self.manual) for k, v in ops_context.activations.items()}
        with ops.context(dataclasses.replace(ops_context, activations=local_specs)):
            other_list = [other[p] for p in other_paths]
            x_shape = jax.eval_shape(lambda o: model_of(dict(zip(other_paths, o))).embed_inputs(mb(0)), other_list)
            zero_x = varying(x_shape.shape, x_shape.dtype)
            fwd_pairs, bwd_pairs = receive_permutations(P, V)
            k_act, k_cot = self.schedule.act_slots, self.schedule.cot_slots

            # What moves between stages has the plan's layer_input layout (its automatic axes): pinned on the
            # sends, so the bytes a tick transfers do not depend on how XLA propagates the embedding's layout.
            carried = local_specs.get("layer_input")

            def pin(x):
                return ops.constrain(x, carried) if carried is not None else x

            def buffer(k):
                buf = varying((k,) + x_shape.shape, x_shape.dtype)
                return ops.constrain(buf, PartitionSpec(None, *carried)) if carried is not None else buf

            def embed(i):
                return model_of(dict(zip(other_paths, other_list))).embed_inputs(mb(i))

            def send(x_next):
                return pin(jax.lax.ppermute(pin(x_next), "pipe", fwd_pairs))

            coef = None
            moe_out = ()
            if moe is not None:
                # The balancing loss of layer l is E * sum_e f_e p_e with f (share of assignments) and p (mean
                # router probability) over the WHOLE batch: not a mean over microbatches. f carries no gradient,
                # so a forward-only sweep first counts every layer's assignments over all microbatches (and all
                # shards); the step then differentiates sum_e c_e * prob_sum_e per microbatch with the global
                # c = weight/L * E * f / tokens, which sums to exactly the gradient of the whole-batch loss.
                lmax = self.layout.index.shape[2]
                stats0 = {"load": varying((V, lmax, e)), "prob_sum": varying((V, lmax, e)),
                          "dropped": varying((V, lmax))}

                def add_stats(acc, c, st):
                    return {k: add_chunk([acc[k]], c, [st[k]])[0] for k in acc}

                def pre_idle(c, i, h, acc):
                    return zero_x, acc

                def pre_fwd(c, i, h, acc):
                    y, st = run_chunk(chunk_of(c), counts[c], h)
                    return y, add_stats(acc, c, st)

                def pre_fwd_first(c, i, h, acc):
                    return pre_fwd(c, i, embed(i), acc)

                def pre_last(c, i, h, acc):
                    return zero_x, pre_fwd(c, i, h, acc)[1]

                pre_branches = [None] * 4
                for code, fn in ((0, pre_idle), (FWD, pre_fwd), (FWD_FIRST, pre_fwd_first), (PRE_LAST, pre_last)):
                    pre_branches[code] = fn

                def pre_tick(carry, row):
                    acts, acc = carry
                    h = acts[jnp.maximum(row["in_slot"][me], 0)]
                    out, acc = jax.lax.switch(row["code"][me], [lambda a, fn=fn: fn(*a) for fn in pre_branches],
                                              (row["chunk"][me], row["microbatch"][me], h, acc))
                    return (_receive(acts, row["recv_act"][me], send(out)), acc), None

                (swept, stats), _ = jax.lax.scan(pre_tick, (buffer(k_act), stats0), tables["pre"])
                # sums over the batch shards; the expert-parallel op's statistics are sums over its group already
                stats = {k: jax.lax.psum(v, self.reduce_axes) / group if self.reduce_axes else v
                         for k, v in stats.items()}
                tokens = math.prod(x_shape.shape[:-1]) * M * n_shards
                n_layers = self.layers
                share = stats["load"] / jnp.maximum(jnp.sum(stats["load"], -1, keepdims=True), 1.0)
                aux = e * jnp.sum(share * stats["prob_sum"] / tokens, axis=-1)                     # [V, Lmax]
                coef = _vary_all(moe["weight"] / n_layers * e * share / tokens / group, vary)   # [V, Lmax, E]
                moe_out = tuple(v[None] for v in (aux, stats["load"], stats["dropped"]))

            def stage(w, c, h):
                """The chunk's output and the differentiable part of its layers' balancing loss (0 if dense)."""
                y, st = run_chunk(w, counts[c], h)
                if coef is None:
                    return y, jnp.zeros((), jnp.float32)
                return y, jnp.sum(index(coef, c) * st["prob_sum"])

            one = jax.lax.pcast(jnp.ones((), jnp.float32), vary, to="varying")
            aux_ct = one if coef is not None else jnp.zeros((), jnp.float32)  # cotangent of `stage`'s second output

            def idle(c, i, h, g, acc):
                return zero_x, zero_x, acc

            def fwd(c, i, h, g, acc):
                return run_chunk(chunk_of(c), counts[c], h)[0], zero_x, acc

            def fwd_first(c, i, h, g, acc):
                return fwd(c, i, embed(i), g, acc)

            def bwd(c, i, h, g, acc):
                _, vjp = jax.vjp(lambda w, h: stage(w, c, h), chunk_of(c), h)
                dw, dh = vjp((g, aux_ct))
                return zero_x, dh, (add_chunk(acc[0], c, dw), acc[1], acc[2])

            def bwd_last(c, i, h, g, acc):
                batch_i = mb(i)

                def f(w, o, h):
                    y, aux = stage(w, c, h)
                    loss, metrics = model_of(dict(zip(other_paths, o))).head_loss(y, batch_i)
                    return loss * scale + aux, (loss, metrics)
                _, vjp, (loss, metrics) = jax.vjp(f, chunk_of(c), other_list, h, has_aux=True)
                dw, do, dh = vjp(one)
                values = [loss] + [metrics[k] for k in metric_names]
                sums = [s + v.astype(jnp.float32) * scale for s, v in zip(acc[2], values)]
                return zero_x, dh, (add_chunk(acc[0], c, dw), [a + d for a, d in zip(acc[1], do)], sums)

            def bwd_first(c, i, h, g, acc):
                batch_i = mb(i)

                def f(w, o):
                    return stage(w, c, model_of(dict(zip(other_paths, o))).embed_inputs(batch_i))
                _, vjp = jax.vjp(f, chunk_of(c), other_list)
                dw, do = vjp((g, aux_ct))
                return zero_x, zero_x, (add_chunk(acc[0], c, dw), [a + d for a, d in zip(acc[1], do)], acc[2])

            branches = [None] * 6
            for code, fn in ((0, idle), (FWD, fwd), (FWD_FIRST, fwd_first), (BWD, bwd), (BWD_LAST, bwd_last),
                             (BWD_FIRST, bwd_first)):
                branches[code] = fn

            acc0 = ([varying(layers[p].shape, layers[p].dtype) for p in layer_paths],
                    [varying(other[p].shape, other[p].dtype) for p in other_paths],
                    [varying(()) for _ in range(1 + len(metric_names))])

            def tick(carry, row):
                acts, cots, acc = carry
                code, c, i = row["code"][me], row["chunk"][me], row["microbatch"][me]
                h = acts[jnp.maximum(row["in_slot"][me], 0)]
                g = cots[jnp.maximum(row["cot_slot"][me], 0)]
                send_act, send_cot, acc = jax.lax.switch(
                    code, [lambda ops_, fn=fn: fn(*ops_) for fn in branches], (c, i, h, g, acc))
                got_act = send(send_act)
                got_cot = pin(jax.lax.ppermute(pin(send_cot), "pipe", bwd_pairs))
                acts = _receive(acts, row["recv_act"][me], got_act)
                cots = _receive(cots, row["recv_cot"][me], got_cot)
                return (acts, cots, acc), None

            main = {k: v for k, v in tables.items() if k != "pre"}
            # (after a sweep that was the forward phase itself, the main table holds only the backward ticks)
            acts0 = swept if moe is not None and self.schedule.forwards_first else buffer(k_act)
            (_, _, (g_layers, g_other, sums)), _ = jax.lax.scan(tick, (acts0, buffer(k_cot), acc0), main)

        def reduce(g, path, axes):  # a weight split over a manual axis (expert) is not summed over it
            axes = tuple(a for a in axes if a not in _axes_of(own[path]))
            return jax.lax.psum(g, axes) if axes else g

        g_layers = [reduce(g, p, self.reduce_axes)[None] for g, p in zip(g_layers, layer_paths)]
        g_other = [reduce(g, p, self.manual) for g, p in zip(g_other, other_paths)]
        sums = [jax.lax.psum(s, self.manual) for s in sums]
        return sums[0], dict(zip(metric_names, sums[1:])), g_layers, g_other, moe_out


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


def _moe_metrics(stats: ops.MoEStats) -> dict[str, jax.Array]:
    """The MoE metrics of a model without its own `_aux` (the names `Decoder` reports)."""
    return {"moe_aux_loss": jnp.mean(stats.aux_loss), "dropped_tokens": jnp.sum(stats.dropped),
            "expert_load": stats.load}


def _rebuild(template: nnx.State, values: dict[str, jax.Array]) -> nnx.State:
    """`template` (a State of Variables) with each leaf's value replaced by `values[path]`."""
    return nnx.map_state(lambda path, v: v.replace(values[path_str(path)]), template)


def _receive(buf: jax.Array, slot: jax.Array, value: jax.Array) -> jax.Array:
    """Write `value` into `buf[slot]` when slot >= 0 (a fixed-shape update either way)."""
    k = jnp.maximum(slot, 0)
    return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(slot >= 0, value, buf[k]), k, 0)
