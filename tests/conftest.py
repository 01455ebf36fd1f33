"""Test setup: 8 emulated CPU devices, configured before jax is imported anywhere."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"])
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
