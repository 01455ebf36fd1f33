"""Model checkpoints: the parameters in the model's own layout (whatever plan trained them), with orbax.

A checkpoint folder holds the orbax array store under `params/` and `autoshard.json` (model name, step, plan,
note). Parameters are saved in the model's layout (a pipeline's staged layout is undone first), so a checkpoint
restores under any plan. Restoring checks names, shapes and dtypes against the model and says what differs in one
line; a folder that is not a checkpoint, or a damaged one, is a one-line error too.
"""

from __future__ import annotations

import gc
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from planner.errors import AutoshardError
from planner.params import path_str

META = "autoshard.json"


def save(directory: str | Path, params: nnx.State, *, model: str, step: int, plan: dict | None = None) -> Path:
    """Write `params` (model layout) and metadata to `directory` (replaced if it exists); returns its path."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    pure = {path_str(k): v.get_value() for k, v in nnx.to_flat_state(params)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(directory / "params", pure, force=True)
        checkpointer.wait_until_finished()
    meta = {"format": 1, "model": model, "step": int(step), "plan": plan,
            "params": {k: [list(np.shape(v)), str(v.dtype)] for k, v in pure.items()}}
    (directory / META).write_text(json.dumps(meta, indent=1) + "\n")
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise AutoshardError(f"{directory} is not an autoshard checkpoint (no {META}): pass the folder that "
                             f"`autoshard train --checkpoint DIR` wrote") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AutoshardError(f"checkpoint {directory} is damaged: cannot read {META} ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("params"), dict):
        raise AutoshardError(f"checkpoint {directory} is damaged: {META} has no parameter table")
    return meta


def restore(directory: str | Path, abstract_model: nnx.Module) -> tuple[nnx.State, dict[str, Any]]:
    """The checkpoint's parameters as an nnx.State shaped like `abstract_model`'s, and its metadata."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    meta = read_meta(directory)
    _, template, _ = nnx.split(abstract_model, nnx.Param, ...)
    want = {path_str(k): v.get_value() for k, v in nnx.to_flat_state(template)}
    have = meta["params"]
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        name = (missing or extra)[0]
        raise AutoshardError(f"checkpoint {directory} (model {meta.get('model')}) does not match this model: "
                             f"parameter {name!r} is {'missing from the checkpoint' if missing else 'not in the model'}"
                             f": restore with --model {meta.get('model')}")
    for path, v in want.items():
        shape, dtype = have[path]
        if tuple(shape) != tuple(np.shape(v)) or dtype != str(v.dtype):
            raise AutoshardError(f"checkpoint {directory} does not match this model: {path} is {dtype}{shape} there, "
                                 f"{v.dtype}{list(np.shape(v))} here: restore with --model {meta.get('model')}")
    abstract = {p: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for p, v in want.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = ocp.StandardCheckpointer().restore(directory / "params", abstract)
    except Exception as e:  # orbax raises many types for a damaged store
        # its abandoned per-array futures would each log a multi-line traceback when collected: keep it one line
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        gc.collect()
        raise AutoshardError(f"checkpoint {directory} is damaged: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}") from None
    state = nnx.map_state(lambda path, var: var.replace(values[path_str(path)]), template)
    return state, meta
