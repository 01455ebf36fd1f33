"""Pipeline planning: per-layer costs, a stage split, the schedule and microbatch count, and what they predict.

The intra-stage sharding (data / fsdp / tensor) is the intra-op integer program's solution for the mesh
(`planner.ilp.Problem`, the same one the search solves), and its per-op costs are split into three regions: the
embedding (ops before the layer stack: the first stage's prologue), one layer (the stack's ops, divided by the
layer count) and the head and loss (ops after the stack: the last stage's epilogue). One microbatch of M costs what
`microbatch_seconds` says: each op's roofline at the microbatch's size (its weights read whole by every microbatch)
and each in-stage collective's fixed terms per microbatch, the rest 1/M of the per-replica figure.

As the executor (`autoshard.pipeline`) runs a stage:

- a forward tick costs the stage's forward (1/passes of its training work); without the stash the last stage's is
  empty;
- a backward tick runs the backward alone from the residuals its forward kept (pipeline mode "none",
  `planner.schedule.PIPELINE_MODES`); in mode "recompute" it recomputes the forward from the stage input and runs
  the backward, the full training work (passes x forward), and under "full" one more forward of its layers. The
  last stage's backward runs its head and loss, and without the stash its forward too (its forward tick empty);
  the first stage's embeds its microbatch again (a lookup);
- zb (`planner.schedule`, mode "none" and V = 1 only) splits each backward tick into B and W: W is the stage's
  weight gradients, each weight op's (`weight_ops`: a matmul or convolution with a weight) costing its forward, B
  the rest (`zb_ticks`); B saves each weight op's output cotangent for its W (a grad slot, `grad_bytes`), and a
  microbatch's residuals are held from its forward to its W;
- memory: the schedule's stage-input and cotangent buffers, and with the stash each in-flight microbatch's
  residuals of the longest stage (`stash_bytes`: what the vjp closure keeps per layer, `Problem.saved` less
  `unkept_bytes`), zb's grad slots, the gradient buffers (`GRADIENT_BUFFERS`) and one microbatch's working set
  (`_working_set`), all counted from the compiled buffers, none fitted;
- a tick ends with up to two point-to-point sends of one microbatch's stage input (activation forward, cotangent
  backward) over the link between neighbouring pipe devices (pipe is the outermost mesh axis), each paying the
  link's latency (`transfer_seconds`), where some device has one to send (`planner.schedule.Schedule.sends`);
- the ticks run in lockstep, so a tick costs its slowest op (`planner.schedule.step_time`);
- once per step: fsdp-sharded weights are gathered on entry, layer gradients are all-reduced over data x fsdp and
  the replicated non-layer gradients over pipe x data x fsdp.

Microbatch counts are every divisor of the per-replica batch, down to one sequence per microbatch; `choose` builds
only the layouts its lower bounds cannot rule out. The stage split minimises the largest stage's forward + backward
time under the per-device memory budget, by a parametric search: for a bound tau, packing layers greedily from the
first stage is optimal (stage costs grow with their layers), and the smallest feasible tau is found by bisection
over the candidate values.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import defaultdict
from typing import Any

import numpy as np

from planner.cluster import ClusterSpec
from planner.calibration import WORKING_SET
from planner.errors import PlanError
from planner.collectives import axis_collective_time, axis_span, bytes_sent, collective_time
from planner import jax_internals as jint
from planner.ilp import (PRODUCT_OPS, ParamChoice, Problem, Solution, _shared, exceeds, optimizer_copies,
                         stacked_params)
from planner.layouts import local_nbytes
from planner.plan import PipelineSpec
from planner.schedule import (IDLE, PIPELINE_MODES, ZERO_BUBBLE, Schedule, check, make_schedule, mode_settings,
                              stashes, warmup)
from planner.trace import BOUNDARY, CONTRACTIONS, Graph, dtype_kind, itemsize

REGIONS = ("embed", "layer", "head")
MAX_VIRTUAL = 4
"""Largest number of virtual stages per device the search tries (each one more shortens the bubble less)."""


@dataclasses.dataclass
class MeshCosts:
    """One mesh's intra-stage costs, per device, over the whole per-replica batch (divide by M per microbatch)."""

    mesh: dict[str, int]
    layers: int
    passes: float
    work: dict[str, float]
    """Seconds of training work (forward + backward, tensor communication included) by region; `layer`: one layer."""
    tensor_bytes: dict[str, dict[str, float]]
    """Region -> `tensor/<collective>` -> bytes sent (one layer for `layer`)."""
    layer_bytes: float
    """Weight bytes of one layer per device (split over tensor, whole over fsdp)."""
    other_bytes: float
    layer_fsdp: float
    """Fraction of the layer weights that fsdp shards (the rest cannot be split evenly)."""
    other_fsdp: float
    residuals: dict[str, float]
    """Bytes the backward keeps by region (`layer`: one layer), as XLA stores them (`Problem.residuals`)."""
    carry_bytes: float
    """One stage input [batch, seq, hidden] over the per-replica batch, per device: whole over `tensor`, the plan's
    `layer_input` layout, which the executor pins on what it buffers and sends."""
    carry_wire_bytes: float
    """`carry_bytes` as a collective-permute moves them (the backend's collective dtype:
    `ClusterSpec.wire_itemsize`)."""
    solution: Solution
    sweep: bool = False
    """MoE layers: the executor runs a forward-only sweep over the schedule first (whole-batch expert counts)."""
    layer_expert_share: float = 0.0
    """Fraction of `layer_bytes` in weights split over `expert` (their gradients are not summed over it)."""
    optimizer_copies: float = 2.0
    """Optimizer state per parameter, in copies of it (`planner.ilp.optimizer_copies`)."""
    op_terms: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """Region -> one row per priced op: (executions, compute s over the batch, compute s per call, memory s over the
    batch, memory s per call); its roofline at M = 1 is the ops' share of `work` (`microbatch_seconds`)."""
    kept_layer: float = 0.0
    """Bytes per device of one layer's residuals the vjp closure keeps, what a residual slot holds: one layer's of
    `Problem.saved` (what JAX's linearization saves, before XLA fuses any away) less `unkept_bytes` (`stash_bytes`). Exact against the compiled slots (GPipe - 1F1B: +0.01%)."""
    call_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    """Region -> seconds of the in-stage collectives that every call pays whatever its size (latency, overhead, and
    whole conversions of values without a batch dimension); `layer`: one layer."""
    weight_terms: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 5)))
    """One layer's weight gradients as `op_terms` rows (one execution a layer): each weight op's (`weight_ops`)
    forward, which is what its weight gradient costs (the same FLOPs and bytes); what a zb W tick runs
    (`weight_seconds`)."""
    interface: float = 0.0
    """Bytes per device, over the per-replica batch, of what one layer's zb B saves for its W: the output cotangent
    of each weight op (`weight_ops`), counted from the traced graph like `kept_layer` (`grad_bytes`), each whole
    over tensor as the executor's grad slots hold them (`autoshard.pipeline._Split.buffers`). Measured on gpt-tiny
    with 8 layers, 8 microbatches: the executor's interface is exactly this count on pipe=2 x data=2 x tensor=2 and
    on pipe=4 x data=2, and the compiled zb step's memory exceeds 1F1B's by 1.08x and 0.94x one grad slot."""
    working: dict[str, float] = dataclasses.field(default_factory=dict)
    """Bytes per device of the matmul outputs by region (`layer`: one layer's), over the per-replica batch: what
    the backward's working set is made of (`Problem.working_set`, `WORKING_SET` x these)."""
    _per_microbatch: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict, init=False, repr=False,
                                                                     compare=False)


@dataclasses.dataclass
class PipelineChoice:
    """A pipeline layout and its predictions."""

    spec: PipelineSpec
    step_seconds: float
    memory: list[float]
    """Per-device memory of each pipe device (device p holds stages p, P + p, ...)."""
    predicted: dict[str, Any]


def region_of(graph: Graph) -> dict[int, str]:
    """Op index -> embed / layer / head, split at the layer stack's boundary op."""
    start = next((op.index for op in graph.ops if op.primitive == BOUNDARY), None)
    if start is None:
        return {op.index: "layer" for op in graph.ops}
    return {op.index: "layer" if op.in_layer or op.primitive == BOUNDARY else "embed" if op.index < start else "head"
            for op in graph.ops}


def pipelinable(graph: Graph) -> bool:
    return graph.layers > 1 and bool(graph.carries) and any(op.primitive == BOUNDARY for op in graph.ops)


def is_layer_param(graph: Graph, path: str) -> bool:
    """A parameter stacked over the layers, whose slices the layer scan reads (`stacked_params`): not any weight
    whose leading dimension happens to equal the layer count."""
    return path in stacked_params(graph)


