"""Multi-process (multi-host) runs on jax's own engine: `jax.distributed`, started once, before jax starts.

One process per host: each drives its own devices, `jax.devices()` lists every process's, and a jitted step over a
mesh of all of them is one SPMD program whose collectives cross hosts (NCCL / ICI / gloo on CPU). What a process
needs to join is the coordinator's address (process 0 serves it), the number of processes and its own index. They
come, first found first, from:

1. arguments: `--coordinator HOST:PORT --num-processes N --process-id I` (or `initialize(...)` in Python);
2. what `autoshard launch` sets: JAX_COORDINATOR_ADDRESS, AUTOSHARD_NUM_PROCESSES, AUTOSHARD_PROCESS_ID;
3. SLURM under `srun` with more than one task: one task per node uses all of the node's devices (jax's own SLURM
   detection would give each task only the device numbered by its local rank), several tasks per node are left
   to jax's detection (a device each);
4. jax's own detection (Cloud TPU pods, Open MPI, Kubernetes, SLURM), when `--distributed` (`force=True`) asks for
   it or JAX_COORDINATOR_ADDRESS, OMPI_COMM_WORLD_SIZE > 1 or a multi-host TPU_WORKER_HOSTNAMES is set.

Nothing found: a single-process run, and nothing here touches jax.

When the coordinator cannot be reached or a peer never joins, jax aborts the process natively (SIGABRT, a C++ stack
trace) once its timeout passes. `initialize` runs a watchdog that fires first and turns that into one `error:` line
and exit status 2. This module imports jax only inside functions: the CLI sets XLA_FLAGS before jax starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import socket
import sys
import threading
from typing import Any, TextIO

from autoshard import argtypes
from planner.errors import AutoshardError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
"""jax's own variable for the coordinator's HOST:PORT (jax reads it too)."""
ENV_NUM_PROCESSES = "AUTOSHARD_NUM_PROCESSES"
ENV_PROCESS_ID = "AUTOSHARD_PROCESS_ID"
ENV_TIMEOUT = "AUTOSHARD_COORDINATOR_TIMEOUT"
"""Seconds to wait for the coordinator and every peer (when --coordinator-timeout is not given)."""
DEFAULT_TIMEOUT_S = 300.0
"""Long enough for a large pod's processes to start; a run on one machine joins in about a second."""
SHUTDOWN_TIMEOUT_S = 60
"""How long a finishing process waits in jax's shutdown barrier for its peers (jax's default is 300 s)."""
JAX_MARGIN_S = 60
"""jax's own initialization timeout is ours plus this, so the watchdog's one-line error always comes first."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How this process joins a multi-process run (None fields: jax's cluster detection fills them)."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    source: str
    """Where the settings came from, for messages: "--coordinator", "autoshard launch", "SLURM", ..."""
    detect: bool = False
    """Let jax detect the cluster (and which devices this process uses) instead of giving everything."""


_joined: Settings | None = None
"""The settings this process joined with (None: not started by this module)."""


# ---------------------------------------------------------------------------------------------------------------
# where the settings come from


def add_args(p: argparse.ArgumentParser) -> None:
    """The multi-process flags of `autoshard train` / `plan`."""
    g = p.add_argument_group("multi-process runs (one process per host, jax.distributed)",
                             "Default: this process alone, unless SLURM (under srun, more than one task), autoshard "
                             "launch or JAX_COORDINATOR_ADDRESS make it one process of several.")
    g.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help="address of process 0, which serves the coordinator; every process gives the same")
    g.add_argument("--num-processes", type=argtypes.positive_int, default=None, metavar="N", help="processes in the run")
    g.add_argument("--process-id", type=argtypes.index, default=None, metavar="I", help="this process's index, 0..N-1")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run that jax detects by itself (Cloud TPU pods, SLURM, Open MPI, "
                        "Kubernetes); each process then uses all its local devices (--devices does not apply)")
    g.add_argument("--coordinator-timeout", type=argtypes.seconds, default=None, metavar="S",
                   help=f"seconds to wait for the coordinator and every process to join (default "
                        f"{DEFAULT_TIMEOUT_S:g}, or ${ENV_TIMEOUT})")


def requested(args: argparse.Namespace) -> bool:
    """Whether the command's arguments and environment make it one process of a multi-process run."""
    if not hasattr(args, "coordinator"):  # a command without the multi-process flags runs alone
        return False
    return settings(args.coordinator, args.num_processes, args.process_id, force=args.distributed) is not None


