"""The planner finds what it should: the ILP optimum is the exhaustive optimum, memory pressure recovers Megatron,
ample memory and a large batch give data parallelism, an infeasible budget is a one-line error naming the least
memory needed, and planned plans (for models written here, NNX and Linen) train like one device does."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.nnx import bridge

import models
from autoshard import api
from autoshard.train import make_optimizer, parallelize
from planner.cluster import Link, load_cluster
from planner.errors import AutoshardError
from planner.ilp import Problem
from planner.plan import AXES
from planner.rules import ParamInfo
from planner.search import plan_graph, smallest_memory, trace_model
from planner.trace import trace

S, F32 = jax.ShapeDtypeStruct, jnp.float32
CPU8 = load_cluster("cpu:8")
STEPS = 3


def full_mesh(**sizes) -> dict[str, int]:
    return {a: sizes.get(a, 1) for a in AXES}


def tensor_dims(spec) -> list[int]:
    return [d for d, e in enumerate(spec) if e == "tensor" or (isinstance(e, list) and "tensor" in e)]


# -- small losses written as plain functions ------------------------------------------------------------------------

def mlp_loss(p, b):
    """A 2-layer MLP regression: relu(x @ w1) @ w2 against a target."""
    return jnp.mean((jax.nn.relu(b["x"] @ p["w1"]) @ p["w2"] - b["y"]) ** 2)


def scan_loss(p, b):
    """Three residual tanh layers run by a scan over stacked weights (carries, trip counts), then a projection."""
    def layer(x, w):
        return x + jnp.tanh(x @ w), None
    x, _ = jax.lax.scan(layer, b["x"], p["w"])
    return jnp.mean((x @ p["out"]) ** 2)


CASES = {
    "mlp": (mlp_loss, {"w1": S((32, 64), F32), "w2": S((64, 32), F32)},
            {"x": S((16, 32), F32), "y": S((16, 32), F32)}),
    "scan": (scan_loss, {"out": S((32, 8), F32), "w": S((3, 32, 32), F32)}, {"x": S((16, 32), F32)}),
}


@pytest.fixture(scope="module")
def graphs():
    out = {}
    for name, (fn, params, batch) in CASES.items():
        paths = sorted(params)  # a dict flattens in key order
        out[name] = trace(fn, params, batch, paths, {k: ParamInfo(v.shape, "float32") for k, v in params.items()})
    return out


def min_memory(problem: Problem) -> float:
    """The least memory of any assignment: each parameter and each residual at its smallest layout."""
    params = sum(min(problem.param_memory(p, c) for c in ch) for p, ch in problem.param_choices.items())
    acts = sum(n * min(problem.value_memory(v, lay) for lay in problem.value_layout_options(v))
               for v, n in problem.residuals().items())
    return params + acts


# -- 1. the ILP is exact --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, remat", [("mlp", "none"), ("scan", "none"), ("scan", "full")])  # remat acts on layers
@pytest.mark.parametrize("mesh", [dict(tensor=2), dict(data=2, tensor=2), dict(fsdp=2, tensor=2)],
                         ids=["t2", "d2t2", "f2t2"])
@pytest.mark.parametrize("followers", ["followers", "no-followers"])
def test_ilp_optimum_equals_brute_force(graphs, case, remat, mesh, followers):
    problem = Problem(graphs[case], full_mesh(**mesh), CPU8, remat=remat)
    if followers == "no-followers":  # every op a decision of its own: a larger space for the encoding to get right
        problem.followers = {}
    combos = math.prod(len(s) for s in problem.op_strats.values()) * \
        math.prod(len(c) for c in problem.param_choices.values())
    assert combos <= 50_000, f"{combos} assignments: too many to enumerate, shrink the case"
    free = problem.solve()
    lo = min_memory(problem)
    assert free is not None and lo < free.memory_bytes  # so that the budgets below bind
    binding = 0
    # (a budget exactly at a plan's memory admits it: CP-SAT's whole bytes must not round it out)
    for budget in (None, lo, (lo + free.memory_bytes) / 2, free.memory_bytes - 1, free.memory_bytes):
        ilp, best = problem.solve(budget), problem.brute_force(budget)
        if best is None:
            assert ilp is None, f"budget {budget}: the ILP found {ilp.params} where brute force found nothing"
            continue
        assert ilp is not None, f"budget {budget}: brute force found {best.params}, the ILP nothing"
        assert ilp.step_seconds == pytest.approx(best.step_seconds, rel=1e-6), (
            f"budget {budget}: ILP picked {[s.name for s in ilp.ops.values()]} {ilp.params}, brute force "
            f"{[s.name for s in best.ops.values()]} {best.params}")
        if budget is not None:
            assert ilp.memory_bytes <= budget
            binding += 1
    assert binding, "no binding budget was feasible"
    assert problem.solve(free.memory_bytes).step_seconds == pytest.approx(free.step_seconds, rel=1e-9)
    assert problem.solve(lo - 1) is None and problem.brute_force(lo - 1) is None


# -- 2. Megatron under memory pressure, data parallelism when everything fits -------------------------------------

def pressure_budget(graph, mesh: dict[str, int], must_split: list[str]) -> float:
    """A budget at which every parameter in `must_split` has to be at its smallest layout, and activations are free.

    It is the least memory of the parameters (each at its smallest layout, with the copies the backward keeps of it)
    plus the activations all replicated (the most any layout needs) plus the batch. Replicating one of `must_split`
    costs more than that activation allowance (checked), so no plan that fits leaves one of them whole, while any
    layout of the activations fits.
    """
    problem = Problem(graph, full_mesh(**mesh), CPU8)
    mems = {path: [problem.param_memory(path, c) + problem.kept_weight_memory(path, c) for c in ch]
            for path, ch in problem.param_choices.items()}
    acts = sum(n * problem.value_memory(v, None) for v, n in problem.residuals().items())
    for path in must_split:
        assert max(mems[path]) - min(mems[path]) > acts, f"{path} is too small to force a split: grow the case"
    return sum(min(m) for m in mems.values()) + acts + problem.batch_memory()


def test_mlp_under_memory_pressure_is_megatron(graphs):
    # tensor=8 over a 2-layer MLP whose weights cannot stay whole. Column-parallel w1 then row-parallel w2 needs
    # one all-reduce of the output; splitting either weight the other way moves activations as well.
    graph = graphs["mlp"]
    fixed = {"data": 1, "fsdp": 1, "tensor": 8}
    budget = pressure_budget(graph, fixed, ["w1", "w2"])
    plan = plan_graph(graph, CPU8, 16, mesh=fixed, memory_budget=budget)
    assert plan.mesh == full_mesh(tensor=8)
    assert plan.params == {"w1": [None, "tensor"], "w2": ["tensor", None]}
    # the same through the public entry point for plain functions
    fn, params, batch = CASES["mlp"]
    plan = api.plan_function(fn, params, batch, mesh=fixed, cluster=CPU8, memory_budget=budget)
    assert plan.params == {"w1": [None, "tensor"], "w2": ["tensor", None]}


class Block(nnx.Module):
    """One pre-norm transformer block with embedding and head, from stock NNX layers (not models/)."""

    def __init__(self, vocab=64, d=32, heads=8, f=128, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.q = nnx.LinearGeneral(d, (heads, d // heads), rngs=rngs)
        self.k = nnx.LinearGeneral(d, (heads, d // heads), rngs=rngs)
        self.v = nnx.LinearGeneral(d, (heads, d // heads), rngs=rngs)
        self.o = nnx.LinearGeneral((heads, d // heads), d, axis=(-2, -1), rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, f, rngs=rngs)
        self.down = nnx.Linear(f, d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        h = self.ln1(x)
        att = nnx.dot_product_attention(self.q(h), self.k(h), self.v(h), mask=nnx.make_causal_mask(tokens))
        x = x + self.o(att)
        x = x + self.down(jax.nn.gelu(self.up(self.ln2(x))))
        return self.head(x)


def block_loss(model, batch):
    loss = optax.softmax_cross_entropy_with_integer_labels(model(batch["inputs"]), batch["targets"]).mean()
    return loss, {"ce": loss}


def block_factory():
    return Block(rngs=nnx.Rngs(0))


def token_batch_of(batch: int, seq: int, vocab: int, seed: int = 1) -> dict[str, np.ndarray]:
    toks = np.random.default_rng(seed).integers(0, vocab, size=(batch, seq + 1)).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:]}


MEGATRON = {  # parameter -> the dimension tensor parallelism splits
    "block": {"q/kernel": 1, "k/kernel": 1, "v/kernel": 1, "o/kernel": 0,   # heads (in, then out of attention)
              "up/kernel": 1, "down/kernel": 0},                            # hidden features: column, then row
    "gpt": {"blocks/attn/wq": 2, "blocks/attn/wk": 2, "blocks/attn/wv": 2, "blocks/attn/wo": 1,
            "blocks/mlp/w_up": 2, "blocks/mlp/w_down": 1},
}


@pytest.fixture(scope="module")
def megatron_graphs():
    # one token of batch per step and wide layers: the weights, not the activations, are what must be split
    batch = token_batch_of(1, 8, 64)
    return {"block": trace_model(nnx.eval_shape(lambda: Block(d=128, f=512, rngs=nnx.Rngs(0))), batch, block_loss),
            "gpt": trace_model(models.abstract("gpt-tiny:layers=1,heads=8,hidden=128,mlp=512,vocab=64"), batch)}


@pytest.mark.parametrize("which", ["block", "gpt"])
def test_transformer_block_under_memory_pressure_is_megatron(which, megatron_graphs):
    # tensor=8 and weights that cannot stay whole: the planner must split each projection along the dimension
    # that keeps whole attention heads and whole MLP columns on one device (q/k/v and the output projection by
    # heads, the MLP's two matrices by its hidden features), which leaves one all-reduce per sub-block.
    graph = megatron_graphs[which]
    fixed = {"data": 1, "fsdp": 1, "tensor": 8}
    budget = pressure_budget(graph, fixed, list(MEGATRON[which]))
    plan = plan_graph(graph, CPU8, 1, mesh=fixed, memory_budget=budget)
    got = {path: tensor_dims(plan.params[path]) for path in MEGATRON[which]}
    assert got == {path: [d] for path, d in MEGATRON[which].items()}
    assert plan.predicted["memory_bytes_per_device"] <= budget


@pytest.mark.parametrize("preset", ["a100-80g:8", "cpu:8"])
def test_large_batch_that_fits_is_data_parallel(preset):
    # Link latency set to 0, so a collective costs its bytes alone (with latency, the per-parameter gradient
    # all-reduces of a model this small favour fewer ring steps, hence fsdp/tensor). Every mesh divides the
    # matmuls 8 ways; pure data parallelism then moves 2(n-1)/n of the parameters once per step, ZeRO-3 moves
    # 3(n-1)/n of them, and tensor parallelism moves activations, which grow with the (large) batch. Memory
    # is no constraint (a 130k-parameter model), so the answer splits the batch 8 ways with no tensor axis and moves
    # what pure data parallelism moves. (Meshes of data x fsdp that replicate the dense weights tie with data=8 on
    # time and bytes; the tie goes to less memory: a looked-up table split over fsdp, whose lookups move instead.)
    base = load_cluster(preset)
    cluster = base.replace(intra=Link(base.intra.bandwidth, 0.0), inter=Link(base.inter.bandwidth, 0.0))
    batch = {"inputs": np.zeros((256, 64), np.int32), "targets": np.zeros((256, 64), np.int32)}
    plan = api.plan(models.abstract("gpt-tiny"), batch, cluster=cluster)
    assert plan.mesh["tensor"] == 1 and plan.mesh["data"] * plan.mesh["fsdp"] == 8, plan.mesh_string()
    assert not any("tensor" in str(spec) for spec in plan.params.values()), plan.params
    pure = next((a for a in plan.alternatives if a["mesh"] == {"data": 8}), {"predicted": plan.predicted})
    moved = lambda p: sum(p["comm_bytes"].values())  # noqa: E731
    assert moved(plan.predicted) <= moved(pure["predicted"]) * (1 + 1e-9)
    assert plan.predicted["memory_bytes_per_device"] <= pure["predicted"]["memory_bytes_per_device"]
    assert plan.remat == "none"


# -- 3. an infeasible budget ---------------------------------------------------------------------------------------

UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


@pytest.mark.parametrize("which", ["gpt-tiny", "block:tensor=8"])
def test_infeasible_budget_names_the_least_memory(which, token_batch):
    if which == "gpt-tiny":
        model, batch, mesh, loss_fn = models.abstract("gpt-tiny"), token_batch, None, None
    else:  # a fixed mesh: the figure must be the least of the plans over that mesh
        model, batch, loss_fn = nnx.eval_shape(block_factory), token_batch_of(8, 16, 64), block_loss
        mesh = {"data": 1, "fsdp": 1, "tensor": 8}
    with pytest.raises(AutoshardError) as e:
        api.plan(model, batch, mesh=mesh, cluster=CPU8, memory_budget=1000, loss_fn=loss_fn)
    msg = str(e.value)
    assert "\n" not in msg
    found = re.search(r"needs ([0-9.]+) (B|KiB|MiB|GiB|TiB)", msg)
    assert found, msg
    need = float(found.group(1)) * UNITS[found.group(2)]
    assert need > 1000
    # a plan fits in 1% more than the figure named ...
    plan = api.plan(model, batch, mesh=mesh, cluster=CPU8, memory_budget=need * 1.01, loss_fn=loss_fn)
    assert plan.predicted["memory_bytes_per_device"] <= need * 1.01
    # ... and none in less than the exact figure behind it
    exact = smallest_memory(trace_model(model, batch, loss_fn), CPU8, len(batch["inputs"]), mesh)
    assert exact == pytest.approx(need, rel=0.03)  # the message rounds to one decimal
    with pytest.raises(AutoshardError, match="no plan fits"):
        api.plan(model, batch, mesh=mesh, cluster=CPU8, memory_budget=exact * 0.99, loss_fn=loss_fn)


# -- 4 and 5. planned plans train like one device ---------------------------------------------------------------

def losses(factory, plan, batch, loss_fn=None, devices=None) -> list[float]:
    trainer = parallelize(factory, make_optimizer(1e-4, steps=10, warmup=1), plan, loss_fn=loss_fn,
                          devices=devices if devices is not None else jax.devices()[: plan.num_devices])
    return [trainer.step(batch)["loss"] for _ in range(STEPS)]


def single_device(factory, batch, loss_fn=None) -> list[float]:
    plan = api.rule_plan(nnx.eval_shape(factory), "data=1")
    return losses(factory, plan, batch, loss_fn, devices=jax.devices()[:1])


def wide_block_factory():
    return Block(d=128, f=512, rngs=nnx.Rngs(0))


def test_planned_nnx_block_trains_like_one_device():
    batch = token_batch_of(2, 8, 64)
    fixed = {"data": 2, "fsdp": 1, "tensor": 4}
    graph = trace_model(nnx.eval_shape(wide_block_factory), batch, block_loss)
    budget = pressure_budget(graph, fixed, list(MEGATRON["block"]))
    plan = api.plan(wide_block_factory, batch, mesh=fixed, cluster=CPU8, memory_budget=budget, loss_fn=block_loss)
    assert plan.mesh == full_mesh(data=2, tensor=4)
    assert {path: tensor_dims(plan.params[path]) for path in MEGATRON["block"]} == \
        {path: [d] for path, d in MEGATRON["block"].items()}
    got = losses(wide_block_factory, plan, batch, block_loss)
    np.testing.assert_allclose(got, single_device(wide_block_factory, batch, block_loss), rtol=1e-5)


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(128, name="fc1")(x))
        return nn.Dense(16, name="fc2")(h)


def mse(pred, y):
    return jnp.mean((pred - y) ** 2)


def linen_factory():
    """The Linen model as an NNX module (no stored RNG streams: a traced call must not mutate state)."""
    model = bridge.ToNNX(LinenMLP())
    bridge.lazy_init(model, jnp.zeros((1, 32)), rngs=jax.random.key(0))
    return model


def linen_loss(model, batch):
    loss = mse(model(batch["x"]), batch["y"])
    return loss, {}


@pytest.fixture(scope="module")
def linen_batch():
    rng = np.random.default_rng(2)
    return {"x": rng.normal(size=(16, 32)).astype(np.float32), "y": rng.normal(size=(16, 16)).astype(np.float32)}


@pytest.mark.smoke
def test_planned_linen_model_trains_like_one_device(linen_batch):
    fixed = {"data": 2, "fsdp": 1, "tensor": 4}
    graph = trace_model(nnx.eval_shape(linen_factory), linen_batch, linen_loss)
    budget = pressure_budget(graph, fixed, ["fc1/kernel", "fc2/kernel"])  # the weights must be split
    # planned as a plain function of Linen variables ...
    module = LinenMLP()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 32)))
    by_function = api.plan_function(lambda p, b: mse(module.apply(p, b["x"]), b["y"]), variables, linen_batch,
                                    mesh=fixed, cluster=CPU8, memory_budget=budget)
    # ... and as the bridged NNX module the runtime trains: the same plan under the same names (plan_function
    # drops Linen's `params` collection prefix, so its plan runs on the bridged model)
    by_model = api.plan(linen_factory, linen_batch, mesh=fixed, cluster=CPU8, memory_budget=budget,
                        loss_fn=linen_loss)
    assert by_function.params == by_model.params
    assert by_function.mesh == by_model.mesh == full_mesh(data=2, tensor=4)
    assert by_model.params["fc1/kernel"] == [None, "tensor"] and by_model.params["fc2/kernel"] == ["tensor", None]

    got = losses(linen_factory, by_model, linen_batch, linen_loss)
    # the single-device reference: plain Linen + optax on the default device, without autoshard at all
    opt = make_optimizer(1e-4, steps=10, warmup=1)
    params = variables["params"]
    state = opt.init(params)
    step = jax.jit(jax.value_and_grad(lambda p: mse(module.apply({"params": p}, linen_batch["x"]), linen_batch["y"])))
    want = []
    for _ in range(STEPS):
        loss, grads = step(params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        want.append(float(loss))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_bridged_linen_module_with_rng_streams_plans_and_trains(linen_batch):
    # The bridge as Flax documents it keeps RNG streams in the module; each call draws from them (a state update),
    # which neither the planner's trace nor the train step may turn into an error.
    def factory():
        model = bridge.ToNNX(LinenMLP(), rngs=nnx.Rngs(0))
        bridge.lazy_init(model, jnp.zeros((1, 32)))
        return model

    plan = api.plan(factory, linen_batch, mesh={"data": 8}, cluster=CPU8, loss_fn=linen_loss)
    got = losses(factory, plan, linen_batch, linen_loss)
    np.testing.assert_allclose(got, single_device(factory, linen_batch, linen_loss), rtol=1e-5)


def test_planned_gpt_tiny_under_memory_pressure_uses_tensor_and_trains_like_one_device(token_batch):
    # Without fsdp only tensor parallelism can split the weights; a budget under the least memory any tensor=1 mesh
    # could need (a lower bound) leaves the planner no choice but tensor > 1.
    model = "gpt-tiny"
    abstract = models.abstract(model)
    graph = trace_model(abstract, token_batch)
    budget = 0.98 * smallest_memory(graph, CPU8, 16, {"fsdp": 1, "tensor": 1})
    plan = plan_graph(graph, CPU8, 16, mesh={"fsdp": 1}, memory_budget=budget)
    assert plan.mesh["tensor"] > 1 and plan.mesh["fsdp"] == 1, plan.mesh
    assert plan.predicted["memory_bytes_per_device"] <= budget
    assert any(tensor_dims(spec) for spec in plan.params.values())
    built = models.create(model, seed=0)  # built once, eagerly: neither trainer compiles an initialiser of its own
    got = losses(built, plan, token_batch)
    want = losses(built, api.rule_plan(abstract, "data=1"), token_batch, devices=jax.devices()[:1])
    np.testing.assert_allclose(got, want, rtol=1e-5)


# -- parameter names ------------------------------------------------------------------------------------------------

class WithValueProjection(nnx.Module):
    """nnx.MultiHeadAttention names its projections query / key / value / out."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.attn = nnx.MultiHeadAttention(4, 16, decode=False, rngs=rngs)

    def loss(self, batch):
        y = self.attn(batch["x"], deterministic=True)
        return jnp.mean(y ** 2), {}


