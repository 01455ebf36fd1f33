"""The search: trace once, enumerate mesh factorizations, solve the intra-op ILP for each, rank by predicted time.

`plan_model(model, batch, cluster=..., mesh=..., memory_budget=...)` returns the fastest Plan that fits, with its
predictions and the runners-up. Fixed axes (`mesh={"tensor": 8}`) and pinned parameter specs narrow the search.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from planner.cluster import ClusterSpec, load_cluster
from planner.errors import AutoshardError
from planner.ilp import ParamChoice, Problem, Solution, exceeds, new_problem
from planner.params import param_table, path_str
from planner.plan import AXES, BATCH_AXES, Plan, SpecEntry
from planner import jax_internals as jint
from planner import seq_expert
from planner.layouts import PARTIAL, Layout
from planner.schedule import ZERO_BUBBLE
from planner.trace import Graph, dtype_kind, matmul_flops, trace

SEARCH_AXES = ("data", "fsdp", "tensor")
"""Axes this planner searches; the others stay at the size the user fixes (1 by default)."""
LOOP_PIPELINE = ("this graph's blocks are a Python loop, which the planner pipelines only restaged as a scanned stack: "
                 "plan it with autoshard.plan (autoshard.staging restages it), or drop pipe")
HEADROOM = 0.9
"""Without an explicit budget, plans may use this fraction of device memory: the rest is for what the model does
not count (runtime and collective buffers, fragmentation)."""
NEAR_TIE = 0.01
"""Plans whose predicted step times are within this fraction of the fastest one are a tie, settled by fewer bytes
moved, then less memory: a gain this small is inside the cost model's error on measured steps, and bytes are what
the compiled program is checked against."""


def trace_model(model: nnx.Module, batch: dict[str, Any], loss_fn: Callable | None = None,
                fold: bool = True, rewrite: Callable[[Callable], Callable] | None = None) -> Graph:
    """Trace an NNX model's loss (`model.loss(batch)` by default) on abstract inputs.

    The model's non-parameter state (RNG streams, statistics) is traced as inputs too: neither parameters nor
    batch, it is replicated and carries no batch dimension. `fold`: fold a Python loop over identical blocks into
    a layer stack (`planner.trace.fold_blocks`). `rewrite` wraps the loss before it is traced (the runtime's
    attention rewrite, so that attention the model writes itself is planned as the op it will run as).
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = loss_fn or (lambda m, b: m.loss(b))

    def loss(params, inputs):
        out = loss_fn(nnx.merge(graphdef, params, inputs["rest"], copy=True), inputs["batch"])
        return out[0] if isinstance(out, tuple) else out

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [key_path(kp) for kp, _ in leaves]
    shape = lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(np.shape(x), x.dtype)  # noqa: E731
    abstract = jax.tree.map(shape, params)
    inputs = {"batch": jax.tree.map(shape, batch), "rest": jax.tree.map(shape, rest)}
    batch_dims = {"batch": jax.tree.map(lambda _: 0, batch), "rest": jax.tree.map(lambda _: -1, rest)}
    fn = loss if rewrite is None else rewrite(loss)
    return trace(fn, abstract, inputs, paths, param_table(model), batch_dims, fold=fold)


def layer_bodies(model: nnx.Module, batches: list[dict[str, Any]], loss_fn: Callable | None = None,
                 name: str = "layer", seed: int = 0) -> list[tuple[str, Callable, tuple, float, dict]]:
    """The layer-stack body of `model`'s loss at each example batch, ready to time on one device:
    (key, jitted forward of one layer, random inputs, its matmul FLOPs, {batch, seq}) per batch."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = loss_fn or (lambda m, b: m.loss(b))

    def loss(params, rest, batch):
        out = loss_fn(nnx.merge(graphdef, params, rest, copy=True), batch)
        return out[0] if isinstance(out, tuple) else out

    shape = lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(np.shape(x), x.dtype)  # noqa: E731
    out = []
    for batch in batches:
        closed = jax.make_jaxpr(loss)(jax.tree.map(shape, params), jax.tree.map(shape, rest),
                                      jax.tree.map(shape, batch))
        scans = [jint.scan(e) for e in closed.jaxpr.eqns if e.primitive.name == "scan"]
        if not scans:
            continue
        body = max(scans, key=lambda s: s.length).body
        keys = iter(jax.random.split(jax.random.key(seed), len(body.in_avals)))
        args = tuple(_random(next(keys), aval) for aval in body.in_avals)
        fn = jax.jit(lambda *a, body=body: jint.eval_jaxpr(body, *a))
        leading = jax.tree.leaves(batch)[0]
        meta = {"batch": int(np.shape(leading)[0]), "seq": int(np.shape(leading)[1]) if np.ndim(leading) > 1 else 1}
        out.append((name, fn, args, matmul_flops(body.jaxpr), meta))
    return out


def _random(key, aval):
    if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key):
        return jax.random.split(key, aval.shape) if aval.shape else key
    if np.issubdtype(np.dtype(aval.dtype), np.integer):
        return jax.numpy.zeros(aval.shape, aval.dtype)
    return 0.02 * jax.random.normal(key, aval.shape, aval.dtype)


def key_path(kp) -> str:
    """A pytree key path as a plan key; a Variable's own `.value` attribute is not part of the name."""
    names = []
    for k in kp:
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        if name is not None:
            names.append(name)
    return path_str(tuple(names))


@dataclasses.dataclass
class Candidate:
    mesh: dict[str, int]
    solution: Solution | None
    """None when nothing fits the memory budget on this mesh."""
    pipeline: Any = None
    """For pipe > 1: the `planner.stages.PipelineChoice` (stages, schedule, microbatches and its predictions)."""
    sequence: str | None = None
    """For seq > 1: the sequence method ("ulysses" or "ring") the candidate's attention runs."""
    idle: bool = False
    """Whether the solution leaves the mesh's tensor axis idle (`idle_tensor`)."""
    pruned: bool = False
    """Not solved: a lower bound on its step time showed it could not matter (`search`); solution is None."""

    @property
    def seconds(self) -> float:
        return self.pipeline.step_seconds if self.pipeline is not None else self.solution.step_seconds


def default_budget(cluster: ClusterSpec) -> float:
    return HEADROOM * cluster.memory_bytes


