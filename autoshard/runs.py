"""Run and checkpoint folders that one run owns: a lock against a second run, and no debris from a failed start.

`Lock` holds `<folder>/.autoshard.lock` with `flock`: the kernel releases it when the process dies, however it dies
(`kill -9` included), so a lock left by a dead run is taken over, not obeyed; the file holds the owner's pid and
host for the message a second run prints. Where the filesystem has no `flock` (some network mounts), the file is
created exclusively instead and a lock whose pid is gone on this host counts as stale.

`Folder` creates a run folder (refusing one that already holds files unless the run resumes) and, if the run fails
before its first step, removes what it created, so a failed start leaves nothing behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

from planner.errors import AutoshardError

LOCK = ".autoshard.lock"
METRICS = "metrics.jsonl"
"""The run folder's per-step records (`autoshard.metrics` writes them, `autoshard report` reads them)."""


class Lock:
    """An exclusive lock on a folder for this process's lifetime (or until `release`)."""

    def __init__(self, folder: str | Path, what: str = "run folder"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK
        self.fd: int | None = None

    def acquire(self) -> "Lock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise AutoshardError(f"cannot write {self.what} {self.folder}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise AutoshardError(f"{self.what} {self.folder} is in use by another run ({_owner(self.path)}): "
                                     f"wait for it to finish, or choose another folder") from None
            os.close(fd)  # no flock here: an exclusive create, with stale-pid detection
            fd = self._exclusive()
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n".encode())
        self.fd = fd
        return self

    def _exclusive(self) -> int:
        for _ in range(2):
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not _stale(self.path):
                    raise AutoshardError(f"{self.what} {self.folder} is in use by another run "
                                         f"({_owner(self.path)}): wait for it to finish, or choose another folder"
                                         ) from None
                self.path.unlink(missing_ok=True)
        raise AutoshardError(f"cannot lock {self.what} {self.folder}: its lock file keeps reappearing")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _owner(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "owner unknown"


def _stale(path: Path) -> bool:
    """A lock file whose pid no longer runs on this host."""
    try:
        words = path.read_text().split()
        pid, host = int(words[1]), words[3]
    except (OSError, ValueError, IndexError):
        return True
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def holds_files(folder: Path) -> bool:
    """Whether `folder` exists and holds anything but a lock file."""
    try:
        return any(name != LOCK for name in os.listdir(folder))
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        raise AutoshardError(f"run folder {folder} is a file: choose a folder path") from None
    except OSError as e:
        raise AutoshardError(f"cannot read run folder {folder}: {e.strerror or e}") from None


class Folder:
    """A folder a run writes, locked; `abandon()` removes what this run created in it."""

    def __init__(self, path: Path, created: bool, lock: Lock):
        self.path, self.created, self.lock = path, created, lock
        self.before = set(os.listdir(path)) if not created else set()

    @classmethod
    def claim(cls, path: str | Path, *, what: str = "run folder", reuse: bool = False) -> "Folder":
        """Create (or, with `reuse` or when empty, take) `path` and lock it; a folder that holds files is a one-line
        error unless `reuse`."""
        path = Path(path)
        if holds_files(path) and not reuse:
            raise AutoshardError(f"{what} {path} already exists and holds files: pass --resume to continue that "
                                 f"run, or choose a new --out")
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AutoshardError(f"cannot create {what} {path}: {e.strerror or e}") from None
        try:
            lock = Lock(path, what).acquire()
        except AutoshardError:
            if created:
                shutil.rmtree(path, ignore_errors=True)
            raise
        return cls(path, created, lock)

    @classmethod
    def fresh(cls, base: Path) -> "Folder":
        """A new folder `base`, or `base-2`, `base-3`, ... (the default run folder: never an existing one)."""
        for i in range(1, 1000):
            path = base if i == 1 else base.with_name(f"{base.name}-{i}")
            try:
                path.mkdir(parents=True, exist_ok=False)
            except FileExistsError:
                continue
            except OSError as e:
                raise AutoshardError(f"cannot create run folder {path}: {e.strerror or e}") from None
            return cls(path, True, Lock(path).acquire())
        raise AutoshardError(f"cannot create a fresh run folder next to {base}: pass --out")

    def abandon(self) -> None:
        """Remove what this run put here (the whole folder if it created it), then unlock."""
        if self.created:
            self.lock.release()
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for name in set(os.listdir(self.path)) - self.before - {LOCK}:
            target = self.path / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        self.lock.release()

    def release(self) -> None:
        self.lock.release()


class Followed:
    """The run folder as the other processes of a multi-process run see it: process 0 claims, locks, writes and (on
    a failed start) removes it; they only know its path."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = self

    def abandon(self) -> None:
        pass

    def release(self) -> None:
        pass
