"""Expert parallelism equals the dense MoE: outputs, statistics and gradients; its all-to-all bytes match."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from autoshard import experts, ops
from autoshard.emit import make_mesh
from autoshard.analysis import analyze
from planner.errors import PlanError
from planner.plan import Plan
from checks import host_normal

B, S, D, F, E, TOP_K = 8, 8, 8, 16, 4, 2


def _mesh(**axes):
    plan = Plan(mesh=axes)
    return make_mesh(plan, devices=jax.devices()[: plan.num_devices])


def _inputs(experts_count=E, batch=B):
    x, router, w_up, w_down = host_normal(0, (batch, S, D), (D, experts_count), (experts_count, D, F),
                                          (experts_count, F, D))
    return x, router, {"w_up": w_up / 3, "w_down": w_down / 4}


def expert_fn(w, h):  # h: [E, B, C, D]
    up = jnp.einsum("ebcd,edf->ebcf", h, w["w_up"])
    return jnp.einsum("ebcf,efd->ebcd", jax.nn.gelu(up), w["w_down"])


def _out_stats_grads(capacity_factor):
    def loss(x, router, weights):
        y, stats = ops.moe(x, router, weights, expert_fn, top_k=TOP_K, capacity_factor=capacity_factor)
        return jnp.sum(jnp.sin(y)) + stats.aux_loss, (y, stats)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


CASES = [  # mesh, batch spec, (w_up, w_down) specs, capacity factor, key of the exchange in the compiled stats
    (dict(expert=4), P("expert"), (P("expert"), P("expert")), 4.0, "expert/all-to-all"),
    (dict(expert=4), P("expert"), (P("expert"), P("expert")), 0.25, "expert/all-to-all"),  # drops tokens
    (dict(expert=2, tensor=2), P("expert"), (P("expert", None, "tensor"), P("expert", "tensor")), 4.0,
     "expert/collective-permute"),                                                          # TP inside experts
    (dict(data=2, expert=2), P(("expert", "data")), (P("expert"), P("expert")), 4.0, "expert/collective-permute"),
]


@pytest.mark.parametrize("axes,x_spec,w_specs,capacity_factor,key", CASES,
                         ids=["expert4", "expert4-drops", "expert2-tensor2", "data2-expert2"])
def test_matches_dense_and_bytes(axes, x_spec, w_specs, capacity_factor, key):
    x, router, weights = _inputs()
    (_, (want, want_stats)), want_grads = _out_stats_grads(capacity_factor)(x, router, weights)
    mesh = _mesh(**axes)
    args = (jax.device_put(x, NamedSharding(mesh, x_spec)), jax.device_put(router, NamedSharding(mesh, P())),
            {name: jax.device_put(w, NamedSharding(mesh, spec)) for (name, w), spec in zip(weights.items(), w_specs)})
    with ops.context(ops.OpsContext(mesh=mesh, moe="expert")):
        compiled = _out_stats_grads(capacity_factor).lower(*args).compile()
    (_, (got, got_stats)), got_grads = compiled(*args)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got_stats.aux_loss, want_stats.aux_loss, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got_stats.load, want_stats.load)
    assert float(got_stats.dropped) == float(want_stats.dropped)
    if capacity_factor < 1:
        assert float(got_stats.dropped) > 0
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
    # dispatch + combine (and their transposes) against the closed form
    n = axes["expert"]
    local_batch = B // (n * axes.get("data", 1))
    want_bytes = experts.moe_all_to_all_bytes(E, local_batch, ops.capacity(S, E, TOP_K, capacity_factor), D, n)
    stats = analyze(compiled, mesh)
    assert stats["comm_bytes"][key] == pytest.approx(want_bytes, rel=0.1), stats["comm_bytes"]


def test_experts_not_divisible():
    x, router, weights = _inputs(experts_count=6)
    with ops.context(ops.OpsContext(mesh=_mesh(expert=4), moe="expert")):
        with pytest.raises(PlanError, match=r"experts \(6\) divisible by expert=4"):
            jax.eval_shape(lambda x, r, w: ops.moe(x, r, w, expert_fn, top_k=2, capacity_factor=1.0),
                           x, router, weights)


def test_nested_in_pipe_shard_map():
    """Inside the pipeline executor's shard_map (manual over `pipe`) the expert shard_map nests."""
    x, router, weights = _inputs(batch=2 * B)
    want, want_stats = jax.vmap(lambda xs: ops.dense_moe(xs, router, weights, expert_fn, top_k=TOP_K,
                                                         capacity_factor=4.0), in_axes=0)(x.reshape(2, B, S, D))
    mesh = _mesh(pipe=2, expert=4)

    def stage(x, router, weights):
        y, stats = ops.moe(x, router, weights, expert_fn, top_k=TOP_K, capacity_factor=4.0)
        return y, stats.load[None]

    f = jax.shard_map(stage, mesh=mesh, axis_names={"pipe"}, in_specs=(P("pipe"), P(), P()),
                      out_specs=(P("pipe"), P("pipe")))
    args = (jax.device_put(x, NamedSharding(mesh, P(("pipe", "expert")))), router,
            jax.device_put(weights, NamedSharding(mesh, P("expert"))))
    with ops.context(ops.OpsContext(mesh=mesh, moe="expert")):
        got, load = jax.jit(f)(*args)
    np.testing.assert_allclose(got, want.reshape(2 * B, S, D), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(load, want_stats.load)


def test_bytes_formula_closed_form():
    assert experts.moe_all_to_all_bytes(8, 2, 4, 16, 4) == 4 * 3 / 4 * 8 * 2 * 4 * 16 * 4
    assert experts.moe_all_to_all_bytes(8, 2, 4, 16, 1) == 0
    assert experts.moe_all_to_all_bytes(8, 2, 4, 16, 2, backward=False, itemsize=2) == 2 * 1 / 2 * 8 * 2 * 4 * 16 * 2