def test_a_module_named_value_keeps_its_name():
    batch = {"x": np.zeros((8, 4, 16), np.float32)}
    plan = api.plan(lambda: WithValueProjection(rngs=nnx.Rngs(0)), batch, cluster=CPU8)
    assert "attn/value/kernel" in plan.params and "attn/query/kernel" in plan.params


class LinenValueKey(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="value")(x) * nn.Dense(8, name="key")(x)


def test_a_linen_module_named_value_keeps_its_name():
    module = LinenValueKey()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 16)))
    batch = {"x": np.zeros((8, 16), np.float32)}
    plan = api.plan_function(lambda p, b: jnp.mean(module.apply(p, b["x"]) ** 2), variables, batch, cluster=CPU8)
    assert sorted(plan.params) == ["key/bias", "key/kernel", "value/bias", "value/kernel"]


def test_a_pinned_parameter_keeps_its_spec_and_the_rest_is_searched(token_batch):
    model = models.abstract("gpt-tiny")
    pin = {"blocks/mlp/w_up": [None, None, "tensor"]}
    plan = api.plan(model, token_batch, cluster=CPU8, mesh={"tensor": 2}, pin=pin)
    assert plan.params["blocks/mlp/w_up"] == [None, None, "tensor"]
    assert plan.params["blocks/mlp/w_down"][1] == "tensor"  # the search pairs it row-parallel
    with pytest.raises(AutoshardError, match="no such parameter"):
        api.plan(model, token_batch, cluster=CPU8, pin={"blocks/nope": [None]})