def mesh_costs(problem: Problem, sol: Solution) -> MeshCosts:
    """Split a solved mesh's costs into embedding, one layer and head (`problem` in time units)."""
    g = problem.g
    region = region_of(g)
    work: dict[str, float] = defaultdict(float)
    for i, s in sol.ops.items():
        work[region[i]] += problem.op_cost(i, s)
    tensor_time, call_seconds, tensor_bytes = _tensor_comm(problem, sol, region)
    for r, t in tensor_time.items():
        work[r] += t
    L = g.layers
    work["layer"] /= L
    call_seconds["layer"] /= L
    terms = _op_terms(problem, sol, region)
    terms["layer"][:, 0] /= L
    tensor_bytes["layer"] = {k: v / L for k, v in tensor_bytes["layer"].items()}
    layer_bytes = other_bytes = layer_f = other_f = layer_e = 0.0
    for path, c in sol.params.items():
        nb = param_bytes(problem, path, c)
        f_ok = c.fsdp_dim is not None
        if is_layer_param(g, path):
            layer_bytes += nb / L
            layer_f += nb / L if f_ok else 0.0
            layer_e += nb / L if problem.expert_split(path) > 1 else 0.0
        else:
            other_bytes += nb
            other_f += nb if f_ok else 0.0
    residuals = _by_region(problem, sol, region, problem.residuals())
    working = _by_region(problem, sol, region, {v: g.ops[g.values[v].producer].count for v in problem.working_set()})
    kept = _by_region(problem, sol, region, problem.saved()).get("layer", 0.0)  # what the vjp closure keeps, not all the rule counts (`unkept_bytes`)
    if kept:
        extra = unkept_bytes(problem)
        kept = max(kept - extra / (problem.b * problem.t), 0.0) if extra >= 0 else kept - extra / problem.b
    wops = [i for i in weight_ops(problem) if region[i] == "layer"]
    weight_terms = _op_terms(problem, sol, region, wops, passes=1.0)["layer"]
    weight_terms[:, 0] /= L
    interface = _by_region(problem, sol, region, {o: g.ops[i].count for i in wops for o in g.ops[i].outputs
                                                  if g.values[o].batch_dim is not None
                                                  and dtype_kind(g.values[o].dtype) == "float"}, whole=True)
    carry = g.values[g.carries[0][1]]
    carry_bytes = local_nbytes(carry, problem.b)
    return MeshCosts(dict(problem.mesh), L, problem.passes, dict(work), dict(tensor_bytes), layer_bytes, other_bytes,
                     layer_f / layer_bytes if layer_bytes else 0.0, other_f / other_bytes if other_bytes else 0.0,
                     dict(residuals), carry_bytes,
                     carry_bytes * problem.cluster.wire_itemsize(carry.dtype) / itemsize(carry.dtype), sol,
                     layer_expert_share=layer_e / layer_bytes if layer_bytes else 0.0,
                     optimizer_copies=optimizer_copies(g), op_terms=terms, call_seconds=dict(call_seconds),
                     weight_terms=weight_terms, interface=interface.get("layer", 0.0), kept_layer=kept,
                     working=working)


def unkept_bytes(problem: Problem) -> float:
    """Bytes per layer, at the traced (global) shapes, that `Problem.saved` counts and a pipeline stage's forward
    does not keep: the rule's per-layer values less the vjp closure's per-layer leaves that depend on the batch
    (`jax_internals.stacked_residual_bytes`: JAX's own linearization of the traced loss, what
    `autoshard.pipeline._Stash` keeps). The rule counts values the closure does not (gpt-tiny: a third score
    matrix, two tanh-GELU intermediates, 0.27 of the rule at sequence 64; the share changes with the sequence
    length, so it is counted for each model and shape, never fitted). `mesh_costs` takes these off the per-device
    rule as if each were split over the batch shards and tensor, the most it can be split (`MeshCosts.kept_layer`:
    never under what the slot holds; at tensor = 1 exact). Negative where the closure keeps more than the rule
    (then added as split over the batch alone); 0 where the graph has no traced scan (a folded Python loop)."""
    g = problem.g
    if g.jaxpr is None or g.stack != "scan" or g.layers < 2 or not problem.attention_residuals:
        return 0.0  # (a sequence method's attention keeps its own residuals, not the traced dense one's)

    def unkept() -> float:
        rule = sum(local_nbytes(g.values[v], 1) * n for v, n in problem.saved().items() if n >= g.layers)
        kept = jint.stacked_residual_bytes(g.jaxpr, len(g.param_values), g.layers)
        return (rule - kept) / g.layers if kept else 0.0
    return _shared(g, ("unkept_bytes", problem.attention_residuals), unkept)


def weight_ops(problem: Problem) -> list[int]:
    """Ops with a weight gradient of their own, what a zb W tick computes: products (`PRODUCT_OPS`: a matmul or
    convolution with a weight, a norm's scale) of a batched value and a weight (a parameter, or a value computed
    from parameters alone, like a broadcast scale). The other ops' gradients (and these ops' input gradients) are
    B's. A bias (an `add`) is left out: its gradient sums a cotangent a weight op's W already has, or costs
    nothing (an approximation)."""
    g = problem.g
    weights = {vid for vid, v in g.values.items() if v.param is not None}
    out = []
    for op in g.ops:
        ins = [i for i in op.inputs if i is not None]
        if ins and all(i in weights for i in ins):
            weights.update(o for o in op.outputs if g.values[o].batch_dim is None)
        elif op.primitive in PRODUCT_OPS and any(i in weights for i in ins) \
                and any(g.values[i].batch_dim is not None for i in ins if i not in weights):
            out.append(op.index)
    return out


def _by_region(problem: Problem, sol: Solution, region: dict[int, str], kept: dict[int, int], whole: bool = False
               ) -> dict[str, float]:
    """Bytes per device of the values `kept` (value -> copies), by region of their producer (`layer`: one layer's);
    `whole`: each whole over tensor, whatever its layout."""
    out: dict[str, float] = defaultdict(float)
    L = problem.g.layers
    for vid, n in kept.items():
        nb = problem.value_memory(vid, None if whole else problem.layout_of(vid, sol.ops, sol.params))
        v = problem.g.values[vid]
        r = region.get(v.producer, "embed") if v.producer is not None else "embed"
        if n >= L > 1:
            out["layer"] += nb * n / L
        else:
            out["head" if r == "layer" else r] += nb * n
    return dict(out)


def param_bytes(problem: Problem, path: str, c: ParamChoice) -> float:
    """Bytes of a parameter per pipe device under choice `c`: split over tensor (and expert), whole over fsdp."""
    return problem.fsdp_whole_bytes(path, c)


def with_extras(costs: MeshCosts, extras: Any, layers: int, moe: bool) -> MeshCosts:
    """Costs with the sequence / expert ops' exchanges (`planner.seq_expert.extras`, per step) spread over the
    layers that run them, their own residuals kept per layer and their transient with the head's; `moe`: the
    executor's statistics sweep runs."""
    per = 1.0 / max(layers, 1)
    work = dict(costs.work)
    work["layer"] = work.get("layer", 0.0) + sum(extras.seconds.values()) * per
    tensor_bytes = {r: dict(v) for r, v in costs.tensor_bytes.items()}
    layer_bytes = tensor_bytes.setdefault("layer", {})
    for key, nb in extras.comm_bytes.items():
        layer_bytes[key] = layer_bytes.get(key, 0.0) + nb * per
    residuals, kept_layer = dict(costs.residuals), costs.kept_layer
    for key, nb in extras.memory.items():
        region = "layer" if key.endswith("residuals") else "head"
        residuals[region] = residuals.get(region, 0.0) + (nb * per if region == "layer" else nb)
        kept_layer += nb * per if region == "layer" else 0.0
    return dataclasses.replace(costs, work=work, tensor_bytes=tensor_bytes, residuals=residuals,
                               kept_layer=kept_layer, sweep=moe)


def _fsdp_choice(problem: Problem, path: str, c: ParamChoice) -> ParamChoice | None:
    """The ZeRO choice with the same tensor layout, if fsdp can shard this parameter (inside a pipeline fsdp only
    shards weights and optimizer state at rest: the step gathers them once on entry)."""
    if problem.mesh["fsdp"] == 1:
        return None
    if c.fsdp_dim is not None:
        return c
    return next((o for o in problem.param_options(path) if o.layout == c.layout and o.fsdp_dim is not None), None)


def pipeline_params(problem: Problem, sol: Solution) -> dict[str, ParamChoice]:
    """The solution's parameter choices with fsdp sharding every parameter it can (ZeRO-2 inside a pipeline)."""
    return {path: _fsdp_choice(problem, path, c) or c for path, c in sol.params.items()}


