"""Attention the model writes itself, run as `ops.attention`, with no change to the model's code.

Sequence parallelism (ring, Ulysses: `autoshard.sequence`) is an implementation of `ops.attention`. Models that
write attention themselves (`jax.nn.dot_product_attention`, flax's `nnx.MultiHeadAttention` / Linen's
`MultiHeadDotProductAttention` / `dot_product_attention`, einsums with a softmax) get it through `AttentionRewrite`:
it traces the function to a jaxpr, finds each attention there (`planner.attention_match`), and re-runs the jaxpr
equation by equation with each one replaced by `ops.attention` on its q, k, v brought to the op's layout (the scale
folded into q), the result laid out as the model's own. Functions with no attention it can run this way are called
as they are. A constant causal mask runs as the op's `causal`, a causal sliding window (`(j <= i) & (i - j < w)`,
local attention) as its `window=w`, soft-capped scores (gemma-2: `cap * tanh(scores / cap)` before the mask and
softmax) as its `softcap=cap`. Cross-attention (queries from one sequence, keys and values from another, of any
length: an encoder-decoder's, `nnx.MultiHeadAttention(x, y)`) runs as the op non-causal over the other sequence's
keys, with its key mask if it has one; under seq the op splits those keys too (ring, Ulysses) or, when seq does not
divide their length, attends each device's queries over all of them. A key (padding) mask computed from the inputs
(`jnp.where(keep[:, None, None, :], ...)`, `jax.nn.dot_product_attention(mask=..., key_value_seq_lengths=...)`),
alone or ANDed with a causal mask or window, is passed as the op's `key_mask`; ANDed with a query mask too (flax's
`make_attention_mask(keep, keep)`), the query rows it masks get, outside the op, what the model's softmax over a
finite fill gives them: the mean of the values over every key. Attention it finds but cannot run as the op (an
arbitrary constant mask, a mask from the inputs that varies over heads or over query and key positions in one value,
a bias, dropout on the probabilities, ...) stays dense, with one warning per rewrite that says why.

Reached: the function's top level and the bodies of inlined calls (`jit`), `scan` loops (`nnx.scan`, a layer scan)
and `remat`; attention inside a `custom_jvp` / `custom_vjp` body, a `cond` or a `while` loop stays dense.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from autoshard import ops
from planner import jax_internals as jint
from planner.attention_match import Level, Match, Operand, find

_active: list[bool] = []
"""Non-empty while a rewrite traces its function (`active`): the function may call the rewrite itself."""


def active() -> bool:
    """Whether a rewrite is tracing its function now (code that wraps itself in one calls its plain self then)."""
    return bool(_active)


@contextlib.contextmanager
def _tracing() -> Iterator[None]:
    _active.append(True)
    try:
        yield
    finally:
        _active.pop()


class AttentionRewrite:
    """`fn` with the attention it writes itself run as `ops.attention` (which the ops context makes ring or
    Ulysses attention); warns once per instance about attention it leaves dense."""

    @classmethod
    def of_model(cls, fn: Callable, model: Any) -> "AttentionRewrite":
        """The rewrite of `fn`, the loss of `model` (an NNX module or a loss function), named after the model in
        its warnings."""
        return cls(fn, getattr(model, "__qualname__", type(model).__name__))

    def __init__(self, fn: Callable, name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", "the model")
        self.warned: set[str] = set()

    def __call__(self, *args: Any) -> Any:
        with _tracing():
            closed, shapes = jax.make_jaxpr(self.fn, return_shape=True)(*args)
            level = find(closed)
            self._warn(level)
            if not level.supported:
                return self.fn(*args)
        outs = run(jint.open_jaxpr(closed), level, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(shapes), outs)

    def level(self, *args: Any) -> Level:
        """The attention found in `fn` at these arguments (shapes are enough)."""
        with _tracing():
            return find(jax.make_jaxpr(self.fn)(*args))

    def _warn(self, level: Level) -> None:
        """One warning naming why the attention it found but cannot run as ops.attention stays dense."""
        dense = [m for _, m in level if not m.supported]
        reasons = sorted({p for m in dense for p in m.problems})
        message = (f"{len(dense)} attention layer(s) of {self.name} stay dense (not split over seq): "
                   f"{'; '.join(reasons)}")
        if dense and message not in self.warned:
            self.warned.add(message)
            warnings.warn(message, stacklevel=3)


def run(body: jint.Body, level: Level, args: list[Any]) -> list[Any]:
    """Run an open jaxpr on `args` with every supported match of `level` replaced by `ops.attention`."""
    env: dict[Any, Any] = dict(zip(body.jaxpr.constvars, body.consts))
    env.update(zip(body.jaxpr.invars, args))
    read = lambda v: v.val if jint.is_literal(v) else env[v]  # noqa: E731
    ends = {m.dots[1]: m for m in level.matches if m.supported}
    skip = {i for m in ends.values() for i in m.covered} - set(ends)
    for i, eqn in enumerate(body.jaxpr.eqns):
        if i in skip:
            continue
        if i in ends:
            env[eqn.outvars[0]] = attend(ends[i], read)
            continue
        ins = [read(v) for v in eqn.invars]
        sub = level.subs.get(i)
        outs = _run_sub(eqn, sub, ins) if sub is not None and sub.supported else jint.bind_eqn(eqn, ins)
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in body.jaxpr.outvars]


def _run_sub(eqn: Any, level: Level, ins: list[Any]) -> list[Any]:
    """An inlined call, a scan or a remat whose body holds a match: its body run by `run`, wrapped as it was."""
    name, p = eqn.primitive.name, eqn.params
    if name == "scan":
        info = jint.scan(eqn)
        nc, nk = info.num_consts, info.num_carry

        def step(carry: list[Any], xs: list[Any]) -> tuple[list[Any], list[Any]]:
            outs = run(info.body, level, [*ins[:nc], *carry, *xs])
            return outs[:nk], outs[nk:]

        carry, ys = jax.lax.scan(step, list(ins[nc:nc + nk]), list(ins[nc + nk:]), length=info.length,
                                 reverse=bool(p.get("reverse", False)), unroll=p.get("unroll", 1))
        return [*carry, *ys]
    body = jint.call_body(eqn)
    args = ins[len(ins) - len(body.jaxpr.invars):]
    if name in jint.INLINE_CALLS:
        return run(body, level, args)
    remat = jax.checkpoint(lambda *a: run(body, level, list(a)), policy=p.get("policy"),
                           prevent_cse=bool(p.get("prevent_cse", True)))
    return list(remat(*args))


def _canonical(x: jax.Array, operand: Operand) -> jax.Array:
    return jnp.transpose(x, operand.perm).reshape(operand.shape)


def _mask(operand: Operand | None, read: Callable[[Any], Any], batch: int, length: int) -> jax.Array | None:
    """A key mask as `ops.attention` takes it ([B, T] bool, True = attend), or a query mask [B, S] likewise."""
    if operand is None:
        return None
    return jnp.broadcast_to(_canonical(read(operand.var), operand).astype(bool), (batch, length))


def attend(m: Match, read: Callable[[Any], Any]) -> jax.Array:
    """The match's output computed by `ops.attention`: q, k, v in its layout (the match's scale folded into q: the
    op scales by 1/sqrt(head_dim), then soft-caps with the match's `softcap`), the result in the layout of the
    model's own probs.v product."""
    q, k, v = (_canonical(read(o.var), o) for o in (m.q, m.k, m.v))
    extra = m.scale * math.sqrt(m.head_dim)
    if abs(extra - 1.0) > 1e-6:
        q = q * jnp.asarray(extra, q.dtype)
    out = ops.attention(q, k, v, causal=m.causal, window=m.window, softcap=m.softcap,
                        key_mask=_mask(m.key_mask, read, q.shape[0], k.shape[1]))
    if m.query_mask is not None:
        # masked query rows: every key masked by a finite fill, a uniform softmax, the mean of v over all T keys
        # (of the row's kv head, heads = kv heads x groups in that order)
        rows = _mask(m.query_mask, read, q.shape[0], q.shape[1])
        mean = jnp.repeat(jnp.mean(v.astype(jnp.float32), axis=1), q.shape[2] // v.shape[2], axis=1)
        out = jnp.where(rows[:, :, None, None], out, mean[:, None].astype(out.dtype))
    return jnp.transpose(out.reshape(m.out_shape), m.out_perm).astype(m.out.aval.dtype)


__all__ = ["AttentionRewrite", "active", "attend", "run"]
