"""`autoshard profile`: measure the local devices (matmul, memory bandwidth, collectives, optionally a model's
layer) and save the figures `autoshard plan --profile FILE` calibrates the cluster with.

    autoshard profile -o prof.json
    autoshard profile -o prof.json --model gpt-tiny           # also the layer's achieved FLOP/s
"""

from __future__ import annotations

import argparse
import sys

from planner.errors import AutoshardError


def add_profile(sub) -> None:
    from autoshard import cli

    p = sub.add_parser("profile", help="measure the local devices (matmul, memory bandwidth, collectives)",
                       description="Time matmuls, an elementwise op and collectives on the local devices, fit the "
                                   "cost model's figures and save them; `autoshard plan --profile FILE` then plans "
                                   "with the measured figures instead of datasheet ones.")
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="where to write the profile JSON")
    p.add_argument("--model", help="also time this model's layer body (at a quarter, half and all of --batch); "
                                   "plans then price layer compute at the rate it achieves")
    p.add_argument("--batch", type=int, default=16, help="batch for the layer timings (default 16)")
    p.add_argument("--seq", type=int, default=128, help="sequence length for the layer timings (default 128)")
    cli.add_device_args(p)


def _rate(x: float, unit: str) -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def cmd_profile(args: argparse.Namespace) -> int:
    from autoshard import cli, explain
    from planner.profile import run_profile

    devices = cli.setup_devices(args)
    print(f"profiling {len(devices)} {devices[0].platform} device(s) ({devices[0].device_kind}) ...", file=sys.stderr)
    prof = run_profile(devices)
    if args.model:
        import models
        from planner.profile import measure_layers
        from planner.search import layer_bodies

        if args.batch < 1 or args.seq < 1:
            raise AutoshardError("--batch and --seq must be positive")
        sizes = sorted({max(1, args.batch // 4), max(1, args.batch // 2), args.batch})
        batches = [cli.token_batch(b, args.seq) for b in sizes]
        measure_layers(layer_bodies(models.abstract(args.model), batches, name=f"layer {args.model}"), prof, devices)
    try:
        prof.save(args.output)
    except OSError as e:
        raise AutoshardError(f"cannot write profile file {args.output}: {e.strerror or e}") from None
    rows = [[f"matmul {dt}", f"{_rate(e['flops'], 'FLOP/s')} per device"] for dt, e in prof.matmul.items()]
    rows.append(["memory bandwidth", f"{_rate(prof.memory_bandwidth, 'B/s')} per device"])
    if prof.link:
        ln = prof.link
        rows.append(["collectives (fit)", f"{explain.format_seconds(ln.get('overhead', 0))} per op + "
                                          f"{explain.format_seconds(ln.get('latency', 0))} per ring step + bytes / "
                                          f"{_rate(ln.get('bandwidth', 0), 'B/s')}"])
    for kind, c in prof.collectives.items():
        rows.append([f"  {kind} (n={c['n']})", f"{explain.format_seconds(c['fixed'])} + bytes / "
                                               f"{_rate(c['bandwidth'], 'B/s')}"])
    if not prof.collectives:
        rows.append(["collectives", "not measured (one device)"])
    for key, entries in prof.layers.items():
        for e in entries:
            rows.append([f"{key} b={e.get('batch')} s={e.get('seq')}",
                         f"{explain.format_seconds(e['seconds'])} = {_rate(e.get('rate', 0), 'FLOP/s')} per device"])
    print(f"{prof.describe()} (measured in {prof.seconds:.1f} s):")
    print("\n".join(explain.table(rows)))
    print(f"wrote {args.output}; plan with it: autoshard plan --profile {args.output}")
    return 0
