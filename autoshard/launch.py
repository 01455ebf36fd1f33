"""`autoshard launch`: a multi-process run on one machine, for trying and testing multi-host code without hosts.

    autoshard launch --processes 2 --devices-per-process 4 -- train --mesh data=2,fsdp=2,tensor=2 --steps 3

starts N processes of the command (an autoshard subcommand, or any program such as `python script.py` whose code
calls `autoshard.distributed.initialize()`), each with D emulated CPU devices, joined through a coordinator on
loopback (a free port) as a real multi-host run is (jax's CPU collectives, gloo). Each child gets XLA_FLAGS (its
device count), JAX_PLATFORMS=cpu (unless set), JAX_COORDINATOR_ADDRESS, AUTOSHARD_NUM_PROCESSES and
AUTOSHARD_PROCESS_ID.

The console is process 0's: its stdout passes through line by line, its stderr is the launcher's own (so on a
terminal the progress line updates in place); the others' lines are prefixed `[process I]` (an autoshard command's
other processes print only errors). Each child runs in its own
process group, so a Ctrl-C reaches it once, forwarded. The launcher exits with the first failing child's status
(128 + N for a child killed by signal N) after stopping the rest; SIGINT / SIGTERM are forwarded to every child,
which then have `--grace` seconds to finish (a training run saves a checkpoint) before SIGKILL.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Any

from autoshard.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from autoshard import argtypes
from planner.errors import AutoshardError

DEVICE_FLAG = "--xla_force_host_platform_device_count"
FAILURE_GRACE_S = 5.0
"""After one child failed, the others (likely stuck in a collective with it) get this long after SIGTERM."""
DEFAULT_GRACE_S = 30.0
"""After a forwarded SIGINT / SIGTERM, the children get this long to stop (a checkpoint save) before SIGKILL."""
GLOO_NOTE = re.compile(r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. Expected number of connected peer "
                       r"ranks is : ")
"""gloo's note on each new group of CPU collectives, up to its last number: native writes from several threads,
which may interleave (the number then comes after the next note, or on a line of its own)."""


class NoiseFilter:
    """Drops gloo's notes from a child's stdout, line by line, also when another note split one across two lines.

    A fallback: `autoshard.distributed.initialize` sends native stdout to /dev/null, so only programs that join with
    `jax.distributed.initialize` themselves print these; notes torn apart mid-word by concurrent writes pass."""

    def __init__(self):
        self.owed = 0
        """Notes whose number has not come yet."""

    def __call__(self, line: str) -> str:
        line = re.sub(GLOO_NOTE.pattern + r"\d+\n?", "", line)
        if self.owed:
            number = re.match(r"\d+\n?", line)
            if number:
                line, self.owed = line[number.end():], self.owed - 1
        line, dangling = GLOO_NOTE.subn("", line)
        self.owed += dangling
        return line


def add_launch(sub) -> None:
    p = sub.add_parser("launch", help="run a command as N local processes of one multi-process (multi-host) run",
                       description="Start N processes of COMMAND on this machine, each with its own emulated CPU "
                                   "devices, joined by jax.distributed over loopback as the hosts of a multi-host run "
                                   "would be. COMMAND is an autoshard subcommand (train ...) or a program (python "
                                   "script.py ...). Process 0's output is the run's; the launcher forwards SIGINT / "
                                   "SIGTERM, and exits with the first failing process's status.",
                       usage="autoshard launch [--processes N] [--devices-per-process D] [--port P] [--grace S] "
                             "-- COMMAND ...")
    p.add_argument("--processes", type=argtypes.positive_int, default=2, metavar="N", help="processes (default 2)")
    p.add_argument("--devices-per-process", type=argtypes.positive_int, default=4, metavar="D",
                   help="emulated CPU devices of each process (default 4)")
    p.add_argument("--port", type=argtypes.port, default=None, metavar="P", help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--grace", type=lambda t: argtypes.seconds(t, zero=True), default=DEFAULT_GRACE_S, metavar="S",
                   help=f"seconds the processes get to stop after a forwarded SIGINT / SIGTERM before SIGKILL "
                        f"(default {DEFAULT_GRACE_S:g})")
    p.add_argument("child", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="an autoshard subcommand and its arguments (train --mesh ...), or a program")


def cmd_launch(args: argparse.Namespace) -> int:
    from autoshard.cli import COMMANDS

    command = list(args.child)  # (`args.command` is the subcommand's name, "launch")
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise AutoshardError("give the command after --, e.g. autoshard launch --processes 2 -- train --steps 3")
    if command[0] == "launch":
        raise AutoshardError("launch cannot launch itself: give the command to run, e.g. -- train ...")
    if command[0] in COMMANDS:  # an autoshard subcommand: run it with this Python, as `autoshard` would
        argv = [sys.executable, "-c", "import sys; from autoshard.cli import main; sys.exit(main())", *command]
    else:
        argv = command
    port = args.port or free_port()
    shown = shlex.join((["autoshard"] if argv is not command else []) + command)
    return Launch(argv, args.processes, args.devices_per_process, port, grace=args.grace, shown=shown).run()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's pick; another program could take it before process 0 does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_device_count(xla_flags: str, devices: int) -> str:
    """`xla_flags` (an XLA_FLAGS value) with its emulated CPU device count set to `devices`: any such flag replaced,
    the others kept in order."""
    flags = [f for f in xla_flags.split() if not f.startswith(DEVICE_FLAG)]
    return " ".join(flags + [f"{DEVICE_FLAG}={devices}"])


def child_env(base: dict[str, str], index: int, processes: int, devices: int, port: int) -> dict[str, str]:
    """The environment of child `index`: its device count, the coordinator, its place in the run."""
    env = dict(base)
    env["XLA_FLAGS"] = with_device_count(env.get("XLA_FLAGS", ""), devices)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env[ENV_COORDINATOR] = f"127.0.0.1:{port}"
    env[ENV_NUM_PROCESSES] = str(processes)
    env[ENV_PROCESS_ID] = str(index)
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the console as they are printed, in order
    return env


class Launch:
    """N children of one command, their output, their signals and their exit statuses."""

    def __init__(self, argv: list[str], processes: int, devices: int, port: int, *, grace: float = DEFAULT_GRACE_S,
                 out: IO[str] | None = None, err: IO[str] | None = None, shown: str | None = None):
        self.shown = shown or shlex.join(argv)
        self.argv, self.processes, self.devices, self.port, self.grace = argv, processes, devices, port, grace
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.children: list[subprocess.Popen] = []
        self.lock = threading.Lock()
        self.signalled: int | None = None
        self.pumps: list[threading.Thread] = []

    def run(self) -> int:
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._start()
            return self._wait()
        finally:
            self._stop(signal.SIGKILL, 0.0)  # nothing outlives the launcher, whatever happened
            for s, handler in previous.items():
                signal.signal(s, handler)
            for t in self.pumps:
                t.join(timeout=2.0)

    def _start(self) -> None:
        for i in range(self.processes):  # all started before any output thread (no fork beside threads)
            if self.signalled is not None:  # stopped while starting: start no more
                break
            env = child_env(dict(os.environ), i, self.processes, self.devices, self.port)
            try:
                child = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=None if i == 0 else subprocess.PIPE, text=True, errors="replace",
                                         bufsize=1, start_new_session=True, preexec_fn=_die_with_parent())
            except OSError as e:
                raise AutoshardError(f"cannot start {shlex.join(self.argv)}: {e.strerror or e}") from None
            self.children.append(child)
        for i, child in enumerate(self.children):
            prefix = "" if i == 0 else f"[process {i}] "
            self._pump(child.stdout, self.out, prefix)
            if i != 0:
                self._pump(child.stderr, self.err, prefix)
        print(f"launched {self.processes} processes x {self.devices} CPU device(s), coordinator 127.0.0.1:"
              f"{self.port}: {self.shown}", file=self.err, flush=True)

    def _pump(self, stream: IO[str] | None, to: IO[str], prefix: str) -> None:
        def copy() -> None:
            assert stream is not None
            clean = NoiseFilter()
            for line in stream:
                line = clean(line)
                if not line:
                    continue
                with self.lock:
                    to.write(prefix + line)
                    to.flush()

        t = threading.Thread(target=copy, daemon=True)
        t.start()
        self.pumps.append(t)

    def _wait(self) -> int:
        """The first failure's status, else 0. Without a signal, a failure stops the others at once (they are likely
        stuck in a collective with it); after a forwarded signal every child gets the grace period to finish, and
        an exit status of 128 + N is its answer to the signal, not a failure of the run."""
        exits: list[int] = []  # statuses in the order the children ended
        done: set[int] = set()
        deadline: float | None = None
        while True:
            for i, c in enumerate(self.children):
                if i not in done and c.poll() is not None:
                    done.add(i)
                    exits.append(_status(c.returncode))
                    if c.returncode != 0 and self.signalled is None:
                        print(f"process {i} failed with exit status {_status(c.returncode)}: stopping the others",
                              file=self.err, flush=True)
                        self._stop(signal.SIGTERM, FAILURE_GRACE_S)
                        return _status(c.returncode)
            first = next((s for s in exits if s != 0), 0)
            if len(done) == len(self.children):
                return first
            if self.signalled is not None:
                deadline = deadline or time.monotonic() + self.grace
                if time.monotonic() >= deadline:
                    print(f"{len(self.children) - len(done)} process(es) still running {self.grace:g} s after the "
                          f"signal: killed", file=self.err, flush=True)
                    self._stop(signal.SIGKILL, 0.0)
                    return first or 128 + self.signalled
            time.sleep(0.05)

    def _forward(self, signum: int, frame: Any) -> None:
        """SIGINT / SIGTERM to the launcher: to every child's process group."""
        first = self.signalled is None
        self.signalled = signum
        if first:
            print(f"\n{signal.Signals(signum).name}: forwarded to {len(self.children)} processes", file=self.err,
                  flush=True)
        for c in self.children:
            _signal_group(c, signum)

    def _stop(self, signum: int, grace: float) -> None:
        """`signum` to every child still running, then SIGKILL to those alive after `grace` s; reaps them all."""
        for c in self.children:
            if c.poll() is None:
                _signal_group(c, signum)
        end = time.monotonic() + grace
        for c in self.children:
            try:
                c.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for c in self.children:
            _signal_group(c, signal.SIGKILL)  # the group: anything the child started goes too
            try:
                c.wait(timeout=10.0)
            except subprocess.TimeoutExpired:  # unkillable (a process in uninterruptible sleep): say so
                print(f"process {c.pid} did not die after SIGKILL", file=self.err, flush=True)


def _die_with_parent():
    """On Linux, a function that makes a child get SIGKILL when the launcher dies, however it dies (`kill -9`
    included), so that no child outlives it; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    launcher = os.getpid()

    def set_death_signal() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != launcher:  # the launcher died between fork and prctl: the signal will never come
            os.kill(os.getpid(), signal.SIGKILL)

    return set_death_signal


def _signal_group(child: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(child.pid, signum)  # start_new_session: the child leads its own group
    except (ProcessLookupError, PermissionError):
        pass


def _status(returncode: int) -> int:
    """A child's status as a shell reports it: 128 + N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode

