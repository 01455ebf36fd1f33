"""Pictures of a plan, a verification and a training run, drawn with matplotlib.

Each `*_figure` function is a pure function of plain data (a `Plan`, a `compare` result, a run's records) that
returns a `matplotlib.figure.Figure`; `save` writes one. Figures are made with the object-oriented API on an Agg
canvas chosen here, never through pyplot, so drawing needs no display, touches no global backend state and is safe
from any thread:

    fig = plan_figure(plan)          # autoshard explain PLAN --plot FILE.png
    save(fig, "plan.png")            # atomic: a temporary file in the same folder, then os.replace

The titles of the panels are the `TITLES` below (a panel may add details after a colon); the user guide names
them, and the tests check them on the Figure objects.
"""

from __future__ import annotations

import dataclasses
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from autoshard.explain import format_bytes, format_percent, format_seconds, headline, mesh_string
from planner.errors import AutoshardError
from planner.plan import Plan

DPI = 100
WIDTH_IN = 12.0
"""Figure width in inches: 1200 pixels at `DPI`."""
TITLES = {
    "time": "Predicted step time",
    "memory": "Memory per device",
    "comm": "Communication per device per step",
    "runners_up": "Runners-up: step time against memory",
    "schedule": "Pipeline schedule",
    "zoom": "Schedule zoom",
    "bytes": "Predicted and compiled bytes",
    "error": "Prediction error and tolerance",
    "loss": "Loss",
    "throughput": "Throughput",
    "mfu": "Model FLOPs utilisation",
    "step_time": "Step time against the plan's prediction",
}
ZOOM_ABOVE = 120
"""A schedule of more ticks than this is drawn whole, and again zoomed on its first and its last `ZOOM_TICKS` ticks
(the fill and the drain, where the bubble is)."""
ZOOM_TICKS = 40
LABEL_TICKS = 40
"""Ops carry their microbatch number when the drawn window has at most this many ticks (fewer for numbers of
several digits, or a panel of half the width)."""
COLOURS = {"forward": "#4285f4", "backward": "#ea4335", "weight": "#ff9800", "idle": "#e4e4e4", "once": "#9c6ade",
           "compute": "#34a853", "pipeline bubble": "#9e9e9e", "budget": "#d32f2f", "chosen": "#f9a825",
           "ok": "#34a853", "fail": "#d32f2f", "info": "#9e9e9e", "band": "#c8e6c9",
           "predicted": "#4285f4", "compiled": "#fbbc05"}
PALETTE = ("#4285f4", "#fbbc05", "#ab47bc", "#00acc1", "#ff7043", "#8d6e63", "#5c6bc0", "#c0ca33")
"""Colours of the components that `COLOURS` does not name, in order of appearance."""


# -- units, canvas, saving -----------------------------------------------------------------------------------------

