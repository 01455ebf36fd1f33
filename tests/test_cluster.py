"""ClusterSpec presets and files, and the collective cost model (pure Python, no devices needed)."""

import json
import math

import pytest

from planner.cluster import PRESETS, ClusterSpec, Link, dtype_name, load_cluster, save_cluster
from planner.collectives import (KINDS, Span, axis_collective_time, axis_span, bytes_sent, collective_time,
                                 flat_time, group_size, normalize_kind, ring_steps)
from planner.errors import AutoshardError

GiB = 1 << 30


# -- presets -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_load_and_round_trip(name):
    n = 512 if name.startswith("tpu") else 16
    c = load_cluster(f"{name}:{n}")
    assert c.name == name and c.num_devices == n and c.label == f"{name}:{n}"
    assert c.memory_bytes > 0 and c.hbm_bandwidth > 0 and 0 < c.matmul_efficiency <= 1
    assert c.matmul_flops("bfloat16") > 0 and c.matmul_flops("float32") > 0
    assert c.intra.bandwidth >= c.inter.bandwidth > 0
    assert ClusterSpec.from_dict(c.to_dict()) == c
    assert ClusterSpec.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert hash(ClusterSpec.from_dict(c.to_dict())) == hash(c)


def test_preset_figures():
    a100, h100 = load_cluster("a100-80g:64"), load_cluster("h100-80g:16")
    assert a100.num_devices == 64 and a100.devices_per_node == 8 and a100.num_nodes == 8
    assert a100.peak_flops["bfloat16"] == 312e12 and h100.peak_flops["bfloat16"] == 989e12
    assert a100.memory_bytes == h100.memory_bytes == 80 * GiB
    assert a100.intra.bandwidth == 300e9 and a100.inter.bandwidth == 25e9
    assert h100.intra.bandwidth == 450e9 and h100.inter.bandwidth == 50e9
    assert a100.matmul_flops("bf16") == pytest.approx(312e12 * a100.matmul_efficiency)
    assert a100.matmul_flops("int8") == a100.matmul_flops("float32")  # unknown dtypes fall back to float32
    v5e, v5p = load_cluster("tpu-v5e:512"), load_cluster("tpu-v5p:1024")
    assert v5e.peak_flops["bfloat16"] == 197e12 and v5e.memory_bytes == 16 * GiB and v5e.num_nodes == 2
    assert v5p.peak_flops["bfloat16"] == 459e12 and v5p.num_nodes == 1
    cpu = load_cluster("cpu:8")
    assert cpu.devices_per_node == 8 and cpu.num_nodes == 1
    # XLA:CPU's collectives move bfloat16 as float32; GPUs and TPUs move bfloat16 as it is
    assert cpu.wire_itemsize("bf16") == 4 and cpu.wire_itemsize("float32") == 4 and cpu.wire_itemsize("int8") == 1
    assert a100.wire_itemsize("bfloat16") == 2 and v5p.wire_itemsize("bfloat16") == 2
    odd = ClusterSpec.from_dict({"base": "a100-80g:8", "collective_dtypes": {"bf16": "f32"}})
    assert odd.wire_itemsize("bfloat16") == 4 and ClusterSpec.from_dict(odd.to_dict()) == odd
    assert cpu.with_devices(4).devices_per_node == 4
    assert load_cluster(cpu) is cpu


def test_roofline():
    c = load_cluster("a100-80g:8")
    big = c.roofline_seconds(flops=1e15, bytes_accessed=1e9, dtype="bfloat16")
    assert big == pytest.approx(1e15 / (312e12 * c.matmul_efficiency))
    assert c.roofline_seconds(flops=1e6, bytes_accessed=1e9) == pytest.approx(1e9 / c.hbm_bandwidth)


def test_dtype_names():
    import jax.numpy as jnp
    import numpy as np
    assert dtype_name(jnp.bfloat16) == "bfloat16" and dtype_name(np.dtype("float32")) == "float32"
    assert dtype_name("f32") == "float32" and dtype_name(jnp.float16) == "float16"


@pytest.mark.parametrize("spec, words", [
    ("gpu9000:8", "unknown cluster"),
    ("a100-80g", "needs a device count"),
    ("a100-80g:x", "positive integer"),
    ("a100-80g:0", "positive integer"),
    ("a100-80g:-8", "positive integer"),
    ("a100-80g:12", "whole nodes"),
    ("tpu-v5e:300", "whole nodes"),
    ("", "empty cluster"),
    ("/no/such/cluster.toml", "cannot read"),
])
def test_bad_specs_are_one_line_errors(spec, words):
    with pytest.raises(AutoshardError) as e:
        load_cluster(spec)
    assert words in str(e.value) and "\n" not in str(e.value)


# -- files -------------------------------------------------------------------------------------------------------

TOML = """
name = "my-a100"
num_devices = 16
devices_per_node = 8
memory_bytes = 85899345920
hbm_bandwidth = 2.0e12
matmul_efficiency = 0.6

[peak_flops]
float32 = 156e12
bfloat16 = 312e12

[intra]
bandwidth = 250e9
latency = 4e-6

[inter]
bandwidth = 20e9
latency = 12e-6
"""


