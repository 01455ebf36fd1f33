"""`autoshard place`: expert placement for expert parallelism from a routing trace.

    autoshard place --trace trace.npz --ep 8 --nodes 2 -o placement.json
    autoshard place --checkpoint runs/local/ckpt --routing-batches 8 --ep 4 --apply runs/local/ckpt-placed

With --checkpoint the trace is recorded by running the checkpoint's model on --routing-batches batches of the
training text (`autoshard.routing`); --apply DIR then writes a copy of the checkpoint whose experts are reordered
by the ILP placement (expert weights and router columns permuted together: the same function), so that sharding
the expert axis contiguously puts each expert on its chosen rank.

The trace is an .npz file with `expert_ids`, an integer [layers, tokens, k] array (each token's k chosen experts
in each MoE layer), and optionally `experts` (the model's expert count, when the trace may miss the last ones).
Prints one JSON object {"round_robin": R, "greedy": R, "ilp": R}, each R with the placement (per layer, the rank of
each expert), cross_device_fraction, cross_node_fraction and max_load_over_mean (see planner.placement); the ilp
entry also says whether CP-SAT proved it optimal and how long it took.
"""

from __future__ import annotations

import argparse
import json
import sys

from planner.errors import PlanError


def add_place(sub) -> None:
    from autoshard import argtypes

    p = sub.add_parser("place", help="place MoE experts on expert-parallel ranks from a routing trace",
                       description="Read a routing trace (which experts each token picks in each MoE layer) and "
                                   "place every layer's experts on the --ep ranks (E/ep per rank) so that tokens "
                                   "hop between ranks (and nodes) as little as possible while ranks stay balanced. "
                                   "Prints round-robin, greedy and ILP (CP-SAT) placements with their figures as "
                                   "JSON.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", metavar="FILE.npz",
                     help="npz with expert_ids: int [layers, tokens, k] (and optionally experts: the expert count)")
    src.add_argument("--checkpoint", metavar="DIR", help="record the trace from this checkpoint (autoshard train "
                                                          "--checkpoint DIR) on the training text")
    p.add_argument("--routing-batches", type=argtypes.positive_int, default=4, metavar="N",
                   help="with --checkpoint: batches of text to trace (default 4)")
    p.add_argument("--batch", type=argtypes.positive_int, default=16, help="with --checkpoint: sequences per batch (16)")
    p.add_argument("--seq", type=argtypes.positive_int, default=128, help="with --checkpoint: tokens per sequence (128)")
    p.add_argument("--data", metavar="PATH_OR_GLOB", default=None,
                   help="with --checkpoint: text to trace on (default: the training default, stdlib sources)")
    p.add_argument("--apply", metavar="DIR", default=None,
                   help="with --checkpoint: write the checkpoint with experts reordered by the ILP placement here")
    p.add_argument("--ep", type=argtypes.positive_int, required=True, metavar="N",
                   help="expert-parallel ranks (must divide the number of experts)")
    p.add_argument("--nodes", type=argtypes.positive_int, default=1, metavar="N",
                   help="nodes the ranks are spread over, ep/nodes consecutive ranks each (default 1)")
    p.add_argument("--experts", type=argtypes.positive_int, default=None, metavar="E",
                   help="the model's expert count (default: the trace's `experts`, else its largest id + 1)")
    p.add_argument("--balance", type=argtypes.positive_float, default=None, metavar="F",
                   help="the ILP keeps every layer's busiest rank within F x the mean rank load (default 1.10)")
    p.add_argument("--time-limit", type=argtypes.positive_float, default=10.0, metavar="SECONDS",
                   help="time limit of the ILP (default 10); the best placement found is used if it is hit")
    p.add_argument("-o", "--output", metavar="FILE", default=None, help="also write the JSON to this file")


