"""One test per jax surface without a compatibility promise (`planner.jax_internals`), on the installed jax.

A jax release that changes a surface fails here first, naming it. The last two tests pin the two jax bugs autoshard
works around (checked on jax 0.10.2 and 0.12.0.1): when one of them starts failing, jax fixed the bug, and the
workaround it names can go.
"""

import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import models
from planner import jax_internals as jint
from planner.layouts import has_rule
from planner.search import layer_bodies, trace_model
from planner.trace import matmul_flops, trace
from checks import host_normal

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.smoke  # every surface is checked on the oldest supported jax too


def _eqns(fn, *args):
    return jax.make_jaxpr(fn)(*args).jaxpr.eqns


def _all_eqns(jaxpr):
    """Every equation of a jaxpr, those inside calls and loops included (jnp wraps some ops in a jit)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jint.sub_jaxprs(eqn):
            yield from _all_eqns(sub)


def _one(eqns, name):
    found = [e for e in eqns if e.primitive.name == name]
    assert len(found) == 1, f"expected one {name}, got {[e.primitive.name for e in eqns]}"
    return found[0]


def test_installed_jax_is_in_the_supported_range_that_pyproject_pins():
    lo, hi = jint.SUPPORTED_JAX
    assert lo <= jint.jax_version() < hi
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    want = f">={'.'.join(map(str, lo))},<{'.'.join(map(str, hi))}"
    for name in ("jax", "jaxlib"):
        assert f"{name}{want}" in deps, f"pyproject.toml pins {name} differently from SUPPORTED_JAX ({want})"


def test_literals_are_recognised():
    eqn = _one(_eqns(lambda x: x + 1.5, jnp.ones(3)), "add")
    assert [jint.is_literal(v) for v in eqn.invars] == [False, True]


@pytest.mark.parametrize("kind", ["jit", "checkpoint", "custom_jvp", "custom_vjp"])
def test_call_primitives_open_to_their_body(kind):
    def inner(x):
        return jnp.sin(x) * 2.0

    if kind == "jit":
        f = jax.jit(inner)
    elif kind == "checkpoint":
        f = jax.checkpoint(inner)
    elif kind == "custom_jvp":
        f = jax.custom_jvp(inner)
        f.defjvp(lambda p, t: (inner(p[0]), 2.0 * jnp.cos(p[0]) * t[0]))
    else:
        f = jax.custom_vjp(inner)
        f.defvjp(lambda x: (inner(x), x), lambda x, g: (2.0 * jnp.cos(x) * g,))
    (eqn,) = _eqns(f, jnp.ones(3))
    body = jint.call_body(eqn)
    assert body is not None, f"{eqn.primitive.name} is not recognised as a call"
    assert [e.primitive.name for e in body.jaxpr.eqns] == ["sin", "mul"]


def test_a_remat_layer_is_traced_through_not_one_opaque_op():
    w = jnp.ones((4, 4))
    loss = lambda p, b: jnp.sum(jax.checkpoint(lambda x: jnp.tanh(x @ p["w"]))(b["x"]))  # noqa: E731
    graph = trace(loss, {"w": w}, {"x": jnp.ones((8, 4))}, ["w"], {})
    assert [op.primitive for op in graph.ops] == ["dot_general", "tanh", "reduce_sum"]


def test_scan_structure_consts_carries_and_xs():
    c = np.arange(4.0, dtype=np.float32)

    def f(w, x, y):
        def body(carry, wi):
            a, k = carry
            return (jnp.tanh(a @ wi + c + y), k + 1), a.sum()
        (a, _), s = jax.lax.scan(body, (x, 0), w)
        return a.sum() + s.sum()

    eqn = _one(_eqns(f, jnp.ones((3, 4, 4)), jnp.ones((2, 4)), jnp.ones(4)), "scan")
    info = jint.scan(eqn)
    assert (info.length, info.num_consts, info.num_carry) == (3, 2, 2)
    assert len(eqn.invars) == info.num_consts + info.num_carry + 1
    assert len(info.body.jaxpr.invars) == len(eqn.invars)


def test_sub_jaxprs_and_trip_counts_give_the_flops_of_a_loop():
    def f(w, x):
        return jax.lax.scan(lambda a, wi: (a @ wi, None), x, w)[0].sum()

    flops = matmul_flops(jax.make_jaxpr(f)(jnp.ones((5, 4, 4)), jnp.ones((2, 4))))
    assert flops == 5 * 2 * 2 * 4 * 4


def test_cond_and_while_structure_and_a_fixed_trip_count():
    def f(w, x, n):
        y = jax.lax.cond(x.sum() > 0, lambda a: a @ w, lambda a: jnp.tanh(a) @ w, x)
        z = jax.lax.while_loop(lambda c: c[0] < 5, lambda c: (c[0] + 2, c[1] @ w), (1, y))[1]  # i = 1, 3
        return jax.lax.fori_loop(0, n, lambda i, c: c @ w, z).sum()  # traced bounds: a while of unknown count

    closed = jax.make_jaxpr(f)(jnp.ones((4, 4)), jnp.ones((2, 4)), 3)
    cond = jint.cond(_one(closed.jaxpr.eqns, "cond"))
    assert len(cond.branches) == 2 and all(len(b.jaxpr.invars) == 2 for b in cond.branches)
    fixed, traced = [e for e in closed.jaxpr.eqns if e.primitive.name == "while"]
    info = jint.while_loop(fixed)
    assert (info.cond_nconsts, info.body_nconsts) == (0, 1)
    assert len(info.body.jaxpr.invars) == 3 and len(info.cond.jaxpr.invars) == 2
    assert (jint.while_trip_count(fixed), jint.while_trip_count(traced)) == (2, None)
    assert (jint.trip_count(fixed), jint.trip_count(traced)) == (2, 1)
    one = 2 * 2 * 4 * 4  # one [2, 4] @ [4, 4]
    assert matmul_flops(closed) == 2 * one + 2 * one + one  # both branches, the while twice, the unknown once
    with pytest.raises(jint.JaxInternalsError, match="the `cond` primitive changed"):
        jint.cond(_one(closed.jaxpr.eqns, "cond").replace(params={}))
    with pytest.raises(jint.JaxInternalsError, match="the `while` primitive changed"):
        jint.while_loop(fixed.replace(params={k: v for k, v in fixed.params.items() if k != "body_nconsts"}))


def test_eval_jaxpr_hooked_names_equations_as_the_tracer_does():
    """The runtime re-runs a loss equation by equation: plain calls inlined (their equations named by their path),
    a custom derivative run whole, the result and the gradient the same as jax's own."""
    @jax.jit
    def inner(x, w):
        return jnp.tanh(x @ w)

    def f(w, x):
        return jnp.sum(jax.nn.relu(inner(x, w)) ** 2)  # relu: a custom_jvp

    w, x = jnp.linspace(-1, 1, 12).reshape(4, 3), jnp.linspace(0, 2, 8).reshape(2, 4)
    closed = jax.make_jaxpr(f)(w, x)
    seen = []
    hooked = lambda w, x: jint.eval_jaxpr_hooked(  # noqa: E731
        jint.open_jaxpr(closed), [w, x], lambda key, eqn, outs: seen.append((key, eqn.primitive.name)) or outs)[0]
    np.testing.assert_allclose(jax.grad(hooked)(w, x), jax.grad(f)(w, x), rtol=1e-6)
    names = dict(seen)
    assert "dot_general" in [n for k, n in seen if len(k) == 2]  # inside the inlined jit: (call index, own index)
    assert any(n in jint.CALLS for n in names.values())  # the custom_jvp call itself, run whole
    graph = trace(lambda p, b: f(p["w"], b["x"]), {"w": w}, {"x": x}, ["w"], {})
    assert {e for op in graph.ops for e in op.eqns} <= set(names)  # the tracer names the same equations
    # `before` sees (and may replace) each equation's operands under the same names: doubling the dot's left
    # operand doubles the product, inside the inlined call as at the top level
    dot = next(k for k, n in seen if n == "dot_general")
    twice = jint.eval_jaxpr_hooked(jint.open_jaxpr(closed), [w, x], lambda key, eqn, outs: outs,
                                   before=lambda key, eqn, ins: [2 * ins[0], ins[1]] if key == dot else ins)[0]
    np.testing.assert_allclose(twice, f(w, 2 * x), rtol=1e-6)


