"""The Plan: the contract between the planner (which decides) and the runtime (which does).

A Plan is plain data with a versioned JSON round trip, readable and editable by a person. It names a size for each
axis of a fixed mesh vocabulary, a PartitionSpec (as a list) for each parameter by its state path, the specs of
activations at layer boundaries, and the pipeline / sequence / expert / remat choices. `predicted` holds the
planner's figures under the same keys that `autoshard.analysis` reports from a compiled program.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from planner.errors import PlanError

VERSION = 1
AXES: tuple[str, ...] = ("pipe", "data", "fsdp", "expert", "seq", "tensor")
"""Mesh axis vocabulary, in device order: the last axis (`tensor`) varies fastest, so it lands on neighbouring
devices (the fastest links)."""

BATCH_AXES: tuple[str, ...] = ("expert", "data", "fsdp")
"""Mesh axes the global batch is split over, major to minor. Expert parallelism doubles as data parallelism outside
the experts, and its shard_map takes contiguous batch blocks per expert device, so `expert` is the major one."""

SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved", "zb", "zb-h1")
SEQUENCE_METHODS: tuple[str, ...] = ("ulysses", "ring")
REMAT: tuple[str, ...] = ("none", "full", "dots")
ACTIVATIONS: tuple[str, ...] = ("layer_input",)
"""The activations the shipped models mark with `autoshard.ops.boundary` (a user's model may mark others)."""


def check_activations(plan: "Plan", known: tuple[str, ...] = ACTIVATIONS) -> None:
    """A plan for a model that marks only `known` activations must not name others (a typo would lay out nothing)."""
    unknown = sorted(set(plan.activations) - set(known))
    if unknown:
        raise PlanError(f"plan lays out unknown activation {unknown[0]!r}: the model marks {', '.join(known)}")
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "mesh": (dict,), "params": (dict,), "activations": (dict,), "pipeline": (dict, type(None)),
    "sequence": (dict, type(None)), "experts": (dict, type(None)), "remat": (str,), "predicted": (dict,),
    "alternatives": (list,), "provenance": (dict,), "version": (int,)}
"""The JSON type of each plan field (null allowed where a section is optional)."""
_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", type(None): "null"}

SpecEntry = str | list[str] | None
"""One dimension of a spec: unsharded (None), one mesh axis, or several mesh axes (major to minor)."""