def load_trace(path: str, experts: int | None = None):
    """expert_ids from an npz file (checked, int64 [L, T, k]), and the expert count (given or recorded), if any.

    numpy is imported here, not at the top: the CLI module imports this one before any subcommand runs.
    """
    import zipfile

    import numpy as np

    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise PlanError(f"trace {path} is a single .npy array, not an .npz: save it with "
                            f"np.savez(FILE, expert_ids=ids)")
        with f:
            if "expert_ids" not in f.files:
                have = ", ".join(f.files) or "nothing"
                raise PlanError(f"trace {path} has no array named expert_ids (it holds {have}): save the routing "
                                f"trace with np.savez(FILE, expert_ids=ids)")
            ids = f["expert_ids"]
            recorded = f["experts"] if "experts" in f.files else None
            if recorded is not None:
                if recorded.size != 1 or recorded.dtype.kind not in "iu" or int(recorded) < 1:
                    raise PlanError(f"trace {path}: `experts` must be one positive integer, got {recorded!r}")
                recorded = int(recorded)
    except PlanError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        what = e.strerror if isinstance(e, OSError) and e.strerror else "not a readable .npz file"
        raise PlanError(f"cannot read trace {path}: {what}") from None
    from planner.placement import check_trace

    if experts is not None and recorded is not None and experts != recorded:
        raise PlanError(f"--experts {experts} contradicts the {recorded} experts recorded in trace {path}")
    n = experts if experts is not None else recorded
    return check_trace(ids, experts=n), n


def checkpoint_trace(args: argparse.Namespace):
    """(expert_ids, experts, model, params, meta) from running the checkpoint's model on the training text."""
    import models
    from autoshard import checkpoint, data
    from autoshard.routing import routing_trace

    meta = checkpoint.read_meta(args.checkpoint)
    cfg = models.config_from_name(meta["model"])
    if not cfg.is_moe:
        raise PlanError(f"checkpoint {args.checkpoint} holds {meta['model']}, which has no experts to place")
    abstract = models.abstract(cfg)
    params, meta = checkpoint.restore(args.checkpoint, abstract)
    corpus = data.load(args.data)
    batches = data.TextData(corpus, args.batch, args.seq, seed=12345)
    from flax import nnx

    model = nnx.merge(nnx.graphdef(abstract), params, nnx.split(abstract, nnx.Param, ...)[2])
    ids = routing_trace(model, [batches.next() for _ in range(args.routing_batches)])
    if args.experts is not None and args.experts != cfg.experts:
        raise PlanError(f"--experts {args.experts} contradicts the model's {cfg.experts} experts")
    return ids, cfg.experts, abstract, params, meta


def placed(params, placement, ep: int, abstract):
    """`params` with each layer's experts (weights and router columns) reordered so that sharding the expert axis
    contiguously over `ep` ranks realises `placement` (the model's function is unchanged)."""
    from flax import nnx

    from autoshard.routing import expert_axes
    from planner import placement as pl
    from planner.params import path_str

    perms = pl.placement_permutations(placement, ep)
    flat = {path_str(k): v.get_value() for k, v in nnx.to_flat_state(params)}
    permuted = pl.permute_experts(flat, perms, expert_axes(abstract))
    return nnx.map_state(lambda path, v: v.replace(permuted[path_str(path)]), params)


def apply_placement(directory: str, placement, ep: int, abstract, params, meta) -> None:
    """Write the checkpoint with each layer's experts reordered so contiguous sharding realises `placement`."""
    from autoshard import checkpoint

    checkpoint.save(directory, placed(params, placement, ep, abstract), model=meta["model"],
                    step=meta.get("step", 0), plan={**(meta.get("plan") or {}), "placement_applied": {"ep": ep}})


def check_planned_from(directory: str, section: dict) -> None:
    """A plan's placement reorders the experts of the checkpoint it was recorded from, as that checkpoint orders
    them: refuse another checkpoint (its experts may be in another order, e.g. placed already)."""
    from pathlib import Path

    source = (section.get("routing") or {}).get("checkpoint")
    if source is None or Path(source).resolve() != Path(directory).resolve():
        raise PlanError(f"the plan's expert placement was computed from checkpoint {source}, not {directory}: "
                        f"re-plan with --checkpoint {directory}, or restore {source}")


