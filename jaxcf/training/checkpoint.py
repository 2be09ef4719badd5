"""Resumable training checkpoints (orbax-checkpoint), each sealed with a manifest of its files' sha256.

Checkpoints live in ``WORKDIR/checkpoints/<epoch>/``: the training state pytree (a family's state,
and the best parameters under early stopping) through orbax's ``StandardSave``, plus a JSON record of
everything else a bitwise-exact resume needs (the epoch, the metric history, the family's host-side
state). Orbax writes each checkpoint to a temporary folder and renames it when complete; jaxcf then
writes ``MANIFEST`` (every file's size and sha256) into it. On restore every file is checked against
the manifest first, so a flipped byte or a truncated file is an error that names the file, never a
resume with other weights. A checkpoint without a manifest was cut short between the two steps (a
kill): it is skipped, with a note, in favour of the one before.

What does not live here: the portable model export (``jaxcf.serving.export``), the loop that decides when to
save (``jaxcf.training.loop``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxcf.core.errors import CheckpointError
from jaxcf.core.fileio import atomic_write_text

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "MANIFEST"


def manager(workdir: str | Path, keep: int = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(
        Path(workdir).absolute() / CHECKPOINT_DIR,
        options=options,
        item_names=("state", "progress"),
    )


def _root(mngr: ocp.CheckpointManager) -> Path:
    """The manager's folder as a plain local path (orbax gives an ``etils.epath.Path``)."""
    return Path(str(mngr.directory))


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


# What a failed write reports, as the operating system says it (orbax wraps it in paragraphs of context).
OS_REASONS = ("No space left on device", "Permission denied", "Read-only file system", "Disk quota exceeded",
              "File too large", "Input/output error")


def _reason(err: BaseException) -> str:
    text = str(err)
    for reason in OS_REASONS:
        if reason in text:
            return reason.lower()
    return f"{type(err).__name__}: {_first_line(err)[:120]}"


@contextlib.contextmanager
def _quiet():
    """Keeps orbax's own error logging (tracebacks through absl, for every failed write) off the terminal:
    the caller reports the failure in one line."""
    loggers = [logging.getLogger(name) for name in ("absl", "orbax", "tensorstore")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _digests(folder: Path) -> dict[str, dict]:
    """``{relative path: {"bytes": n, "sha256": hex}}`` of every file under ``folder`` but the manifest."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        out[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    return out


def save(mngr: ocp.CheckpointManager, epoch: int, state: Any, progress: Mapping[str, Any]) -> None:
    """Saves the state after ``epoch`` (1-based), waits until it is on disk and seals it with a manifest.

    Raises:
      CheckpointError: when it cannot be written (a full disk, permissions); the previous
        checkpoints are untouched.
    """
    folder = _root(mngr) / str(epoch)
    try:
        with _quiet():
            if folder.exists():  # an unsealed copy of this epoch left by a killed run
                shutil.rmtree(folder)
                mngr.reload()
            mngr.save(
                epoch,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        progress=ocp.args.JsonSave(dict(progress))),
                force=True,
            )
            mngr.wait_until_finished()
            if jax.process_index() == 0:
                manifest = {"epoch": epoch, "files": _digests(folder)}
                atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    except Exception as err:  # orbax/tensorstore raise many types for a failed write (OSError among them)
        shutil.rmtree(folder, ignore_errors=True)
        earlier = [e for e in sorted(_steps(mngr)) if e < epoch and (_root(mngr) / str(e) / MANIFEST).is_file()]
        then = (f"continue with --resume (from the checkpoint of epoch {earlier[-1]})" if earlier
                else "train again (no earlier checkpoint was saved)")
        raise CheckpointError(
            f"cannot write the checkpoint of epoch {epoch} in {_root(mngr)} ({_reason(err)}); free space or fix "
            f"permissions, then {then}"
        ) from None


def _steps(mngr: ocp.CheckpointManager) -> list[int]:
    try:
        return list(mngr.all_steps())
    except Exception:  # noqa: BLE001 (a manager that cannot even list its folder: no earlier checkpoint)
        return []


def verify(folder: Path) -> str | None:
    """What is wrong with the checkpoint in ``folder`` (a missing manifest, a changed, missing or extra
    file), or None when every file matches its manifest."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "it has no MANIFEST (its save was cut short)"
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return "its MANIFEST is unreadable"
    actual = _digests(folder)
    for name, expected in listed.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name] != expected:
            return f"{name} changed after it was saved (sha256 {actual[name]['sha256'][:12]}…, expected " \
                   f"{str(expected.get('sha256'))[:12]}…)"
    extra = sorted(set(actual) - set(listed))
    if extra:
        return f"{extra[0]} was added after it was saved"
    return None