def test_load_toml_and_json(tmp_path):
    t = tmp_path / "c.toml"
    t.write_text(TOML)
    c = load_cluster(str(t))
    assert c.name == "my-a100" and c.num_devices == 16 and c.num_nodes == 2 and c.matmul_efficiency == 0.6
    assert c.intra == Link(250e9, 4e-6) and c.inter == Link(20e9, 12e-6)
    assert load_cluster(f"{t}:64").num_devices == 64
    j = tmp_path / "c.json"
    save_cluster(c, j)
    assert load_cluster(j) == c
    j2 = tmp_path / "c2.json"
    j2.write_text(json.dumps(c.to_dict()))
    assert load_cluster(str(j2)) == c


def test_file_with_base_preset(tmp_path):
    p = tmp_path / "tweaked.toml"
    p.write_text('base = "h100-80g:32"\nname = "h100-ib200"\n[inter]\nbandwidth = 25e9\n')
    c = load_cluster(p)
    ref = load_cluster("h100-80g:32")
    assert c.name == "h100-ib200" and c.num_devices == 32 and c.inter.bandwidth == 25e9
    assert c.inter.latency == ref.inter.latency and c.intra == ref.intra and c.peak_flops == ref.peak_flops


@pytest.mark.parametrize("text, suffix, words", [
    ("name = [", ".toml", "not valid TOML"),
    ("{\"name\": ", ".json", "not valid JSON"),
    ("name = \"x\"\nnum_devices = 8\n", ".toml", "missing field(s)"),
    ("bogus = 1\n" + TOML, ".toml", "unknown field(s) bogus"),
    (TOML.replace("num_devices = 16", "num_devices = 12"), ".toml", "whole nodes"),
    (TOML.replace("num_devices = 16", "num_devices = \"many\""), ".toml", "num_devices must be an integer"),
    (TOML.replace("latency = 4e-6", "latency = -1.0"), ".toml", "latency >= 0"),
    (TOML.replace("[intra]", "[intra]\nspeed = 1"), ".toml", "a link is a table"),
    (TOML.replace("matmul_efficiency = 0.6", "matmul_efficiency = 1.5"), ".toml", "matmul_efficiency"),
    ('base = "zzz:8"\n', ".toml", "unknown cluster"),
    ("[1, 2]", ".json", "expected a table"),
])
def test_bad_files_are_one_line_errors(tmp_path, text, suffix, words):
    p = tmp_path / f"bad{suffix}"
    p.write_text(text)
    with pytest.raises(AutoshardError) as e:
        load_cluster(str(p))
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


# -- collectives -------------------------------------------------------------------------------------------------


def test_bytes_sent_ring_formulas():
    S = 1024.0
    assert bytes_sent("all-reduce", S, 8) == 2 * 7 / 8 * S
    assert bytes_sent("all-gather", S, 8) == 7 * S
    assert bytes_sent("reduce-scatter", S, 8) == 7 / 8 * S
    assert bytes_sent("all-to-all", S, 4) == 3 / 4 * S
    assert bytes_sent("collective-permute", S, 4) == S
    assert all(bytes_sent(k, S, 1) == 0 for k in KINDS)
    assert normalize_kind("psum") == "all-reduce" and normalize_kind("all_gather") == "all-gather"
    assert normalize_kind("ppermute") == "collective-permute" and normalize_kind("psum_scatter") == "reduce-scatter"
    with pytest.raises(ValueError):
        normalize_kind("broadcast-ish")
    assert [ring_steps(k, 8) for k in KINDS] == [14, 7, 7, 7, 1]


def test_flat_ring_times_by_hand():
    link = Link(bandwidth=100e9, latency=5e-6)
    S = 1e9
    assert flat_time("all-reduce", S, 8, link) == pytest.approx(14 * 5e-6 + 1.75 * S / 100e9)
    assert flat_time("all-gather", S, 4, link) == pytest.approx(3 * 5e-6 + 3 * S / 100e9)
    assert flat_time("reduce-scatter", S, 4, link) == pytest.approx(3 * 5e-6 + 0.75 * S / 100e9)
    assert flat_time("collective-permute", S, 2, link) == pytest.approx(5e-6 + S / 100e9)
    assert flat_time("all-reduce", S, 1, link) == 0 and flat_time("all-reduce", 0, 8, link) == 0
    assert flat_time("all-reduce", S, 8, Link(100e9, 5e-6, overhead=1e-3)) == pytest.approx(
        1e-3 + flat_time("all-reduce", S, 8, link))


