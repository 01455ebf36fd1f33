"""The `autoshard` command line: plan, explain, verify, profile, train and report.

    autoshard plan --model gpt-175b --cluster a100-80g:1024 --batch 1536 --seq 2048 -o plan.json
    autoshard explain plan.json          # per-parameter strategies, predicted time / memory / communication
    autoshard verify plan.json           # compile it on the local (emulated) devices: predicted vs compiled
    autoshard profile -o prof.json       # measure the local devices; `plan --profile prof.json` calibrates
    autoshard train                      # plan for the local devices, then train (or --mesh / --plan)
    autoshard report RUN_DIR             # a run's loss, tokens/s, MFU, step time as a picture (explain and
                                         # verify draw theirs with --plot FILE.png)

jax reads its flags when it starts, so `main` parses the arguments and sets `XLA_FLAGS` (the emulated CPU device
count) before anything imports jax; each subcommand imports the heavy modules itself. User errors
(`AutoshardError`) print one `error: ...` line on stderr and exit with status 2, never a traceback.

Adding a subcommand: write `add_<name>(sub)` that builds its parser, and `cmd_<name>(args) -> int`, then list it in
`COMMANDS` (a large one in a module of its own under `autoshard.commands`, as train, explain, verify and report
are). `add_model_args` / `add_layout_args` give the shared --model / --mesh / --plan / --seed flags, and
`setup_devices(args)` / `load_plan(args, ...)` the device list and Plan they imply.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

from autoshard import argtypes, distributed
from planner.errors import AutoshardError
from planner.plan import SCHEDULES

DEFAULT_DEVICES = 8
"""Emulated CPU devices when --devices is not given (on GPU / TPU: all the real devices)."""
MAX_EMULATED_DEVICES = 1024
"""At most this many emulated CPU devices: jax takes seconds and hundreds of MB per thousand to start them, and a
hundred thousand hang it (uninterruptibly) before any check could run."""
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


# ---------------------------------------------------------------------------------------------------------------
# argument parsing


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one `error: ...` line (and exit status 2) like every other user error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _seed(text: str) -> int:
    from planner.checks import check_seed

    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    except AutoshardError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> float:
    """A byte count: `16GiB`, `80GB`, `512 MiB`, `1.5e9` (KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024)."""
    t = text.strip().replace("_", "")
    i = len(t)
    while i > 0 and t[i - 1].isalpha():
        i -= 1
    number, unit = t[:i].strip(), t[i:].lower()
    if unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"unknown size unit in {text!r}: use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")
    try:
        x = float(number) * _SIZE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 16GiB, 80GB or 1.5e9, got {text!r}") from None
    if not (x > 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return x


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=argtypes.positive_int, default=None, metavar="N",
                   help=f"number of devices: on CPU, emulate N devices (default {DEFAULT_DEVICES}); on GPU/TPU, "
                        f"use the first N real devices (default: all)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model preset, optionally with overrides: gpt-tiny, gpt-small:layers=4, "
                        "gpt:hidden=256,heads=8 (default: the model a --plan file was made for, else gpt-tiny)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the initial weights and the data order (default 0)")


def add_layout_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--mesh", help="rule-based plan on this mesh, e.g. data=2,fsdp=2,tensor=2 (axes: pipe, data, "
                                  "fsdp, expert, seq, tensor)")
    g.add_argument("--plan", metavar="FILE", help="a plan JSON file (as written by autoshard plan / train)")


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline (with pipe > 1 in --mesh)")
    g.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="pipeline schedule (default 1f1b; zb, zb-h1: zero bubble, each backward split into input "
                        "and weight gradients, needs remat none)")
    g.add_argument("--microbatches", type=argtypes.positive_int, default=None, metavar="M",
                   help="microbatches per step; must divide the per-replica batch (default: the largest divisor "
                        "of it up to 4 x pipe)")
    g.add_argument("--virtual-stages", type=argtypes.positive_int, default=None, metavar="V",
                   help="layer chunks per pipeline device, for --schedule interleaved (default 1)")
    g.add_argument("--stages", default=None, metavar="N,N,...",
                   help="layers in each pipeline stage, in order (default: as even as possible)")


def pipeline_flags(args: argparse.Namespace) -> bool:
    return any(getattr(args, k, None) is not None for k in ("schedule", "microbatches", "virtual_stages", "stages"))


def pipeline_section(args: argparse.Namespace, abstract_model, mesh: dict[str, int]):
    """The PipelineSpec that --schedule / --microbatches / --virtual-stages / --stages give for a pipe > 1 mesh."""
    from autoshard.api import pipeline_spec

    pipe = mesh["pipe"]
    schedule = args.schedule or "1f1b"
    virtual = args.virtual_stages or 1
    local = args.batch // max(1, mesh["expert"] * mesh["data"] * mesh["fsdp"])  # each device's own sequences
    if args.microbatches is not None:
        micro = args.microbatches
    else:
        fits = [m for m in range(1, min(local, 4 * pipe) + 1)
                if local % m == 0 and (schedule != "interleaved" or m % pipe == 0)]
        micro = fits[-1] if fits else pipe
    if local % micro:
        raise AutoshardError(f"--microbatches {micro} does not divide the per-replica batch of {local} (--batch "
                             f"{args.batch} / expert x data x fsdp): change --microbatches or --batch")
    stage_layers = None
    if args.stages:
        try:
            stage_layers = [int(x) for x in args.stages.split(",")]
        except ValueError:
            raise AutoshardError(f"--stages {args.stages!r}: give layer counts per stage, e.g. 3,3,2") from None
    return pipeline_spec(abstract_model, pipe, schedule=schedule, microbatches=micro, virtual=virtual,
                         stage_layers=stage_layers)


COMMANDS: dict[str, tuple[Callable[[Any], None], Callable[[argparse.Namespace], int]]] = {}
"""name -> (add parser, run). Filled at the bottom of this module."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autoshard", description="Plan, then train: automatic parallelization for JAX / Flax NNX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# devices