def test_eval_jaxpr_runs_a_scan_body_on_its_own():
    w, x = jnp.arange(48.0).reshape(3, 4, 4) / 48, jnp.ones((2, 4))
    f = lambda w, x: jax.lax.scan(lambda a, wi: (jnp.tanh(a @ wi), None), x, w)[0]  # noqa: E731
    body = jint.scan(_one(_eqns(f, w, x), "scan")).body
    (out,) = jax.jit(lambda *a: jint.eval_jaxpr(body, *a))(x, w[0])
    np.testing.assert_allclose(out, jnp.tanh(x @ w[0]), rtol=1e-6)


def test_split_on_last_input_keeps_what_depends_on_it_and_remakes_the_rest():
    """The residuals a pipeline stage keeps (those of its input) and those its backward makes again (of weights)."""
    def leaves(w, h):
        _, vjp_fn = jax.vjp(lambda w, h: jnp.sin(h @ w.astype(jnp.bfloat16).astype(jnp.float32)), w, h)
        return [x for x in jax.tree.leaves(vjp_fn) if isinstance(x, jax.Array)]

    w, h = jnp.arange(6.0).reshape(2, 3) / 7, jnp.ones((4, 2))
    closed = jax.make_jaxpr(leaves)(w, h)
    needs, rest = jint.split_on_last_input(closed)
    assert True in needs and False in needs  # cos(h @ w) and h itself; the weights and their casts
    made = jint.eval_jaxpr(rest, *closed.consts, w, h)
    want = [x for x, k in zip(leaves(w, h), needs) if not k]
    assert len(made) == len(want) and all(np.array_equal(a, b) for a, b in zip(made, want))
    shape_free = jint.eval_jaxpr(rest, *closed.consts, w, jnp.zeros_like(h))  # h is not read
    assert all(np.array_equal(a, b) for a, b in zip(shape_free, want))


