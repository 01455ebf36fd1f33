"""Assertions several test files share."""

import re

PROGRESS = re.compile(r"planning .*: \d+ mesh")
"""The planner's plain progress line (printed when a search runs longer than a few seconds, as under load)."""


def assert_one_line_error(err: str, words: str) -> None:
    """Bad input's contract: stderr holds one `error: ...` line naming `words` (progress lines aside), no
    traceback."""
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert "Traceback" not in err


def host_normal(seed: int, *shapes: tuple[int, ...], scale: float = 1.0) -> tuple:
    """Standard normal float32 arrays (times `scale`) drawn on the host with numpy and put on the default device:
    test data without a random-number program to compile for each shape (jax.random's threefry compiles in about
    a second per shape on XLA:CPU)."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(scale * rng.standard_normal(shape, dtype=np.float32)) for shape in shapes)
