"""Pipelines for models whose blocks are a Python loop: the model restaged as a `protocols.StagedModel`.

A user's NNX model keeps its repeated blocks in a list (`self.blocks = nnx.List([...])`, run as
`for block in self.blocks: x = block(x)`). A pipeline needs them as one stack of weights with a leading layers
axis, and the model cut around them: what runs before the first block (the first stage's prologue) and after the
last one, loss included (the last stage's epilogue). `Staged` is that model, built from the user's without
changing its code:

- `blocks`: the blocks' weights stacked (the first block's module structure over [layers, ...] arrays);
- `outer`: a copy of the user's model whose block list holds stateless stand-ins (`_Stand`): run in *prologue*
  mode, the first stand-in stops the loss and hands back its input (`embed_inputs`); run in *epilogue* mode, every
  stand-in returns the last block's output given to it (`head_loss`), so the code after the loop runs on it;
- `loss`: the same loss with the blocks run by `lax.scan` over the stack, which is what the planner traces, so
  it plans this model's pipeline as it does the shipped decoder's.

The cut is checked before anything compiles: the user's loss and prologue -> blocks -> epilogue must run the same
primitives (after dead code is dropped), so a loop that does more than call its blocks (or uses a block's output
twice) is refused with one line, as are models that hold state other than weights and RNG streams (batch
statistics) and blocks that take array inputs besides x. RNG streams (dropout) are stacked with the blocks' weights;
the pipeline gives each microbatch and layer a key of its own (`pipeline.stream_state`).
The trainer keeps `Staged`'s layout; `Staged.to_user`, `user_tables` and `staged_tables` convert to and from the
user's own structure and paths, which are what `Trainer.model()` returns and checkpoints store.

A model whose blocks are already stacked and run by a scan (one module built by `nnx.vmap` over the layers, its
weights with a leading layers axis, called as `nnx.scan(lambda x, block: block(x))(x, self.blocks)` or through
`jax.lax.scan` over its split state) is restaged the same way without restacking: `blocks` is that module and its
paths are the user's own; in `outer` it is a `_ScanStand`, which the user's scan runs over (a [layers] counter it
holds while the loss runs). A stand-in called inside a scan body sees the body's own carry, not the value the scan
was given, so while the loss runs `jax.lax.scan` is wrapped (`_scans_cut`): in prologue mode the scan that reaches
the stand-in hands back the carry it was given; in epilogue mode that scan runs again from the last block's output,
the stand-in passing it through.

`LinenStaged` does the same for a plain loss function over Linen variables whose model runs numbered blocks
(`layers_0`, `layers_1`, ...): Linen's method interception plays the stand-ins' part, and `Trainer.variables()`
gives the variables back in the user's structure, boxes included; or whose blocks are an `nn.scan` stack, whose
stacked weights are used as they are (the scan cut where its lifted call starts). Its dropout key (`rng=`) becomes
two NNX RNG streams, one for the code around the blocks and one stacked per block, so the pipeline derives each
microbatch's and layer's key as it does an NNX model's (`pipeline.stream_state`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autoshard import ops
from planner import jax_internals as jint
from planner.errors import PlanError
from planner.params import path_str

OUTER = "outer"
"""Attribute of `Staged` holding the user's model (its block list replaced by stand-ins)."""


@dataclasses.dataclass
class _Mode:
    kind: str | None = None
    """None (stand-ins refuse to run), "prologue" or "epilogue"."""
    x: Any = None
    """Epilogue: the last block's output, what every stand-in returns."""
    calls: list = dataclasses.field(default_factory=list)
    """(args, kwargs) of each stand-in call beyond x, as the prologue saw them."""


_mode: list[_Mode] = [_Mode()]
_static: dict[int, tuple[tuple, tuple]] = {}
"""Per `Staged` model (its `token`): the blocks' arguments beyond x, (args, sorted kwargs items), as the loss passes
them; recorded by the prologue, which runs before any block does."""
_tokens = iter(range(1 << 62))


class _Reached(Exception):
    """Raised by the first stand-in in prologue mode: the loss stops there with the first block's input."""

    def __init__(self, x: Any):
        super().__init__("the first block was reached")
        self.x = x


class _Stand(nnx.Module):
    """Stands in for one block of the user's list in `Staged.outer` (no state of its own)."""

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        mode = _mode[-1]
        if mode.kind == "prologue":
            mode.calls.append((args, kwargs))
            raise _Reached(x)
        if mode.kind == "epilogue":
            return mode.x
        raise PlanError("a pipelined model's blocks run only inside the pipeline's stages")


@contextlib.contextmanager
def _running(mode: _Mode) -> Iterator[_Mode]:
    _mode.append(mode)
    try:
        yield mode
    finally:
        _mode.pop()


class _CarryAt(Exception):
    """Raised out of a scan body whose stand-in was reached: which leaf of the scan's carry the stand-in was given."""

    def __init__(self, index: int):
        super().__init__("a scanned stand-in was reached")
        self.index = index


class _ScanStand(nnx.Module):
    """Stands in for a user's scanned block stack in `Staged.outer`. Stored without state; while the loss runs it
    holds a [layers] counter (`counting`), so that the user's scan has the stack's length to scan over and a call
    on one slice of it is one block's call."""

    def __init__(self, layers: int, where: str, counting: bool = False):
        self.layers = layers
        self.where = where
        if counting:
            self.layer = nnx.Variable(jnp.zeros((layers,), jnp.int32))

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        mode = _mode[-1]
        if mode.kind is None or not hasattr(self, "layer"):
            raise PlanError("a pipelined model's blocks run only inside the pipeline's stages")
        if jnp.ndim(self.layer.get_value()) != 0:
            raise PlanError(f"{self.where} cannot be pipelined as a scanned stack: its weights share a leading axis of "
                            f"{self.layers} but the loss calls it outside a scan over them; a pipeline splits a list "
                            f"of identical blocks or a scan of `x = block(x)` (nnx.scan, jax.lax.scan) over stacked "
                            f"blocks: use pipe=1")
        if mode.kind == "through":
            return x
        if mode.kind == "prologue":
            mode.calls.append((args, kwargs))
        raise _Reached(x)


