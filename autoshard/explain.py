"""Plans as text: the summary `autoshard plan` prints and the full report of `autoshard explain`.

Everything here is a pure function of a `Plan` (plus, optionally, what the model says about each parameter: its
shape and logical axis names), so it imports neither jax nor the planner's solver and is cheap to test:

    print(summary(plan))                                  # mesh, remat, time, memory vs budget, top comm, runners-up
    print(explain(plan, params={"embed": ((256, 64), ("vocab", "embed"))}))

Lines fit in `width` columns (100 by default): the last column of a table wraps onto continuation lines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from planner.plan import Plan, SpecEntry

WIDTH = 100
PARALLEL_AXES = ("heads", "kv_heads", "mlp")
"""Logical axes that Megatron tensor parallelism splits: column-parallel on the way in, row-parallel on the way out."""

ParamInfo = tuple[Sequence[int] | None, Sequence[str | None] | None]
"""(shape, logical axis names) of one parameter; either may be None when unknown."""


# -- numbers -------------------------------------------------------------------------------------------------------

def format_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB' (binary units, like planner.search.format_bytes)."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(round(n))} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(s) >= scale or unit == "us":
            v = s / scale
            return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{s:g} s"


def format_percent(x: float | None, signed: bool = False, digits: int = 1) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    pct = 100 * x
    text = f"{pct:+.{digits}f}%" if signed else f"{pct:.{digits}f}%"
    return text if abs(pct) < 1e4 else (f"{pct:+.2e}%" if signed else f"{pct:.2e}%")


def format_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{int(n)}"


def mesh_string(mesh: Mapping[str, int]) -> str:
    return ",".join(f"{a}={n}" for a, n in mesh.items() if n > 1) or "single device"


# -- specs ---------------------------------------------------------------------------------------------------------

def _axes_of(entry: SpecEntry) -> list[str]:
    if entry is None:
        return []
    return [entry] if isinstance(entry, str) else list(entry)


def format_spec(spec: Sequence[SpecEntry]) -> str:
    """[None, 'fsdp', ['data', 'tensor']] -> '(-, fsdp, data+tensor)'."""
    return "(" + ", ".join("+".join(_axes_of(e)) or "-" for e in spec) + ")"


def describe_spec(spec: Sequence[SpecEntry], shape: Sequence[int] | None = None,
                  axes: Sequence[str | None] | None = None, mesh: Mapping[str, int] | None = None) -> str:
    """What a parameter's spec means: column/row/vocab-parallel, fsdp-sharded, expert-parallel, replicated.

    `axes` are the parameter's logical axis names (`("layers", "embed", "heads", "head_dim")`); without them the
    description names dimensions by number. Mesh axes of size 1 (in `mesh`) shard nothing and are ignored.
    """
    live = lambda a: mesh is None or mesh.get(a, 1) > 1  # noqa: E731
    names = list(axes) if axes is not None and len(axes) == len(spec) else None
    parts: list[tuple[int, str]] = []
    for dim, entry in enumerate(spec):
        for ax in _axes_of(entry):
            if not live(ax):
                continue
            name = names[dim] if names else None
            parts.append((_ORDER.get(ax, len(_ORDER)), _meaning(ax, dim, name, names)))
    parts = [p for _, p in sorted(parts, key=lambda x: x[0])]
    if not parts:
        return "replicated"
    seen: list[str] = []
    for p in parts:
        if p not in seen:
            seen.append(p)
    return ", ".join(seen)


_ORDER = {"tensor": 0, "expert": 1, "pipe": 2, "fsdp": 3}
"""Order of the words in a description: the layer's math (tensor, expert) first, then storage (fsdp)."""


def _meaning(mesh_axis: str, dim: int, name: str | None, names: list[str | None] | None) -> str:
    where = name if name else f"dim {dim}"
    if mesh_axis == "tensor":
        if name == "vocab":
            return "vocab-parallel"
        if name in PARALLEL_AXES and names and "embed" in names:
            return "column-parallel" if names.index("embed") < dim else "row-parallel"
        if name in PARALLEL_AXES:
            return f"{name} over tensor"
        return f"{where + ' dim' if name else where} over tensor"
    if mesh_axis == "fsdp":
        return "fsdp-sharded" if name in (None, "embed") else f"fsdp-sharded ({name})"
    if mesh_axis == "expert":
        return "expert-parallel" if name in (None, "experts") else f"expert-split {where}"
    if mesh_axis == "pipe":
        return "pipeline stages"
    return f"{where} over {mesh_axis}"


