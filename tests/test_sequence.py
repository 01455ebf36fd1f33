"""Sequence parallelism (Ulysses, zigzag ring) equals dense attention; its communication matches the formulas."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from autoshard import ops, sequence
from autoshard.emit import make_mesh
from autoshard.analysis import analyze
from planner.errors import PlanError
from planner.plan import Plan
from checks import host_normal

B, S, D = 2, 16, 8


def _mesh(**axes):
    plan = Plan(mesh=axes)
    return make_mesh(plan, devices=jax.devices()[: plan.num_devices])


def _qkv(heads, kv_heads, batch=B):
    return host_normal(0, (batch, S, heads, D), (batch, S, kv_heads, D), (batch, S, kv_heads, D))


def _out_and_grads(causal, key_mask=None, window=None, softcap=None):
    def loss(q, k, v):
        o = ops.attention(q, k, v, causal=causal, key_mask=key_mask, window=window, softcap=softcap)
        return jnp.sum(jnp.sin(o)), o

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _seq_bytes(stats):
    """Bytes sent over `seq` by the op's exchanges (not the scalar loss's all-reduce)."""
    return sum(v for k, v in stats["comm_bytes"].items() if k in ("seq/all-to-all", "seq/collective-permute"))


CASES = [  # method, mesh, heads, kv_heads, causal, spec of q/k/v
    ("ulysses", dict(seq=4), 4, 4, True, P(None, "seq")),
    ("ulysses", dict(data=2, seq=4), 4, 4, True, P("data", "seq")),
    ("ulysses", dict(seq=2, tensor=2), 8, 4, True, P(None, "seq", "tensor")),  # grouped-query, heads over tensor
    ("ring", dict(seq=4), 4, 2, True, P(None, "seq")),                       # grouped-query
    ("ring", dict(seq=4), 4, 2, False, P(None, "seq")),
    ("ring", dict(data=2, seq=4), 4, 4, True, P("data", "seq")),
    ("ring", dict(seq=2, tensor=2), 4, 2, True, P(None, "seq", "tensor")),  # heads split over tensor
    ("ring", dict(seq=2, tensor=2), 4, 2, True, P(None, "seq")),  # heads whole on entry: split as priced
]


@pytest.mark.parametrize("method,axes,heads,kv_heads,causal,spec", CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{a}{n}' for a, n in c[1].items())}-h{c[2]}kv{c[3]}"
                              f"{'' if c[4] else '-noncausal'}" for c in CASES])
def test_matches_dense_and_bytes(method, axes, heads, kv_heads, causal, spec):
    q, k, v = _qkv(heads, kv_heads)
    (_, want), want_grads = _out_and_grads(causal)(q, k, v)  # no context: dense on one device
    mesh = _mesh(**axes)
    args = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
    with ops.context(ops.OpsContext(mesh=mesh, attention=method)):
        compiled = _out_and_grads(causal).lower(*args).compile()
    (_, got), got_grads = compiled(*args)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for g, w, name in zip(got_grads, want_grads, "qkv"):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
    # communication: bytes each device sends over `seq`, forward + backward, against the closed form
    n, batch = axes["seq"], B // axes.get("data", 1)
    tensor = axes.get("tensor", 1)
    if method == "ulysses":
        want_bytes = sequence.ulysses_bytes(batch, S, heads // tensor, kv_heads // tensor, D, n)
    else:
        want_bytes = sequence.ring_bytes(batch, S, heads // tensor, kv_heads // tensor, D, n, causal=causal)
    stats = analyze(compiled, mesh)
    exact = method == "ring"  # the ring's closed form is exact (forward and custom backward)
    assert _seq_bytes(stats) == pytest.approx(want_bytes, rel=1e-9 if exact else 0.1), stats["comm_bytes"]
    # and nothing else moves activations: no all-gathers of the batch over data or of heads over tensor
    assert not any(key.endswith("all-gather") for key in stats["comm_bytes"]), stats["comm_bytes"]


CHUNKED = [("ring", dict(seq=4), 4, 2, True), ("ring", dict(seq=2), 4, 4, True), ("ring", dict(seq=2), 4, 2, False),
           ("ulysses", dict(seq=2), 4, 2, True), ("ulysses", dict(seq=2), 4, 4, False)]


@pytest.mark.parametrize("method,axes,heads,kv_heads,causal", CHUNKED,
                         ids=[f"{c[0]}-seq{c[1]['seq']}-h{c[2]}kv{c[3]}{'' if c[4] else '-noncausal'}" for c in CHUNKED])
def test_chunked_matches_dense(monkeypatch, method, axes, heads, kv_heads, causal):
    """Query/key chunks inside each ring step and in Ulysses' local attention (online softmax across key chunks,
    causal chunk pairs above the diagonal skipped, recomputed chunk by chunk in the backward)."""
    monkeypatch.setattr(sequence, "RING_CHUNK", 2)  # local blocks of 4, 8 (ring) or 16 (Ulysses) rows
    q, k, v = _qkv(heads, kv_heads)
    (_, want), want_grads = _out_and_grads(causal)(q, k, v)
    mesh = _mesh(**axes)
    args = [jax.device_put(x, NamedSharding(mesh, P(None, "seq"))) for x in (q, k, v)]
    with ops.context(ops.OpsContext(mesh=mesh, attention=method)):
        (_, got), got_grads = _out_and_grads(causal)(*args)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for g, w, name in zip(got_grads, want_grads, "qkv"):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


KEY_MASK = np.stack([np.arange(S) < S - 5,    # right padding
                     np.arange(S) >= 3,        # left padding: with causal, rows 0-2 have no key to attend
                     np.zeros(S, bool)])       # nothing to attend at all


@pytest.mark.parametrize("method, causal", [("ring", True), ("ring", False), ("ulysses", True)],
                         ids=["causal-ring", "noncausal-ring", "causal-ulysses"])  # (non-causal Ulysses with a key
# mask: tests/test_attention_rewrite.py trains one)
def test_key_mask_matches_dense(monkeypatch, method, causal):
    """A padding (key) mask: values and gradients equal dense attention's, rows with no key to attend included
    (dense attention's finite fill gives them the mean of the values; no NaN), in chunks (`RING_CHUNK` 2)."""
    monkeypatch.setattr(sequence, "RING_CHUNK", 2)
    q, k, v = _qkv(4, 2, batch=3)
    keep = jnp.asarray(KEY_MASK)
    (_, want), want_grads = _out_and_grads(causal, keep)(q, k, v)
    mesh = _mesh(seq=2)
    args = [jax.device_put(x, NamedSharding(mesh, P(None, "seq"))) for x in (q, k, v)]
    keep = jax.device_put(keep, NamedSharding(mesh, P(None, "seq")))
    with ops.context(ops.OpsContext(mesh=mesh, attention=method)):
        (_, got), got_grads = _out_and_grads(causal, keep)(*args)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for g, w, name in zip(got_grads, want_grads, "qkv"):
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


WINDOW_KEYS = np.stack([(np.arange(S) < 6) | (np.arange(S) >= 12),  # a hole: rows 7-11 see no key in a window of 2
                        np.arange(S) >= 3])                            # left padding: rows 0-2 see none at all

WINDOWS = [("ring", 4, 6, False), ("ring", 2, 2, True), ("ulysses", 2, 5, True)]  # method, seq, window, key mask


@pytest.mark.parametrize("method,n,window,masked", WINDOWS,
                         ids=[f"{c[0]}-seq{c[1]}-window{c[2]}{'-keymask' if c[3] else ''}" for c in WINDOWS])
def test_window_matches_dense_and_bytes(monkeypatch, method, n, window, masked):
    """A causal sliding window (local attention): values and gradients equal dense attention's, and the exchanges
    are those of plain causal attention (`ring_bytes`, `ulysses_bytes`). The ring masks each block pair by global
    positions and skips those beyond the window: a window longer than a device's block (6 > 4 tokens at seq=4) and
    one shorter than a zigzag chunk (2 < 4 at seq=2), the latter with a key mask (rows whose window holds no key get
    the values' mean) in chunks of 2 (`RING_CHUNK`)."""
    if masked:
        monkeypatch.setattr(sequence, "RING_CHUNK", 2)
    q, k, v = _qkv(4, 2)
    keep = jnp.asarray(WINDOW_KEYS) if masked else None
    (_, want), want_grads = _out_and_grads(True, keep, window)(q, k, v)
    mesh = _mesh(seq=n)
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P(None, "seq")))  # noqa: E731
    with ops.context(ops.OpsContext(mesh=mesh, attention=method)):
        args = [put(x) for x in (q, k, v)]
        compiled = _out_and_grads(True, None if keep is None else put(keep), window).lower(*args).compile()
    (_, got), got_grads = compiled(*args)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for g, w, name in zip(got_grads, want_grads, "qkv"):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
    formula = sequence.ring_bytes if method == "ring" else sequence.ulysses_bytes
    stats = analyze(compiled, mesh)
    assert _seq_bytes(stats) == pytest.approx(formula(B, S, 4, 2, D, n), rel=1e-9 if method == "ring" else 0.1)


