"""Expert placement: which expert-parallel rank holds each expert of each MoE layer.

With expert parallelism each of the `ep` ranks holds `E / ep` experts of every layer (fixed slots per rank). A token
whose experts in layer l and layer l+1 sit on different ranks must travel between them (all-to-all traffic), and a
rank whose experts receive many tokens is the straggler of its layer. A routing trace tells which experts tokens
pick, so a placement can co-locate experts that tokens visit one after the other while keeping ranks balanced.

Conventions used throughout:

* trace: `expert_ids` int array [L, T, k]: token t's k chosen experts in layer l.
* loads [L, E]: token-assignments per expert (every one of a token's k choices counts once).
* affinity [L-1, E, E]: `A[l][e, e']` = number of (token, choice in l, choice in l+1) triples with the choice in l
  being expert e and the one in l+1 expert e'. All k x k pairs of a token's choices count, so a layer pair holds
  T * k * k hops: a token's k activations in layer l each feed all of its k experts in layer l+1 (the combined
  output of layer l is the input of every expert of layer l+1).
* placement [L, E] int: the rank of each expert in each layer, exactly E / ep experts per rank per layer.
* nodes: ranks are grouped into `nodes` nodes of `ep / nodes` consecutive ranks: rank r is on node r // (ep / nodes).

Placers: `round_robin` (the layout without any placement: expert e on rank e // (E / ep), which is what sharding
the expert axis contiguously gives), `greedy` (balanced packing, affinity as a tie-breaker) and `ilp` (CP-SAT,
minimising max load + cross-device hops + extra weight on cross-node hops, with the max load held within
`balance` x mean). `placement_permutations` / `permute_experts` turn a placement into a reordering of each layer's
expert axis (weights, optimizer state, router columns), so that the contiguous sharding realises it.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np

from planner.errors import PlanError

DEFAULT_BALANCE = 1.10
"""Hard bound of the ILP: every layer's max rank load within this factor of the mean rank load."""
DEFAULT_NODE_WEIGHT = 4.0
"""Extra cost of a cross-node hop over a cross-device one (inter-node links are several times slower)."""
DEFAULT_LOAD_WEIGHT = 1.0
"""Cost of one token-assignment on the most loaded rank of a layer, in cross-device hops."""
TIGHT_LIMIT = 50_000
"""`ilp` uses the tight formulation (one indicator per expert pair and rank) up to this many indicators."""
_SCALE = 100
"""CP-SAT needs integer objective coefficients: weights are resolved to 1 / _SCALE."""


# ---------------------------------------------------------------------------------------------------------------
# input checks


def check_ep(experts: int, ep: int, nodes: int = 1) -> int:
    """Experts per rank; the slot model needs ep | experts and nodes | ep."""
    if not (isinstance(ep, (int, np.integer)) and ep >= 1):
        raise PlanError(f"expert parallelism ep={ep!r} must be a positive integer")
    if not (isinstance(nodes, (int, np.integer)) and nodes >= 1):
        raise PlanError(f"nodes={nodes!r} must be a positive integer")
    if experts % ep:
        raise PlanError(f"ep={ep} does not divide the {experts} experts: pick an ep that divides {experts}")
    if ep % nodes:
        raise PlanError(f"nodes={nodes} does not divide ep={ep}: pick a node count that divides {ep}")
    return experts // ep


