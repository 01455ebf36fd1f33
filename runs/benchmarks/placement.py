"""Expert placement: round robin vs greedy vs ILP on synthetic routing traces with planted inter-layer affinity.

Reproduce (from the repository root; about 2-3 minutes on 2 CPU cores):

    .venv/bin/python runs/benchmarks/placement.py

Writes runs/benchmarks/placement.json and runs/benchmarks/placement.md next to this file.

Each case draws `planner.placement.synthetic_trace(layers, experts, tokens, k=2, affinity, seed=0)`: layer 0 picks
k distinct experts per token uniformly; in each later layer a token follows its experts' planted partners (a random
permutation per layer) with probability `affinity`, else picks uniformly. All hop counts use all k x k pairs of a
token's choices in consecutive layers. For each placer: cross-device and cross-node fractions of those hops and
the worst layer's max rank load over the mean rank load. round_robin is the layout without placement (expert e on
rank e // (E/ep), contiguous sharding); greedy is balanced packing with affinity tie-breaking; ilp is CP-SAT
(2 workers, time limit 10 s for the whole call, balance bound 1.10, node weight 4) started from the greedy
placement improved by per-layer exact re-placement sweeps; "= sweep" marks cases where the search found nothing
better than that start. "cut" is 1 - ilp / round_robin cross-device fraction. "planted" is the cross-device
fraction the planted placement (every expert next to its partner) would have in expectation,
1 - [a (1/k + (1 - 1/k)(E/ep - 1)/(E - 1)) + (1 - a)/ep]: a reference, not a bound (at affinity 0 any placement
is at chance, 1 - 1/ep). "gap" is (objective - bound) / objective of CP-SAT when not proven optimal.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT)]

import ortools  # noqa: E402

from planner import placement as pl  # noqa: E402

K = 2
TIME_LIMIT = 10.0
CASES = [  # (layers, experts, ep, nodes, tokens, affinity)
    *[(8, 8, 4, n, 4096, a) for n in (1, 2) for a in (0.0, 0.5, 0.9)],
    *[(8, 16, ep, 2, 4096, a) for ep in (4, 8) for a in (0.5, 0.9)],
    *[(4, 64, 8, n, 16384, 0.9) for n in (1, 2)],
]


def planted(experts: int, ep: int, a: float, k: int = K) -> float:
    """Expected cross-device fraction of the planted placement (see the module docstring)."""
    same = a * (1 / k + (1 - 1 / k) * (experts / ep - 1) / (experts - 1)) + (1 - a) / ep
    return 1 - same


def run_case(layers: int, experts: int, ep: int, nodes: int, tokens: int, a: float) -> dict:
    trace = pl.synthetic_trace(layers, experts, tokens, K, a, seed=0)
    r = pl.Routing.from_trace(trace)
    t0 = time.perf_counter()
    res = pl.ilp(r, ep, nodes, time_limit=TIME_LIMIT)
    placements = {"round_robin": pl.round_robin(layers, experts, ep), "greedy": pl.greedy(r, ep, nodes),
                  "ilp": res.placement}
    row: dict = {"layers": layers, "experts": experts, "ep": ep, "nodes": nodes, "tokens": tokens, "k": K,
                 "affinity": a, "planted_cross_device": planted(experts, ep, a)}
    for name, p in placements.items():
        m = pl.metrics(p, r, ep, nodes)
        m.pop("placement")
        row[name] = {**m, "objective": pl.objective(p, r, ep, nodes)}
    row["ilp"].update({"optimal": res.optimal, "status": res.status, "seconds": round(time.perf_counter() - t0, 2),
                       "bound": res.bound, "gap": (res.objective - res.bound) / res.objective if res.objective else 0,
                       **{k: res.stats[k] for k in ("formulation", "variables", "constraints", "hint_objective",
                                                   "sweep_objective")}})
    rr = row["round_robin"]["cross_device_fraction"]
    row["cut_vs_round_robin"] = 1 - row["ilp"]["cross_device_fraction"] / rr if rr else 0.0
    return row


def fmt_table(rows: list[dict]) -> str:
    head = ("| L x E, ep, nodes | affinity | cross-device rr / greedy / ilp (planted) | cut | "
            "cross-node rr / greedy / ilp | max load / mean rr / greedy / ilp | ilp s | ilp status (gap) |")
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        f = lambda key: " / ".join(f"{r[p][key]:.3f}" for p in ("round_robin", "greedy", "ilp"))  # noqa: E731
        ilp = r["ilp"]
        status = "optimal" if ilp["optimal"] else f"feasible ({ilp['gap']:.1%})"
        status += ", = sweep" if ilp["objective"] >= ilp["sweep_objective"] else ""
        out.append(f"| {r['layers']} x {r['experts']}, {r['ep']}, {r['nodes']} | {r['affinity']:.1f} | "
                   f"{f('cross_device_fraction')} ({r['planted_cross_device']:.3f}) | {r['cut_vs_round_robin']:.0%} | "
                   f"{f('cross_node_fraction') if r['nodes'] > 1 else '-'} | {f('max_load_over_mean')} | "
                   f"{ilp['seconds']:.1f} | {status} |")
    return "\n".join(out)


def version() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        head = "unknown"
    src = hashlib.sha1((ROOT / "planner" / "placement.py").read_bytes()).hexdigest()[:10]
    return f"git {head}, planner/placement.py sha1 {src}"


def main() -> None:
    rows = []
    start = time.perf_counter()
    for case in CASES:
        row = run_case(*case)
        print(json.dumps({k: v for k, v in row.items() if k not in ("round_robin", "greedy")}), flush=True)
        rows.append(row)
    elapsed = time.perf_counter() - start
    planted_rows = [r for r in rows if r["affinity"] >= 0.9]
    summary = (f"ILP vs round robin at affinity 0.9: cross-device hops cut by "
               f"{min(r['cut_vs_round_robin'] for r in planted_rows):.0%} to "
               f"{max(r['cut_vs_round_robin'] for r in planted_rows):.0%}; max load / mean <= "
               f"{max(r['ilp']['max_load_over_mean'] for r in rows):.3f} in every case; "
               f"{sum(r['ilp']['optimal'] for r in rows)} of {len(rows)} ILPs proven optimal within "
               f"{TIME_LIMIT:.0f} s. Whole run: {elapsed:.0f} s.")
    paras = __doc__.split("\n\n")
    md = ["# Expert placement", "", "Reproduce (from the repository root):", "",
          "    " + paras[2].strip(), "", paras[4].strip(), "",
          f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, ortools "
          f"{ortools.__version__}; {version()}.", "", summary, "", fmt_table(rows), ""]
    (HERE / "placement.md").write_text("\n".join(md))
    (HERE / "placement.json").write_text(json.dumps(
        {"version": version(), "k": K, "time_limit": TIME_LIMIT, "seconds": round(elapsed, 1),
         "cpu_count": os.cpu_count(), "ortools": ortools.__version__, "rows": rows}, indent=1) + "\n")
    print()
    print(summary)
    print(fmt_table(rows))


if __name__ == "__main__":
    main()
