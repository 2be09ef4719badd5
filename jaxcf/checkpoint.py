"""Resumable training checkpoints (orbax-checkpoint).

Checkpoints live in ``WORKDIR/checkpoints/<epoch>/``: the training state pytree (params,
optimizer state, step) through orbax's ``StandardSave``, plus a JSON record of everything else a
bitwise-exact resume needs (the epoch, the notebook's running loss average and batch count, the
metric history). Orbax writes each checkpoint to a temporary folder and renames it when complete,
so a killed process never leaves a half checkpoint that looks whole.

What does not live here: the portable model export (``jaxcf.export``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored; the message is one line meant for the user."""


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


def _path_shapes(tree: Any) -> dict[tuple, tuple]:
    """``{key path: shape}`` with plain key names, so that a saved metadata tree (dicts) and a live
    tree (NamedTuples, dicts) compare."""

    def name(key):
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {tuple(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _rows_differ_only(saved: dict[tuple, tuple], target: dict[tuple, tuple]) -> bool:
    """Whether the saved and target shapes differ, and only in their leading (row) dimensions."""
    if saved == target or saved.keys() != target.keys():
        return False
    return all(a == b or (len(a) == len(b) >= 1 and a[1:] == b[1:]) for a, b in ((saved[k], target[k]) for k in saved))


def restore(mngr: ocp.CheckpointManager, epoch: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores (state, progress) saved after ``epoch``, shaped and placed like ``abstract_state``.

    Args:
      abstract_state: arrays, or ``jax.ShapeDtypeStruct`` with a ``sharding``: each leaf is restored
        with that leaf's shape, dtype and sharding, so a sharded target reads only each device's
        rows (``jaxcf.distributed.Layout.abstract`` builds one for a mesh).

    A mesh stores tables padded with zero rows to a multiple of its ``model`` axis. When the saved
    and target shapes differ only in their row counts, rows are padded with zeros or truncated to
    the target's, so a run saved under one mesh resumes under another or on one device. (A resume
    is refused before this when the config, and so the real table sizes, changed.)
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
        saved = ocp.StandardCheckpointHandler().metadata(mngr.directory / str(epoch) / "state")
        strict = not _rows_differ_only(_path_shapes(saved.tree), _path_shapes(target))
        restored = mngr.restore(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target, strict=strict), progress=ocp.args.JsonRestore()
            ),
        )
        progress = dict(restored["progress"])
    except Exception as err:  # orbax/tensorstore raise many types for damaged or foreign files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(
            f"checkpoint {mngr.directory / str(epoch)} cannot be restored ({type(err).__name__}: {first}); "
            "delete that folder to resume from an earlier checkpoint"
        ) from None
    return restored["state"], progress