class _HalfMLP(nnx.Module):
    """A user model that multiplies in bfloat16 (weights kept in float32) and has no `cfg.dtype` to read."""

    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(8, 32, dtype=jnp.bfloat16, rngs=rngs)
        self.down = nnx.Linear(32, 8, dtype=jnp.bfloat16, rngs=rngs)

    def loss(self, batch):
        return jnp.mean((self.down(jax.nn.relu(self.up(batch["x"]))).astype(jnp.float32) - batch["y"]) ** 2), {}


def test_the_compute_dtype_is_read_off_the_trace():
    """The planner prices matmuls at the peak of the dtype the traced contractions run in, model attributes aside:
    a user model casting to bfloat16, the shipped decoder in either dtype."""
    batch = {"x": jax.ShapeDtypeStruct((8, 8), jnp.float32), "y": jax.ShapeDtypeStruct((8, 8), jnp.float32)}
    assert trace_model(nnx.eval_shape(lambda: _HalfMLP(nnx.Rngs(0))), batch).compute_dtype() == "bfloat16"
    toks = jax.ShapeDtypeStruct((4, 16), jnp.int32)
    for dtype in ("float32", "bfloat16"):
        graph = trace_model(models.abstract(f"gpt-tiny:dtype={dtype}"), {"inputs": toks, "targets": toks})
        assert graph.compute_dtype() == dtype


