"""Planning time of a model whose blocks are a Python loop, folded into a layer stack (issue 11, item 5) vs op by op.

Reproduce (from the repository root; about 5-8 minutes on 2 CPU cores):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python runs/benchmarks/loop_blocks.py

Writes runs/benchmarks/loop_blocks.json and runs/benchmarks/loop_blocks.md next to this file.

The model: token embedding -> n pre-norm blocks (LayerNorm -> nnx.MultiHeadAttention -> residual -> LayerNorm ->
MLP -> residual) in `nnx.List`, run by `for b in self.blocks` -> final LayerNorm -> head; d_model 16, MLP 32,
2 heads, vocabulary 64, batch 8 x 8 tokens. "plan s" times `autoshard.api.plan(model, batch, loss_fn=...,
cluster="cpu:8")` (free search) on the model object built beforehand (`nnx.eval_shape`, timed apart as "build s":
constructing 48 NNX blocks is the user's cost, not the planner's); "op by op" is the same search on the unfolded
trace (`trace_model(..., fold=False)` then `plan_graph`, what `api.plan` did before folding). Each case runs in a
subprocess of its own, cut off after CAP seconds (reported as "> CAP"); the folded cases run REPEATS times each,
the depths in turns, and "plan s" is the median, the machine being shared ("plan CPU s": the median CPU time, which
other processes on the machine inflate less than the wall time). "of which trace s" times `trace_model` alone
(a second trace in the same process); "of which jax s" times apart what that trace spends in jax's `make_jaxpr` of
the loss (the model's forward, traced with flax's `nnx.merge` as `trace_model` does); the rest of the trace is flax's
`nnx.split` and parameter table and the planner's own walk, batch propagation and fold. The trace still grows with
depth (the forward has n blocks to trace), the search does not.
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
REPEATS = 5
"""Runs of each folded case (each in a fresh subprocess); the table gives the median."""


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
    start, cpu = time.perf_counter(), time.process_time()
    if fold:
        plan = api.plan(model, batch, loss_fn=loss, cluster="cpu:8")
    else:
        plan = plan_graph(trace_model(model, batch, loss, fold=False), "cpu:8", 8)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()  # the trace alone (jax's make_jaxpr of the loss and the walk over it): O(blocks)
    graph = trace_model(model, batch, loss, fold=fold)
    traced = time.perf_counter() - start
    return {"blocks": n, "folded": fold, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "trace_seconds": round(traced, 2),
            "jax_seconds": round(_make_jaxpr_seconds(model, batch, loss), 2), "build_seconds": round(built, 2),
            "ops": len(graph.ops),
            "mesh": {a: k for a, k in plan.mesh.items() if k > 1} or {"data": 1},
            "step_seconds": plan.predicted["step_seconds"],
            "memory_bytes_per_device": plan.predicted["memory_bytes_per_device"], "params": len(plan.params)}


def _make_jaxpr_seconds(model, batch, loss_fn) -> float:
    """Seconds jax's `make_jaxpr` takes over the loss as `planner.search.trace_model` writes it (a fresh function:
    jax caches the trace of one it has seen)."""
    import jax
    import numpy as np
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, inputs):
        out = loss_fn(nnx.merge(graphdef, params, inputs["rest"], copy=True), inputs["batch"])
        return out[0] if isinstance(out, tuple) else out

    def shape(x):
        return x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(np.shape(x), x.dtype)

    inputs = {"batch": jax.tree.map(shape, batch), "rest": jax.tree.map(shape, rest)}
    start = time.perf_counter()
    jax.make_jaxpr(loss)(jax.tree.map(shape, params), inputs)
    return time.perf_counter() - start


def _run(n: int, fold: bool) -> dict:
    """One case in a subprocess of its own."""
    try:
        out = subprocess.run([sys.executable, __file__, "--case", str(n), str(int(fold))], check=True,
                             capture_output=True, text=True, timeout=CAP)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {"blocks": n, "folded": fold, "seconds": None, "capped_at": CAP}


def main() -> None:
    import jax

    load = [round(x, 1) for x in os.getloadavg()]
    runs: dict[tuple[int, bool], list[dict]] = {}
    for _ in range(REPEATS):  # the folded cases in turns, so a change in the machine's load hits every depth alike
        for n in DEPTHS:
            runs.setdefault((n, True), []).append(_run(n, True))
            print(runs[n, True][-1], flush=True)
    for n in DEPTHS:
        runs[n, False] = [_run(n, False)]
        print(runs[n, False][-1], flush=True)
    rows = []
    for n in DEPTHS:
        for fold in (True, False):
            timed = sorted((r for r in runs[n, fold] if r["seconds"] is not None), key=lambda r: r["seconds"])
            row = timed[len(timed) // 2] if timed else runs[n, fold][0]  # the median run
            if fold and timed:  # the CPU time is the median of its own
                cpus = sorted(r["cpu_seconds"] for r in timed)
                row = {**row, "cpu_seconds": cpus[len(cpus) // 2],
                       "runs_seconds": [r["seconds"] for r in runs[n, fold]],
                       "runs_cpu_seconds": [r.get("cpu_seconds") for r in runs[n, fold]]}
            rows.append(row)
    folded = {r["blocks"]: r["seconds"] for r in rows if r["folded"]}
    cpu = {r["blocks"]: r["cpu_seconds"] for r in rows if r["folded"]}
    meta = {"command": "XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python "
                       "runs/benchmarks/loop_blocks.py",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)", "jax": jax.__version__,
            "load_average_before_after": [load, [round(x, 1) for x in os.getloadavg()]],
            "cap_seconds": CAP, "repeats_folded": REPEATS,
            "ratio_48_over_4_folded": round(folded[48] / folded[4], 2),
            "cpu_ratio_48_over_4_folded": round(cpu[48] / cpu[4], 2)}
    (HERE / "loop_blocks.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (HERE / "loop_blocks.md").write_text(_markdown(meta, rows))


def _markdown(meta: dict, rows: list[dict]) -> str:
    """The table of loop_blocks.md."""
    head = [f"# Repeated blocks, solved once\n\n{__doc__.split(chr(10), 2)[2].strip()}\n",
            f"Machine: {meta['machine']}, load average (1, 5, 15 min) {meta['load_average_before_after'][0]} "
            f"before and {meta['load_average_before_after'][1]} after, jax {meta['jax']}. Folded 48 blocks / 4 "
            f"blocks planning time: {meta['ratio_48_over_4_folded']}x ({meta['cpu_ratio_48_over_4_folded']}x in "
            f"CPU time).\n",
            "| blocks | graph | ops | build s | plan s (runs) | plan CPU s | of which trace s | of which jax s | "
            "mesh | step s | memory B/device |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        graph = "folded" if r["folded"] else "op by op"
        if r["seconds"] is None:
            head.append(f"| {r['blocks']} | {graph} | - | - | > {r['capped_at']:.0f} | - | - | - | - | - | - |")
            continue
        mesh = ",".join(f"{a}={k}" for a, k in r["mesh"].items())
        runs = f" ({', '.join(map(str, r['runs_seconds']))})" if "runs_seconds" in r else ""
        head.append(f"| {r['blocks']} | {graph} | {r['ops']} | {r['build_seconds']} | {r['seconds']}{runs} | "
                    f"{r['cpu_seconds']} | {r['trace_seconds']} | {r['jax_seconds']} | {mesh} | "
                    f"{r['step_seconds']:.4g} | {r['memory_bytes_per_device']:.0f} |")
    return "\n".join(head) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--case"]:
        print(json.dumps(run_case(int(sys.argv[2]), bool(int(sys.argv[3])))))
    else:
        main()
