"""The function path: a plain `loss_fn(variables, batch[, rng])` planned and trained through the same two calls.

A Linen CNN whose kernels carry `nn.with_logical_partitioning` names, with BatchNorm statistics and dropout, and a
hand-written JAX MLP over a plain dict: every plan trains like a plain single-device optax loop (float32,
rtol 1e-5), state collections and the dropout key included, and the trained variables come back in the user's own
structure, boxes and all.
"""

import jax
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax.core import meta

import autoshard
from autoshard import explain
from planner.errors import AutoshardError, PlanError

STEPS = 3
LR = 0.1
logical = nn.with_logical_partitioning


class LinenCNN(nn.Module):
    """conv 3x3 (8, named embed -> mlp) -> BatchNorm -> relu -> 2x2 pool -> global mean -> dropout -> dense."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(8, (3, 3), kernel_init=logical(nn.initializers.lecun_normal(), (None, None, "embed", "mlp")))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.avg_pool(x, (2, 2), (2, 2)).mean(axis=(1, 2))
        x = nn.Dropout(0.25, deterministic=not train)(x)
        return nn.Dense(10, kernel_init=logical(nn.initializers.lecun_normal(), ("mlp", "vocab")))(x)


CNN = LinenCNN()


def cnn_loss(variables, batch, rng):
    logits, updates = CNN.apply(variables, batch["image"], mutable=["batch_stats"], rngs={"dropout": rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {**updates, "accuracy": (logits.argmax(-1) == batch["label"]).mean()}


def mlp_loss(params, batch):
    """Hand-written JAX: a two-layer MLP regression over a plain dict of arrays; returns the loss alone."""
    h = jax.nn.gelu(batch["x"] @ params["w1"] + params["b1"])
    return ((h @ params["w2"] - batch["y"]) ** 2).mean()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(5)
    return {"image": rng.normal(size=(32, 16, 16, 3)).astype(np.float32),
            "label": rng.integers(0, 10, size=(32,)).astype(np.int32)}


@pytest.fixture(scope="module")
def cnn_variables(images):
    return CNN.init({"params": jax.random.key(0)}, images["image"], train=False)


KEY = jax.random.key(7)


def reference_cnn(variables, batch):
    """Plain single-device optax: the losses, final parameters and BatchNorm statistics after STEPS steps."""
    params, stats, key, opt = nn.unbox(variables["params"]), variables["batch_stats"], KEY, optax.sgd(LR)
    state, losses = opt.init(params), []
    for _ in range(STEPS):
        key, sub = jax.random.split(key)
        (loss, aux), grads = jax.value_and_grad(
            lambda p: cnn_loss({"params": p, "batch_stats": stats}, batch, sub), has_aux=True)(params)
        updates, state = opt.update(grads, state, params)
        params, stats = optax.apply_updates(params, updates), aux["batch_stats"]
        losses.append(float(loss))
    return losses, {"params": params, "batch_stats": stats}


def _assert_same_tree(got, want):
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def free_cnn(images, cnn_variables):
    plan = autoshard.plan(cnn_loss, images, params=cnn_variables, rng=KEY, cluster="cpu:8")
    trainer = autoshard.parallelize(cnn_loss, optax.sgd(LR), plan, params=cnn_variables, rng=KEY)
    return plan, trainer, [trainer.step(images)["loss"] for _ in range(STEPS)]


def test_a_linen_cnn_with_batchnorm_and_dropout_trains_like_one_device(images, cnn_variables, free_cnn):
    plan, trainer, losses = free_cnn
    assert plan.batch_shards >= 2, plan.mesh
    ref_losses, ref = reference_cnn(cnn_variables, images)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    trained = trainer.variables()
    # the user's own structure comes back: the same collections, the logical-partitioning boxes where they were
    is_box = lambda x: isinstance(x, meta.AxisMetadata)  # noqa: E731
    assert jax.tree.structure(trained, is_leaf=is_box) == jax.tree.structure(cnn_variables, is_leaf=is_box)
    assert trained["params"]["Conv_0"]["kernel"].names == (None, None, "embed", "mlp")
    _assert_same_tree(nn.unbox(trained), ref)  # parameters and the BatchNorm statistics the steps left
    # the result plugs straight back into the user's model
    CNN.apply(trained, images["image"], train=False)


def test_logical_names_reach_the_rules_and_explain(images, cnn_variables):
    plan = autoshard.rule_plan(cnn_loss, "data=4,tensor=2", params=cnn_variables)
    assert plan.params["Conv_0/kernel"] == [None, None, None, "tensor"]  # "mlp" -> tensor (column parallel)
    assert plan.params["Dense_0/kernel"] == ["tensor", None]  # then row parallel: one tensor split per parameter
    trainer = autoshard.parallelize(cnn_loss, optax.sgd(LR), plan, params=cnn_variables, rng=KEY)
    losses = [trainer.step(images)["loss"] for _ in range(STEPS)]
    ref_losses, ref = reference_cnn(cnn_variables, images)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    _assert_same_tree(nn.unbox(trainer.variables()), ref)
    rows = {r.name: r for r in autoshard.verify(trainer, images).rows}
    assert rows["data/all-reduce"].ok and rows["tensor/all-reduce"].ok, rows


def test_plans_record_the_logical_names_explain_shows(free_cnn, cnn_variables):
    assert free_cnn[0].provenance["params"]["Dense_0/kernel"] == [[8, 10], ["mlp", "vocab"]]
    plan = autoshard.rule_plan(cnn_loss, "data=4,tensor=2", params=cnn_variables)
    text = explain.explain(type(plan).from_json(plan.to_json()))  # as `autoshard explain plan.json` reads it
    rows = {line.split()[0]: line for line in text.splitlines() if "kernel" in line}
    # the strategy column reads the logical names: "mlp" out of a layer is column-parallel
    assert "3x3x3x8" in rows["Conv_0/kernel"] and "column-parallel" in rows["Conv_0/kernel"], rows
    assert "mlp over tensor" in rows["Dense_0/kernel"], rows


def test_a_batch_the_loss_cannot_read_is_one_line_before_any_step(regression):
    """A key the loss lacks, a shape it does not take: one line naming the batch (planning, and a trainer's first
    trace of such a batch: nothing donated or stepped); the trainer then steps on a good batch as if nothing
    happened."""
    params, batch = regression
    with pytest.raises(AutoshardError, match=r"reads batch\['y'\], which this batch lacks"):  # planning it too
        autoshard.plan(mlp_loss, {"x": batch["x"]}, params=params, cluster="cpu:8")
    plan = autoshard.rule_plan(mlp_loss, "data=2", params=params)
    trainer = autoshard.parallelize(mlp_loss, optax.sgd(0.1), plan, params=params, devices=jax.devices()[:2])
    with pytest.raises(AutoshardError, match=r"reads batch\['y'\], which this batch lacks \(batch\['x'\] "
                                             r"float32\[16, 8\]\): give the batch every key"):
        trainer.step({"x": batch["x"]})
    with pytest.raises(AutoshardError, match=r"could not be traced on this batch \(batch\['x'\] float32\[16, 7\], "
                                             r"batch\['y'\] float32\[16, 4\]\): TypeError: .*dot_general"):
        trainer.step({"x": batch["x"][:, :7], "y": batch["y"]})
    assert trainer.steps_done == 0
    loss = trainer.step(batch)["loss"]
    np.testing.assert_allclose(loss, mlp_loss(params, batch), rtol=1e-5)


@pytest.fixture(scope="module")
def regression():
    rng = np.random.default_rng(1)
    params = {"w1": rng.normal(size=(8, 32)).astype(np.float32) * 0.3, "b1": np.zeros(32, np.float32),
              "w2": rng.normal(size=(32, 4)).astype(np.float32) * 0.3}
    batch = {"x": rng.normal(size=(16, 8)).astype(np.float32), "y": rng.normal(size=(16, 4)).astype(np.float32)}
    return params, batch


@pytest.mark.parametrize("mesh", ["fsdp=8", pytest.param("data=2,fsdp=2,tensor=2", marks=pytest.mark.smoke)])
def test_a_hand_written_jax_loss_trains_like_one_device(regression, mesh):
    params, batch = regression
    plan = autoshard.plan(mlp_loss, batch, params=params, cluster="cpu:8", mesh=mesh)
    trainer = autoshard.parallelize(mlp_loss, optax.adam(1e-2), plan, params=params)
    losses = [trainer.step(batch)["loss"] for _ in range(STEPS)]
    opt, p = optax.adam(1e-2), params
    state, want = opt.init(p), []
    for _ in range(STEPS):
        loss, grads = jax.value_and_grad(mlp_loss)(p, batch)
        updates, state = opt.update(grads, state, p)
        p = optax.apply_updates(p, updates)
        want.append(float(loss))
    np.testing.assert_allclose(losses, want, rtol=1e-5)
    _assert_same_tree(trainer.variables(), p)
    assert set(trainer.variables()) == set(params)
    np.testing.assert_array_equal(params["b1"], np.zeros(32, np.float32))  # the caller's arrays are not donated


@pytest.mark.parametrize("call, match", [
    (lambda p, b: autoshard.parallelize(mlp_loss, optax.sgd(1), autoshard.rule_plan(mlp_loss, "data=8", params=p),
                                        params=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), p)),
     "params= holds shapes only"),
    (lambda p, b: autoshard.plan(mlp_loss, b, params={**p, "step": np.int32(0)}, cluster="cpu:8"),
     r"variables leaf step has dtype int32: only floating arrays can be trained"),
    (lambda p, b: autoshard.parallelize(mlp_loss, optax.sgd(1), autoshard.rule_plan(mlp_loss, "data=8", params=p),
                                        params=p, loss_fn=mlp_loss),
     "pass the loss function itself"),
    (lambda p, b: autoshard.parallelize(mlp_loss, optax.sgd(1),
                                        autoshard.rule_plan(mlp_loss, "data=8", params={**p, "w3": p["w2"]}),
                                        params=p),
     "plan names parameter 'w3' that the model lacks"),
])
def test_bad_function_path_input_is_one_clear_error(regression, call, match):
    params, batch = regression
    with pytest.raises((AutoshardError, PlanError), match=match):
        call(params, batch)


@pytest.mark.parametrize("optimizer, copies", [(optax.sgd(0.1), 0.0), (optax.sgd(0.1, momentum=0.9), 1.0),
                                               (optax.adamw(1e-3), 2.0)])
def test_memory_is_priced_for_the_optimizer_that_trains(regression, optimizer, copies):
    """The weights' share of memory: parameters, gradients and the optimizer's own state (none for plain SGD)."""
    from autoshard.api import optimizer_copies

    params, batch = regression
    assert optimizer_copies(optimizer, params) == copies
    plan = autoshard.rule_plan(mlp_loss, "data=8", params=params)
    weights = sum(x.size * 4 for x in jax.tree.leaves(params))
    predicted = autoshard.predict(plan, mlp_loss, batch, params=params, optimizer=optimizer)
    assert predicted["memory_breakdown"]["parameters and optimizer state"] == (2 + copies) * weights


def test_a_fixed_tensor_degree_with_nothing_to_split_warns_once():
    """A model with no weight worth splitting (a per-feature scale and shift) on the user's tensor=2: the plan keeps
    the degree, and one warning says the axis is idle and what to use instead."""
    def loss(p, batch):
        return jax.numpy.mean((batch["x"] * p["scale"] + p["shift"] - batch["y"]) ** 2)

    params = {"scale": np.ones(4, np.float32), "shift": np.zeros(4, np.float32)}
    batch = {"x": np.ones((16, 4), np.float32), "y": np.zeros((16, 4), np.float32)}
    with pytest.warns(UserWarning, match=r"tensor=2 is idle in the plan for .*use data or fsdp instead") as record:
        plan = autoshard.plan(loss, batch, params=params, cluster="cpu:8", mesh={"tensor": 2})
    assert plan.mesh["tensor"] == 2
    assert len([w for w in record if "is idle" in str(w.message)]) == 1