def settings(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
             force: bool = False, environ: dict[str, str] | None = None) -> Settings | None:
    """How to join, from the arguments, then `autoshard launch`'s variables, then the cluster; None: run alone."""
    env = os.environ if environ is None else environ
    if coordinator is not None or num_processes is not None or process_id is not None:
        coordinator = coordinator or env.get(ENV_COORDINATOR)
        missing = [flag for flag, v in (("--coordinator HOST:PORT", coordinator), ("--num-processes N", num_processes),
                                        ("--process-id I", process_id)) if v is None]
        if missing:
            raise AutoshardError(f"a multi-process run needs {', '.join(missing)} as well: give all three on every "
                                 f"process (or none of them under SLURM, a TPU pod or autoshard launch)")
        return _checked(Settings(coordinator, num_processes, process_id, "--coordinator"))
    if env.get(ENV_PROCESS_ID) is not None or env.get(ENV_NUM_PROCESSES) is not None:
        try:
            n, i = int(env[ENV_NUM_PROCESSES]), int(env[ENV_PROCESS_ID])
        except (KeyError, ValueError):
            raise AutoshardError(f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} must both be set to integers (as autoshard "
                                 f"launch sets them), got {env.get(ENV_NUM_PROCESSES)!r} and "
                                 f"{env.get(ENV_PROCESS_ID)!r}") from None
        if not env.get(ENV_COORDINATOR):
            raise AutoshardError(f"{ENV_PROCESS_ID} is set but {ENV_COORDINATOR} (HOST:PORT of process 0) is not")
        return _checked(Settings(env[ENV_COORDINATOR], n, i, "autoshard launch"))
    slurm = _slurm(env)
    if slurm is not None:
        return slurm
    if force:
        return Settings(env.get(ENV_COORDINATOR), None, None, "jax's cluster detection (--distributed)", detect=True)
    if env.get(ENV_COORDINATOR):
        return Settings(env[ENV_COORDINATOR], None, None, f"{ENV_COORDINATOR}", detect=True)
    if _int_env(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return Settings(None, None, None, "Open MPI", detect=True)
    if env.get("MEGASCALE_COORDINATOR_ADDRESS") or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return Settings(None, None, None, "a Cloud TPU pod", detect=True)
    return None


def _int_env(env: dict[str, str], name: str) -> int:
    try:
        return int(env.get(name, "0").split("(")[0])
    except ValueError:
        return 0


def _slurm(env: dict[str, str]) -> Settings | None:
    """A SLURM job step (`srun`) of more than one task; None otherwise (a batch script's own shell is one task)."""
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")
    if not all(k in env for k in needed):
        return None
    tasks = _int_env(env, "SLURM_STEP_NUM_TASKS") or _int_env(env, "SLURM_NTASKS")
    if tasks <= 1:
        return None
    nodes = _int_env(env, "SLURM_STEP_NUM_NODES") or _int_env(env, "SLURM_NNODES")
    if nodes != tasks:  # several tasks per node: jax's detection gives each task its own device
        return Settings(None, None, None, "SLURM (one process per device)", detect=True)
    port = env.get("JAX_COORDINATOR_PORT") or str(int(env["SLURM_JOB_ID"]) % 4096 + 61440)  # as jax picks it
    coordinator = env.get(ENV_COORDINATOR) or f"{first_host(env['SLURM_STEP_NODELIST'])}:{port}"
    return _checked(Settings(coordinator, tasks, int(env["SLURM_PROCID"]), "SLURM (one process per node)"))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (`node[003-007,012],gpu1` -> `node003`), as jax picks the coordinator."""
    head = nodelist.split(",", 1)[0]
    if "[" not in head:
        return head
    prefix, rest = nodelist.split("[", 1)
    return prefix + re.split(r"[,\-\]]", rest, maxsplit=1)[0]


def _checked(s: Settings) -> Settings:
    host, sep, port = (s.coordinator or "").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AutoshardError(f"coordinator address {s.coordinator!r} (from {s.source}) is not HOST:PORT with a port "
                             f"1-65535")
    if s.num_processes is not None and s.num_processes < 1:
        raise AutoshardError(f"the number of processes must be positive, got {s.num_processes} (from {s.source})")
    if s.process_id is not None and not 0 <= s.process_id < (s.num_processes or 0):
        raise AutoshardError(f"process id {s.process_id} is not in 0..{(s.num_processes or 1) - 1} for "
                             f"{s.num_processes} processes (from {s.source})")
    return s


# ---------------------------------------------------------------------------------------------------------------
# joining


def initialize_from_args(args: argparse.Namespace) -> bool:
    """`initialize` for a CLI command with the `add_args` flags: quiet followers (only process 0 prints), and
    `--devices` refused (each process uses all its local devices). False when the command runs alone."""
    if not hasattr(args, "coordinator"):
        return False
    found = settings(args.coordinator, args.num_processes, args.process_id, force=args.distributed)
    if found is None:
        return False
    if getattr(args, "devices", None) is not None:
        raise AutoshardError(f"--devices does not apply to a multi-process run ({found.source}): each process uses "
                             f"all its local devices (emulated CPU devices: XLA_FLAGS="
                             f"--xla_force_host_platform_device_count=N, or autoshard launch --devices-per-process N)")
    timeout = args.coordinator_timeout or _env_timeout()
    return initialize(found.coordinator, found.num_processes, found.process_id, timeout_s=timeout,
                      force=True, quiet_followers=True, _found=found)


def _env_timeout() -> float:
    text = os.environ.get(ENV_TIMEOUT)
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        return argtypes.seconds(text)
    except argparse.ArgumentTypeError as e:
        raise AutoshardError(f"{ENV_TIMEOUT}: {e}") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout_s: float | None = None, force: bool = False, quiet_followers: bool = False,
               native_stdout: bool = False, _found: Settings | None = None) -> bool:
    """Join the multi-process run the arguments or the environment describe (see the module docstring); call it
    first thing, before anything asks jax for devices. Returns whether this is a multi-process run (False: nothing
    found, nothing started). A second call is a no-op.

    `timeout_s`: how long to wait for the coordinator and every process (default $AUTOSHARD_COORDINATOR_TIMEOUT or
    300 s); `force`: let jax detect a cluster this module does not recognise. `quiet_followers`: processes other
    than 0 print nothing on stdout and only errors (`error:` lines, tracebacks) on stderr, so a run's console is
    process 0's. Native writes to stdout go to /dev/null (`native_stdout_off`) unless `native_stdout`.
    """
    global _joined
    import jax

    if _joined is not None:
        return True
    if jax.distributed.is_initialized():  # started by the caller with jax's own call
        return True
    found = _found or settings(coordinator, num_processes, process_id, force=force)
    if found is None:
        return False
    timeout = float(timeout_s if timeout_s is not None else _env_timeout())
    done = threading.Event()
    threading.Thread(target=_watchdog, args=(found, timeout, done), name="autoshard-distributed-watchdog",
                     daemon=True).start()
    kwargs: dict[str, Any] = dict(initialization_timeout=int(timeout) + JAX_MARGIN_S,
                                  shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    if not found.detect:
        kwargs["cluster_detection_method"] = "deactivate"  # all local devices, whatever SLURM says
    try:
        jax.distributed.initialize(found.coordinator, found.num_processes, found.process_id, **kwargs)
    except (ValueError, TypeError, RuntimeError) as e:  # jax's own checks: a backend already started (call this
        # first), settings its cluster detection could not find, ...
        text = " ".join(str(e).split()).rstrip(".")
        hint = ("; jax found no cluster to join: give --coordinator HOST:PORT --num-processes N --process-id I"
                if found.detect and "defined" in text else "")
        raise AutoshardError(f"cannot join the multi-process run ({found.source}): {text}{hint}") from None
    finally:
        done.set()
    _joined = found
    if not native_stdout:
        native_stdout_off()
    if quiet_followers and jax.process_index() != 0:
        quiet_console()
    return True


def _watchdog(found: Settings, timeout: float, done: threading.Event) -> None:
    """Exit with one line before jax's own timeout aborts the process with a native stack trace."""
    if done.wait(timeout):
        return
    where = found.coordinator or "the detected coordinator"
    if found.process_id not in (None, 0) and found.coordinator and not _reachable(found.coordinator):
        line = (f"cannot reach the coordinator at {where} within {timeout:g} s ({found.source}): process 0 must be "
                f"running there and this host must reach that port")
    else:
        n = found.num_processes or "all"
        line = (f"not all {n} processes joined the coordinator at {where} within {timeout:g} s ({found.source}; "
                f"this is process {found.process_id if found.process_id is not None else '?'}): start every process "
                f"with the same coordinator and process count and distinct process ids")
    try:
        sys.__stderr__.write(f"error: {line}\n")
        sys.__stderr__.flush()
    finally:
        os._exit(2)


def _reachable(address: str, timeout: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def abandon(status: int) -> None:
    """Leave a failed multi-process run now, with `status`: jax's exit handler would wait in its shutdown barrier
    for peers that, stuck in a collective with this process, never come (up to its shutdown timeout)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def joined() -> Settings | None:
    """The settings this process joined with through `initialize`, or None."""
    return _joined


def is_writer() -> bool:
    """Whether this process writes the run folder and the console: process 0 (any process of a one-process run).

    Does not start jax's backend when no multi-process run was joined."""
    if _joined is not None and _joined.process_id is not None:
        return _joined.process_id == 0
    import jax

    if not jax.distributed.is_initialized():
        return True
    return jax.process_index() == 0


def process_count() -> int:
    """Processes in the run (1 without jax.distributed); does not start jax's backend in a one-process run."""
    import jax

    return jax.process_count() if jax.distributed.is_initialized() else 1


# ---------------------------------------------------------------------------------------------------------------
# agreeing


def broadcast_text(text: str) -> str:
    """Process 0's `text` on every process (each process calls it; a collective over all devices)."""
    if process_count() == 1:
        return text
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode(), dtype=np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    buf = np.zeros(n, np.uint8)
    if is_writer():
        buf[:] = data
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode()


def check_same(text: str, what: str) -> None:
    """An `AutoshardError` on every process when `text` differs between processes (a collective; every process
    calls it): different plans or batch sizes would otherwise deadlock or train silently wrong."""
    if process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), dtype=np.uint8)
    every = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1, digest.size)
    differ = [i for i, d in enumerate(every) if not np.array_equal(d, every[0])]
    if differ:
        raise AutoshardError(f"the {what} differs between processes (process {differ[0]} has another than process "
                             f"0): give every process the same {what}")


