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


def restore(mngr: ocp.CheckpointManager, epoch: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores (state, progress) saved after ``epoch``, shaped like ``abstract_state``."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
        restored = mngr.restore(
            epoch,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore()),
        )
        progress = dict(restored["progress"])
    except Exception as err:  # orbax/tensorstore raise many types for damaged or foreign files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(
            f"checkpoint {mngr.directory / str(epoch)} cannot be restored ({type(err).__name__}: {first}); "
            "delete that folder to resume from an earlier checkpoint"
        ) from None
    return restored["state"], progress