def _tensor_comm(problem: Problem, sol: Solution, region: dict[int, str]):
    """(seconds, seconds paid per call, bytes) of the tensor-axis conversions by region of the consuming op: the
    conversions `Problem.use_conversions` states (what the integer program and `evaluate` pay), each key once. A
    microbatch converts 1/M of a batched value but pays each collective's fixed terms whole: `_fixed_part`."""
    times: dict[str, float] = defaultdict(float)
    fixed: dict[str, float] = defaultdict(float)
    nbytes: dict[str, dict[str, float]] = {r: defaultdict(float) for r in REGIONS}
    if problem.t == 1:
        return times, fixed, nbytes
    paid = set()
    for vid, v in problem.g.values.items():
        lay = problem.layout_of(vid, sol.ops, sol.params)
        batched = v.batch_dim is not None
        for cidx, pos in v.consumers:
            r = region[cidx]
            for key, kind, nb, count in problem.use_conversions(vid, lay, cidx, pos, sol.ops[cidx]):
                if key in paid:
                    continue
                paid.add(key)
                seconds = problem.comm_seconds(kind, nb, ("tensor",))
                times[r] += count * seconds
                fixed[r] += count * (_fixed_part(problem, kind, nb) if batched else seconds)
                nbytes[r][f"tensor/{kind}"] += count * bytes_sent(kind, nb, problem.t)
    return times, fixed, nbytes


def _fixed_part(problem: Problem, kind: str, nb: float) -> float:
    """The seconds of one tensor collective that do not shrink with its bytes (its latency and overhead terms): the
    alpha-beta time is affine in the bytes, so this is its intercept, 2 c(nb) - c(2 nb)."""
    return max(2 * problem.comm_seconds(kind, nb, ("tensor",)) - problem.comm_seconds(kind, 2 * nb, ("tensor",)), 0.0)


def _op_terms(problem: Problem, sol: Solution, region: dict[int, str], only: list[int] | None = None,
              passes: float | None = None) -> dict[str, np.ndarray]:
    """Per region, the roofline terms of each priced op (`MeshCosts.op_terms`), as `Problem.op_cost` prices it
    (the same FLOPs, bytes and passes), its FLOPs and bytes split into those over the batch and those of values
    without a batch dimension (weights), which every microbatch reads again; `only`: of these ops alone, and
    `passes`: each run that many times (default: as `Problem.op_cost`)."""
    rows: dict[str, list[tuple[float, ...]]] = {r: [] for r in REGIONS}
    rate, bw = problem.cluster.matmul_flops(problem.dtype), problem.cluster.hbm_bandwidth
    for i in (sol.ops if only is None else only):
        s, op = sol.ops[i], problem.g.ops[i]
        if not problem.op_cost(i, s) > 0:  # fused elementwise ops and sources are free
            continue
        vals = [problem.values[v] for v in op.inputs + op.outputs if v is not None]
        t = problem.t if s.split else 1
        batched = any(v.batch_dim is not None for v in vals)
        flops = op.flops / t / (problem.b if batched else 1) / rate if op.primitive in CONTRACTIONS else 0.0
        mem = [sum(local_nbytes(v, problem.b) for v in vals if (v.batch_dim is not None) == b) / t / bw
               for b in (True, False)]
        runs = passes if passes is not None else \
            problem.passes + (1.0 if problem.remat == "full" and op.in_layer else 0.0)
        rows[region[i]].append((runs * op.count, flops if batched else 0.0, 0.0 if batched else flops, *mem))
    return {r: np.asarray(v, float).reshape(-1, 5) for r, v in rows.items()}


# -- one pipeline layout -------------------------------------------------------------------------------------------

def microbatch_seconds(costs: MeshCosts, microbatches: int) -> dict[str, float]:
    """Seconds of one microbatch's training work by region (`layer`: one layer) with the per-replica batch cut into
    M: the one place that says what a microbatch costs, so that more microbatches are not free.

    Priced with what the cost model already knows, and nothing fitted: each op by its roofline at the microbatch's
    size (its batch's FLOPs and bytes / M; the bytes of values without a batch dimension, the weights, whole: every
    microbatch reads them again, so small microbatches turn memory-bound), and each in-stage collective's fixed
    terms (latency, overhead: `MeshCosts.call_seconds`) paid per microbatch. The rest of `work` (its collectives'
    bandwidth terms, and the sequence / expert exchanges `with_extras` adds, whose own latency terms are not told
    apart: *approximation*) is linear in the batch: / M. At M = 1 this is `work`. What every tick costs besides its
    ops (its sends) is `transfer_seconds`. No per-microbatch executor constant is added: measured on this
    machine's emulated CPU devices it is not defensible (`runs/benchmarks/microbatch_overhead.md`)."""
    M = microbatches
    out = costs._per_microbatch.get(M)
    if out is None:
        out = costs._per_microbatch[M] = {}
        for r in REGIONS:
            terms, calls = costs.op_terms.get(r), costs.call_seconds.get(r, 0.0)
            whole = costs.work.get(r, 0.0)
            if terms is None or not len(terms):
                out[r] = calls + (whole - calls) / M
                continue
            out[r] = _roofline(terms, M) + calls + (whole - _roofline(terms, 1) - calls) / M
    return out


def _roofline(terms: np.ndarray, microbatches: int) -> float:
    """Seconds of ops (`MeshCosts.op_terms` rows) run on one microbatch of M: each the larger of its compute and its
    memory traffic."""
    n, cb, cf, mb, mf = terms.T
    return float(n @ np.maximum(cb / microbatches + cf, mb / microbatches + mf))


def stage_ticks(costs: MeshCosts, counts: list[int], microbatches: int, remat: str = "none"
                ) -> tuple[np.ndarray, np.ndarray]:
    """Seconds of one microbatch's forward tick and backward tick on each stage (stage order): the backward alone
    where the forward kept its residuals (`stashes`; the last stage's forward too, an op of its own, its backward
    tick the head, loss and backward), else the forward again, plus the remat's recompute (the last stage's forward
    then runs in its backward tick)."""
    S = len(counts)
    w = microbatch_seconds(costs, microbatches)
    n = np.asarray(counts, float)
    fwd = n * w["layer"] / costs.passes
    again = fwd if remat == "full" else np.zeros(S)  # the remat's recompute
    bwd = n * w["layer"] + again - (fwd if stashes(remat) else 0.0)
    bwd[S - 1] += w["head"]
    fwd[0] += w["embed"] / costs.passes
    bwd[0] += w["embed"]
    if not stashes(remat):
        fwd[S - 1] = 0.0
    return fwd, bwd


def weight_seconds(costs: MeshCosts, microbatches: int) -> float:
    """Seconds of one layer's weight gradients on one microbatch of M (a zb W tick's work a layer): each weight
    op's forward at the microbatch's size (`MeshCosts.weight_terms`), as `microbatch_seconds` prices the ops."""
    return _roofline(costs.weight_terms, microbatches) if len(costs.weight_terms) else 0.0


def zb_ticks(costs: MeshCosts, counts: list[int], microbatches: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seconds of one microbatch's F, B and W ticks on each stage under the zb schedule (pipeline mode "none"):
    W = the stage's layers' weight gradients (`weight_seconds`), B = the rest of `stage_ticks`' backward (B + W =
    that backward, so the step's work is 1F1B's), the last stage's B with its forward and head as there. The
    embedding's and the head's weight gradients stay in the first / last stage's B (one small op each)."""
    fwd, bwd = stage_ticks(costs, counts, microbatches, "none")
    wgt = np.asarray(counts, float) * weight_seconds(costs, microbatches)
    return fwd, bwd - wgt, wgt


