"""The zero-bubble schedules ("zb", "zb-h1") against 1F1B: the bubble of the tick tables, the planner's prices, and
the compiled programs.

Three parts:

1. Tables (`planner.schedule.make_schedule`): ticks and lockstep step time in units of one layer-stage forward, with
   the usual unit costs F = B = W = 1 (1F1B's backward is B + W = 2 in one tick), for pipe P and microbatches M. The
   bubble is the step minus the 3M units of work every device does. zb defers a W only into a tick its device would
   idle (one grad slot); zb-h1 (ZB-H1) bounds every device by device 0's in-flight count, so the later devices
   defer their Ws (up to P grad slots) for 3M + P - 1 ticks.
2. The planner (`autoshard.api.plan` with schedule zb fixed, then the same plan re-predicted under 1F1B and
   zb-h1): the predicted step, bubble and memory per device of gpt-tiny:layers=8 on cpu:8 and of gpt-6.7b on
   a100-80g:64.
3. Compiled (8 emulated CPU devices, `autoshard.analysis.analyze`): gpt-tiny:layers=8 on pipe=4 x data=2 with 8
   microbatches under the three schedules: work over the devices against the single-device step's, the FLOPs of each
   device, the collective-permute bytes, and memory compiled against predicted.

Reproduce (from the repository root; about a minute on 2 CPU cores):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python runs/benchmarks/zero_bubble.py

Writes zero_bubble.json and zero_bubble.md next to this file.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import models  # noqa: E402
from autoshard import api  # noqa: E402
from autoshard.analysis import analyze  # noqa: E402
from autoshard.train import make_optimizer, parallelize  # noqa: E402
from planner.schedule import make_schedule, step_time  # noqa: E402

TABLES = [(2, 4), (4, 4), (4, 8), (4, 16), (8, 8), (8, 16), (8, 32), (16, 32), (16, 64)]
PLANNED = [  # (model, cluster, mesh, microbatches, batch, seq)
    ("gpt-tiny:layers=8", "cpu:8", {"pipe": 4, "data": 2}, 8, 16, 64),
    ("gpt-6.7b", "a100-80g:64", {"pipe": 8, "data": 2, "tensor": 4}, 16, 32, 2048),
]
COMPILED = ("gpt-tiny:layers=8", "pipe=4,data=2", 8, 16, 64)


def shapes(batch: int, seq: int) -> dict:
    return {k: jax.ShapeDtypeStruct((batch, seq), np.int32) for k in ("inputs", "targets")}


def tables() -> list[dict]:
    rows = []
    for P, M in TABLES:
        one, zb, h1 = (make_schedule(k, P, M, stash=True) for k in ("1f1b", "zb", "zb-h1"))
        ones = np.ones(P)
        s1, sz, sh = step_time(one, ones, 2 * ones), step_time(zb, ones, ones, wgt=ones), \
            step_time(h1, ones, ones, wgt=ones)
        rows.append(dict(P=P, M=M, ticks_1f1b=one.ticks, ticks_zb=zb.ticks, ticks_h1=h1.ticks, step_1f1b=s1,
                         step_zb=sz, step_h1=sh, bubble_1f1b=s1 - 3 * M, bubble_zb=sz - 3 * M, bubble_h1=sh - 3 * M,
                         stash_slots_1f1b=one.stash_slots, stash_slots_zb=zb.stash_slots,
                         stash_slots_h1=h1.stash_slots, grad_slots_zb=zb.grad_slots, grad_slots_h1=h1.grad_slots))
    return rows


def planned() -> list[dict]:
    rows = []
    for model_name, cluster, mesh, M, batch, seq in PLANNED:
        model = models.abstract(model_name)
        start = time.perf_counter()
        zb = api.plan(model, shapes(batch, seq), cluster=cluster, mesh=mesh, schedule="zb", microbatches=M)
        seconds = time.perf_counter() - start
        others = {}
        for kind in ("1f1b", "zb-h1"):
            other = dataclasses.replace(zb, pipeline=dataclasses.replace(zb.pipeline, schedule=kind))
            others[kind] = api.predict(other, model, shapes(batch, seq), cluster=cluster)
        row = dict(model=model_name, cluster=cluster, mesh=dict(zb.mesh), microbatches=M, remat=zb.remat,
                   stages=zb.pipeline.stages, planning_s=round(seconds, 2))
        for name, p in (("zb", zb.predicted), *others.items()):
            row[name] = dict(step_s=p["step_seconds"], bubble_s=p["time_breakdown"]["pipeline bubble"],
                             compute_s=p["time_breakdown"]["compute"], memory=p["memory_bytes_per_device"],
                             ticks=p["pipeline"]["ticks"])
        rows.append(row)
    return rows


def compiled() -> dict:
    model_name, mesh, M, batch, seq = COMPILED
    toks = np.random.default_rng(0).integers(0, 256, size=(batch, seq + 1)).astype(np.int32)
    tokens = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
    abstract, built = models.abstract(model_name), models.create(model_name, 0)
    single = parallelize(built, make_optimizer(), api.rule_plan(abstract, "data=1"), devices=jax.devices()[:1])
    one = analyze(single.compile(tokens), single.mesh)["flops_per_device"]
    out = {"single_device_flops": one}
    for schedule in ("1f1b", "zb", "zb-h1"):
        spec = api.pipeline_spec(abstract, 4, schedule=schedule, microbatches=M)
        plan = api.rule_plan(abstract, mesh, pipeline=spec)
        predicted = api.predict(plan, abstract, shapes(batch, seq), "cpu:8")
        trainer = parallelize(built, make_optimizer(), plan, devices=jax.devices()[:plan.num_devices])
        stats = analyze(trainer.compile(tokens), trainer.mesh)
        out[schedule] = dict(work_ratio=sum(stats["flops_by_device"]) / one, flops_by_device=stats["flops_by_device"],
                             branches_exact=stats["branches_exact"],
                             permute_bytes=stats["comm_bytes"].get("pipe/collective-permute", 0.0),
                             predicted_permute_bytes=predicted["comm_bytes"].get("pipe/collective-permute", 0.0),
                             memory_compiled=stats["memory_bytes_per_device"],
                             memory_predicted=predicted["memory_bytes_per_device"])
    return out


def report(meta: dict, t: list[dict], p: list[dict], c: dict) -> list[str]:
    mib = 2 ** 20
    lines = ["# Zero-bubble schedule (zb) against 1F1B", "",
             "Command: `XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python "
             "runs/benchmarks/zero_bubble.py`", "",
             f"Machine: {meta['machine']}; jax {meta['jax']}; git {meta['git']}; {meta['date']}; whole run "
             f"{meta['seconds']:.0f} s.", "",
             "## Tables: lockstep step in units of one forward (F = B = W = 1; 1F1B's fused backward 2)", "",
             "zb keeps 1F1B's F / B order and its in-flight bound (the same residual slots), and runs each W where "
             "the device would otherwise idle: its bubble is (P - 1)(F + B) where 1F1B's is (P - 1)(F + B + W). "
             "zb-h1 (ZB-H1) bounds every device by device 0's in-flight count, so the later devices defer their Ws "
             "(up to P grad slots a device): 3M + P - 1 ticks, a bubble of P - 1.", "",
             "| P | M | ticks 1F1B / zb / zb-h1 | step 1F1B / zb / zb-h1 | bubble 1F1B / zb / zb-h1 | "
             "residual slots 1F1B / zb / zb-h1 | grad slots zb / zb-h1 |", "|---:|---:|---|---|---|---|---|"]
    for r in t:
        lines.append(f"| {r['P']} | {r['M']} | {r['ticks_1f1b']} / {r['ticks_zb']} / {r['ticks_h1']} | "
                     f"{r['step_1f1b']:.0f} / {r['step_zb']:.0f} / {r['step_h1']:.0f} | {r['bubble_1f1b']:.0f} / "
                     f"{r['bubble_zb']:.0f} / {r['bubble_h1']:.0f} | {r['stash_slots_1f1b']} / {r['stash_slots_zb']} / "
                     f"{r['stash_slots_h1']} | {r['grad_slots_zb']} / {r['grad_slots_h1']} |")
    lines += ["", "## Planner: the same plan under each schedule", "",
              "Planned with `--schedule zb` fixed (the search picks the rest), then re-predicted with the schedule "
              "set to 1F1B and to zb-h1. W per layer is each weight op's forward (`planner.stages.zb_ticks`); memory "
              "adds the grad slots (what a B saves for its W, counted from the traced graph).", "",
              "| model | cluster | mesh | M | schedule | step | bubble | memory | planning |",
              "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in p:
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
        a = r["1f1b"]
        for kind in ("1f1b", "zb", "zb-h1"):
            b = r[kind]
            vs = "" if kind == "1f1b" else f" ({b['step_s'] / a['step_s'] - 1:+.1%})"
            lines.append(f"| {r['model']} | {r['cluster']} | {mesh} | {r['microbatches']} | {kind} | "
                         f"{b['step_s'] * 1e3:.2f} ms{vs} | {b['bubble_s'] * 1e3:.2f} ms | {b['memory'] / mib:.1f} MiB "
                         f"| {r['planning_s']:.1f} s |")
    model_name, mesh, M, batch, seq = COMPILED
    lines += ["", f"## Compiled: {model_name}, {mesh}, {M} microbatches, batch {batch} x {seq}", "",
              "Work ratio: compiled FLOPs summed over the 8 devices / the single-device step's (B and W split "
              "with no equation run twice: 1.00).", "",
              "| schedule | work ratio | FLOPs per device (min-max) | collective-permute compiled / predicted | "
              "memory compiled | memory predicted | error |", "|---|---:|---|---|---:|---:|---:|"]
    for s in ("1f1b", "zb", "zb-h1"):
        r = c[s]
        lo, hi = min(r["flops_by_device"]), max(r["flops_by_device"])
        lines.append(f"| {s} | {r['work_ratio']:.3f} | {lo / 1e6:.0f}-{hi / 1e6:.0f} M | "
                     f"{r['permute_bytes'] / 2**10:.0f} / {r['predicted_permute_bytes'] / 2**10:.0f} KiB | "
                     f"{r['memory_compiled'] / mib:.2f} MiB | {r['memory_predicted'] / mib:.2f} MiB | "
                     f"{r['memory_predicted'] / r['memory_compiled'] - 1:+.1%} |")
    return lines + [""]


def main() -> None:
    start = time.perf_counter()
    t, p, c = tables(), planned(), compiled()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} cores",
                jax=jax.__version__, git=commit, seconds=round(time.perf_counter() - start, 1))
    (HERE / "zero_bubble.json").write_text(json.dumps({"meta": meta, "tables": t, "planned": p, "compiled": c},
                                                      indent=1) + "\n")
    (HERE / "zero_bubble.md").write_text("\n".join(report(meta, t, p, c)))
    print("\n".join(report(meta, t, p, c)))


if __name__ == "__main__":
    main()