def test_all_reduce_one_node_vs_two_nodes():
    """1 GiB all-reduce on A100s: 8 in one node < 16 over 2 nodes (hierarchical) < a flat ring over InfiniBand."""
    S = float(GiB)
    c = load_cluster("a100-80g:16")
    intra = collective_time("all-reduce", S, (8, 1), c)
    hier = collective_time("all-reduce", S, (8, 2), c)
    flat_inter = flat_time("all-reduce", S, 16, c.inter)
    assert intra == pytest.approx(14 * 3e-6 + 1.75 * S / 300e9)
    # intra reduce-scatter + inter all-reduce of S/8 over 2 nodes + intra all-gather
    expect = (7 * 3e-6 + 7 / 8 * S / 300e9) + (2 * 10e-6 + (S / 8) / 25e9) + (7 * 3e-6 + 7 / 8 * S / 300e9)
    assert hier == pytest.approx(expect)
    assert intra < hier < flat_inter
    assert flat_inter / hier > 5
    # one device per node is the flat inter-node ring; one node is the flat intra-node ring
    assert collective_time("all-reduce", S, (1, 16), c) == pytest.approx(flat_inter)
    assert collective_time("all-reduce", S, (8, 1), c) == pytest.approx(flat_time("all-reduce", S, 8, c.intra))


@pytest.mark.parametrize("kind", KINDS)
def test_hierarchy_orders_every_kind(kind):
    c = load_cluster("h100-80g:32")
    S = 64e6
    one_node = collective_time(kind, S, Span(8, 1), c)
    two_nodes = collective_time(kind, S, Span(8, 2), c)
    spread = collective_time(kind, S, Span(1, 16), c)
    assert 0 < one_node < two_nodes
    if kind != "collective-permute":
        assert two_nodes < spread


def test_hierarchical_gather_and_scatter_by_hand():
    c = load_cluster("a100-80g:16")
    S = 8e6
    ag = collective_time("all-gather", S, (8, 2), c)  # S is the shard
    assert ag == pytest.approx((10e-6 + S / 25e9) + (7 * 3e-6 + 7 * 2 * S / 300e9))
    rs = collective_time("reduce-scatter", S, (8, 2), c)  # S is the full buffer
    assert rs == pytest.approx((7 * 3e-6 + 7 / 8 * S / 300e9) + (10e-6 + 0.5 * (S / 8) / 25e9))
    a2a = collective_time("all-to-all", S, (8, 2), c)
    assert a2a == pytest.approx(7 * 3e-6 + 8 * 10e-6 + max(7 / 16 * S / 300e9, 8 / 16 * S / 25e9))
    assert collective_time("ppermute", S, (8, 2), c) == pytest.approx(10e-6 + S / 25e9)
    assert collective_time("ppermute", S, (8, 1), c) == pytest.approx(3e-6 + S / 300e9)


def test_axis_span():
    mesh = {"data": 16, "tensor": 8}
    assert axis_span(mesh, ("tensor",), 8) == (8, 1)
    assert axis_span(mesh, "data", 8) == (1, 16)
    assert axis_span(mesh, ("data", "tensor"), 8) == (8, 16)
    assert group_size(mesh, ("data", "tensor")) == 128
    # tensor=4 inside a node: data pairs share a node, data groups span 2 nodes with 2 devices in each
    mesh = {"data": 4, "tensor": 4}
    assert axis_span(mesh, "tensor", 8) == (4, 1)
    assert axis_span(mesh, "data", 8) == (2, 2)
    # pipe is the slowest axis: with 4 stages of 8-device nodes, each stage is a node
    mesh = {"pipe": 4, "fsdp": 2, "tensor": 4}
    assert axis_span(mesh, "pipe", 8) == (1, 4)
    assert axis_span(mesh, ("fsdp", "tensor"), 8) == (8, 1)
    assert axis_span(mesh, "fsdp", 8) == (2, 1)
    # everything fits in one node
    assert axis_span({"data": 2, "tensor": 4}, ("data", "tensor"), 8) == (8, 1)
    assert axis_span({"data": 8}, "tensor", 8) == (1, 1)
    # TPU slices of 256 chips: data=4 over 4 slices, fsdp x tensor inside one
    mesh = {"data": 4, "fsdp": 16, "tensor": 16}
    assert axis_span(mesh, "data", 256) == (1, 4)
    assert axis_span(mesh, ("fsdp", "tensor"), 256) == (256, 1)
    # uneven: a tensor group of 12 over nodes of 8 reports the worst group
    assert axis_span({"data": 2, "tensor": 12}, "tensor", 8) == (8, 2)
    with pytest.raises(AutoshardError, match="unknown mesh axis"):
        axis_span({"model": 4}, "model", 8)
    with pytest.raises(AutoshardError, match="unknown mesh axis"):
        axis_span({"data": 4}, "batch", 8)


def test_axis_collective_time_uses_device_order():
    c = load_cluster("a100-80g:128")
    mesh = {"data": 16, "tensor": 8}
    S = 256e6
    t_tensor = axis_collective_time("all-reduce", S, mesh, "tensor", c)
    t_data = axis_collective_time("all-reduce", S, mesh, "data", c)
    assert t_tensor == pytest.approx(flat_time("all-reduce", S, 8, c.intra))
    assert t_data == pytest.approx(flat_time("all-reduce", S, 16, c.inter))
    assert t_tensor < t_data
    assert math.isclose(axis_collective_time("all-reduce", S, mesh, ("data", "tensor"), c),
                        collective_time("all-reduce", S, (8, 16), c))