def test_the_window_rule_and_bad_windows():
    """Query i sees keys i-w < j <= i; a window without causal, or not a positive integer, is one line."""
    i, j = np.indices((5, 5))
    np.testing.assert_array_equal(sequence.causal_mask(jnp.arange(5), jnp.arange(5), 2), (j <= i) & (i - j < 2))
    q, k, v = _qkv(4, 2)
    for kwargs, match in [(dict(causal=False, window=4), "needs causal=True"), (dict(window=0), "positive integer"),
                          (dict(window=2.5), "positive integer")]:
        with pytest.raises(ValueError, match=match) as e:
            jax.eval_shape(lambda q, k, v: ops.attention(q, k, v, **kwargs), q, k, v)
        assert "\n" not in str(e.value)


CAPPED = [  # method, key length T (16: self-attention, causal), soft cap, key mask, data
    ("ring", 16, 1.5, True, 1),                                # soft-capped causal self-attention, in chunks of 2
    ("ring", 8, None, True, 1), ("ulysses", 8, 1.0, True, 1),  # cross-attention, K/V split over seq too
    ("ring", 5, 2.0, True, 2), ("ulysses", 7, None, False, 1),  # cross-attention, seq does not divide T: K/V whole
]


@pytest.mark.parametrize("method,t,softcap,masked,data", CAPPED,
                         ids=[f"{c[0]}-T{c[1]}{f'-cap{c[2]}' if c[2] else ''}{'-keymask' if c[3] else ''}"
                              f"{'-data2' if c[4] > 1 else ''}" for c in CAPPED])
