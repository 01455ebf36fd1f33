"""`autoshard train`: argument handling around `autoshard.fit`.

    autoshard train                                        # plan for the local devices, then train gpt-tiny
    autoshard train --mesh data=2,fsdp=2,tensor=2 --checkpoint ck --checkpoint-every 100
    autoshard train --checkpoint ck --resume               # continue the latest complete step, exactly

What this module does beyond parsing: it resolves the run's settings (a resume takes them from the checkpoint and
refuses contradicting ones), validates everything before any work (the checkpoint folder's writability included),
claims and locks the run and checkpoint folders (and removes them again if the run fails before its first step),
and reports: `step N loss X` lines on stdout, a progress line on stderr, `metrics.jsonl` and TensorBoard events in
the run folder. The loop itself is `autoshard.loop.fit`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from autoshard import argtypes
from planner.errors import AutoshardError

DEFAULTS: dict[str, Any] = {"steps": 1000, "batch": 16, "seq": 128, "lr": 1e-2, "seed": 0}
"""Defaults of the settings a resume takes from its checkpoint (so an unset flag means "as the checkpoint")."""
RUN_SETTINGS = ("model", "steps", "batch", "seq", "lr", "warmup", "seed", "data", "holdout")
"""Settings recorded in each checkpoint; a resume must not change them (model, schedule, batch order)."""
HOLDOUT = 0.05
"""Fraction of the text held out for the eval loss (with --eval-every)."""
EVAL_BATCHES = 4


def add_train(sub) -> None:
    from autoshard import cli

    p = sub.add_parser("train", help="train a model on text, laid out by a plan",
                       description="Train a byte-level language model on text (default: the Python standard "
                                   "library's sources) with the given parallel layout (--mesh or --plan; default: "
                                   "plan for the local devices first, as `autoshard plan` would, and print the "
                                   "plan), and write a run folder (plan.json, config.json, metrics.jsonl, "
                                   "TensorBoard events, checkpoints/). SIGTERM or Ctrl-C stops after the current "
                                   "step with a checkpoint; --resume continues it exactly.")
    cli.add_model_args(p)
    p.set_defaults(seed=None)  # unset: 0, or on --resume the checkpoint's
    cli.add_layout_args(p)
    cli.add_device_args(p)
    p.add_argument("--data", metavar="PATH_OR_GLOB",
                   help="training text: a file, a directory or a glob ('**' recursive); tokens are bytes "
                        "(default: the Python standard library's .py files, first 8 MiB)")
    p.add_argument("--steps", type=argtypes.positive_int, default=None,
                   help=f"optimizer steps (default {DEFAULTS['steps']})")
    p.add_argument("--batch", type=argtypes.positive_int, default=None,
                   help=f"global batch size in sequences (default {DEFAULTS['batch']})")
    p.add_argument("--seq", type=argtypes.positive_int, default=None,
                   help=f"sequence length in tokens (default {DEFAULTS['seq']})")
    p.add_argument("--lr", type=argtypes.positive_float, default=None,
                   help="peak learning rate of AdamW with warmup and cosine decay to 10%% (default 1e-2)")
    p.add_argument("--warmup", type=_non_negative_int, default=None,
                   help="warmup steps (default: steps/10, at most 100)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="run folder, which must not hold files yet unless --resume (default "
                        "runs/local/train-<timestamp>)")
    p.add_argument("--log-every", type=argtypes.positive_int, default=None, metavar="K",
                   help="print 'step N loss X' on stdout every K steps, plus the first and last "
                        "(default: steps/20, at least 1)")
    cli.add_pipeline_args(p)
    p.add_argument("--sequence", choices=("ring", "ulysses"), default=None,
                   help="sequence-parallel attention with seq > 1 in --mesh: ring (K/V blocks passed around, any "
                        "head count) or ulysses (all-to-all to heads; heads divisible by seq) (default ring)")
    g = p.add_argument_group("planning (when neither --mesh nor --plan is given)")
    g.add_argument("--cluster", default=None, metavar="SPEC",
                   help="the hardware to plan for and to measure MFU against: a preset kind:N or a cluster file, "
                        "with N the devices in use (default: the local devices)")
    g.add_argument("--memory-budget", type=cli.parse_size, default=None, metavar="SIZE",
                   help="bytes per device the plan may use, e.g. 2GiB (default: the cluster's device memory)")
    g.add_argument("--remat", choices=("none", "full"), default=None,
                   help="activation rematerialisation off or on (default: the planner decides; with --mesh: none)")
    c = p.add_argument_group("checkpoints")
    c.add_argument("--checkpoint", metavar="DIR", default=None,
                   help="save the whole training state here (weights, optimizer state, step, data position, plan): "
                        "every --checkpoint-every steps, at the end, and on SIGTERM / Ctrl-C "
                        "(default: <run folder>/checkpoints)")
    c.add_argument("--checkpoint-every", type=argtypes.positive_int, default=None, metavar="N",
                   help="also save every N steps (default: only at the end and when stopped)")
    c.add_argument("--keep", type=argtypes.positive_int, default=None, metavar="K",
                   help="keep the newest K checkpoints (default 3)")
    c.add_argument("--no-checkpoint", action="store_true",
                   help="save no checkpoint at all (a stopped run then cannot resume)")
    c.add_argument("--sync-checkpoints", action="store_true",
                   help="write each checkpoint before the next step (default: asynchronously, while training "
                        "goes on)")
    c.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is --checkpoint (or <--out>/checkpoints) from its latest "
                        "complete step: same steps, schedule, optimizer state and data order")
    c.add_argument("--restore", metavar="DIR", default=None,
                   help="start from the weights of this checkpoint (any plan; same --model), with a fresh "
                        "optimizer: for fine-tuning")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-every", type=argtypes.positive_int, default=None, metavar="N",
                   help=f"hold out the last {HOLDOUT * 100:.0f}%% of the text and record its loss every N steps and at the "
                        f"end ({EVAL_BATCHES} batches)")
    from autoshard import distributed

    distributed.add_args(p)


def _non_negative_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return n


# ---------------------------------------------------------------------------------------------------------------
# progress on the console


class Progress:
    """A `fit` callback: `step N loss X` on stdout every `log_every` steps (and the first and last), and progress on
    stderr: a rich progress bar on a terminal, else a plain line every `every_s` seconds.

    The stdout lines are what users and tests parse, so they stay plain print()s; on a terminal the bar is erased
    before each (`clear`) and drawn again below it. `clear` also ends the display for good (interrupt, error, end).
    """

    def __init__(self, total: int, log_every: int, start: int = 0, stream=None, every_s: float = 10.0):
        self.total, self.log_every, self.start = total, log_every, start
        self.stream, self.every_s = stream or sys.stderr, every_s
        self.console = _terminal_console(self.stream)
        self.tty = self.console is not None
        self.last_plain = time.monotonic()
        self.step = start
        self.after_first: float | None = None
        self.began = time.perf_counter()
        self.eta: tuple[float, float] | None = None
        """(seconds left, perf_counter time of the estimate): the bar counts it down between steps."""
        self.live: Any = None
        """The rich live display while it is on the terminal (started by a step, stopped by `clear`)."""
        self.drawn: tuple[int, list[str]] = (start, [])
        """The step and fields the live display shows (one assignment, so its thread never sees them half-set)."""

    @property
    def shown(self) -> bool:
        return self.live is not None

    def __call__(self, record: dict[str, Any]) -> None:
        step, loss = record["step"], record["loss"]
        self.step = step
        last = step == self.total
        if step == self.start + 1 or step % self.log_every == 0 or last or not math.isfinite(loss):
            self.clear()
            print(f"step {step} loss {loss:.6f}", flush=True)
        if "eval_loss" in record:
            self.clear()
            print(f"eval at step {step}: loss {record['eval_loss']:.6f}", flush=True)
        if self.after_first is None:
            self.after_first = time.perf_counter()  # the first step compiles: average the speed after it
            per_step, done = record["step_time_s"], 0
        else:
            done = step - self.start - 1
            per_step = (time.perf_counter() - self.after_first) / done
        eta = per_step * (self.total - step) if done else None
        self.update(record, per_step, eta, final=last)

    def update(self, record: dict[str, Any], per_step: float, eta: float | None, final: bool) -> None:
        fields = self.fields(record, per_step)
        self.eta = None if final or eta is None else (eta, time.perf_counter())
        if self.tty:
            self.draw(record["step"], fields, final)
        elif final or time.monotonic() - self.last_plain >= self.every_s:
            clock = _clock(time.perf_counter() - self.began, None if final else eta)
            line = "  ".join([f"step {record['step']}/{self.total}", *fields, clock])
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last_plain = time.monotonic()

    def fields(self, record: dict[str, Any], per_step: float) -> list[str]:
        """The record as display fields: loss, tokens/s, step time (and predicted), MFU, dropped tokens."""
        tokens = record["tokens_per_s"] * record["step_time_s"]
        parts = [f"loss {record['loss']:.4f}", f"{tokens / per_step:,.0f} tok/s",
                 f"{_ms(record['step_time_s'])}/step"
                 + (f" (predicted {_ms(record['predicted_step_s'])})" if record.get("predicted_step_s") else "")]
        if record.get("mfu") is not None:
            parts.append(f"MFU {record['mfu']:.1%}")
        if record.get("dropped_tokens"):
            parts.append(f"{record['dropped_tokens']:,.0f} tokens dropped")
        return parts

    def status(self, fields: list[str]) -> str:
        """The text beside the bar: the step's fields, then the time since the start and the estimate of what is
        left, counting down between steps."""
        now = time.perf_counter()
        eta = self.eta
        left = None if eta is None else max(0.0, eta[0] - (now - eta[1]))
        return "  ".join([*fields, _clock(now - self.began, left)])

    def draw(self, step: int, fields: list[str], final: bool) -> None:
        """Show the step on the terminal (starting the live display after a `clear`); the last step's bar stays."""
        self.drawn = (step, fields)
        if self.live is None:
            from rich.live import Live

            # stderr written meanwhile (a signal's notice, a warning) is printed above the bar; stdout is left alone
            self.live = Live(self, console=self.console, transient=True, redirect_stdout=False, redirect_stderr=True,
                             refresh_per_second=4)
            self.live.start(refresh=True)
        if final:
            live, self.live = self.live, None
            live.transient = False  # (the last step's bar sums the run up: it stays)
            live.stop()

    def __rich__(self) -> Any:
        """What the live display shows, built again at each of its refreshes (so the clock ticks between steps):
        step n/total, a progress bar, the fields and the clock, which wrap under themselves when the terminal is
        narrow. Only plain attributes are read here, from the display's thread: no lock is shared with the loop."""
        from rich.progress_bar import ProgressBar
        from rich.table import Column, Table
        from rich.text import Text

        step, fields = self.drawn
        row = Table.grid(Column(no_wrap=True), Column(no_wrap=True), Column(), padding=(0, 1))
        row.add_row(Text(f"step {step}/{self.total}"), ProgressBar(total=self.total, completed=step, width=20),
                    Text(self.status(fields)))
        return row

    def clear(self) -> None:
        """Erase the progress display (before other output goes to the same terminal, and at the end): the live
        display stops and the cursor is shown again; the next step draws a new one."""
        if self.live is not None:
            live, self.live = self.live, None
            live.stop()


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f}ms" if s < 10 else f"{s:.1f}s"


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _clock(elapsed: float, left: float | None) -> str:
    """`1m30s elapsed, 3m30s left`: the end of the progress line (no estimate yet, or at the end: elapsed only)."""
    return f"{_duration(elapsed)} elapsed" + ("" if left is None else f", {_duration(left)} left")


