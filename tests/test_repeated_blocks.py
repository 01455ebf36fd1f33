"""Repeated blocks, solved once: a model whose layers are a Python loop over identical blocks (`nnx.List` of blocks,
`for b in self.blocks: x = b(x)`) is folded into a layer stack by the trace, so the integer program does not grow
with depth, and its plans still name the model's real parameters and predict what the op-by-op graph predicts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from autoshard import api
from planner.cluster import load_cluster
from planner.errors import AutoshardError
from planner.plan import Plan
from planner.search import plan_graph, predict, trace_model

CPU8 = load_cluster("cpu:8")
VOCAB, D, F, HEADS = 64, 16, 32, 2


class Block(nnx.Module):
    """Pre-norm transformer block: LayerNorm -> attention -> residual -> LayerNorm -> MLP -> residual."""

    def __init__(self, d: int, f: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, f, rngs=rngs)
        self.down = nnx.Linear(f, d, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask=mask, deterministic=True)
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class LoopLM(nnx.Module):
    """Token model whose blocks are a Python loop; `widths` gives each block's MLP width (default: all F)."""

    def __init__(self, n: int, widths: list[int] | None = None, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.blocks = nnx.List([Block(D, f, rngs) for f in (widths or [F] * n)])
        self.ln_f = nnx.LayerNorm(D, rngs=rngs)
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        mask = nnx.make_causal_mask(jnp.ones(tokens.shape))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


def token_loss(model, batch):
    logits = model(batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean(), {}


def factory(n: int, widths: list[int] | None = None):
    return lambda: LoopLM(n, widths)


@pytest.fixture(scope="module")
def batch():
    toks = np.random.default_rng(0).integers(0, VOCAB, size=(8, 9)).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:]}


def graph_of(n: int, batch, widths=None, fold=True):
    return trace_model(nnx.eval_shape(factory(n, widths)), batch, token_loss, fold=fold)


def real_names(n: int) -> set[str]:
    return {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(nnx.eval_shape(factory(n)), nnx.Param))}


def assert_same_predictions(a: dict, b: dict) -> None:
    for key in ("step_seconds", "memory_bytes_per_device"):
        assert a[key] == pytest.approx(b[key], rel=1e-6), key
    assert a["comm_bytes"].keys() == b["comm_bytes"].keys()
    for key, nb in a["comm_bytes"].items():
        assert nb == pytest.approx(b["comm_bytes"][key], rel=1e-6), key


@pytest.mark.smoke
def test_a_python_loop_of_blocks_is_folded_into_a_layer_stack(batch):
    two, four = graph_of(2, batch), graph_of(4, batch)
    assert (two.layers, four.layers) == (2, 4) and four.stack == "loop"
    assert len(two.ops) == len(four.ops) < len(four.unfolded.ops)  # one block's ops, whatever the depth
    assert four.params["blocks/*/up/kernel"].shape == (4, D, F)
    assert four.blocks["blocks/*/up/kernel"] == [f"blocks/{i}/up/kernel" for i in range(4)]
    assert all(op.count == 4 for op in four.ops if op.in_layer) and len(four.carries) == 1
    cout, cin = four.carries[0]
    assert four.values[cout].shape == four.values[cin].shape == (8, 8, D)
    assert sum(op.primitive == "layer_boundary" for op in four.ops) == 1
    slice_ = next(v for v in four.values.values() if v.param == "blocks/*/up/kernel" and v.producer is None
                  and v.shape == (D, F))
    assert slice_.param_dims == (1, 2)  # the layer slice skips the stack dimension, as a scanned stack's does


def test_blocks_that_differ_are_not_folded(batch):
    graph = graph_of(3, batch, widths=[F, F, 2 * F])
    assert graph.stack is None and graph.layers == 1 and not graph.blocks
    assert "blocks/2/up/kernel" in graph.params


def test_folded_and_op_by_op_graphs_give_the_same_plan(batch):
    folded, unfolded = graph_of(3, batch), graph_of(3, batch, fold=False)
    assert unfolded.stack is None
    for mesh in ({}, {"tensor": 2}):
        a, b = plan_graph(folded, CPU8, 8, mesh=mesh), plan_graph(unfolded, CPU8, 8, mesh=mesh)
        assert a.mesh == b.mesh and a.remat == b.remat == "none"
        assert a.params == b.params and list(a.params) == list(b.params)
        assert a.activations == b.activations
        assert_same_predictions(a.predicted, b.predicted)