@contextlib.contextmanager
def _scans_cut(where: str) -> Iterator[None]:
    """While the loss runs on a `_ScanStand`: the scan whose body reaches the stand-in (`nnx.scan` and a user's
    `jax.lax.scan` both call `jax.lax.scan`) hands back the carry it was given (prologue), or runs again from the
    last block's output with the stand-in passing it through (epilogue). The body's own carry, which the stand-in
    sees, is a value of the body's trace: the loss needs the one from outside."""
    original = jax.lax.scan

    def scan(f: Callable, init: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(_reaching(f, where), init, *args, **kwargs)
        except _CarryAt as at:
            index = at.index
        leaves, tree = jax.tree.flatten(init)
        mode = _mode[-1]
        if mode.kind == "prologue":
            raise _Reached(leaves[index])
        leaves[index] = mode.x
        with _running(_Mode("through")):
            return original(f, jax.tree.unflatten(tree, leaves), *args, **kwargs)

    jax.lax.scan = scan
    try:
        yield
    finally:
        jax.lax.scan = original


def _reaching(f: Callable, where: str) -> Callable:
    """A scan body that turns its stand-in's stop (`_Reached`, with the body's carry) into `_CarryAt`; a one-line
    error when the stand-in is given more than the carry, or the carry holds more than x."""
    def body(carry: Any, xs: Any) -> Any:
        try:
            return f(carry, xs)
        except _Reached as reached:
            leaves = jax.tree.leaves(carry)
            hit = [i for i, leaf in enumerate(leaves) if leaf is reached.x]
            if not hit:
                raise PlanError(f"the scan over {where} calls its blocks on something other than its carry: a pipeline "
                                f"cuts a scan of `x = block(x)`; use pipe=1") from None
            if len(leaves) > 1:
                raise PlanError(f"the scan over {where} carries {len(leaves)} values: a pipeline passes one activation "
                                f"between stages; carry x alone (compute the rest inside the blocks or after the "
                                f"scan), or use pipe=1") from None
            raise _CarryAt(hit[0]) from None
    return body


def check_seq(seq: int) -> None:
    """A one-line error for a restaged pipeline with seq > 1: inside a pipeline the executor splits the sequence by
    hand, so every device would run the model's own code on its block of each sequence, and what that code
    computes over the sequence sees only that block (tried 2026-12-01 with the blocks' attention rewritten to
    `ops.attention`: the zoo's Linen LM's learned positions gave losses 0.4% off, the encoder's mean pooling 22%)."""
    if seq > 1:
        raise PlanError("a pipeline of a model's own blocks runs with seq=1: its attention is split over seq only "
                        "outside a pipeline; use pipe=1 or seq=1")


# -- finding the blocks ----------------------------------------------------------------------------------------------
def find_blocks(model: nnx.Module) -> tuple[tuple[Any, ...], list[nnx.Module]]:
    """(attribute path, blocks) of the model's largest list of at least two structurally identical blocks (same
    module structure, static attributes and weight shapes); a one-line error naming a list whose blocks differ,
    or saying there is none."""
    best, differ = _block_lists(model)
    if best is None and differ is not None:
        raise PlanError(f"{type(model).__name__} cannot be pipelined: the blocks of {differ} are not identical "
                        f"(their modules, static attributes or weight shapes differ); a pipeline stacks identical "
                        f"blocks: use pipe=1")
    if best is None:
        raise PlanError(f"{type(model).__name__} cannot be pipelined: it has no list of two or more identical "
                        f"blocks (same modules, same weight shapes), nor blocks stacked for a scan, to split into "
                        f"stages")
    return best


def _block_lists(model: nnx.Module) -> tuple[tuple[tuple[Any, ...], list[nnx.Module]] | None, str | None]:
    """(path, blocks) of the largest list of identical blocks or None, and the path of a list whose blocks differ."""
    best, size, differ = None, 0, None
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, (nnx.List, list, tuple)) or len(node) < 2:
            continue
        if not all(isinstance(b, nnx.Module) for b in node):
            continue
        first = _signature(node[0])
        if any(_signature(b) != first for b in node[1:]):
            differ = differ or "/".join(map(str, path))
            continue
        n = sum(int(np.prod(np.shape(x))) for b in node for x in jax.tree.leaves(nnx.state(b, nnx.Param)))
        if n > size:
            best, size = (tuple(path), list(node)), n
    return best, differ


def find_stack(model: nnx.Module) -> tuple[tuple[Any, ...], nnx.Module, int] | None:
    """(attribute path, module, layers) of the model's scanned block stack: a submodule whose weights all share a
    leading axis of two or more (one block built by `nnx.vmap` over the layers), the one with the most weights
    (then the largest, then the outermost); None if there is none. That the loss scans over it is checked when
    the loss runs (`_ScanStand`)."""
    best, rank = None, None
    for path, node in nnx.iter_graph(model):
        if not path or not isinstance(node, nnx.Module):
            continue
        key = _stack_rank([np.shape(x) for x in jax.tree.leaves(nnx.state(node, nnx.Param))], len(path))
        if key is not None and (rank is None or key > rank):
            best, rank = (tuple(path), node, int(key[-1])), key
    return best


def _stack_rank(shapes: list[tuple], depth: int) -> tuple | None:
    """How likely weights of these shapes, `depth` deep in the model, are a scanned block stack: None unless they
    all share a leading axis of two or more and one has another axis besides; else (count, size, -depth, layers),
    larger for the stack to pick (the most weights, then the largest, then the outermost)."""
    if not shapes or min(map(len, shapes)) < 1 or max(map(len, shapes)) < 2:
        return None
    if len({s[0] for s in shapes}) != 1 or shapes[0][0] < 2:
        return None
    return len(shapes), sum(int(np.prod(s)) for s in shapes), -depth, shapes[0][0]


