"""Expert placement: routing statistics, the ILP against brute force and baselines, permutations that keep the
model's function, one-line errors, and `autoshard place`."""

import json

import numpy as np
import pytest

from autoshard import cli
from planner import placement as pl
from planner.errors import PlanError
from checks import assert_one_line_error


def random_trace(layers, experts, tokens, k, seed):
    """Uniform distinct choices per token: no planted structure (small cases for brute force)."""
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((layers, tokens, experts)), axis=2)[:, :, :k]


@pytest.fixture(scope="module")
def planted():
    """4 layers x 8 experts, k=2, 90% of tokens follow their experts' planted partners."""
    return pl.Routing.from_trace(pl.synthetic_trace(4, 8, 2048, 2, 0.9, seed=3))


# -- routing statistics ---------------------------------------------------------------------------------------------

def test_loads_and_affinity_count_all_k_by_k_pairs():
    ids = np.array([[[0, 1], [2, 3]],      # layer 0: token 0 -> {0, 1}, token 1 -> {2, 3}
                    [[1, 2], [2, 0]]])     # layer 1
    r = pl.Routing.from_trace(ids, experts=4)
    assert r.loads.tolist() == [[1, 1, 1, 1], [1, 1, 2, 0]]
    want = np.zeros((4, 4), int)
    for e in (0, 1):
        for f in (1, 2):
            want[e, f] += 1
    for e in (2, 3):
        for f in (2, 0):
            want[e, f] += 1
    assert r.affinity.shape == (1, 4, 4) and (r.affinity[0] == want).all()
    assert r.affinity.sum() == 2 * 2 * 2  # tokens x k x k


def test_metrics_by_hand():
    ids = np.array([[[0], [1], [2], [3]], [[1], [0], [3], [2]]])   # k=1: 0->1, 1->0, 2->3, 3->2
    r = pl.Routing.from_trace(ids)
    rr = pl.round_robin(2, 4, 2)                                    # experts {0,1} rank 0, {2,3} rank 1
    assert rr.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert pl.cross_device_fraction(rr, r, 2) == 0.0
    swapped = np.array([[0, 0, 1, 1], [0, 1, 0, 1]])                # layer 1: {0,2} rank 0, {1,3} rank 1
    assert pl.cross_device_fraction(swapped, r, 2) == 0.5
    assert pl.cross_node_fraction(swapped, r, 2, nodes=1) == 0.0
    assert pl.cross_node_fraction(swapped, r, 2, nodes=2) == 0.5
    assert pl.max_load_over_mean(rr, r, 2) == 1.0


def test_synthetic_trace_is_balanced_and_planted():
    ids = pl.synthetic_trace(3, 16, 4096, 2, 0.8, seed=0)
    assert ids.shape == (3, 4096, 2) and ids.dtype == np.int32
    assert all(len(set(t)) == 2 for t in ids[1, :100].tolist())          # distinct choices per token
    r = pl.Routing.from_trace(ids)
    assert r.loads.max() / r.loads.mean() < 1.15
    # each expert's top partner in the next layer takes >= 80% x 1/k of its hops (planted), chance would be 1/16
    top = r.affinity.max(axis=2) / r.affinity.sum(axis=2)
    assert top.min() > 0.35
    flat = pl.Routing.from_trace(pl.synthetic_trace(3, 16, 4096, 2, 0.0, seed=0))
    assert (flat.affinity.max(axis=2) / flat.affinity.sum(axis=2)).max() < 0.15


# -- placers -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers,experts,ep,nodes,balance,tight", [
    (2, 4, 2, 1, 1.10, True),
    (2, 4, 2, 1, 1.10, False),
    (3, 6, 2, 1, None, True),
    (3, 4, 4, 2, None, True),
    (2, 8, 4, 4, 1.25, True),
])
def test_ilp_is_optimal_against_brute_force(layers, experts, ep, nodes, balance, tight):
    r = pl.Routing.from_trace(random_trace(layers, experts, 96, 2, seed=layers * experts + ep), experts)
    res = pl.ilp(r, ep, nodes, balance=balance, time_limit=10, tight=tight, sweep=0.25 if tight else 0)
    best, best_obj = pl.brute_force(r, ep, nodes, balance=balance)
    assert res.optimal and res.status == "optimal"
    assert res.objective == pytest.approx(best_obj)
    assert pl.objective(res.placement, r, ep, nodes) == pytest.approx(best_obj)
    assert pl.objective(best, r, ep, nodes) == pytest.approx(best_obj)
    pl.check_placement(res.placement, experts, ep, layers)                     # E/ep experts per rank per layer
    if balance is not None:
        assert pl.max_load_over_mean(res.placement, r, ep) <= balance + 1e-9