def meshes(num_devices: int, batch: int, fixed: dict[str, int], devices_per_node: int) -> Iterator[dict[str, int]]:
    """Factorizations of the devices over data x fsdp x tensor (others fixed), batch-divisible, tensor in a node."""
    rest = num_devices // math.prod(fixed.get(a, 1) for a in AXES if a not in SEARCH_AXES)
    divisors = [d for d in range(1, rest + 1) if rest % d == 0]
    for t in divisors:
        if "tensor" in fixed and fixed["tensor"] != t:
            continue
        if t > devices_per_node and "tensor" not in fixed:
            continue
        for f in divisors:
            if (rest // t) % f or ("fsdp" in fixed and fixed["fsdp"] != f):
                continue
            d = rest // t // f
            if "data" in fixed and fixed["data"] != d:
                continue
            if batch % (d * f * fixed.get("expert", 1)):
                continue
            yield {a: {"data": d, "fsdp": f, "tensor": t}.get(a, fixed.get(a, 1)) for a in AXES}


def pipe_options(num_devices: int, graph: Graph, fixed: dict[str, int]) -> list[int]:
    """Pipeline degrees to try: the fixed one, else 1 and the divisors of the devices up to the layer count (for a
    model whose loss has a layer stack)."""
    from planner import stages

    if graph.stack == "loop":  # the runtime pipelines only a scanned stack (the shipped decoder's)
        if fixed.get("pipe", 1) > 1:
            raise AutoshardError(LOOP_PIPELINE)
        return [1]
    if "pipe" in fixed:
        if fixed["pipe"] > 1 and not stages.pipelinable(graph):
            raise AutoshardError(f"pipe={fixed['pipe']} but the model has no stacked layer scan to split into "
                                 f"stages: drop pipe from the mesh")
        if fixed["pipe"] > graph.layers:
            raise AutoshardError(f"pipe={fixed['pipe']} exceeds the model's {graph.layers} layers: use pipe <= "
                                 f"{graph.layers}")
        return [fixed["pipe"]]
    if not stages.pipelinable(graph):
        return [1]
    rest = num_devices // math.prod(fixed.get(a, 1) for a in AXES if a not in SEARCH_AXES)
    return [p for p in range(1, min(rest, graph.layers) + 1) if rest % p == 0]


def remat_options(graph: Graph) -> list[str]:
    """Remat modes the search tries: a folded Python loop runs unrematerialised (the runtime applies remat only
    through `autoshard.ops.remat` in a scanned stack), so only "none"."""
    return ["none"] if graph.stack == "loop" else ["none", "full"]


def carry_layouts(graph: Graph) -> dict[int, None]:
    """Fixed layouts of the layer inputs: whole over tensor between layers (Megatron), the layout a plan's
    `layer_input` spec makes the runtime's boundary op realise. A folded Python loop has no such op in the program
    XLA compiles, so its layer input stays free, as in the op-by-op graph."""
    return {} if graph.stack == "loop" else {cin: None for _, cin in graph.carries}


def runtime_layouts(graph: Graph, mesh: dict[str, int]) -> dict[str, dict]:
    """What the runtime lays out on a mesh whatever the solution, as `new_problem` keywords: the layer inputs
    (`carry_layouts`) and, under seq, the attention's q, k, v and output (`seq_expert.attention_layouts`)."""
    outputs, uses = seq_expert.attention_layouts(graph, mesh)
    return dict(fixed_layouts={**carry_layouts(graph), **outputs}, fixed_uses=uses)


def real_params(graph: Graph, params: dict[str, list[SpecEntry]]) -> dict[str, list[SpecEntry]]:
    """Specs under the model's real parameter names: a folded loop's virtual stacked parameter gives every block's
    parameter its spec without the leading layer dimension (every Plan built from a graph goes through here)."""
    if not graph.blocks:
        return params
    out: dict[str, list[SpecEntry]] = {}
    for path, spec in params.items():
        for real in graph.blocks.get(path, [path]):
            out[real] = list(spec[1:]) if path in graph.blocks else spec
    order = {p: k for k, p in enumerate(graph.unfolded.params if graph.unfolded is not None else out)}
    return {p: out[p] for p in sorted(out, key=lambda p: order.get(p, len(order)))}


def _padded(spec: list[SpecEntry] | None, rank: int) -> tuple:
    """A spec as a hashable tuple of length `rank` ([] and [None, None] are the same layout)."""
    spec = list(spec or [])
    return tuple(tuple(e) if isinstance(e, list) else e for e in spec + [None] * (rank - len(spec)))


def folded_specs(graph: Graph, specs: dict[str, list[SpecEntry]]) -> dict[str, list[SpecEntry]] | None:
    """Real-path specs in a folded graph's names: a block family given one spec by all its blocks becomes the
    virtual parameter's spec (a leading None for the layer dimension); a family given by some blocks only, or with
    different specs, cannot be folded: None. Families no block of which is named are left out."""
    out = {p: s for p, s in specs.items() if p in graph.params}
    for virtual, reals in graph.blocks.items():
        named = [r for r in reals if r in specs]
        if not named:
            continue
        rank = len(graph.params[virtual].shape) - 1
        given = {_padded(specs.get(r), rank) for r in reals}
        if len(named) < len(reals) or len(given) > 1:
            return None
        out[virtual] = [None, *specs[named[0]]]
    return out


def graph_for(graph: Graph, specs: dict[str, list[SpecEntry]] | None = None, remat: str | None = None) -> Graph:
    """The graph that can represent these parameter specs and remat mode: a folded loop's own, or its op-by-op
    graph where blocks differ (or remat is asked of a loop the runtime cannot rematerialise per layer)."""
    if graph.stack != "loop" or graph.unfolded is None:
        return graph
    if remat not in (None, "none") or (specs and folded_specs(graph, specs) is None):
        return graph.unfolded
    return graph


def search(graph: Graph, cluster: ClusterSpec, batch: int, *, mesh: dict[str, int] | None = None,
           memory_budget: float | None = None, remat: str | None = None, pinned: dict[str, ParamChoice] | None = None,
           compute_dtype: str = "float32", progress: Callable[[str], None] | None = None,
           pipeline: dict[str, Any] | None = None, sequence: str | None = None, keep: int | None = None
           ) -> list[Candidate]:
    """Solve every candidate mesh; candidates sorted fastest first (infeasible and pruned ones last).

    `pipeline` fixes some of schedule / microbatches / virtual for the meshes with pipe > 1; `sequence` fixes the
    sequence method for the meshes with seq > 1.

    Two shortcuts leave the result as it would be without them. A mesh, remat mode and sequence method whose
    memory floor (`Problem.memory_floor`, `planner.stages.weights_floor`) exceeds the budget fits nothing, so it
    is not solved. With `keep`, a pipeline or seq/expert mesh whose lower bound on step time is above what it must
    beat (`_Bounds`) is pruned: it can neither be among the `keep` fastest (`plan_graph` re-predicts the first
    `top` as the leaders and runners-up, and searches again with 3 x `top` kept in the rare case that it needs
    more) nor the fastest with or without a pipeline, or with or without seq/expert (the plan's provenance).
    Pruned meshes stay in the list (no solution, `pruned`), so the counts of meshes considered do not change.
    Flat meshes are solved first (never pruned: see `_Search.flat`), then pipelines and seq/expert meshes, the
    lowest bound first, so the bar falls early; the list keeps the enumeration order under its sort (ties keep
    it).
    """
    fixed = dict(mesh or {})
    for ax in fixed:
        if ax not in AXES:
            raise AutoshardError(f"unknown mesh axis {ax!r}: use {', '.join(AXES)}")
    if math.prod(fixed.values()) > cluster.num_devices or cluster.num_devices % math.prod(fixed.values()):
        raise AutoshardError(f"fixed mesh {fixed} does not divide the {cluster.num_devices} devices of "
                             f"{cluster.label}")
    budget = default_budget(cluster) if memory_budget is None else memory_budget
    run = _Search(graph, cluster, batch, budget, remat, pinned, compute_dtype, pipeline or {}, sequence, keep, fixed)
    return run.all(candidate_meshes(graph, cluster, batch, fixed, pipeline, sequence), progress)


class _Bounds:
    """What an unsolved mesh must beat to matter: the `keep`-th fastest candidate so far (the first `keep` are the
    leaders `plan_graph` re-predicts) and the fastest so far of each kind the mesh belongs to (with or without a
    pipeline, with or without seq/expert: the plan's provenance reports the best of each). Both only fall as the
    search goes on, so a mesh slower than both when it is reached is slower than both at the end."""

    def __init__(self, keep: int | None) -> None:
        self.keep = keep if keep is None or keep > 0 else None  # (keep 0 would leave no bar: no pruning)
        self.times: list[float] = []
        self.best: dict[tuple[str, bool], float] = {}

    @staticmethod
    def kinds(mesh: dict[str, int]) -> tuple[tuple[str, bool], ...]:
        return ("pipe", mesh["pipe"] > 1), ("seq/expert", mesh["seq"] > 1 or mesh["expert"] > 1)

    def add(self, cand: Candidate) -> None:
        if cand.solution is None or self.keep is None:
            return
        bisect.insort(self.times, cand.seconds)
        del self.times[self.keep:]
        for kind in self.kinds(cand.mesh):
            self.best[kind] = min(self.best.get(kind, math.inf), cand.seconds)

    def bar(self, mesh: dict[str, int]) -> float:
        """What a plan on `mesh` must beat to matter (infinite until `keep` candidates are in)."""
        if self.keep is None or len(self.times) < self.keep:
            return math.inf
        return max([self.times[-1]] + [self.best.get(kind, math.inf) for kind in self.kinds(mesh)])

    def beaten(self, floor: float, mesh: dict[str, int]) -> bool:
        """Whether every plan on `mesh`, at least `floor` seconds, is slower than all it must beat (the floor shrunk
        by 1e-9 first, far more than the rounding of its sums: a tie is never pruned)."""
        return floor * (1 - 1e-9) > self.bar(mesh)


class _MeshProblems:
    """The integer programs of one mesh, each made once (by remat mode and attention residuals)."""

    def __init__(self, graph: Graph, mesh: dict[str, int], cluster: ClusterSpec, compute_dtype: str,
                 pinned: dict[str, ParamChoice] | None, unplanned: set[str]) -> None:
        self.args = (graph, mesh, cluster)
        self.kw = dict(compute_dtype=compute_dtype, fixed_params=pinned, **runtime_layouts(graph, mesh))
        self.unplanned = unplanned
        self.made: dict[tuple, Problem] = {}

    def get(self, remat: str, dense: bool = True, **kw) -> Problem:
        key = (remat, dense, tuple(sorted(kw.items())))
        if key not in self.made:
            self.made[key] = new_problem(*self.args, remat=remat, attention_residuals=dense, **self.kw, **kw)
            self.unplanned.update(self.made[key].unplanned)
        return self.made[key]


def _within(problem: Problem, budget: float) -> Solution | None:
    """`problem.solve(budget)`, or None without solving when its memory floor already exceeds the budget."""
    return None if exceeds(problem.memory_floor(), budget) else problem.solve(budget)


class _Search:
    """One search: the candidates found so far (with their enumeration index), the bounds pruning must beat, and
    the pipeline solves shared between meshes."""

    def __init__(self, graph: Graph, cluster: ClusterSpec, batch: int, budget: float, remat: str | None,
                 pinned: dict[str, ParamChoice] | None, compute_dtype: str, fixes: dict[str, Any],
                 sequence: str | None, keep: int | None, fixed: dict[str, int]) -> None:
        self.graph, self.cluster, self.batch, self.budget = graph, cluster, batch, budget
        self.remat, self.remats = remat, [remat] if remat else remat_options(graph)
        self.pinned, self.dtype, self.fixes, self.sequence, self.fixed = pinned, compute_dtype, fixes, sequence, fixed
        self.shapes = seq_expert.op_shapes(graph)
        self.bounds = _Bounds(keep)
        self.solved: dict = {}
        self.unplanned: set[str] = set()
        self.found: list[tuple[tuple[int, int, int], Candidate]] = []
        self.idle: list[Candidate] = []

    def all(self, meshes: list[dict[str, int]], progress: Callable[[str], None] | None) -> list[Candidate]:
        """Flat meshes in enumeration order, then pipelines, then seq/expert meshes, each lowest bound first."""
        pipes, later = [], []
        for k, m in enumerate(meshes):
            if (m["seq"] > 1 or m["expert"] > 1) and m["pipe"] == 1:
                problems = self.problems(m)
                later.append((self.seq_expert_floor(m, problems), k, m, problems))
            elif m["pipe"] > 1:
                methods = self.methods(m) if m["seq"] > 1 else [None]
                pipes += [(k, j, self.staged(m, x)) for j, x in enumerate(methods)]
            else:
                self.record((k, 0), [self.flat(m)], progress)
        for k, j, staged in sorted(pipes, key=lambda e: (e[2].floor, e[0], e[1])):
            self.record((k, j), [self.pipeline(staged)], progress)
        for floor, k, m, problems in sorted(later, key=lambda e: (e[0], e[1])):
            self.record((k, 0), self.seq_expert(m, problems, floor), progress)
        if self.unplanned:
            warnings.warn(f"the planner has no sharding rule for {', '.join(sorted(self.unplanned))}: such ops are "
                          f"planned replicated", stacklevel=3)
        out = [c for _, c in sorted(self.found, key=lambda e: e[0])]
        if not any(c.solution is not None for c in out):  # only when every other mesh fails
            out += self.idle
        out.sort(key=lambda c: (c.solution is None, c.seconds if c.solution else 0.0))
        return out

    def record(self, key: tuple[int, int], cands: list[Candidate], progress: Callable[[str], None] | None) -> None:
        """Candidates found for the mesh at enumeration position `key` (and method), in order."""
        for j, cand in enumerate(cands):
            aside = cand.idle and "tensor" not in self.fixed  # (the user's own degree stays)
            if progress:
                progress(_progress_line(cand, aside))
            if aside:
                self.idle.append(cand)
                continue
            self.bounds.add(cand)
            self.found.append(((*key, j), cand))

    def problems(self, m: dict[str, int]) -> _MeshProblems:
        return _MeshProblems(self.graph, m, self.cluster, self.dtype, self.pinned, self.unplanned)

    # -- one mesh of each kind -------------------------------------------------------------------------------------
    def flat(self, m: dict[str, int]) -> Candidate:
        """A mesh without pipe, seq or expert (never pruned: a mesh set aside as idle would be counted then)."""
        problems = self.problems(m)
        best = _solve_mesh(problems, self.remats, self.budget)
        if best is not None and "tensor" in self.fixed and (idle_tensor(best, m) or m["fsdp"] > 1 and problems.get(
                best.solver["remat"]).whole_weights(best.params)):
            # the user asked for tensor parallelism: every matmul weight split over it (the solver picks how),
            # rather than an idle axis that XLA would put to work its own way; beside fsdp, rather than weights
            # left whole over it, which then are not ZeRO-3 sharded (`Problem.param_options`)
            best = _solve_mesh(problems, self.remats, self.budget, tensor_weights=True) or best
        return Candidate(m, best, idle=best is not None and idle_tensor(best, m))

    def methods(self, m: dict[str, int]) -> list[str | None]:
        methods = seq_expert.sequence_methods(self.shapes, m["seq"], m["tensor"])
        return [x for x in methods if x == self.sequence] if self.sequence and m["seq"] > 1 else methods

    def seq_expert_floor(self, m: dict[str, int], problems: _MeshProblems) -> float:
        """A lower bound on every candidate of a seq/expert mesh: for each method, the first remat mode whose memory
        floor fits (remat only adds work; a later one is tried only when this one finds nothing) gives
        `compute_floor` + `sync_floor` + the method's exchanges, which `seq_expert.apply` adds as they are;
        infinite when no method fits at all."""
        least = math.inf
        for x in self.methods(m):
            for r in self.remats:
                problem = problems.get(r, seq_expert.dense_residuals(x))
                ext = seq_expert.extras(self.shapes, m, self.batch, x, self.cluster, r)
                if not exceeds(problem.memory_floor() + sum(ext.memory.values()), self.budget):
                    least = min(least, problem.compute_floor() + problem.sync_floor() + sum(ext.seconds.values()))
                    break
        return least

    def seq_expert(self, m: dict[str, int], problems: _MeshProblems, floor: float) -> list[Candidate]:
        if floor == math.inf:  # no method fits under any remat mode
            return [Candidate(m, None, sequence=x) for x in self.methods(m)]
        if self.bounds.beaten(floor, m):
            return [Candidate(m, None, sequence=x, pruned=True) for x in self.methods(m)]
        return _seq_expert_candidates(self.shapes, self.cluster, self.batch, m, self.budget, self.remats,
                                      self.methods(m), problems)

    def staged(self, m: dict[str, int], method: str | None) -> _Staged:
        """A pipe > 1 mesh and sequence method made ready to choose: the intra-stage ILP (time objective, no budget:
        memory is the pipeline's to split; shared by the meshes that split the batch alike), its costs with the
        sequence / expert exchanges and memory spread over the layers (`planner.stages.with_extras`) for each
        remat mode, and the lower bound on any pipeline `planner.stages.choose` could pick (infinite when its
        weights alone cannot fit)."""
        from planner import stages

        costs = _pipeline_costs(self.graph, self.cluster, m, self.pinned, self.dtype, self.solved,
                                attention_residuals=seq_expert.dense_residuals(method), budget=self.budget)
        local = self.batch // (m["expert"] * m["data"] * m["fsdp"])
        fixes = dict(schedule=self.fixes.get("schedule"), microbatches=self.fixes.get("microbatches"),
                     virtual=self.fixes.get("virtual"))
        if costs is None or exceeds(stages.weights_floor(costs), self.budget):
            return _Staged(m, method, costs, {}, local, fixes, math.inf)
        staged = {r: stages.with_extras(costs, seq_expert.extras(self.shapes, m, self.batch, method, self.cluster, r),
                                        self.graph.layers, self.shapes.is_moe)
                  for r in ((self.remat,) if self.remat else ("none", "full"))}
        floor = min(stages.floor(c, self.cluster, self.budget, local, remats=(r,), **fixes) for r, c in staged.items())
        return _Staged(m, method, costs, staged, local, fixes, floor)

    def pipeline(self, s: _Staged) -> Candidate:
        """The fastest stage split / schedule / microbatch count that fits (remat only when nothing fits without);
        pruned when its lower bound is beaten."""
        from planner import stages

        if self.slower(s):
            return Candidate(s.mesh, None, sequence=s.method, pruned=True)
        for r, c in s.staged.items():
            choice = stages.choose(c, self.cluster, self.budget, s.local, remats=(r,), **s.fixes)
            if choice is not None:
                sol = dataclasses.replace(s.costs.solution, solver=dict(s.costs.solution.solver))
                sol.solver["remat"] = choice.predicted.get("remat", "none")
                return Candidate(s.mesh, sol, choice, sequence=s.method)
        return Candidate(s.mesh, None, sequence=s.method)

    def slower(self, s: _Staged) -> bool:
        """Whether every pipeline `choose` could pick on this mesh is slower than the bar: its floor first, then
        the floors near the bar raised (`planner.stages.floor_above`). (An infinite floor: nothing fits.)"""
        from planner import stages

        bar = self.bounds.bar(s.mesh)
        if s.floor == math.inf or bar == math.inf:
            return False
        return self.bounds.beaten(s.floor, s.mesh) or all(
            stages.floor_above(c, self.cluster, self.budget, s.local, bar, remats=(r,), **s.fixes)
            for r, c in s.staged.items())


@dataclasses.dataclass
class _Staged:
    """A pipeline mesh and sequence method ready for `planner.stages.choose` (`_Search.staged`)."""

    mesh: dict[str, int]
    method: str | None
    costs: Any
    staged: dict[str, Any]
    """Remat mode -> costs with the sequence / expert terms; empty when nothing can fit."""
    local: int
    fixes: dict[str, Any]
    floor: float


def _progress_line(cand: Candidate, aside: bool = False) -> str:
    line = _mesh_str(cand.mesh) + (f" ({cand.sequence})" if cand.sequence else "")
    if cand.pruned:
        return line + ": pruned (cannot beat the leaders)"
    if aside:
        return line + ": tensor idle (nothing worth splitting over it): set aside"
    return line + (f": {cand.seconds * 1e3:.2f} ms" if cand.solution else ": does not fit")


def near_tie_winner(ranked: list[Plan]) -> Plan:
    """Of plans ranked fastest first, the one that moves the fewest bytes (then holds the least memory) among those
    within `NEAR_TIE` of the fastest's predicted step time; the ranking settles what is still equal."""
    fastest = ranked[0].predicted["step_seconds"]
    near = [p for p in ranked if p.predicted["step_seconds"] <= fastest * (1 + NEAR_TIE)]
    moved = lambda p: float(f"{sum(p.predicted.get('comm_bytes', {}).values()):.6g}")  # noqa: E731
    return min(near, key=lambda p: (moved(p), float(f"{p.predicted['memory_bytes_per_device']:.6g}")))


def _solve_mesh(problems: _MeshProblems, remats: list[str], budget: float, **problem_kw) -> Solution | None:
    """The fastest solution for one mesh without pipe, seq or expert: no remat first, then the remat options
    (remat only costs time) until one fits."""
    best: Solution | None = None
    for r in remats:
        # the residual stream stays whole over tensor between layers (Megatron): the layout XLA realises
        # faithfully from a plan's `layer_input` spec
        sol = _within(problems.get(r, **problem_kw), budget)
        if sol is not None:
            sol.solver["remat"] = r
            if best is None or sol.step_seconds < best.step_seconds:
                best = sol
        if sol is not None and r == "none":
            break
    return best


def idle_tensor(sol: Solution, mesh: dict[str, int]) -> bool:
    """Whether a solution leaves a tensor axis of size > 1 idle: no op split over it, no parameter. Such a plan
    is not what runs: XLA's partitioner puts the idle devices to work its own way (gathering weights and
    splitting weight-gradient work over the axis), so its predictions do not hold; the search sets it aside."""
    return (mesh["tensor"] > 1 and not any(s.split for s in sol.ops.values())
            and all(c.layout is None for c in sol.params.values()))


def candidate_meshes(graph: Graph, cluster: ClusterSpec, batch: int, fixed: dict[str, int],
                     pipeline: dict[str, Any] | None = None, sequence: str | None = None) -> list[dict[str, int]]:
    """Every mesh the search solves: pipe x (expert x seq) x data x fsdp x tensor over the devices.

    seq and expert are strategies of one op each (attention, MoE): seq is tried for models with attention and no
    MoE layer (the MoE routing groups are whole sequences: split over seq, XLA all-reduces the routing across it),
    at the degrees some sequence method can run (`seq_expert.sequence_methods`); expert for MoE models, at divisors
    of the expert count. Never both at once unless the mesh fixes them; seq or expert > 1 with pipe > 1 only when
    the mesh fixes pipe (the enumeration stays affordable); MoE models pipeline (the executor's statistics sweep is
    costed), but not with seq > 1 (the executor refuses that).
    """
    shapes = seq_expert.op_shapes(graph)
    seq_expert.check_fixed(shapes, fixed, sequence, batch)
    n = cluster.num_devices
    if shapes.is_moe and fixed.get("seq", 1) > 1 and fixed.get("pipe", 1) > 1:
        raise AutoshardError("a pipeline cannot run MoE layers with seq > 1 (their routing groups are whole "
                             "sequences): drop pipe or seq from the mesh")
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    seqs = [fixed["seq"]] if "seq" in fixed else [1] + [
        d for d in divisors[1:] if shapes.has_attention and not shapes.is_moe
        and any(m in ([sequence] if sequence else seq_expert.SEQUENCE_METHODS)
                for m in seq_expert.sequence_methods(shapes, d, 1))]
    experts = [fixed["expert"]] if "expert" in fixed else [
        d for d in divisors if seq_expert.expert_ok(shapes, d) and batch % d == 0]
    out = []
    for e in experts:
        for s in seqs:
            if n % (e * s) or (e > 1 and s > 1 and not ("seq" in fixed and "expert" in fixed)):
                continue
            rest = {k: v for k, v in fixed.items() if k not in ("seq", "expert")}
            if e > 1 or s > 1:
                if pipeline and "pipe" not in rest:  # fixed pipeline choices: pipelines only, and these are not
                    continue
                pipe = pipe_options(n, graph, rest)[0] if "pipe" in rest else 1
                if n % (e * s * pipe):
                    continue
                out += list(meshes(n, batch, {**rest, "pipe": pipe, "expert": e, "seq": s},
                                   cluster.devices_per_node))
                continue
            pipes = pipe_options(n, graph, rest)
            if pipeline and "pipe" not in rest:  # fixed pipeline choices: pipelines only
                pipes = [p for p in pipes if p > 1]
            out += [m for p in pipes for m in meshes(n, batch, {**rest, "pipe": p, "expert": e, "seq": s},
                                                     cluster.devices_per_node)]
    return out


def _seq_expert_candidates(shapes: seq_expert.OpShapes, cluster: ClusterSpec, batch: int, m: dict[str, int],
                           budget: float, remats: list[str], methods: list[str | None], problems: _MeshProblems
                           ) -> list[Candidate]:
    """A mesh with seq or expert > 1: the integer program over the token-split graph for each sequence method the
    mesh admits, its budget reduced by the method's own memory (ring / Ulysses: their flash-style residuals and
    transient, with the traced dense attention's residuals left out), plus the op's exchanges."""
    best: dict[str | None, Solution | None] = {x: None for x in methods}
    done: set[str | None] = set()  # methods whose search stops (a fit without remat)
    for r in remats:
        groups: dict[bool, list[str | None]] = {}  # methods sharing one integer program (same attention residuals)
        for x in methods:
            if x not in done:
                groups.setdefault(seq_expert.dense_residuals(x), []).append(x)
        for dense, group in groups.items():
            problem = problems.get(r, dense)
            ext = {x: seq_expert.extras(shapes, m, batch, x, cluster, r) for x in group}
            need = {x: sum(e.memory.values()) for x, e in ext.items()}
            # the optimum under the loosest of the methods' budgets is each method's optimum when it also fits that
            # method's budget: solve once, re-solve only for a method it does not fit
            loose = _within(problem, budget - min(need.values()))
            for x in group:
                sol = loose
                if sol is not None and sol.memory_bytes + need[x] > budget:
                    sol = _within(problem, budget - need[x])
                if sol is not None:
                    sol = seq_expert.apply(sol, ext[x])
                    sol.solver["remat"] = r
                    if best[x] is None or sol.step_seconds < best[x].step_seconds:
                        best[x] = sol
                    if r == "none":
                        done.add(x)
    return [Candidate(m, best[x], sequence=x) for x in methods]


def smallest_memory(graph: Graph, cluster: ClusterSpec, batch: int, fixed: dict[str, int] | None = None,
                    pipeline: dict[str, Any] | None = None, sequence: str | None = None) -> float:
    """The least per-device memory any candidate plan needs (for the infeasible-budget error): the same integer
    program as the search, minimising memory instead of time; for pipelines, the lightest layout `choose` tries.
    A program or pipeline whose memory floor is above the least found so far is not solved (it cannot lower it)."""
    from planner import stages

    least = math.inf
    fixed = dict(fixed or {})
    solved: dict = {}
    shapes = seq_expert.op_shapes(graph)
    for m in candidate_meshes(graph, cluster, batch, fixed, pipeline):
        if m["pipe"] > 1:
            costs = _pipeline_costs(graph, cluster, m, None, "float32", solved)
            if costs is not None and not exceeds(stages.weights_floor(costs), least):
                local = batch // (m["data"] * m["fsdp"])
                least = min(least, stages.least_memory(costs, local, below=least, **(pipeline or {})))
            continue
        methods = seq_expert.sequence_methods(shapes, m["seq"], m["tensor"]) or [None]
        if sequence and m["seq"] > 1:
            methods = [x for x in methods if x == sequence]
        for r in remat_options(graph):
            for dense in sorted({seq_expert.dense_residuals(x) for x in methods}):
                pr = new_problem(graph, m, cluster, remat=r, objective="memory",
                                 attention_residuals=dense, **runtime_layouts(graph, m))
                extra = min(sum(seq_expert.extras(shapes, m, batch, x, cluster, r).memory.values())
                            for x in methods if seq_expert.dense_residuals(x) == dense)
                if exceeds(pr.memory_floor() + extra, least):
                    continue
                sol = pr.solve(None)
                if sol is not None:
                    least = min(least, sol.memory_bytes + extra)
    return least


def _pipeline_costs(graph: Graph, cluster: ClusterSpec, m: dict[str, int], pinned: dict[str, ParamChoice] | None,
                    compute_dtype: str, cache: dict | None = None, attention_residuals: bool = True,
                    budget: float | None = None):
    """`planner.stages.MeshCosts` of a pipe > 1 mesh: the intra-stage ILP (time objective, no budget: memory is
    the pipeline's to split), fsdp sharding every weight it can. With a `budget`, None without solving when no
    solution's weights could fit it on any layout (`planner.stages.unsolved_weights_floor`).

    With a `cache`, meshes with the same tensor degree and batch split (data x fsdp) share one solve: the solve
    decides tensor layouts, whose costs depend only on those two (its gradient-sync terms, which do depend on how
    data and fsdp divide the split, are not the pipeline's and are recomputed by `planner.stages`).
    """
    from planner import stages

    cache = {} if cache is None else cache
    problem = _pipeline_problem(graph, cluster, m, pinned, compute_dtype, cache, attention_residuals)
    if budget is not None and exceeds(stages.unsolved_weights_floor(problem, m), budget):
        return None
    entry = cache[_pipeline_key(m, attention_residuals)]
    if len(entry) == 1:  # solved once, when a mesh first needs it
        entry.append(problem.solve(None))
    sol = entry[1]
    if sol is None:
        return None
    problem = copy.copy(problem)
    problem.mesh = m  # same batch split and tensor degree: only fsdp's parameter choices differ
    sol = dataclasses.replace(sol, params=stages.pipeline_params(problem, sol), solver=dict(sol.solver))
    return stages.mesh_costs(problem, sol)


def _pipeline_key(m: dict[str, int], attention_residuals: bool) -> tuple:
    return m["tensor"], m["data"] * m["fsdp"], m["expert"], m["seq"], attention_residuals


def _pipeline_problem(graph: Graph, cluster: ClusterSpec, m: dict[str, int], pinned: dict[str, ParamChoice] | None,
                      compute_dtype: str, cache: dict, attention_residuals: bool) -> Problem:
    """The intra-stage program of a pipe > 1 mesh (data x fsdp as one batch split), made once per
    `_pipeline_key` in `cache` (where its solution joins it)."""
    key = _pipeline_key(m, attention_residuals)
    if key not in cache:
        shape = {**m, "data": m["data"] * m["fsdp"], "fsdp": 1}
        cache[key] = [new_problem(graph, shape, cluster, remat="none", compute_dtype=compute_dtype,
                                  fixed_params=pinned, **runtime_layouts(graph, shape),
                                  attention_residuals=attention_residuals)]
    return cache[key][0]


def to_plan(graph: Graph, cand: Candidate) -> Plan:
    """The Plan a solved candidate stands for (predictions from the search; no provenance yet)."""
    from planner.stages import is_layer_param

    sol = cand.solution
    m = cand.mesh
    params: dict[str, list[SpecEntry]] = {}
    for path, c in sol.params.items():
        spec: list[SpecEntry] = [None] * len(graph.params[path].shape)
        if c.layout is not None and m["tensor"] > 1:
            spec[c.layout] = "tensor"
        if c.fsdp_dim is not None:
            spec[c.fsdp_dim] = "fsdp"
        if m["pipe"] > 1 and is_layer_param(graph, path):
            spec[0] = "pipe"  # stages are slices of the layer stack
        if m["expert"] > 1 and graph.params[path].axes and "experts" in graph.params[path].axes:
            spec[graph.params[path].axes.index("experts")] = "expert"
        params[path] = spec
    params = real_params(graph, params)
    batch_axes = [a for a in BATCH_AXES if m[a] > 1]
    batch_entry: SpecEntry = None if not batch_axes else (batch_axes[0] if len(batch_axes) == 1 else batch_axes)
    activations = {}
    if graph.carries and graph.stack != "loop":  # a Python loop has no boundary op to apply the spec to
        carry = graph.values[graph.carries[0][1]]
        spec = [None] * len(carry.shape)
        if carry.batch_dim is not None:
            spec[carry.batch_dim] = batch_entry
        seq_dims = [d for d in carry.token_dims if d != carry.batch_dim]
        if m["seq"] > 1 and seq_dims:
            spec[seq_dims[0]] = "seq"
        activations["layer_input"] = spec  # whole over tensor: the search fixes the residual stream so
    sections = {"sequence": {"method": cand.sequence} if m["seq"] > 1 else None,
                "experts": {"degree": m["expert"]} if m["expert"] > 1 else None}
    if cand.pipeline is not None:
        return Plan(mesh=m, params=params, activations=activations, remat=sol.solver.get("remat", "none"),
                    pipeline=cand.pipeline.spec, predicted=dict(cand.pipeline.predicted), **sections)
    return Plan(mesh=m, params=params, activations=activations, remat=sol.solver.get("remat", "none"),
                predicted=predicted(sol), **sections)


def predicted(sol: Solution) -> dict[str, Any]:
    return {"step_seconds": sol.step_seconds, "memory_bytes_per_device": sol.memory_bytes,
            "comm_bytes": {k: v for k, v in sorted(sol.comm_bytes.items()) if v > 0},
            "time_breakdown": sol.breakdown, "memory_breakdown": sol.memory}


def _mesh_str(m: dict[str, int]) -> str:
    return ",".join(f"{a}={n}" for a, n in m.items() if n > 1) or "single device"


def plan_graph(graph: Graph, cluster: ClusterSpec | str, batch: int, *, mesh: dict[str, int] | None = None,
               memory_budget: float | None = None, remat: str | None = None, top: int = 5,
               pin: dict[str, list[SpecEntry]] | None = None,
               provenance: dict | None = None, progress: Callable[[str], None] | None = None,
               compute_dtype: str = "float32", schedule: str | None = None, microbatches: int | None = None,
               virtual: int | None = None, sequence: str | None = None) -> Plan:
    """The fastest plan that fits (see `search`); `schedule` / `microbatches` / `virtual` fix pipeline choices and
    restrict the search to pipelines (pipe > 1) unless the mesh fixes pipe; `sequence` fixes the sequence method
    ("ulysses" or "ring") of meshes with seq > 1."""
    cluster = load_cluster(cluster) if not isinstance(cluster, ClusterSpec) else cluster
    start = time.perf_counter()
    fixes = {k: v for k, v in (("schedule", schedule), ("microbatches", microbatches), ("virtual", virtual))
             if v is not None}
    mesh = _pipeline_fixes(graph, batch, dict(mesh or {}), fixes)
    if fixes.get("schedule") in ZERO_BUBBLE and remat not in (None, "none"):  # (`planner.schedule.check`'s rule)
        raise AutoshardError(f"the {fixes['schedule']} schedule needs remat none (its weight gradients reuse the "
                             f"forward's residuals), not remat {remat}: drop --remat or use --schedule 1f1b")
    graph = graph_for(graph, pin, remat)  # pins that split a loop's blocks apart: plan it op by op
    pinned = None
    if pin:
        known = set(graph.params) | {r for reals in graph.blocks.values() for r in reals}
        unknown = sorted(set(pin) - known)
        if unknown:
            raise AutoshardError(f"cannot pin {unknown[0]!r}: the model has no such parameter")
        names = folded_specs(graph, pin) if graph.blocks else pin
        pinned = choices_from_plan(Plan(mesh={}, params=real_params(graph, names)), graph)
        pinned = {k: v for k, v in pinned.items() if k in names}
    search_kw = dict(mesh=mesh, memory_budget=memory_budget, remat=remat, compute_dtype=compute_dtype,
                     pinned=pinned, pipeline=fixes, sequence=sequence)
    cands = search(graph, cluster, batch, progress=progress, keep=top, **search_kw)
    if fixes and not any(c.mesh["pipe"] > 1 for c in cands):
        raise AutoshardError(f"no pipeline mesh over {cluster.num_devices} devices admits the fixed pipeline "
                             f"choices {fixes}: relax --schedule / --microbatches / --virtual-stages")
    if not cands:
        raise AutoshardError(f"no mesh over {cluster.num_devices} devices splits batch {batch} evenly: change the "
                             f"batch size or the fixed mesh axes")
    if cands[0].solution is None:
        need = smallest_memory(graph, cluster, batch, mesh, fixes, sequence)
        budget = default_budget(cluster) if memory_budget is None else memory_budget
        raise AutoshardError(f"no plan fits {format_bytes(budget)} per device: the smallest plan needs "
                             f"{format_bytes(need * 1.0005)}; raise --memory-budget or use more devices")  # rounded up
    # re-predict the leaders as XLA's partitioner will realise each plan, and rank by that
    budget = default_budget(cluster) if memory_budget is None else memory_budget
    plans = _repredict(graph, cands, top, budget, cluster, compute_dtype, exact=top)
    if plans is None:  # none of the first `top` fits as realised: search again, keeping the leaders further down
        cands = search(graph, cluster, batch, keep=3 * top, **search_kw)
        plans = _repredict(graph, cands, top, budget, cluster, compute_dtype, exact=3 * top)
    leaders = [c for c in cands if c.solution is not None]
    order = {id(p): k for k, p in enumerate(plans)}
    # equal predicted times (to 6 digits): the simpler layout wins, less tensor, then less fsdp sharding
    rank = lambda p: (float(f"{p.predicted['step_seconds']:.6g}"), p.mesh["seq"], p.mesh["expert"],  # noqa: E731
                      p.mesh["tensor"], p.mesh["fsdp"], order[id(p)])
    fitting = sorted((p for p in plans if _fits(p, budget)), key=rank)
    if fitting:
        best = near_tie_winner(fitting)
    else:  # as XLA would realise them none of the leaders fits; the search's own layouts do (XLA's choice is
        # ambiguous for this model): report the search's figures for its best plan
        best = to_plan(graph, leaders[0])
    rest = sorted((p for p in plans if p is not best), key=rank)
    prov = dict(provenance or {})
    prov.update(cluster=cluster.label, batch=batch, memory_budget=float(budget), solver={
        "seconds": round(time.perf_counter() - start, 3), "meshes_considered": len(cands), **cands[0].solution.solver})
    best.provenance = prov
    best.alternatives = [{"mesh": {a: n for a, n in p.mesh.items() if n > 1} or {"data": 1}, "remat": p.remat,
                          "predicted": p.predicted} for p in rest]
    best.provenance["pipeline_choice"] = _why(best, cands, plans, budget)
    best.provenance["seq_expert_choice"] = _why_seq_expert(best, cands)
    best.provenance["remat_choice"] = _why_remat(best, graph, cluster, compute_dtype, budget, remat)
    if any(c.idle and all(c.mesh[a] == best.mesh[a] for a in AXES) for c in cands):
        warnings.warn(f"tensor={best.mesh['tensor']} is idle in the plan for {best.mesh_string()}: nothing in this "
                      f"model is worth splitting over it at this size, and XLA puts idle devices to work its own "
                      f"way, so the predictions for this mesh will not hold: use data or fsdp instead", stacklevel=2)
    return best


def _repredict(graph: Graph, cands: list[Candidate], top: int, budget: float, cluster: ClusterSpec,
               compute_dtype: str, exact: int) -> list[Plan] | None:
    """The `top` fastest candidates as plans predicted as XLA will realise them, and further down (to 3 x `top`)
    until one fits as realised and the next one's search time cannot beat the best realised time (a pipeline's
    realised time can exceed its search time: gpt-175b on a100-80g:1024, pipe=32 31.2 s searched, 37.0 s realised,
    where the best unpipelined candidate realises its 34.1 s). None when a fitting one needs a candidate beyond the
    first `exact`, which are all a pruned search guarantees (`search`'s `keep`); past them only the best candidate
    of each kind (with and without a pipeline), which a pruned search always solves, is realised too."""
    fitting = lambda plans: [p.predicted["step_seconds"] for p in plans if _fits(p, budget)]  # noqa: E731
    pruned = any(c.pruned for c in cands)
    leaders = [c for c in cands if c.solution is not None]
    plans: list[Plan] = []
    for k, cand in enumerate(leaders[:3 * top]):
        if k >= top and fitting(plans) and cand.seconds >= min(fitting(plans)):
            break
        if k >= exact and pruned:
            if not fitting(plans):
                return None
            firsts = [next((c for c in leaders if (c.mesh["pipe"] > 1) == kind), None) for kind in (False, True)]
            plans += [_realise(graph, c, cluster, compute_dtype) for c in firsts
                      if c is not None and leaders.index(c) >= k and c.seconds < min(fitting(plans))]
            break
        plans.append(_realise(graph, cand, cluster, compute_dtype))
    if pruned and len(plans) == exact < 3 * top and not fitting(plans):  # pruned ones might have come next
        return None
    return plans


def _fits(plan: Plan, budget: float) -> bool:
    """Whether a plan's realised prediction fits the per-device budget."""
    return plan.predicted["memory_bytes_per_device"] <= budget


def _realise(graph: Graph, cand: Candidate, cluster: ClusterSpec, compute_dtype: str) -> Plan:
    """A candidate as a plan predicted as XLA's partitioner will realise it (its search time kept beside)."""
    p = to_plan(graph, cand)
    try:
        p.predicted = {**predict(p, graph, cluster, compute_dtype), "search_objective_seconds": cand.seconds}
    except AutoshardError:
        if p.pipeline is None:
            raise
        # the bytes-objective program finds no assignment for these layouts (seen on gpt-175b with a per-replica
        # batch of 768 and up, likely CP-SAT's integer range): keep the search's own figures
        p.predicted = {**p.predicted, "search_objective_seconds": cand.seconds}
    return p


def _why_seq_expert(best: Plan, cands: list[Candidate]) -> dict[str, Any]:
    """The best candidate with and without sequence / expert parallelism, for the summary's account of the
    choice (search figures)."""
    out: dict[str, Any] = {"chosen": {a: best.mesh[a] for a in ("seq", "expert")},
                           "sequence": (best.sequence or {}).get("method")}
    for key, want in (("best_without", False), ("best_with", True)):
        pool = [c for c in cands if (c.mesh["seq"] > 1 or c.mesh["expert"] > 1) == want]
        fitting = [c for c in pool if c.solution is not None]
        entry: dict[str, Any] = {"considered": len(pool), "fits": bool(fitting)}
        if fitting:
            c = fitting[0]
            entry.update(mesh={a: n for a, n in c.mesh.items() if n > 1}, step_seconds=c.seconds,
                         memory_bytes_per_device=c.pipeline.predicted["memory_bytes_per_device"] if c.pipeline
                         else c.solution.memory_bytes, sequence=c.sequence)
        out[key] = entry
    return out


def _pipeline_fixes(graph: Graph, batch: int, mesh: dict[str, int], fixes: dict[str, Any]) -> dict[str, int]:
    """Check fixed pipeline choices early (one-line errors); they imply pipe > 1."""
    from planner.plan import SCHEDULES

    if not fixes:
        return mesh
    if graph.stack == "loop":
        raise AutoshardError(LOOP_PIPELINE)
    if mesh.get("pipe") == 1:
        raise AutoshardError("--schedule / --microbatches / --virtual-stages fix a pipeline but the mesh fixes "
                             "pipe=1: drop them or allow pipe > 1")
    kind = fixes.get("schedule")
    if kind is not None and kind not in SCHEDULES:
        raise AutoshardError(f"unknown pipeline schedule {kind!r}: use one of {', '.join(SCHEDULES)}")
    m, v = fixes.get("microbatches"), fixes.get("virtual")
    if m is not None and (m < 1 or batch % m):
        raise AutoshardError(f"--microbatches {m} does not divide the batch of {batch}: choose a divisor of the "
                             f"per-replica batch (batch / data x fsdp)")
    if v is not None and v > 1 and kind not in (None, "interleaved"):
        raise AutoshardError(f"--virtual-stages {v} needs --schedule interleaved, not {kind}")
    if v is not None and v > 1:
        fixes.setdefault("schedule", "interleaved")
    if v is not None and (v < 1 or graph.layers % v):
        raise AutoshardError(f"--virtual-stages {v} must divide the model's {graph.layers} layers")
    return mesh


def _why(best: Plan, cands: list[Candidate], realised: list[Plan], budget: float) -> dict[str, Any]:
    """The best candidate without a pipeline and the best with one, for the summary's account of the choice: as
    realised where `_repredict` predicted one of the kind that fits (what the choice was made on), else as searched."""
    out: dict[str, Any] = {"chosen": "pipeline" if best.pipeline else "no pipeline"}
    for key, want in (("best_without_pipeline", False), ("best_with_pipeline", True)):
        pool = [c for c in cands if (c.mesh["pipe"] > 1) == want]
        fitting = [c for c in pool if c.solution is not None]
        mine = sorted((p for p in realised if (p.mesh["pipe"] > 1) == want and _fits(p, budget)),
                      key=lambda p: p.predicted["step_seconds"])
        if not pool:
            out[key] = {"considered": 0}
        elif not fitting:
            out[key] = {"considered": len(pool), "fits": False}
        else:
            if mine:
                pred, mesh, seconds = mine[0].predicted, mine[0].mesh, mine[0].predicted["step_seconds"]
            else:
                c = fitting[0]
                pred = c.pipeline.predicted if c.pipeline else predicted(c.solution)
                mesh, seconds = c.mesh, c.seconds
            entry = {"considered": len(pool), "fits": True, "mesh": {a: n for a, n in mesh.items() if n > 1},
                     "step_seconds": seconds, "memory_bytes_per_device": pred["memory_bytes_per_device"]}
            if "pipeline" in pred:
                pl = pred["pipeline"]
                entry.update(schedule=pl["schedule"], microbatches=pl["microbatches"], virtual=pl["virtual"],
                             bubble=pl["bubble"])
            out[key] = entry
    return out


def _why_remat(best: Plan, graph: Graph, cluster: ClusterSpec, dtype: str, budget: float,
               fixed: str | None) -> dict[str, Any]:
    """The chosen remat and the same plan under the other one (its predicted time and memory, and whether it fits),
    for the summary's account of the choice; a remat the user fixed, or the only one the model runs, says so."""
    if fixed is not None:
        return {"chosen": best.remat, "fixed": True}
    if remat_options(graph) == ["none"]:
        return {"chosen": best.remat, "only": True}
    other = "none" if best.remat == "full" else "full"
    try:
        pred = predict(dataclasses.replace(best, remat=other), graph, cluster, dtype)
    except AutoshardError:
        return {"chosen": best.remat}
    return {"chosen": best.remat, "other": other, "step_seconds": pred["step_seconds"],
            "memory_bytes_per_device": pred["memory_bytes_per_device"],
            "fits": not exceeds(pred["memory_bytes_per_device"], budget)}


def format_bytes(n: float) -> str:
    """Bytes with binary units and four significant digits: `16 GiB`, `148.2 KiB`, `1.061 MiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    return f"{n} B"


def choices_from_plan(plan: Plan, graph: Graph) -> dict[str, ParamChoice]:
    """A plan's parameter specs as ILP choices (the tensor dimension and the fsdp dimension of each); a folded
    loop's blocks must share their specs (`graph_for` picks the op-by-op graph where they do not)."""
    specs = plan.params
    if graph.blocks:
        specs = folded_specs(graph, plan.params)
        if specs is None:
            raise AutoshardError("the plan gives a loop's blocks different specs: predict it on the op-by-op graph "
                                 "(planner.search.graph_for)")
    out = {}
    for path in graph.params:
        spec = specs.get(path, [])
        t = next((d for d, e in enumerate(spec) if e == "tensor" or (isinstance(e, list) and "tensor" in e)), None)
        f = next((d for d, e in enumerate(spec) if e == "fsdp" or (isinstance(e, list) and "fsdp" in e)), None)
        out[path] = ParamChoice(t, f)
    return out


def predict(plan: Plan, graph: Graph, cluster: ClusterSpec | str, compute_dtype: str = "float32") -> dict[str, Any]:
    """Predictions for a given plan: its parameter layouts fixed, op strategies as the partitioner would pick (and
    as the runtime constrains them where it can: `activation_specs`)."""
    cluster = load_cluster(cluster) if not isinstance(cluster, ClusterSpec) else cluster
    graph, timed, sol, method = _plan_solution(plan, graph, cluster, compute_dtype)
    if plan.pipeline is not None and plan.mesh["pipe"] > 1:
        return _predict_pipeline(plan, graph, cluster, timed, sol, method)
    if plan.mesh["seq"] > 1 or plan.mesh["expert"] > 1:
        shapes = seq_expert.op_shapes(graph)
        batch = next((graph.values[i].shape[0] for i in graph.inputs if graph.values[i].batch_dim == 0), 1)
        seq_expert.check_fixed(shapes, {a: plan.mesh[a] for a in ("seq", "expert", "tensor")}, method, batch)
        sol = seq_expert.apply(sol, seq_expert.extras(shapes, plan.mesh, batch, method, cluster, plan.remat))
    return predicted(sol)


def activation_specs(plan: Plan, graph: Graph) -> dict[tuple[int, ...], dict[int, list[SpecEntry]]]:
    """The layout `predict` gives each activation the runtime can constrain, so the compiled program is the one
    predicted: jaxpr equation (`Op.eqns`) -> output position -> spec (the batch dimension over the batch axes, a
    sequence over seq, the tensor split where the solution puts one). Parameters and their casts keep their own
    specs (a constraint there would gather a ZeRO-3 weight's gradient whole), partial sums and integer values are
    left to XLA.

    Where an op reads an operand in another layout than the value has (a conversion the prediction prices), the
    operand is constrained too, under key `-1 - position`: XLA otherwise may run the op in the value's layout and
    convert its output instead (the zoo's GQA decoder squared the embedding's split output, then gathered both)."""
    graph, problem, sol, _ = _plan_solution(plan, graph, f"cpu:{plan.num_devices}")  # byte-optimal: any cluster
    used = [a for a in BATCH_AXES if plan.mesh[a] > 1]
    batch: SpecEntry = None if not used else used[0] if len(used) == 1 else used
    seq = plan.mesh["seq"]

    def spec_of(vid: int, layout: Layout) -> list[SpecEntry] | None:
        v = graph.values[vid]
        if not v.shape or v.param is not None or dtype_kind(v.dtype) != "float" or layout == PARTIAL:
            return None
        spec: list[SpecEntry] = [None] * len(v.shape)
        if v.batch_dim is not None:
            spec[v.batch_dim] = batch
            tokens = [d for d in v.token_dims if d != v.batch_dim]  # a sequence: split over seq, as priced
            if seq > 1 and tokens and v.shape[tokens[0]] % seq == 0:
                spec[tokens[0]] = "seq"
        if isinstance(layout, int) and spec[layout] is None:
            spec[layout] = "tensor"
        return spec

    out: dict[tuple[int, ...], dict[int, list[SpecEntry]]] = {}
    for op in graph.ops:
        if not op.eqns:
            continue
        specs = {pos: spec_of(vid, problem.layout_of(vid, sol.ops, sol.params)) for pos, vid in enumerate(op.outputs)}
        strategy = sol.ops.get(op.index)
        for pos, vid in enumerate(op.inputs):
            if vid is None or strategy is None or graph.values[vid].producer is None:
                continue
            if strategy.ins[pos] != problem.layout_of(vid, sol.ops, sol.params):
                specs[-1 - pos] = spec_of(vid, strategy.ins[pos])
        for key in op.eqns:
            out.setdefault(key, {}).update({k: v for k, v in specs.items() if v is not None})
    return out


def _plan_solution(plan: Plan, graph: Graph, cluster: ClusterSpec | str, compute_dtype: str = "float32"
                   ) -> tuple[Graph, Problem, Solution, str | None]:
    """(the graph that can express the plan, its timed problem, the solution `predict` reports, sequence method)."""
    cluster = load_cluster(cluster) if not isinstance(cluster, ClusterSpec) else cluster
    if graph.stack == "loop" and plan.mesh["pipe"] > 1:
        raise AutoshardError(LOOP_PIPELINE)
    graph = graph_for(graph, plan.params, plan.remat)
    fixed, uses = seq_expert.attention_layouts(graph, plan.mesh)
    spec = plan.activations.get("layer_input")
    if spec is not None and graph.carries and graph.stack != "loop":  # the plan constrains the layer boundary:
        # so does the prediction
        t = next((d for d, e in enumerate(spec) if e == "tensor" or (isinstance(e, list) and "tensor" in e)), None)
        fixed.update({cin: t for _, cin in graph.carries})
    method = (plan.sequence or {}).get("method", "ring") if plan.mesh["seq"] > 1 else None
    dense = seq_expert.dense_residuals(method)
    problem = new_problem(graph, plan.mesh, cluster, remat=plan.remat, compute_dtype=compute_dtype,
                      fixed_params=choices_from_plan(plan, graph), fixed_layouts=fixed, fixed_uses=uses,
                      objective="bytes", attention_residuals=dense)
    sol = problem.solve(None)
    if sol is not None:  # report times from the cluster model, for the layouts the partitioner would choose
        timed = new_problem(graph, plan.mesh, cluster, remat=plan.remat, compute_dtype=compute_dtype,
                        fixed_params=choices_from_plan(plan, graph), fixed_layouts=fixed, fixed_uses=uses,
                        attention_residuals=dense)
        sol = timed.evaluate(sol.ops, sol.params)
    if sol is None:
        raise AutoshardError("the plan's parameter layouts admit no consistent strategy: check its specs")
    return graph, timed, sol, method


def _predict_pipeline(plan: Plan, graph: Graph, cluster: ClusterSpec, problem: Problem, sol: Solution,
                      method: str | None = None) -> dict[str, Any]:
    """A pipeline plan: its stages, schedule and microbatches on the intra-stage layouts the partitioner picks."""
    from planner import stages
    from planner.schedule import check, pipeline_mode

    if not stages.pipelinable(graph):
        raise AutoshardError("the plan has a pipeline section but the model has no stacked layer scan to split")
    spec = plan.pipeline
    check(spec.schedule, plan.mesh["pipe"], spec.microbatches, spec.virtual, graph.layers)
    if spec.stages[-1][1] != graph.layers:
        raise AutoshardError(f"pipeline stages cover layers [0, {spec.stages[-1][1]}) but the model has "
                             f"{graph.layers} layers: re-plan for this model")
    costs = stages.mesh_costs(problem, sol)
    remat = pipeline_mode(plan.remat if plan.remat in ("none", "full") else "none", spec.stash)
    shapes = seq_expert.op_shapes(graph)
    if plan.mesh["seq"] > 1 or plan.mesh["expert"] > 1 or shapes.is_moe:
        batch = next((graph.values[i].shape[0] for i in graph.inputs if graph.values[i].batch_dim == 0), 1)
        seq_expert.check_fixed(shapes, {a: plan.mesh[a] for a in ("seq", "expert", "tensor")}, method, batch)
        costs = stages.with_extras(costs, seq_expert.extras(shapes, plan.mesh, batch, method, cluster, remat),
                                   graph.layers, shapes.is_moe)
    return stages.evaluate(costs, spec, cluster, remat).predicted
