"""What a compiled (SPMD-partitioned) train step really costs, per device: memory, FLOPs and communication.

    stats = analyze(trainer.compile(batch), trainer.mesh)
    print(format_report(stats))

The planner predicts the same keys (`memory_bytes_per_device`, `flops_per_device`, `comm_bytes`, `comm_counts`), so
`autoshard verify` can put the two side by side. Everything comes from `compiled.memory_analysis()`,
`compiled.cost_analysis()` and the post-optimisation HLO text `compiled.as_text()`, so it works on CPU, GPU and TPU.

Communication is attributed to mesh axes: every collective's replica groups (iota, Shardy mesh or explicit lists) are
expanded to partition ids, and partition id p is the device at position p of `mesh.devices.flat`. Bytes are bytes
*sent per device per step* under the ring model, multiplied by how often the op runs (while-loop trip counts).

XLA:CPU never forms reduce-scatter: it emits an all-reduce whose result is only read through a `dynamic-slice`
indexed by `partition-id` (often inside fusions, with the index hoisted out of the layer loop). Such an all-reduce
is reported as the reduce-scatter it is (`from_all_reduce: True`); `comm_bytes_raw` keeps the un-normalised figures.
The slice offsets are evaluated for every partition, so an all-reduce over data+fsdp read as an fsdp shard becomes
an fsdp reduce-scatter plus a data all-reduce of the shard, as ZeRO on GPU/TPU would compile it.

`flops_per_device` counts matmul FLOPs through loop trip counts (XLA's `cost_analysis()` counts a while body once)
and through the conditional branches actually taken: a branch index computed from constants, the enclosing loops'
induction variables and partition-id (a pipeline's per-tick `lax.switch` over its schedule table) is evaluated for
every iteration and partition, so each stage's FLOPs are its own (`flops_by_device`); where an index cannot be
evaluated every branch counts (`branches_exact: False`, an upper bound). Collectives are counted the same way.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from autoshard.liveness import peak_live_set
from autoshard.hlo import (COLLECTIVES, HloModule, PartitionEval, device_multiplicities, dot_flops, elements,
                           group_axes, mesh_shape, multiplicities, parse_hlo, permute_axes, replica_groups,
                           restore_constants, scatter_pattern, shape_bytes, source_target_pairs)
from planner import jax_internals
from planner.search import format_bytes


# -- statistics ---------------------------------------------------------------------------------------------------

def _ring_bytes(collective: str, n: int, operand_bytes: float) -> float:
    """Bytes one device sends for one execution (bandwidth-optimal ring algorithms)."""
    if n <= 1:
        return 0.0
    if collective == "all-reduce":
        return 2 * (n - 1) / n * operand_bytes
    if collective == "all-gather":
        return (n - 1) * operand_bytes
    if collective in ("reduce-scatter", "all-to-all", "ragged-all-to-all"):
        return (n - 1) / n * operand_bytes
    return operand_bytes  # collective-permute, collective-broadcast


def collective_stats(hlo: str | HloModule, mesh: Any, mult: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Per-op and per-'<axes>/<collective>' communication of an SPMD-partitioned HLO module (see module doc); `mult`
    is `multiplicities(mod)` when the caller has it already."""
    mod = parse_hlo(hlo) if isinstance(hlo, str) else hlo
    mult = multiplicities(mod) if mult is None else mult
    ev = PartitionEval(mod)
    ops: list[dict[str, Any]] = []
    for comp, instrs in mod.comps.items():
        k = mult.get(comp, 0.0)
        if k == 0.0:
            continue  # unreachable from the entry
        for ins in instrs:
            base = ins.opcode[:-6] if ins.opcode.endswith("-start") else ins.opcode
            if base not in COLLECTIVES:
                continue
            operand_shapes = [mod.by_name[o].shape if o in mod.by_name else "" for o in ins.operands]
            op_name = (re.search(r'op_name="([^"]*)"', ins.attrs) or [None, None])[1]
            if base == "collective-permute":
                pairs = source_target_pairs(ins.attrs)
                groups, n, axes = None, len(pairs), permute_axes(pairs, mesh)
            else:
                groups = replica_groups(ins.attrs, mod.num_partitions)
                n, axes = int(groups.shape[1]), group_axes(groups, mesh)
            common = dict(name=ins.name, computation=comp, executions=k, op_name=op_name)
            raw_key = f"{axes}/{base}"
            # split a (variadic) all-reduce by what its readers do with each operand
            parts: dict[tuple[int, str, str] | None, float] = defaultdict(float)
            counts: dict[tuple[int, str, str] | None, int] = defaultdict(int)
            for j, shape in enumerate(operand_shapes):
                pattern = None
                if base == "all-reduce" and groups is not None and n > 1 and axes != "none":
                    pattern = scatter_pattern(mod, ev, ins, j if ins.shape.startswith("(") else None, groups,
                                       elements(shape), mesh)
                parts[pattern] += shape_bytes(shape)
                counts[pattern] += 1
            for pattern, s in parts.items():
                raw = _ring_bytes(base, n, s) * k if axes != "none" else 0.0
                if pattern is None:
                    ops.append(dict(common, collective=base, axes=axes, group_size=n, operand_bytes=s,
                                    bytes=raw, raw_bytes=raw, raw_key=raw_key, from_all_reduce=False,
                                    operands=counts[pattern]))
                    continue
                r, scatter_axes, rest_axes = pattern
                ops.append(dict(common, collective="reduce-scatter", axes=scatter_axes, group_size=r,
                                operand_bytes=s, bytes=_ring_bytes("reduce-scatter", r, s) * k, raw_bytes=raw,
                                raw_key=raw_key, from_all_reduce=True, operands=counts[pattern]))
                if n // r > 1:  # the rest of the group all-reduces the 1/r shard
                    ops.append(dict(common, collective="all-reduce", axes=rest_axes, group_size=n // r,
                                    operand_bytes=s / r, bytes=_ring_bytes("all-reduce", n // r, s / r) * k,
                                    raw_bytes=0.0, raw_key=raw_key, from_all_reduce=True,
                                    operands=counts[pattern]))
    comm_bytes: dict[str, float] = defaultdict(float)
    comm_counts: dict[str, float] = defaultdict(float)
    comm_raw: dict[str, float] = defaultdict(float)
    for op in ops:
        if op["axes"] != "none":
            key = f"{op['axes']}/{op['collective']}"
            comm_bytes[key] += op["bytes"]
            comm_counts[key] += op["executions"]
        if op["raw_bytes"] or not op["from_all_reduce"]:
            if not op["raw_key"].startswith("none/"):
                comm_raw[op["raw_key"]] += op["raw_bytes"]
    return dict(comm_bytes=dict(comm_bytes), comm_counts={k: _intlike(v) for k, v in comm_counts.items()},
                comm_bytes_raw=dict(comm_raw), collectives=ops, num_partitions=mod.num_partitions)


PEAK_TOP = 8
"""Buffers of the simulated memory peak `analyze` lists (largest first)."""


def _intlike(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def analyze(compiled: Any, mesh: Any) -> dict[str, Any]:
    """Per-device memory, FLOPs and communication of a compiled SPMD program (`jax.stages.Compiled`).

    `flops_per_device` counts matmul FLOPs through loop trip counts and the conditional branches taken
    (`device_multiplicities`), averaged over partitions; `flops_by_device` lists them per partition (a pipeline
    stage runs its own schedule). `branches_exact` is False when some conditional's branch index could not be
    evaluated: its branches then all count, and the FLOPs are an upper bound. `flops_xla` is XLA's own
    `cost_analysis()` figure, which counts each while body once. `memory_peak` says what the temporaries are at
    their peak, as simulated from the schedule (`autoshard.liveness`): bytes by kind and the largest buffers.

    `mesh` (a jax Mesh, or an ordered {axis: size}) names the axes that communication is attributed to; it must be
    the mesh whose `devices.flat` order the program was compiled for.
    """
    memory = jax_internals.memory_stats(compiled)
    ca = jax_internals.cost_stats(compiled)
    mod = parse_hlo(jax_internals.hlo_text(compiled))
    restore_constants(mod, compiled)
    per_device, exact = device_multiplicities(mod)
    by_device = np.broadcast_to(dot_flops(mod, per_device), (mod.num_partitions,))
    comm = collective_stats(mod, mesh, {c: float(np.mean(m)) for c, m in per_device.items()})
    peak = peak_live_set(mod)
    memory_peak = {"temp_bytes": peak.temp_bytes, "at": peak.at, "by_kind": peak.by_kind(),
                   "top": [[b.nbytes, b.shape, b.op_name] for b in peak.buffers[:PEAK_TOP]]}
    return dict(memory_bytes_per_device=memory["argument"] + memory["output"] + memory["temp"] - memory["alias"],
                memory=memory, memory_peak=memory_peak, flops_per_device=float(np.mean(by_device)),
                flops_by_device=[float(f) for f in by_device], branches_exact=exact,
                flops_xla=float(ca.get("flops", 0.0)), **comm, mesh=mesh_shape(mesh))


def analyze_jitted(jitted: Any, *args: Any, mesh: Any = None, **kwargs: Any) -> dict[str, Any]:
    """`analyze` for a jitted function and example arguments (the mesh defaults to that of a sharded argument)."""
    if mesh is None:
        import jax

        meshes = [getattr(getattr(x, "sharding", None), "mesh", None) for x in jax.tree.leaves((args, kwargs))]
        mesh = next((m for m in meshes if m is not None and hasattr(m, "devices")), None)
        if mesh is None:
            raise ValueError("analyze_jitted: pass mesh=..., no argument carries a NamedSharding")
    return analyze(jitted.lower(*args, **kwargs).compile(), mesh)


# -- report -------------------------------------------------------------------------------------------------------



def peak_line(stats: Mapping[str, Any]) -> str:
    """One line on what the compiled step holds at its memory peak (`memory_peak`), by kind of buffer."""
    peak = stats.get("memory_peak")
    if not peak:
        return ""
    kinds = ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(peak["by_kind"].items(), key=lambda kv: -kv[1]))
    return f"temporaries at the peak (simulated from the schedule): {format_bytes(peak['temp_bytes'])}: {kinds}"


def _flops_line(stats: Mapping[str, Any]) -> str:
    """The FLOPs line of `format_report`: the mean over devices, their spread when stages differ, and whether some
    conditional's branches were all counted (an upper bound)."""
    line = f"flops per device:  {stats['flops_per_device']:.4g} in matmuls"
    by_device = stats.get("flops_by_device") or []
    if len(by_device) > 1 and min(by_device) != max(by_device):
        line += f" (mean over devices, {min(by_device):.4g} to {max(by_device):.4g})"
    if stats.get("branches_exact") is False:
        line += ", an upper bound: every branch of a conditional whose index could not be evaluated is counted"
    if "flops_xla" in stats:
        line += f"  (XLA cost analysis: {stats['flops_xla']:.4g}, loop bodies counted once)"
    return line


def format_report(stats: Mapping[str, Any], ops: bool = False) -> str:
    """A terminal table of `analyze` output: memory, FLOPs, bytes per axis/collective (and per op with `ops`)."""
    mem = stats["memory"]
    mesh = stats.get("mesh") or {}
    lines = [f"mesh: {', '.join(f'{a}={n}' for a, n in mesh.items() if n > 1) or 'single device'}",
             f"memory per device: {format_bytes(stats['memory_bytes_per_device'])}  (argument "
             f"{format_bytes(mem['argument'])} + output {format_bytes(mem['output'])} + temp "
             f"{format_bytes(mem['temp'])} - alias {format_bytes(mem['alias'])})",
             *filter(None, [peak_line(stats)]),
             _flops_line(stats), ""]
    rows = [("axes/collective", "count", "bytes sent/device")]
    for key in sorted(stats["comm_bytes"], key=lambda k: -stats["comm_bytes"][k]):
        rows.append((key, f"{stats['comm_counts'][key]:g}", format_bytes(stats["comm_bytes"][key])))
    rows.append(("total", f"{sum(stats['comm_counts'].values()):g}", format_bytes(sum(stats["comm_bytes"].values()))))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]

    def fmt(r: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    rule = "  ".join("-" * w for w in widths)
    lines += [fmt(rows[0]), rule] + [fmt(r) for r in rows[1:-1]] + [rule, fmt(rows[-1])]
    if len(rows) == 2:
        lines.append("(no communication)")
    raw = stats.get("comm_bytes_raw", {})
    if any(o["from_all_reduce"] for o in stats["collectives"]):
        lines += ["", "reduce-scatters above were compiled as all-reduces read only through partition-indexed",
                  "slices (XLA:CPU does not form reduce-scatter); as compiled:"]
        lines += [f"{k:<{widths[0]}}  {format_bytes(v):>{widths[1] + 2 + widths[2]}}"
                  for k, v in sorted(raw.items(), key=lambda kv: -kv[1])]
    if ops:
        lines += ["", "per op:"]
        for o in sorted(stats["collectives"], key=lambda o: -o["bytes"]):
            lines.append(f"  {o['name']:<24} {o['axes'] + '/' + o['collective']:<28} n={o['group_size']:<3} "
                         f"x{o['executions']:g} in={format_bytes(o['operand_bytes'])} sent={format_bytes(o['bytes'])}  "
                         f"{(o['op_name'] or '')[-60:]}")
        top = (stats.get("memory_peak") or {}).get("top") or []
        if top:
            lines += ["", f"largest buffers at the memory peak ({stats['memory_peak']['at']}):"]
            lines += [f"  {format_bytes(nb):>10}  {shape[:36]:<36} {op_name[-70:]}" for nb, shape, op_name in top]
    return "\n".join(lines)


__all__ = ["analyze", "analyze_jitted", "collective_stats", "format_report", "peak_line"]
