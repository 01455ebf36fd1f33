"""Test setup: 8 emulated CPU devices, configured before jax is imported anywhere."""

import os
import shutil
import tempfile

from autoshard.launch import with_device_count  # (imports no jax)

_FLAGS = os.environ.get("XLA_FLAGS", "").split()
# XLA:CPU compiles the tests' small programs at LLVM -O0 (unless the caller chose a level): compiling them is most of
# the suite's time (the whole suite on 2 cores, `-n 2`: 589 s at XLA's default level, 490 s at -O0).
# The level is LLVM's alone: the HLO XLA partitions, schedules and assigns buffers for, which the tests read back
# (collectives, bytes, memory, FLOPs), is the same program; run times grow (elementwise code unoptimised) but stay
# small, and values may differ from -O2's in the last bits, the same way in a test's reference and parallel runs
# (no further from each other: tests/test_parallel.py's MoE test measures both levels).
# (The docs' blocks run in processes of their own, setting XLA_FLAGS as written; tests/test_docs.py adds the level.)
if not any(f.startswith("--xla_backend_optimization_level") for f in _FLAGS):
    _FLAGS.append("--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = with_device_count(" ".join(_FLAGS), 8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same programs (the tiny models' train steps on the same meshes), in this process and in
# the subprocesses they start: jax's persistent compilation cache compiles each once per session. The folder is new
# for every session (the xdist workers and the subprocesses inherit the controller's), so a run is never served by
# an earlier run's programs; a cache the caller set is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="autoshard-test-jax-cache-")
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

assert len(jax.devices()) == 8, "tests need 8 emulated devices: jax was imported before conftest set XLA_FLAGS"


LONGEST_FIRST = ["test_pipeline.py", "test_pipeline_compiled.py", "test_zoo.py", "test_checkpoint.py", "test_resume.py",
                 "test_cli.py", "test_planner.py", "test_launch.py", "test_planner_pipeline.py", "test_predictions.py",
                 "test_sequence.py", "test_docs.py", "test_planner_seq_expert.py"]
"""The files that take longest (a full run's --durations), about longest first: they start first and the short files
fill in at the end, so that the workers of `-n 2 --dist loadfile` finish together (xdist would otherwise order the
files by their number of tests, which starts files of a few long tests, such as the compiled pipelines', last). Files
that compile a program another file compiles too run after it: the persistent cache serves them (test_inspect.py's
steps are test_predictions.py's, test_launch.py's one-device run is test_cli.py's)."""


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the files in collection order
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: each file's tests keep their order)


def pytest_unconfigure(config):
    """The session's compilation cache goes with the process that made it (the controller, or a lone pytest)."""
    if "_OWN_CACHE" in globals():
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def token_batch():
    """A fixed [16, 64] next-token batch of byte tokens."""
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 256, size=(16, 65)).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:]}


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> str:
    """A small fixed corpus file (200 KB of the standard library's source) for the command-line tests."""
    from autoshard import data

    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_bytes(b"".join(f.read_bytes() for f in data.stdlib_files(200_000)))
    return str(path)
