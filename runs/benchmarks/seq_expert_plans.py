"""Benchmark: what the planner chooses for long sequences (seq parallelism) and many experts (expert parallelism).

    .venv/bin/python runs/benchmarks/seq_expert_plans.py            # writes seq_expert_plans.{md,json} here

Dense: gpt-6.7b on h100-80g:256 at sequence lengths 2k .. 1M, the batch chosen so every step holds 2^20 tokens
(batch = 2^20 / seq; 1M tokens: batch 1). MoE: moe-8x7b (8 experts, top-2) at batch 256 x seq 4096 on
h100-80g:64 / 256 / 1024. Planning only (no devices needed); the figures are the planner's predictions.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import models  # noqa: E402
from planner.cluster import load_cluster  # noqa: E402
from planner.errors import AutoshardError  # noqa: E402
from planner.search import plan_graph, trace_model  # noqa: E402

HERE = Path(__file__).resolve().parent
TOKENS = 2 ** 20
DENSE = ("gpt-6.7b", "h100-80g:256", [2048, 8192, 32768, 131072, 524288, 1048576])
MOE = ("moe-8x7b", 256, 4096, ["h100-80g:64", "h100-80g:256", "h100-80g:1024"])


def flops_per_device(model: str, batch: int, seq: int, devices: int) -> float:
    """Model FLOPs of one step (6 N per token + attention), per device."""
    cfg = models.config_from_name(model)
    return cfg.flops_per_token(seq) * batch * seq / devices


def one(model: str, cluster: str, batch: int, seq: int) -> dict:
    example = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32) for k in ("inputs", "targets")}
    start = time.perf_counter()
    graph = trace_model(models.abstract(model), example)
    spec = load_cluster(cluster)
    dtype = str(models.abstract(model).cfg.dtype)
    row = {"model": model, "cluster": cluster, "batch": batch, "seq": seq}
    try:
        plan = plan_graph(graph, spec, batch, compute_dtype=dtype, top=3)
    except AutoshardError as e:
        row.update(error=str(e), planning_seconds=round(time.perf_counter() - start, 2))
        return row
    secs = plan.predicted["step_seconds"]
    row.update(mesh={a: n for a, n in plan.mesh.items() if n > 1}, sequence=(plan.sequence or {}).get("method"),
               expert_degree=plan.mesh["expert"], remat=plan.remat, step_seconds=secs,
               tflops_per_device=flops_per_device(model, batch, seq, spec.num_devices) / secs / 1e12,
               memory_gib=plan.predicted["memory_bytes_per_device"] / 2 ** 30,
               comm_bytes=plan.predicted["comm_bytes"], why=plan.provenance.get("seq_expert_choice"),
               planning_seconds=round(time.perf_counter() - start, 2))
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | cluster | batch x seq | mesh | seq method / expert | remat | step (s) | TFLOP/s/dev | "
             "memory (GiB) | plan (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['cluster']} | {r['batch']} x {r['seq']} | no plan: {r['error']} "
                         f"| | | | | | {r['planning_seconds']} |")
            continue
        mesh = ",".join(f"{a}={n}" for a, n in r["mesh"].items()) or "1"
        how = r["sequence"] or (f"expert={r['expert_degree']}" if r["expert_degree"] > 1 else "-")
        lines.append(f"| {r['model']} | {r['cluster']} | {r['batch']} x {r['seq']} | {mesh} | {how} | {r['remat']} | "
                     f"{r['step_seconds']:.3f} | {r['tflops_per_device']:.0f} | {r['memory_gib']:.1f} | "
                     f"{r['planning_seconds']} |")
    return "\n".join(lines)


def main() -> None:
    rows = []
    model, cluster, seqs = DENSE
    only = sys.argv[1:]
    for seq in seqs:
        if not only or str(seq) in only:
            rows.append(one(model, cluster, TOKENS // seq, seq))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    model, batch, seq, clusters = MOE
    for cluster in clusters:
        if not only or cluster in only:
            rows.append(one(model, cluster, batch, seq))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    if only:
        return
    (HERE / "seq_expert_plans.json").write_text(json.dumps(rows, indent=1) + "\n")
    head = (__doc__ or "").strip()
    (HERE / "seq_expert_plans.md").write_text(
        f"# Sequence and expert parallelism plans\n\nCommand: `.venv/bin/python runs/benchmarks/seq_expert_plans.py` "
        f"(planning only, {jax.__version__}).\n\n{head}\n\nTFLOP/s per device: the model's FLOPs per step "
        f"(`ModelConfig.flops_per_token`) over the predicted step time.\n\n{table(rows)}\n")


if __name__ == "__main__":
    main()