def time_unit(seconds: float) -> tuple[float, str]:
    """(scale, unit) to show `seconds` in: divide by scale (1e-3 -> 'ms')."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(seconds) >= scale:
            return scale, unit
    return 1e-6, "us"


def byte_unit(n: float) -> tuple[float, str]:
    """(scale, unit) to show `n` bytes in (binary units, like `explain.format_bytes`)."""
    for unit, scale in (("TiB", 2.0**40), ("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if abs(n) >= scale:
            return scale, unit
    return 1.0, "B"


def new_figure(height_in: float, width_in: float = WIDTH_IN) -> Figure:
    """A Figure on an Agg canvas (no display, no pyplot state), laid out by matplotlib's constrained layout.

    Sizes are whole quarter inches: exact in binary, so every matplotlib release writes the same pixel count.
    """
    fig = Figure(figsize=(round(width_in * 4) / 4, round(height_in * 4) / 4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def check_target(path: str | os.PathLike) -> Path:
    """`path` as a picture `save` can write: a suffix matplotlib draws (.png, .svg, .pdf, ...) in an existing,
    writable folder. Commands call it before long work (verify compiles first), so a typo costs nothing.

    Raises:
      AutoshardError: one line that says what to change.
    """
    path = Path(path)
    kinds = FigureCanvasAgg.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in kinds:
        raise AutoshardError(f"cannot write {path}: name the picture FILE.png (or .svg, .pdf: a suffix matplotlib "
                             f"writes)")
    folder = path.parent
    if not folder.is_dir():
        raise AutoshardError(f"cannot write {path}: folder {folder} does not exist")
    if path.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise AutoshardError(f"cannot write {path}: " + ("it is a folder" if path.is_dir() else
                                                        f"folder {folder} is not writable"))
    return path


def save(fig: Figure, path: str | os.PathLike) -> Path:
    """Write `fig` to `path` (format from the suffix: .png, .svg, .pdf, ...) without ever leaving half an image.

    The picture goes to a temporary file in the same folder, which then replaces `path` in one step.

    Args:
      fig: the figure to write.
      path: the file to write; its folder must exist and be writable.

    Returns:
      The path written.

    Raises:
      AutoshardError: an unknown suffix, or a path that cannot be written (one line, for the CLI).
    """
    path = check_target(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            fig.savefig(f, format=path.suffix.lower().lstrip("."), dpi=DPI)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise AutoshardError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def pixel_size(fig: Figure) -> tuple[int, int]:
    """(width, height) in pixels of the image `save` writes."""
    w, h = fig.get_size_inches()
    return int(round(w * DPI)), int(round(h * DPI))


def _num(x: Any) -> float | None:
    """A finite float, or None (plans and records are edited by hand; a figure never fails on one odd value)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _field(d: Mapping[str, Any], key: str, kind: type) -> Any:
    """`d[key]` when it is a `kind` (dict or list), else an empty one: a hand-edited plan draws what it can."""
    value = d.get(key)
    return value if isinstance(value, kind) else kind()


def _colour(name: str, order: list[str]) -> str:
    if name in COLOURS:
        return COLOURS[name]
    if name not in order:
        order.append(name)
    return PALETTE[order.index(name) % len(PALETTE)]