def test_layer_bodies_of_a_model_run():
    batch = {"inputs": np.zeros((2, 16), np.int32), "targets": np.zeros((2, 16), np.int32)}
    ((_, fn, args, flops, meta),) = layer_bodies(models.abstract("gpt-tiny"), [batch])
    outs = fn(*args)
    assert flops > 0 and meta == {"batch": 2, "seq": 16}
    assert all(bool(jnp.all(jnp.isfinite(o))) for o in jax.tree.leaves(outs) if jnp.issubdtype(o.dtype, jnp.floating))


PRIMITIVE_SAMPLES = {
    "dot_general": lambda x: x @ x.T,
    "transpose": lambda x: x.T,
    "broadcast_in_dim": lambda x: jnp.broadcast_to(x[:, None, :], (4, 2, 6)),
    "reduce_sum": lambda x: x.sum(0), "reduce_max": lambda x: x.max(0), "reduce_min": lambda x: x.min(0),
    "gather": lambda x: x[jnp.array([0, 2])],
    "cumsum": lambda x: jnp.cumsum(x, axis=1), "concatenate": lambda x: jnp.concatenate([x, x], 1),
    "split": lambda x: jnp.split(x, 2, axis=1), "sort": lambda x: jnp.sort(x, axis=1),
    "conv_general_dilated": lambda x: jax.lax.conv_general_dilated(x[None, None], x[None, None, :2, :2], (1, 1),
                                                                   "SAME"),
    "reduce_window_sum": lambda x: jax.lax.reduce_window(x, 0.0, jax.lax.add, (2, 2), (2, 2), "VALID"),
    "reduce_window_max": lambda x: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (2, 2), (2, 2), "VALID"),
    "reduce_window_min": lambda x: jax.lax.reduce_window(x, jnp.inf, jax.lax.min, (2, 2), (2, 2), "VALID"),
}


