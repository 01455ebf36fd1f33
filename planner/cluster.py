"""ClusterSpec: the hardware the planner plans for, as plain numbers.

A cluster is `num_devices` identical devices grouped into nodes of `devices_per_node`. Two link levels connect them:
`intra` (inside a node: NVLink, TPU ICI within a slice, or the host for emulated CPU devices) and `inter` (between
nodes: InfiniBand, TPU DCN between slices). Bandwidths are bytes/s per device in one direction, the figure a ring
collective sees; latencies are seconds per ring step (the alpha of the alpha-beta model); an optional overhead is a
fixed cost per collective op (0 in the presets; a profile of emulated CPU devices measures a large one).

Presets are named `kind:N` (`load_cluster("a100-80g:64")`). Their figures are datasheet values; link latencies and
the matmul efficiency are order-of-magnitude estimates. `planner.profile.calibrate` replaces figures with measured
ones. A cluster can also be read from a JSON or TOML file with the field names of `ClusterSpec.to_dict()`; a file
may name a preset as `base = "a100-80g:16"` and give only the fields it changes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from pathlib import Path
from typing import Any, Callable, Mapping

from planner.errors import AutoshardError
from planner.trace import itemsize

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Link:
    """One level of interconnect, as seen by one device."""

    bandwidth: float
    """Bytes/s a device can send in one direction during a collective."""
    latency: float
    """Seconds per ring step (alpha)."""
    overhead: float = 0.0
    """Fixed seconds per collective op on this level, whatever its size or group (launch / rendezvous cost)."""

    def to_dict(self) -> dict[str, float]:
        return {"bandwidth": self.bandwidth, "latency": self.latency, "overhead": self.overhead}


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    name: str
    num_devices: int
    devices_per_node: int
    memory_bytes: int
    """Memory per device."""
    peak_flops: dict[str, float]
    """Peak matmul FLOP/s per device, by dtype name ("float32", "bfloat16", ...)."""
    hbm_bandwidth: float
    """Device memory bandwidth in bytes/s, for memory-bound ops."""
    intra: Link
    inter: Link
    matmul_efficiency: float = 0.7
    """Fraction of peak that a large matmul achieves."""
    calibrated_from: str = ""
    """Empty for datasheet figures; else a description of the profile that replaced them."""
    collective_dtypes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Dtypes whose collectives the backend runs in a wider one ({"bfloat16": "float32"} on XLA:CPU, which
    computes and communicates bfloat16 in float32); a dtype not named moves its own bytes."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "peak_flops", {str(k): float(v) for k, v in dict(self.peak_flops).items()})
        object.__setattr__(self, "collective_dtypes", {dtype_name(k): dtype_name(v)
                                                       for k, v in dict(self.collective_dtypes).items()})
        for key in ("intra", "inter"):
            link = getattr(self, key)
            if isinstance(link, Mapping):
                object.__setattr__(self, key, _link_from(link, f"cluster {self.name!r}: {key}"))
        self._validate()

    def _validate(self) -> None:
        where = f"cluster {self.name!r}"
        if not isinstance(self.num_devices, int) or self.num_devices < 1:
            raise AutoshardError(f"{where}: num_devices must be a positive integer, got {self.num_devices!r}")
        if not isinstance(self.devices_per_node, int) or self.devices_per_node < 1:
            raise AutoshardError(f"{where}: devices_per_node must be a positive integer, got {self.devices_per_node!r}")
        if self.num_devices > self.devices_per_node and self.num_devices % self.devices_per_node:
            raise AutoshardError(f"{where}: {self.num_devices} devices do not fill whole nodes of "
                                 f"{self.devices_per_node}; use at most {self.devices_per_node} or a multiple of it")
        if not _finite(self.memory_bytes) or not self.memory_bytes > 0:
            raise AutoshardError(f"{where}: memory_bytes must be a positive finite number, got {self.memory_bytes!r}")
        if not self.peak_flops or any(not _finite(v) or not v > 0 for v in self.peak_flops.values()):
            raise AutoshardError(f"{where}: peak_flops needs a positive FLOP/s per dtype, got {self.peak_flops!r}")
        if "float32" not in self.peak_flops:
            raise AutoshardError(f"{where}: peak_flops must include 'float32' (the fallback for other dtypes)")
        if not _finite(self.hbm_bandwidth) or not self.hbm_bandwidth > 0:
            raise AutoshardError(f"{where}: hbm_bandwidth must be a positive finite number, got {self.hbm_bandwidth!r}")
        if not _finite(self.matmul_efficiency) or not 0 < self.matmul_efficiency <= 1:
            raise AutoshardError(f"{where}: matmul_efficiency must be in (0, 1], got {self.matmul_efficiency!r}")
        for key in ("intra", "inter"):
            link = getattr(self, key)
            if (not isinstance(link, Link) or not all(map(_finite, (link.bandwidth, link.latency, link.overhead)))
                    or not link.bandwidth > 0 or not link.latency >= 0 or not link.overhead >= 0):
                raise AutoshardError(f"{where}: {key} link needs bandwidth > 0, latency >= 0 and overhead >= 0, "
                                     f"got {link!r}")

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    # -- derived figures ---------------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        """`name:N`, as a plan's provenance records it."""
        return f"{self.name}:{self.num_devices}"

    @property
    def num_nodes(self) -> int:
        return math.ceil(self.num_devices / self.devices_per_node)

    def matmul_flops(self, dtype: Any = "float32") -> float:
        """FLOP/s a large matmul achieves on one device: peak x efficiency. Unknown dtypes use the float32 figure."""
        peak = self.peak_flops.get(dtype_name(dtype), self.peak_flops["float32"])
        return peak * self.matmul_efficiency

    def roofline_seconds(self, flops: float, bytes_accessed: float, dtype: Any = "float32") -> float:
        """Time of one op on one device: the larger of its compute time and its memory-traffic time."""
        return max(flops / self.matmul_flops(dtype), bytes_accessed / self.hbm_bandwidth)

    def wire_itemsize(self, dtype: Any) -> int:
        """Bytes per element a collective of `dtype` values moves on this backend (`collective_dtypes`)."""
        name = dtype_name(dtype)
        return itemsize(self.collective_dtypes.get(name, name))

    def link(self, level: str) -> Link:
        if level not in ("intra", "inter"):
            raise ValueError(f"link level must be 'intra' or 'inter', got {level!r}")
        return getattr(self, level)

    def replace(self, **changes: Any) -> ClusterSpec:
        return dataclasses.replace(self, **changes)

    def with_devices(self, n: int) -> ClusterSpec:
        """The same hardware with n devices (for cpu, the node grows with it)."""
        if self.name == "cpu":
            return self.replace(num_devices=n, devices_per_node=n)
        return self.replace(num_devices=n)

    # -- plain data --------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_devices": self.num_devices,
            "devices_per_node": self.devices_per_node,
            "memory_bytes": self.memory_bytes,
            "peak_flops": dict(self.peak_flops),
            "matmul_efficiency": self.matmul_efficiency,
            "hbm_bandwidth": self.hbm_bandwidth,
            "intra": self.intra.to_dict(),
            "inter": self.inter.to_dict(),
            "calibrated_from": self.calibrated_from,
            "collective_dtypes": dict(self.collective_dtypes),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "cluster") -> ClusterSpec:
        """Build from `to_dict()` output. A `base` key names a preset (`"a100-80g:16"`) that supplies missing fields."""
        if not isinstance(d, Mapping):
            raise AutoshardError(f"{where}: expected a table of fields, got {type(d).__name__}")
        d = dict(d)
        base = d.pop("base", None)
        if base is not None:
            if not isinstance(base, str):
                raise AutoshardError(f"{where}: base must be a preset string like 'a100-80g:16', got {base!r}")
            merged = _preset(base).to_dict()
            for key in ("peak_flops", "intra", "inter"):
                if isinstance(d.get(key), Mapping):
                    d[key] = {**merged[key], **d[key]}
            d = {**merged, **d}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise AutoshardError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        required = [n for n, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in d]
        if missing:
            raise AutoshardError(f"{where}: missing field(s) {', '.join(missing)}")
        try:
            kw = {
                "name": str(d["name"]),
                "num_devices": _int(d["num_devices"], "num_devices"),
                "devices_per_node": _int(d["devices_per_node"], "devices_per_node"),
                "memory_bytes": _int(d["memory_bytes"], "memory_bytes"),
                "peak_flops": {str(k): _num(v, f"peak_flops.{k}") for k, v in
                               _mapping(d["peak_flops"], "peak_flops").items()},
                "hbm_bandwidth": _num(d["hbm_bandwidth"], "hbm_bandwidth"),
                "intra": _link_from(d["intra"], f"{where}: intra"),
                "inter": _link_from(d["inter"], f"{where}: inter"),
            }
            if "matmul_efficiency" in d:
                kw["matmul_efficiency"] = _num(d["matmul_efficiency"], "matmul_efficiency")
            if "calibrated_from" in d:
                kw["calibrated_from"] = str(d["calibrated_from"])
            if "collective_dtypes" in d:
                kw["collective_dtypes"] = {str(k): str(v) for k, v in
                                           _mapping(d["collective_dtypes"], "collective_dtypes").items()}
        except (TypeError, ValueError, OverflowError) as e:
            raise AutoshardError(f"{where}: {_one_line(e)}") from None
        return cls(**kw)