def _note(ax: Axes, text: str) -> None:
    """An empty panel that says why it is empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


def _budget_mark(ax: Axes, budget: float | None, top: float, scale: float) -> str:
    """The memory budget as a vertical line when it is within 3 x `top` (the largest figure drawn); otherwise a
    note (returned, for the axis label) so that a plan using 0.1% of its budget keeps a readable breakdown."""
    if not budget:
        return ""
    label = f"budget {format_bytes(budget)}"
    if budget <= 3 * top:
        ax.axvline(budget / scale, color=COLOURS["budget"], linestyle="--", linewidth=1.5, label=label)
        ax.set_xlim(right=max(ax.get_xlim()[1], budget / scale * 1.05))
        return ""
    return f"\n{label}: off this scale ({format_percent(top / budget)} used)"


# -- explain: the plan ---------------------------------------------------------------------------------------------

def plan_figure(plan: Plan) -> Figure:
    """A plan as pictures: predicted time by component, memory per device against the budget, communication by
    `axes/collective`, the runners-up (step time against memory), and for a pipeline its schedule.

    Args:
      plan: any plan; a plan without predictions gets panels that say so.

    Returns:
      The Figure (1200 pixels wide; taller for a pipeline).
    """
    sched = schedule_times(plan) if plan.pipeline is not None else None
    zoom = sched is not None and sched.ticks > ZOOM_ABOVE
    rows = [3.6, 3.6]
    if sched is not None:
        rows += [min(6.0, 1.4 + 0.22 * sched.devices)] * (2 if zoom else 1)
    fig = new_figure(sum(rows) + 0.8)
    grid = fig.add_gridspec(len(rows), 2, height_ratios=rows)
    fig.suptitle(f"{headline(plan)}\nmesh {plan.mesh_string()} ({plan.num_devices} devices), remat {plan.remat}",
                 fontsize=12)
    time_panel(fig.add_subplot(grid[0, 0]), plan)
    memory_panel(fig.add_subplot(grid[0, 1]), plan)
    comm_panel(fig.add_subplot(grid[1, 0]), plan)
    runners_up_panel(fig.add_subplot(grid[1, 1]), plan)
    if sched is not None:
        schedule_panel(fig.add_subplot(grid[2, :]), sched, plan)
        if zoom:
            schedule_panel(fig.add_subplot(grid[3, 0]), sched, plan, window=(0, ZOOM_TICKS))
            schedule_panel(fig.add_subplot(grid[3, 1]), sched, plan, window=(sched.ticks - ZOOM_TICKS, sched.ticks))
    return fig


def _bars(ax: Axes, items: list[tuple[str, float]], scale: float, total: float, fmt) -> None:
    """Horizontal bars, largest on top, each labelled with its value and share of `total`."""
    order: list[str] = []
    names = [k for k, _ in items]
    values = [v / scale for _, v in items]
    y = np.arange(len(items))
    ax.barh(y, values, color=[_colour(k, order) for k in names])
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    for yi, (_, v) in zip(y, items):
        ax.text(v / scale, yi, f" {fmt(v)} ({format_percent(v / total, digits=0)})" if total else f" {fmt(v)}",
                va="center", fontsize=8)
    ax.set_xlim(0, max(values) * 1.35)


def time_panel(ax: Axes, plan: Plan) -> None:
    """Predicted seconds per step by component (compute, each kind of communication, the pipeline bubble)."""
    pred = plan.predicted or {}
    step = _num(pred.get("step_seconds"))
    items = [(k, v) for k, v in ((k, _num(v)) for k, v in _field(pred, "time_breakdown", dict).items()) if v and v > 0]
    ax.set_title(TITLES["time"] + (f": {format_seconds(step)}" if step else ""))
    if not items:
        _note(ax, "this plan carries no predicted time breakdown")
        return
    items.sort(key=lambda kv: -kv[1])
    scale, unit = time_unit(max(v for _, v in items))
    _bars(ax, items, scale, step or sum(v for _, v in items), format_seconds)
    ax.set_xlabel(f"predicted seconds per step ({unit})")


def memory_rows(plan: Plan) -> tuple[list[str], dict[str, list[float]]]:
    """(row labels, component -> bytes per row) of the memory panel: one row for a plan whose devices all hold the
    same, one per pipe device for a pipeline (its parameters, buffers and activations; the planner's breakdown is
    the fullest device's, and only the activations differ between devices)."""
    pred = plan.predicted or {}
    parts = {k: v for k, v in ((k, _num(v)) for k, v in _field(pred, "memory_breakdown", dict).items()) if v}
    per_stage = [_num(x) for x in _field(pred, "memory_per_stage_device", list)]
    if not per_stage or any(x is None for x in per_stage):
        total = _num(pred.get("memory_bytes_per_device"))
        if not parts and total:
            parts = {"total": total}
        return ["every device"], {k: [v] for k, v in parts.items()}
    fixed = {k: v for k, v in parts.items() if k != "activations"}
    rest = [max(0.0, m - sum(fixed.values())) for m in per_stage]
    comps = {k: [v] * len(per_stage) for k, v in fixed.items()}
    comps["activations" if fixed else "total"] = rest
    return [f"pipe {p}" for p in range(len(per_stage))], comps


def memory_panel(ax: Axes, plan: Plan) -> None:
    """Bytes per device as stacked bars by component, against the plan's memory budget."""
    labels, comps = memory_rows(plan)
    budget = _num((plan.provenance or {}).get("memory_budget"))
    ax.set_title(TITLES["memory"] + (" (per pipe device)" if len(labels) > 1 else ""))
    if not comps:
        _note(ax, "this plan carries no predicted memory")
        return
    totals = np.sum([v for v in comps.values()], axis=0)
    scale, unit = byte_unit(float(totals.max()))
    y = np.arange(len(labels))
    left = np.zeros(len(labels))
    order: list[str] = []
    for name, values in comps.items():
        ax.barh(y, np.asarray(values) / scale, left=left, color=_colour(name, order), label=name, height=0.6)
        left += np.asarray(values) / scale
    every = math.ceil(len(labels) / 8)
    ax.set_yticks(y[::every], labels[::every])
    ax.invert_yaxis()
    ax.set_xlim(0, float(totals.max()) / scale * 1.15)
    note = _budget_mark(ax, budget, float(totals.max()), scale)
    ax.set_xlabel(f"predicted bytes per device ({unit}){note}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3 if note else -0.18), ncol=2, fontsize=8)


def comm_panel(ax: Axes, plan: Plan) -> None:
    """Bytes each device sends per step, by `axes/collective` (the keys `autoshard verify` judges)."""
    comm = _field(plan.predicted or {}, "comm_bytes", dict)
    items = sorted(((k, v) for k, v in ((k, _num(v)) for k, v in comm.items()) if v and v > 0),
                   key=lambda kv: (-kv[1], kv[0]))
    total = sum(v for _, v in items)
    ax.set_title(TITLES["comm"] + (f": {format_bytes(total)}" if total else ""))
    if not items:
        _note(ax, "no communication predicted" if plan.predicted else "this plan carries no predictions")
        return
    scale, unit = byte_unit(items[0][1])
    _bars(ax, items, scale, total, format_bytes)
    ax.set_xlabel(f"predicted bytes sent per device per step ({unit})")


def _candidates(plan: Plan) -> list[tuple[str, float, float]]:
    """(label, memory bytes, step seconds) of the runners-up that carry both predictions."""
    out = []
    for alt in plan.alternatives or []:
        if not isinstance(alt, Mapping) or not isinstance(alt.get("predicted"), Mapping):
            continue
        pred = alt["predicted"]
        mem, step = _num(pred.get("memory_bytes_per_device")), _num(pred.get("step_seconds"))
        if mem is None or step is None:
            continue
        pl = _field(pred, "pipeline", dict)
        label = mesh_string(_field(alt, "mesh", dict)) + (f" {pl.get('schedule')}" if pl.get("schedule") else "")
        out.append((label + (" remat" if alt.get("remat") == "full" else ""), mem, step))
    return out


def runners_up_panel(ax: Axes, plan: Plan) -> None:
    """The chosen plan and the runners-up (numbered as `explain` lists them) as points of (memory per device,
    step time), with the budget."""
    pred = plan.predicted or {}
    mem, step = _num(pred.get("memory_bytes_per_device")), _num(pred.get("step_seconds"))
    ax.set_title(TITLES["runners_up"])
    if mem is None or step is None:
        _note(ax, "this plan carries no predictions")
        return
    points = _candidates(plan)
    top = max([mem] + [m for _, m, _ in points])
    mscale, munit = byte_unit(top)
    tscale, tunit = time_unit(max([step] + [s for _, _, s in points]))
    names: dict[tuple[float, float], list[str]] = {}  # runners-up predicted alike share one label
    for k, (label, m, s) in enumerate(points):
        ax.scatter([m / mscale], [s / tscale], color=PALETTE[k % len(PALETTE)], label=f"#{k + 2} {label}", zorder=2)
        names.setdefault((m / mscale, s / tscale), []).append(f"#{k + 2}")
    for xy, ranks in names.items():
        ax.annotate(",".join(ranks), xy, fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.scatter([mem / mscale], [step / tscale], marker="*", s=220, color=COLOURS["chosen"], edgecolor="black",
               label=f"chosen: {plan.mesh_string()}", zorder=3)
    ax.margins(0.25, 0.3)
    note = _budget_mark(ax, _num((plan.provenance or {}).get("memory_budget")), top, mscale)
    ax.set_xlabel(f"predicted memory per device ({munit}){note}")
    ax.set_ylabel(f"predicted step time ({tunit})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    if not points:
        ax.text(0.5, 0.25, "the plan records no runners-up\n(a fixed mesh, or a hand-written plan)",
                ha="center", transform=ax.transAxes, fontsize=9, color="#555555")


# -- explain: the pipeline schedule --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ScheduleTimes:
    """A pipeline schedule on the predicted clock: ticks run in lockstep, each as long as its slowest op."""

    kind: str
    devices: int
    virtual: int
    microbatches: int
    start: np.ndarray
    """[T] seconds at which each tick starts."""
    length: np.ndarray
    """[T] seconds each tick lasts (its slowest op plus the point-to-point sends)."""
    busy: np.ndarray
    """[T, P] seconds each device computes in each tick (0: idle, or without the stash the last stage's forward,
    which its backward recomputes)."""
    phase: np.ndarray
    """[T, P] 0 idle, 1 forward, 2 backward (zb: its B, the input gradient), 3 weight gradient (zb's W)."""
    chunk: np.ndarray
    microbatch: np.ndarray
    once_per_step: float
    """Seconds of the step outside the ticks (drawn after them): the gradient reduction, fsdp gathers and an MoE
    model's statistics sweep, once per step."""
    once_label: str
    predicted: bool
    """False when the plan carries no per-stage times: every op then lasts one unit."""

    @property
    def ticks(self) -> int:
        return int(self.start.shape[0])

    @property
    def end(self) -> float:
        return float(self.start[-1] + self.length[-1]) if self.ticks else 0.0


def schedule_times(plan: Plan) -> ScheduleTimes:
    """The plan's schedule table with each op's predicted seconds (the planner's per-stage forward, backward and,
    for zb, weight-gradient times and each tick's sends, as `planner.stages.lockstep_seconds` adds them up)."""
    from autoshard.explain import plan_schedule
    from planner.schedule import IDLE

    spec = plan.pipeline
    P = plan.mesh["pipe"]
    sched = plan_schedule(plan)
    pred = plan.predicted or {}
    pl = _field(pred, "pipeline", dict)
    fwd = [_num(x) for x in _field(pl, "stage_forward_seconds", list)]
    bwd = [_num(x) for x in _field(pl, "stage_backward_seconds", list)]
    wgt = [_num(x) for x in _field(pl, "stage_weight_seconds", list)] if sched.w_ticks is not None else []
    timed = len(fwd) == len(bwd) == P * spec.virtual and None not in fwd + bwd + wgt \
        and (sched.w_ticks is None or len(wgt) == P)
    if not timed:
        fwd = bwd = wgt = [1.0] * (P * spec.virtual)
    stage = sched.chunk * P + np.arange(P)[None, :]
    busy = np.where((sched.phase == 1) & (sched.code != IDLE), np.asarray(fwd)[stage], 0.0)
    busy = np.where(sched.phase == 2, np.asarray(bwd)[stage], busy)
    if sched.w_ticks is not None:
        busy = np.where(sched.phase == 3, np.asarray(wgt)[stage], busy)
    transfer = (_num(pl.get("transfer_seconds_per_tick")) or 0.0) if timed else 0.0
    length = busy.max(axis=1) + transfer / 2 * sched.sends.sum(axis=1)  # a tick pays for the sends it makes
    start = np.concatenate([[0.0], np.cumsum(length)[:-1]])
    step = _num(pred.get("step_seconds")) if timed else None
    once = max(0.0, step - float(length.sum())) if step else 0.0
    parts = [k for k in ("gradient sync", "fsdp gathers", "statistics sweep")
             if (_num(_field(pred, "time_breakdown", dict).get(k)) or 0.0) > 0]
    return ScheduleTimes(spec.schedule, P, spec.virtual, spec.microbatches, start, length, busy, sched.phase.copy(),
                         sched.chunk.copy(), sched.microbatch.copy(), once, ", ".join(parts) or "once per step",
                         timed)


def _shade(colour: str, chunk: int, virtual: int) -> tuple[float, ...]:
    """Later virtual chunks in darker shades of the op's colour."""
    from matplotlib.colors import to_rgb

    k = 1.0 - 0.45 * chunk / max(1, virtual - 1)
    return tuple(c * k for c in to_rgb(colour))


def _schedule_title(st: ScheduleTimes, plan: Plan, window: tuple[int, int] | None) -> str:
    if window is not None:
        where = "first" if window[0] == 0 else "last"
        return f"{TITLES['zoom']}: {where} {window[1] - window[0]} of {st.ticks} ticks"
    bubble = _num(_field(plan.predicted or {}, "pipeline", dict).get("bubble")) if st.predicted else None
    return (f"{TITLES['schedule']}: {st.kind}" + (f", {st.virtual} chunks per device" if st.virtual > 1 else "")
            + f", {st.microbatches} microbatches, {st.ticks} ticks"
            + (f", bubble {format_percent(bubble, digits=0)} of the step" if bubble is not None else ""))


def schedule_panel(ax: Axes, st: ScheduleTimes, plan: Plan, window: tuple[int, int] | None = None) -> None:
    """Devices on the y axis, predicted time on the x axis: forward and backward ops (zb: B and W) coloured
    (microbatch numbers on them when there is room), idle time (the bubble) grey; only the ticks [t0, t1) of
    `window` when zoomed."""
    t0, t1 = window or (0, st.ticks)
    t0, t1 = max(0, t0), min(st.ticks, t1)
    once = st.once_per_step if t1 == st.ticks else 0.0
    x0, x1 = float(st.start[t0]), float(st.start[t1 - 1] + st.length[t1 - 1]) + once
    scale, unit = time_unit(st.end + st.once_per_step) if st.predicted else (1.0, "ticks")
    ax.set_title(_schedule_title(st, plan, window))
    digits = len(str(st.microbatches - 1))
    edge = "white" if t1 - t0 <= 4 * LABEL_TICKS else "none"
    labels = (t1 - t0) * digits <= LABEL_TICKS * (0.5 if window else 1.0)
    for p in range(st.devices):
        ax.broken_barh([(x0 / scale, (x1 - x0) / scale)], (p - 0.4, 0.8), facecolors=COLOURS["idle"])
        for ph, name in ((1, "forward"), (2, "backward"), (3, "weight")):
            for c in range(st.virtual):
                cells = [t for t in range(t0, t1)
                         if st.phase[t, p] == ph and st.chunk[t, p] == c and st.busy[t, p] > 0]
                if cells:
                    ax.broken_barh([(st.start[t] / scale, st.busy[t, p] / scale) for t in cells], (p - 0.4, 0.8),
                                   facecolors=[_shade(COLOURS[name], c, st.virtual)], edgecolors=edge, linewidth=0.5)
                for t in cells if labels else ():
                    ax.text((st.start[t] + st.busy[t, p] / 2) / scale, p, str(st.microbatch[t, p]), ha="center",
                            va="center", fontsize=7, color="white")
        if once:
            ax.broken_barh([((x1 - once) / scale, once / scale)], (p - 0.4, 0.8), facecolors=COLOURS["once"])
    _schedule_axes(ax, st, (x0 / scale, x1 / scale), unit, legend=window is None)


def _schedule_axes(ax: Axes, st: ScheduleTimes, xlim: tuple[float, float], unit: str, legend: bool) -> None:
    ax.set_xlim(*xlim)
    ax.set_ylim(st.devices - 0.5, -0.5)
    every = math.ceil(st.devices / 16)
    ax.set_yticks(range(0, st.devices, every), [str(p) for p in range(0, st.devices, every)])
    ax.set_ylabel("pipe device")
    ax.set_xlabel(f"predicted time in the step ({unit})" if st.predicted else
                  "ticks (the plan carries no per-stage times: every op drawn one tick long)")
    if not legend:
        return
    chunks = " (darker: later chunks)" if st.virtual > 1 else ""
    zb = bool((st.phase == 3).any())
    handles = [Patch(color=COLOURS["forward"], label=f"forward{chunks}"),
               Patch(color=COLOURS["backward"], label="input gradient (B)" if zb else
                     "backward (recomputes its forward)"),
               *([Patch(color=COLOURS["weight"], label="weight gradient (W)")] if zb else []),
               Patch(color=COLOURS["idle"], label="idle (bubble)")]
    if st.once_per_step:
        handles.append(Patch(color=COLOURS["once"], label=st.once_label))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)


# -- verify: predicted against compiled ----------------------------------------------------------------------------

def comparison_rows(result: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(name, judged figure) of a `comparison.compare` result: memory, the communication total, each key."""
    rows = [("memory/device", result["memory"]), ("communication total", result["comm_total"])]
    return rows + list((result.get("comm") or {}).items())


def verify_figure(result: Mapping[str, Any], *, title: str = "") -> Figure:
    """Predicted against compiled per figure (memory, communication total, each `axes/collective`), as bytes and
    as relative error inside each judged figure's tolerance band.

    Args:
      result: a `comparison.compare` result (`autoshard verify --json` prints it; `Verification.comparison`).
      title: a first line for the figure (what was verified).

    Returns:
      The Figure.
    """
    rows = comparison_rows(result)
    fig = new_figure(max(5.0, 1.6 + 0.32 * len(rows)))
    failures = ", ".join(f.removeprefix("comm:") for f in result.get("failures") or [])
    verdict = "PASS" if result.get("pass") else f"FAIL ({failures})"
    fig.suptitle((f"{title}\n" if title else "") + f"autoshard verify: {verdict}", fontsize=12)
    left, right = fig.subplots(1, 2, sharey=True)
    bytes_panel(left, rows)
    error_panel(right, rows)
    return fig


def bytes_panel(ax: Axes, rows: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """Predicted and compiled bytes side by side, per figure (log scale: memory and small keys together)."""
    y = np.arange(len(rows))
    for offset, key in ((-0.2, "predicted"), (0.2, "compiled")):
        values = [max(_num(r[key]) or 0.0, 1.0) for _, r in rows]
        ax.barh(y + offset, values, height=0.4, color=COLOURS[key], label=key)
    ax.set_xscale("log")
    ax.set_yticks(y, [name for name, _ in rows])
    ax.invert_yaxis()
    ax.set_title(TITLES["bytes"])
    ax.set_xlabel("bytes per device per step (log scale)")
    ax.legend(loc="lower right", fontsize=8)


def error_panel(ax: Axes, rows: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """(predicted - compiled) / compiled per figure, with its tolerance band; figures shown but not judged grey.
    The scale fits the judged figures; a larger error is drawn as an arrow at the edge, labelled with its value."""
    judged = [r for _, r in rows if r.get("judged")]
    tols = [t for t in (_num(r.get("tolerance")) for r in judged) if t]
    errs = [abs(e) for e in (_num(r.get("error")) for r in judged) if e is not None]
    limit = 100 * max([2 * t for t in tols] + [min(max(errs, default=0.0), 1.0) * 1.15, 0.2])
    for i, (_, r) in enumerate(rows):
        tol = _num(r.get("tolerance"))
        if r.get("judged") and tol:
            ax.barh(i, 200 * tol, left=-100 * tol, height=0.8, color=COLOURS["band"], zorder=1)
        err = _num(r.get("error"))
        colour = COLOURS["info"] if not r.get("judged") else COLOURS["ok" if r.get("ok") else "fail"]
        if err is None:
            ax.text(0, i, "undefined (compiled 0)", ha="center", va="center", fontsize=8, color=colour)
            continue
        x = max(-limit, min(limit, 100 * err))
        ax.plot([x], [i], marker="o" if abs(x) < limit else (">" if x > 0 else "<"), color=colour, zorder=3,
                clip_on=False)
        right = x < limit * 0.5
        ax.annotate(format_percent(err, signed=True), (x, i), xytext=(7 if right else -7, 0),
                    textcoords="offset points", va="center", ha="left" if right else "right", fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlim(-limit, limit)
    ax.set_title(TITLES["error"])
    ax.set_xlabel("relative error: (predicted - compiled) / compiled (%)")
    ax.legend(handles=[Patch(color=COLOURS["band"], label="tolerance band"),
                       Patch(color=COLOURS["ok"], label="within"), Patch(color=COLOURS["fail"], label="outside"),
                       Patch(color=COLOURS["info"], label="shown, not judged")],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)


# -- report: a training run ----------------------------------------------------------------------------------------

def series(records: Sequence[Mapping[str, Any]], key: str, skip: frozenset[int] = frozenset()
           ) -> tuple[list[float], list[float]]:
    """(steps, values) of one record field, leaving out records without a finite value and the steps in `skip`."""
    xs, ys = [], []
    for r in records:
        step, v = _num(r.get("step")), _num(r.get(key))
        if step is not None and v is not None and int(step) not in skip:
            xs.append(step)
            ys.append(v)
    return xs, ys


def report_figure(records: Sequence[Mapping[str, Any]], *, title: str = "", predicted_step_s: float | None = None,
                  compile_steps: Sequence[int] = ()) -> Figure:
    """A run over its steps: loss (and eval loss), tokens/s, MFU, and step time against the plan's prediction.

    Args:
      records: `metrics.jsonl` records (dicts with `step` and `loss`; `eval_loss`, `tokens_per_s`, `mfu`,
        `step_time_s`, `predicted_step_s` when recorded).
      title: a first line for the figure (the run folder, how far it got).
      predicted_step_s: the plan's predicted step time when the records do not carry it.
      compile_steps: steps whose time includes compilation (a run's first, a resume's first): left out of the
        speed panels, whose scale they would crush.

    Returns:
      The Figure.
    """
    fig = new_figure(8.0)
    fig.suptitle(title or "autoshard report", fontsize=12)
    (loss, speed), (mfu, step) = fig.subplots(2, 2)
    skip = frozenset(int(s) for s in compile_steps)
    if all(int(_num(r.get("step")) or 0) in skip for r in records):
        skip = frozenset()  # a run that has only compiled yet: its one step is all there is to show
    loss_panel(loss, records)
    _line_panel(speed, *series(records, "tokens_per_s", skip), TITLES["throughput"], "tokens/s", 1.0, "tokens/s")
    _line_panel(mfu, *series(records, "mfu", skip), TITLES["mfu"], "MFU (%)", 0.01, "MFU")
    step_time_panel(step, records, predicted_step_s, skip)
    for ax in (speed, mfu, step):
        if skip:
            ax.text(0.99, 0.02, "first step after each start (compiles) not shown", ha="right", va="bottom",
                    transform=ax.transAxes, fontsize=7, color="#555555")
    return fig


def _style(n: int) -> dict[str, Any]:
    return {"marker": "o", "markersize": 3} if n <= 50 else {}


def loss_panel(ax: Axes, records: Sequence[Mapping[str, Any]]) -> None:
    """Training loss per step and, when recorded, the held-out (eval) loss."""
    xs, ys = series(records, "loss")
    ax.plot(xs, ys, label="train loss", color=COLOURS["forward"], **_style(len(xs)))
    ex, ey = series(records, "eval_loss")
    if ex:
        ax.plot(ex, ey, label="eval loss", color=COLOURS["backward"], marker="o", markersize=4)
    ax.set_title(TITLES["loss"])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    if not xs and not ex:
        _note(ax, "no finite loss recorded")


def _line_panel(ax: Axes, xs: list[float], ys: list[float], title: str, ylabel: str, unit: float,
                what: str) -> None:
    """One recorded figure over the steps (divided by `unit`), or a note that the run has not recorded it."""
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if not xs:
        _note(ax, f"no {what} recorded (yet)")
        return
    ax.plot(xs, [y / unit for y in ys], color=COLOURS["compute"], **_style(len(xs)))
    ax.set_ylim(bottom=0)


def step_time_panel(ax: Axes, records: Sequence[Mapping[str, Any]], predicted_step_s: float | None,
                    skip: frozenset[int]) -> None:
    """Measured seconds per step, with the plan's predicted step time as a line."""
    xs, ys = series(records, "step_time_s", skip)
    px, py = series(records, "predicted_step_s", skip)
    if not py and predicted_step_s:
        px, py = (xs, [predicted_step_s] * len(xs)) if xs else ([], [])
    scale, unit = time_unit(max(ys + py, default=1.0))
    _line_panel(ax, xs, ys, TITLES["step_time"], f"step time ({unit})", scale, "step time")
    if xs:
        ax.lines[-1].set_label("measured")
    if py:
        ax.plot(px, [y / scale for y in py], color=COLOURS["budget"], linestyle="--", label="predicted by the plan")
    if xs or py:
        ax.legend(fontsize=8)


__all__ = ["DPI", "TITLES", "ScheduleTimes", "byte_unit", "check_target", "comparison_rows", "new_figure", "pixel_size",
           "plan_figure", "report_figure", "save", "schedule_times", "series", "time_unit", "verify_figure"]