def test_ilp_cuts_cross_device_hops_on_planted_trace(planted):
    res = pl.ilp(planted, 4, time_limit=10)
    rr = pl.round_robin(4, 8, 4)
    gr = pl.greedy(planted, 4)
    cut = 1 - pl.cross_device_fraction(res.placement, planted, 4) / pl.cross_device_fraction(rr, planted, 4)
    assert cut >= 0.30, cut
    assert pl.max_load_over_mean(res.placement, planted, 4) <= 1.10
    assert pl.objective(res.placement, planted, 4) <= pl.objective(gr, planted, 4)
    for p in (rr, gr, res.placement):
        pl.check_placement(p, 8, 4, 4)


def test_greedy_balances_skewed_loads():
    rng = np.random.default_rng(0)
    weights = np.array([8, 7, 6, 5, 4, 3, 2, 1], float)
    ids = rng.choice(8, size=(2, 3000, 1), p=weights / weights.sum())
    r = pl.Routing.from_trace(ids)
    assert pl.max_load_over_mean(pl.greedy(r, 4), r, 4) < pl.max_load_over_mean(pl.round_robin(2, 8, 4), r, 4)
    assert pl.max_load_over_mean(pl.greedy(r, 4), r, 4) < 1.05


def test_ilp_balance_is_hard(planted):
    skewed = pl.Routing(planted.loads * np.array([5, 1, 1, 1, 1, 1, 1, 1]), planted.affinity)
    with pytest.raises(PlanError, match="raise the balance factor"):
        pl.ilp(skewed, 4, time_limit=2)


# -- applying a placement ---------------------------------------------------------------------------------------------

def moe_forward(x, arrays, k):
    """A tiny stacked MoE: per layer, top-k of x @ router picks experts; gates are the softmax over the top-k."""
    for router, w in zip(arrays["router"], arrays["w"]):
        logits = x @ router                                                   # [T, E]
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k]              # expert indices
        g = np.take_along_axis(logits, top, axis=1)
        g = np.exp(g - g.max(axis=1, keepdims=True))
        g /= g.sum(axis=1, keepdims=True)
        y = np.stack([np.tanh(x[t] @ w[top[t]]) for t in range(len(x))])    # [T, k, D]
        x = x + np.einsum("tk,tkd->td", g, y)
    return x


