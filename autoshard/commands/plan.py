"""`autoshard plan`: search a layout for a model on a cluster, print its summary, optionally save it.

    autoshard plan --model gpt-175b --cluster a100-80g:1024 --batch 1536 --seq 2048 -o plan.json
    autoshard plan --mesh tensor=2 --schedule 1f1b          # fix some axes or the pipeline; the planner does the rest
    autoshard plan --model moe-tiny --mesh expert=4 --checkpoint ck -o p.json   # place a trained MoE's experts

The model is never materialised (`models.abstract`), so any size plans on this machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from autoshard import argtypes, distributed
from planner.errors import AutoshardError
from planner.plan import SCHEDULES


def add_plan(sub) -> None:
    from autoshard import cli

    p = sub.add_parser("plan", help="find the fastest parallel layout that fits, for a model on a cluster",
                       description="Search meshes (data x fsdp x tensor) and per-parameter layouts for MODEL on "
                                   "CLUSTER with a [BATCH, SEQ] token batch; print the chosen plan, its predicted "
                                   "step time, memory and communication, and the runners-up. The model is never "
                                   "materialised, so any size plans on this machine. Nothing is written unless "
                                   "-o is given (-o - prints the JSON on stdout and the summary on stderr).")
    p.add_argument("--model", default="gpt-tiny", help="model preset with optional overrides, e.g. gpt-175b, "
                                                       "gpt-small:layers=4 (default gpt-tiny)")
    p.add_argument("--cluster", default=None, metavar="SPEC",
                   help="hardware: a preset kind:N (cpu, a100-80g, h100-80g, tpu-v5e, tpu-v5p; e.g. "
                        "a100-80g:1024) or a .json/.toml cluster file (default cpu:N for the N local devices)")
    p.add_argument("--batch", type=argtypes.positive_int, default=16, help="global batch size in sequences (default 16)")
    p.add_argument("--seq", type=argtypes.positive_int, default=128, help="sequence length in tokens (default 128)")
    p.add_argument("--mesh", default=None, help="fix some mesh axes, e.g. tensor=8 (the planner chooses the rest)")
    p.add_argument("--memory-budget", type=cli.parse_size, default=None, metavar="SIZE",
                   help="bytes per device the plan may use, e.g. 16GiB, 80GB, 1.5e9 (default: the cluster's "
                        "device memory)")
    p.add_argument("--remat", choices=("none", "full"), default=None,
                   help="force activation rematerialisation off or on (default: the planner decides)")
    p.add_argument("--profile", metavar="FILE", default=None,
                   help="calibrate the cluster with a profile written by `autoshard profile`")
    p.add_argument("-o", "--output", metavar="FILE", default=None,
                   help="write the plan JSON here ('-' for stdout); default: print the summary only")
    p.add_argument("--devices", type=argtypes.positive_int, default=None, metavar="N",
                   help="without --cluster, plan for cpu:N (default: the number of local devices)")
    g = p.add_argument_group("pipeline (the planner considers pipe > 1 for models with a layer stack; fixing any "
                             "of these plans a pipeline)")
    g.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="fix the pipeline schedule (default: the planner chooses; zb, zb-h1: zero bubble, needs "
                        "remat none)")
    g.add_argument("--microbatches", type=argtypes.positive_int, default=None, metavar="M",
                   help="fix the microbatches per step (must divide the per-replica batch)")
    g.add_argument("--virtual-stages", type=argtypes.positive_int, default=None, metavar="V",
                   help="fix the layer chunks per pipeline device (implies --schedule interleaved when > 1)")
    p.add_argument("--sequence", choices=("ring", "ulysses"), default=None,
                   help="fix the sequence-parallel attention of meshes with seq > 1 (default: the planner chooses)")
    e = p.add_argument_group("expert placement (MoE models: place the experts of a trained checkpoint on the "
                             "plan's expert-parallel ranks from its routing)")
    e.add_argument("--checkpoint", metavar="DIR", default=None,
                   help="record the routing of this checkpoint (autoshard train --checkpoint DIR) on the training "
                        "text and put the ILP placement in the plan; `train --plan P --restore DIR` applies it")
    e.add_argument("--routing-batches", type=argtypes.positive_int, default=4, metavar="N",
                   help="with --checkpoint: batches of --batch x --seq tokens to record (default 4)")
    e.add_argument("--data", metavar="PATH_OR_GLOB", default=None,
                   help="with --checkpoint: text to record the routing on (default: stdlib sources)")
    distributed.add_args(p)


def _pipeline_fixes(args: argparse.Namespace) -> dict[str, Any]:
    """--schedule / --microbatches / --virtual-stages / --sequence as `autoshard.api.plan` keywords (one-line errors
    early)."""
    out = {"schedule": args.schedule, "microbatches": args.microbatches, "virtual": args.virtual_stages}
    if args.microbatches is not None and args.batch % args.microbatches:
        raise AutoshardError(f"--microbatches {args.microbatches} does not divide --batch {args.batch}: choose a "
                             f"divisor of the per-replica batch (batch / data x fsdp)")
    if any(out.values()) and args.mesh:
        from planner.plan import parse_mesh

        if parse_mesh(args.mesh).get("pipe") == 1:
            raise AutoshardError("--schedule / --microbatches / --virtual-stages fix a pipeline but --mesh fixes "
                                 "pipe=1: drop them or allow pipe > 1")
    if (args.virtual_stages or 1) > 1 and args.schedule not in (None, "interleaved"):
        raise AutoshardError(f"--virtual-stages {args.virtual_stages} needs --schedule interleaved, not "
                             f"{args.schedule}")
    out["sequence"] = args.sequence
    return {k: v for k, v in out.items() if v is not None}


def resolve_cluster(spec: str | None, profile: str | None, args: argparse.Namespace):
    """The ClusterSpec of --cluster (default: the local devices), calibrated by --profile if given."""
    from autoshard import cli
    from planner.cluster import load_cluster

    if spec is None:  # the local devices (no need to start them just to count N of them)
        spec = f"cpu:{args.devices or len(cli.setup_devices(args))}"
    cluster = load_cluster(spec)
    if profile:
        from planner.profile import Profile, calibrate

        prof = Profile.load(profile)
        if (prof.backend == "cpu") != cluster.name.lower().startswith("cpu"):
            raise AutoshardError(f"profile {profile} was measured on {prof.backend} ({prof.device_kind}) but the "
                                 f"cluster is {cluster.label}: profile the target hardware, or drop --profile")
        cluster = calibrate(cluster, prof)
    return cluster


def cmd_plan(args: argparse.Namespace) -> int:
    import models
    from autoshard import cli, explain

    fixes = _pipeline_fixes(args)  # bad pipeline flags fail before anything is traced
    if args.checkpoint:
        _check_checkpoint_model(args)
    cfg = models.config_from_name(args.model)
    cluster = resolve_cluster(args.cluster, args.profile, args)
    abstract = models.abstract(cfg)
    extra = {"profile": args.profile} if args.profile else {}
    if args.cluster and args.cluster != cluster.label:
        extra["cluster_spec"] = args.cluster
    t0 = time.perf_counter()
    plan = cli.make_plan(abstract, args.model, args.batch, args.seq, cluster, mesh=args.mesh,
                     memory_budget=args.memory_budget, remat=args.remat, provenance=extra, fixes=fixes)
    if args.checkpoint:
        place_experts(args, plan, cluster)
    text = explain.summary(plan)
    if args.output == "-":
        print(text, file=sys.stderr)
        sys.stdout.write(plan.to_json())
        return 0
    print(text)
    if args.output:
        try:
            plan.save(args.output)
        except OSError as e:
            raise AutoshardError(f"cannot write plan file {args.output}: {e.strerror or e}") from None
        print(f"wrote {args.output} (planned in {time.perf_counter() - t0:.1f} s)")
        print(f"next: autoshard explain {args.output}   (details)\n      autoshard verify {args.output}    "
              f"(compile it here, compare with the predictions)")
    else:
        print("(not saved: pass -o plan.json to write it)")
    return 0


def _check_checkpoint_model(args: argparse.Namespace) -> None:
    """plan --checkpoint: the checkpoint must hold the --model being planned, and have experts."""
    import models
    from autoshard import checkpoint

    held = checkpoint.read_meta(args.checkpoint).get("model")
    if models.config_from_name(held) != models.config_from_name(args.model):
        raise AutoshardError(f"checkpoint {args.checkpoint} holds {held} but --model is {args.model}: pass --model "
                             f"{held}")
    if not models.config_from_name(held).is_moe:
        raise AutoshardError(f"checkpoint {args.checkpoint} holds {held}, which has no experts to place: drop "
                             f"--checkpoint")


def place_experts(args: argparse.Namespace, plan, cluster) -> None:
    """plan --checkpoint: the ILP placement of the checkpoint's experts on the plan's expert ranks (nodes as the
    mesh lays `expert` over the cluster), into the plan's experts section."""
    from autoshard import place
    from planner.collectives import axis_span

    ep = plan.mesh["expert"]
    if ep == 1:
        print(f"note: the plan has no expert parallelism (expert=1), so the routing of {args.checkpoint} places "
              f"nothing; fix --mesh expert=N to place the experts", file=sys.stderr)
        return
    nodes = axis_span(plan.mesh, ("expert",), cluster.devices_per_node).nodes
    trace = argparse.Namespace(checkpoint=args.checkpoint, routing_batches=args.routing_batches, batch=args.batch,
                               seq=args.seq, data=args.data, experts=None, time_limit=10.0)
    plan.experts = {**(plan.experts or {}), "degree": ep, **place.plan_placement(trace, ep, nodes)}