def _signature(block: nnx.Module) -> tuple:
    graphdef, state = nnx.split(block)
    return graphdef, tuple((path_str(p), np.shape(v.get_value()), str(v.get_value().dtype), type(v).__name__)
                           for p, v in nnx.to_flat_state(state))


# -- the restaged model ----------------------------------------------------------------------------------------------
class Staged(nnx.Module):
    """A user's NNX model cut around its repeated blocks (module docstring); a `protocols.StagedModel`."""

    scanned: bool = False
    """Whether the user's blocks are a scanned stack (one module, weights stacked) rather than a list."""

    def __init__(self, model: nnx.Module, loss_fn: Callable | None = None):
        stack = find_stack(model) if _block_lists(model) == (None, None) else None  # no list: a scanned stack?
        path, blocks = (stack[0], None) if stack is not None else find_blocks(model)
        _check_state(model)
        self.list_path = path
        self.loss_fn = loss_fn or (lambda m, b: m.loss(b))
        outer = nnx.merge(*nnx.split(model))  # a copy: the user's model keeps its blocks
        if stack is not None:
            self.scanned, self.layers = True, stack[2]
            self.blocks = nnx.merge(*nnx.split(stack[1]))  # stacked already: a copy (RNG streams too)
            _check_stacked_streams(self.blocks, self.layers, self._where(model))
            _set(outer, path, _ScanStand(self.layers, self._where(model)))
        else:
            self.layers = len(blocks)
            states = [nnx.state(b) for b in blocks]  # weights and RNG streams, stacked alike
            self.blocks = nnx.merge(nnx.graphdef(blocks[0]), jax.tree.map(_stack, *states))
            _set(outer, path, nnx.List([_Stand() for _ in blocks]))
        self.outer = outer
        self.token = next(_tokens)

    def _where(self, model: nnx.Module) -> str:
        """The user's name of the blocks, for messages (`Model.blocks`)."""
        return ".".join([type(model).__name__, *map(str, self.list_path)])

    # -- the three parts -----------------------------------------------------------------------------------------
    def embed_inputs(self, batch: Any) -> jax.Array:
        """The first block's input: the loss run up to it."""
        return self._prologue(self.outer, batch)

    def head_loss(self, x: jax.Array, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss, metrics) of the loss run from the last block's output `x` on."""
        return self._epilogue(self.outer, x, batch)

    def _prologue(self, outer: nnx.Module, batch: Any) -> jax.Array:
        with _running(_Mode("prologue")) as mode:
            try:
                self._run(outer, batch)
            except _Reached as reached:
                _static[self.token] = _plain_arguments(*mode.calls[0])
                return reached.x
        raise PlanError("the loss never called its blocks: there is nothing to pipeline")

    def _epilogue(self, outer: nnx.Module, x: jax.Array, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        with _running(_Mode("epilogue", x)):
            out = self._run(outer, batch)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        return loss, dict(metrics or {})

    def _run(self, outer: nnx.Module, batch: Any) -> Any:
        """The user's loss on `outer`; for a scanned stack, on a copy made in the current trace (nnx.scan takes
        only modules of its caller's trace) whose stand-in holds its counter, with the scans cut (`_scans_cut`)."""
        if not self.scanned:
            return self.loss_fn(outer, batch)
        outer = nnx.merge(*nnx.split(outer))
        stand = _get(outer, self.list_path)
        _set(outer, self.list_path, _ScanStand(self.layers, stand.where, counting=True))
        with _scans_cut(stand.where):
            return self.loss_fn(outer, batch)

    def call_block(self, block: nnx.Module, x: jax.Array) -> jax.Array:
        """One block on x, with the loss's other (static) arguments (`autoshard.pipeline` calls blocks so)."""
        args, kwargs = _static.get(self.token, ((), ()))
        return block(x, *args, **dict(kwargs))

    def loss(self, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The user's loss with the blocks run by a `lax.scan` over their stacked weights (what the planner
        traces: a layer stack it can cut into stages)."""
        return _scanned_loss(self, batch)

    # -- checks and the user's structure -------------------------------------------------------------------------
    def block_path(self, i: int) -> str:
        """The user's path of block i (`blocks/3`)."""
        return "/".join(map(str, self.list_path + (i,)))

    def check_cut(self, model: nnx.Module, batch: Any) -> None:
        """A one-line error unless prologue -> blocks -> epilogue runs what the user's loss runs."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        shapes = jax.tree.map(_shape, batch)

        def original(p, r, b):  # r: the RNG streams, traced (their values may be shapes only)
            out = self.loss_fn(nnx.merge(graphdef, p, r, copy=True), b)
            return out[0] if isinstance(out, tuple) else out

        def cut(p, r, b):
            m = nnx.merge(graphdef, p, r, copy=True)
            if self.scanned:
                stack = nnx.split(_get(m, self.list_path))
                _set(m, self.list_path, _ScanStand(self.layers, self._where(model)))
                x = self._prologue(m, b)
                x, _ = jax.lax.scan(lambda x, s: (_one_activation(self.call_block(nnx.merge(stack[0], s), x), x),
                                                  None), x, stack[1])
                return self._epilogue(m, x, b)[0]
            blocks = list(_get(m, self.list_path))
            _set(m, self.list_path, nnx.List([_Stand() for _ in blocks]))
            x = self._prologue(m, b)
            for block in blocks:
                x = _one_activation(self.call_block(block, x), x)
            return self._epilogue(m, x, b)[0]

        name = self._where(model) if self.scanned else type(model).__name__
        _same_program(cut, original, name, params, jax.tree.map(_shape, rest), shapes, scanned=self.scanned)

    def to_user(self, user: nnx.Module) -> nnx.Module:
        """The user's model (`user`: its structure, e.g. abstract) holding this model's weights and state."""
        graphdef, params, rest = nnx.split(user, nnx.Param, ...)
        _, mine, my_rest = nnx.split(self, nnx.Param, ...)
        flat = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(mine)}
        flat.update({path_str(p): v.get_value() for p, v in nnx.to_flat_state(my_rest)})
        prefix = "/".join(map(str, self.list_path)) + "/"

        def value(path: str) -> Any:
            if path.startswith(prefix) and self.scanned:  # the stack's own paths
                return flat["blocks/" + path[len(prefix):]]
            if path.startswith(prefix):
                i, suffix = path[len(prefix):].split("/", 1)
                return flat["blocks/" + suffix][int(i)]
            return flat[f"{OUTER}/{path}"]

        fill = lambda state: nnx.map_state(lambda p, v: v.replace(value(path_str(p))), state)  # noqa: E731
        return nnx.merge(graphdef, fill(params), fill(rest))


def _check_state(model: nnx.Module) -> None:
    """A one-line error when the model holds state besides weights and RNG streams (batch statistics, counters):
    the pipeline gives each microbatch and layer its own dropout key (`pipeline.stream_state`), but carries no
    other state between its stages and microbatches."""
    other = [path_str(p) for p, v in nnx.to_flat_state(nnx.split(model, nnx.Param, ...)[2])
             if not isinstance(v, nnx.RngState)]
    if other:
        raise PlanError(f"{type(model).__name__} holds state other than weights and RNG streams ({other[0]}: batch "
                        f"statistics): a pipeline carries only weights and dropout keys between its stages and "
                        f"microbatches; use pipe=1")


def _check_stacked_streams(blocks: nnx.Module, layers: int, where: str) -> None:
    """A one-line error unless the RNG streams of a scanned stack are stacked like its weights (one per layer, as
    `nnx.split_rngs` makes them): the pipeline hands each layer its own slice."""
    for p, v in nnx.to_flat_state(nnx.state(blocks, nnx.RngState)):
        if np.shape(v.get_value())[:1] != (layers,):
            raise PlanError(f"{where} holds an RNG stream shared by its layers ({path_str(p)}): a pipeline gives each "
                            f"layer its own; split it over the layers (nnx.split_rngs) or use pipe=1")


def _one_activation(y: Any, x: jax.Array) -> jax.Array:
    """A block's output `y`, or a one-line error unless it is one array like its input `x`: the stand-ins hand the
    code after the blocks the last block's output alone."""
    if not hasattr(y, "shape") or np.shape(y) != np.shape(x) or y.dtype != x.dtype:
        what = type(y).__name__ if not hasattr(y, "shape") else f"{y.dtype}{list(np.shape(y))}"
        raise PlanError(f"the blocks return {what} from {x.dtype}{list(np.shape(x))}: a pipeline of a model's own "
                        f"blocks passes one activation between stages, each block's output like its input; return x "
                        f"alone, or use pipe=1")
    return y


def _plain_arguments(args: tuple, kwargs: dict) -> tuple[tuple, tuple]:
    """(args, sorted kwargs items) a block is called with besides x, which must be plain (hashable, not arrays):
    a pipeline passes one activation between stages."""
    if any(isinstance(a, (jax.Array, np.ndarray)) or hasattr(a, "aval") for a in jax.tree.leaves((args, kwargs))):
        raise PlanError("the blocks take array inputs besides x: a pipeline passes one activation between stages; "
                        "compute them inside the block, or use pipe=1")
    out = (tuple(args), tuple(sorted(kwargs.items())))
    try:
        hash(out)
    except TypeError:
        raise PlanError("the blocks take arguments besides x that are not plain values: a pipeline passes one "
                        "activation between stages; use pipe=1") from None
    return out


def _scanned_loss(staged: Any, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`staged`'s loss with its blocks run by a `lax.scan` over their stacked weights."""
    x = staged.embed_inputs(batch)
    graphdef, stacked = nnx.split(staged.blocks)

    def layer(x, state):
        x = ops.boundary(x, "layer_input")
        return staged.call_block(nnx.merge(graphdef, state), x), None

    x, _ = jax.lax.scan(ops.remat(layer), ops.boundary(x, "layer_input"), stacked)
    return staged.head_loss(x, batch)


def _same_program(cut: Callable, original: Callable, name: str, *args: Any, scanned: bool = False,
                  keys: bool = False) -> None:
    """A one-line error unless `cut` (prologue -> blocks -> epilogue) runs the primitives `original` runs (`keys`:
    beside those deriving RNG keys, which a pipeline derives its own way; the draws themselves still count)."""
    mine, theirs = _primitives(cut, *args), _primitives(original, *args)
    if keys:
        mine, theirs = (collections.Counter({p: n for p, n in c.items() if p not in _KEY_PRIMITIVES})
                        for c in (mine, theirs))
    if mine != theirs:
        diff = sorted((theirs - mine) + (mine - theirs))
        extra = next((p for p in diff if p != "scan"), diff[0])
        if scanned:
            what = f"e.g. {extra}" if extra != "scan" else "its body computes besides the block's call"
            raise PlanError(f"the scan over {name} does more than `x = block(x)` ({what}): a pipeline cuts only "
                            f"that scan over the stacked blocks; move the rest into the block, or use pipe=1")
        raise PlanError(f"the loop over {name}'s blocks does more than call them in turn (e.g. {extra}): a "
                        f"pipeline can cut only `for block in blocks: x = block(x)`; use pipe=1")


_KEY_PRIMITIVES = {"random_fold_in", "random_split", "random_wrap", "random_unwrap", "random_seed", "random_clone",
                   "threefry2x32"}
"""What derives RNG keys (as opposed to `random_bits`, a draw)."""


def _primitives(fn: Callable, *args: Any) -> collections.Counter:
    """How often each primitive runs in `fn(*args)`'s jaxpr once dead code is dropped (calls and loops opened)."""
    from jax._src.interpreters.partial_eval import dce_jaxpr

    closed = jax.make_jaxpr(fn)(*args)
    jaxpr, _ = dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    counts: collections.Counter = collections.Counter()

    def walk(j):
        for eqn in j.eqns:
            subs = list(jint.sub_jaxprs(eqn))
            if not subs or eqn.primitive.name not in jint.INLINE_CALLS:
                counts[eqn.primitive.name] += 1
            for sub in subs:
                walk(sub)
    walk(jaxpr)
    return counts


def user_paths(staged: Any, path: str) -> list[str]:
    """The user's path(s) of a `Staged` weight path: one, or one per block for a stacked weight."""
    if path.startswith(OUTER + "/"):
        return [path[len(OUTER) + 1:]]
    if getattr(staged, "scanned", False):  # the stack's paths are the user's own
        return ["/".join(map(str, staged.list_path)) + "/" + path[len("blocks/"):]]
    return [f"{staged.block_path(i)}/{path[len('blocks/'):]}" for i in range(staged.layers)]


def user_tables(staged: Any, table: dict[str, Any], params: list[str]) -> dict[str, Any]:
    """A flat table keyed by `Staged` paths (weights, or optimizer state whose keys end in a weight's path) ->
    keyed by the user's paths, stacked block values split per block."""
    out = {}
    for key, value in table.items():
        hit = _weight_of(key, params)
        if hit is None:
            out[key] = value
            continue
        head = key[: len(key) - len(hit)]
        names = user_paths(staged, hit)
        if len(names) == 1:
            out[head + names[0]] = value
        else:
            out.update({head + n: _index(value, i) for i, n in enumerate(names)})
    return out


def _index(value: Any, i: int) -> Any:
    """Block i of a stacked value; of a restore target (a ShapeDtypeStruct), its shape and sharding less the
    layers dimension."""
    if not isinstance(value, jax.ShapeDtypeStruct):
        return value[i]
    sharding = value.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))
    return jax.ShapeDtypeStruct(value.shape[1:], value.dtype, sharding=sharding)


