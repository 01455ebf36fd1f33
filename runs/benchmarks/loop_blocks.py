"""Planning time of a model whose blocks are a Python loop, folded into a layer stack (issue 11, item 5) vs op by op.

Reproduce (from the repository root; about 3-5 minutes on 2 CPU cores):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python runs/benchmarks/loop_blocks.py

Writes runs/benchmarks/loop_blocks.json and runs/benchmarks/loop_blocks.md next to this file.

The model: token embedding -> n pre-norm blocks (LayerNorm -> nnx.MultiHeadAttention -> residual -> LayerNorm ->
MLP -> residual) in `nnx.List`, run by `for b in self.blocks` -> final LayerNorm -> head; d_model 16, MLP 32,
2 heads, vocabulary 64, batch 8 x 8 tokens. "plan s" times `autoshard.api.plan(model, batch, loss_fn=...,
cluster="cpu:8")` (free search) on the model object built beforehand (`nnx.eval_shape`, timed apart as "build s":
constructing 48 NNX blocks is the user's cost, not the planner's); "op by op" is the same search on the unfolded
trace (`trace_model(..., fold=False)` then `plan_graph`, what `api.plan` did before folding). Each case runs in a
subprocess of its own, cut off after CAP seconds (reported as "> CAP"). "of which trace s" times `trace_model`
alone (jax's make_jaxpr of the loss and the walk over it): that part still grows with depth, the search does not.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parents[1] / "tests")]

DEPTHS = (4, 12, 48)
CAP = 100.0
"""Seconds one case may run (the op-by-op search at 48 blocks may not finish in it)."""


def _model(n: int):
    """The benchmark model (see the module docstring; `tests/test_repeated_blocks.py` defines it) and its loss."""
    import test_repeated_blocks as blocks

    return blocks.factory(n), blocks.token_loss


def run_case(n: int, fold: bool) -> dict:
    """Plan the n-block model once (folded through `api.plan`, or op by op) and time it."""
    import numpy as np
    from flax import nnx

    from autoshard import api
    from planner.search import plan_graph, trace_model

    factory, loss = _model(n)
    toks = np.random.default_rng(0).integers(0, 64, size=(8, 9)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
    start = time.perf_counter()
    model = nnx.eval_shape(factory)  # the user's model object (shapes only): building it is not planning
    built = time.perf_counter() - start
    start = time.perf_counter()
    if fold:
        plan = api.plan(model, batch, loss_fn=loss, cluster="cpu:8")
    else:
        plan = plan_graph(trace_model(model, batch, loss, fold=False), "cpu:8", 8)
    seconds = time.perf_counter() - start
    start = time.perf_counter()  # the trace alone (jax's make_jaxpr of the loss): O(blocks)
    graph = trace_model(model, batch, loss, fold=fold)
    traced = time.perf_counter() - start
    return {"blocks": n, "folded": fold, "seconds": round(seconds, 2), "trace_seconds": round(traced, 2),
            "build_seconds": round(built, 2),
            "ops": len(graph.ops),
            "mesh": {a: k for a, k in plan.mesh.items() if k > 1} or {"data": 1},
            "step_seconds": plan.predicted["step_seconds"],
            "memory_bytes_per_device": plan.predicted["memory_bytes_per_device"], "params": len(plan.params)}


def main() -> None:
    import jax

    rows = []
    for n in DEPTHS:
        for fold in (True, False):
            try:
                out = subprocess.run([sys.executable, __file__, "--case", str(n), str(int(fold))], check=True,
                                     capture_output=True, text=True, timeout=CAP)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            except subprocess.TimeoutExpired:
                rows.append({"blocks": n, "folded": fold, "seconds": None, "capped_at": CAP})
            print(rows[-1], flush=True)
    folded = {r["blocks"]: r["seconds"] for r in rows if r["folded"]}
    meta = {"command": "XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python "
                       "runs/benchmarks/loop_blocks.py",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)", "jax": jax.__version__,
            "cap_seconds": CAP, "ratio_48_over_4_folded": round(folded[48] / folded[4], 2)}
    (HERE / "loop_blocks.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (HERE / "loop_blocks.md").write_text(_markdown(meta, rows))


def _markdown(meta: dict, rows: list[dict]) -> str:
    """The table of loop_blocks.md."""
    head = [f"# Repeated blocks, solved once\n\n{__doc__.split(chr(10), 2)[2].strip()}\n",
            f"Machine: {meta['machine']}, jax {meta['jax']}. Folded 48 blocks / 4 blocks planning time: "
            f"{meta['ratio_48_over_4_folded']}x.\n",
            "| blocks | graph | ops | build s | plan s | of which trace s | mesh | step s | memory B/device |",
            "|---:|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        graph = "folded" if r["folded"] else "op by op"
        if r["seconds"] is None:
            head.append(f"| {r['blocks']} | {graph} | - | - | > {r['capped_at']:.0f} | - | - | - | - |")
            continue
        mesh = ",".join(f"{a}={k}" for a, k in r["mesh"].items())
        head.append(f"| {r['blocks']} | {graph} | {r['ops']} | {r['build_seconds']} | {r['seconds']} | "
                    f"{r['trace_seconds']} | {mesh} | "
                    f"{r['step_seconds']:.4g} | {r['memory_bytes_per_device']:.0f} |")
    return "\n".join(head) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--case"]:
        print(json.dumps(run_case(int(sys.argv[2]), bool(int(sys.argv[3])))))
    else:
        main()
