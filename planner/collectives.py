"""Collective cost model: bytes each device sends and the time a collective takes (alpha-beta, ring, per link level).

Conventions (the same as autoshard's HLO inspection, so predicted and compiled figures compare directly):

- `nbytes` is the OPERAND size per device, as the HLO op sees it: for all-gather the local shard (the result is n
  times larger), for reduce-scatter the full local buffer (the result is n times smaller), for the others the local
  buffer.
- A group is the set of devices that vary over some mesh axes while the other coordinates stay fixed. Where it lies
  on the hardware is summarised by `Span(per_node, nodes)`: how many of the group's devices share a node, and how
  many nodes the group touches. `axis_span` computes it from the mesh and the device order of `planner.plan.AXES`
  (the last axis varies fastest, so it stays inside a node).
- Link figures come from anything with `.intra` and `.inter` links (`planner.cluster.ClusterSpec`): bandwidth in
  bytes/s per device in one direction, latency in seconds per ring step, and an optional fixed `overhead` per op.

One level (a flat ring of n devices, link bandwidth B, latency a, overhead o; o = 0 in the presets):

    all-reduce       o + 2(n-1) a + 2(n-1)/n S / B
    all-gather       o +  (n-1) a +  (n-1)   S / B      (S = shard)
    reduce-scatter   o +  (n-1) a +  (n-1)/n S / B      (S = full buffer)
    all-to-all       o +  (n-1) a +  (n-1)/n S / B
    permute          o +      a +          S / B

Across nodes (g devices per node x m nodes) the reductions and gathers are hierarchical, so that only 1/g of the
data crosses the slow level: all-reduce = intra reduce-scatter + inter all-reduce of S/g + intra all-gather;
reduce-scatter = intra reduce-scatter + inter reduce-scatter of S/g; all-gather = inter all-gather of the shard +
intra all-gather of m shards. An all-to-all sends (g-1)/n of S inside the node and (n-g)/n across, concurrently, so
it is bounded by the slower of the two. A permute whose group spans nodes is as slow as its cross-node pairs.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, NamedTuple, Protocol

import numpy as np

from planner.errors import AutoshardError
from planner.plan import AXES

KINDS: tuple[str, ...] = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_ALIASES = {
    "psum": "all-reduce", "allreduce": "all-reduce", "pmean": "all-reduce",
    "allgather": "all-gather", "reducescatter": "reduce-scatter", "psum-scatter": "reduce-scatter",
    "alltoall": "all-to-all", "a2a": "all-to-all",
    "ppermute": "collective-permute", "permute": "collective-permute", "p2p": "collective-permute",
    "send-recv": "collective-permute",
}


class LinkLike(Protocol):
    bandwidth: float
    latency: float
    """An `overhead` attribute (seconds per op) is optional; missing means 0."""


class Links(Protocol):
    intra: LinkLike
    inter: LinkLike


class Span(NamedTuple):
    """Where a group lies: `per_node` of its devices share a node, and it touches `nodes` nodes."""

    per_node: int
    nodes: int

    @property
    def size(self) -> int:
        return self.per_node * self.nodes


def normalize_kind(kind: str) -> str:
    """Canonical HLO name of a collective: accepts 'psum', 'all_gather', 'ppermute', 'a2a', ..."""
    k = str(kind).strip().lower().replace("_", "-")
    k = _ALIASES.get(k, k)
    if k not in KINDS:
        raise ValueError(f"unknown collective {kind!r}: use one of {', '.join(KINDS)}")
    return k


def bytes_sent(kind: str, nbytes: float, n: int) -> float:
    """Bytes one device sends in a bandwidth-optimal (ring) collective over n devices; nbytes is the operand size."""
    kind = normalize_kind(kind)
    if n <= 1:
        return 0.0
    return {
        "all-reduce": 2 * (n - 1) / n * nbytes,
        "all-gather": (n - 1) * nbytes,
        "reduce-scatter": (n - 1) / n * nbytes,
        "all-to-all": (n - 1) / n * nbytes,
        "collective-permute": float(nbytes),
    }[kind]


def ring_steps(kind: str, n: int) -> int:
    """Latency terms (alpha) a collective over n devices pays."""
    kind = normalize_kind(kind)
    if n <= 1:
        return 0
    return {"all-reduce": 2 * (n - 1), "collective-permute": 1}.get(kind, n - 1)


def flat_time(kind: str, nbytes: float, n: int, link: LinkLike) -> float:
    """Seconds for a collective over n devices on one level: overhead + steps x latency + bytes sent / bandwidth."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return _overhead(link) + ring_steps(kind, n) * link.latency + bytes_sent(kind, nbytes, n) / link.bandwidth