def set_device_flag(n: int) -> None:
    """Put `--xla_force_host_platform_device_count=n` in XLA_FLAGS (replacing any such flag, keeping the others).

    Only has an effect if jax's backends have not started yet, and only on the CPU backend.
    """
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_FLAG}={n}"])


def token_batch(batch: int, seq: int) -> dict[str, Any]:
    """The shapes of the shipped models' batch: int32 `inputs` and `targets`, [batch, seq] each."""
    import jax
    import numpy as np

    return {k: jax.ShapeDtypeStruct((batch, seq), np.int32) for k in ("inputs", "targets")}


def _package_versions() -> dict[str, str]:
    """Python and the installed release of each package a run depends on (recorded in a run's config.json)."""
    import importlib.metadata
    import platform

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ortools", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def setup_devices(args: argparse.Namespace) -> list:
    """The devices a command runs on: --devices N of them (first N), or all (N emulated ones on CPU)."""
    import jax

    devices = jax.devices()
    want = args.devices
    if want is None:
        return devices
    if want > len(devices):
        where = (f"at most {MAX_EMULATED_DEVICES} CPU devices can be emulated" if devices[0].platform == "cpu"
                 and want > MAX_EMULATED_DEVICES else "jax had already started with fewer"
                 if devices[0].platform == "cpu"
                 else f"this {devices[0].platform.upper()} machine has {len(devices)}")
        raise AutoshardError(f"--devices {want} asks for more devices than the {len(devices)} available ({where})")
    return devices[:want]


# ---------------------------------------------------------------------------------------------------------------
# plans