def _terminal_console(stream) -> Any:
    """A rich Console on `stream` when it is a terminal that can redraw a line, else None (plain lines): rich is
    imported only then, so piped output neither pays for it nor changes."""
    from autoshard.cli import SearchProgress

    return SearchProgress.terminal_console(stream)


# ---------------------------------------------------------------------------------------------------------------
# settings


def checkpoint_dir(args: argparse.Namespace) -> Path | None:
    """--checkpoint, else <--out>/checkpoints (None with --no-checkpoint or before the run folder is known)."""
    if args.no_checkpoint:
        return None
    if args.checkpoint:
        return Path(args.checkpoint)
    return Path(args.out) / "checkpoints" if args.out else None


def resolve_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """Fill unset flags: from the checkpoint on --resume (a contradicting flag is an error), else the defaults.
    Returns the checkpoint's meta record on a resume with a step to continue, else None."""
    recorded = None
    if args.resume:
        if args.restore:
            raise AutoshardError("--resume continues a run with its own state; --restore starts a new one from "
                                 "weights: pass one of them")
        if args.no_checkpoint:
            raise AutoshardError("--resume needs a checkpoint: drop --no-checkpoint")
        if not (args.checkpoint or args.out):
            raise AutoshardError("--resume needs the run to continue: pass --checkpoint DIR (or --out RUN, whose "
                                 "checkpoints/ it then uses)")
        recorded = _latest_meta(checkpoint_dir(args))
    if recorded is not None:
        settings = recorded.get("settings") or {}
        for key in ("model", "steps", "batch", "seq", "lr", "warmup", "seed", "data"):
            given = getattr(args, key)
            if given is None:
                setattr(args, key, settings.get(key))
            elif key in settings and given != settings[key]:
                raise AutoshardError(f"--{key} {given} differs from the checkpoint's {settings[key]}: a resumed run "
                                     f"keeps the {key} it started with (drop --{key}, or start a new run from the "
                                     f"weights with --restore)")
        for key, value in (recorded.get("options") or {}).items():  # how it checkpointed and evaluated, unless given
            if getattr(args, key, None) is None:
                setattr(args, key, value)
        if bool(args.eval_every) != bool(settings.get("holdout")):
            held = bool(settings.get("holdout"))
            raise AutoshardError(f"the checkpoint's run {'held out' if held else 'did not hold out'} text for "
                                 f"evaluation: resume {'with' if held else 'without'} --eval-every (it changes the "
                                 f"training text)")
        if args.out is None and recorded.get("run_dir") and Path(recorded["run_dir"]).is_dir():
            args.out = recorded["run_dir"]
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return recorded


