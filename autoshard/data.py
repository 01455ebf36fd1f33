"""Byte-level text data for training: a token stream of bytes and random next-token windows over it.

The default text is the Python standard library's own `.py` files, so `autoshard train` works on any machine with
no download. Numpy only (no jax), so the CLI can load and check data before jax starts.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from planner.checks import check_seed
from planner.errors import AutoshardError

VOCAB = 256
"""Tokens are bytes 0..255."""
DEFAULT_MAX_BYTES = 8 << 20
"""Read at most this many bytes (whole files, in sorted order) so startup stays fast."""
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class Corpus:
    """A token stream (uint8 bytes) and where it came from."""

    tokens: np.ndarray
    source: str
    files: int

    def describe(self) -> dict:
        return {"source": self.source, "files": self.files, "bytes": int(self.tokens.size)}


def stdlib_files(max_bytes: int = DEFAULT_MAX_BYTES) -> list[Path]:
    """The standard library's `.py` files in a deterministic (sorted, depth-first) order, up to `max_bytes`."""
    root = sysconfig.get_paths()["stdlib"]
    out, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath, name)
                try:
                    total += path.stat().st_size
                except OSError:
                    continue
                out.append(path)
                if total >= max_bytes:
                    return out
    return out


def resolve(spec: str) -> list[Path]:
    """A file, a directory (every file under it) or a glob (`**` recursive) -> sorted list of files."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        if not files:
            raise AutoshardError(f"data directory {spec} contains no files")
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
        if not files:
            raise AutoshardError(f"data glob {spec!r} matches no files")
        return files
    raise AutoshardError(f"data path {spec} does not exist: give a file, a directory or a glob like 'texts/**/*.txt'")


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def read_bytes(files: list[Path], max_bytes: int | None = None) -> np.ndarray:
    """The files' bytes concatenated, whole files in order, stopping once `max_bytes` is reached."""
    chunks, total = [], 0
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            raise AutoshardError(f"cannot read data file {f}: {e.strerror or e}") from None
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def load(spec: str | None = None, max_bytes: int | None = DEFAULT_MAX_BYTES) -> Corpus:
    """The token stream of `spec` (file / directory / glob), or of the standard library's sources when None."""
    if spec is None:
        files = stdlib_files(max_bytes or DEFAULT_MAX_BYTES)
        source = f"python stdlib ({sysconfig.get_paths()['stdlib']})"
        if not files:
            raise AutoshardError(f"no Python sources found under {sysconfig.get_paths()['stdlib']}: pass --data")
    else:
        files, source = resolve(spec), spec
    tokens = read_bytes(files, max_bytes)
    if tokens.size == 0:
        raise AutoshardError(f"data {source} is empty: give files with some text")
    return Corpus(tokens, source, len(files))


class TextData:
    """Random next-token windows of a byte stream: batches `{"inputs": int32[B,S], "targets": int32[B,S]}`.

    Window starts come from `np.random.default_rng(seed)`, so a seed gives the same batches in the same order on any
    mesh or device count (the batch is global; the trainer splits it).

    In a multi-process run each process reads only its share: `rows` (`Trainer.process_rows(batch)`, the global
    rows this process's devices hold) are read from the text, the other rows stay zero. Every process still draws
    every window start (a few integers), so the global batch is the one-process run's, and the batch keeps its
    global shape, so the trainer, the loop and its metrics see the same batch structure everywhere.
    """

    def __init__(self, tokens: np.ndarray | Corpus, batch: int, seq: int, seed: int = 0,
                 rows: Sequence[int] | None = None):
        self.tokens = np.asarray(tokens.tokens if isinstance(tokens, Corpus) else tokens, dtype=np.uint8)
        if batch < 1 or seq < 1:
            raise AutoshardError(f"batch and seq must be positive, got batch={batch} seq={seq}")
        if self.tokens.size < seq + 1:
            raise AutoshardError(f"data has {self.tokens.size} bytes, fewer than seq+1={seq + 1}: use a smaller "
                                 f"--seq or more text")
        self.batch, self.seq, self.seed = batch, seq, check_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.drawn = 0
        """Batches drawn so far."""
        self._offsets = np.arange(seq + 1)
        self.rows: np.ndarray | None = None
        """The global rows read from the text (None: all)."""
        self.select_rows(rows)

    def select_rows(self, rows: Sequence[int] | None) -> None:
        """Read only these rows of each global batch from now on (None: all); see the class docstring."""
        if rows is None:
            self.rows = None
            return
        picked = np.asarray(rows, dtype=np.int64).reshape(-1)
        if picked.size and (picked.min() < 0 or picked.max() >= self.batch or np.any(np.diff(picked) <= 0)):
            raise AutoshardError(f"rows must be increasing indices into the batch of {self.batch}, got "
                                 f"{picked.tolist()[:8]}")
        self.rows = None if picked.size == self.batch else picked

    def next(self) -> dict[str, np.ndarray]:
        starts = self.rng.integers(0, self.tokens.size - self.seq, size=self.batch)  # last start: size - seq - 1
        self.drawn += 1
        if self.rows is None:
            windows = self.tokens[starts[:, None] + self._offsets].astype(np.int32)
        else:
            windows = np.zeros((self.batch, self.seq + 1), np.int32)  # calloc'd: untouched rows cost no memory
            windows[self.rows] = self.tokens[starts[self.rows, None] + self._offsets]
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}

    def state(self) -> dict:
        """Where the stream stands, as JSON-able data: a checkpoint keeps it so that a resumed run draws the batches
        the uninterrupted run would have drawn."""
        return {"seed": self.seed, "batch": self.batch, "seq": self.seq, "tokens": int(self.tokens.size),
                "drawn": self.drawn, "rng": self.rng.bit_generator.state}

    def restore(self, state: dict) -> None:
        """Continue from `state()` of a stream over the same text, batch, sequence length and seed."""
        mine = {"seed": self.seed, "batch": self.batch, "seq": self.seq, "tokens": int(self.tokens.size)}
        differ = [f"{k} {state.get(k)} there, {v} here" for k, v in mine.items() if state.get(k) != v]
        if differ:
            raise AutoshardError(f"the checkpoint's data stream does not continue this one ({'; '.join(differ)}): "
                                 f"resume with the same --data, --batch, --seq and --seed")
        try:
            self.rng.bit_generator.state = state["rng"]
        except (KeyError, TypeError, ValueError) as e:
            raise AutoshardError(f"the checkpoint's data position is damaged: {e}") from None
        self.drawn = int(state.get("drawn", 0))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            yield self.next()


def holdout(tokens: np.ndarray | Corpus, fraction: float = 0.05, seq: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(training tokens, held-out tokens): the last `fraction` of the stream (at least seq+1 tokens) is kept out of
    training, for the eval loss."""
    tokens = np.asarray(tokens.tokens if isinstance(tokens, Corpus) else tokens, dtype=np.uint8)
    n = max(int(tokens.size * fraction), seq + 1)
    if tokens.size - n < seq + 1:
        raise AutoshardError(f"data has {tokens.size} bytes: too few to hold out {n} for evaluation and still train "
                             f"on windows of seq+1={seq + 1}: use more text, a smaller --seq, or drop --eval-every")
    return tokens[:-n], tokens[-n:]


def check_vocab(vocab: int) -> None:
    if vocab < VOCAB:
        raise AutoshardError(f"byte-level data needs a vocabulary of at least {VOCAB}, but the model has "
                             f"vocab={vocab}: use a model with vocab>={VOCAB}")