def _conv_classifier(params, batch):
    """A first layer that reads the batch: its input needs no gradient, so its backward is one product, not two."""
    x = jax.lax.conv_general_dilated(batch["x"], params["conv"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.mean((jnp.tanh(x).mean(axis=(1, 2)) @ params["head"]) ** 2)


@pytest.mark.parametrize("which", ["gpt-tiny", "moe-tiny:layers=2", "conv"])
def test_training_flops_equal_the_traced_backward(which):
    """`Graph.training_flops` (from the forward alone) is what jax's own value_and_grad would do."""
    from planner.trace import matmul_flops

    if which == "conv":
        params = {"conv": jnp.ones((3, 3, 3, 8)), "head": jnp.ones((8, 4))}
        batch = {"x": jnp.ones((4, 8, 8, 3))}
        graph, fn = trace(_conv_classifier, params, batch, ["conv", "head"], {}), _conv_classifier
        args = (params, batch)
    else:
        model = models.abstract(which)
        toks = jax.ShapeDtypeStruct((4, 16), jnp.int32)
        batch = {"inputs": toks, "targets": toks}
        graph = trace_model(model, batch)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        fn = lambda p, b: nnx.merge(graphdef, p, rest, copy=True).loss(b)[0]  # noqa: E731
        args = (params, batch)
    traced = matmul_flops(jax.make_jaxpr(jax.value_and_grad(fn))(*args))
    assert graph.training_flops() == pytest.approx(traced, rel=1e-9)
    if which != "moe-tiny:layers=2":  # (MoE: not every dispatch product has two differentiable operands)
        assert graph.passes() < 3.0 if which == "conv" else graph.passes() == pytest.approx(3.0, rel=0.01)


def test_pruning_keeps_the_leaders_and_the_best_of_each_kind():
    """Pruning (a mesh whose lower bound on step time cannot beat the `keep` fastest so far, nor the best of its
    kind) changes nothing the plan reports: the same leaders, the same best with and without a pipeline and
    seq/expert, the same count of meshes; and it does prune (every pruned mesh is slower, or does not fit)."""
    from planner.search import search

    toks = S((16, 256), jnp.int32)
    graph = trace_model(models.abstract("gpt-tiny:layers=4"), {"inputs": toks, "targets": toks})
    full, pruned = search(graph, CPU8, 16), search(graph, CPU8, 16, keep=3)
    key = lambda c: (c.mesh, c.sequence, pytest.approx(c.seconds, rel=1e-9))  # noqa: E731
    assert len(pruned) == len(full) and [key(c) for c in pruned[:3]] == [key(c) for c in full[:3]]
    for kind in (lambda c: c.mesh["pipe"] > 1, lambda c: c.mesh["seq"] > 1 or c.mesh["expert"] > 1):
        for want in (True, False):
            best = [next((key(c) for c in cands if c.solution is not None and kind(c) == want), None)
                    for cands in (full, pruned)]
            assert best[0] == best[1]
    skipped = {(tuple(c.mesh.items()), c.sequence) for c in pruned if c.pruned}
    assert skipped and not any(c.pruned for c in full)
    third = full[2].seconds
    assert all(c.solution is None or c.seconds > third for c in full if (tuple(c.mesh.items()), c.sequence) in skipped)


# -- near ties in predicted time -----------------------------------------------------------------------------------

def test_a_near_tie_goes_to_fewer_bytes_then_less_memory():
    from types import SimpleNamespace

    from planner.search import NEAR_TIE, near_tie_winner

    def plan(seconds, moved, memory):
        return SimpleNamespace(predicted={"step_seconds": seconds, "comm_bytes": {"data/all-reduce": moved},
                                          "memory_bytes_per_device": memory})

    fastest, frugal, lean = plan(1.0, 900, 50), plan(1.0 + NEAR_TIE / 2, 600, 60), plan(1.0 + NEAR_TIE / 2, 600, 40)
    assert near_tie_winner([fastest, frugal, lean]) is lean  # fewer bytes, then less memory
    slower = plan(1.0 + 2 * NEAR_TIE, 1, 1)
    assert near_tie_winner([fastest, slower]) is fastest  # outside the tie the faster plan wins whatever it moves
    same = plan(1.0, 900, 50)
    assert near_tie_winner([fastest, same]) is fastest  # all equal: the ranking's order stands