def test_permutation_keeps_the_function(planted):
    L, E, D = 4, 8, 6
    rng = np.random.default_rng(0)
    arrays = {"router": rng.normal(size=(L, D, E)), "w": rng.normal(size=(L, E, D, D)) / D,
              "w_mu": rng.normal(size=(L, E, D, D)), "embed": rng.normal(size=(5, D))}
    placement = pl.ilp(planted, 4, time_limit=10).placement
    perms = pl.placement_permutations(placement, 4)
    new = pl.permute_experts(arrays, perms, {"router": -1, "w": 1, "w_mu": 1})
    x = rng.normal(size=(16, D))
    np.testing.assert_allclose(moe_forward(x, new, 2), moe_forward(x, arrays, 2), rtol=1e-12, atol=1e-12)
    assert new["embed"] is arrays["embed"]                                     # unnamed paths untouched
    for l in range(L):                                                          # contiguous sharding realises it
        assert (placement[l][perms[l]] == np.arange(E) // 2).all()
        assert (new["w_mu"][l] == arrays["w_mu"][l][perms[l]]).all()
    back = pl.permute_experts(new, pl.inverse_permutations(perms), {"router": 2, "w": 1, "w_mu": 1})
    assert all((back[p] == arrays[p]).all() for p in arrays)


@pytest.mark.parametrize("arrays,perms,axes,match", [
    ({"w": np.zeros((2, 4, 3))}, np.array([[0, 1, 2, 3]] * 2), {"v": 1}, "no array named 'v'"),
    ({"w": np.zeros((2, 4, 3))}, np.array([[0, 1, 2, 3]] * 2), {"w": 2}, "has shape"),
    ({"w": np.zeros((2, 4, 3))}, np.array([[0, 1, 2, 3]] * 2), {"w": 0}, "non-layer axis"),
    ({"w": np.zeros((2, 4, 3))}, np.array([[0, 1, 1, 3]] * 2), {"w": 1}, "exactly once"),
])
def test_permute_experts_errors(arrays, perms, axes, match):
    with pytest.raises(PlanError, match=match) as e:
        pl.permute_experts(arrays, perms, axes)
    assert "\n" not in str(e.value)


# -- bad input ---------------------------------------------------------------------------------------------------------

GOOD = np.zeros((2, 10, 2), dtype=np.int32)


@pytest.mark.parametrize("call,match", [
    (lambda: pl.check_ep(8, 3), "ep=3 does not divide the 8 experts"),
    (lambda: pl.check_ep(8, 4, 3), "nodes=3 does not divide ep=4"),
    (lambda: pl.check_trace(np.zeros((2, 10))), "must be 3-D"),
    (lambda: pl.check_trace(GOOD.astype(float)), "integer expert ids"),
    (lambda: pl.check_trace(GOOD, layers=3), "2 layers but the model has 3"),
    (lambda: pl.check_trace(GOOD + 8, experts=8), "expert id 8 but the model has 8 experts"),
    (lambda: pl.check_trace(GOOD - 1), "negative expert id"),
    (lambda: pl.check_trace(GOOD[:, :0]), "empty"),
    (lambda: pl.ilp(pl.Routing.from_trace(GOOD, 8), 3), "does not divide"),
    (lambda: pl.greedy(GOOD, 2), "does not divide the 1 experts"),
    (lambda: pl.check_placement(np.array([[0, 0, 0, 1]]), 4, 2), "each rank must hold exactly 2"),
    (lambda: pl.synthetic_trace(2, 4, 10, 5, 0.5), "1 <= k <= experts"),
])
def test_bad_input_is_a_one_line_plan_error(call, match):
    with pytest.raises(PlanError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


# -- CLI ---------------------------------------------------------------------------------------------------------------

def test_cli_place(tmp_path, capsys):
    f = tmp_path / "trace.npz"
    np.savez(f, expert_ids=pl.synthetic_trace(4, 8, 1024, 2, 0.9, seed=1))
    out_file = tmp_path / "placement.json"
    args = ["--trace", str(f), "--ep", "4", "--nodes", "2", "--time-limit", "3", "-o", str(out_file)]
    assert cli.main(["place", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"round_robin", "greedy", "ilp"}
    for r in out.values():
        assert np.array(r["placement"]).shape == (4, 8)
        assert 0 <= r["cross_device_fraction"] <= 1 and 0 <= r["cross_node_fraction"] <= r["cross_device_fraction"]
        assert r["max_load_over_mean"] >= 1
    assert out["ilp"]["cross_device_fraction"] < out["round_robin"]["cross_device_fraction"]
    assert json.loads(out_file.read_text()) == out


@pytest.mark.parametrize("content,args,match", [
    ("junk", [], "cannot read trace"),
    ("missing", [], "No such file"),
    ({"ids": np.zeros((2, 4, 1), int)}, [], "no array named expert_ids"),
    ({"expert_ids": np.zeros((2, 4), int)}, [], "3-D"),
    ({"expert_ids": np.full((2, 4, 1), 9)}, ["--experts", "8"], "expert id 9"),
    ({"expert_ids": np.zeros((2, 4, 1), int), "experts": 6}, [], "ep=4 does not divide the 6 experts"),
])
def test_cli_place_bad_trace(tmp_path, capsys, content, args, match):
    f = tmp_path / "trace.npz"
    if content == "junk":
        f.write_text("not a zip")
    elif isinstance(content, dict):
        np.savez(f, **content)
    assert cli.main(["place", "--trace", str(f), "--ep", "4", *args]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, match)
    assert captured.out == ""