# ---------------------------------------------------------------------------------------------------------------
# console


class _ErrorsOnly:
    """A follower's stderr: passes `error:` lines and tracebacks (to the end), drops the rest (progress, notes,
    warnings process 0 prints too)."""

    def __init__(self, stream: TextIO):
        self.stream, self.passing, self.partial = stream, False, ""

    def write(self, text: str) -> int:
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            bare = line.lstrip("\r")
            if bare.startswith("Traceback (most recent call last)"):
                self.passing = True
            if self.passing or bare.startswith("error:"):
                self.stream.write(bare + "\n")
        self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def native_stdout_off() -> None:
    """Python's stdout keeps the console; what native code writes to file descriptor 1 goes to /dev/null: gloo (the
    CPU collectives) prints a note for every new group of devices there, from several threads at once, so the notes
    interleave with each other and with the run's `step N loss X` lines."""
    sys.stdout.flush()
    console = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = open(console, "w", buffering=1, encoding=sys.stdout.encoding,  # noqa: SIM115
                      errors=sys.stdout.errors)


def quiet_console() -> None:
    """This process's console goes quiet but for errors: stdout to /dev/null (native writes too), stderr through
    `_ErrorsOnly`."""
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
    sys.stderr = _ErrorsOnly(sys.stderr)  # type: ignore[assignment]