def test_softcap_and_cross_attention_match_dense(monkeypatch, method, t, softcap, masked, data):
    """Soft-capped logits (gemma-2: cap * tanh(logits / cap) before the mask, capped block by block, in chunks of
    2 for the causal ring: `RING_CHUNK`) and cross-attention (keys and values of another length T, not causal):
    values and gradients equal dense attention's at seq=2, rows with no key to attend included. K/V of a length
    seq divides go round the ring or through Ulysses' exchange; otherwise they stay whole and each device attends
    its own queries (`_whole_kv`), with data=2 beside it for the ring."""
    if t == S:
        monkeypatch.setattr(sequence, "RING_CHUNK", 2)
    q, k = host_normal(3, (B * data, S, 4, D), (B * data, t, 2, D), scale=2.0)  # logits large enough to cap
    (v,) = host_normal(4, (B * data, t, 2, D))
    keep = jnp.asarray(np.arange(t)[None, :] < np.array([[t - 2], [0], [t], [1]])[:B * data]) if masked else None
    causal = t == S
    (_, want), want_grads = _out_and_grads(causal, keep, softcap=softcap)(q, k, v)
    mesh = _mesh(data=data, seq=2) if data > 1 else _mesh(seq=2)
    batch = "data" if data > 1 else None
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    kv_spec = P(batch, "seq") if t % 2 == 0 else P(batch)
    args = [put(q, P(batch, "seq")), put(k, kv_spec), put(v, kv_spec)]
    with ops.context(ops.OpsContext(mesh=mesh, attention=method)):
        (_, got), got_grads = _out_and_grads(causal, None if keep is None else put(keep, kv_spec),
                                             softcap=softcap)(*args)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for g, w, name in zip(got_grads, want_grads, "qkv"):
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
    if softcap is not None:  # the cap bends these logits: capped attention is not plain attention
        assert not np.allclose(want, _out_and_grads(causal, keep)(q, k, v)[0][1], atol=1e-3)


