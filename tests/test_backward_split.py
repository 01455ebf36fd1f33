"""`planner.jax_internals.split_backward`: a backward pass cut into B (input gradients) and W (weight gradients)
for a zero-bubble pipeline schedule, exact and with no equation run twice, on the installed jax."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from planner import jax_internals as jint  # noqa: E402
from planner.trace import matmul_flops  # noqa: E402
from checks import host_normal  # noqa: E402

L, D, F, N = 4, 8, 16, 6  # layers, model width, hidden width, tokens: the dot shapes tell B's from W's


def _layer(h, w):
    """A pre-norm MLP block: a layernorm-like scale, a matmul, a gelu, a matmul, a residual add."""
    n = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6) * w["g"]
    return h + jnp.tanh(jax.nn.gelu(n @ w["w1"])) @ w["w2"], None


def _stage(w, h, layer=_layer):
    return jax.lax.scan(layer, h, w)[0]


def _weights(seed=0):
    w1, w2, g, h = host_normal(seed, (L, D, F), (L, F, D), (L, D), (N, D))
    return {"w1": w1 / 3, "w2": w2 / 4, "g": 1 + 0.1 * g}, h


def _residual_form(w, h, stage=_stage):
    """The backward as a pipeline executor runs it: the vjp closure's residuals and the cotangent as inputs."""
    out, vjp = jax.vjp(stage, w, h)
    ct = jnp.cos(out)
    leaves, treedef = jax.tree.flatten(vjp)
    closed = jax.make_jaxpr(lambda *a: jax.tree.unflatten(treedef, a[:-1])(a[-1]))(*leaves, ct)
    return closed, [*leaves, ct], vjp(ct)


def _run(closed, inputs):
    """B then W; the reference grads in the jaxpr's output order."""
    n_w = len(closed.jaxpr.outvars) - 1
    split = jint.split_backward(closed, [False] * n_w + [True])
    (dh,), iface = split.b(*inputs)
    assert [(a.shape, a.dtype) for a in iface] == [(a.shape, a.dtype) for a in split.interface_avals]
    return split, dh, split.w(*inputs, *iface), iface


def _check(dh, dw, ref):
    np.testing.assert_allclose(dh, ref[1], rtol=1e-6, atol=1e-6)
    for got, want in zip(dw, jax.tree.leaves(ref[0]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _eqns(jaxpr):
    for eqn in jint.open_jaxpr(jaxpr).jaxpr.eqns:
        yield eqn
        for sub in jint.sub_jaxprs(eqn):
            yield from _eqns(sub)


def _dot_shapes(jaxpr):
    return {e.outvars[0].aval.shape for e in _eqns(jaxpr) if e.primitive.name == "dot_general"}


def test_a_layer_stack_backward_splits_exactly_with_residual_inputs():
    w, h = _weights()
    closed, inputs, ref = _residual_form(w, h)
    split, dh, dw, iface = _run(closed, inputs)
    _check(dh, dw, ref)
    assert split.n_interface == len(iface) > 0
    assert all(a.shape[0] == L for a in split.interface_avals)  # per-layer values, stacked by the B scan


def test_the_forward_traced_with_the_backward_goes_to_b():
    w, h = _weights(1)
    out, vjp = jax.vjp(_stage, w, h)
    ct = jnp.sin(out)
    closed = jax.make_jaxpr(lambda w, h, ct: jax.vjp(_stage, w, h)[1](ct))(w, h, ct)
    split, dh, dw, _ = _run(closed, [*jax.tree.leaves(w), h, ct])
    _check(dh, dw, vjp(ct))
    inputs = [*jax.tree.leaves(w), h, ct]
    full = matmul_flops(closed)
    b = matmul_flops(jax.make_jaxpr(split.b)(*inputs))
    w_ = matmul_flops(jax.make_jaxpr(split.w)(*inputs, *split.b(*inputs)[1]))
    assert b + w_ == pytest.approx(full, rel=1e-6) and w_ == pytest.approx(full / 3)  # forward + dh matmuls in B


def test_no_work_is_duplicated_and_w_has_the_weight_gradient_matmuls():
    w, h = _weights()
    closed, inputs, _ = _residual_form(w, h)
    split = jint.split_backward(closed, [False] * (len(closed.jaxpr.outvars) - 1) + [True])
    b_jaxpr = jax.make_jaxpr(split.b)(*inputs)
    w_jaxpr = jax.make_jaxpr(split.w)(*inputs, *split.b(*inputs)[1])
    full, b, w_ = matmul_flops(closed), matmul_flops(b_jaxpr), matmul_flops(w_jaxpr)
    assert full == 4 * L * 2 * N * D * F  # two matmuls per layer, each with an input and a weight gradient
    assert b + w_ == pytest.approx(full, rel=0.01)
    assert w_ > 0.3 * full and b < 0.6 * full
    assert _dot_shapes(w_jaxpr) == {(D, F), (F, D)}  # weight gradients only: no cotangent chain in W
    assert _dot_shapes(b_jaxpr) == {(N, F), (N, D)}  # the cotangent chain only
    compiled = lambda f, *a: jint.cost_stats(jax.jit(f).lower(*a).compile())["flops"]  # noqa: E731
    iface = split.b(*inputs)[1]  # (XLA counts a loop body once, elementwise ops too: the sum is what must hold)
    whole = compiled(lambda *a: jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *a), *inputs)
    assert compiled(split.b, *inputs) + compiled(split.w, *inputs, *iface) == pytest.approx(whole, rel=0.01)
    n_eqns = lambda j: sum(1 for e in _eqns(j) if e.primitive.name not in ("scan", "pjit"))  # noqa: E731
    assert n_eqns(b_jaxpr) + n_eqns(w_jaxpr) <= n_eqns(closed) + 4  # (+ a few copies in and out of the scans)


def test_split_runs_under_jit():
    w, h = _weights(2)
    closed, inputs, ref = _residual_form(w, h)
    split = jint.split_backward(closed, [False] * (len(closed.jaxpr.outvars) - 1) + [True])
    (dh,), iface = jax.jit(split.b)(*inputs)
    _check(dh, jax.jit(split.w)(*inputs, *iface), ref)


def test_split_inside_a_shard_map_over_two_devices():
    mesh = jax.make_mesh((2,), ("d",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
    w, h = _weights(3)
    ct = jnp.cos(h)
    ref = jax.vjp(_stage, w, h)[1](ct)

    def body(w, h, ct):  # the backward traced per device: the weight gradients are summed over "d" (a psum)
        closed = jax.make_jaxpr(lambda w, h, ct: jax.vjp(_stage, w, h)[1](ct))(w, h, ct)
        assert any(e.primitive.name.startswith("psum") for e in _eqns(closed))
        split = jint.split_backward(closed, [False] * 3 + [True])
        inputs = [*jax.tree.leaves(w), h, ct]
        (dh,), iface = split.b(*inputs)
        return split.w(*inputs, *iface), dh

    dw, dh = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("d"), P("d")),
                                   out_specs=([P()] * 3, P("d"))))(w, h, ct)
    _check(dh, dw, ref)


