"""Checkpoints: numbered steps of the whole training state, in the model's layout, written by orbax.

A checkpoint folder holds `autoshard.json` (what it is: the marker that lets autoshard tell it from a user's
folder) and one orbax step folder per saved step, each with the items `params`, `opt_state` and `rest` (flat tables
of arrays in the model's layout: see `autoshard.state`) and `meta` (JSON: step, model, plan, the tables' shapes, and
whatever the loop adds: data position, schedule, run settings). A weights-only checkpoint (`save`, as
`autoshard place --apply` writes) has `params` and `meta` only.

orbax's `CheckpointManager` does the writing: each step is written into `<step>.orbax-checkpoint-tmp` and renamed to
`<step>` once complete, and old steps beyond `keep` are deleted only after that rename, so a crash at any point of a
save leaves the previous step restorable. Saves are asynchronous where orbax allows: `save` returns once the arrays
are copied to host memory, and the files are written by a background thread while training goes on.

A folder holding anything else than these is refused with a one-line error, never written to or deleted from.
Folders of the first format (weights only under `params/`, before steps existed) still restore with `restore`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from autoshard.runs import LOCK
from autoshard.state import Tables, describe
from planner.errors import AutoshardError
from planner.params import path_str

META = "autoshard.json"
FORMAT = 2
TMP = ".orbax-checkpoint-tmp"
"""orbax's suffix of a step being written."""
ITEMS = ("params", "opt_state", "rest")
DEFAULT_KEEP = 3


def kind(directory: str | Path) -> str:
    """What a folder is: "missing", "empty", "checkpoint" (this format) or "legacy" (weights-only format 1); a
    one-line error for a file, an unreadable folder, or a folder holding anything else."""
    path = Path(directory)
    if not path.exists():
        return "missing"
    if not path.is_dir():
        raise AutoshardError(f"checkpoint path {directory} is a file, not a folder: choose a folder path")
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise AutoshardError(f"cannot read checkpoint folder {directory}: {e.strerror or e}") from None
    # (process 0 of a multi-process run may be writing the marker while the others look: `.autoshard.json.PID.tmp`)
    names = [n for n in names if n != LOCK and not (n.startswith(f".{META}.") and n.endswith(".tmp"))]
    if not names:
        return "empty"
    meta = _read_marker(path) if META in names else None
    if META in names and meta is None:
        raise AutoshardError(f"checkpoint {directory} is damaged: cannot read {META} (not the JSON autoshard "
                             f"writes): nothing in it was changed")
    if meta is not None and meta.get("format") == 1:
        return "legacy"
    foreign = [n for n in names if n != META and not n.isdigit() and TMP not in n]
    if meta is None or foreign:
        example = (foreign or names)[0]
        raise AutoshardError(f"{directory} is not an autoshard checkpoint folder (it holds {example!r}"
                             f"{' and more' if len(foreign or names) > 1 else ''}): pass a folder autoshard wrote, or a "
                             f"new or empty one to save into; nothing in it was changed")
    return "checkpoint"


