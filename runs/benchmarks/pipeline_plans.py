"""What the planner chooses once pipelines are in its search: GPT-3-family models on A100 clusters of 64 to 3072.

Reproduce (from the repository root; about 2-4 minutes on 2 CPU cores):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python runs/benchmarks/pipeline_plans.py

Writes runs/benchmarks/pipeline_plans.json and runs/benchmarks/pipeline_plans.md next to this file.

Every case plans `models.abstract(name)` (shapes only) with `autoshard.api.plan` for GPT-3's batch, 1536 sequences
of 2048 tokens, at every cluster size (a fixed batch: the larger clusters must use pipe or tensor to spread it, as
data x fsdp can be at most 1536), on `a100-80g:N` with plan()'s default memory budget. Columns: the chosen mesh,
the pipeline (schedule, microbatches M, virtual stages V, layers per stage), predicted step seconds, predicted
TFLOP/s per device = model FLOPs per step (`cfg.flops_per_token(seq)` x tokens: forward + backward, the pipeline's
recompute not counted) / step seconds / devices, the predicted bubble (the share of the predicted step the devices
wait in the pipeline loop) and, in brackets, the schedule table's idle fraction of device-ticks with unit ops
(1 - 2MV/T), predicted memory per device, the best plan without a pipeline (its step seconds), and planning wall time.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import models  # noqa: E402
from autoshard import api  # noqa: E402
from planner.errors import AutoshardError  # noqa: E402
from planning_time import git_head  # noqa: E402

SEQ = 2048
BATCH = 1536
MODELS = ["gpt-1.3b", "gpt-6.7b", "gpt-13b", "gpt-175b"]
CLUSTERS = [64, 256, 1024, 3072]
COMMAND = "XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python runs/benchmarks/pipeline_plans.py"
GiB = 1 << 30


def run_case(name: str, n: int) -> dict:
    cfg = models.config_from_name(name)
    row = {"model": name, "layers": cfg.layers, "devices": n, "batch": BATCH, "seq": SEQ}
    x = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
    t0 = time.perf_counter()
    try:
        plan = api.plan(models.abstract(name), {"inputs": x, "targets": x}, cluster=f"a100-80g:{n}")
    except AutoshardError as e:
        row.update(plan_s=round(time.perf_counter() - t0, 2), error=str(e))
        return row
    row["plan_s"] = round(time.perf_counter() - t0, 2)
    pred = plan.predicted
    step = pred["step_seconds"]
    why = plan.provenance.get("pipeline_choice", {})
    without = why.get("best_without_pipeline", {})
    row.update(mesh={a: k for a, k in plan.mesh.items() if k > 1}, remat=plan.remat, step_s=round(step, 3),
               tflops_per_device=round(cfg.flops_per_token(SEQ) * BATCH * SEQ / step / n / 1e12, 1),
               memory_gib=round(pred["memory_bytes_per_device"] / GiB, 1),
               no_pipeline_step_s=round(without["step_seconds"], 3) if without.get("fits") else None,
               no_pipeline_mesh=without.get("mesh"), meshes_considered=plan.provenance["solver"]["meshes_considered"])
    if plan.pipeline is not None:
        pl = pred["pipeline"]
        row.update(schedule=pl["schedule"], microbatches=pl["microbatches"], virtual=pl["virtual"],
                   stage_layers=[e - s for s, e in pl["stages"]], ticks=pl["ticks"], bubble=round(pl["bubble"], 3),
                   table_idle=round(pl["table_idle"], 3),
                   permute_gib=round(pred["comm_bytes"].get("pipe/collective-permute", 0) / GiB, 2))
    return row


def layers_text(counts: list[int]) -> str:
    """6x16 for 16 stages of 6 layers; 7,6x14,5 when uneven."""
    out, k = [], 0
    while k < len(counts):
        j = k
        while j < len(counts) and counts[j] == counts[k]:
            j += 1
        out.append(f"{counts[k]}x{j - k}" if j - k > 1 else str(counts[k]))
        k = j
    return ",".join(out)


def fmt_table(rows: list[dict]) -> str:
    head = ("| model | devices | mesh | pipeline (schedule, M, V, layers/stage) | step s | TFLOP/s/dev | bubble "
            "(table) | memory GiB | best without pipeline | plan s |")
    lines = [head, "|---|---:|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['devices']} | error: {r['error']} | | | | | | | {r['plan_s']} |")
            continue
        mesh = ",".join(f"{a}={k}" for a, k in r["mesh"].items())
        pipe = (f"{r['schedule']}, M={r['microbatches']}, V={r['virtual']}, {layers_text(r['stage_layers'])}"
                if r.get("schedule") else "none")
        bubble = f"{r['bubble']:.1%} ({r['table_idle']:.1%})" if r.get("schedule") else "-"
        without = (f"{','.join(f'{a}={k}' for a, k in (r['no_pipeline_mesh'] or {}).items())} "
                   f"{r['no_pipeline_step_s']} s" if r.get("no_pipeline_step_s") is not None else "does not fit")
        lines.append(f"| {r['model']} | {r['devices']} | {mesh} | {pipe} | {r['step_s']} | "
                     f"{r['tflops_per_device']} | {bubble} | {r['memory_gib']} | {without} | {r['plan_s']} |")
    return "\n".join(lines)


def main() -> None:
    x = jax.ShapeDtypeStruct((64, 64), jnp.int32)
    api.plan(models.abstract("gpt-tiny"), {"inputs": x, "targets": x}, cluster="cpu:8")  # warm tracing caches
    rows = []
    start = time.perf_counter()
    for name in MODELS:
        for n in CLUSTERS:
            row = run_case(name, n)
            print(json.dumps(row), flush=True)
            rows.append(row)
    elapsed = time.perf_counter() - start
    doc = __doc__.split("\n\n")
    md = ["# Pipeline plans", "", "Reproduce:", "", f"    {COMMAND}", "", *[p.replace("\n", " ") + "\n" for p in
                                                                          doc[3:]],
          f"Machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}; git {git_head()}. "
          f"Whole sweep: {elapsed:.1f} s.", "", fmt_table(rows), ""]
    (HERE / "pipeline_plans.md").write_text("\n".join(md))
    (HERE / "pipeline_plans.json").write_text(json.dumps(
        {"command": COMMAND, "git": git_head(), "batch": BATCH, "seq": SEQ, "sweep_seconds": round(elapsed, 2),
         "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