@pytest.mark.parametrize("name", sorted(jint.PARAM_KEYS))
def test_each_primitive_has_the_parameters_the_rules_read(name):
    if name == "scan":
        fn = lambda x: jax.lax.scan(lambda a, r: (a + r, None), x[0], x)[0]  # noqa: E731
    else:
        fn = PRIMITIVE_SAMPLES[name]
    eqns = [e for e in _all_eqns(jax.make_jaxpr(fn)(jnp.ones((4, 6))).jaxpr) if e.primitive.name == name]
    assert eqns, f"{name} no longer appears where jax used to emit it"
    params = jint.op_params(eqns[0])
    assert set(jint.PARAM_KEYS[name]) - {"jaxpr"} <= set(params)


def test_a_changed_parameter_is_a_loud_error_naming_the_surface():
    eqn = _one(_eqns(lambda x: x @ x.T, jnp.ones((2, 3))), "dot_general")
    renamed = eqn.replace(params={"dim_numbers": eqn.params["dimension_numbers"]})
    with pytest.raises(jint.JaxInternalsError, match=r"jax .*: the `dot_general` primitive changed .*"
                                                     r"dimension_numbers.*planner/jax_internals.py"):
        jint.op_params(renamed)
    scan_eqn = _one(_eqns(lambda x: jax.lax.scan(lambda a, r: (a + r, None), x[0], x)[0], jnp.ones((3, 2))), "scan")
    bare = scan_eqn.replace(params={k: v for k, v in scan_eqn.params.items()
                                    if k not in ("num_consts", "num_carry", "ft_in")})
    with pytest.raises(jint.JaxInternalsError, match="the `scan` primitive changed"):
        jint.scan(bare)


def test_name_stack_carries_the_scope():
    def f(x):
        with jax.named_scope("block7"):
            return jnp.sin(x)

    eqn = _one(_eqns(f, jnp.ones(2)), "sin")
    assert "block7" in jint.name_stack(eqn)
    stacks = jint.NameStacks()
    assert stacks(eqn) == stacks(eqn) == jint.name_stack(eqn)


@pytest.mark.parametrize("name", ["gpt-tiny", "moe-tiny"])
def test_every_primitive_of_the_shipped_models_has_a_sharding_rule(name):
    batch = {k: jax.ShapeDtypeStruct((8, 32), jnp.int32) for k in ("inputs", "targets")}
    graph = trace_model(models.abstract(name), batch)
    assert graph.layers == 2, "the layer scan was not recognised"
    assert [op.primitive for op in graph.ops if not has_rule(op, graph.values)] == []


def test_varying_axes_inside_a_shard_map():
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Explicit,) * 2)
    seen = {}

    def body(x):
        seen["in"] = jint.varying_axes(x)
        y = jax.lax.pcast(jnp.zeros(()), ("b",), to="varying")
        seen["made"] = jint.varying_axes(y)
        return x

    x = jax.device_put(jnp.ones((2, 4)), NamedSharding(mesh, P("a")))
    jax.shard_map(body, mesh=mesh, in_specs=P("a"), out_specs=P("a"))(x)
    assert seen == {"in": frozenset({"a"}), "made": frozenset({"b"})}
    assert jint.varying_axes(jnp.ones(2)) == frozenset()


def test_compiled_text_and_statistics():
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
    x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("d")))

    def f(x):
        return jax.lax.fori_loop(0, 3, lambda i, a: jnp.tanh(a @ jnp.ones((16, 16))), x).sum()

    compiled = jax.jit(f).lower(x).compile()
    text = jint.hlo_text(compiled)
    assert "all-reduce" in text and jint.HLO_TRIP_COUNT.search(text).group(1) == "3"
    assert jint.HLO_INDUCTION.search(text) and jint.HLO_INIT_STEP.search(text).groups() == ("0", "1")
    # a table of over 10 elements: elided by as_text(), printed whole by the module printer (autoshard.hlo
    # reads the pipeline's schedule tables from it; without it, branch counts fall back to upper bounds)
    table = jax.jit(lambda i: jnp.asarray(np.arange(100, 124, dtype=np.int32))[i]).lower(1).compile()
    assert "{...}" in jint.hlo_text(table)
    assert "100, 101, 102" in jint.hlo_text_with_constants(table)
    mem = jint.memory_stats(compiled)
    assert mem["argument"] == 16 * 4 and set(mem) == {"argument", "output", "temp", "alias", "generated_code"}
    assert jint.cost_stats(compiled)["flops"] > 0

    class Garbled:
        def as_text(self):
            return "module main\n  x = 1\n"

    with pytest.raises(jint.JaxInternalsError, match=r"compiled.as_text\(\) changed"):
        jint.hlo_text(Garbled())


