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


@pytest.mark.parametrize("name, code", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_a_python_block_of_the_docs_runs_as_written(name, code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the block must set it, as a user's would
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-3000:]}"
