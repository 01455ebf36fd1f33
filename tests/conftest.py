"""Test setup: 8 emulated CPU devices, configured before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

assert len(jax.devices()) == 8, "tests need 8 emulated devices: jax was imported before conftest set XLA_FLAGS"


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
