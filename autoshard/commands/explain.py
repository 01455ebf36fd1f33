"""`autoshard explain PLAN [--plot FILE.png]`: a plan file as tables, and as pictures.

    autoshard explain plan.json                  # per-parameter strategies, predicted time / memory / communication
    autoshard explain plan.json --plot plan.png  # the same predictions drawn (autoshard.figures.plan_figure)

Reads nothing but the plan file (and, for parameter shapes, the model preset its provenance names), so it starts no
devices and compiles nothing.
"""

from __future__ import annotations

import argparse

from autoshard import argtypes
from planner.errors import AutoshardError


def add_explain(sub) -> None:
    p = sub.add_parser("explain", help="show a plan's per-parameter strategies and predicted costs",
                       description="Print a plan file as tables: the strategy of every parameter (with shapes when "
                                   "the model named in the plan's provenance is known), the predicted step time, "
                                   "memory and communication by component, and the runners-up.")
    p.add_argument("plan", metavar="PLAN", help="a plan JSON file (from autoshard plan -o, or a train run folder)")
    p.add_argument("--model", default=None,
                   help="model the plan is for, when its provenance does not name one (for parameter shapes)")
    p.add_argument("--width", type=argtypes.positive_int, default=None,
                   help="wrap tables to this many columns (default: the terminal's width, at most 100)")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also draw the predictions as a picture: step time by component, memory per device "
                        "against the budget, communication, the runners-up, and a pipeline's schedule")


def _param_infos(model_name: str | None) -> dict | None:
    """path -> (shape, logical axes) of a model preset, or None if the name is missing or unknown."""
    if not model_name:
        return None
    import models
    from planner.params import param_table

    try:
        table = param_table(models.abstract(models.config_from_name(model_name)))
    except AutoshardError:
        return None
    return {path: (info.shape, info.axes) for path, info in table.items()}


def plot_plan(plan, path: str) -> str:
    """Draw `plan` to `path` (atomically); the line that says what was written."""
    from autoshard import figures

    fig = figures.plan_figure(plan)
    figures.save(fig, path)
    w, h = figures.pixel_size(fig)
    panels = "time, memory, communication, runners-up" + (", pipeline schedule" if plan.pipeline else "")
    return f"wrote {path} ({w} x {h} px: {panels})"


def cmd_explain(args: argparse.Namespace) -> int:
    import shutil

    from autoshard import explain
    from planner.plan import Plan

    plan = Plan.load(args.plan)
    model = args.model or plan.provenance.get("model")
    infos = _param_infos(model)
    if args.model and infos is None:
        import models

        models.config_from_name(args.model)  # raises the one-line unknown-model error
    wrote = plot_plan(plan, args.plot) if args.plot else None  # a bad path fails before any output
    width = args.width or min(explain.WIDTH, shutil.get_terminal_size((explain.WIDTH, 24)).columns)
    print(explain.explain(plan, infos, source=args.plan, width=width))
    if wrote:
        print(wrote)
    if infos is not None:
        missing = sorted(set(plan.params) - set(infos))
        if missing:
            print(f"note: {len(missing)} parameter(s) of the plan are not in model {model}: {', '.join(missing[:5])}"
                  + (" ..." if len(missing) > 5 else ""))
    elif model is None and not explain.recorded_params(plan):
        print("note: the plan's provenance names no model: pass --model to see parameter shapes")
    return 0
