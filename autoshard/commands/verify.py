"""`autoshard verify PLAN [--plot FILE.png]`: compile a plan here and judge its predictions against the program.

    autoshard verify plan.json                   # predicted vs compiled memory and bytes per axes/collective
    autoshard verify plan.json --plot check.png  # the same comparison drawn, with the tolerance bands

The model, batch and sequence length come from the plan's provenance (or --model / --batch / --seq); the predictions
are the plan's own when the workload is the one it was made for, else `autoshard.api.predict`'s for the local
devices. Exit status 0 on PASS, 1 on FAIL, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from autoshard import argtypes
from planner.errors import AutoshardError


def add_verify(sub) -> None:
    from autoshard import cli

    p = sub.add_parser("verify", help="compile a plan on the local devices and check the planner's predictions",
                       description="Rebuild the model named in the plan's provenance, compile one train step laid out "
                                   "by the plan on the local (emulated) devices, and compare the planner's predicted "
                                   "per-device memory and communication bytes with the compiled program's. Judged: "
                                   "memory within 10%%, total communication and every axes/collective key with at "
                                   "least 5%% of the total within 10%%. Exit status 0 on PASS, 1 on FAIL.")
    p.add_argument("plan", metavar="PLAN", help="a plan JSON file")
    p.add_argument("--model", default=None, help="override the model of the plan's provenance")
    p.add_argument("--batch", type=argtypes.positive_int, default=None, help="override the provenance batch size")
    p.add_argument("--seq", type=argtypes.positive_int, default=None, help="override the provenance sequence length")
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object on stdout")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also draw predicted against compiled bytes per figure, and each error inside its "
                        "tolerance band")
    cli.add_device_args(p)


def _workload(args: argparse.Namespace, plan) -> tuple[str, int, int]:
    """(model, batch, seq): the flags, else the plan's provenance."""
    prov = plan.provenance
    model, batch, seq = (args.model or prov.get("model"), args.batch or prov.get("batch"),
                         args.seq or prov.get("seq"))
    missing = [f"--{k}" for k, v in (("model", model), ("batch", batch), ("seq", seq)) if not v]
    if missing:
        what = ", ".join(m[2:] for m in missing)
        raise AutoshardError(f"{args.plan}: the plan's provenance does not record its {what}: pass {' '.join(missing)}")
    return str(model), int(batch), int(seq)


def _devices(args: argparse.Namespace, plan) -> list:
    from autoshard import cli

    devices = cli.setup_devices(args)
    if plan.num_devices > len(devices):
        raise AutoshardError(f"verify needs as many devices as the plan's mesh: {plan.mesh_string()} has "
                             f"{plan.num_devices} devices but {len(devices)} are available here; pass --devices "
                             f"{plan.num_devices} (emulated CPU devices) or verify on a machine with that many")
    return devices[:plan.num_devices]


def _predictions(plan, model: str, batch: int, seq: int, devices: list) -> tuple[dict, str]:
    """(predicted figures, where they come from): the plan's own for its own workload, else a fresh prediction."""
    import models
    from autoshard import cli
    from autoshard.api import local_cluster, predict

    prov = plan.provenance
    if plan.predicted and (model, batch, seq) == (prov.get("model"), prov.get("batch"), prov.get("seq")):
        return plan.predicted, "the plan"
    cluster = local_cluster(len(devices))
    predicted = predict(plan, models.abstract(models.config_from_name(model)), cli.token_batch(batch, seq),
                        cluster=cluster)
    return predicted, f"autoshard.api.predict for {cluster.label}"


def _compile(cfg, plan, devices: list, batch: int, seq: int) -> tuple[dict, float]:
    """(`autoshard.analysis.analyze` of the compiled train step for a random token batch, seconds it took)."""
    import numpy as np

    import models
    from autoshard.analysis import analyze
    from autoshard.train import make_optimizer, parallelize

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab, size=(batch, seq + 1)).astype(np.int32)
    real = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    t0 = time.perf_counter()
    trainer = parallelize(models.factory(cfg), make_optimizer(), plan, devices=devices)
    stats = analyze(trainer.compile(real), trainer.mesh)
    return stats, time.perf_counter() - t0


def _print_text(plan, stats: dict, seconds: float, result: dict) -> None:
    from autoshard import analysis, comparison, explain

    mem = stats["memory"]
    print(f"compiled in {seconds:.1f} s; memory/device = argument {explain.format_bytes(mem['argument'])} + "
          f"output {explain.format_bytes(mem['output'])}\n  + temp {explain.format_bytes(mem['temp'])} - "
          f"alias {explain.format_bytes(mem['alias'])}")
    if line := analysis.peak_line(stats):
        print("  " + line)
    print(comparison.format_comparison(result))
    if plan.pipeline is not None:
        print("note: pipeline plan: tensor/*, seq/* and expert/* collectives run inside the executor's "
              "lax.switch branches, where the planner does not yet price them kind by kind as XLA compiles "
              "them, so they are shown, not judged")


def cmd_verify(args: argparse.Namespace) -> int:
    import models
    from autoshard import cli, emit
    from autoshard.verification import compare_compiled
    from planner.plan import Plan

    plan = Plan.load(args.plan)
    if args.plot:
        from autoshard import figures

        figures.check_target(args.plot)  # before the compile, not after
    model, batch, seq = _workload(args, plan)
    cfg = models.config_from_name(model)
    devices = _devices(args, plan)
    emit.check_batch(plan, cli.token_batch(batch, seq))
    predicted, predicted_source = _predictions(plan, model, batch, seq, devices)
    where = f"{len(devices)} {devices[0].platform} device(s)"
    if not args.json:
        print(f"verify {args.plan}: {cfg.name}, batch {batch} x seq {seq}\n"
              f"mesh {plan.mesh_string()} (remat {plan.remat}) on {where}; predictions from {predicted_source}",
              flush=True)
        print("compiling the train step ...", file=sys.stderr, flush=True)
    stats, seconds = _compile(cfg, plan, devices, batch, seq)
    result = compare_compiled(plan, predicted, stats)
    if args.json:
        print(json.dumps({"plan": str(args.plan), "model": cfg.name, "batch": batch, "seq": seq,
                          "mesh": {a: n for a, n in plan.mesh.items() if n > 1}, "remat": plan.remat,
                          "devices": len(devices), "platform": devices[0].platform,
                          "predicted_source": predicted_source, **result, "compiled_memory": stats["memory"],
                          "compile_seconds": round(seconds, 2)}, indent=1))
    else:
        _print_text(plan, stats, seconds, result)
    if args.plot:
        title = f"{args.plan}: {cfg.name}, batch {batch} x seq {seq}, mesh {plan.mesh_string()} on {where}"
        print(plot_verification(result, args.plot, title), file=sys.stderr if args.json else sys.stdout)
    return 0 if result["pass"] else 1


def plot_verification(result: dict, path: str, title: str) -> str:
    """Draw a `compare` result to `path` (atomically); the line that says what was written."""
    from autoshard import figures

    fig = figures.verify_figure(result, title=title)
    figures.save(fig, path)
    w, h = figures.pixel_size(fig)
    return f"wrote {path} ({w} x {h} px: predicted against compiled bytes, errors within their tolerance bands)"
