"""Control flow inside a model: the tracer walks `cond` branches and `while` / `scan` loop bodies, so the matmuls in
them get sharding strategies of their own instead of one opaque replicated op.

`lax.cond` / `nnx.cond`: every branch's ops are planned (each priced as if it ran: an upper bound on the work),
joined by a `select_n` of the branches' results. A `lax.fori_loop` with static bounds is a `scan`; a
`lax.while_loop` whose count the jaxpr fixes (`i < 3` on a counter stepped by a literal) runs its body that many
times, any other once, with a warning that its count is unknown. Each model is planned on a fixed data x fsdp x
tensor mesh of 8 emulated CPU devices and trains like a plain single-device optax loop (float32, rtol 1e-5).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import autoshard
from planner.layouts import has_rule, strategies
from planner.search import trace_model
from planner.trace import trace

D, H, C, B = 8, 16, 4, 16
STEPS = 2
LR = 0.1
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


class CondNet(nnx.Module):
    """in -> relu -> one of two matmul paths, picked by the parity of the batch's label sum -> head. `kind`: the
    branch written with `lax.cond` (closing over the modules) or `nnx.cond` (the modules as operands)."""

    def __init__(self, kind: str = "lax", rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.kind = kind
        self.inp = nnx.Linear(D, H, rngs=rngs)
        self.a = nnx.Linear(H, H, rngs=rngs)
        self.b = nnx.Linear(H, H, rngs=rngs)
        self.head = nnx.Linear(H, C, rngs=rngs)

    def loss(self, batch):
        h = nnx.relu(self.inp(batch["x"]))
        even = jnp.sum(batch["label"]) % 2 == 0
        if self.kind == "lax":
            h = jax.lax.cond(even, lambda h: self.a(h), lambda h: self.b(jnp.tanh(h)), h)
        else:
            h = nnx.cond(even, lambda m, h: m.a(h), lambda m, h: m.b(jnp.tanh(h)), self, h)
        logits = self.head(h)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), {}


class LoopNet(nnx.Module):
    """in -> `lax.fori_loop(0, 3)` over tanh(mix(h)) (static bounds: a scan) -> head. `kind="while"`: the inputs
    first go through a `lax.while_loop` of two matmuls with a fixed (non-trained) projection, which the gradient
    does not cross (reverse-mode differentiation cannot go through a while loop)."""

    def __init__(self, kind: str = "fori", rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.kind = kind
        self.proj = nnx.Variable(jax.random.normal(jax.random.key(7), (D, D)) / np.sqrt(D))
        self.inp = nnx.Linear(D, H, rngs=rngs)
        self.mix = nnx.Linear(H, H, rngs=rngs)
        self.head = nnx.Linear(H, C, rngs=rngs)

    def loss(self, batch):
        x = batch["x"]
        if self.kind == "while":
            proj = self.proj.get_value()
            x = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, jnp.tanh(c[1] @ proj)), (0, x))[1]
        h = nnx.relu(self.inp(x))
        h = jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(self.mix(h)), h)
        logits = self.head(h)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), {}


def batches():
    """Two batches whose label sums differ in parity: the cond takes both branches in two steps."""
    rng = np.random.default_rng(0)
    out = []
    for parity in (0, 1):
        label = rng.integers(0, C, size=(B,)).astype(np.int32)
        if int(label.sum()) % 2 != parity:
            label[0] = (label[0] + 1) % C
        out.append({"x": rng.normal(size=(B, D)).astype(np.float32), "label": label})
    return out


def shapes(batch):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)


def reference(factory, data):
    """Losses of a plain single-device optax loop."""
    with jax.default_device(jax.devices()[0]):
        graphdef, params, rest = nnx.split(factory(), nnx.Param, ...)
        opt = optax.sgd(LR)
        state = opt.init(params)

        @jax.jit
        def step(params, state, batch):
            loss, grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p, rest).loss(batch)[0])(params)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        losses = []
        for batch in data:
            params, state, loss = step(params, state, batch)
            losses.append(float(loss))
    return losses


def plan_and_train(factory, data, split: list[str]):
    """Plan with the kernels `split` pinned column-parallel over tensor (the model is too small for the search to
    split anything over it), train two steps: the plan and the losses."""
    pin = {kernel: [None, "tensor"] for kernel in split}
    plan = autoshard.plan(factory, shapes(data[0]), cluster="cpu:8", mesh=MESH, pin=pin)
    assert all(plan.params[k] == [None, "tensor"] for k in split)
    trainer = autoshard.parallelize(factory(), optax.sgd(LR), plan)  # built: no init program to compile
    return plan, [float(trainer.step(batch)["loss"]) for batch in data]


def matmuls_of(graph, kernel: str):
    """The dot_general ops that read parameter `kernel` (or a cast of it)."""
    return [op for op in graph.ops if op.primitive == "dot_general"
            and any(i is not None and graph.values[i].param == kernel for i in op.inputs)]


@pytest.mark.smoke
@pytest.mark.parametrize("kind", ["lax", "nnx"])
def test_both_branches_of_a_cond_are_planned(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "planned as one replicated op" any more
        graph = trace_model(nnx.eval_shape(lambda: CondNet(kind)), shapes(batches()[0]))
    assert "cond" not in {op.primitive for op in graph.ops}
    for kernel in ("a/kernel", "b/kernel"):
        (op,) = matmuls_of(graph, kernel)
        assert has_rule(op, graph.values) and len(strategies(op, graph.values, 2)) > 1
        assert op.eqns == ()  # inside a branch: the runtime runs the cond whole, it constrains nothing in it
    (head,) = matmuls_of(graph, "head/kernel")
    join = graph.ops[graph.values[head.inputs[0]].producer]  # what the head reads: the branches' results, joined
    assert join.primitive == "select_n" and graph.values[join.outputs[0]].batch_dim == 0
    branch_outs = [graph.ops[graph.values[i].producer] for i in join.inputs[1:]]
    assert [op.primitive for op in branch_outs] == ["add", "add"]  # each branch's bias add, after its matmul
    assert {matmuls_of(graph, k)[0].outputs[0] for k in ("a/kernel", "b/kernel")} == {
        op.inputs[0] for op in branch_outs}


@pytest.mark.parametrize("kind", ["lax", "nnx"])
def test_a_model_with_a_cond_trains_like_one_device(kind):
    factory = lambda: CondNet(kind)  # noqa: E731
    data = batches()
    _, losses = plan_and_train(factory, data, ["a/kernel", "b/kernel"])
    np.testing.assert_allclose(losses, reference(factory, data), rtol=1e-5)


def test_a_literal_index_plans_the_branch_it_picks():
    w = jnp.ones((4, 4))

    def loss(p, b):
        return jax.lax.cond(True, lambda x: x @ p["w"], lambda x: jnp.tanh(x) @ p["w"], b["x"]).sum()

    graph = trace(loss, {"w": w}, {"x": jnp.ones((8, 4))}, ["w"], {})
    assert [op.primitive for op in graph.ops] == ["dot_general", "reduce_sum"]  # the true branch alone


@pytest.mark.smoke
def test_loop_bodies_are_walked_with_their_trip_counts():
    w, x = jnp.ones((4, 4)), jnp.ones((8, 4))

    def loss(p, b, bound=None):
        h = jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"]), b["x"])  # a scan of 3
        h = jax.lax.while_loop(lambda c: c[0] < 5, lambda c: (c[0] + 1, c[1] @ p["w"]), (1, h))[1]  # 4 times
        if bound is not None:  # a traced bound: the count is not in the jaxpr
            h = jax.lax.fori_loop(0, bound, lambda i, h: h @ p["w"], h)
        return h.sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph = trace(loss, {"w": w}, {"x": x}, ["w"], {})
    counts = sorted(op.count for op in graph.ops if op.primitive == "dot_general")
    assert counts == [3, 4]
    assert {"while", "scan"}.isdisjoint(op.primitive for op in graph.ops)
    assert all(graph.values[op.outputs[0]].batch_dim == 0 for op in graph.ops if op.primitive == "dot_general")
    with pytest.warns(UserWarning, match="its trip count depends on values; planned as if its body ran once"):
        graph = trace(lambda p, b: loss(p, b, b["n"]), {"w": w}, {"x": x, "n": jnp.int32(2)}, ["w"], {},
                      batch_dims={"x": 0, "n": -1})
    assert sorted(op.count for op in graph.ops if op.primitive == "dot_general") == [1, 3, 4]


@pytest.mark.parametrize("kind", ["fori", "while"])
def test_a_model_with_a_loop_trains_like_one_device(kind):
    factory = lambda: LoopNet(kind)  # noqa: E731
    data = batches()
    _, losses = plan_and_train(factory, data, ["mix/kernel"])
    np.testing.assert_allclose(losses, reference(factory, data), rtol=1e-5)


def test_an_op_without_a_rule_in_a_branch_is_replicated_with_one_warning():
    class Odd(CondNet):
        def loss(self, batch):
            h = self.inp(batch["x"])
            h = jax.lax.cond(jnp.sum(batch["label"]) > 0, lambda h: self.a(jax.lax.lgamma(h * h + 1.0)),
                             lambda h: self.b(h), h)
            return optax.softmax_cross_entropy_with_integer_labels(self.head(h), batch["label"]).mean(), {}

    with pytest.warns(UserWarning, match="no sharding rule for lgamma") as record:
        autoshard.plan(lambda: Odd(), shapes(batches()[0]), cluster="cpu:8", mesh=MESH)
    assert sum("no sharding rule" in str(w.message) for w in record) == 1