def test_a_cond_in_the_layer_runs_wholly_in_b():
    def layer(h, w):
        h = jax.lax.cond(w["g"][0] > 1.0, lambda h: h @ w["w1"] @ w["w2"], lambda h: jnp.tanh(h @ w["w1"]) @ w["w2"],
                         h)
        return h + jnp.sin(h) * w["g"], None

    w, h = _weights(4)
    w["g"] = w["g"].at[::2, 0].set(2.0)  # both branches taken
    stage = lambda w, h: _stage(w, h, layer)  # noqa: E731
    closed, inputs, ref = _residual_form(w, h, stage)
    split, dh, dw, _ = _run(closed, inputs)
    _check(dh, dw, ref)
    w_jaxpr = jax.make_jaxpr(split.w)(*inputs, *split.b(*inputs)[1])
    assert not any(e.primitive.name == "cond" for e in _eqns(w_jaxpr))  # (its weight gradients are interface)


def test_calls_and_shared_weights_are_split_through():
    """A jitted matmul in the layer (a call both parts need) and a weight shared by every layer (its gradient is
    a carry of the transposed scan, summed in W's scan)."""
    @jax.jit
    def mlp(n, w1, w2):
        return jax.nn.relu(n @ w1) @ w2

    def stage(w, h):
        shared, stacked = w
        return jax.lax.scan(lambda h, w: (h + mlp(h * shared, w["w1"], w["w2"]), None), h, stacked)[0]

    w, h = _weights(5)
    w = (jnp.linspace(0.5, 1.5, D), {"w1": w["w1"], "w2": w["w2"]})
    closed, inputs, ref = _residual_form(w, h, stage)
    assert any(e.primitive.name in ("pjit", "jit") for e in _eqns(closed))
    split, dh, dw, _ = _run(closed, inputs)
    _check(dh, dw, ref)
    assert _dot_shapes(jax.make_jaxpr(split.w)(*inputs, *split.b(*inputs)[1])) == {(D, F), (F, D)}


def test_literals_dropped_values_unused_inputs_and_passed_through_inputs():
    def f(a, b, c, unused):
        _, ys = jax.lax.scan(lambda s, x: (s + x, s * x), 0.0, a)  # a dropped carry
        return ys * 2.0, b, 1.0, jnp.sin(c) * ys.sum(), c

    args = [jnp.arange(3.0), jnp.ones(2), jnp.float32(0.5), jnp.zeros(4)]
    closed = jax.make_jaxpr(f)(*args)
    want = f(*args)
    for flags in ([True, False, True, False, True], [False, True, False, True, False], [True] * 5, [False] * 5):
        split = jint.split_backward(closed, flags)
        b_out, iface = split.b(*args)
        w_out = iter(split.w(*args, *iface))
        b_out = iter(b_out)
        for flag, x in zip(flags, want):
            np.testing.assert_allclose(next(b_out) if flag else next(w_out), x)
        assert not split.w_inputs[3]
    with pytest.raises(ValueError, match="flags"):
        jint.split_backward(closed, [True])