def load_plan(args: argparse.Namespace, abstract_model, num_devices: int):
    """The Plan that --plan FILE or --mesh give, else the default for the device count; with where it came from."""
    from planner.plan import Plan, check_activations, parse_mesh

    if args.plan:
        if pipeline_flags(args):
            raise AutoshardError("--schedule / --microbatches / --virtual-stages / --stages go with --mesh; a "
                                 "--plan file carries its own pipeline section")
        plan, source = Plan.load(args.plan), f"file {args.plan}"
        check_activations(plan)  # (the shipped models)
    elif args.mesh is not None:
        from autoshard.api import rule_plan
        from planner.plan import normalize_mesh

        mesh = normalize_mesh(parse_mesh(args.mesh))
        if pipeline_flags(args) and mesh["pipe"] == 1:
            raise AutoshardError("--schedule / --microbatches / --virtual-stages / --stages need a pipeline: put "
                                 "pipe=N (N > 1) in --mesh")
        pipeline = pipeline_section(args, abstract_model, mesh) if mesh["pipe"] > 1 else None
        method = getattr(args, "sequence", None)
        if method and mesh["seq"] == 1:
            raise AutoshardError("--sequence needs sequence parallelism: put seq=N (N > 1) in --mesh")
        sequence = {"method": method or "ring"} if mesh["seq"] > 1 else None
        plan, source = (rule_plan(abstract_model, mesh, pipeline=pipeline, sequence=sequence),
                        f"rules on mesh {args.mesh}")
    else:
        if pipeline_flags(args):
            raise AutoshardError("--schedule / --microbatches / --virtual-stages / --stages need a pipeline: put "
                                 "pipe=N (N > 1) in --mesh")
        plan, source = default_plan(abstract_model, num_devices, args)
    if plan.num_devices != num_devices:
        raise AutoshardError(f"mesh {plan.mesh_string()} needs {plan.num_devices} devices but {num_devices} are in "
                             f"use: make the mesh sizes multiply to {num_devices} or pass --devices "
                             f"{plan.num_devices}")
    return plan, source


def default_plan(abstract_model, num_devices: int, args: argparse.Namespace):
    """The layout when neither --mesh nor --plan is given: the planner's choice for the local devices.

    Plans `args.model` for a `args.batch` x `args.seq` token batch on `cpu:<num_devices>` (the local cluster), with a
    progress display on stderr; the plan records its provenance (model, batch, seq, cluster).
    """
    from autoshard.api import local_cluster

    cluster = local_cluster(num_devices)
    plan = make_plan(abstract_model, args.model, args.batch, args.seq, cluster)
    return plan, f"planned for {cluster.label}"