def staged_tables(staged: Any, table: dict[str, Any], params: list[str]) -> dict[str, Any]:
    """The inverse of `user_tables`: per-block values stacked back (a missing block is a one-line error)."""
    out = dict(table)
    for weight in params:
        names = user_paths(staged, weight)
        heads = {k[: len(k) - len(names[0])] for k in table if _ends_with(k, names[0])}
        for head in heads:
            missing = [n for n in names if head + n not in table]
            if missing:
                raise PlanError(f"the checkpoint lacks {head + missing[0]}: it does not hold this model's blocks")
            values = [out.pop(head + n) for n in names]
            out[head + weight] = values[0] if len(names) == 1 else _stack(*values)
    return out


def _weight_of(key: str, params: list[str]) -> str | None:
    """The weight path `key` ends with (a whole path component), the longest one."""
    return max((p for p in params if _ends_with(key, p)), key=len, default=None)


def _ends_with(key: str, path: str) -> bool:
    """Whether table key `key` ends with weight path `path` as whole path components."""
    return key.endswith(path) and (len(key) == len(path) or key[len(key) - len(path) - 1] == "/")


# -- Linen: a loss function over variables whose blocks are numbered submodules ------------------------------------
class LinenStaged(nnx.Module):
    """A plain loss function over Linen variables (`autoshard.functional`) whose model runs numbered blocks
    (`layers_0`, `layers_1`, ... in a Python loop), cut around them as `Staged` cuts an NNX model: Linen's method
    interception stops the loss at the first block (prologue) or has every block return the last block's output
    (epilogue), and a block runs alone as its own module applied to its slice of the stacked weights.

    Or whose blocks are an `nn.scan` stack (`x, _ = nn.scan(Block, variable_axes={"params": 0}, ...)(x, None)`,
    weights with a leading layers axis: `scanned`): the stacked weights are `blocks` as they are, under the user's
    paths (`list_path`). Linen does not intercept a transformed module's own call, so the scan is cut where the
    lifted call gathers its scopes (`_scan_cut`): the prologue stops there with the carry it was given; the
    epilogue scans from the last block's output, each block passing its carry through. One block is the scanned
    class's block applied to one layer's slice, its `(carry, None)` unpacked. Only a
    `params` collection: other state collections are not carried between stages. A dropout key `rng` is held as
    RNG streams (`dropout` for the code around the blocks, `blocks[BLOCK_RNG]` stacked per block), which the
    pipeline gives each microbatch and layer a key of its own from (`pipeline.stream_state`): the loss then runs
    with its microbatch's key (prologue and epilogue the same one, as the loss is one call), a block with its
    layer's (`rngs=` of its apply, under the stream names the loss gave the model)."""

    scanned: bool = False
    """Whether the blocks are an `nn.scan` stack (weights stacked by the user) rather than numbered modules."""

    def __init__(self, loss_fn: Callable, variables: Any, rng: Any = None):
        from autoshard.functional import FunctionModel

        if rng is not None and not _takes_rng(loss_fn):
            raise PlanError("a pipelined loss function takes no dropout key unless it takes a third argument, "
                            "loss_fn(variables, batch, rng): add it or drop rng=")
        function = FunctionModel(loss_fn, variables)
        params, state = function.split()
        if not function.linen or state:
            raise PlanError("a pipelined loss function takes Linen variables with a params collection only: state "
                            "collections (batch statistics) are not carried between stages; use pipe=1")
        found = _numbered_blocks(params)
        stack = _stacked_params(params) if found is None else None
        if found is None and stack is None:
            raise PlanError("the loss function's parameters have no numbered blocks (layers_0, layers_1, ... with the "
                            "same weight shapes) nor an nn.scan stack of blocks (weights with a leading layers axis) "
                            "to split into pipeline stages")
        self.loss_fn = loss_fn
        self.token = next(_tokens)
        if stack is not None:
            self.scanned, self.list_path, self.layers = True, stack[0], stack[1]
            outer, stacked = _split_at(params, self.list_path)
            self.outer, self.blocks = _to_nnx(outer), _to_nnx(stacked)
        else:
            self.prefix, names = found
            self.layers = len(names)
            self.outer = _to_nnx({k: v for k, v in params.items() if k not in names})
            self.blocks = _to_nnx(jax.tree.map(_stack, *[params[n] for n in names]))
        self.keyed = rng is not None
        if self.keyed:
            if BLOCK_RNG in self.blocks:
                raise PlanError(f"the blocks have a submodule named {BLOCK_RNG}, the name a pipeline keeps their "
                                f"dropout keys under: rename it, or drop rng= or use pipe=1")
            key, self.raw_key = _typed_key(rng)
            self.dropout = nnx.RngStream(jax.random.fold_in(key, 0), tag="dropout")
            self.blocks[BLOCK_RNG] = nnx.RngStream(jax.random.split(jax.random.fold_in(key, 1), self.layers),
                                                   tag="dropout")

    def block_path(self, i: int) -> str:
        """The user's name of block i: `layers_3`, or of a scanned stack `blocks/3` (its layer 3)."""
        return "/".join([*self.list_path, str(i)]) if self.scanned else f"{self.prefix}{i}"

    def _where(self) -> str:
        """The scanned stack's path, for messages."""
        return "/".join(self.list_path)

    def embed_inputs(self, batch: Any) -> jax.Array:
        return self._prologue(_plain(self.outer), batch, self._key(self))

    def head_loss(self, x: jax.Array, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        return self._epilogue(_plain(self.outer), x, batch, self._key(self))

    def call_block(self, block: Any, x: jax.Array) -> jax.Array:
        return self._apply_block(_plain(block), x, self._key(block))

    def _apply_block(self, params: dict, x: jax.Array, key: jax.Array | None) -> jax.Array:
        """One block's module (as the prologue recorded it) applied to its weights: x, or a scanned block's carry."""
        module, args, kwargs, streams, inner = _static[self.token]
        for name in inner:  # (a stack found around the scanned module: its weights one level in)
            params = params[name]
        out = module.apply({"params": params}, x, *args, rngs=_rngs(streams, key), **kwargs)
        return _scan_carry(out, self._where()) if self.scanned else out

    def _key(self, owner: Any) -> jax.Array | None:
        """The stream's draw (`dropout` of the model, or a block's): fold_in(key, count), the stream left as it is,
        so that the prologue and epilogue of one microbatch share their key as parts of one call of the loss."""
        if not self.keyed:
            return None
        stream = owner[BLOCK_RNG] if isinstance(owner, nnx.Dict) else owner.dropout
        key = jax.random.fold_in(stream.key.get_value(), stream.count.get_value())
        return jax.random.key_data(key) if self.raw_key else key

    def loss(self, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        return _scanned_loss(self, batch)

    def _intercept(self, mode: _Mode) -> Any:
        if self.scanned:
            return self._scan_cut(mode)
        from flax import linen as nn

        first = (self.block_path(0),)

        def interceptor(next_fun, args, kwargs, context):
            scope = getattr(context.module, "scope", None)
            path = tuple(scope.path) if scope is not None else ()
            if context.method_name != "__call__" or not path or not re.fullmatch(
                    re.escape(self.prefix) + r"\d+", path[-1]) or len(path) != 1:
                return next_fun(*args, **kwargs)
            if mode.kind == "epilogue":
                return mode.x
            if path == first:
                rest, named = _plain_arguments(args[1:], kwargs)
                streams = tuple(sorted(getattr(scope, "rngs", None) or ())) if self.keyed else ()
                _static[self.token] = (context.module.clone(parent=None), rest, dict(named), streams, ())
                raise _Reached(args[0])
            return next_fun(*args, **kwargs)
        return nn.intercept_methods(interceptor)

    @contextlib.contextmanager
    def _scan_cut(self, mode: _Mode) -> Iterator[None]:
        """While the loss runs: the lifted call of the module at `list_path`, or of an nn.scan module below it
        (`flax.linen.transforms.get_module_scopes`, which it calls with the scan's arguments before scanning),
        stops the prologue with its carry, or has the epilogue scan from the last block's output, each block (the
        scanned class's own call, intercepted) passing its carry through."""
        from flax import linen as nn
        from flax.linen import transforms

        original, lifted = transforms.get_module_scopes, []

        def scopes(module, args=None, kwargs=None):
            path = _scope_path(module)
            if path is None or path[:len(self.list_path)] != self.list_path or (
                    path != self.list_path and _scan_options(type(module)) is None):
                return original(module, args, kwargs)
            self._record_scan(module, path[len(self.list_path):], tuple(args or ()), dict(kwargs or {}))
            if mode.kind == "prologue":
                raise _Reached(args[0])
            lifted.append(path)
            return original(module, (mode.x, *args[1:]), kwargs)

        def through(next_fun, args, kwargs, context):
            if (context.method_name != "__call__" or not lifted or _scope_path(context.module) != lifted[0]
                    or _scan_options(type(context.module)) is not None):
                return next_fun(*args, **kwargs)
            return args[0], None

        transforms.get_module_scopes = scopes
        try:
            with nn.intercept_methods(through):
                yield
        finally:
            transforms.get_module_scopes = original

    def _record_scan(self, module: Any, inner: tuple[str, ...], args: tuple, kwargs: dict) -> None:
        """One line for a scan a pipeline cannot cut; else the block module and its other arguments recorded (as
        the numbered blocks' first block records them) for `call_block`."""
        options = _scan_options(type(module))
        where = self._where()
        if options is None or options.get("reverse") or _params_axis(options) != 0:
            raise PlanError(f"{where} is not run as nn.scan of its block class (variable_axes={{'params': 0}}, "
                            f"forwards): a pipeline cuts only that scan, whose body is the block's call alone; scan "
                            f"the block class itself, or use pipe=1")
        if not args or not hasattr(args[0], "shape"):
            raise PlanError(f"the scan over {where} carries {len(jax.tree.leaves(args[:1]))} arrays in a "
                            f"{type(args[0] if args else None).__name__}: a pipeline passes one activation between "
                            f"stages; carry x alone, or use pipe=1")
        if any(hasattr(a, "shape") for a in jax.tree.leaves((args[1:], kwargs))):
            raise PlanError(f"the scan over {where} takes array inputs besides its carry (in_axes): a pipeline "
                            f"passes one activation between stages; compute them inside the block (or scan over "
                            f"(x, None)), or use pipe=1")
        streams = tuple(sorted(getattr(module.scope, "rngs", None) or ())) if self.keyed else ()
        shared = [s for s in streams if not _splits(options.get("split_rngs", {}), s)]
        if shared:
            raise PlanError(f"the scan over {where} gives its layers one {shared[0]} key: a pipeline gives each "
                            f"layer its own; pass split_rngs={{'{shared[0]}': True}} to nn.scan, or drop rng=")
        rest, named = _plain_arguments(args[1:], kwargs)
        block = options["module_class"](parent=None, **{f.name: getattr(module, f.name) for f in
                                                      dataclasses.fields(module) if f.init and f.name != "parent"})
        _static[self.token] = (block, rest, dict(named), streams, inner)

    def _call(self, params: dict, batch: Any, key: jax.Array | None) -> Any:
        return self.loss_fn({"params": params}, batch) if key is None else self.loss_fn({"params": params}, batch, key)

    def _prologue(self, outer: dict, batch: Any, key: jax.Array | None = None) -> jax.Array:
        from flax import errors

        mode = _Mode("prologue")
        with self._intercept(mode):
            try:
                self._call(outer, batch, key)
            except _Reached as reached:
                return reached.x
            except (errors.ScopeParamNotFoundError, errors.ScopeCollectionNotFound):
                if not self.scanned:  # (a stack's weights are not in `outer`: the loss used them otherwise)
                    raise
        if self.scanned:
            raise _not_scanned(self._where())
        raise PlanError("the loss never called its blocks: there is nothing to pipeline")

    def _epilogue(self, outer: dict, x: jax.Array, batch: Any, key: jax.Array | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
        with self._intercept(_Mode("epilogue", x)):
            out = self._call(outer, batch, key)
        loss, aux = out if isinstance(out, tuple) else (out, {})
        return loss, {k: v for k, v in dict(aux or {}).items()}

    def check_cut(self, variables: Any, batch: Any) -> None:
        """A one-line error unless prologue -> blocks -> epilogue runs what the loss runs."""
        from autoshard.functional import unbox

        params = jax.tree.map(_shape, unbox(variables)["params"])
        shapes = jax.tree.map(_shape, batch)
        names = [self.block_path(i) for i in range(self.layers)]

        key = None  # (dropout: the cut derives its keys otherwise than the loss, and draws as many masks)
        if self.keyed:
            key = jax.random.key_data(jax.random.key(0)) if self.raw_key else jax.random.key(0)

        def original(p, b):
            out = self._call(p, b, key)
            return out[0] if isinstance(out, tuple) else out

        def scanned(p, b):
            outer, stacked = _split_at(p, self.list_path)
            x = self._prologue(outer, b, key)
            keys = None if key is None else jax.random.split(key, self.layers)
            x, _ = jax.lax.scan(lambda x, s: (_one_activation(self._apply_block(s[0], x, s[1]), x), None), x,
                                (stacked, keys))
            return self._epilogue(outer, x, b, key)[0]

        def cut(p, b):
            outer = {k: v for k, v in p.items() if k not in names}
            x = self._prologue(outer, b, key)
            for i, name in enumerate(names):
                module, args, kwargs, streams, _ = _static[self.token]
                rngs = _rngs(streams, None if key is None else jax.random.fold_in(key, i))
                x = module.apply({"params": p[name]}, x, *args, rngs=rngs, **kwargs)
            return self._epilogue(outer, x, b, key)[0]

        if self.scanned:
            _same_program(scanned, original, self._where(), params, shapes, scanned=True, keys=self.keyed)
        else:
            _same_program(cut, original, "the loss function", params, shapes, keys=self.keyed)

    def user_params(self) -> dict[str, Any]:
        """The weights in the loss function's own `params` structure (stacked blocks split per block)."""
        out = dict(_plain(self.outer))
        stacked = _plain(self.blocks)  # (less the blocks' dropout stream)
        if self.scanned:
            return _put_at(out, self.list_path, stacked)
        for i in range(self.layers):
            out[self.block_path(i)] = jax.tree.map(lambda a, i=i: a[i], stacked)
        return out


BLOCK_RNG = "dropout_rng"
"""Entry of `LinenStaged.blocks` holding the blocks' dropout stream (stacked per block beside their weights)."""


def _takes_rng(loss_fn: Callable) -> bool:
    """Whether `loss_fn` takes a third positional argument (the dropout key); True when its signature is unknown."""
    import inspect

    try:
        params = inspect.signature(loss_fn).parameters.values()
    except (TypeError, ValueError):
        return True
    kinds = [p.kind for p in params]
    return inspect.Parameter.VAR_POSITIONAL in kinds or sum(
        k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds) >= 3


def _typed_key(rng: Any) -> tuple[jax.Array, bool]:
    """(the dropout key as a typed key, whether the user's was raw key data, which the loss is then given); a
    shapes-only key (planning) stands in as key 0 of its implementation."""
    if isinstance(rng, jax.ShapeDtypeStruct):
        typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
        return (jax.random.key(0, impl=jax.random.key_impl(rng)) if typed else jax.random.key(0)), not typed
    rng = jnp.asarray(rng)
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng, False
    return jax.random.wrap_key_data(rng), True


def _rngs(streams: tuple[str, ...], key: jax.Array | None) -> dict[str, jax.Array]:
    """A block's `rngs=`: its key under the one stream name the loss gave the model, or folded per name."""
    if key is None or not streams:
        return {}
    if len(streams) == 1:
        return {streams[0]: key}
    return {name: jax.random.fold_in(key, i) for i, name in enumerate(streams)}


def _numbered_blocks(params: dict) -> tuple[str, list[str]] | None:
    """(prefix, names) of the largest run of top-level entries `<prefix>0 ... <prefix>n-1` (n >= 2) whose weights
    have the same structure and shapes, or None."""
    groups: dict[str, dict[int, str]] = collections.defaultdict(dict)
    for name in params:
        m = re.fullmatch(r"(.*?)(\d+)", str(name))
        if m:
            groups[m.group(1)][int(m.group(2))] = name
    best = None
    for prefix, by_index in groups.items():
        n = len(by_index)
        if n < 2 or sorted(by_index) != list(range(n)):
            continue
        shapes = [jax.tree.map(np.shape, params[by_index[i]]) for i in range(n)]
        if any(s != shapes[0] for s in shapes[1:]):
            continue
        size = sum(int(np.prod(np.shape(x))) for i in range(n) for x in jax.tree.leaves(params[by_index[i]]))
        if best is None or size > best[0]:
            best = (size, prefix, [by_index[i] for i in range(n)])
    return None if best is None else (best[1], best[2])


def _stacked_params(params: dict) -> tuple[tuple[str, ...], int] | None:
    """(path, layers) of the sub-dict of `params` most like an nn.scan block stack (`_stack_rank`), or None. That
    the loss runs it as nn.scan is checked when the loss runs (`LinenStaged._scan_cut`)."""
    best, rank = None, None
    for path, node in _dicts(params):
        key = _stack_rank([np.shape(x) for x in jax.tree.leaves(node)], len(path))
        if key is not None and (rank is None or key > rank):
            best, rank = (path, int(key[-1])), key
    return best


def _dicts(tree: dict, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict]]:
    """(path, sub-dict) of every dict below `tree` (not `tree` itself)."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield path + (k,), v
            yield from _dicts(v, path + (k,))


def _split_at(tree: dict, path: tuple[str, ...]) -> tuple[dict, Any]:
    """(`tree` less the entry at `path`, that entry); `tree` is not changed."""
    head, rest = path[0], path[1:]
    if not rest:
        return {k: v for k, v in tree.items() if k != head}, tree[head]
    inner, entry = _split_at(tree[head], rest)
    return {**tree, head: inner}, entry


def _put_at(tree: dict, path: tuple[str, ...], value: Any) -> dict:
    """The inverse of `_split_at`: `tree` with `value` at `path`."""
    head, rest = path[0], path[1:]
    return {**tree, head: _put_at(tree.get(head, {}), rest, value) if rest else value}


def _scan_options(cls: type) -> dict[str, Any] | None:
    """The options of an `nn.scan`-made module class (its `nn.scan` keywords and `module_class`, the block class it
    scans), read from its lifted `__call__`; None for any other class."""
    from flax.core import lift

    fn = cls.__dict__.get("__call__")
    cells = dict(zip(getattr(getattr(fn, "__code__", None), "co_freevars", ()), getattr(fn, "__closure__", None) or ()))
    try:
        values = {name: cell.cell_contents for name, cell in cells.items()}
    except ValueError:  # (an empty cell)
        return None
    if values.get("transform") is not lift.scan or not isinstance(values.get("trafo_kwargs"), dict):
        return None
    return {**values["trafo_kwargs"], "module_class": values["module_class"]}


def _params_axis(options: dict[str, Any]) -> Any:
    """The axis an nn.scan stacks its `params` on (None if it does not)."""
    from flax.core.scope import in_filter

    return next((axis for f, axis in dict(options.get("variable_axes", {})).items() if in_filter(f, "params")), None)


def _splits(split_rngs: Any, stream: str) -> bool:
    """Whether an nn.scan's `split_rngs` gives each layer its own key of `stream`."""
    from flax.core.scope import in_filter

    return any(split and in_filter(f, stream) for f, split in dict(split_rngs).items())


def _scope_path(module: Any) -> tuple[str, ...] | None:
    """A bound Linen module's path (None unbound)."""
    scope = getattr(module, "scope", None)
    return None if scope is None else tuple(scope.path)


def _not_scanned(where: str) -> PlanError:
    """The one line for weights stacked like an nn.scan's that the loss does not run as one."""
    return PlanError(f"the loss runs {where} (weights with a leading layers axis) otherwise than as nn.scan of a "
                     f"block class: a pipeline splits numbered blocks (layers_0, layers_1, ...) or "
                     f"`x, _ = nn.scan(Block, variable_axes={{'params': 0}}, ...)(name=...)(x, None)`; use pipe=1")


def _scan_carry(out: Any, where: str) -> Any:
    """The carry of a scanned block's `(carry, ys)`; a one-line error when the block has per-layer outputs (ys),
    which a pipeline does not carry between stages."""
    if not isinstance(out, tuple) or len(out) != 2 or jax.tree.leaves(out[1]):
        raise PlanError(f"the blocks of the scan over {where} return more than (carry, None): a pipeline passes "
                        f"one activation between stages; return (x, None), or use pipe=1")
    return out[0]


def _to_nnx(tree: Any) -> Any:
    """A nested dict of arrays as NNX weights (nested `nnx.Dict`s of `nnx.Param`s)."""
    if isinstance(tree, dict):
        return nnx.Dict({k: _to_nnx(v) for k, v in tree.items()})
    return nnx.Param(tree)


def _plain(node: Any) -> Any:
    """The nested dict of arrays an `_to_nnx` tree holds (a dropout stream beside them left out)."""
    if isinstance(node, nnx.Variable):
        return node.get_value()
    return {k: _plain(v) for k, v in node.items() if not isinstance(v, nnx.RngStream)}


# -- small helpers ---------------------------------------------------------------------------------------------------
def _stack(*xs: Any) -> Any:
    if isinstance(xs[0], jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(xs),) + xs[0].shape, xs[0].dtype)
    if isinstance(xs[0], np.ndarray):
        return np.stack(xs)
    return jnp.stack(xs)


def _shape(x: Any) -> jax.ShapeDtypeStruct:
    return x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype
                                                                               if not hasattr(x, "dtype") else x.dtype)


def _get(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k] if isinstance(k, int) or isinstance(obj, (list, tuple, nnx.List)) else getattr(obj, k)
    return obj


def _set(obj: Any, path: tuple, value: Any) -> None:
    parent, last = _get(obj, path[:-1]), path[-1]
    if isinstance(last, int) or isinstance(parent, (list, nnx.List)):
        parent[last] = value
    else:
        setattr(parent, last, value)