def test_cross_attention_of_queries_seq_does_not_divide_stays_dense():
    """A few queries (5 learned latents) over a sequence split over seq: the ring cannot split them, so the op runs
    dense (XLA lays it out), with a warning, and equals dense attention."""
    q, k, v = _qkv(4, 2)
    mesh = _mesh(seq=2)
    kv = [jax.device_put(x, NamedSharding(mesh, P(None, "seq"))) for x in (k, v)]
    with ops.context(ops.OpsContext(mesh=mesh, attention="ring")):
        with pytest.warns(UserWarning, match="cross-attention of 5 queries over 16 keys stays dense"):
            got = jax.jit(lambda q, k, v: ops.attention(q, k, v, causal=False))(q[:, :5], *kv)
    np.testing.assert_allclose(got, ops.dense_attention(q[:, :5], k, v, causal=False), atol=1e-6, rtol=1e-6)


def test_bad_softcaps_and_causal_cross_attention():
    """A soft cap that is not a positive number, causal attention over keys of another length: one line."""
    q, k, v = _qkv(4, 2)
    for kv, kwargs, match in [(S, dict(softcap=0.0), "softcap must be a positive number"),
                              (S, dict(softcap=True), "softcap must be a positive number"),
                              (8, dict(causal=True), "cross-attention .* takes causal=False")]:
        with pytest.raises(ValueError, match=match) as e:
            jax.eval_shape(lambda q, k, v: ops.attention(q, k, v, **kwargs), q, k[:, :kv], v[:, :kv])
        assert "\n" not in str(e.value)


def test_ulysses_needs_divisible_heads():
    q, k, v = _qkv(4, 2)
    mesh = _mesh(seq=4)
    with ops.context(ops.OpsContext(mesh=mesh, attention="ulysses")):
        with pytest.raises(PlanError, match=r"kv_heads \(2\) divisible by seq=4: use ring"):
            jax.eval_shape(lambda q, k, v: ops.attention(q, k, v), q, k, v)


def test_seq_of_one_is_dense():
    q, k, v = _qkv(4, 2)
    mesh = _mesh(data=8)
    for method in ("ulysses", "ring"):
        with ops.context(ops.OpsContext(mesh=mesh, attention=method)):
            jaxpr = jax.make_jaxpr(lambda q, k, v: ops.attention(q, k, v))(q, k, v)
        assert "shard_map" not in str(jaxpr)