class GatedBlock(nnx.Module):
    """A block whose MLP is one of two, picked by a `lax.cond` on the batch (the tracer walks both branches)."""

    def __init__(self, rngs: nnx.Rngs):
        self.ln = nnx.LayerNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, F, rngs=rngs)
        self.alt = nnx.Linear(D, F, rngs=rngs)
        self.down = nnx.Linear(F, D, rngs=rngs)

    def __call__(self, x, gate):
        h = jax.lax.cond(gate, lambda h: self.up(h), lambda h: self.alt(jnp.tanh(h)), self.ln(x))
        return x + self.down(nnx.gelu(h))


class GatedLM(nnx.Module):
    def __init__(self, n: int, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.blocks = nnx.List([GatedBlock(rngs) for _ in range(n)])
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        x, gate = self.embed(tokens), jnp.sum(tokens) % 2 == 0
        for block in self.blocks:
            x = block(x, gate)
        return self.head(x)


def test_blocks_with_a_cond_fold_and_plan_as_op_by_op(batch):
    model = nnx.eval_shape(lambda: GatedLM(3))
    folded, unfolded = (trace_model(model, batch, token_loss, fold=fold) for fold in (True, False))
    assert folded.stack == "loop" and folded.layers == 3
    assert {"blocks/*/up/kernel", "blocks/*/alt/kernel"} <= set(folded.params)
    mesh = {"data": 4, "fsdp": 1, "tensor": 2}
    a, b = plan_graph(folded, CPU8, 8, mesh=mesh), plan_graph(unfolded, CPU8, 8, mesh=mesh)
    assert a.params == b.params and a.activations == b.activations
    assert_same_predictions(a.predicted, b.predicted)


def test_the_plan_names_the_models_real_parameters(batch):
    plan = api.plan(factory(3), batch, loss_fn=token_loss, cluster="cpu:8")
    assert set(plan.params) == real_names(3)
    assert plan.pipeline is None and plan.remat == "none"


def test_pinned_real_paths(batch):
    folded = graph_of(3, batch)
    spec = [None, "tensor"]
    every = {f"blocks/{i}/up/kernel": spec for i in range(3)}
    plan = plan_graph(folded, CPU8, 8, mesh={"tensor": 2}, pin=every)  # one spec for all blocks: planned folded
    assert all(plan.params[p] == spec for p in every)
    one = plan_graph(folded, CPU8, 8, mesh={"tensor": 2}, pin={"blocks/1/up/kernel": spec})  # op by op
    assert one.params["blocks/1/up/kernel"] == spec and set(one.params) == real_names(3)
    with pytest.raises(AutoshardError, match="no such parameter"):
        plan_graph(folded, CPU8, 8, pin={"blocks/7/up/kernel": spec})


def test_a_plan_giving_blocks_different_specs_is_predicted_op_by_op(batch):
    folded, unfolded = graph_of(3, batch), graph_of(3, batch, fold=False)
    mesh = {"pipe": 1, "data": 4, "fsdp": 1, "expert": 1, "seq": 1, "tensor": 2}
    params = {p: [] for p in real_names(3)}
    same = Plan(mesh=mesh, params={**params, **{f"blocks/{i}/up/kernel": [None, "tensor"] for i in range(3)}})
    assert_same_predictions(predict(same, folded, CPU8), predict(same, unfolded, CPU8))
    mixed = Plan(mesh=mesh, params={**params, "blocks/1/up/kernel": [None, "tensor"]})
    assert_same_predictions(predict(mixed, folded, CPU8), predict(mixed, unfolded, CPU8))


def test_the_planner_pipelines_a_loop_only_restaged(batch):
    """The folded graph itself has no stack to cut: the planner says where its pipeline is planned
    (`autoshard.plan` restages the model: tests/test_staging.py)."""
    with pytest.raises(AutoshardError, match="restaged as a scanned stack: plan it with autoshard.plan"):
        plan_graph(graph_of(2, batch), CPU8, 8, mesh={"pipe": 2})