def dtype_name(dtype: Any) -> str:
    """'float32' for float32 / 'f32' / jnp.float32 / np.dtype('float32'); likewise bf16, f16."""
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
    name = str(name).lower()
    return {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "half": "float16", "tf32": "float32",
            "f64": "float64", "fp32": "float32", "fp16": "float16"}.get(name, name)


def _int(v: Any, field: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
        raise ValueError(f"{field} must be an integer, got {v!r}")
    return int(v)


def _num(v: Any, field: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{field} must be a number, got {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{field} must be finite, got {v!r}")
    return float(v)


def _finite(v: Any) -> bool:
    """A real, finite number (an infinite memory or bandwidth would make every plan fit, or cost nothing)."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _mapping(v: Any, field: str) -> Mapping:
    if not isinstance(v, Mapping):
        raise ValueError(f"{field} must be a table, got {v!r}")
    return v


def _link_from(v: Any, where: str) -> Link:
    if isinstance(v, Link):
        return v
    if not isinstance(v, Mapping) or not {"bandwidth", "latency"} <= set(v) <= {"bandwidth", "latency", "overhead"}:
        raise AutoshardError(f"{where}: a link is a table with 'bandwidth', 'latency' and optionally 'overhead', "
                             f"got {v!r}")
    try:
        return Link(bandwidth=_num(v["bandwidth"], "bandwidth"), latency=_num(v["latency"], "latency"),
                    overhead=_num(v.get("overhead", 0.0), "overhead"))
    except (TypeError, ValueError) as e:
        raise AutoshardError(f"{where}: {_one_line(e)}") from None


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


# -- presets -----------------------------------------------------------------------------------------------------
#
# Per-device figures. Sources: NVIDIA A100 datasheet (80GB SXM: BF16 312 TFLOP/s dense, TF32 156, HBM2e 2,039 GB/s,
# NVLink 600 GB/s bidirectional = 300 GB/s one way); NVIDIA H100 datasheet (SXM: BF16 989 TFLOP/s dense, TF32 494.5,
# HBM3 3.35 TB/s, NVLink 900 GB/s bidirectional = 450 GB/s one way); DGX A100 / DGX H100 have one 200 Gb/s HDR resp.
# 400 Gb/s NDR InfiniBand NIC per GPU = 25 resp. 50 GB/s. Google Cloud TPU docs: v5e 197 TFLOP/s BF16, 16 GiB HBM,
# 819 GB/s, 1,600 Gb/s ICI per chip over 4 links, up to 256 chips per slice; v5p 459 TFLOP/s BF16, 95 GiB HBM,
# 2,765 GB/s, 4,800 Gb/s ICI per chip over 6 links, up to 8,960 chips per pod. DCN figures are per-chip shares of
# the host NICs (estimates).
#
# float32 matmuls: JAX's default precision computes them in TF32 on A100/H100 and in bfloat16 on TPU
# (docs.jax.dev "Matmul precision"), so the float32 figure is that rate, not the CUDA-core FP32 rate (19.5 / 67).
#
# Latencies are estimates (a few microseconds per NVLink/ICI ring step, ~10 us across InfiniBand, more over DCN),
# not datasheet values. `planner.profile.calibrate` replaces them with measured ones where it can.


def _cpu(n: int) -> ClusterSpec:
    # Emulated host devices (XLA_FLAGS=--xla_force_host_platform_device_count=N): all share the host's cores and
    # memory, so the figures are modest placeholders meant to be replaced by `calibrate` with a local profile.
    # XLA:CPU has no bfloat16 arithmetic: it computes in float32 and its collectives of bfloat16 values move float32
    # (measured: gpt-tiny:dtype=bfloat16's tensor all-reduces, pipe and seq collective-permutes, 2x the bfloat16 bytes)
    return ClusterSpec(name="cpu", num_devices=n, devices_per_node=n, memory_bytes=4 * GiB,
                       peak_flops={"float32": 50e9, "bfloat16": 25e9}, matmul_efficiency=0.7, hbm_bandwidth=10e9,
                       intra=Link(5e9, 20e-6), inter=Link(5e9, 20e-6), collective_dtypes={"bfloat16": "float32"})


def _a100(n: int) -> ClusterSpec:
    return ClusterSpec(name="a100-80g", num_devices=n, devices_per_node=8, memory_bytes=80 * GiB,
                       peak_flops={"float32": 156e12, "bfloat16": 312e12, "float16": 312e12},
                       matmul_efficiency=0.7, hbm_bandwidth=2.039e12,
                       intra=Link(300e9, 3e-6), inter=Link(25e9, 10e-6))


def _h100(n: int) -> ClusterSpec:
    return ClusterSpec(name="h100-80g", num_devices=n, devices_per_node=8, memory_bytes=80 * GiB,
                       peak_flops={"float32": 494.5e12, "bfloat16": 989e12, "float16": 989e12},
                       matmul_efficiency=0.7, hbm_bandwidth=3.35e12,
                       intra=Link(450e9, 3e-6), inter=Link(50e9, 10e-6))


def _tpu_v5e(n: int) -> ClusterSpec:
    # One ICI link one way (1,600 Gb/s / 4 links / 2 directions ~ 50 GB/s) is what a ring along one torus axis gets.
    return ClusterSpec(name="tpu-v5e", num_devices=n, devices_per_node=256, memory_bytes=16 * GiB,
                       peak_flops={"float32": 197e12, "bfloat16": 197e12}, matmul_efficiency=0.7,
                       hbm_bandwidth=819e9, intra=Link(50e9, 2e-6), inter=Link(6.25e9, 25e-6))


def _tpu_v5p(n: int) -> ClusterSpec:
    # 4,800 Gb/s / 6 links / 2 directions ~ 50 GB/s per link one way; a ring on the 3-D torus (wraparound) uses both
    # directions of its axis, ~ 100 GB/s; we take 90 GB/s as the collective figure.
    return ClusterSpec(name="tpu-v5p", num_devices=n, devices_per_node=8960, memory_bytes=95 * GiB,
                       peak_flops={"float32": 459e12, "bfloat16": 459e12}, matmul_efficiency=0.7,
                       hbm_bandwidth=2.765e12, intra=Link(90e9, 2e-6), inter=Link(12.5e9, 25e-6))


PRESETS: dict[str, Callable[[int], ClusterSpec]] = {
    "cpu": _cpu, "a100-80g": _a100, "h100-80g": _h100, "tpu-v5e": _tpu_v5e, "tpu-v5p": _tpu_v5p,
}


def _preset(spec: str) -> ClusterSpec:
    kind, sep, count = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in PRESETS:
        raise AutoshardError(f"unknown cluster {spec!r}: use one of {', '.join(p + ':N' for p in PRESETS)}, "
                             f"or a path to a .json / .toml cluster file")
    if not sep:
        raise AutoshardError(f"cluster {spec!r} needs a device count: write {kind}:N (for example {kind}:8)")
    try:
        n = int(count.strip())
    except ValueError:
        n = 0
    if n < 1:
        raise AutoshardError(f"cluster {spec!r}: the device count after ':' must be a positive integer")
    return PRESETS[kind](n)


def _looks_like_path(spec: str) -> bool:
    return spec.lower().endswith((".json", ".toml")) or "/" in spec or "\\" in spec or Path(spec).is_file()


def load_cluster(spec: str | Path | ClusterSpec) -> ClusterSpec:
    """A ClusterSpec from a preset (`"h100-80g:16"`), or a JSON / TOML file, optionally `path:N` to set the count."""
    if isinstance(spec, ClusterSpec):
        return spec
    spec = str(spec).strip()
    if not spec:
        raise AutoshardError(f"empty cluster: use one of {', '.join(p + ':N' for p in PRESETS)} or a file path")
    path, count = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and tail.strip().isdigit() and _looks_like_path(head):
        path, count = head, int(tail)
    if not _looks_like_path(path):
        return _preset(spec)
    cluster = _load_file(Path(path))
    if count is not None:
        if count < 1:
            raise AutoshardError(f"cluster {spec!r}: the device count after ':' must be a positive integer")
        cluster = cluster.with_devices(count)
    return cluster


def _load_file(path: Path) -> ClusterSpec:
    where = f"cluster file {str(path)!r}"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise AutoshardError(f"cannot read {where}: {e.strerror or _one_line(e)}") from None
    toml = path.suffix.lower() == ".toml" or (path.suffix.lower() != ".json" and not raw.lstrip().startswith(b"{"))
    try:
        data = tomllib.loads(raw.decode("utf-8")) if toml else json.loads(raw)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise AutoshardError(f"{where} is not valid {'TOML' if toml else 'JSON'}: {_one_line(e)}") from None
    return ClusterSpec.from_dict(data, where)


def save_cluster(cluster: ClusterSpec, path: str | Path) -> None:
    """Write a cluster as JSON (the format `load_cluster` reads back)."""
    Path(path).write_text(json.dumps(cluster.to_dict(), indent=1) + "\n")