def check_trace(expert_ids, layers: int | None = None, experts: int | None = None) -> np.ndarray:
    """The trace as an int64 [L, T, k] array, after checking its shape, dtype, ids and (if given) the model's sizes.

    Without `experts`, the number of experts is taken as max id + 1 (see `trace_experts`).
    """
    a = np.asarray(expert_ids)
    if a.ndim != 3:
        raise PlanError(f"expert trace must be 3-D [layers, tokens, k], got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise PlanError(f"expert trace must hold integer expert ids, got dtype {a.dtype}")
    if 0 in a.shape:
        raise PlanError(f"expert trace is empty (shape {a.shape}): record at least one token in one layer")
    if layers is not None and a.shape[0] != layers:
        raise PlanError(f"expert trace has {a.shape[0]} layers but the model has {layers}: record the trace "
                        f"on this model")
    lo, hi = int(a.min()), int(a.max())
    if lo < 0:
        raise PlanError(f"expert trace holds a negative expert id ({lo}): ids must be 0 .. experts-1")
    if experts is not None and hi >= experts:
        raise PlanError(f"expert trace holds expert id {hi} but the model has {experts} experts (ids 0 .. "
                        f"{experts - 1}): record the trace on this model")
    return a.astype(np.int64, copy=False)


def trace_experts(expert_ids: np.ndarray, experts: int | None = None) -> int:
    """The number of experts: `experts` if given, else max id + 1 (a trace may miss the last experts)."""
    return int(experts) if experts is not None else int(np.max(expert_ids)) + 1


def check_placement(placement, experts: int, ep: int, layers: int | None = None) -> np.ndarray:
    """A placement as an int64 [L, E] array with exactly E / ep experts on every rank of every layer."""
    p = np.asarray(placement)
    if p.ndim != 2 or p.shape[1] != experts or (layers is not None and p.shape[0] != layers):
        want = f"[{layers if layers is not None else 'layers'}, {experts}]"
        raise PlanError(f"placement must have shape {want}, got {p.shape}")
    if p.dtype.kind not in "iu" or (p.size and (p.min() < 0 or p.max() >= ep)):
        raise PlanError(f"placement must hold integer ranks 0 .. {ep - 1}")
    per = experts // ep
    counts = np.stack([np.bincount(row, minlength=ep) for row in p]) if p.size else np.zeros((0, ep))
    if np.any(counts != per):
        l = int(np.argwhere(np.any(counts != per, axis=1))[0, 0])
        raise PlanError(f"placement layer {l} puts {counts[l].tolist()} experts on the ranks: each rank must hold "
                        f"exactly {per}")
    return p.astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------------------------------
# routing statistics


def expert_loads(expert_ids: np.ndarray, experts: int | None = None) -> np.ndarray:
    """[L, E] token-assignments per expert: the work each expert does, hence each rank's share of a layer."""
    ids = check_trace(expert_ids, experts=experts)
    e = trace_experts(ids, experts)
    return np.stack([np.bincount(layer.ravel(), minlength=e) for layer in ids]).astype(np.int64)


def affinity(expert_ids: np.ndarray, experts: int | None = None) -> np.ndarray:
    """[L-1, E, E] hop counts between consecutive layers, over all k x k pairs of each token's choices."""
    ids = check_trace(expert_ids, experts=experts)
    e = trace_experts(ids, experts)
    L, T, k = ids.shape
    out = np.zeros((max(L - 1, 0), e, e), dtype=np.int64)
    for l in range(L - 1):
        src = np.repeat(ids[l], k, axis=1).ravel()   # [T, k*k]: choice i of layer l, repeated for each j
        dst = np.tile(ids[l + 1], (1, k)).ravel()    # [T, k*k]: choice j of layer l+1
        out[l] = np.bincount(src * e + dst, minlength=e * e).reshape(e, e)
    return out


@dataclass
class Routing:
    """A trace's statistics, all a placer needs: loads [L, E] and affinity [L-1, E, E]."""

    loads: np.ndarray
    affinity: np.ndarray

    @property
    def layers(self) -> int:
        return self.loads.shape[0]

    @property
    def experts(self) -> int:
        return self.loads.shape[1]

    @classmethod
    def from_trace(cls, expert_ids, experts: int | None = None, layers: int | None = None) -> Routing:
        ids = check_trace(expert_ids, layers=layers, experts=experts)
        return cls(expert_loads(ids, experts), affinity(ids, experts))


def _routing(trace_or_routing, experts: int | None = None) -> Routing:
    return trace_or_routing if isinstance(trace_or_routing, Routing) else Routing.from_trace(trace_or_routing,
                                                                                             experts)


# ---------------------------------------------------------------------------------------------------------------
# metrics


def node_of(ranks: np.ndarray, ep: int, nodes: int) -> np.ndarray:
    """The node of each rank: `nodes` groups of ep / nodes consecutive ranks."""
    return np.asarray(ranks) // (ep // nodes)


def rank_loads(placement: np.ndarray, loads: np.ndarray, ep: int) -> np.ndarray:
    """[L, ep] token-assignments per rank."""
    return np.stack([np.bincount(p, weights=w, minlength=ep) for p, w in zip(placement, loads)])


def same_rank_hops(placement: np.ndarray, aff: np.ndarray, group: int = 1) -> np.ndarray:
    """[L-1] hops whose two experts share a rank (group=1) or a group of `group` consecutive ranks (a node)."""
    g = placement // group
    return np.array([np.sum(a * (g[l][:, None] == g[l + 1][None, :])) for l, a in enumerate(aff)], dtype=np.int64)


def cross_device_fraction(placement, routing: Routing, ep: int) -> float:
    """Share of hops between consecutive layers that change rank (the all-to-all traffic a placement causes)."""
    total = int(routing.affinity.sum())
    return 0.0 if total == 0 else 1.0 - float(same_rank_hops(np.asarray(placement), routing.affinity).sum()) / total


def cross_node_fraction(placement, routing: Routing, ep: int, nodes: int = 1) -> float:
    """Share of hops between consecutive layers that change node (the slow inter-node part of the traffic)."""
    total = int(routing.affinity.sum())
    same = same_rank_hops(np.asarray(placement), routing.affinity, ep // nodes).sum()
    return 0.0 if total == 0 else 1.0 - float(same) / total


def max_load_over_mean(placement, routing: Routing, ep: int) -> float:
    """Worst layer's busiest rank over the mean rank load (1.0 = perfect balance; the layer's straggler factor)."""
    rl = rank_loads(np.asarray(placement), routing.loads, ep)
    mean = rl.sum(axis=1) / ep
    ratios = np.where(mean > 0, rl.max(axis=1) / np.where(mean > 0, mean, 1), 1.0)
    return float(ratios.max())


def objective(placement, routing: Routing, ep: int, nodes: int = 1, *, load_weight: float = DEFAULT_LOAD_WEIGHT,
              node_weight: float = DEFAULT_NODE_WEIGHT) -> float:
    """What `ilp` minimises: load_weight x sum of per-layer max rank loads + cross-device hops + node_weight x
    cross-node hops (weights resolved to 1/100, as the ILP sees them)."""
    p = np.asarray(placement)
    lw, nw = _weights(load_weight, node_weight)
    total = int(routing.affinity.sum())
    cross_dev = total - int(same_rank_hops(p, routing.affinity).sum())
    cross_node = total - int(same_rank_hops(p, routing.affinity, ep // nodes).sum()) if nodes > 1 else 0
    max_load = int(rank_loads(p, routing.loads, ep).max(axis=1).sum())
    return (lw * max_load + _SCALE * cross_dev + nw * cross_node) / _SCALE


def _weights(load_weight: float, node_weight: float) -> tuple[int, int]:
    if not (load_weight >= 0 and node_weight >= 0 and math.isfinite(load_weight) and math.isfinite(node_weight)):
        raise PlanError(f"placement weights must be finite and >= 0, got load_weight={load_weight}, "
                        f"node_weight={node_weight}")
    return round(load_weight * _SCALE), round(node_weight * _SCALE)


def metrics(placement, routing: Routing, ep: int, nodes: int = 1) -> dict:
    """The three figures of a placement, as the CLI and the benchmark report them."""
    p = np.asarray(placement)
    return {"placement": p.tolist(),
            "cross_device_fraction": cross_device_fraction(p, routing, ep),
            "cross_node_fraction": cross_node_fraction(p, routing, ep, nodes),
            "max_load_over_mean": max_load_over_mean(p, routing, ep)}


# ---------------------------------------------------------------------------------------------------------------
# placers


def round_robin(layers: int, experts: int, ep: int) -> np.ndarray:
    """The baseline: expert e on rank e // (E / ep) in every layer, i.e. the expert axis sharded contiguously
    with no placement at all (the identity permutation)."""
    per = check_ep(experts, ep)
    return np.tile(np.arange(experts) // per, (layers, 1)).astype(np.int64)


def greedy(routing, ep: int, nodes: int = 1, *, affinity_aware: bool = True, tolerance: float = 0.02) -> np.ndarray:
    """Balanced packing (longest-processing-time first), with affinity as a tie-breaker.

    Per layer, experts in decreasing load go to the least-loaded rank with a free slot. With `affinity_aware`, in
    layers after the first, any rank with a free slot whose load is within `tolerance` x the mean rank load of the
    least-loaded one is a candidate, and the expert goes to the candidate holding the most hops from the previous
    layer's experts on it (ties: the least-loaded, then the lowest rank). Balance first, affinity second: it can
    not trade load for traffic the way the ILP does. `nodes` is only checked: the tie-break counts hops per rank.
    """
    r = _routing(routing)
    per = check_ep(r.experts, ep, nodes)
    out = np.zeros((r.layers, r.experts), dtype=np.int64)
    for l in range(r.layers):
        w = r.loads[l]
        mean = w.sum() / ep
        load = np.zeros(ep)
        free = np.full(ep, per)
        for e in np.argsort(-w, kind="stable"):
            ok = np.flatnonzero(free > 0)
            best = ok[np.argmin(load[ok])]
            if affinity_aware and l > 0:
                cand = ok[load[ok] <= load[best] + tolerance * mean]
                # hops into expert e from each rank's experts of layer l-1
                gain = np.bincount(out[l - 1], weights=r.affinity[l - 1][:, e], minlength=ep)[cand]
                best = cand[np.lexsort((cand, load[cand], -gain))[0]]
            out[l, e] = best
            load[best] += w[e]
            free[best] -= 1
    return out


@dataclass
class IlpResult:
    """The ILP's best placement, whether CP-SAT proved it optimal, and what it cost to find."""

    placement: np.ndarray
    optimal: bool
    status: str
    objective: float
    bound: float
    seconds: float
    balance: float | None
    stats: dict = field(default_factory=dict)


def ilp(routing, ep: int, nodes: int = 1, *, balance: float | None = DEFAULT_BALANCE,
        load_weight: float = DEFAULT_LOAD_WEIGHT, node_weight: float = DEFAULT_NODE_WEIGHT,
        time_limit: float = 10.0, workers: int = 2, seed: int = 0, hint: np.ndarray | None = None,
        tight: bool | None = None, sweep: float = 0.25) -> IlpResult:
    """The placement minimising `objective` (max loads + cross-device hops + node_weight x cross-node hops).

    CP-SAT model: booleans x[l,e,r] (expert e of layer l on rank r), one rank per expert and E / ep experts per
    rank; an integer M[l] >= every rank's load in layer l (at most `balance` x the mean rank load, unless balance is
    None); for each layer pair and each expert pair (e, e') with hops, "same rank" indicators: with `tight` (the
    default up to TIGHT_LIMIT indicators) one boolean y[e,e',r] per rank, y <= x[l,e,r], y <= x[l+1,e',r], and at
    most E / ep partners per expert and rank, whose linear relaxation is strong enough to prove optimality on small
    cases; else one boolean per pair with clauses s -> (x[l,e,r] -> x[l+1,e',r]) (fewer variables, weak bound). An
    indicator can only be 1 when the two experts share a rank, and the objective rewards it, so cross-device hops =
    total - sum hops x indicator. The same on node booleans (z[l,e,n] = sum of the node's x) for 1 < nodes < ep.
    Ranks are interchangeable (within nodes, and nodes among themselves), so layer 0 is put in a canonical order: a
    rank (node) is used only after the previous one is used by a lower-numbered expert. The start is the greedy
    placement (or `hint`), improved by `_sweep` (layer-by-layer exact re-placement, up to `sweep` x time_limit
    seconds); it goes in as a complete solution hint, so CP-SAT begins there and only improves on it.

    time_limit bounds the whole call (model building, sweep, search) except that the search always gets at least
    a tenth of it. Size: L*E*ep placement booleans and up to (L-1)*E^2*ep indicators (more for nodes); past
    TIGHT_LIMIT indicators the compact form is used. On 2 cores, 8 layers x 8 experts x 4 ranks with planted
    affinity is proven optimal in 2-5 s (about 10-30 s with 2 nodes; on a trace without structure, not in 10 s,
    though within 1-2% of the bound). Beyond that, expect the time limit to be reached: the best
    placement found is returned with `optimal=False`, and `bound` (a lower bound on the objective) says how far
    from optimal it may still be. With 16 or more experts the search rarely improves on the sweep within 10 s, so
    the answer is the sweep's (a local optimum, not a proven one); the bound stays loose (20-95% below).
    Raises PlanError when no placement meets `balance` (proven, or none found within the time limit).
    """
    from ortools.sat.python import cp_model

    r = _routing(routing)
    per = check_ep(r.experts, ep, nodes)
    lw, nw = _weights(load_weight, node_weight)
    if balance is not None and not (balance >= 1.0 and math.isfinite(balance)):
        raise PlanError(f"balance={balance} must be a finite factor >= 1 (max rank load over mean), or None")
    if time_limit <= 0 or not math.isfinite(time_limit):
        raise PlanError(f"time limit {time_limit} must be a positive number of seconds")
    L, E = r.layers, r.experts
    group = ep // nodes
    t0 = time.perf_counter()
    if tight is None:
        tight = int(np.count_nonzero(r.affinity)) * ep <= TIGHT_LIMIT

    m = cp_model.CpModel()
    x, z = _placement_vars(m, r, ep, nodes)
    caps, lows, max_loads = _load_bounds(m, x, r, ep, balance)
    # traffic: co-location indicators for expert pairs with hops (a node per rank: same node = same rank)
    same_node = nw if nodes > 1 else 0  # nodes == 1: every hop stays on the node
    gains = []
    indicators = []  # (layer, group size in ranks, {(e, f, g): indicator}) for the hint
    for l in range(L - 1):
        on_rank = _co_located(m, x[l], x[l + 1], r.affinity[l], per, _SCALE + (same_node if nodes == ep else 0),
                              f"s{l}", tight, gains)
        if 1 < nodes < ep:
            on_node = _co_located(m, z[l], z[l + 1], r.affinity[l], per * group, same_node, f"n{l}", tight, gains)
            indicators.append((l, group, on_node))
        indicators.append((l, 1, on_rank))
    _break_symmetry(m, x[0] if L else [], ep, group)
    total_hops = int(r.affinity.sum())
    const = _SCALE * total_hops + (nw * total_hops if nodes > 1 else 0)
    terms = [(M, lw) for M in max_loads] + [(v, -c) for v, c in gains]
    m.Minimize(cp_model.LinearExpr.WeightedSum([v for v, _ in terms], [c for _, c in terms]) + const)

    start = check_placement(hint if hint is not None else greedy(r, ep, nodes), E, ep, L)
    hint_objective = objective(start, r, ep, nodes, load_weight=load_weight, node_weight=node_weight)
    start = _sweep(start, r, ep, nodes, lw, nw, caps, lows, sweep * time_limit, workers, seed) if sweep else start
    start = _canonical(start, ep, group)
    _hint(m, x, z, max_loads, indicators, start, r, ep, nodes, caps, lows, tight)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.1 * time_limit, time_limit - (time.perf_counter() - t0))
    solver.parameters.num_workers = int(workers)
    solver.parameters.random_seed = int(seed)
    status = solver.Solve(m)
    seconds = time.perf_counter() - t0
    name = solver.StatusName(status).lower()
    if status == cp_model.INFEASIBLE:
        raise PlanError(f"no placement keeps every layer's max rank load within {balance:g} x the mean: raise "
                        f"the balance factor")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        within = "" if balance is None else f" within {balance:g} x mean load"
        raise PlanError(f"the placement ILP found no placement{within} in {time_limit:g} s (status {name}): raise "
                        f"the time limit or the balance factor")
    p = np.array([[next(k for k in range(ep) if solver.Value(x[l][e][k])) for e in range(E)] for l in range(L)],
                 dtype=np.int64)
    return IlpResult(placement=p, optimal=status == cp_model.OPTIMAL, status=name,
                     objective=solver.ObjectiveValue() / _SCALE, bound=solver.BestObjectiveBound() / _SCALE,
                     seconds=seconds, balance=balance,
                     stats={"formulation": "tight" if tight else "compact", "variables": len(m.Proto().variables),
                            "constraints": len(m.Proto().constraints), "hint_objective": hint_objective,
                            "sweep_objective": objective(start, r, ep, nodes, load_weight=load_weight,
                                                         node_weight=node_weight)})


def _placement_vars(m, r: Routing, ep: int, nodes: int) -> tuple[list, list | None]:
    """x[l][e][k]: expert e of layer l on rank k (one rank per expert, E / ep experts per rank); with
    1 < nodes < ep, z[l][e][g]: on node g (the sum of that node's x), else None."""
    L, E, group, per = r.layers, r.experts, ep // nodes, r.experts // ep
    x = [[[m.NewBoolVar(f"x{l}_{e}_{k}") for k in range(ep)] for e in range(E)] for l in range(L)]
    for l in range(L):
        for e in range(E):
            m.AddExactlyOne(x[l][e])
        for k in range(ep):
            m.Add(sum(x[l][e][k] for e in range(E)) == per)
    if not 1 < nodes < ep:
        return x, None
    z = [[[m.NewBoolVar(f"z{l}_{e}_{g}") for g in range(nodes)] for e in range(E)] for l in range(L)]
    for l in range(L):
        for e in range(E):
            for g in range(nodes):
                m.Add(z[l][e][g] == sum(x[l][e][k] for k in range(g * group, (g + 1) * group)))
    return x, z


def _load_bounds(m, x, r: Routing, ep: int, balance: float | None) -> tuple[list[int], list[int], list]:
    """Per layer, an integer M[l] >= every rank's load, between the even split and `balance` x the mean rank load:
    (the caps, the lower bounds, the M variables). A layer no placement can balance is a PlanError."""
    from ortools.sat.python import cp_model

    caps, lows, max_loads = [], [], []
    for l in range(r.layers):
        w = [int(v) for v in r.loads[l]]
        total = sum(w)
        cap = total if balance is None else math.floor(balance * total / ep + 1e-9)
        lo = -(-total // ep)
        caps.append(cap)
        lows.append(lo)
        if max(w) > cap:
            raise PlanError(f"no placement keeps layer {l}'s max rank load within {balance:g} x mean: its heaviest "
                            f"expert alone has {max(w) / (total / ep):.2f} x the mean rank load; raise the balance "
                            f"factor")
        if cap < lo:
            raise PlanError(f"no placement keeps layer {l}'s max rank load within {balance:g} x mean ({total} "
                            f"assignments on {ep} ranks): raise the balance factor")
        M = m.NewIntVar(lo, cap, f"M{l}")
        used = [e for e in range(r.experts) if w[e]]
        for k in range(ep):
            m.Add(cp_model.LinearExpr.WeightedSum([x[l][e][k] for e in used], [w[e] for e in used]) <= M)
        max_loads.append(M)
    return caps, lows, max_loads


def _hint(m, x, z, max_loads: list, indicators: list, start: np.ndarray, r: Routing, ep: int, nodes: int,
          caps: list[int], lows: list[int], tight: bool) -> None:
    """`start` as a complete solution hint (placement, node membership, max loads and every co-location
    indicator), so CP-SAT begins at its objective and only improves on it."""
    group = ep // nodes
    for l in range(r.layers):
        for e in range(r.experts):
            for k in range(ep):
                m.AddHint(x[l][e][k], int(start[l, e] == k))
            if z is not None:
                for g in range(nodes):
                    m.AddHint(z[l][e][g], int(start[l, e] // group == g))
        load = int(rank_loads(start[l:l + 1], r.loads[l:l + 1], ep).max())
        m.AddHint(max_loads[l], min(caps[l], max(lows[l], load)))
    for l, size, ys in indicators:
        a, b = start[l] // size, start[l + 1] // size
        for (e, f, g), y in ys.items():
            m.AddHint(y, int(a[e] == b[f] and (not tight or a[e] == g)))


def _layer_gain(p: np.ndarray, r: Routing, l: int, ep: int, nodes: int, nw: int, forward: bool = False) -> np.ndarray:
    """[E, ep] objective gain (scaled) of putting expert f of layer l on rank q, its neighbour layers fixed (only the
    previous one if `forward`)."""
    group = ep // nodes
    gain = np.zeros((r.experts, ep), dtype=np.int64)
    rank_of = np.arange(ep)
    for a, other in ((r.affinity[l - 1].T, p[l - 1]) if l > 0 else (None, None),
                     (r.affinity[l], p[l + 1]) if l + 1 < r.layers and not forward else (None, None)):
        if a is None:
            continue
        on_rank = a @ (other[:, None] == rank_of).astype(np.int64)                 # [E, ep] hops to rank q
        gain += _SCALE * on_rank
        if nodes > 1:
            on_node = on_rank.reshape(-1, nodes, group).sum(axis=2)                # [E, nodes]
            gain += nw * np.repeat(on_node, group, axis=1)
    return gain


def _sweep(p: np.ndarray, r: Routing, ep: int, nodes: int, lw: int, nw: int, caps: list[int], lows: list[int],
           budget: float, workers: int, seed: int) -> np.ndarray:
    """Improve a placement one layer at a time, the other layers fixed, until nothing changes or `budget` seconds
    are spent; each step is a linear assignment under the slot and load constraints, solved exactly by CP-SAT.

    Two starts, the better kept: `p` itself, and a forward chain (each layer from the second on placed best for the
    previous layer alone, which lines consecutive layers up as a whole; sweeping from `p` can get stuck with
    layers aligned in pieces). A strong start for the full model, which on large cases finds little by itself.
    """
    end = time.perf_counter() + budget
    args = (r, ep, nodes, lw, nw, caps, lows, workers, seed)
    chain = p.copy()
    for l in range(1, r.layers):
        _improve_layer(chain, l, *args, end=end, forward=True, force=True)
    best = None
    for start in (chain, p.copy()):
        changed = True
        while changed and time.perf_counter() < end:
            changed = False
            for l in range(r.layers):
                changed |= _improve_layer(start, l, *args, end=end)
        obj = (lw * rank_loads(start, r.loads, ep).max(axis=1).sum()
               - sum(int(_layer_gain(start, r, l, ep, nodes, nw, forward=True)[np.arange(r.experts),
                                                                                 start[l]].sum())
                     for l in range(1, r.layers)))
        if best is None or obj < best[0]:
            best = (obj, start)
    return best[1]


def _improve_layer(p: np.ndarray, l: int, r: Routing, ep: int, nodes: int, lw: int, nw: int, caps: list[int],
                   lows: list[int], workers: int, seed: int, *, end: float, forward: bool = False,
                   force: bool = False) -> bool:
    """Re-place layer l of `p` (in place) best for its neighbours (only the previous one if `forward`); whether it
    changed. `force`: take the new placement even if it is not better (building a chain)."""
    from ortools.sat.python import cp_model

    left = end - time.perf_counter()
    if left <= 0:
        return False
    per = r.experts // ep
    gain = _layer_gain(p, r, l, ep, nodes, nw, forward)
    w = [int(v) for v in r.loads[l]]
    m = cp_model.CpModel()
    x = [[m.NewBoolVar("") for _ in range(ep)] for _ in range(r.experts)]
    M = m.NewIntVar(lows[l], caps[l], "")
    for e in range(r.experts):
        m.AddExactlyOne(x[e])
        for q in range(ep):
            m.AddHint(x[e][q], int(p[l, e] == q))
    for q in range(ep):
        m.Add(sum(x[e][q] for e in range(r.experts)) == per)
        m.Add(cp_model.LinearExpr.WeightedSum([x[e][q] for e in range(r.experts)], w) <= M)
    flat = [x[e][q] for e in range(r.experts) for q in range(ep)]
    m.Minimize(lw * M - cp_model.LinearExpr.WeightedSum(flat, [int(g) for g in gain.ravel()]))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = left
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    if solver.Solve(m) not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return False
    new = np.array([next(q for q in range(ep) if solver.Value(x[e][q])) for e in range(r.experts)])
    load = int(rank_loads(p[l:l + 1], r.loads[l:l + 1], ep).max())
    cur = lw * max(lows[l], load) - int(gain[np.arange(r.experts), p[l]].sum())
    if force or load > caps[l] or solver.ObjectiveValue() < cur - 0.5:  # over the balance bound: any fix is better
        changed = bool((new != p[l]).any())
        p[l] = new
        return changed
    return False


def _co_located(m, xa, xb, aff: np.ndarray, size: int, weight: int, name: str, tight: bool, gains: list) -> dict:
    """Indicators that may be 1 only when experts e (layer l) and f (layer l+1) are in the same group (rank or
    node): {(e, f, g): y} (tight) or {(e, f, 0): s} (compact). Appends (indicator, weight x hops(e, f)) to `gains`,
    the terms the objective rewards.

    tight: one boolean y[e,f,g] per group g, y <= xa[e][g], y <= xb[f][g], and at most `size` partners per expert
    and group (sum_f y[e,f,g] <= size x xa[e][g], and the same over e): the linear relaxation then only allows
    each expert `size` co-located partners, a far better bound than the compact form. Else (compact): one boolean
    s[e,f] per pair with the clauses s -> (xa[e][g] -> xb[f][g]) for every g.
    """
    out = {}
    groups = len(xa[0])
    pairs = list(zip(*np.nonzero(aff)))
    if not tight:
        for e, f in pairs:
            s = m.NewBoolVar(f"{name}_{e}_{f}")
            for g in range(groups):
                m.AddBoolOr([s.Not(), xa[e][g].Not(), xb[f][g]])
            out[e, f, 0] = s
            gains.append((s, weight * int(aff[e, f])))
        return out
    for g in range(groups):
        by_e: dict[int, list] = {}
        by_f: dict[int, list] = {}
        for e, f in pairs:
            y = m.NewBoolVar(f"{name}_{e}_{f}_{g}")
            m.AddImplication(y, xa[e][g])
            m.AddImplication(y, xb[f][g])
            by_e.setdefault(e, []).append(y)
            by_f.setdefault(f, []).append(y)
            out[e, f, g] = y
            gains.append((y, weight * int(aff[e, f])))
        for e, ys in by_e.items():
            if len(ys) > size:
                m.Add(sum(ys) <= size * xa[e][g])
        for f, ys in by_f.items():
            if len(ys) > size:
                m.Add(sum(ys) <= size * xb[f][g])
    return out


def _break_symmetry(m, x0, ep: int, group: int) -> None:
    """Layer 0 in canonical rank order: expert e may use rank q only if the rank before q (within a node), or some
    rank of the node before q's node (for a node's first rank), holds a lower-numbered expert. Any placement can be
    relabelled so (renumber nodes, then ranks within nodes, by first use), so no optimum is lost."""
    for e, row in enumerate(x0):
        for q in range(1, ep):
            pred = [q - 1] if q % group else list(range(q - group, q))
            m.AddBoolOr([row[q].Not()] + [x0[f][p] for f in range(e) for p in pred])


def _canonical(placement: np.ndarray, ep: int, group: int) -> np.ndarray:
    """The same placement with ranks relabelled as `_break_symmetry` demands (used for the solver's hint)."""
    p0 = placement[0] if len(placement) else np.arange(ep)
    node_order = list(dict.fromkeys(int(q) // group for q in p0))
    node_order += [g for g in range(ep // group) if g not in node_order]
    new = np.empty(ep, dtype=np.int64)
    for g_new, g in enumerate(node_order):
        ranks = list(dict.fromkeys(int(q) for q in p0 if q // group == g))
        ranks += [q for q in range(g * group, (g + 1) * group) if q not in ranks]
        for i, q in enumerate(ranks):
            new[q] = g_new * group + i
    return new[placement]


def brute_force(routing, ep: int, nodes: int = 1, *, balance: float | None = DEFAULT_BALANCE,
                load_weight: float = DEFAULT_LOAD_WEIGHT,
                node_weight: float = DEFAULT_NODE_WEIGHT) -> tuple[np.ndarray, float]:
    """The exact optimum of `objective` for tiny cases (the reference for `ilp` in tests): (placement, objective).

    Enumerates every slot-respecting placement of one layer (E! / ((E/ep)!^ep) of them), drops those over the
    balance bound, and since the objective only couples consecutive layers, finds the best sequence by dynamic
    programming over layers, which is the same minimum as trying every combination of per-layer placements.
    """
    r = _routing(routing)
    per = check_ep(r.experts, ep, nodes)
    lw, nw = _weights(load_weight, node_weight)
    E, L = r.experts, r.layers
    cands = np.array(list(_slot_placements(E, ep, per)), dtype=np.int64)          # [P, E]
    if len(cands) > 20000:
        raise PlanError(f"brute force over {len(cands)} placements per layer is too slow: use ilp")
    onehot = (cands[:, :, None] == np.arange(ep)).astype(np.int64)                # [P, E, ep]
    node_hot = (cands[:, :, None] // (ep // nodes) == np.arange(nodes)).astype(np.int64)
    inf = np.iinfo(np.int64).max // 4
    layer_cost = []
    for l in range(L):
        rl = onehot.transpose(0, 2, 1) @ r.loads[l]                                # [P, ep]
        cost = lw * rl.max(axis=1)
        if balance is not None:
            cost = np.where(rl.max(axis=1) <= math.floor(balance * r.loads[l].sum() / ep + 1e-9), cost, inf)
        layer_cost.append(cost)
    best = layer_cost[0].copy()
    back = []
    for l in range(L - 1):
        a = r.affinity[l]
        total = int(a.sum())
        pair = _SCALE * (total - _same_hops(onehot, a))                             # [P, P]
        if nodes > 1:
            pair = pair + nw * (total - _same_hops(node_hot, a))
        tot = best[:, None] + pair
        back.append(np.argmin(tot, axis=0))
        best = np.minimum(tot.min(axis=0) + layer_cost[l + 1], inf)
    j = int(np.argmin(best))
    if best[j] >= inf:
        raise PlanError(f"no placement keeps every layer's max rank load within {balance:g} x the mean")
    idx = [j]
    for b in reversed(back):
        idx.append(int(b[idx[-1]]))
    placement = cands[idx[::-1]]
    return placement, float(best[j]) / _SCALE


def _same_hops(onehot: np.ndarray, a: np.ndarray) -> np.ndarray:
    """[P, P] hops kept in a group between every candidate placement of layer l and every one of layer l+1."""
    P = len(onehot)
    via = np.einsum("aer,ef->afr", onehot, a).reshape(P, -1)                    # hops from each group into f
    return via @ onehot.reshape(P, -1).T


def _slot_placements(experts: int, ep: int, per: int):
    """Every assignment of experts to ranks with exactly `per` experts per rank."""
    def rec(remaining: tuple[int, ...], rank: int, out: list[int]):
        if rank == ep:
            yield list(out)
            return
        for chosen in itertools.combinations(remaining, per):
            for e in chosen:
                out[e] = rank
            rest = tuple(e for e in remaining if e not in chosen)
            yield from rec(rest, rank + 1, out)
    yield from rec(tuple(range(experts)), 0, [0] * experts)


# ---------------------------------------------------------------------------------------------------------------
# applying a placement


def placement_permutations(placement, ep: int) -> np.ndarray:
    """[L, E] permutations realising a placement under contiguous sharding of the expert axis.

    perm[l][s] is the old index of the expert that goes to slot s of layer l: rank r's experts (in increasing old
    index) fill slots r*E/ep .. (r+1)*E/ep - 1, which is what rank r holds when the expert axis is sharded in
    contiguous blocks. After permuting, round_robin (the identity) *is* the placement.
    """
    p = np.asarray(placement)
    if p.ndim != 2:
        raise PlanError(f"placement must be 2-D [layers, experts], got shape {p.shape}")
    p = check_placement(p, p.shape[1], ep)
    return np.argsort(p, axis=1, kind="stable").astype(np.int64)


def inverse_permutations(perms: np.ndarray) -> np.ndarray:
    """The permutations that undo `perms` (to go back to the original expert numbering)."""
    perms = np.asarray(perms)
    inv = np.empty_like(perms)
    for l, p in enumerate(perms):
        inv[l, p] = np.arange(len(p))
    return inv


def permute_experts(arrays: dict[str, np.ndarray], perms: np.ndarray,
                    expert_axis: dict[str, int]) -> dict[str, np.ndarray]:
    """Reorder the expert axis of every expert-indexed array: new[l, ..., s, ...] = old[l, ..., perms[l][s], ...].

    arrays: flat {path: array}, layers stacked on axis 0. expert_axis: {path: axis of the experts} for the paths to
    permute, e.g. 1 for expert weights [L, E, D, F] and their optimizer moments (same shape), -1 (or 2) for the
    router [L, D, E] whose columns are the experts' logits, 1 for a per-expert bias [L, E]. Paths not named are
    returned as they are (same objects); a new dict is returned, the input is not modified.

    The model computes the same function afterwards: routing picks experts by router column, and the chosen
    column's index is the expert index used to find the expert's weights, so permuting router columns and expert
    weights by the same permutation sends every token to the same (renumbered) expert with the same gate. Capacity
    per expert is filled in token order, so the same tokens are dropped. Two caveats: exactly tied router logits
    may break ties differently (top-k prefers the lower index), and per-expert outputs (expert load statistics)
    come out in the new order.
    """
    perms = np.asarray(perms)
    if perms.ndim != 2 or perms.dtype.kind not in "iu":
        raise PlanError(f"expert permutations must be an integer [layers, experts] array, got shape {perms.shape}")
    L, E = perms.shape
    if np.any(np.sort(perms, axis=1) != np.arange(E)):
        raise PlanError("expert permutations must hold each expert index 0 .. experts-1 exactly once per layer")
    out = dict(arrays)
    for path, axis in expert_axis.items():
        if path not in arrays:
            raise PlanError(f"permute_experts: no array named {path!r} (have {', '.join(sorted(arrays)[:5])}"
                            f"{' ...' if len(arrays) > 5 else ''})")
        a = np.asarray(arrays[path])
        ax = axis + a.ndim if axis < 0 else axis
        if not 0 < ax < a.ndim:
            raise PlanError(f"permute_experts: {path} has shape {a.shape}: its expert axis {axis} must be a "
                            f"non-layer axis (axis 0 is the layers)")
        if a.shape[0] != L or a.shape[ax] != E:
            raise PlanError(f"permute_experts: {path} has shape {a.shape} but the permutations are for {L} "
                            f"layers x {E} experts (on axis 0 and axis {axis})")
        shape = [L] + [1] * (a.ndim - 1)
        shape[ax] = E
        out[path] = np.take_along_axis(a, perms.reshape(shape), axis=ax)
    return out


# ---------------------------------------------------------------------------------------------------------------
# synthetic traces


def synthetic_trace(layers: int, experts: int, tokens: int, k: int, affinity: float, seed: int = 0) -> np.ndarray:
    """A [layers, tokens, k] int32 trace with planted inter-layer affinity and balanced loads in expectation.

    Layer 0: each token picks k distinct experts uniformly. Layer l+1: each expert e of layer l has a preferred
    partner pi_l(e) in layer l+1 (pi_l a random permutation); with probability `affinity` a token follows, picking
    the partners of its k layer-l experts, else it picks k distinct experts uniformly. Uniform choices and
    permutations of them keep every expert's expected load T*k/E. A placement that puts each e next to pi_l(e)
    keeps a following token's k "diagonal" hops (of its k x k) on one rank; the other pairs stay at chance.
    """
    if not (layers >= 1 and tokens >= 1 and 1 <= k <= experts):
        raise PlanError(f"synthetic trace needs layers >= 1, tokens >= 1 and 1 <= k <= experts, got layers="
                        f"{layers}, tokens={tokens}, k={k}, experts={experts}")
    if not 0.0 <= affinity <= 1.0:
        raise PlanError(f"affinity={affinity} must be a probability in [0, 1]")
    rng = np.random.default_rng(seed)

    def uniform() -> np.ndarray:  # [T, k] distinct experts per token
        return np.argsort(rng.random((tokens, experts)), axis=1)[:, :k]

    out = np.empty((layers, tokens, k), dtype=np.int32)
    out[0] = uniform()
    for l in range(1, layers):
        partner = rng.permutation(experts)
        follow = rng.random(tokens) < affinity
        out[l] = np.where(follow[:, None], partner[out[l - 1]], uniform())
    return out