def shard_shape(shape: Sequence[int], spec: Sequence[SpecEntry], mesh: Mapping[str, int]) -> tuple[int, ...]:
    """The per-device block shape of a parameter (ceil division, as jax pads uneven shards)."""
    out = []
    for i, n in enumerate(shape):
        k = math.prod(mesh.get(a, 1) for a in _axes_of(spec[i])) if i < len(spec) else 1
        out.append(-(-n // k))
    return tuple(out)


# -- tables --------------------------------------------------------------------------------------------------------

def table(rows: Sequence[Sequence[str]], *, header: Sequence[str] | None = None, right: Sequence[int] = (),
          width: int = WIDTH, indent: int = 2, rule: bool = True) -> list[str]:
    """Columns padded to their widest cell; the last column wraps (on spaces) to keep lines within `width`."""
    all_rows = [list(map(str, header))] if header else []
    all_rows += [list(map(str, r)) for r in rows]
    if not all_rows:
        return []
    ncol = max(len(r) for r in all_rows)
    all_rows = [r + [""] * (ncol - len(r)) for r in all_rows]
    widths = [max(len(r[i]) for r in all_rows) for i in range(ncol)]
    sep = "  " if ncol > 1 else ""
    fixed = indent + sum(widths[:-1]) + len(sep) * (ncol - 1)
    last = min(widths[-1], max(12, width - fixed))

    def cell(text: str, i: int, w: int) -> str:
        return text.rjust(w) if i in right else text.ljust(w)

    out: list[str] = []
    for k, r in enumerate(all_rows):
        head = " " * indent + "".join(cell(r[i], i, widths[i]) + sep for i in range(ncol - 1))
        pieces = _wrap(r[-1], last)
        out.append((head + cell(pieces[0], ncol - 1, last)).rstrip())
        out += [(" " * fixed + p).rstrip() for p in pieces[1:]]
        if k == 0 and header and rule:
            out.append(" " * indent + "".join("-" * w + sep for w in widths[:-1]) + "-" * last)
    return out


def _wrap(text: str, width: int) -> list[str]:
    if len(text) <= width:
        return [text]
    lines, cur = [], ""
    for word in text.split(" "):
        while len(word) > width:  # a single word longer than the column: hard split
            if cur:
                lines.append(cur)
                cur = ""
            lines.append(word[:width])
            word = word[width:]
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    if cur:
        lines.append(cur)
    return lines or [""]


# -- pieces of a report --------------------------------------------------------------------------------------------

def _budget(plan: Plan) -> float | None:
    b = plan.provenance.get("memory_budget")
    return float(b) if isinstance(b, (int, float)) and b > 0 else None


def headline(plan: Plan) -> str:
    """'gpt-tiny, batch 16 x seq 64 on cpu:8 (10 meshes considered in 0.6 s)' from the provenance."""
    prov = plan.provenance
    what = [str(prov["model"])] if prov.get("model") else []
    if prov.get("batch") is not None:
        what.append(f"batch {prov['batch']}" + (f" x seq {prov['seq']}" if prov.get("seq") is not None else ""))
    text = ", ".join(what) or "plan"
    if prov.get("cluster"):
        text += f" on {prov['cluster']}"
        if prov.get("calibrated_from"):
            text += " (calibrated)"
    solver = prov.get("solver") or {}
    if solver.get("meshes_considered"):
        n = solver["meshes_considered"]
        text += f" ({n} mesh{'es' if n != 1 else ''} considered in {solver.get('seconds', 0):.1f} s)"
    return text


def _breakdown(d: Mapping[str, float], fmt, total: float | None = None) -> str:
    items = sorted(((k, v) for k, v in d.items() if v), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {fmt(v)}" for k, v in items)


def memory_line(plan: Plan) -> str:
    pred = plan.predicted
    mem = pred.get("memory_bytes_per_device")
    if mem is None:
        return "-"
    budget = _budget(plan)
    text = format_bytes(mem)
    if budget:
        text += f" of {format_bytes(budget)} budget ({format_percent(mem / budget)})"
    parts = _breakdown(pred.get("memory_breakdown") or {}, format_bytes)
    return text + (f": {parts}" if parts else "")


def comm_items(comm: Mapping[str, float]) -> list[tuple[str, float]]:
    return sorted(((k, float(v)) for k, v in comm.items() if v), key=lambda kv: (-kv[1], kv[0]))


def summary(plan: Plan, *, top_comm: int = 3, runners_up: int = 4, width: int = WIDTH) -> str:
    """The short account `autoshard plan` prints: the chosen mesh and its predictions, then the runners-up."""
    pred = plan.predicted
    lines = [f"plan: {headline(plan)}"]
    rows = [["mesh", f"{plan.mesh_string()}   remat {plan.remat}"]]
    if pred:
        step = pred.get("step_seconds")
        parts = _breakdown(pred.get("time_breakdown") or {}, lambda v: format_percent(v / step, digits=0)
                           if step else format_seconds(v))
        rows.append(["step time", format_seconds(step) + (f" ({parts})" if parts else "")])
        rows.append(["memory/device", memory_line(plan)])
        items = comm_items(pred.get("comm_bytes") or {})
        total = sum(v for _, v in items)
        if items:
            top = ", ".join(f"{k} {format_bytes(v)}" for k, v in items[:top_comm])
            more = f", +{len(items) - top_comm} more" if len(items) > top_comm else ""
            rows.append(["communication", f"{format_bytes(total)}/device/step: {top}{more}"])
        else:
            rows.append(["communication", "none"])
    else:
        rows.append(["predicted", "(none: this plan carries no predictions)"])
    if plan.pipeline is not None:
        rows.append(["pipeline", pipeline_line(plan)])
    why = why_line(plan)
    if why:
        rows.append(["why", why])
    remat = remat_line(plan)
    if remat:
        rows.append(["remat", remat])
    split = seq_expert_line(plan)
    if split:
        rows.append(["seq/expert", split])
    lines += table(rows, width=width)
    if plan.alternatives and runners_up:
        lines.append("runners-up:")
        lines += alternatives_table(plan, limit=runners_up, width=width)
    return "\n".join(lines)


def pipeline_line(plan: Plan) -> str:
    """'4 stages, layers per stage 6 (x4), gpipe, 96 microbatches: bubble 13.5% of the step, 111 ticks, 96+1 live
    buffers/device'."""
    spec = plan.pipeline
    runs: list[list[int]] = []  # [layers, stages] runs: 3x32 for 32 stages of 3 layers
    for s, e in spec.stages:
        if runs and runs[-1][0] == e - s:
            runs[-1][1] += 1
        else:
            runs.append([e - s, 1])
    counts = ", ".join(f"{n} (x{k})" if k > 1 else str(n) for n, k in runs)
    text = (f"{len(spec.stages)} stages, layers per stage {counts}, {spec.schedule}"
            + (f" (virtual {spec.virtual})" if spec.virtual > 1 else "") + f", {spec.microbatches} microbatches")
    pl = plan.predicted.get("pipeline") or {}
    if pl:
        text += (f": bubble {format_percent(pl['bubble'])} of the step, {pl['ticks']} ticks, "
                 f"{pl['act_slots']}+{pl['cot_slots']} live buffers/device")
        if pl.get("stash"):  # forwards keep their residuals for their backward (no recompute)
            text += f", {pl['stash_slots']} residual slots of {format_bytes(pl['stash_bytes_per_slot'])}"
            if pl.get("grad_slots"):  # zb: what each B saves for its W
                n = pl["grad_slots"]
                text += f", {n} grad slot{'s' if n != 1 else ''} of {format_bytes(pl.get('grad_bytes_per_slot'))}"
        elif "stash" in pl:
            text += ", each backward recomputes its stage's forward" + (" (remat full)" if plan.remat == "full" else "")
    return text


def _candidate_text(entry: Mapping[str, Any]) -> str:
    text = f"{mesh_string(entry.get('mesh') or {})} {format_seconds(entry.get('step_seconds'))}, " \
           f"{format_bytes(entry.get('memory_bytes_per_device'))}"
    if entry.get("schedule"):
        text += f" ({entry['schedule']}, {entry['microbatches']} microbatches)"
    return text


def why_line(plan: Plan) -> str:
    """Why pipelining or not: the best plan of the other kind, its predicted time and memory."""
    why = plan.provenance.get("pipeline_choice") or {}
    if not why:
        return ""
    other = why.get("best_without_pipeline" if plan.pipeline else "best_with_pipeline") or {}
    kind = "without a pipeline" if plan.pipeline else "with a pipeline"
    if not other.get("considered"):
        return f"no mesh {kind} was considered (fixed mesh, or a model without a layer stack)"
    if not other.get("fits"):
        return f"no plan {kind} fits the memory budget ({other['considered']} meshes tried)"
    step = plan.predicted.get("step_seconds")
    ratio = other["step_seconds"] / step - 1 if step else None
    return f"the best plan {kind} is {_candidate_text(other)}: {format_percent(ratio, signed=True)} time"


def remat_line(plan: Plan) -> str:
    """Why this remat: the same plan under the other one, its predicted time and memory against the budget."""
    why = plan.provenance.get("remat_choice") or {}
    chosen = why.get("chosen", plan.remat)
    if why.get("fixed"):
        return f"{chosen}, as fixed"
    if why.get("only"):
        return f"{chosen}: the only remat this model's loop of blocks runs (remat needs a scanned layer stack)"
    if "other" not in why:
        return ""
    step = plan.predicted.get("step_seconds")
    mem = plan.predicted.get("memory_bytes_per_device")
    time_ = format_percent(why["step_seconds"] / step - 1, signed=True) if step else "?"
    held = format_bytes(why["memory_bytes_per_device"])
    if chosen == "full":
        if not why["fits"]:
            return f"full: without it this plan would hold {held} per device, over the budget"
        # (these layouts fit without it, but the search's own no-remat solution on this mesh did not)
        return f"full: without it these layouts would hold {held} per device ({time_} time), yet no plan on this " \
               f"mesh fitted without remat in the search"
    saved = format_percent(1 - why["memory_bytes_per_device"] / mem) if mem else "?"
    return f"none: the plan fits without it; full remat would hold {held} ({saved} less) for {time_} time"


def seq_expert_line(plan: Plan) -> str:
    """The sequence method / expert degree and why: the best plan of the other kind (with or without seq/expert)."""
    why = plan.provenance.get("seq_expert_choice") or {}
    used = plan.mesh["seq"] > 1 or plan.mesh["expert"] > 1
    parts = []
    if plan.mesh["seq"] > 1:
        parts.append(f"{(plan.sequence or {}).get('method', 'ring')} attention over seq={plan.mesh['seq']}")
    if plan.mesh["expert"] > 1:
        parts.append(f"experts split over expert={plan.mesh['expert']} (all-to-all dispatch)")
    text = "; ".join(parts) or "none"
    other = why.get("best_without" if used else "best_with") or {}
    kind = "without seq/expert" if used else "with seq or expert > 1"
    if not why or not other.get("considered"):
        return text if used else ""
    if not other.get("fits"):
        return f"{text}: no plan {kind} fits the memory budget ({other['considered']} meshes tried)"
    step = plan.predicted.get("step_seconds")
    ratio = other["step_seconds"] / step - 1 if step else None
    method = f" {other['sequence']}" if other.get("sequence") else ""
    return f"{text}: the best plan {kind} is {_candidate_text(other)}{method}: " \
           f"{format_percent(ratio, signed=True)} time (search figures)"


def alternatives_table(plan: Plan, *, limit: int | None = None, width: int = WIDTH) -> list[str]:
    """The chosen plan and its runners-up: time against the chosen one, memory (marked where it exceeds the
    budget: such a plan may be faster, but it does not fit), bytes moved."""
    best = plan.predicted.get("step_seconds")
    budget = _budget(plan)
    rows = []
    entries = [("chosen", plan.mesh, plan.remat, plan.predicted)] if plan.predicted else []
    entries += [(f"#{i + 2}", alt.get("mesh") or {}, alt.get("remat", "none"), alt.get("predicted") or {})
                for i, alt in enumerate(plan.alternatives[:limit] if limit else plan.alternatives)]
    for rank, mesh, remat, pred in entries:
        step = pred.get("step_seconds")
        slower = (step / best - 1) if (step is not None and best) else None
        comm = sum((pred.get("comm_bytes") or {}).values())
        pl = pred.get("pipeline")
        where = mesh_string(mesh) + (f" {pl['schedule']} M={pl['microbatches']}" if pl else "")
        mem = pred.get("memory_bytes_per_device")
        over = budget is not None and mem is not None and mem > budget
        rows.append([rank, where, remat, format_seconds(step),
                     "" if rank == "chosen" else format_percent(slower, signed=True),
                     format_bytes(mem) + (" over budget" if over else ""), format_bytes(comm)])
    return table(rows, header=["", "mesh", "remat", "step", "vs best", "memory/dev", "comm/dev"],
                 right=(3, 4, 5, 6), width=width)


def recorded_params(plan: Plan) -> dict[str, tuple]:
    """path -> (shape, logical axes) as `autoshard.plan` recorded them in the plan's provenance (empty if absent)."""
    recorded = plan.provenance.get("params")
    if not isinstance(recorded, Mapping):
        return {}
    return {p: (tuple(v[0]), tuple(v[1]) if v[1] else None) for p, v in recorded.items()
            if isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], (list, tuple))}


def param_rows(plan: Plan, params: Mapping[str, ParamInfo] | None = None) -> list[list[str]]:
    rows = []
    params = params or {}
    for path, spec in plan.params.items():
        shape, axes = params.get(path, (None, None))
        shape_text = "x".join(map(str, shape)) if shape else ("()" if shape == () else "?")
        per_dev = "x".join(map(str, shard_shape(shape, spec, plan.mesh))) if shape else ""
        rows.append([path, shape_text, format_spec(spec), per_dev, describe_spec(spec, shape, axes, plan.mesh)])
    return rows


def param_table(plan: Plan, params: Mapping[str, ParamInfo] | None = None, *, width: int = WIDTH) -> list[str]:
    """One row per parameter: path, shape, spec, per-device block, and what the spec means."""
    rows = param_rows(plan, params)
    header = ["parameter", "shape", "spec", "per device", "strategy"]
    keep = [0, 1, 2, 3, 4] if params else [0, 2, 4]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    if params and 2 + sum(widths) + 2 * 4 > width:  # too wide: drop the per-device block (the footer sums it)
        keep = [0, 1, 2, 4]
    return table([[r[i] for i in keep] for r in rows], header=[header[i] for i in keep], width=width)


def breakdown_tables(plan: Plan, *, width: int = WIDTH) -> list[str]:
    """Predicted step time, memory and communication, each by component with its share of the total."""
    pred = plan.predicted
    if not pred:
        return ["(this plan carries no predictions: `autoshard verify` computes them for the local devices)"]
    lines: list[str] = []
    step = pred.get("step_seconds") or 0.0
    tb = pred.get("time_breakdown") or {}
    rows = [[k, format_seconds(v), format_percent(v / step) if step else "-"]
            for k, v in sorted(tb.items(), key=lambda kv: -kv[1])]
    lines.append(f"predicted step time: {format_seconds(step)}")
    lines += table(rows + [["total", format_seconds(step), "100.0%" if step else "-"]],
                   header=["component", "seconds", "share"], right=(1, 2), width=width)
    mem = pred.get("memory_bytes_per_device") or 0.0
    budget = _budget(plan)
    lines += ["", f"predicted memory per device: {format_bytes(mem)}"
              + (f" of {format_bytes(budget)} budget ({format_percent(mem / budget)})" if budget else "")]
    mb = pred.get("memory_breakdown") or {}
    rows = [[k, format_bytes(v), format_percent(v / mem) if mem else "-"]
            for k, v in sorted(mb.items(), key=lambda kv: -kv[1])]
    lines += table(rows + [["total", format_bytes(mem), "100.0%" if mem else "-"]],
                   header=["component", "bytes", "share"], right=(1, 2), width=width)
    items = comm_items(pred.get("comm_bytes") or {})
    total = sum(v for _, v in items)
    lines += ["", f"predicted communication per device per step: {format_bytes(total)}"]
    if items:
        rows = [[k, format_bytes(v), format_percent(v / total)] for k, v in items]
        lines += table(rows + [["total", format_bytes(total), "100.0%"]],
                       header=["mesh axes/collective", "bytes sent", "share"], right=(1, 2), width=width)
    else:
        lines.append("  (no communication)")
    return lines


def explain(plan: Plan, params: Mapping[str, ParamInfo] | None = None, *, source: str = "",
            width: int = WIDTH) -> str:
    """The full report of `autoshard explain`: header, parameter strategies, predicted breakdowns, runners-up.

    `params` (path -> shape, logical axes) defaults to the table the planner recorded in the plan's provenance.
    """
    prov = plan.provenance
    params = params or recorded_params(plan)
    lines = ([f"file: {source}"] if source else []) + [
             f"plan: {headline(plan)}",
             f"mesh {plan.mesh_string()} ({plan.num_devices} devices), remat {plan.remat}, batch split "
             f"{plan.batch_shards} ways (data x fsdp)"]
    if prov.get("calibrated_from"):
        lines.append(f"cluster calibrated from {prov['calibrated_from']}")
    if plan.pipeline is not None:
        lines += _wrap(f"pipeline: {pipeline_line(plan)}", width)
        lines += ["", "schedule (device x tick: F/B microbatch, chunk letter with virtual stages; . idle):"]
        lines += timeline(plan, width=width)
    for label, text in (("why", why_line(plan)), ("remat", remat_line(plan))):
        if text:
            lines += _wrap(f"{label}: {text}", width)
    lines += ["", "parameters:"] + param_table(plan, params, width=width)
    if params:
        known = [(params[p][0], s) for p, s in plan.params.items() if params.get(p, (None,))[0] is not None]
        total = sum(math.prod(shape) for shape, _ in known)
        per_dev = sum(math.prod(shard_shape(shape, s, plan.mesh)) for shape, s in known)
        lines.append(f"  {format_count(total)} parameters; {format_count(per_dev)} on each device "
                     f"({format_percent(per_dev / total) if total else '-'})")
    if plan.activations:
        lines += ["", "activations:"] + table([[k, format_spec(v)] for k, v in plan.activations.items()], width=width)
    lines += [""] + breakdown_tables(plan, width=width)
    if plan.alternatives:
        lines += ["", "runners-up (the planner's next best meshes):"] + alternatives_table(plan, width=width)
    return "\n".join(lines)





# -- pipeline schedule as text (autoshard.figures draws it) ---------------------------------------------------------

def plan_schedule(plan: Plan):
    """The plan's schedule table (`planner.schedule.make_schedule`) with its stash, read as the planner reads the
    plan's pipeline mode (its remat, and its spec's `stash`): zb has one only with the stash (else its one-line
    error)."""
    from planner.schedule import make_schedule, pipeline_mode, stashes

    spec = plan.pipeline
    stash = stashes(pipeline_mode(plan.remat, spec.stash))  # as `autoshard.pipeline.Pipeline` reads it
    return make_schedule(spec.schedule, plan.mesh["pipe"], spec.microbatches, spec.virtual, stash)


def timeline(plan: Plan, *, width: int = WIDTH) -> list[str]:
    """The schedule as text, one row per pipe device (cut into blocks of ticks that fit `width`; zb's W ops as
    `W<microbatch>`)."""
    rows = plan_schedule(plan).timeline()
    heads = [r[: r.index(":") + 2] for r in rows]
    cells = [r[r.index(":") + 2:].split(" ") for r in rows]
    cells = [[c for c in row if c != ""] for row in cells]
    ticks = max(len(row) for row in cells)
    cw = max(len(c) for row in cells for c in row) + 1
    per = max(1, (width - len(heads[0])) // cw)
    out = []
    for start in range(0, ticks, per):
        if start:
            out.append(f"  ... ticks {start}-{min(ticks, start + per) - 1}:")
        for h, row in zip(heads, cells):
            out.append("  " + h + "".join(c.ljust(cw) for c in row[start:start + per]).rstrip())
    return out


__all__ = ["alternatives_table", "breakdown_tables", "describe_spec", "explain", "format_bytes", "format_count",
           "format_percent", "format_seconds", "format_spec", "headline", "param_table", "pipeline_line", "remat_line",
           "shard_shape", "summary", "table", "timeline", "why_line"]
