"""Pipeline parallelism: a `shard_map` program over the `pipe` axis that runs a static schedule table.

A model pipelines when it comes in three parts (as `models.decoder.Decoder` does):

- `model.embed_inputs(batch) -> x`: the first stage's prologue (embedding);
- `model.blocks`: an NNX module whose parameters are stacked on a leading layers axis; called on one layer's slice
  it maps `x -> (x, aux)` (aux must be None: per-layer auxiliary losses such as MoE balancing are not pipelined
  yet);
- `model.head_loss(x, batch) -> (loss, metrics)`: the last stage's epilogue (final norm, head, loss).

Layer parameters live in a *staged layout* [P, V, Lmax, ...]: device p holds chunk v of stage s = v*P + p, padded to
the longest stage (padded layers are skipped, their weights stay zero, their gradients are zero). The rest of the
parameters (embedding, head, norms) are replicated over `pipe`; only the stages that use them contribute gradients.

Each step runs inside one `shard_map` that is manual over `pipe` and the batch axes (`data`, `fsdp`) and leaves
`expert`, `seq` and `tensor` to XLA's partitioner, so tensor parallelism inside a stage composes unchanged. The
local batch is cut into M microbatches; at every tick each device looks up its op in the table and runs it under
`lax.switch` (idle, forward, first-stage forward, backward, last-stage backward, first-stage backward), then
activations move to the next device and cotangents to the previous one with `ppermute`. A backward recomputes its
stage's forward (`jax.vjp`), so only stage inputs are buffered: as many as the table's slot count, which is what
makes 1F1B lighter than GPipe. Parameters are made batch-varying once before the loop, so the gradient reduction
over data and fsdp is one all-reduce after it, not one per tick. Parameters sharded over fsdp are gathered by XLA
once per step on entry (inside a pipeline fsdp behaves like ZeRO-2: it shards optimizer state, not live weights).
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

from autoshard import ops
from planner.errors import PlanError
from planner.params import path_str
from planner.plan import Plan, SpecEntry
from planner.rules import ParamInfo
from planner.schedule import (BWD, BWD_FIRST, BWD_LAST, FWD, FWD_FIRST, Schedule, check, make_schedule,
                              receive_permutations)

LAYERS = "blocks"
"""Attribute (and state-path prefix) of the stacked layer module a pipelinable model exposes."""
PIPE_BATCH_AXES = ("data", "fsdp")
"""Batch axes the executor makes manual (their gradient reduction is then once per step); `expert` stays
automatic so the MoE op can make it manual itself."""


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
        if plan.mesh["seq"] > 1 or plan.mesh["expert"] > 1:
            # Their collectives would run inside the per-stage lax.switch branches, which devices on different
            # stages take differently; XLA:CPU's collective-permute / all-to-all rendezvous spans every device of
            # the program, so that deadlocks (measured with ring attention on pipe=2,seq=2,data=2).
            raise PlanError(f"pipe={plan.mesh['pipe']} with seq/expert parallelism is not supported yet: use a "
                            f"pipeline over data/fsdp/tensor, or seq/expert without pipe")
        self.P, self.V, self.M = plan.mesh["pipe"], spec.virtual, spec.microbatches
        check(spec.schedule, self.P, self.M, self.V, layers)
        if spec.stages[-1][1] != layers:
            raise PlanError(f"pipeline stages cover layers [0, {spec.stages[-1][1]}) but the model has {layers} "
                            f"layers: re-plan for this model")
        self.plan, self.mesh, self.layers = plan, mesh, layers
        self.schedule: Schedule = make_schedule(spec.schedule, self.P, self.M, self.V)
        self.layout = StageLayout.from_stages(spec.stages, self.P, self.V)
        self.batch_axes = tuple(a for a in PIPE_BATCH_AXES if plan.mesh[a] > 1)
        self.manual = ("pipe",) + self.batch_axes
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
        manual = set(self.manual)
        layer_spec, other_spec = PartitionSpec("pipe"), PartitionSpec()
        batch_spec = PartitionSpec(self.batch_axes or None)
        metric_names = self._metric_names(params, rest, batch)

        def body(layer_vals, other_vals, rest, batch, tables):
            return self._body(dict(zip(layer_paths, layer_vals)), dict(zip(other_paths, other_vals)), rest, batch,
                              tables, metric_names, ops_context)

        tables = self._tables()
        fn = jax.shard_map(body, mesh=self.mesh, axis_names=manual,
                           in_specs=([layer_spec] * len(layer_paths), [other_spec] * len(other_paths), PartitionSpec(),
                                     batch_spec, PartitionSpec()),
                           out_specs=(PartitionSpec(), {k: PartitionSpec() for k in metric_names},
                                      [layer_spec] * len(layer_paths), [other_spec] * len(other_paths)))
        loss, metrics, g_layers, g_other = fn([flat[p] for p in layer_paths], [flat[p] for p in other_paths], rest,
                                              batch, tables)
        grads_flat = {**dict(zip(layer_paths, g_layers)), **dict(zip(other_paths, g_other))}
        grads = _rebuild(params, grads_flat)
        return loss, metrics, grads

    def _tables(self) -> dict[str, jax.Array]:
        s = self.schedule
        return {name: jnp.asarray(getattr(s, name)) for name in
                ("code", "chunk", "microbatch", "in_slot", "cot_slot", "recv_act", "recv_cot")}

    def _metric_names(self, params, rest, batch) -> tuple[str, ...]:
        """Scalar metrics of `head_loss` (traced on one microbatch's shapes)."""
        def probe(params, rest, batch):
            model = nnx.merge(self.graphdef, params, rest, copy=True)
            x = model.embed_inputs(batch)
            return model.head_loss(x, batch)[1]

        shapes = jax.eval_shape(probe, self.param_template, rest, batch)
        bad = [k for k, v in shapes.items() if v.shape != ()]
        if bad:
            raise PlanError(f"head_loss metric {bad[0]!r} is not a scalar: pipelined steps average scalar metrics "
                            f"over microbatches")
        return tuple(sorted(shapes))

    def _body(self, layers: dict[str, jax.Array], other: dict[str, jax.Array], rest, batch, tables,
              metric_names: tuple[str, ...], ops_context: ops.OpsContext):
        P, V, M = self.P, self.V, self.M
        vary = self.manual
        # Varying over every manual axis up front: the vjp of a device-invariant weight against batch-varying
        # activations would otherwise psum inside every tick (jax-idioms.md, pcast).
        layers = {k: _vary(v[0], self.batch_axes) for k, v in layers.items()}                  # [V, Lmax, ...]
        other = {k: jax.lax.pcast(v, vary, to="varying") for k, v in other.items()}
        me = jax.lax.axis_index("pipe")
        counts = jnp.asarray(self.layout.counts)[me]                                        # [V]
        local_batch = next(iter(batch.values())).shape[0]
        if local_batch % M:
            raise PlanError(f"{M} microbatches do not divide the per-replica batch of {local_batch} (global batch / "
                            f"data x fsdp): change --microbatches or --batch")
        mbs = local_batch // M
        micro = {k: v.reshape((M, mbs) + v.shape[1:]) for k, v in batch.items()}
        n_shards = math.prod(self.plan.mesh[a] for a in self.batch_axes)
        scale = 1.0 / (M * n_shards)                                        # loss = mean over microbatches, shards

        layer_paths, other_paths = sorted(layers), sorted(other)
        prefix = len(LAYERS) + 1

        def model_of(other_vals: dict[str, jax.Array]) -> nnx.Module:
            """The whole model on this device's non-layer weights (its layer weights are never called)."""
            return nnx.merge(self.graphdef, _rebuild(self.param_template, {**layers, **other_vals}), rest, copy=True)

        def layer_fn(x, layer_vals):
            values = {p[prefix:]: v for p, v in zip(layer_paths, layer_vals)}
            block = nnx.merge(self.blocks_graphdef, _rebuild(self.blocks_template, values))
            y, aux = block(ops.boundary(x, "layer_input"))
            if aux is not None:
                raise PlanError("layers that return auxiliary outputs (MoE balancing statistics) cannot be pipelined "
                                "yet: use pipe=1 for this model")
            return y

        even = self.layout.even
        step_layer = ops.remat(layer_fn)

        def run_chunk(chunk_vals: list[jax.Array], n, x):
            def scan_body(x, xs):
                j, layer_vals = xs
                if even:
                    return step_layer(x, layer_vals), None
                return jax.lax.cond(j < n, step_layer, lambda x, _: x, x, layer_vals), None
            lmax = chunk_vals[0].shape[0]
            return jax.lax.scan(scan_body, x, (jnp.arange(lmax), chunk_vals))[0]

        def chunk_of(c) -> list[jax.Array]:
            if V == 1:
                return [layers[p][0] for p in layer_paths]
            return [jax.lax.dynamic_index_in_dim(layers[p], c, 0, keepdims=False) for p in layer_paths]

        def mb(i) -> dict[str, jax.Array]:
            return {k: jax.lax.dynamic_index_in_dim(v, i, 0, keepdims=False) for k, v in micro.items()}

        # activation specs name only automatic axes here (seq, tensor): without them XLA may move the sequence
        # split of the stage input onto its batch dimension, which the attention ops' shard_maps cannot take
        local_specs = {k: _drop_axes(v, self.manual) for k, v in ops_context.activations.items()}
        with ops.context(dataclasses.replace(ops_context, activations=local_specs)):
            other_list = [other[p] for p in other_paths]
            x_shape = jax.eval_shape(lambda o: model_of(dict(zip(other_paths, o))).embed_inputs(mb(0)), other_list)
            zero_x = jax.lax.pcast(jnp.zeros(x_shape.shape, x_shape.dtype), vary, to="varying")

            def add_chunk(acc: list[jax.Array], c, g: list[jax.Array]) -> list[jax.Array]:
                if V == 1:
                    return [a + gi[None] for a, gi in zip(acc, g)]
                return [jax.lax.dynamic_update_index_in_dim(a, jax.lax.dynamic_index_in_dim(a, c, 0, False) + gi, c, 0)
                        for a, gi in zip(acc, g)]

            def idle(c, i, h, g, acc):
                return zero_x, zero_x, acc

            def fwd(c, i, h, g, acc):
                return run_chunk(chunk_of(c), counts[c], h), zero_x, acc

            def fwd_first(c, i, h, g, acc):
                x = model_of(dict(zip(other_paths, other_list))).embed_inputs(mb(i))
                return run_chunk(chunk_of(c), counts[c], x), zero_x, acc

            def bwd(c, i, h, g, acc):
                _, vjp = jax.vjp(lambda w, h: run_chunk(w, counts[c], h), chunk_of(c), h)
                dw, dh = vjp(g)
                return zero_x, dh, (add_chunk(acc[0], c, dw), acc[1], acc[2])

            def bwd_last(c, i, h, g, acc):
                batch_i = mb(i)

                def f(w, o, h):
                    loss, metrics = model_of(dict(zip(other_paths, o))).head_loss(run_chunk(w, counts[c], h), batch_i)
                    return loss * scale, (loss, metrics)
                _, vjp, (loss, metrics) = jax.vjp(f, chunk_of(c), other_list, h, has_aux=True)
                dw, do, dh = vjp(jax.lax.pcast(jnp.ones((), jnp.float32), vary, to="varying"))
                values = [loss] + [metrics[k] for k in metric_names]
                sums = [s + v.astype(jnp.float32) * scale for s, v in zip(acc[2], values)]
                return zero_x, dh, (add_chunk(acc[0], c, dw), [a + d for a, d in zip(acc[1], do)], sums)

            def bwd_first(c, i, h, g, acc):
                batch_i = mb(i)

                def f(w, o):
                    return run_chunk(w, counts[c], model_of(dict(zip(other_paths, o))).embed_inputs(batch_i))
                _, vjp = jax.vjp(f, chunk_of(c), other_list)
                dw, do = vjp(g)
                return zero_x, zero_x, (add_chunk(acc[0], c, dw), [a + d for a, d in zip(acc[1], do)], acc[2])

            branches = [None] * 6
            for code, fn in ((0, idle), (FWD, fwd), (FWD_FIRST, fwd_first), (BWD, bwd), (BWD_LAST, bwd_last),
                             (BWD_FIRST, bwd_first)):
                branches[code] = fn
            fwd_pairs, bwd_pairs = receive_permutations(P, V)
            k_act, k_cot = self.schedule.act_slots, self.schedule.cot_slots

            # What moves between stages has the plan's layer_input layout (its automatic axes): pinned on the
            # sends, so the bytes a tick transfers do not depend on how XLA propagates the embedding's layout.
            carried = local_specs.get("layer_input")

            def pin(x):
                return ops.constrain(x, carried) if carried is not None else x

            def buffer(k):
                buf = jax.lax.pcast(jnp.zeros((k,) + x_shape.shape, x_shape.dtype), vary, to="varying")
                return ops.constrain(buf, PartitionSpec(None, *carried)) if carried is not None else buf

            def zeros_like_varying(a):
                return jax.lax.pcast(jnp.zeros(a.shape, a.dtype), vary, to="varying")  # noqa: one buffer per leaf

            acc0 = ([zeros_like_varying(layers[p]) for p in layer_paths],
                    [zeros_like_varying(other[p]) for p in other_paths],
                    [jax.lax.pcast(jnp.zeros((), jnp.float32), vary, to="varying") for _ in range(1 + len(metric_names))])

            def tick(carry, row):
                acts, cots, acc = carry
                code, c, i = row["code"][me], row["chunk"][me], row["microbatch"][me]
                h = acts[jnp.maximum(row["in_slot"][me], 0)]
                g = cots[jnp.maximum(row["cot_slot"][me], 0)]
                send_act, send_cot, acc = jax.lax.switch(
                    code, [lambda ops_, fn=fn: fn(*ops_) for fn in branches], (c, i, h, g, acc))
                got_act = pin(jax.lax.ppermute(pin(send_act), "pipe", fwd_pairs))
                got_cot = pin(jax.lax.ppermute(pin(send_cot), "pipe", bwd_pairs))
                acts = _receive(acts, row["recv_act"][me], got_act)
                cots = _receive(cots, row["recv_cot"][me], got_cot)
                return (acts, cots, acc), None

            (_, _, (g_layers, g_other, sums)), _ = jax.lax.scan(tick, (buffer(k_act), buffer(k_cot), acc0), tables)

        g_layers = [(jax.lax.psum(g, self.batch_axes) if self.batch_axes else g)[None] for g in g_layers]
        g_other = [jax.lax.psum(g, self.manual) for g in g_other]
        sums = [jax.lax.psum(s, self.manual) for s in sums]
        return sums[0], dict(zip(metric_names, sums[1:])), g_layers, g_other


def _drop_axes(spec: PartitionSpec, axes: tuple[str, ...]) -> PartitionSpec:
    """`spec` without the mesh axes in `axes` (a shard_map's manual axes cannot appear in sharding constraints)."""
    def keep(e):
        if e is None:
            return None
        kept = tuple(a for a in ((e,) if isinstance(e, str) else e) if a not in axes)
        return None if not kept else kept[0] if len(kept) == 1 else kept
    return PartitionSpec(*(keep(e) for e in spec))


def _vary(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return jax.lax.pcast(x, axes, to="varying") if axes else x


def _rebuild(template: nnx.State, values: dict[str, jax.Array]) -> nnx.State:
    """`template` (a State of Variables) with each leaf's value replaced by `values[path]`."""
    return nnx.map_state(lambda path, v: v.replace(values[path_str(path)]), template)


def _receive(buf: jax.Array, slot: jax.Array, value: jax.Array) -> jax.Array:
    """Write `value` into `buf[slot]` when slot >= 0 (a fixed-shape update either way)."""
    k = jnp.maximum(slot, 0)
    return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(slot >= 0, value, buf[k]), k, 0)