def check_target(directory: str | Path, *, resume: bool = False, after: int = 0,
                 advice: str = "pass --resume to continue it, or choose another --checkpoint folder") -> str:
    """A folder to save into, checked without writing anything: not a file, not a user's folder, not another
    run's checkpoints (steps past `after`, the step the run starts from; unless `resume`), and creatable and
    writable. Returns its `kind`. `advice` is the error's remedy (the command line's flags by default)."""
    path = Path(directory).absolute()
    what = kind(path)
    if what == "legacy":
        raise AutoshardError(f"{directory} holds a weights-only checkpoint of an older autoshard: restore it with "
                             f"--restore {directory}, and save into another folder")
    if what == "checkpoint" and not resume:
        steps = sorted(int(n) for n in os.listdir(path) if n.isdigit() and int(n) > after)
        if steps:
            raise AutoshardError(f"checkpoint folder {directory} already holds step {steps[-1]} of another run: "
                                 f"{advice}")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise AutoshardError(f"cannot create checkpoint folder {directory}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AutoshardError(f"cannot write checkpoint folder {directory}: {existing} is not writable")
    return what


def _read_marker(path: Path) -> dict | None:
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") in (1, FORMAT) else None


class Checkpoints:
    """One checkpoint folder: orbax's CheckpointManager over its numbered steps.

    `Checkpoints.create(dir)` for writing (a missing or empty folder, or one of this format), `Checkpoints.open(dir)`
    for reading (a folder with at least one complete step).
    """

    def __init__(self, directory: Path, *, keep: int | None, async_save: bool):
        import orbax.checkpoint as ocp

        self.directory = directory
        self.async_save = async_save
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                   create=False, cleanup_tmp_directories=True)
            self.manager = ocp.CheckpointManager(directory, options=options, item_handlers=_handlers())

    # -- opening ------------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | Path, *, model: str | None = None, keep: int | None = DEFAULT_KEEP,
               async_save: bool = True) -> "Checkpoints":
        """A folder to save into: created if missing (its writability checked by writing the marker now, before any
        training), refused if it holds anything but autoshard checkpoint steps."""
        path = Path(directory).absolute()
        what = kind(path)
        if what == "legacy":
            raise AutoshardError(f"{directory} holds a weights-only checkpoint of an older autoshard: restore it "
                                 f"with --restore {directory}, and save into another folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
            if jax.process_index() == 0 and what != "checkpoint":
                tmp = path / f".{META}.{os.getpid()}.tmp"
                tmp.write_text(json.dumps({"format": FORMAT, "kind": "autoshard checkpoint", "model": model,
                                           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1) + "\n")
                os.replace(tmp, path / META)
            elif not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as e:
            raise AutoshardError(f"cannot write checkpoint folder {directory}: {e.strerror or e}") from None
        return cls(path, keep=keep, async_save=async_save)

    @classmethod
    def open(cls, directory: str | Path) -> "Checkpoints":
        """A folder to restore from: a one-line error unless it holds at least one complete step."""
        path = Path(directory).absolute()
        what = kind(path)
        if what in ("missing", "empty"):
            raise AutoshardError(f"{directory} is not an autoshard checkpoint ({'no such folder' if what == 'missing' else 'empty folder'}"
                                 f", no {META}): pass the folder that `autoshard train --checkpoint DIR` wrote")
        if what == "legacy":
            raise AutoshardError(f"{directory} holds weights only (an older autoshard's checkpoint), not a run to "
                                 f"resume: start from its weights with --restore {directory}")
        out = cls(path, keep=None, async_save=False)
        if out.latest() is None:
            raise AutoshardError(f"checkpoint folder {directory} has no complete step yet (a save was interrupted "
                                 f"before its first step was written): start without --resume")
        return out

    # -- steps --------------------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Complete steps, oldest first (a step still being written, or abandoned mid-write, is not one)."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, tables: Tables, meta: dict[str, Any]) -> None:
        """Start saving `tables` (`autoshard.state.model_layout`) and `meta` as step `step`; every process calls it.
        Returns once the arrays are on the host (asynchronous saving), or once written (synchronous)."""
        import orbax.checkpoint as ocp

        record = {"format": FORMAT, "step": int(step), **meta, **describe(tables)}
        items = {name: ocp.args.PyTreeSave(table) for name, table in tables.items() if table}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.manager.save(int(step), args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(record)),
                              force=True)

    def meta(self, step: int | None = None) -> dict[str, Any]:
        """The `meta` record of `step` (default: the latest complete step)."""
        import orbax.checkpoint as ocp

        step = self.latest() if step is None else step
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001  (orbax raises many types for a damaged folder)
            raise _damaged(self.directory, step, e) from None
        if not isinstance(out, dict) or not isinstance(out.get("params"), dict):
            raise AutoshardError(f"checkpoint {self.directory} step {step} is damaged: its meta record has no "
                                 f"parameter table")
        return out

    def read(self, step: int, targets: Tables, items: Iterable[str] = ITEMS) -> Tables:
        """The tables `items` of `step`, read into `targets` (shapes, dtypes, shardings: `autoshard.state.targets`),
        after checking that the recorded names, shapes and dtypes match them."""
        import orbax.checkpoint as ocp

        meta = self.meta(step)
        items = [name for name in items if targets.get(name)]
        for name in items:
            _check_table(self.directory, meta, name, targets[name])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.PyTreeRestore(
                    targets[name], restore_args=ocp.checkpoint_utils.construct_restore_args(targets[name]))
                    for name in items}))
        except Exception as e:  # noqa: BLE001
            raise _damaged(self.directory, step, e) from None
        return {name: dict(out[name]) for name in items}

    def wait(self) -> None:
        """Block until every started save is written (and renamed into place)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.manager.wait_until_finished()

    def close(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.manager.close()


def _handlers() -> dict[str, Any]:
    """orbax's handlers for the items, with arrays written without replica-parallel slicing.

    By default orbax splits the writing of every replicated array among its replicas, slicing each with a small
    jitted program that compiles on the first save: 64 compilations and 11.8 s for gpt-tiny on a busy 2-core
    machine against 0.15 s without. Here each shard is written by its first replica instead (what a data-parallel
    run on one host wants; across many hosts it leaves the write load of replicated weights on fewer processes).
    """
    import orbax.checkpoint as ocp

    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
        (np.ndarray, th.NumpyHandler()), (str, th.StringHandler()),
        (jax.Array, th.ArrayHandler(use_replica_parallel=False)))
    return {**{name: ocp.PyTreeCheckpointHandler(type_handler_registry=registry) for name in ITEMS},
            "meta": ocp.JsonCheckpointHandler()}


def _check_table(directory: Path, meta: dict, name: str, want: dict[str, Any]) -> None:
    """A one-line error when the checkpoint's table `name` does not have `want`'s names, shapes and dtypes."""
    have = meta.get(name)
    model = meta.get("model")
    hint = f": restore with --model {model}" if model else ""
    if not isinstance(have, dict):
        raise AutoshardError(f"checkpoint {directory} step {meta.get('step')} holds no {name.replace('_', ' ')}"
                             + (" (it holds weights only: use --restore)" if name != "params" else ""))
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        key = (missing or extra)[0]
        what = "parameter" if name == "params" else f"{name.replace('_', ' ')} entry"
        raise AutoshardError(f"checkpoint {directory} (model {model}) does not match this "
                             f"{'model' if name == 'params' else 'run'}: {what} {key!r} is "
                             f"{'missing from the checkpoint' if missing else 'not in this run'}{hint}"
                             + ("" if name == "params" else " (a different optimizer?)"))
    for key, v in want.items():
        shape, dtype = have[key]
        if tuple(shape) != tuple(np.shape(v)) or dtype != str(v.dtype):
            raise AutoshardError(f"checkpoint {directory} does not match this model: {key} is {dtype}{list(shape)} "
                                 f"there, {v.dtype}{list(np.shape(v))} here{hint}")


def _damaged(directory: Path, step: int | None, e: Exception) -> AutoshardError:
    # orbax's abandoned per-array futures would each log a multi-line traceback when collected: keep it one line
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    hook, sys.unraisablehook = sys.unraisablehook, lambda _: None  # (their callbacks into a closed event loop too)
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook
    return AutoshardError(f"checkpoint {directory} step {step} is damaged: {type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]}")


# -- weights only (autoshard place --apply, train --restore) --------------------------------------------------------


def save(directory: str | Path, params: nnx.State, *, model: str, step: int, plan: dict | None = None) -> Path:
    """Write weights only (model layout) as step `step` of a new checkpoint folder; returns its path."""
    out = Checkpoints.create(directory, model=model, keep=None, async_save=False)
    if step in out.steps():
        raise AutoshardError(f"checkpoint folder {directory} already holds step {step}: write into another folder")
    out.save(step, {"params": {path_str(k): v.get_value() for k, v in nnx.to_flat_state(params)}},
             {"model": model, "plan": plan})
    out.wait()
    out.close()
    return out.directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The meta record of the folder's latest step (model, step, plan, parameter table)."""
    path = Path(directory).absolute()
    if kind(path) == "legacy":
        return _legacy_meta(path)
    return Checkpoints.open(path).meta()


