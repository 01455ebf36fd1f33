"""`autoshard report RUN_DIR [-o FILE.png]`: a training run's metrics as pictures.

    autoshard report runs/local/r1                 # writes runs/local/r1/report.png
    autoshard report runs/local/r1 -o r1.png

Loss (and eval loss), tokens/s, MFU and step time against the plan's predicted step time, over the steps of the run
folder's `metrics.jsonl` (`autoshard.metrics.MetricsLog` writes it, one JSON object a line, as the run goes). A run
still in progress works: the torn last line of a step being written is left out. Reads only; never takes the run's
lock.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from autoshard.runs import METRICS
from planner.errors import AutoshardError

DEFAULT_NAME = "report.png"


def add_report(sub) -> None:
    p = sub.add_parser("report", help="draw a training run's loss, tokens/s, MFU and step time",
                       description="Read the metrics.jsonl of a run folder (autoshard train --out DIR; a run still in "
                                   "progress too) and draw loss and eval loss, tokens/s, MFU, and the measured step "
                                   "time against the plan's predicted one, over the steps.")
    p.add_argument("run", metavar="RUN_DIR", help="a run folder (holding metrics.jsonl)")
    p.add_argument("-o", "--output", metavar="FILE.png", default=None,
                   help=f"where to write the picture (default RUN_DIR/{DEFAULT_NAME})")


def _decode(value: Any) -> Any:
    """A record value as `autoshard.metrics.json_value` wrote it: null / "inf" / "-inf" back to floats."""
    if value is None:
        return math.nan
    if value in ("inf", "-inf"):
        return float(value)
    return value


def read_records(run: Path) -> tuple[list[dict[str, Any]], int]:
    """(the complete records of `run`'s metrics.jsonl in order, lines skipped): a line that does not parse (a run
    killed or still writing it) or that has no step is skipped.

    Raises:
      AutoshardError: no such folder, no metrics.jsonl, or not one complete record yet.
    """
    if not run.is_dir():
        raise AutoshardError(f"{run} is not a folder: give a run folder (autoshard train --out DIR)")
    path = run / METRICS
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        raise AutoshardError(f"{run} has no {METRICS}: give the folder of a training run (autoshard train --out DIR)"
                             f", once it has done its first step") from None
    except OSError as e:
        raise AutoshardError(f"cannot read {path}: {e.strerror or e}") from None
    records, skipped = [], 0
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append({k: _decode(v) for k, v in record.items()})
        elif line.strip():
            skipped += 1
    if not records:
        raise AutoshardError(f"{path} holds no complete step yet: run `autoshard report` again once the run has "
                             f"done its first step")
    return records, skipped


def run_config(run: Path) -> dict[str, Any]:
    """The run's config.json (its steps and resumptions), or {} when absent or unreadable: only the title and the
    compile steps use it."""
    try:
        config = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def plan_step_seconds(run: Path) -> float | None:
    """The run's plan.json predicted step time, for records written without `predicted_step_s`."""
    from planner.plan import Plan

    try:
        value = Plan.load(run / "plan.json").predicted.get("step_seconds")
    except AutoshardError:
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def compile_steps(records: list[dict[str, Any]], config: dict[str, Any]) -> list[int]:
    """Steps whose time includes compiling the train step: the run's first and the first after each resume."""
    steps = [int(records[0]["step"])]
    for resumed in config.get("resumed") or []:
        if isinstance(resumed, dict) and isinstance(resumed.get("step"), int):
            steps.append(resumed["step"] + 1)
    return steps


def _title(run: Path, records: list[dict[str, Any]], config: dict[str, Any]) -> str:
    last = int(records[-1]["step"])
    total = (config.get("args") or {}).get("steps")
    model = (config.get("model") or {}).get("name")
    where = f"step {last} of {total}" if isinstance(total, int) else f"{last} steps"
    state = " (in progress or stopped)" if isinstance(total, int) and last < total else ""
    return f"autoshard report: {run}" + (f", {model}" if model else "") + f": {where}{state}"


def cmd_report(args: argparse.Namespace) -> int:
    from autoshard import figures

    run = Path(args.run)
    out = Path(args.output) if args.output else run / DEFAULT_NAME
    records, skipped = read_records(run)
    figures.check_target(out)
    config = run_config(run)
    predicted = None if any("predicted_step_s" in r for r in records) else plan_step_seconds(run)
    fig = figures.report_figure(records, title=_title(run, records, config), predicted_step_s=predicted,
                                compile_steps=compile_steps(records, config))
    figures.save(fig, out)
    w, h = figures.pixel_size(fig)
    print(f"wrote {out} ({w} x {h} px: loss, tokens/s, MFU and step time over {len(records)} step(s))")
    if skipped:
        print(f"note: {skipped} line(s) of {run / METRICS} are not complete records (a step being written, or a "
              f"killed run's last line) and were left out")
    return 0
