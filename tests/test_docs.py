"""Docs are claims: every Python block of README.md and docs/user-guide.md runs as written, in a fresh process on a
machine without accelerators (each block sets the emulated device count itself, before jax is imported)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/user-guide.md")


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


BLOCKS = [(f"{doc}#{i}", code) for doc in DOCS for i, code in enumerate(python_blocks(ROOT / doc))]


def test_the_docs_have_python_examples():
    assert {name.split("#")[0] for name, _ in BLOCKS} == set(DOCS)


# Run before a block: when the block first imports jax (after it set XLA_FLAGS itself, as written), the tests' LLVM
# level (tests/conftest.py) joins its flags, and the block's programs compile as the rest of the suite's (the
# five blocks 47.3 s at XLA's default level, 36.9 s so). Nothing else of the block changes.
LEVEL = """
import os as _os, sys as _sys
class _Level:
    def find_spec(self, name, path=None, target=None):
        if name == "jax":
            _sys.meta_path.remove(self)
            _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + " {flag}").strip()
_sys.meta_path.insert(0, _Level())
del _Level
"""


@pytest.mark.parametrize("name, code", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_a_python_block_of_the_docs_runs_as_written(name, code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the block must set it, as a user's would
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    levels = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith("--xla_backend_optimization_level")]
    prelude = LEVEL.format(flag=levels[0]) if levels else ""
    done = subprocess.run([sys.executable, "-c", prelude + code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-3000:]}"
