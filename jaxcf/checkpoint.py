"""Checkpoints (orbax) for resume, and the portable model export (safetensors + JSON).

Checkpoints live in ``WORKDIR/checkpoints/<epoch>/``: the training state pytree (params,
optimizer state, step) through orbax's ``StandardSave``, plus a JSON record of everything else a
bitwise-exact resume needs (the epoch, the notebook's running loss average and batch count, the
metric history). Orbax writes each checkpoint to a temporary folder and renames it when complete,
so a killed process never leaves a half checkpoint that looks whole.

The export (``WORKDIR/model/``) is what ``jaxcf.load_model`` reads: ``weights.safetensors`` (the
tables, names as in ``jaxcf.models``), ``ids.json`` (raw ids of every row, in index order),
``seen.safetensors`` (the training pairs, for "exclude seen" in recommendations), ``items.json``
(titles, when known) and ``metadata.json`` (config, versions, data checksum, metrics and the sha256
of every other file, checked on load). No pickles anywhere.

What does not live here: using a loaded model (``jaxcf.recommend``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy

EXPORT_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1


def manager(workdir: str | Path, keep: int = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(
        Path(workdir).absolute() / CHECKPOINT_DIR,
        options=options,
        item_names=("state", "progress"),
    )


def save(mngr: ocp.CheckpointManager, epoch: int, state: Any, progress: Mapping[str, Any]) -> None:
    """Saves the state after ``epoch`` (1-based) and waits until it is on disk."""
    mngr.save(
        epoch,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(dict(progress))),
        force=True,
    )
    mngr.wait_until_finished()


def latest_epoch(workdir: str | Path) -> int | None:
    path = Path(workdir) / CHECKPOINT_DIR
    if not path.is_dir():
        return None
    with manager(workdir) as mngr:
        return mngr.latest_step()


def restore(mngr: ocp.CheckpointManager, epoch: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores (state, progress) saved after ``epoch``, shaped like ``abstract_state``."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = mngr.restore(
        epoch,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore()),
    )
    return restored["state"], dict(restored["progress"])


# ----------------------------------------------------------------------------------- export


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Writes to a temporary file in the same folder, then ``os.replace``: never a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_ids(raw: np.ndarray) -> list:
    return raw.tolist() if raw.dtype.kind in "iuf" else [str(v) for v in raw]


def export_model(
    workdir: str | Path,
    *,
    params: Mapping[str, Any],
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    train_users: np.ndarray,
    train_items: np.ndarray,
    config: Mapping[str, Any],
    model_info: Mapping[str, Any],
    data_info: Mapping[str, Any],
    metrics: list[Mapping[str, Any]],
    titles: Mapping | None = None,
) -> Path:
    """Writes the portable model into ``WORKDIR/model`` (each file atomically; metadata last).

    Returns:
      The export directory.
    """
    from jaxcf import __version__

    out = Path(workdir) / EXPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    weights = {name: np.ascontiguousarray(np.asarray(table, dtype=np.float32)) for name, table in params.items()}
    files = {
        "weights.safetensors": safetensors.numpy.save(weights, metadata={"format": "jaxcf", "kind": model_info["kind"]}),
        "seen.safetensors": safetensors.numpy.save(
            {"users": np.asarray(train_users, np.int32), "items": np.asarray(train_items, np.int32)}
        ),
        "ids.json": json.dumps({"users": _json_ids(user_ids), "items": _json_ids(item_ids)}).encode(),
    }
    if titles:
        files["items.json"] = json.dumps(
            {"titles": [[k if isinstance(k, (int, float)) else str(k), v] for k, v in titles.items()]}
        ).encode()
    for name, payload in files.items():
        atomic_write_bytes(out / name, payload)
    metadata = {
        "format_version": FORMAT_VERSION,
        "jaxcf_version": __version__,
        "model": dict(model_info),
        "data": dict(data_info),
        "config": dict(config),
        "metrics": list(metrics),
        "files": {name: hashlib.sha256(payload).hexdigest() for name, payload in files.items()},
    }
    atomic_write_text(out / "metadata.json", json.dumps(metadata, indent=2))
    return out