def restore(directory: str | Path, abstract_model: nnx.Module) -> tuple[nnx.State, dict[str, Any]]:
    """The weights of the folder's latest step as an nnx.State shaped like `abstract_model`'s (on one device), and
    its meta record; any checkpoint of a model with the same parameters restores, whatever plan wrote it."""
    path = Path(directory).absolute()
    _, template, _ = nnx.split(abstract_model, nnx.Param, ...)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    want = {path_str(k): jax.ShapeDtypeStruct(np.shape(v.get_value()), v.get_value().dtype, sharding=device)
            for k, v in nnx.to_flat_state(template)}
    if kind(path) == "legacy":
        meta = _legacy_meta(path)
        _check_table(path, meta, "params", want)
        values = _legacy_values(path, want)
    else:
        ckpt = Checkpoints.open(path)
        meta = ckpt.meta()
        values = ckpt.read(meta["step"], {"params": want}, items=("params",))["params"]
        ckpt.close()
    return nnx.map_state(lambda p, var: var.replace(values[path_str(p)]), template), meta


def _legacy_meta(path: Path) -> dict[str, Any]:
    meta = _read_marker(path)
    if meta is None or not isinstance(meta.get("params"), dict):
        raise AutoshardError(f"checkpoint {path} is damaged: {META} has no parameter table")
    return meta


def _legacy_values(path: Path, want: dict[str, Any]) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ocp.StandardCheckpointer().restore(path / "params", want)
    except Exception as e:  # noqa: BLE001
        raise _damaged(path, None, e) from None