# -- the workarounds ------------------------------------------------------------------------------------------------

def test_jax_still_cannot_differentiate_a_shard_map_nested_in_a_partly_manual_one():
    """Why the pipeline executor makes seq and expert manual itself (autoshard/pipeline.py, sequence.is_manual).
    If this fails, jax fixed it: the executor could leave seq/expert to the ops' own shard_maps."""
    mesh = jax.make_mesh((2, 2), ("pipe", "seq"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:4])

    def inner(x):
        body = lambda b: jnp.sin(b) * jax.lax.psum(b.sum(), "seq")  # noqa: E731
        return jax.shard_map(body, mesh=jax.sharding.get_abstract_mesh(), axis_names={"seq"},
                             in_specs=P(None, "seq"), out_specs=P(None, "seq"))(x)

    outer = jax.shard_map(inner, mesh=mesh, axis_names={"pipe"}, in_specs=P("pipe"), out_specs=P("pipe"))
    x = jnp.arange(32.0).reshape(4, 8)
    with jax.set_mesh(mesh):
        jax.jit(outer)(x).block_until_ready()  # the forward works
        with pytest.raises(Exception, match="verifier|already bound|cotangent"):
            jax.jit(jax.grad(lambda x: outer(x).sum()))(x)


_DEADLOCK = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    mesh = jax.make_mesh((2, 2), ("pipe", "seq"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    def body(b):  # devices of stage 0 run a ppermute over seq, those of stage 1 do not
        send = lambda b: jax.lax.ppermute(b, "seq", [(0, 1), (1, 0)])
        return jax.lax.switch(jax.lax.axis_index("pipe"), [send, lambda b: b * 2], b)
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("pipe", "seq"), out_specs=P("pipe", "seq")))
    x = jnp.arange(16.0).reshape(4, 4)
    f = f.lower(x).compile()
    print("running", flush=True)
    f(x).block_until_ready()
    print("done", flush=True)
""")


def test_xla_cpu_collective_permute_in_a_stage_branch_still_deadlocks():
    """Why `sequence.ppermute_deadlocks` builds exchanges from all-to-alls inside the pipeline executor on CPU.
    If this fails, XLA:CPU fixed its rendezvous: `ppermute_deadlocks` can return False."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", _DEADLOCK], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        with pytest.raises(subprocess.TimeoutExpired):
            out, _ = proc.communicate(timeout=3)  # a ppermute of 16 floats takes milliseconds
            pytest.fail(f"the collective-permute completed ({out.strip()!r}): drop the all-to-all workaround")
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_supported_range_is_documented():
    lo, hi = (".".join(map(str, v)) for v in jint.SUPPORTED_JAX)
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"jax(/jaxlib)? {re.escape(lo)}", readme) and f"<{hi}" in readme


def test_stacked_residual_bytes_counts_what_the_vjp_keeps_per_layer():
    """A scan of L layers h -> tanh(h @ w_l): per layer the vjp keeps the matmul's input (for w_l's gradient) and
    tanh's output (its derivative), [B, D] each; the weights it also holds do not depend on the batch."""
    L, B, D = 3, 4, 8

    def loss(w, x):
        h, _ = jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)
        return jnp.sum(h)

    (w,) = host_normal(0, (L, D, D))
    closed = jax.make_jaxpr(loss)(w, jnp.zeros((B, D)))
    # run for real: the closure's [L, ...] leaves that change with the batch (jax 0.12 keeps 2 a layer, 0.10 3)
    leaves = [[x for x in jax.tree.leaves(jax.vjp(lambda w: loss(w, jnp.full((B, D), v)), w)[1])
               if isinstance(x, jax.Array) and x.ndim >= 2 and x.shape[0] == L] for v in (0.5, -1.0)]
    kept = sum(a.nbytes for a, b in zip(*leaves) if not np.array_equal(a, b))
    assert kept in (L * 2 * B * D * 4, L * 3 * B * D * 4)
    assert jint.stacked_residual_bytes(closed, 1, L) == kept