def tick_seconds(costs: MeshCosts, counts: list[int], microbatches: int, remat: str, kind: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(forward, backward, weight-gradient) seconds a tick of each stage, as `lockstep_seconds` takes them: zb's
    (`zb_ticks`, its backward the B op) or `stage_ticks`' with no W op (None)."""
    if kind in ZERO_BUBBLE:
        return zb_ticks(costs, counts, microbatches)
    return (*stage_ticks(costs, counts, microbatches, remat), None)


GRADIENT_BUFFERS = 2
"""Full-size (unsharded over fsdp) gradient buffers of a pipeline stage's weights besides weights and optimizer
state at rest: the tick loop's accumulator and the gradient reduced over the batch axes after it (counted in the
compiled buffers of gpt-tiny pipelines, docs/cost-model.md)."""


def _state(nb: float, sharded: float, fsdp: int, copies: float) -> float:
    """Bytes kept for `nb` bytes of weights of which a `sharded` share is split over fsdp: weights and optimizer
    state at rest, the gathered copy, the gradient buffers."""
    at_rest = nb * (sharded / fsdp + (1 - sharded)) * (1 + copies)
    return at_rest + (nb * sharded if fsdp > 1 else 0.0) + GRADIENT_BUFFERS * nb


def weights_memory(costs: MeshCosts, layer_slots: float) -> float:
    """Bytes of weights, optimizer state and gradients on a pipe device that holds `layer_slots` layers (the staged
    layout pads each of its V stages to the longest: V x Lmax), with the replicated non-layer weights."""
    f, copies = costs.mesh["fsdp"], costs.optimizer_copies
    return (_state(layer_slots * costs.layer_bytes, costs.layer_fsdp, f, copies)
            + _state(costs.other_bytes, costs.other_fsdp, f, copies))


def weights_floor(costs: MeshCosts) -> float:
    """A lower bound on the memory of every pipe device under every layout: V x Lmax >= layers / pipe (the stages
    cover the layers), `weights_memory` grows with the layers held, and buffers and working sets are not
    negative."""
    return weights_memory(costs, costs.layers / costs.mesh["pipe"])


def unsolved_weights_floor(problem: Problem, mesh: dict[str, int]) -> float:
    """`weights_floor` before the intra-stage program is solved, for whatever it chooses: `_state` is linear in
    the bytes and in the sharded share, so the total is at least the sum over parameters of each one's least:
    its smallest tensor layout, sharded over fsdp or not, whichever keeps less."""
    g, f, copies = problem.g, mesh["fsdp"], optimizer_copies(problem.g)
    total = 0.0
    for path, choices in problem.param_choices.items():
        share = 1 / mesh["pipe"] if is_layer_param(g, path) else 1.0
        nb = share * min(param_bytes(problem, path, c) for c in choices)
        total += min(_state(nb, 0.0, f, copies), _state(nb, 1.0, f, copies))
    return total


def stage_memory(costs: MeshCosts, counts: list[int], sched: Schedule, remat: str = "none") -> list[float]:
    """Bytes per pipe device: its weights, gradients and optimizer state (stages padded to the longest), the
    replicated non-layer weights, the schedule's buffers (`buffer_bytes`: with the stash, every device's, one
    program; zb's grad slots too) and one microbatch's backward working set."""
    P, V, M = sched.devices, sched.virtual, sched.microbatches
    assert sched.stash == stashes(remat), (sched.stash, remat)
    weights = weights_memory(costs, V * max(counts))
    buffers = buffer_bytes(costs, max(counts), sched)
    out = []
    for p in range(P):
        stages = [v * P + p for v in range(V)]
        out.append(weights + buffers + _working_set(costs, max(counts[s] for s in stages), 0 in stages,
                                                    P * V - 1 in stages, M, remat, max(counts)))
    return out


def stash_bytes(costs: MeshCosts, lmax: int, microbatches: int) -> float:
    """One residual slot of a stashing pipeline: a microbatch's residuals of a stage padded to `lmax` layers, as
    the vjp closure keeps them (`MeshCosts.kept_layer`, what the executor's slot holds)."""
    return lmax * costs.kept_layer / microbatches


def grad_bytes(costs: MeshCosts, lmax: int, microbatches: int) -> float:
    """One grad slot of the zb schedule: what a microbatch's B saves for its W (`MeshCosts.interface`) on a stage
    padded to `lmax` layers (the head's and embedding's weight gradients stay in B: nothing saved for them)."""
    return lmax * costs.interface / microbatches


def buffer_bytes(costs: MeshCosts, lmax: int, sched: Schedule) -> float:
    """The schedule's buffers on every device: stage inputs and cotangents, the residual slots and (zb) the grad
    slots (`slot_bytes`)."""
    return slot_bytes(costs, lmax, sched.microbatches, sched.act_slots + sched.cot_slots, sched.stash_slots,
                      sched.grad_slots)


def slot_bytes(costs: MeshCosts, lmax: int, microbatches: int, carries: int, stashed: int, grads: int) -> float:
    """Bytes of `carries` stage-input / cotangent slots, `stashed` residual slots and `grads` grad slots on a
    device of stages padded to `lmax` layers: the one rule for `buffer_bytes` and `layout_memory_floor`."""
    M = microbatches
    return carries * costs.carry_bytes / M + stashed * stash_bytes(costs, lmax, M) + grads * grad_bytes(costs, lmax, M)


def _working_set(costs: MeshCosts, longest: int, first: bool, last: bool, microbatches: int, remat: str,
                 lmax: int | None = None) -> float:
    """One microbatch's working set beyond the schedule's buffers on a pipe device whose longest stage has
    `longest` layers (`first` / `last`: it holds the embedding / the head; `lmax`: the longest stage of all).

    Counted from the compiled buffers of gpt-tiny pipelines (docs/cost-model.md): the backward of one layer
    (`_layer_backward`), and the head's or the embedding's residuals. With
    the stash, a backward tick also reads a copy of its residual slot and a forward tick makes its residuals before
    it writes them (two slot-sized sets: every tick is one program, `lmax` layers). Without it, a backward tick
    recomputes its stage's residuals first; under remat "full" those are the layer inputs, and the one layer
    recomputed at a time holds its residuals (with the head's, `residuals["head"]`) and the backward working set
    of the intra-op program (`WORKING_SET`)."""
    M, layer, lmax = microbatches, costs.residuals.get("layer", 0.0), longest if lmax is None else lmax
    ends = (costs.residuals.get("embed", 0.0) if first else 0.0) + (costs.residuals.get("head", 0.0) if last else 0.0)
    if stashes(remat):
        return 2 * stash_bytes(costs, lmax, M) + (_layer_backward(costs, lmax) + ends) / M
    if remat == "full":
        return (longest * layer + ends + WORKING_SET * costs.working.get("layer", 0.0)) / M
    return (longest * layer + _layer_backward(costs, lmax) + ends) / M


def _layer_backward(costs: MeshCosts, lmax: int) -> float:
    """The working set of one layer's backward in a stage program of `lmax` layers, over the per-replica batch: as
    in a layer scan, that layer's residuals once more; with one layer a stage XLA drops the loop and the backward
    is straight-line code, whose working set is `WORKING_SET` x the layer's matmul outputs (as without a pipeline,
    `Problem.value_memory_items`; gpt-tiny at pipe=4 with 4 layers: the layer's residuals over-counted it 1.6x)."""
    if lmax > 1:
        return costs.residuals.get("layer", 0.0)
    return WORKING_SET * costs.working.get("layer", 0.0)


def layout_memory_floor(costs: MeshCosts, kind: str, virtual: int, microbatches: int, remat: str = "none") -> float:
    """A lower bound on the largest `stage_memory` of every stage split of this layout, without its schedule table:
    the device holding the longest stage (at least ceil(L / S) layers) keeps those weights and working set, and
    every device the schedule's buffers: one cotangent slot and at least `held_inputs` activation slots, or with
    the stash one activation slot and at least `held_residuals` residual slots of that longest stage (zb: and its
    one grad slot, at least, `make_schedule`'s)."""
    P, M = costs.mesh["pipe"], microbatches
    longest = math.ceil(costs.layers / (P * virtual))
    grads = 1 if kind in ZERO_BUBBLE else 0
    if stashes(remat):
        buffers = slot_bytes(costs, longest, M, 2, max(held_residuals(kind, P, M, virtual), 1), grads)
    else:
        buffers = slot_bytes(costs, longest, M, max(held_inputs(kind, P, M, virtual), 1) + 1, 0, grads)
    return weights_memory(costs, virtual * longest) + buffers + _working_set(costs, longest, False, False, M, remat)


@functools.lru_cache(maxsize=512)
def held_inputs(kind: str, devices: int, microbatches: int, virtual: int = 1) -> int:
    """A lower bound on a schedule's activation slots from its devices' op orders alone (the table is what costs):
    at a device's first backward, the input of every forward it ran before (of a stage other than the first) is
    held, each from its arrival, before its forward, to its own backward, at or after that tick; so no two of them
    can share a slot in `make_schedule`'s colouring. Device p runs its `warmup` forwards and one more (unless that
    was all) before its first backward; its k-th forward is of chunk (k // P) mod V (`device_orders`), a stage
    other than the first unless p = 0 and that chunk is 0."""
    P, V = devices, virtual
    return max(n if p else sum(1 for k in range(n) if (k // P) % V)
               for p, n in enumerate(_forwards_first(kind, devices, microbatches, virtual)))


@functools.lru_cache(maxsize=512)
def held_residuals(kind: str, devices: int, microbatches: int, virtual: int = 1) -> int:
    """A lower bound on a stashing schedule's residual slots, as `held_inputs` argues: at a device's first
    backward the residuals of every forward it ran before, of a stage other than the last, are all held (the last
    stage's too with the stash, and zb's 1F1B order holds them longer, to each W: still a bound)."""
    P, V = devices, virtual
    return max(sum(1 for k in range(n) if (k // P) % V * P + p != P * V - 1)
               for p, n in enumerate(_forwards_first(kind, devices, microbatches, virtual)))


def _forwards_first(kind: str, devices: int, microbatches: int, virtual: int) -> list[int]:
    """Per device, the forwards it runs before its first backward: its `warmup` forwards and one more (unless that
    was all of them)."""
    total = microbatches * virtual
    return [w + 1 if w < total else w for w in (warmup(kind, devices, microbatches, virtual, p)
                                                 for p in range(devices))]


def transfer_seconds(costs: MeshCosts, microbatches: int, cluster: ClusterSpec) -> float:
    """What a tick costs besides its ops when it makes both sends (activation and cotangent) of one microbatch's
    stage input between pipe neighbours (`sends`: a tick pays half of this for each it makes), each paying the
    link's latency and overhead whatever its size, so more microbatches (more ticks) are not free. A pair of
    neighbours is inside a node while the pipe group fits one, else the slowest pairs cross nodes. No executor
    constant is added here: see `runs/benchmarks/microbatch_overhead.md`."""
    span = axis_span(costs.mesh, ("pipe",), cluster.devices_per_node)
    pair = (1, 2) if span.nodes > 1 else (2, 1)
    return 2 * collective_time("collective-permute", costs.carry_wire_bytes / microbatches, pair, cluster)


def once_per_step(costs: MeshCosts, counts: list[int], virtual: int, cluster: ClusterSpec
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """(seconds by component, bytes by `axes/collective`) of the per-step gradient reduction and fsdp gathers."""
    m = costs.mesh
    layer = virtual * max(counts) * costs.layer_bytes
    secs: dict[str, float] = defaultdict(float)
    comm: dict[str, float] = defaultdict(float)

    def add(kind: str, axes: tuple[str, ...], nb: float, key: str) -> None:
        axes = tuple(a for a in axes if m[a] > 1)
        if not axes or nb <= 0:
            return
        secs[key] += axis_collective_time(kind, nb, m, axes, cluster)
        comm[f"{'+'.join(axes)}/{kind}"] += bytes_sent(kind, nb, math.prod(m[a] for a in axes))

    # every device holds its own tokens: the gradients are summed over the batch axes and seq (expert weights are
    # counted with the rest: their share of the layer is already divided by expert)
    add("all-reduce", ("data", "fsdp", "expert", "seq"), layer * (1 - costs.layer_expert_share), "gradient sync")
    add("all-reduce", ("data", "fsdp", "seq"), layer * costs.layer_expert_share, "gradient sync")
    add("all-reduce", ("pipe", "data", "fsdp", "expert", "seq"), costs.other_bytes, "gradient sync")
    f = m["fsdp"]
    add("all-gather", ("fsdp",), (layer * costs.layer_fsdp + costs.other_bytes * costs.other_fsdp) / f, "fsdp gathers")
    return dict(secs), dict(comm)


def lockstep_seconds(sched: Schedule, fwd: np.ndarray, bwd: np.ndarray, transfer: float, start: int = 0,
                     wgt: np.ndarray | None = None) -> float:
    """`planner.schedule.step_time`, vectorised (the search evaluates many layouts); from tick `start` on; `wgt`:
    the W ops' seconds of each stage (zb only, and needed there)."""
    stage, is_f, is_b, is_w = _tick_tables(sched.kind, sched.devices, sched.microbatches, sched.virtual,
                                           sched.stash_last)
    if is_w.any() and wgt is None:
        raise ValueError("lockstep_seconds of a zb schedule needs wgt, the seconds of each stage's weight gradient")
    cost = np.where(is_f, fwd[stage], 0.0)
    cost = np.where(is_b, bwd[stage], cost)
    if wgt is not None:
        cost = np.where(is_w, np.asarray(wgt)[stage], cost)
    return float(cost[start:].max(axis=1).sum() + sends(sched, start) * transfer / 2)


def sends(sched: Schedule, start: int = 0) -> int:
    """Point-to-point sends of the schedule's ticks from `start` on (`Schedule.sends`: a tick sends a stage input,
    a cotangent, both or neither); `transfer_seconds` is two of them."""
    return int(sched.sends[start:].sum())


def sweep_ticks(sched: Schedule) -> int:
    """Ticks of the forward-only sweep: the schedule's ticks in which some device runs a forward."""
    return int((sched.phase == 1).any(axis=1).sum())


def sweep_seconds(sched: Schedule, fwd: np.ndarray, transfer: float) -> float:
    """The forward-only sweep over the schedule's forward ticks (MoE statistics), in lockstep, one send a tick."""
    stage = _tick_tables(sched.kind, sched.devices, sched.microbatches, sched.virtual)[0]
    forward = sched.phase == 1  # the last stage's forward too (without the stash idle in the main table)
    rows = forward.any(axis=1)
    cost = np.where(forward, fwd[stage], 0.0)[rows]
    return float(cost.max(axis=1).sum() + rows.sum() * transfer)


@functools.lru_cache(maxsize=512)
def _tick_tables(kind: str, P: int, M: int, V: int, stash_last: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(stage, computing forward, backward, weight gradient) per tick and device of a schedule (the ops depend on the
    stash only through the last stage's forward, an op of its own with `stash_last`, else folded into its
    backward; zb needs the stash)."""
    sched = make_schedule(kind, P, M, V, stash_last or kind in ZERO_BUBBLE, stash_last)
    stage = sched.chunk * P + np.arange(P)[None, :]
    return stage, (sched.phase == 1) & (sched.code != IDLE), sched.phase == 2, sched.phase == 3


def evaluate(costs: MeshCosts, spec: PipelineSpec, cluster: ClusterSpec, remat: str = "none") -> PipelineChoice:
    """Predictions for one pipeline layout on one mesh (the keys of `planner.search.predicted`, plus a pipeline
    section); `remat`: the pipeline mode (`planner.schedule.PIPELINE_MODES`), as for every function here."""
    P, M, V = costs.mesh["pipe"], spec.microbatches, spec.virtual
    counts = [e - s for s, e in spec.stages]
    sched = make_schedule(spec.schedule, P, M, V, stashes(remat))
    fwd, bwd, wgt = tick_seconds(costs, counts, M, remat, spec.schedule)
    last_fwd = counts[-1] * microbatch_seconds(costs, M)["layer"] / costs.passes
    transfer = transfer_seconds(costs, M, cluster)
    loop = lockstep_seconds(sched, fwd, bwd, transfer, wgt=wgt)
    sync_s, sync_b = once_per_step(costs, counts, V, cluster)
    memory = stage_memory(costs, counts, sched, remat)
    busy = float(sum(fwd) + sum(bwd) + (0.0 if wgt is None else sum(wgt))) / P  # mean work a device a microbatch
    breakdown = {"compute": busy * M, "pipeline bubble": loop - busy * M - sends(sched) * transfer / 2,
                 "pipe transfers": sends(sched) * transfer / 2, **sync_s}
    comm = dict(sync_b)
    comm["pipe/collective-permute"] = sends(sched) * costs.carry_wire_bytes / M
    # the ILP's bytes are a forward and a backward: about half are the forward's, which a backward tick without
    # the stash repeats (and once more under remat "full")
    again = 1.0 if stashes(remat) else 2.0
    lmax = max(counts)
    for r, share in (("layer", V * lmax), ("embed", 1.0), ("head", 1.0)):
        for k, b in costs.tensor_bytes.get(r, {}).items():
            comm[k] = comm.get(k, 0.0) + b * share * again
    if costs.sweep:  # the forward-only statistics sweep: every stage's forward (the last one's too), in lockstep
        fwd_all = fwd.copy()
        fwd_all[-1] = last_fwd
        sweep = sweep_seconds(sched, fwd_all, transfer / 2)
        # (one more forward of every stage's layers, but under GPipe: its sweep is the forward phase)
        for k, b in costs.tensor_bytes.get("layer", {}).items():
            comm[k] = comm.get(k, 0.0) + b * V * lmax * (0.0 if sched.forwards_first else 0.5)
        if sched.forwards_first:  # GPipe: the sweep IS the forward phase, then the table's backward ticks alone
            loop = sweep + lockstep_seconds(sched, fwd, bwd, transfer, start=sched.forward_ticks, wgt=wgt)
            n = sweep_ticks(sched) + sends(sched, sched.forward_ticks)
            breakdown["compute"] += fwd_all[-1] * M / P
            breakdown["pipe transfers"] = n * transfer / 2
            breakdown["pipeline bubble"] = loop - breakdown["compute"] - breakdown["pipe transfers"]
            comm["pipe/collective-permute"] = n * costs.carry_wire_bytes / M
        else:
            breakdown["statistics sweep"] = sweep
            loop += sweep
            for k, b in costs.tensor_bytes.get("embed", {}).items():
                comm[k] = comm.get(k, 0.0) + b * 0.5
            comm["pipe/collective-permute"] += sweep_ticks(sched) * costs.carry_wire_bytes / M
    step = loop + sum(sync_s.values())
    # one bubble figure: the share of the predicted step the devices wait in the loop (the time breakdown's
    # "pipeline bubble"); the table's own idle share under unit-time ops is kept apart as `table_idle`
    pipeline = {"schedule": spec.schedule, "microbatches": M, "virtual": V, "stages": spec.stages,
                "ticks": sched.ticks, "bubble": breakdown["pipeline bubble"] / max(step, 1e-30),
                "table_idle": sched.bubble, "act_slots": sched.act_slots,
                "cot_slots": sched.cot_slots, "peak_live_buffers": sched.act_slots + sched.cot_slots,
                "stash": sched.stash, "stash_slots": sched.stash_slots,
                "stash_bytes_per_slot": stash_bytes(costs, lmax, M) if sched.stash else 0.0,
                "grad_slots": sched.grad_slots,
                "grad_bytes_per_slot": grad_bytes(costs, lmax, M) if sched.grad_slots else 0.0,
                "stage_forward_seconds": [float(x) for x in fwd], "stage_backward_seconds": [float(x) for x in bwd],
                "transfer_seconds_per_tick": transfer}
    if wgt is not None:  # zb: the backward seconds are its B op's, these its W op's
        pipeline["stage_weight_seconds"] = [float(x) for x in wgt]
    predicted = {"step_seconds": step, "memory_bytes_per_device": max(memory),
                 "memory_per_stage_device": memory,
                 "comm_bytes": {k: v for k, v in sorted(comm.items()) if v > 0}, "time_breakdown": breakdown,
                 "memory_breakdown": _memory_breakdown(costs, counts, sched, memory, remat), "pipeline": pipeline}
    return PipelineChoice(spec, step, memory, predicted)


def _memory_breakdown(costs: MeshCosts, counts: list[int], sched: Schedule, memory: list[float], remat: str
                      ) -> dict[str, float]:
    """The worst device's memory by component (the stashed residuals with the pipeline buffers)."""
    worst = int(np.argmax(memory))
    buffers = buffer_bytes(costs, max(counts), sched)
    no_acts = stage_memory(dataclasses.replace(costs, residuals={}, interface=0.0, carry_bytes=0.0,
                                               kept_layer=0.0, working={}), counts, sched, remat)[worst]
    return {"parameters and optimizer state": no_acts, "pipeline buffers": buffers,
            "activations": memory[worst] - no_acts - buffers}


# -- the choice ----------------------------------------------------------------------------------------------------

def split(costs: MeshCosts, stages: int, microbatches: int, remat: str, cap: int | None = None) -> list[int] | None:
    """Layers per stage minimising the largest stage's forward + backward, each stage at most `cap` layers."""
    L = costs.layers
    cap = min(cap or L, L)
    if stages > L or cap * stages < L:
        return None
    w = microbatch_seconds(costs, microbatches)
    per = w["layer"] * (1 + (1 / costs.passes if remat == "full" else 0.0)  # `stage_ticks`' forward + backward
                        + (0.0 if stashes(remat) else 1 / costs.passes))
    extra = [0.0] * stages
    extra[0] += w["embed"] * (1 + 1 / costs.passes)
    extra[-1] += w["head"]
    if per <= 0:
        return _even(L, stages)

    def pack(tau: float) -> list[int] | None:
        out, left = [], L
        for s in range(stages):
            room = stages - s - 1  # later stages need a layer each
            n = min(cap, left - room, int(math.floor((tau - extra[s]) / per + 1e-9)))
            if n < 1:
                return None
            out.append(n)
            left -= n
        return out if left == 0 else None

    cands = sorted({n * per + e for n in range(1, cap + 1) for e in set(extra)})
    lo, hi = 0, len(cands) - 1
    if pack(cands[hi]) is None:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if pack(cands[mid]) is not None:
            hi = mid
        else:
            lo = mid + 1
    return _balance(pack(cands[lo]), cands[lo], extra, per, cap)


def refine(costs: MeshCosts, sched: Schedule, counts: list[int], remat: str, cap: int, rounds: int = 16
           ) -> list[int]:
    """Hill-climb on the lockstep loop time itself, moving one layer between neighbouring stages at a time: the
    split's objective (largest forward + backward) is a proxy, and in lockstep a 1F1B tick pairs one stage's
    forward with another's backward."""
    def cost(c: list[int]) -> float:
        fwd, bwd, wgt = tick_seconds(costs, c, sched.microbatches, remat, sched.kind)
        return lockstep_seconds(sched, fwd, bwd, 0.0, wgt=wgt)

    best, best_cost = list(counts), cost(counts)
    for _ in range(rounds):
        moved = False
        for s in range(len(best) - 1):
            for a, b in ((s, s + 1), (s + 1, s)):
                if best[a] <= 1 or best[b] >= cap:
                    continue
                trial = list(best)
                trial[a] -= 1
                trial[b] += 1
                c = cost(trial)
                if c < best_cost * (1 - 1e-9):
                    best, best_cost, moved = trial, c, True
        if not moved:
            break
    return best


def _balance(counts: list[int], tau: float, extra: list[float], per: float, cap: int) -> list[int]:
    """Greedy packing front-loads layers; move surplus to later stages while the bound still holds (same
    bottleneck, a shorter longest stage, less padding)."""
    counts = list(counts)
    for _ in range(sum(counts)):
        s = int(np.argmax(counts))
        target = min(range(len(counts)), key=lambda k: (counts[k] * per + extra[k], k))
        if counts[s] - counts[target] < 2 or (counts[target] + 1) * per + extra[target] > tau + 1e-12 \
                or counts[target] + 1 > cap:
            break
        counts[s] -= 1
        counts[target] += 1
    return counts


def _even(L: int, stages: int) -> list[int]:
    base, extra = divmod(L, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]


def to_ranges(counts: list[int]) -> list[list[int]]:
    ends = np.cumsum(counts).tolist()
    return [[int(e - n), int(e)] for e, n in zip(ends, counts)]


def microbatch_options(local_batch: int) -> list[int]:
    """Microbatch counts to try: every divisor of the per-replica batch, up to one sequence per microbatch (what
    more microbatches cost is priced: `microbatch_seconds`, `transfer_seconds`; `choose` prunes by lower bounds)."""
    return [m for m in range(1, local_batch + 1) if local_batch % m == 0]


PROBE_MARGIN = 1e-6
"""How far above the probe's step time a layout's floor must be for `choose` to skip it (see `_probe`)."""


def choose(costs: MeshCosts, cluster: ClusterSpec, budget: float, local_batch: int, *,
           schedule: str | None = None, microbatches: int | None = None, virtual: int | None = None,
           remats: tuple[str, ...] = ("none", "full")) -> PipelineChoice | None:
    """The fastest pipeline layout on this mesh that fits `budget` (None when nothing fits): layouts in order, a
    later one replacing the best so far when it is 1e-9 faster; remat only when nothing fits without.

    Shortcuts that leave the answer as it is: a mesh whose weights alone exceed the budget (`weights_floor`) fits
    nothing; a layout is not built (its schedule table is most of the cost of trying one) when its `layout_floor`
    shows it cannot replace the best so far, or is clearly slower than the fastest layout the probe found
    (`_probe`)."""
    if exceeds(weights_floor(costs), budget):
        return None
    best: PipelineChoice | None = None
    for remat in modes(remats):
        layouts = _layouts(costs, local_batch, schedule, microbatches, virtual, remat)
        floors = [layout_floor(costs, cluster, kind, V, M, remat) for kind, V, M in layouts]
        tried, probe = _probe(costs, cluster, budget, layouts, floors, remat)
        for k in range(len(layouts)):
            if k not in tried and (floors[k] >= probe * (1 + PROBE_MARGIN)
                                   or (best is not None and not _may_beat(floors[k], best.step_seconds))):
                continue
            c = tried[k] if k in tried else _attempt(costs, cluster, budget, layouts[k], remat)
            if c is not None and (best is None or c.step_seconds < best.step_seconds * (1 - 1e-9)):
                best = c
        if best is not None:
            break  # recompute and remat only cost time: try them when nothing fits without
    return best


def modes(remats: tuple[str, ...]) -> list[str]:
    """The pipeline modes (`planner.schedule.PIPELINE_MODES`) of the plan remats `remats`, fastest first: without
    remat, the stash, then recomputing each stage's forward."""
    return [m for r in remats for m in (("none", "recompute") if r == "none" else (r,))]


def _attempt(costs: MeshCosts, cluster: ClusterSpec, budget: float, layout: tuple[str, int, int], remat: str
             ) -> PipelineChoice | None:
    """`_fit`, or None without building the schedule when the layout's memory floor exceeds the budget."""
    kind, V, M = layout
    if exceeds(layout_memory_floor(costs, kind, V, M, remat), budget):
        return None
    return _fit(costs, cluster, budget, kind, M, V, remat)


def _probe(costs: MeshCosts, cluster: ClusterSpec, budget: float, layouts: list[tuple[str, int, int]],
           floors: list[float], remat: str) -> tuple[dict[int, PipelineChoice | None], float]:
    """(layouts tried, the least step time among those that fit) trying them lowest floor first, until the next
    floor is above that time x (1 + PROBE_MARGIN): the probe. A floor near that bar is raised first
    (`split_floor`, in `floors` for the caller).

    Skipping the untried layouts leaves `choose`'s answer as it is. In order, once the probe's layout has been
    seen the best is within 1e-9 of its time (at most time / (1 - 1e-9)), so no skipped layout could replace it
    again. Before that, dropping a skipped layout z can only make the best differ from the one with z where both
    are above the probe's time x (1 + 1e-6) x (1 - 1e-9)^n (n layouts: a layout taking over from one of them is
    within 1e-9 of it), and the probe's layout replaces either, so the runs agree from there on."""
    tried: dict[int, PipelineChoice | None] = {}
    least = math.inf
    # equal floors: GPipe first, which lockstep ticks favour whenever it fits (the order only saves work)
    for k in sorted(range(len(layouts)), key=lambda k: (floors[k], layouts[k][0] != "gpipe", k)):
        bar = least * (1 + PROBE_MARGIN)
        if floors[k] >= bar:
            break
        kind, V, M = layouts[k]
        floors[k] = split_floor(costs, cluster, kind, V, M, remat, floors[k], bar) if bar < math.inf else floors[k]
        if floors[k] >= bar:  # (raised: later layouts may still be below)
            continue
        tried[k] = _attempt(costs, cluster, budget, layouts[k], remat)
        if tried[k] is not None:
            least = min(least, tried[k].step_seconds)
    return tried, least


def _may_beat(floor: float, best: float) -> bool:
    """Whether a layout with this lower bound could replace `best` in `choose` (which asks for 1e-9 better); the
    floor is shrunk by 1e-9 first, far more than the rounding of its sums."""
    return floor * (1 - 1e-9) < best * (1 - 1e-9)


def layout_floor(costs: MeshCosts, cluster: ClusterSpec, kind: str, virtual: int, microbatches: int,
                 remat: str = "none") -> float:
    """A lower bound on `evaluate`'s step time for every stage split of this layout, without its schedule table.

    The argument holds for any table the schedule builds (one op per device per tick; a stage's forward after the
    previous stage's, its backward after its forward and after the next stage's backward) under
    `lockstep_seconds`, which charges each tick its slowest op. Let w_s be stage s's forward + backward per
    microbatch (`stage_ticks`; without the stash the last stage's forward is recomputed in its backward, its F 0).
    - Device p runs M forwards and M backwards of each of its stages. Before its first op (a forward of its first
      stage, p) the forwards of stages 0..p-1 of that microbatch run in distinct earlier ticks; after its last op
      (a backward of stage p) the backwards of stages p-1..0. So the loop costs at least
      B_p = sum(w_s, s < p) + M x (its stages' w).
    - V = 1: with weights l_p = (g/M)(1 - 1/M)^(P-1-p), which sum to 1 for g = 1 / (1 - (1 - 1/M)^P),
      sum(l_p B_p) = g sum(w_s), so max B_p >= g sum(w_s); and B_(P-1) = sum(w_s) + (M - 1) w_(S-1).
      V > 1: the average of B_p is at least (M/P) sum(w_s) + (P-1)/2 x a one-layer stage's w, and
      B_(P-1) >= (P-1) x that + M w_(S-1).
    - Both depend on the split only through the last stage's layers n (sum(w_s) falls as n grows: fewer
      forwards; w_(S-1) grows), affinely: the bound is the least over n in 1..L-S+1 of the larger of the two.
    - Some stage has at least ceil(L / S) layers, so its device's B_p is at least M x (that stage's w, as the
      last stage or any other, whichever is less, + a one-layer stage's w for each of its V - 1 other stages).
    - Sends >= 2 (M V + P - 2) (`_ticks_and_step`), each half a tick's transfer; the once-per-step sums grow with
      the layers a device holds, at least ceil(L / S) per stage; the MoE statistics sweep only adds.
    """
    return _loop_floor(costs, virtual, microbatches, remat, kind) \
        + _ticks_and_step(costs, cluster, virtual, microbatches)


def _ticks_and_step(costs: MeshCosts, cluster: ClusterSpec, virtual: int, microbatches: int) -> float:
    """The rest of `layout_floor`: the sends (`sends`), at least 2 (M V + P - 2) of them whatever the schedule
    (device 0's M V forwards all send a stage input, each in a tick of its own, and the last of them is followed by
    the P - 2 stages before the last, each a tick later; device P-1's backwards and the stages after the first
    alike send cotangents), and the once-per-step sums for at least ceil(L / S) layers a stage."""
    P, M = costs.mesh["pipe"], microbatches
    sync, _ = once_per_step(costs, [math.ceil(costs.layers / (P * virtual))], virtual, cluster)
    return (M * virtual + P - 2) * transfer_seconds(costs, M, cluster) + sum(sync.values())


def _loop_floor(costs: MeshCosts, virtual: int, microbatches: int, remat: str, kind: str = "1f1b") -> float:
    """The compute part of `layout_floor`: a lower bound on the lockstep loop's slowest ops, for any split.

    zb (V = 1) splits each backward into B and W, and a W need not wait for the earlier stages: the chains before
    and after device p's ops are of forwards and Bs only. With u_s = F_s + B_s (w_s less its W), device p's ticks
    cost at least B_p = sum(u_s, s < p) + M u_p (the forwards before its first op, its M F and M B ops, the Bs of
    the earlier stages after its last B), so `spread` holds with u for w; and the last device's, whose last W
    runs in the tick after its last B (`planner.schedule._place_zb`), sum(u_s, s < S-1) + M w_(S-1) - W_(S-1)
    = sum(u_s) + (M - 1) w_(S-1): `through` with sum(u) for sum(w); zb-h1 may run that device's Ws alongside the
    earlier stages' Bs, so its chain is sum(u_s) + (M - 1) u_(S-1). The longest stage's M w stands (3 M ops in
    distinct ticks), computed from `stage_ticks`, whose backward is B + W."""
    P, L, V, M = costs.mesh["pipe"], costs.layers, virtual, microbatches
    S = P * V
    longest = L - S + 1
    ends = [stage_ticks(costs, _even(L - n, S - 1) + [n], M, remat) for n in (1, longest)]
    weights = [np.asarray(_even(L - n, S - 1) + [n], float) * weight_seconds(costs, M) if kind in ZERO_BUBBLE
               else np.zeros(S) for n in (1, longest)]
    total = [float(fwd.sum() + bwd.sum() - w.sum()) for (fwd, bwd), w in zip(ends, weights)]
    # (zb-h1 may defer the last device's Ws past the earlier stages' Bs: its chain counts its F and B ops only)
    last = [float(fwd[-1] + bwd[-1] - (w[-1] if kind == "zb-h1" else 0.0)) for (fwd, bwd), w in zip(ends, weights)]
    share = (np.arange(1, longest + 1) - 1) / max(longest - 1, 1)
    total_n = total[0] + (total[1] - total[0]) * share
    last_n = last[0] + (last[1] - last[0]) * share
    fwd, bwd = ends[1]
    one = float(fwd[1] + bwd[1]) if S > 2 else float(fwd[0] + bwd[0])  # a one-layer stage, not the last
    if V == 1:
        spread = total_n / (1.0 - (1.0 - 1.0 / M) ** P)
        through = total_n + (M - 1) * last_n
    else:
        spread = M / P * total_n + (P - 1) / 2 * one
        through = (P - 1) * one + M * last_n
    return max(float(np.maximum(spread, through).min()), M * _longest_stage(costs, S, M, remat, min(one, last[0]), V))


def split_floor(costs: MeshCosts, cluster: ClusterSpec, kind: str, virtual: int, microbatches: int, remat: str,
                cheap: float, bar: float) -> float:
    """`layout_floor` (= `cheap`) with its loop term raised, for V = 1, to the least over whole-layer stage splits
    of max_p B_p (see `layout_floor`), as far as needed to tell whether it exceeds `bar` (that is costlier, so the
    search asks only for the layouts near its bar).

    w_s is affine in stage s's layers (`stage_ticks`; the same slope a for every stage but the last), so
    B_p = a U_p + (the stages before p's fixed work) + M w_p(n_p), U_p the layers before p: for a bound tau, each
    stage takes at most cap_p(U_p) layers, and the totals reachable after each stage form an interval whose top
    grows with the top before (U + cap_p(U) never falls as U grows, because a <= M a). Bisection on tau keeps the
    largest tau shown unreachable: a lower bound on every split's max_p B_p."""
    if virtual != 1 or kind in ZERO_BUBBLE or cheap * (1 - 1e-9) > bar:
        return cheap  # (zb: its B_p are of F + B before device p, `_loop_floor`; `cheap` is still its bound)
    P, L, M = costs.mesh["pipe"], costs.layers, microbatches
    rest = _ticks_and_step(costs, cluster, virtual, M)
    f1, b1 = stage_ticks(costs, [1] * P, M, remat)
    f2, b2 = stage_ticks(costs, [2] * P, M, remat)
    slope, w1 = (f2 + b2) - (f1 + b1), f1 + b1
    if slope[0] <= 0 or not np.allclose(slope[:-1], slope[0], rtol=1e-9, atol=0.0):
        return cheap
    fixed = w1 - slope
    lo = cheap - rest
    hi = max(_stage_bounds(costs, _even(L, P), M, remat))  # a split exists at this bound: reachable
    for _ in range(24):
        if rest + lo > bar or hi - lo <= 1e-9 * hi:
            break
        mid = (lo + hi) / 2
        if _reachable(mid, L, M, float(slope[0]), float(slope[-1]), fixed):
            hi = mid
        else:
            lo = mid
    return max(cheap, rest + lo)


def _reachable(tau: float, L: int, M: int, a: float, a_last: float, fixed: np.ndarray) -> bool:
    """Whether some split of L layers over the stages (each at least one) keeps every B_p <= tau (`split_floor`);
    tau is widened by 1e-12 so that rounding can only say yes."""
    tau *= 1 + 1e-12
    lo = hi = 0
    before = 0.0
    for p in range(len(fixed) - 1):
        room = tau - before - M * fixed[p]
        top = min(hi, math.floor((room - M * a) / a))  # the largest U with room for one layer here
        if top < lo:
            return False
        lo, hi = lo + 1, top + math.floor((room - a * top) / (M * a))
        before += fixed[p]
    top = min(hi, L - 1)
    last = lambda u: a * u + before + M * (a_last * (L - u) + fixed[-1])  # noqa: E731
    return top >= lo and min(last(lo), last(top)) <= tau


def _stage_bounds(costs: MeshCosts, counts: list[int], M: int, remat: str) -> list[float]:
    """B_p of `layout_floor` for one split (V = 1)."""
    fwd, bwd = stage_ticks(costs, counts, M, remat)
    w = fwd + bwd
    return [float(w[:p].sum() + M * w[p]) for p in range(len(counts))]


def _longest_stage(costs: MeshCosts, S: int, M: int, remat: str, one: float, virtual: int) -> float:
    """Per microbatch, the least work of a device holding a stage of ceil(L / S) layers (as the last stage or
    another, whichever is less) and V - 1 other stages of at least `one` each (`layout_floor`)."""
    L = costs.layers
    n = math.ceil(L / S)
    _, last = stage_ticks(costs, _even(L - n, S - 1) + [n], M, remat)
    fwd, bwd = stage_ticks(costs, ([1, n] + _even(L - 1 - n, S - 2)) if S > 2 else [n, L - n], M, remat)
    other = float(fwd[1] + bwd[1]) if S > 2 else float(fwd[0] + bwd[0])
    return min(other, float(last[-1])) + (virtual - 1) * one


def floor(costs: MeshCosts, cluster: ClusterSpec, budget: float, local_batch: int, *, schedule: str | None = None,
          microbatches: int | None = None, virtual: int | None = None, remats: tuple[str, ...] = ("none", "full")
          ) -> float:
    """A lower bound on the step time of whatever `choose` returns for this mesh (infinite when nothing can fit):
    the least `layout_floor` of the layouts and remat modes it tries, leaving out those whose
    `layout_memory_floor` exceeds the budget (`choose` only returns a layout that fits)."""
    return min((f for f, _, _ in _floors(costs, cluster, budget, local_batch, schedule, microbatches, virtual, remats)),
               default=math.inf)


def floor_above(costs: MeshCosts, cluster: ClusterSpec, budget: float, local_batch: int, bar: float, *,
                schedule: str | None = None, microbatches: int | None = None, virtual: int | None = None,
                remats: tuple[str, ...] = ("none", "full")) -> bool:
    """Whether every layout `choose` could return is slower than `bar` (by 1e-9): `floor`, with the floors near the
    bar raised (`split_floor`) until one stays below it."""
    for cheap, layout, r in sorted(_floors(costs, cluster, budget, local_batch, schedule, microbatches, virtual,
                                           remats), key=lambda e: e[0]):
        if cheap * (1 - 1e-9) > bar:
            return True
        kind, V, M = layout
        if split_floor(costs, cluster, kind, V, M, r, cheap, bar) * (1 - 1e-9) <= bar:
            return False
    return True


def _floors(costs: MeshCosts, cluster: ClusterSpec, budget: float, local_batch: int, schedule: str | None,
            microbatches: int | None, virtual: int | None, remats: tuple[str, ...]
            ) -> list[tuple[float, tuple[str, int, int], str]]:
    """(`layout_floor`, layout, remat) of each layout and remat mode `choose` tries whose memory floor fits."""
    return [(layout_floor(costs, cluster, kind, V, M, r), (kind, V, M), r) for r in modes(remats)
            for kind, V, M in _layouts(costs, local_batch, schedule, microbatches, virtual, r)
            if not exceeds(layout_memory_floor(costs, kind, V, M, r), budget)]


def least_memory(costs: MeshCosts, local_batch: int, *, schedule: str | None = None,
                 microbatches: int | None = None, virtual: int | None = None, below: float = math.inf) -> float:
    """The least per-device memory of the layouts `choose` tries on this mesh (even stages: the least padding), or
    `below` if none needs less (a layout whose `layout_memory_floor` is above it is not built)."""
    best = below
    layouts = _layouts(costs, local_batch, schedule, microbatches, virtual)
    floors = {x: min(layout_memory_floor(costs, *x, r) for r in _modes_of(x[0])) for x in layouts}
    for kind, V, M in sorted(layouts, key=floors.get):  # least floor first: the rest are mostly not built
        remats = [r for r in _modes_of(kind) if not exceeds(layout_memory_floor(costs, kind, V, M, r), best)]
        if not remats:
            continue
        counts = _even(costs.layers, costs.mesh["pipe"] * V)
        for remat in remats:
            sched = make_schedule(kind, costs.mesh["pipe"], M, V, stashes(remat))
            best = min(best, max(stage_memory(costs, counts, sched, remat)))
    return best


def _modes_of(kind: str) -> tuple[str, ...]:
    """The pipeline modes a schedule runs in: zb only with the stash (its W reads the forward's residuals)."""
    return tuple(r for r in PIPELINE_MODES if kind not in ZERO_BUBBLE or stashes(r))


def _layouts(costs: MeshCosts, local_batch: int, schedule: str | None, microbatches: int | None,
             virtual: int | None, remat: str | None = None) -> list[tuple[str, int, int]]:
    """(schedule, virtual, microbatches) combinations to try on this mesh (in pipeline mode `remat`, when given:
    zb only in mode "none", `planner.schedule.check`)."""
    P, L = costs.mesh["pipe"], costs.layers
    kinds = [schedule] if schedule else ["1f1b", "gpipe", "interleaved", *ZERO_BUBBLE]
    stash = None if remat is None else stashes(remat)
    micro = [microbatches] if microbatches else microbatch_options(local_batch)
    out = []
    for kind in kinds:
        if kind == "interleaved":
            vs = [virtual] if virtual else [v for v in range(2, MAX_VIRTUAL + 1) if L % v == 0 and P * v <= L]
        else:
            vs = [virtual or 1]
        for V in vs:
            for M in micro:
                try:
                    check(kind, P, M, V, L, stash=stash)
                except PlanError:
                    continue
                if local_batch % M == 0:
                    out.append((kind, V, M))
    return out


def _fit(costs: MeshCosts, cluster: ClusterSpec, budget: float, kind: str, M: int, V: int, remat: str
         ) -> PipelineChoice | None:
    """The balanced split for one schedule, its longest stage shortened until the memory fits, then refined on
    the lockstep time (kept only if it still fits)."""
    P = costs.mesh["pipe"]
    sched = make_schedule(kind, P, M, V, stashes(remat))
    cap = None
    while True:
        counts = split(costs, P * V, M, remat, cap)
        if counts is None:
            return None
        if max(stage_memory(costs, counts, sched, remat)) <= budget:
            break
        lmax = max(counts)
        if lmax * P * V <= costs.layers:  # already even: padding cannot shrink further
            return None
        cap = lmax - 1
    refined = refine(costs, sched, counts, remat, max(counts))
    if refined != counts and max(stage_memory(costs, refined, sched, remat)) <= budget:
        counts = refined
    plan_remat, stash = mode_settings(remat)
    choice = evaluate(costs, PipelineSpec(stages=to_ranges(counts), microbatches=M, schedule=kind, virtual=V,
                                          stash=stash), cluster, remat)
    choice.predicted["remat"] = plan_remat  # the plan's; the mode is in its spec
    return choice