def _overhead(link: LinkLike) -> float:
    return float(getattr(link, "overhead", 0.0))


def collective_time(kind: str, nbytes: float, span: tuple[int, int], links: Links) -> float:
    """Seconds for one collective over a group placed as `span` = (devices per node, nodes), hierarchical across nodes.

    With one node this is the flat ring on the intra level; with one device per node, the flat ring on the inter
    level.
    """
    kind = normalize_kind(kind)
    g, m = int(span[0]), int(span[1])
    n = g * m
    if n <= 1 or nbytes <= 0:
        return 0.0
    intra, inter = links.intra, links.inter
    if kind == "all-reduce":
        return (flat_time("reduce-scatter", nbytes, g, intra) + flat_time("all-reduce", nbytes / g, m, inter)
                + flat_time("all-gather", nbytes / g, g, intra))
    if kind == "reduce-scatter":
        return flat_time("reduce-scatter", nbytes, g, intra) + flat_time("reduce-scatter", nbytes / g, m, inter)
    if kind == "all-gather":
        return flat_time("all-gather", nbytes, m, inter) + flat_time("all-gather", nbytes * m, g, intra)
    slow = inter if m > 1 else intra
    if kind == "all-to-all":
        local, remote = g - 1, n - g
        latency = _overhead(slow) + local * intra.latency + remote * inter.latency
        return latency + max(local / n * nbytes / intra.bandwidth, remote / n * nbytes / inter.bandwidth)
    return _overhead(slow) + slow.latency + nbytes / slow.bandwidth  # permute: the slowest pair sets the pace


def group_size(mesh: Mapping[str, int], axes: tuple[str, ...] | list[str] | str) -> int:
    """Number of devices in one group over `axes` of `mesh`."""
    sizes = _sizes(mesh)
    return math.prod(sizes[AXES.index(a)] for a in _axes(axes))


def axis_span(mesh: Mapping[str, int], axes: tuple[str, ...] | list[str] | str, devices_per_node: int) -> Span:
    """Span(per_node, nodes) of the groups over `axes` of `mesh`, devices numbered in AXES order (last fastest).

    Groups that split unevenly over nodes report the worst group: the most nodes any group touches, and the most of
    its devices in one node.
    """
    if devices_per_node < 1:
        raise AutoshardError(f"devices_per_node must be >= 1, got {devices_per_node}")
    sizes = _sizes(mesh)
    group = tuple(sorted(AXES.index(a) for a in _axes(axes)))
    return _span(sizes, group, int(devices_per_node))


def axis_collective_time(kind: str, nbytes: float, mesh: Mapping[str, int], axes: tuple[str, ...] | list[str] | str,
                         cluster: Any) -> float:
    """`collective_time` of a group over `axes` of `mesh` on `cluster` (with devices_per_node, intra and inter)."""
    return collective_time(kind, nbytes, axis_span(mesh, axes, cluster.devices_per_node), cluster)


def _axes(axes: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    bad = [a for a in axes if a not in AXES]
    if bad:
        raise AutoshardError(f"unknown mesh axis {bad[0]!r}: use one of {', '.join(AXES)}")
    if len(set(axes)) != len(axes):
        raise AutoshardError(f"mesh axes repeat in {axes}")
    return axes


def _sizes(mesh: Mapping[str, int]) -> tuple[int, ...]:
    bad = [a for a in mesh if a not in AXES]
    if bad:
        raise AutoshardError(f"unknown mesh axis {bad[0]!r}: use one of {', '.join(AXES)}")
    sizes = tuple(int(mesh.get(a, 1)) for a in AXES)
    if any(s < 1 for s in sizes):
        raise AutoshardError(f"mesh axis sizes must be >= 1, got {dict(mesh)}")
    return sizes


@functools.lru_cache(maxsize=4096)
def _span(sizes: tuple[int, ...], group: tuple[int, ...], dpn: int) -> Span:
    """Span of the worst group: device ids numbered row-major over `sizes` (the last axis fastest), one group a row
    of the id grid with the group's axes moved last; node = id // devices per node (all groups at once: a search
    asks this of every mesh, and large clusters have thousands of devices)."""
    total = math.prod(sizes)
    n = math.prod(sizes[i] for i in group)
    if total <= dpn:
        return Span(n, 1)
    others = [i for i in range(len(sizes)) if i not in group]
    nodes = np.arange(total).reshape(sizes).transpose(others + list(group)).reshape(-1, n) // dpn
    keys, counts = np.unique(np.arange(nodes.shape[0])[:, None] * (total // dpn + 1) + nodes, return_counts=True)
    per_group = np.bincount(keys // (total // dpn + 1))
    return Span(int(counts.max()), int(per_group.max()))