def _latest_meta(directory: Path | None) -> dict | None:
    """The latest step's meta of a checkpoint folder being resumed, or None when it has no step yet."""
    from autoshard import checkpoint

    if directory is None or checkpoint.kind(directory) in ("missing", "empty"):
        return None
    if checkpoint.kind(directory) == "checkpoint" and not checkpoint.Checkpoints(
            directory.absolute(), keep=None, async_save=False).steps():
        return None
    return checkpoint.Checkpoints.open(directory).meta()


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a checkpoint records of the run, and a resume must keep."""
    return {"model": args.model, "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
            "warmup": args.warmup, "seed": args.seed, "data": args.data,
            "holdout": HOLDOUT if args.eval_every else 0}


def check_folders(args: argparse.Namespace) -> None:
    """The run and checkpoint folders, before any work: a run folder that holds files (unless resuming), a
    checkpoint path that is a file, a user's folder, unwritable, or another run's checkpoints (unless resuming)."""
    from autoshard import checkpoint, runs

    if args.out is not None and not args.resume and runs.holds_files(Path(args.out)):
        raise AutoshardError(f"run folder {args.out} already exists and holds files: pass --resume to continue that "
                             f"run, or choose a new --out")
    path = checkpoint_dir(args)
    if path is not None:
        checkpoint.check_target(path, resume=args.resume)
    if args.restore and checkpoint.kind(args.restore) in ("missing", "empty"):
        raise AutoshardError(f"--restore {args.restore}: no autoshard checkpoint there (no such folder, or an empty "
                             f"one): pass the folder that `autoshard train --checkpoint DIR` wrote")


def check_planning_flags(args: argparse.Namespace) -> None:
    if (args.mesh is not None or args.plan) and args.memory_budget is not None:
        raise AutoshardError("--memory-budget is a budget for the planner: it goes without --mesh / --plan")
    if args.plan and args.remat:
        raise AutoshardError("--remat goes with --mesh or the planner; a --plan file carries its own remat")


# ---------------------------------------------------------------------------------------------------------------
# the command


class _Attempt:
    """What cmd_train must know when `_train` is cut short: what to undo before the first step, and how far it got."""

    def __init__(self):
        self.undo: list = []
        self.locks: list = []
        """Released however the command ends (a dead process's locks are released by the kernel anyway)."""
        self.started = False
        """Set once the first step is done: from then on the run folder stays, whatever happens."""
        self.progress: Progress | None = None
        self.run: Path | None = None

    def first_step(self, record: dict[str, Any]) -> None:
        self.started = True


def cmd_train(args: argparse.Namespace) -> int:
    from autoshard.signals import Interrupted, StopSignals

    stop = StopSignals()
    stop.install()  # before the loop a signal stops at once (Interrupted): nothing is trained yet
    attempt = _Attempt()
    try:
        return _train(args, stop, attempt)
    except BaseException as e:
        if not attempt.started:
            for undo in reversed(attempt.undo):
                undo()
        if not isinstance(e, KeyboardInterrupt):
            raise
        if attempt.progress is not None:
            attempt.progress.clear()
        what = f" by {e}" if isinstance(e, Interrupted) else ""
        if not attempt.started:
            print(f"\nstopped{what} before the first step finished; nothing was kept", file=sys.stderr)
        else:
            step = attempt.progress.step
            print(f"\ninterrupted{what} at step {step + 1}/{args.steps}; metrics of {step} steps are in "
                  f"{attempt.run} (no checkpoint of this interruption)", file=sys.stderr)
        return 128 + e.signum if isinstance(e, Interrupted) else 130
    finally:
        for lock in attempt.locks:
            lock.release()
        stop.uninstall()


def _train(args: argparse.Namespace, stop, attempt: _Attempt) -> int:
    from autoshard import cli, data

    check_planning_flags(args)
    recorded = resolve_settings(args)  # (on --resume: --data and the rest as the checkpoint recorded them)
    corpus = data.load(args.data)  # cheap, and a bad --data fails before jax starts
    if args.warmup is not None and args.warmup > args.steps:
        raise AutoshardError(f"--warmup {args.warmup} is longer than --steps {args.steps}")
    check_folders(args)

    import jax

    import models
    from autoshard import emit
    from autoshard.loop import Speed, fit, resume_from
    from autoshard.metrics import MetricsLog, peak_flops, step_work
    from autoshard.train import make_optimizer, make_schedule, parallelize

    cfg, devices, cluster, abstract, plan, plan_source = _setup_plan(args, recorded, stop)
    example = cli.token_batch(args.batch, args.seq)
    emit.check_batch(plan, example)
    train_tokens, eval_tokens = (data.holdout(corpus, HOLDOUT, args.seq) if args.eval_every
                                 else (corpus.tokens, None))
    batches = data.TextData(train_tokens, args.batch, args.seq, seed=args.seed)
    evals = None if eval_tokens is None else [
        b for b, _ in zip(data.TextData(eval_tokens, args.batch, args.seq, seed=args.seed), range(EVAL_BATCHES))]
    run = _claim_run_folder(args, attempt)
    ckpt = _open_checkpoints(args, attempt)

    optimizer = make_optimizer(args.lr, args.steps, warmup=args.warmup)
    if args.restore:
        trainer = _restored_trainer(args, plan, abstract, optimizer, devices)
    else:
        trainer = parallelize(models.factory(cfg, args.seed), optimizer, plan, devices=devices)
    batches.select_rows(trainer.process_rows(args.batch))  # a process of several reads only its devices' rows
    start = 0
    if args.resume and ckpt is not None:
        start = resume_from(ckpt, trainer, batches, run_settings(args)) or 0
    write = jax.process_index() == 0
    if write:
        plan.save(run.path / "plan.json")
        _write_config(run.path, args, cfg, plan, plan_source, devices, corpus, start)
    predicted = plan.predicted.get("step_seconds") or _predict(plan, abstract, example, cluster)
    flops, dtype = step_work(trainer, example)
    speed = Speed(flops, peak_flops(trainer, cluster, dtype), predicted)
    log = MetricsLog(run.path, start_step=start) if write else None
    progress = attempt.progress = Progress(args.steps, args.log_every or max(1, args.steps // 20), start=start)
    _announce(args, cfg, devices, plan, plan_source, corpus, run, ckpt, start, speed, cluster, dtype)

    meta = {**run_settings(args), "run_dir": str(run.path.absolute()), "settings": run_settings(args),
            "options": {"eval_every": args.eval_every, "checkpoint_every": args.checkpoint_every, "keep": args.keep,
                        "log_every": args.log_every}}
    callbacks = [attempt.first_step, *(c for c in (log, progress) if c is not None)]
    try:
        result = fit(trainer, batches, steps=args.steps, checkpoint=ckpt, checkpoint_every=args.checkpoint_every,
                     eval_data=evals, eval_every=args.eval_every, callbacks=callbacks,
                     schedule=make_schedule(args.lr, args.steps, args.warmup), speed=speed, meta=meta, stop=stop,
                     start_step=start)
    finally:
        progress.clear()  # (first: an error's message must not land inside a live display)
        if log is not None:
            log.close()
        if ckpt is not None:
            ckpt.wait()
            ckpt.close()
    return _report_end(args, result, ckpt, run, stop)


def _setup_plan(args: argparse.Namespace, recorded: dict | None, stop):
    """The model's config, the devices, the cluster preset, the abstract model and the plan this run trains under
    (searched, from --plan, --mesh's rules, or as a resumed checkpoint recorded it), the same on every process.

    Returns:
      (cfg, devices, cluster, abstract, plan, plan_source).
    """
    import jax

    import models
    from autoshard import cli, data, distributed
    from planner.plan import Plan

    if args.model is None:  # a plan file names the model it was made for
        args.model = (Plan.load(args.plan).provenance.get("model") if args.plan else None) or "gpt-tiny"
    cfg = models.config_from_name(args.model)
    data.check_vocab(cfg.vocab)
    if recorded is not None and args.mesh is None and not args.plan and args.devices is None:
        args.devices = _recorded_devices(recorded, len(jax.devices()))  # the same plan on as many devices
    devices = cli.setup_devices(args)
    cluster = _cluster(args, len(devices))
    abstract = models.abstract(cfg)
    if recorded is not None and args.mesh is None and not args.plan:
        plan, plan_source = _recorded_plan(recorded, args, abstract, len(devices), cluster)
    else:
        plan, plan_source = _plan(args, abstract, len(devices), cluster)
    stop.install()  # the planner's solver (OR-Tools) replaces the SIGINT handler while it searches: take it back
    if not plan.provenance:  # a rule plan (--mesh): record what `autoshard verify` needs to rebuild the model
        plan.provenance = {"model": args.model, "batch": args.batch, "seq": args.seq, "source": plan_source}
    if distributed.process_count() > 1:  # every process runs process 0's plan (a time-limited search can differ)
        plan = Plan.from_dict(json.loads(distributed.broadcast_text(json.dumps(plan.to_dict()))))
    if plan_source.startswith("planned"):
        from autoshard import explain

        print(explain.summary(plan), file=sys.stderr)
    return cfg, devices, cluster, abstract, plan, plan_source


def _claim_run_folder(args: argparse.Namespace, attempt: _Attempt):
    """The run folder, claimed and locked by process 0 (refused in one line when taken, foreign or unwritable;
    removed again if the run fails before its first step); other processes learn its path. Sets `args.out`."""
    from autoshard import distributed, runs

    writer, several = distributed.is_writer(), distributed.process_count() > 1
    if not writer:  # one of several processes: process 0 claims, locks and writes the run folder; here its path only
        run = runs.Followed(distributed.broadcast_text(""))
    elif args.out is not None:
        run = runs.Folder.claim(args.out, reuse=args.resume)
    else:
        run = runs.Folder.fresh(Path("runs", "local", "train-" + time.strftime("%Y%m%d-%H%M%S")))
    if writer and several:
        distributed.broadcast_text(str(run.path))
    attempt.undo.append(run.abandon)
    attempt.locks.append(run.lock)
    attempt.run = run.path
    args.out = str(run.path)
    return run


def _open_checkpoints(args: argparse.Namespace, attempt: _Attempt):
    """The run's checkpoints (None without --checkpoint): a user's folder refused before anything is written into
    it, process 0's lock on it, what a failed start undoes, and a folder holding another run refused without
    --resume. Every process opens them (their saves are collective)."""
    ckpt_path = checkpoint_dir(args)
    if ckpt_path is None:
        return None
    from autoshard import checkpoint, distributed, runs
    from autoshard.checkpoint import DEFAULT_KEEP, Checkpoints

    before = checkpoint.kind(ckpt_path)  # a user's folder is refused here, before anything is written into it
    if distributed.is_writer():
        try:
            ckpt_path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AutoshardError(f"cannot create checkpoint folder {ckpt_path}: {e.strerror or e}") from None

        def undo_checkpoint(path=ckpt_path, before=before):
            if before == "missing":
                import shutil

                shutil.rmtree(path, ignore_errors=True)
            elif before == "empty":
                (path / checkpoint.META).unlink(missing_ok=True)
        attempt.undo.append(undo_checkpoint)
        attempt.locks.append(runs.Lock(ckpt_path, "checkpoint folder").acquire())
    ckpt = Checkpoints.create(ckpt_path, model=args.model, keep=args.keep or DEFAULT_KEEP,
                              async_save=not args.sync_checkpoints)
    if not args.resume and ckpt.latest() is not None:
        raise AutoshardError(f"checkpoint folder {ckpt_path} already holds step {ckpt.latest()} of another run: "
                             f"pass --resume to continue it, or choose another --checkpoint folder")
    return ckpt


def _announce(args, cfg, devices, plan, plan_source: str, corpus, run, ckpt, start: int, speed, cluster,
              dtype) -> None:
    """The run's opening lines on stderr: what trains where, from which text, into which folders; the MFU's peak."""
    from autoshard.metrics import device_cluster

    where = "no checkpoints" if ckpt is None else (
        f"checkpoints in {ckpt.directory} (" + (f"every {args.checkpoint_every} steps, " if args.checkpoint_every
                                                else "") + "at the end and when stopped)")
    print(f"autoshard train: {cfg.name} ({cfg.param_count():,} params) on {len(devices)} {devices[0].platform} "
          f"device(s), mesh {plan.mesh_string()} ({plan_source}); {corpus.tokens.size:,} bytes of text; run folder "
          f"{run.path}; {where}" + (f"; resumed at step {start}" if start else ""), file=sys.stderr)
    peak_cluster = cluster or device_cluster(devices)
    if speed.peak_flops and peak_cluster is not None:
        print(f"MFU against {speed.peak_flops / 1e9:,.0f} GFLOP/s peak ({peak_cluster.label}, {dtype}"
              + ("; the cpu preset's placeholder figure, so a relative measure" if peak_cluster.name == "cpu" else "")
              + ")", file=sys.stderr)


def _report_end(args: argparse.Namespace, result, ckpt, run, stop) -> int:
    """The closing line (done, or stopped by a signal with the command that continues) and the exit status."""
    saved = (f"checkpoint of step {result.checkpoint} in {ckpt.directory}" if result.checkpoint is not None
             else "no checkpoint")
    if result.stopped:
        resume = f"; continue with: autoshard train --checkpoint {ckpt.directory} --resume" if ckpt else ""
        print(f"stopped by {result.stopped} after step {result.step}/{args.steps}: {saved}{resume}", file=sys.stderr)
        return 128 + stop.signum
    print(f"done: {args.steps} steps in {_duration(result.seconds)}, final loss "
          f"{result.metrics.get('loss', math.nan):.4f}; run folder {run.path}; {saved}", file=sys.stderr)
    return 0


def _cluster(args: argparse.Namespace, num_devices: int):
    """--cluster for this many devices (None: the local devices)."""
    if args.cluster is None:
        return None
    from planner.cluster import load_cluster

    cluster = load_cluster(args.cluster)
    if cluster.num_devices != num_devices:
        raise AutoshardError(f"--cluster {args.cluster} has {cluster.num_devices} devices but {num_devices} are in use:"
                             f" write {cluster.name}:{num_devices}")
    return cluster


def _plan(args: argparse.Namespace, abstract, num_devices: int, cluster):
    """--plan, --mesh (with --remat), or the planner (with --cluster, --memory-budget, --remat)."""
    from autoshard import cli

    if args.mesh is None and not args.plan:
        if cli.pipeline_flags(args):
            raise AutoshardError("--schedule / --microbatches / --virtual-stages / --stages need a pipeline: put "
                                 "pipe=N (N > 1) in --mesh")
        from autoshard.api import local_cluster

        cluster = cluster or local_cluster(num_devices)
        plan = cli.make_plan(abstract, args.model, args.batch, args.seq, cluster, memory_budget=args.memory_budget,
                             remat=args.remat)
        return plan, f"planned for {cluster.label}"
    plan, source = cli.load_plan(args, abstract, num_devices)
    if args.remat:
        plan.remat = args.remat
    return plan, source


def _recorded_plan(recorded: dict, args: argparse.Namespace, abstract, num_devices: int, cluster):
    """A resume without --mesh / --plan: the checkpoint's plan when it fits the devices, else a new one."""
    from planner.plan import Plan

    try:
        plan = Plan.from_dict(recorded.get("plan"))
    except AutoshardError:
        plan = None
    if plan is not None and plan.num_devices == num_devices and not (args.memory_budget or args.remat or
                                                                       args.cluster):
        return plan, "the checkpoint's plan"
    return _plan(args, abstract, num_devices, cluster)


def _recorded_devices(recorded: dict, available: int) -> int | None:
    """The device count of the checkpoint's plan when this machine has that many (else None: all of them)."""
    mesh = (recorded.get("plan") or {}).get("mesh")
    n = math.prod(v for v in mesh.values() if isinstance(v, int)) if isinstance(mesh, dict) else 0
    return n if 0 < n <= available else None


def _predict(plan, abstract, example, cluster) -> float | None:
    """The planner's step time for a plan that carries none (a rule plan); None if it cannot price it."""
    import warnings

    from autoshard.api import predict

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return predict(plan, abstract, example, cluster=cluster).get("step_seconds")
    except Exception:  # noqa: BLE001  (a figure to show beside the measured one, never a reason to stop)
        return None


def _restored_trainer(args: argparse.Namespace, plan, abstract, optimizer, devices):
    """--restore DIR: a trainer starting from the checkpoint's weights (a fresh optimizer)."""
    from flax import nnx

    from autoshard import checkpoint
    from autoshard.train import parallelize

    params, meta = checkpoint.restore(args.restore, abstract)
    if plan.experts and plan.experts.get("placement") is not None:
        params = _apply_plan_placement(args, plan, abstract, params, meta)
    start = nnx.merge(nnx.graphdef(abstract), params, nnx.split(abstract, nnx.Param, ...)[2])
    return parallelize(start, optimizer, plan, devices=devices)


def _apply_plan_placement(args: argparse.Namespace, plan, abstract, params, meta):
    """A plan from `plan --checkpoint`: reorder the restored experts as it places them (the model's function is
    unchanged), then drop the placement from the plan the runtime sees (it is applied, and recorded as such)."""
    from autoshard import place

    place.check_planned_from(args.restore, plan.experts)
    section = dict(plan.experts)
    placement = section.pop("placement")
    params = place.placed(params, placement, plan.mesh["expert"], abstract)
    plan.experts = {**section, "placement_applied": True}
    print(f"experts placed on {plan.mesh['expert']} ranks as the plan says (from the routing of "
          f"{(section.get('routing') or {}).get('checkpoint', 'a checkpoint')})", file=sys.stderr)
    return params


def _write_config(run: Path, args: argparse.Namespace, cfg, plan, plan_source: str, devices, corpus,
                  start: int) -> None:
    import jax

    from autoshard import cli

    path = run / "config.json"
    if start and path.exists():  # a resume: the original config stays, with the resumption noted
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            config = {}
        config.setdefault("resumed", []).append({"step": start, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                 "mesh": plan.mesh, "devices": len(devices),
                                                 "plan_source": plan_source})
    else:
        config = {
            "command": "train",
            "model": dataclasses.asdict(cfg),
            "params": cfg.param_count(),
            "args": {k: v for k, v in vars(args).items() if k != "func"},
            "plan_source": plan_source,
            "mesh": plan.mesh,
            "devices": len(devices),
            "platform": devices[0].platform,
            "device_kind": devices[0].device_kind,
            "jax_version": jax.__version__,
            "versions": cli._package_versions(),
            "data": corpus.describe(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    path.write_text(json.dumps(config, indent=1, default=str) + "\n")