def make_plan(abstract_model, model_name: str, batch: int, seq: int, cluster, *, mesh: str | None = None,
              memory_budget: float | None = None, remat: str | None = None, provenance: dict | None = None,
              stream=None, fixes: dict | None = None):
    """`autoshard.api.plan` for a [batch, seq] int32 token batch, with a progress display and full provenance;
    `fixes` are the pipeline / sequence choices the user fixed (`api.plan` keywords)."""
    fixes = fixes or {}
    from autoshard.api import plan as api_plan

    example = token_batch(batch, seq)
    prov = {"model": model_name, "batch": batch, "seq": seq, "cluster": cluster.label,
            "fixed_mesh": mesh, "remat": remat or "auto",
            **({"calibrated_from": cluster.calibrated_from} if cluster.calibrated_from else {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **({"fixed": fixes} if fixes else {}),
            **(provenance or {})}
    progress = SearchProgress(f"{model_name} on {cluster.label}", stream)
    try:
        return api_plan(abstract_model, example, mesh=mesh, cluster=cluster, memory_budget=memory_budget,
                        remat=remat, progress=progress, provenance=prov, **fixes)
    finally:
        progress.clear()


class SearchProgress:
    """The planner's progress callback: a rich spinner line on a terminal, else a plain line every `every_s` s.

    The spinner keeps turning while the solver works on one mesh, so a slow search still looks alive; `clear()`
    (which `make_plan` calls however the search ends) stops it and leaves the terminal as it was.
    """

    def __init__(self, label: str, stream=None, every_s: float = 5.0):
        self.label, self.stream, self.every_s = label, stream or sys.stderr, every_s
        self.console = self.terminal_console(self.stream)
        self.tty = self.console is not None
        self.start = self.last = time.monotonic()
        self.count = 0
        self.live: Any = None
        """The rich Live display while it is shown (started by the first mesh, stopped by `clear`)."""
        self.spinner: Any = None
        self.text = ""

    @staticmethod
    def terminal_console(stream) -> Any:
        """A rich Console on `stream` when it is a terminal that can redraw a line, else None (plain lines):
        rich is imported only then, so piped output neither pays for it nor changes."""
        if not getattr(stream, "isatty", lambda: False)():
            return None
        from rich.console import Console

        console = Console(file=stream, force_terminal=True)
        return None if console.is_dumb_terminal else console

    @property
    def shown(self) -> bool:
        return self.live is not None

    def __call__(self, line: str) -> None:
        self.count += 1
        text = f"planning {self.label}: {self.count} mesh{'es' if self.count > 1 else ''} considered, last {line}"
        now = time.monotonic()
        if self.tty:
            self.show(text)
        elif now - self.last >= self.every_s:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last = now

    def show(self, text: str) -> None:
        """Put `text` beside the spinner, starting the live display on the first call."""
        self.text = text
        if self.live is None:
            from rich.live import Live
            from rich.spinner import Spinner

            self.spinner = Spinner("dots")
            # stderr written meanwhile (warnings) is printed above the line; stdout is left alone
            self.live = Live(self, console=self.console, transient=True, redirect_stdout=False,
                             redirect_stderr=True, refresh_per_second=10)
            self.live.start(refresh=True)

    def __rich__(self) -> Any:
        """The spinner and the text on one line, however narrow the terminal (the text is cut short); built at each
        refresh of the live display, from its thread, out of plain attributes."""
        from rich.table import Table
        from rich.text import Text

        row = Table.grid(padding=(0, 1))
        row.add_row(self.spinner, Text(self.text, no_wrap=True, overflow="ellipsis"))
        return row

    def clear(self) -> None:
        """Stop the spinner and erase its line (the cursor shown again)."""
        if self.live is not None:
            live, self.live = self.live, None
            live.stop()


# ---------------------------------------------------------------------------------------------------------------
# plan


def add_plan(sub) -> None:
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
    p.add_argument("--memory-budget", type=parse_size, default=None, metavar="SIZE",
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
    from planner.cluster import load_cluster

    if spec is None:  # the local devices (no need to start them just to count N of them)
        spec = f"cpu:{args.devices or len(setup_devices(args))}"
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
    from autoshard import explain

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
    plan = make_plan(abstract, args.model, args.batch, args.seq, cluster, mesh=args.mesh,
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


COMMANDS["plan"] = (add_plan, cmd_plan)


# ---------------------------------------------------------------------------------------------------------------
# profile


def add_profile(sub) -> None:
    p = sub.add_parser("profile", help="measure the local devices (matmul, memory bandwidth, collectives)",
                       description="Time matmuls, an elementwise op and collectives on the local devices, fit the "
                                   "cost model's figures and save them; `autoshard plan --profile FILE` then plans "
                                   "with the measured figures instead of datasheet ones.")
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="where to write the profile JSON")
    p.add_argument("--model", help="also time this model's layer body (at a quarter, half and all of --batch); "
                                   "plans then price layer compute at the rate it achieves")
    p.add_argument("--batch", type=int, default=16, help="batch for the layer timings (default 16)")
    p.add_argument("--seq", type=int, default=128, help="sequence length for the layer timings (default 128)")
    add_device_args(p)


def _rate(x: float, unit: str) -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def cmd_profile(args: argparse.Namespace) -> int:
    from autoshard import explain
    from planner.profile import run_profile

    devices = setup_devices(args)
    print(f"profiling {len(devices)} {devices[0].platform} device(s) ({devices[0].device_kind}) ...", file=sys.stderr)
    prof = run_profile(devices)
    if args.model:
        import models
        from planner.profile import measure_layers
        from planner.search import layer_bodies

        if args.batch < 1 or args.seq < 1:
            raise AutoshardError("--batch and --seq must be positive")
        sizes = sorted({max(1, args.batch // 4), max(1, args.batch // 2), args.batch})
        batches = [token_batch(b, args.seq) for b in sizes]
        measure_layers(layer_bodies(models.abstract(args.model), batches, name=f"layer {args.model}"), prof, devices)
    try:
        prof.save(args.output)
    except OSError as e:
        raise AutoshardError(f"cannot write profile file {args.output}: {e.strerror or e}") from None
    rows = [[f"matmul {dt}", f"{_rate(e['flops'], 'FLOP/s')} per device"] for dt, e in prof.matmul.items()]
    rows.append(["memory bandwidth", f"{_rate(prof.memory_bandwidth, 'B/s')} per device"])
    if prof.link:
        ln = prof.link
        rows.append(["collectives (fit)", f"{explain.format_seconds(ln.get('overhead', 0))} per op + "
                                          f"{explain.format_seconds(ln.get('latency', 0))} per ring step + bytes / "
                                          f"{_rate(ln.get('bandwidth', 0), 'B/s')}"])
    for kind, c in prof.collectives.items():
        rows.append([f"  {kind} (n={c['n']})", f"{explain.format_seconds(c['fixed'])} + bytes / "
                                               f"{_rate(c['bandwidth'], 'B/s')}"])
    if not prof.collectives:
        rows.append(["collectives", "not measured (one device)"])
    for key, entries in prof.layers.items():
        for e in entries:
            rows.append([f"{key} b={e.get('batch')} s={e.get('seq')}",
                         f"{explain.format_seconds(e['seconds'])} = {_rate(e.get('rate', 0), 'FLOP/s')} per device"])
    print(f"{prof.describe()} (measured in {prof.seconds:.1f} s):")
    print("\n".join(explain.table(rows)))
    print(f"wrote {args.output}; plan with it: autoshard plan --profile {args.output}")
    return 0


COMMANDS["profile"] = (add_profile, cmd_profile)


from autoshard.commands.explain import add_explain, cmd_explain  # noqa: E402
COMMANDS["explain"] = (add_explain, cmd_explain)
from autoshard.commands.verify import add_verify, cmd_verify  # noqa: E402
COMMANDS["verify"] = (add_verify, cmd_verify)
from autoshard.commands.report import add_report, cmd_report  # noqa: E402
COMMANDS["report"] = (add_report, cmd_report)
from autoshard.place import add_place, cmd_place  # noqa: E402
COMMANDS["place"] = (add_place, cmd_place)
from autoshard.commands.train import add_train, cmd_train  # noqa: E402
COMMANDS["train"] = (add_train, cmd_train)
from autoshard.launch import add_launch, cmd_launch  # noqa: E402
COMMANDS["launch"] = (add_launch, cmd_launch)
for _name in ("plan", "explain", "verify", "profile", "train", "report", "place", "launch"):  # `--help` order
    COMMANDS[_name] = COMMANDS.pop(_name)


# ---------------------------------------------------------------------------------------------------------------
# entry point


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _, run = COMMANDS[args.command]
    try:
        # one process of a multi-process run keeps the device count it was started with (autoshard launch's or the
        # host's) and joins the others before anything starts jax's backend
        multi = distributed.requested(args)
        if "jax" not in sys.modules and not multi:  # once jax has started, its device count is fixed
            set_device_flag(min(getattr(args, "devices", None) or DEFAULT_DEVICES, MAX_EMULATED_DEVICES))
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            if multi:
                distributed.initialize_from_args(args)
            status = run(args)
    except AutoshardError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        status = 130
    except Exception:
        if distributed.joined() is None:
            raise
        import traceback

        traceback.print_exc()
        status = 1
    if status != 0 and distributed.joined() is not None:
        distributed.abandon(status)  # never returns: the peers may never reach jax's exit barrier
    return status


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {_one_line(message)}", file=file or sys.stderr)


def _one_line(e: BaseException | Warning | str) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