def plan_placement(args: argparse.Namespace, ep: int, nodes: int) -> dict:
    """The ILP placement of the checkpoint's experts on `ep` ranks over `nodes` nodes, from its routing on the
    training text: what `autoshard plan --checkpoint` puts in the plan's experts section (with round robin's
    figures beside the ILP's)."""
    from pathlib import Path

    from planner import placement as pl

    ids, experts, _, _, _ = checkpoint_trace(args)
    routing = pl.Routing.from_trace(pl.check_trace(ids, experts=experts), experts)
    pl.check_ep(routing.experts, ep, nodes)
    try:
        result = pl.ilp(routing, ep, nodes, balance=pl.DEFAULT_BALANCE, time_limit=args.time_limit)
    except PlanError as e:
        if "balance" not in str(e):
            raise
        result = pl.ilp(routing, ep, nodes, balance=None, time_limit=args.time_limit)
    rr = pl.round_robin(routing.layers, routing.experts, ep)
    return {"placement": [list(map(int, layer)) for layer in result.placement],
            "routing": {"checkpoint": str(Path(args.checkpoint).absolute()), "batches": args.routing_batches,
                        "nodes": nodes},
            **{name: {k: v for k, v in pl.metrics(pm, routing, ep, nodes).items() if k != "placement"}
               for name, pm in (("ilp", result.placement), ("round_robin", rr))}}


def cmd_place(args: argparse.Namespace) -> int:
    from planner import placement as pl

    if args.apply and not args.checkpoint:
        raise PlanError("--apply DIR needs --checkpoint (a trace file has no weights to reorder)")
    if args.checkpoint:
        ids, experts, abstract, params, meta = checkpoint_trace(args)
        ids = pl.check_trace(ids, experts=experts)
    else:
        ids, experts = load_trace(args.trace, args.experts)
    routing = pl.Routing.from_trace(ids, experts)
    E, L = routing.experts, routing.layers
    pl.check_ep(E, args.ep, args.nodes)
    balance = args.balance if args.balance is not None else pl.DEFAULT_BALANCE
    try:
        result = pl.ilp(routing, args.ep, args.nodes, balance=balance, time_limit=args.time_limit)
    except PlanError as e:
        if args.balance is not None or "balance" not in str(e):
            raise
        # the default bound is unreachable (few experts per rank, skewed loads): say so and balance softly
        print(f"warning: {e}; placing with the load in the objective only", file=sys.stderr)
        balance = None
        result = pl.ilp(routing, args.ep, args.nodes, balance=None, time_limit=args.time_limit)
    out = {"round_robin": pl.metrics(pl.round_robin(L, E, args.ep), routing, args.ep, args.nodes),
           "greedy": pl.metrics(pl.greedy(routing, args.ep, args.nodes), routing, args.ep, args.nodes),
           "ilp": {**pl.metrics(result.placement, routing, args.ep, args.nodes), "optimal": result.optimal,
                   "solve_seconds": round(result.seconds, 3), "balance": balance}}
    if args.apply:
        apply_placement(args.apply, result.placement, args.ep, abstract, params, meta)
        out["applied_to"] = str(args.apply)
    text = _dumps(out)
    if args.output:
        try:
            with open(args.output, "w") as f:
                f.write(text + "\n")
        except OSError as e:
            raise PlanError(f"cannot write {args.output}: {e.strerror or e}") from None
    print(text)
    return 0


def _dumps(obj) -> str:
    """Indented JSON with each list of numbers (a layer's placement) on one line."""
    import re

    return re.sub(r"\[\s*([-\d.,\s]+?)\s*\]", lambda m: "[" + ", ".join(t.strip() for t in m.group(1).split(","))
                  + "]", json.dumps(obj, indent=1))