@dataclasses.dataclass
class PipelineSpec:
    stages: list[list[int]]
    """Half-open layer ranges [start, end) of each stage, in order."""
    microbatches: int = 1
    schedule: str = "1f1b"
    virtual: int = 1
    stash: bool = True
    """Without remat: forwards keep their residuals for their backward (no recompute; more memory). False: each
    backward recomputes its stage's forward (`planner.schedule.PIPELINE_MODES`)."""

    def validate(self, pipe: int) -> None:
        for name in ("microbatches", "virtual"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise PlanError(f"pipeline {name} must be an integer, got {v!r}")
        if not isinstance(self.stages, (list, tuple)) or not all(
                isinstance(s, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in s)
                for s in self.stages):
            raise PlanError(f"pipeline stages must be a list of [start, end] integer pairs, got {self.stages!r}")
        if not isinstance(self.stash, bool):
            raise PlanError(f"pipeline stash must be true or false, got {self.stash!r}")
        if self.schedule not in SCHEDULES:
            raise PlanError(f"unknown pipeline schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.microbatches < 1:
            raise PlanError(f"pipeline microbatches must be >= 1, got {self.microbatches}")
        if self.virtual < 1:
            raise PlanError(f"pipeline virtual stages must be >= 1, got {self.virtual}")
        if len(self.stages) != pipe * self.virtual:
            raise PlanError(f"pipeline has {len(self.stages)} stages but mesh pipe={pipe} x virtual={self.virtual} "
                            f"needs {pipe * self.virtual}")
        prev = 0
        for s in self.stages:
            if len(s) != 2 or s[0] != prev or s[1] <= s[0]:
                raise PlanError(f"pipeline stages must be contiguous non-empty [start, end) ranges, got {self.stages}")
            prev = s[1]


@dataclasses.dataclass
class Plan:
    mesh: dict[str, int]
    params: dict[str, list[SpecEntry]] = dataclasses.field(default_factory=dict)
    activations: dict[str, list[SpecEntry]] = dataclasses.field(default_factory=dict)
    pipeline: PipelineSpec | None = None
    sequence: dict[str, Any] | None = None
    experts: dict[str, Any] | None = None
    remat: str = "none"
    predicted: dict[str, Any] = dataclasses.field(default_factory=dict)
    alternatives: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    version: int = VERSION

    def __post_init__(self) -> None:
        self.mesh = normalize_mesh(self.mesh)
        if isinstance(self.pipeline, dict):
            self.pipeline = PipelineSpec(**self.pipeline)
        self.params = {k: [_entry(e) for e in v] for k, v in self.params.items()}
        self.activations = {k: [_entry(e) for e in v] for k, v in self.activations.items()}

    # -- derived -----------------------------------------------------------------------------------------------
    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def batch_shards(self) -> int:
        return math.prod(self.mesh[a] for a in BATCH_AXES)

    def mesh_string(self) -> str:
        used = [f"{a}={n}" for a, n in self.mesh.items() if n > 1]
        return ",".join(used) or "single device"

    # -- checks ------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Internal consistency (independent of any model): axis names, spec entries, pipeline shape."""
        if self.version != VERSION:
            raise PlanError(f"plan version {self.version} is not supported (this autoshard reads version {VERSION})")
        for table in (self.params, self.activations):
            for path, spec in table.items():
                used: list[str] = []
                for e in spec:
                    for ax in _axes_of(e):
                        if ax not in AXES:
                            raise PlanError(f"spec of {path!r} names unknown mesh axis {ax!r}: use {', '.join(AXES)}")
                        if ax in used:
                            raise PlanError(f"spec of {path!r} uses mesh axis {ax!r} twice")
                        used.append(ax)
        if self.remat not in REMAT:
            raise PlanError(f"unknown remat {self.remat!r}: use one of {', '.join(REMAT)}")
        for name in self.activations:
            if not isinstance(name, str) or not name:
                raise PlanError(f"plan lays out activation {name!r}: name it as the model's autoshard.ops.boundary "
                                f"call does (the shipped models mark {', '.join(ACTIVATIONS)})")
        if self.pipeline is not None:
            self.pipeline.validate(self.mesh["pipe"])
        elif self.mesh["pipe"] > 1:
            raise PlanError(f"mesh has pipe={self.mesh['pipe']} but the plan has no pipeline section")
        if self.sequence is not None and self.sequence.get("method") not in SEQUENCE_METHODS:
            raise PlanError(f"unknown sequence method {self.sequence.get('method')!r}: use one of "
                            f"{', '.join(SEQUENCE_METHODS)}")
        if self.mesh["seq"] > 1 and self.sequence is None:
            raise PlanError(f"mesh has seq={self.mesh['seq']} but the plan has no sequence section: add "
                            f"\"sequence\": {{\"method\": \"ring\"}} (or \"ulysses\")")

    # -- JSON --------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {"version": d.pop("version"), **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if not isinstance(d, dict) or "mesh" not in d:
            raise PlanError("not a plan: expected a JSON object with a 'mesh' field")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PlanError(f"plan has unknown field(s) {', '.join(unknown)}: remove them")
        for name, types in _FIELD_TYPES.items():
            v = d.get(name)
            if name in d and (not isinstance(v, types) or isinstance(v, bool)):
                want = " or ".join(_JSON_NAMES[t] for t in types)
                raise PlanError(f"plan field {name!r} must be {want}, got {json.dumps(v)[:60]}")
        for name in ("params", "activations"):
            for path, spec in (d.get(name) or {}).items():
                if not isinstance(spec, list):
                    raise PlanError(f"plan {name}[{path!r}] must be a list (one entry per dimension), got "
                                    f"{json.dumps(spec)[:60]}")
        if isinstance(d.get("sequence"), dict) and not isinstance(d["sequence"].get("method"), str):
            raise PlanError(f"plan sequence section needs \"method\": \"ring\" or \"ulysses\", got "
                            f"{json.dumps(d['sequence'])[:60]}")
        try:
            plan = cls(**d)
        except (TypeError, ValueError) as e:
            raise PlanError(f"malformed plan: {e}") from None
        plan.validate()
        return plan

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise PlanError(f"cannot read plan file {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise PlanError(f"cannot read plan file {path}: not a text file") from None
        try:
            return cls.from_json(text)
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from None


def normalize_mesh(mesh: dict[str, int] | str) -> dict[str, int]:
    """Full axis->size dict in vocabulary order, from a partial dict or a `data=2,tensor=4` string."""
    if isinstance(mesh, str):
        mesh = parse_mesh(mesh)
    if not isinstance(mesh, dict):
        raise PlanError(f"mesh must be a mapping of axis name to size, got {type(mesh).__name__}")
    for ax, n in mesh.items():
        if ax not in AXES:
            raise PlanError(f"unknown mesh axis {ax!r}: use {', '.join(AXES)}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PlanError(f"mesh axis {ax} must have a positive integer size, got {n!r}")
    return {a: int(mesh.get(a, 1)) for a in AXES}


def parse_mesh(text: str) -> dict[str, int]:
    """`data=2,fsdp=2,tensor=2` -> {'data': 2, 'fsdp': 2, 'tensor': 2}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, size = part.partition("=")
        name = name.strip()
        if not eq or not size.strip().isdigit():
            raise PlanError(f"bad mesh entry {part!r}: write axis=size, e.g. data=2,tensor=4")
        if name not in AXES:
            raise PlanError(f"unknown mesh axis {name!r}: use {', '.join(AXES)}")
        if name in out:
            raise PlanError(f"mesh axis {name!r} given twice")
        out[name] = int(size)
    if not out:
        raise PlanError("empty mesh: write axis=size pairs, e.g. data=2,tensor=4")
    return out


def _entry(e: Any) -> SpecEntry:
    if e is None or isinstance(e, str):
        return e
    if isinstance(e, (list, tuple)):
        if not all(isinstance(a, str) for a in e):
            raise PlanError(f"bad spec entry {e!r}: use null, an axis name or a list of axis names")
        return e[0] if len(e) == 1 else (list(e) or None)
    raise PlanError(f"bad spec entry {e!r}: use null, an axis name or a list of axis names")


def _axes_of(e: SpecEntry) -> list[str]:
    if e is None:
        return []
    return [e] if isinstance(e, str) else list(e)



def shard_count(entry: SpecEntry, mesh: dict[str, int]) -> int:
    """How many pieces a dimension with this spec entry is cut into."""
    return math.prod(mesh[a] for a in _axes_of(entry))
