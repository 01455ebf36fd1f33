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
`COMMANDS` (in a module of its own under `autoshard.commands`, as plan, profile, train, explain, verify and
report are). `add_model_args` / `add_layout_args` give the shared --model / --mesh / --plan / --seed flags, and
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
    from autoshard.launch import with_device_count

    os.environ["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""), n)


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






from autoshard.commands.plan import add_plan, cmd_plan  # noqa: E402
COMMANDS["plan"] = (add_plan, cmd_plan)
from autoshard.commands.profile import add_profile, cmd_profile  # noqa: E402
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
