"""Predicted against compiled: the tolerances `autoshard verify` judges a plan under, the judgement, and its table.

A pure function of two dicts (the plan's predicted figures and `autoshard.analysis.analyze` of the compiled step),
so it imports neither jax nor the planner's solver:

    result = compare(plan.predicted, analyze(trainer.compile(batch), trainer.mesh))
    print(format_comparison(result))                      # the table, ending in PASS or FAIL
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from autoshard.explain import WIDTH, format_bytes, format_percent, table

COMM_TOLERANCE = 0.10
MEMORY_TOLERANCE = 0.10
MIN_SHARE = 0.05
"""A communication key is judged when its bytes are at least this share of the total (predicted or compiled)."""
COMM_SLACK_BYTES = 1024
"""A communication figure within this many bytes a step of the compiled one passes whatever its relative error:
a KiB moves in at most 0.2 us on the links the clusters describe (5 GB/s at the slowest, `planner.cluster`),
a tenth of the smallest collective latency there (2 us), so no plan's time can turn on it, while XLA's partitioner
makes choices of its own around tiny tensors (the zoo CNN's tensor plan: 576 B of gathers of a [16, 10] kernel, a dropout mask and BatchNorm statistics,
runs/benchmarks/model_zoo.md) that no rule of the planner's should be fitted on."""


def relative_error(predicted: float, compiled: float) -> float | None:
    """(predicted - compiled) / compiled; 0 when both are 0, None (undefined) when only the compiled figure is 0."""
    if compiled == 0:
        return 0.0 if predicted == 0 else None
    return (predicted - compiled) / compiled


def _judge(predicted: float, compiled: float, tolerance: float | None, slack: float = 0.0) -> dict[str, Any]:
    """One judged figure: within `tolerance` of the compiled one, or within `slack` of it in absolute terms."""
    err = relative_error(predicted, compiled)
    ok = None if tolerance is None else (abs(predicted - compiled) <= slack
                                         or (err is not None and abs(err) <= tolerance))
    return {"predicted": float(predicted), "compiled": float(compiled), "error": err, "tolerance": tolerance,
            "judged": tolerance is not None, "ok": ok}


def compare(predicted: Mapping[str, Any], compiled: Mapping[str, Any], *, comm_tolerance: float = COMM_TOLERANCE,
            memory_tolerance: float = MEMORY_TOLERANCE, min_share: float = MIN_SHARE,
            not_judged: Sequence[str] = ()) -> dict[str, Any]:
    """Judge a plan's `predicted` figures against `autoshard.analysis.analyze` of the compiled step.

    Judged: memory_bytes_per_device (within `memory_tolerance`), total communication bytes and each
    `axes/collective` key holding at least `min_share` of the predicted or the compiled total (within
    `comm_tolerance`, or within `COMM_SLACK_BYTES`). Smaller keys are listed with `judged: False`, and so are keys
    starting with a prefix in
    `not_judged` (for a pipeline plan, the in-stage collectives: `autoshard.verification.PIPELINE_BRANCH_KEYS`); the
    total is then judged without them.
    Errors are relative to the compiled figure.
    """
    pc = {k: float(v) for k, v in (predicted.get("comm_bytes") or {}).items()}
    cc = {k: float(v) for k, v in (compiled.get("comm_bytes") or {}).items()}
    skip = lambda k: any(k.startswith(x) for x in not_judged)  # noqa: E731
    pt = sum(v for k, v in pc.items() if not skip(k))
    ct = sum(v for k, v in cc.items() if not skip(k))
    comm: dict[str, dict[str, Any]] = {}
    keys = sorted(set(pc) | set(cc), key=lambda k: (-max(pc.get(k, 0.0), cc.get(k, 0.0)), k))
    for k in keys:
        p, c = pc.get(k, 0.0), cc.get(k, 0.0)
        share = max(p / pt if pt else 0.0, c / ct if ct else 0.0)
        if p == 0 and c == 0:
            continue
        judged = share >= min_share and not skip(k)
        comm[k] = {**_judge(p, c, comm_tolerance if judged else None, COMM_SLACK_BYTES), "share": share,
                   **({"note": "in a pipeline branch: not judged"} if skip(k) else {})}
    memory = _judge(float(predicted.get("memory_bytes_per_device") or 0.0),
                    float(compiled.get("memory_bytes_per_device") or 0.0), memory_tolerance)
    total = _judge(pt, ct, comm_tolerance, COMM_SLACK_BYTES)
    failures = [name for name, r in [("memory", memory), ("comm_total", total),
                                     *((f"comm:{k}", r) for k, r in comm.items())] if r["judged"] and not r["ok"]]
    return {"tolerances": {"memory": memory_tolerance, "communication": comm_tolerance, "min_share": min_share},
            "memory": memory, "comm_total": total, "comm": comm, "failures": failures, "pass": not failures}


def _err_text(r: Mapping[str, Any]) -> str:
    return "undefined" if r["error"] is None else format_percent(r["error"], signed=True)


def format_comparison(result: Mapping[str, Any], *, width: int = WIDTH) -> str:
    """The table `autoshard verify` prints for a `compare` result, ending in PASS or FAIL."""
    def verdict(r):
        if not r["judged"]:
            return "info"
        return "ok" if r["ok"] else "FAIL"

    rows = []
    mem, total = result["memory"], result["comm_total"]
    rows.append(["memory/device", format_bytes(mem["predicted"]), format_bytes(mem["compiled"]), _err_text(mem),
                 f"{mem['tolerance']:.0%}", verdict(mem)])
    rows.append(["communication total", format_bytes(total["predicted"]), format_bytes(total["compiled"]),
                 _err_text(total), f"{total['tolerance']:.0%}", verdict(total)])
    for k, r in result["comm"].items():
        rows.append([f"  {k}", format_bytes(r["predicted"]), format_bytes(r["compiled"]), _err_text(r),
                     f"{r['tolerance']:.0%}" if r["judged"] else "branch" if r.get("note")
                     else f"<{result['tolerances']['min_share']:.0%}",
                     verdict(r)])
    lines = table(rows, header=["per device, per step", "predicted", "compiled", "error", "tol", "verdict"],
                  right=(1, 2, 3, 4), width=width)
    n_judged = 2 + sum(r["judged"] for r in result["comm"].values())
    if result["pass"]:
        tol = result["tolerances"]
        lines.append(f"PASS: {n_judged} judged figures within tolerance (communication {tol['communication']:.0%}, "
                     f"memory {tol['memory']:.0%}; keys under {tol['min_share']:.0%} of the total: info)")
    else:
        worst = ", ".join(f.removeprefix("comm:") for f in result["failures"])
        lines.append(f"FAIL: {len(result['failures'])} of {n_judged} judged figures outside tolerance: {worst}")
    return "\n".join(lines)


__all__ = ["COMM_SLACK_BYTES", "COMM_TOLERANCE", "MEMORY_TOLERANCE", "MIN_SHARE", "compare", "format_comparison",
           "relative_error"]