@pytest.mark.smoke
@pytest.mark.parametrize("method", ["ulysses", "ring"])
def test_nested_in_pipe_shard_map(method):
    """The pipeline executor calls ops inside a shard_map manual over `pipe`: the inner one nests."""
    q, k, v = _qkv(4, 4, batch=4)
    want = ops.dense_attention(q, k, v)
    mesh = _mesh(pipe=2, seq=4)
    stage = jax.shard_map(lambda q, k, v: ops.attention(q, k, v), mesh=mesh, axis_names={"pipe"},
                          in_specs=P("pipe"), out_specs=P("pipe"))
    args = [jax.device_put(x, NamedSharding(mesh, P("pipe", "seq"))) for x in (q, k, v)]
    with ops.context(ops.OpsContext(mesh=mesh, attention=method)):
        got = jax.jit(stage)(*args)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_bytes_formulas_closed_form():
    # one local block (one head) = batch * S/n * D * 4 bytes
    block = 2 * (16 // 4) * 8 * 4
    assert sequence.ulysses_bytes(2, 16, 8, 4, 8, 4) == 2 * 3 / 4 * block * (2 * 8 + 2 * 4)
    # ring: forward n-1 K/V rotations; backward n-1 K/V rotations and n float32 dK/dV rotations; causal adds the
    # zigzag relayouts (q, k, v, out; their transposes in the backward)
    assert sequence.ring_bytes(2, 16, 8, 4, 8, 4, causal=False) == (2 * 3 * 2 * 4 + 4 * 2 * 4) * block
    assert sequence.ring_bytes(2, 16, 8, 4, 8, 2, causal=False) == (2 * 2 * 4 + 2 * 2 * 4) * 2 * block  # n=2 too
    assert sequence.ring_bytes(2, 16, 8, 4, 8, 4) == (2 * 3 * 2 * 4 + 4 * 2 * 4 + 2 * (2 * 8 + 2 * 4)) * block
    assert sequence.ring_bytes(2, 16, 8, 4, 8, 4, backward=False) == (3 * 2 * 4 + 2 * 8 + 2 * 4) * block
    # bfloat16 halves everything but the float32 dK/dV accumulators
    assert sequence.ring_bytes(2, 16, 8, 4, 8, 4, itemsize=2) == (
        sequence.ring_bytes(2, 16, 8, 4, 8, 4) + 4 * 2 * 4 * block) / 2
    assert sequence.ulysses_bytes(2, 16, 8, 4, 8, 1) == sequence.ring_bytes(2, 16, 8, 4, 8, 1) == 0
    assert math.isclose(sequence.ulysses_bytes(1, 16, 4, 4, 8, 2, itemsize=2),
                        sequence.ulysses_bytes(1, 16, 4, 4, 8, 2) / 2)


def test_ring_train_step_memory():
    """The custom backward keeps no probability block: the compiled train step of a long-ish sequence shrinks by
    at least what plain autodiff through the ring kept per layer.

    Before (autodiff through scan/cond/ppermute), gpt-tiny:heads=2, batch 2 x 1024 on seq=4 compiled to 41,555,440
    temp bytes per device (43,136,564 in all). Per layer it kept, in float32, the logits and the probabilities of
    every step (the diagonal [B, H, S/n, S/n] block and n-1 half blocks) and the n-1 visiting K/V blocks; the
    flash backward keeps none of them, so the temp bytes must drop by at least their sum (measured after: 15,608,360).
    """
    import models
    from autoshard.api import rule_plan
    from autoshard.train import make_optimizer, parallelize

    name, batch, length, n = "gpt-tiny:heads=2", 2, 1024, 4
    plan = rule_plan(models.abstract(name), dict(seq=n), sequence={"method": "ring"})
    trainer = parallelize(models.create(name, seed=0), make_optimizer(1e-4, steps=10, warmup=1), plan,
                          devices=jax.devices()[:n])  # built: no initialiser to compile
    tokens = np.zeros((batch, length), np.int32)
    stats = analyze(trainer.compile({"inputs": tokens, "targets": tokens}), trainer.mesh)
    cfg = models.abstract(name).cfg
    layers, heads, head_dim, t = cfg.layers, cfg.heads, cfg.head_dim, length // n
    probs = batch * heads * t * t * (1 + (n - 1) / 2) * 4  # diagonal block + n-1 half blocks, float32
    kv = (n - 1) * 2 * batch * t * cfg.kv_heads * head_dim * 4  # the visiting K/V blocks
    before = 41_555_440
    assert stats["memory"]["temp"] <= before - layers * (2 * probs + kv), stats["memory"]


def test_the_cyclic_exchange_transposes_to_itself():
    """Ulysses' exchange beside another axis (n-1 cyclic ppermutes, `sequence.all_to_all(native=False)`): its
    gradient is the exchange with the axes swapped, not autodiff's transpose of the chunk slices, which wrote
    each chunk into a zero buffer of the whole operand (compiled temporaries 2.77x the operand at seq=4; now 2.0x;
    the zoo's Linen LM under Ulysses at data=2,seq=2,tensor=2 lost 24 KiB a step)."""
    mesh = _mesh(data=2, seq=4)
    (x,) = host_normal(0, (4, 64, 8, 16))  # [b, s, h, d] -> [b, s/n, h, d] per device

    def loss(x):
        exchange = functools.partial(sequence.all_to_all, axis="seq", split_axis=2, concat_axis=1, native=False)
        y = jax.shard_map(exchange, mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, None, "seq"),
                          axis_names={"seq"})(x)
        return jnp.sum(jnp.sin(y))

    xs = jax.device_put(x, NamedSharding(mesh, P("data", "seq")))
    compiled = jax.jit(jax.grad(loss)).lower(xs).compile()
    np.testing.assert_allclose(compiled(xs), jnp.cos(x), rtol=1e-6)
    operand = x.nbytes // 8
    assert compiled.memory_analysis().temp_size_in_bytes <= 2.5 * operand