def latest_sealed(mngr: ocp.CheckpointManager) -> tuple[int | None, list[int]]:
    """The newest checkpoint with a manifest, and the newer unsealed ones (removed: a killed save).

    Returns:
      (epoch or None, the unsealed epochs that were removed).
    """
    removed, found = [], None
    for epoch in sorted(mngr.all_steps(), reverse=True):
        if (_root(mngr) / str(epoch) / MANIFEST).is_file():
            found = epoch
            break
        shutil.rmtree(_root(mngr) / str(epoch), ignore_errors=True)
        removed.append(epoch)
    if removed:
        mngr.reload()
    return found, removed


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


def _rows_differ_only(saved: dict[tuple, tuple], target: dict[tuple, tuple], axes: dict[tuple, int | None]) -> bool:
    """Whether the saved and target shapes differ, and only along each leaf's row axis (a mesh's padding)."""
    if saved == target or saved.keys() != target.keys():
        return False
    for key in saved:
        a, b = saved[key], target[key]
        if a == b:
            continue
        axis = axes.get(key)
        if axis is None or len(a) != len(b) or any(x != y for i, (x, y) in enumerate(zip(a, b)) if i != axis):
            return False
    return True


def _path_axes(tree: Any, row_axes: Any) -> dict[tuple, int | None]:
    """``{key path: row axis}``; without ``row_axes``, axis 0 of every leaf with a dimension."""
    shapes = _path_shapes(tree)
    if row_axes is None:
        return {k: (0 if shape else None) for k, shape in shapes.items()}
    axes = jax.tree.leaves(row_axes, is_leaf=lambda a: a is None)
    return dict(zip(shapes, axes))


def restore(mngr: ocp.CheckpointManager, epoch: int, abstract_state: Any, row_axes: Any = None) -> tuple[Any, dict]:
    """Restores (state, progress) saved after ``epoch``, shaped and placed like ``abstract_state``.

    Every file is checked against the checkpoint's manifest first.

    Args:
      abstract_state: arrays, or ``jax.ShapeDtypeStruct`` with a ``sharding``: each leaf is restored
        with that leaf's shape, dtype and sharding, so a sharded target reads only each device's
        rows (``jaxcf.core.distributed.Layout.abstract`` builds one for a mesh).
      row_axes: the same structure with each leaf's row axis (or None); default axis 0.

    A mesh stores tables padded with zero rows to a multiple of its ``model`` axis. When the saved
    and target shapes differ only along the row axes, rows are padded with zeros or truncated,
    so a run saved under one mesh resumes under another or on one device. (A resume is refused
    before this when the config or the data, and so the real table sizes, changed.)

    Raises:
      CheckpointError: a damaged or foreign checkpoint, naming the folder and what to do.
    """
    folder = _root(mngr) / str(epoch)
    problem = verify(folder)
    if problem:
        raise CheckpointError(f"checkpoint {folder} fails its integrity check: {problem}; {_instead(mngr, epoch)}")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
        saved = ocp.StandardCheckpointHandler().metadata(folder / "state")
        axes = _path_axes(target, row_axes)
        strict = not _rows_differ_only(_path_shapes(saved.tree), _path_shapes(target), axes)
        restored = mngr.restore(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target, strict=strict), progress=ocp.args.JsonRestore()
            ),
        )
        progress = dict(restored["progress"])
    except Exception as err:  # orbax/tensorstore raise many types for damaged or foreign files
        raise CheckpointError(
            f"checkpoint {folder} cannot be restored ({type(err).__name__}: {_first_line(err)}); "
            f"{_instead(mngr, epoch)}"
        ) from None
    return restored["state"], progress


def _instead(mngr: ocp.CheckpointManager, epoch: int) -> str:
    """What to do about an unusable checkpoint: resume from an earlier sealed one, or, with none, start over."""
    earlier = [e for e in sorted(_steps(mngr)) if e < epoch and (_root(mngr) / str(e) / MANIFEST).is_file()]
    if earlier:
        return f"delete that folder to resume from the checkpoint of epoch {earlier[-1]}"
    return "no earlier checkpoint exists: start a new run in another --workdir"


def saved_progress(mngr: ocp.CheckpointManager, epoch: int) -> dict:
    """The JSON record saved with a checkpoint (the epoch, the history, the run's config), read before its
    arrays so that a resume can say what changed instead of failing on shapes.

    Raises:
      CheckpointError: a damaged checkpoint (as :func:`restore`).
    """
    folder = _root(mngr) / str(epoch)
    problem = verify(folder)
    if problem:
        raise CheckpointError(f"checkpoint {folder} fails its integrity check: {problem}; {_instead(mngr, epoch)}")
    try:
        return json.loads((folder / "progress" / "metadata").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
