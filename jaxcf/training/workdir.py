"""A run's folder and its plumbing: checks, the lock, metrics.jsonl, the table.

``WORKDIR`` holds ``config.yaml`` (the resolved config), ``data.json`` (what identifies the data:
source, sha256, sizes, split), ``metrics.jsonl`` (one strict-JSON record per epoch), ``checkpoints/``
and, once the run ends, ``model/``. A resume must find the same config (but for the keys that may
change) and the same data; the refusal names what changed.

What does not live here: the loop (``jaxcf.training.loop``), signals and the watchdog
(``jaxcf.training.guards``), checkpoint and export formats (``jaxcf.training.checkpoint``,
``jaxcf.serving.export``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any

from jaxcf.core.config import to_dict
from jaxcf.core.errors import ConfigError, WorkdirError
from jaxcf.core.fileio import atomic_write_text, replaceable, strict_json
from jaxcf.serving import export

RUN_FILES = ("config.yaml", "data.json", "metrics.jsonl", "checkpoints")
# Keys a resume may change: how long to train, how often to save, where to run, the watchdog.
RESUMABLE = ("train.epochs", "train.stall_seconds", "checkpoint", "mesh", "distributed")


def default_workdir(config_name: str | None) -> Path:
    stem = Path(config_name).stem if config_name else "run"
    return Path("runs") / f"{stem}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"


def has_run(workdir: Path) -> bool:
    return any((workdir / name).exists() for name in RUN_FILES)


def _flatten(raw: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(raw, dict):
        out = {}
        for key, value in raw.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): raw}


def changed_keys(saved: Any, config: Any) -> list[str]:
    """The dotted keys whose values differ, leaving out those a resume may change."""
    old, new = _flatten(to_dict(saved)), _flatten(to_dict(config))
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)
            and not any(k == r or k.startswith(r + ".") for r in RESUMABLE)]


def check(workdir: Path, resume: bool, config: Any, builder: Any) -> None:
    """Refuses a workdir that cannot be used as asked, before anything is written.

    Raises:
      WorkdirError: naming what is wrong and what to do.
    """
    if str(workdir) in ("", "."):
        raise WorkdirError("--workdir: give a folder for the run's outputs (an empty path would write into the "
                           "current directory)")
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir}: exists and is not a directory; choose another path")
    if resume:
        if not (workdir / "config.yaml").is_file():
            raise WorkdirError(f"--resume: {workdir} holds no run to continue; train without --resume to start one")
        try:
            saved = builder.load(workdir / "config.yaml")
        except ConfigError as err:
            raise WorkdirError(f"--resume: the saved config cannot be read ({err})") from None
        changed = changed_keys(saved, config)
        fixed = builder.resolve(saved).epochs_fixed
        if saved.train.epochs != config.train.epochs and (saved.optim.schedule != "constant" or fixed):
            why = "its learning-rate schedule" if saved.optim.schedule != "constant" else fixed
            raise WorkdirError(
                f"--resume: train.epochs is {config.train.epochs} but the run in {workdir} used "
                f"{saved.train.epochs}, and {why} depends on it; resume with train.epochs={saved.train.epochs}"
            )
        if changed:
            old, new = _flatten(to_dict(saved)), _flatten(to_dict(config))
            first = changed[0]
            more = f" (and {len(changed) - 1} more: {', '.join(changed[1:4])})" if len(changed) > 1 else ""
            raise WorkdirError(
                f"--resume: {first} is {new.get(first)!r} but the run in {workdir} used {old.get(first)!r}{more}; "
                f"only {', '.join(RESUMABLE)} may change; pass --config {workdir / 'config.yaml'}"
            )
    elif workdir.exists() and has_run(workdir):
        raise WorkdirError(
            f"workdir {workdir} already holds a run; pass --resume to continue it, or choose a new --workdir"
        )
    probe = workdir if workdir.exists() else next((p for p in workdir.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir {workdir}: {probe} is not writable; choose a folder you can write to")
    # The run ends by writing WORKDIR/model; refuse now, not after training, when that would delete others' files.
    reason = replaceable(workdir / export.EXPORT_DIR, export.is_export, "model export")
    if reason is not None:
        raise WorkdirError(f"--workdir {workdir}: the run's export would replace {reason.split(';')[0]}; choose "
                           "another --workdir")


def check_checkpoint_config(workdir: Path, saved: dict | None, config: Any, epoch: int, builder: Any) -> None:
    """On resume: the config must be the one the checkpoint was saved with (``WORKDIR/config.yaml`` edited
    after the run started would otherwise restore into other shapes).

    Raises:
      WorkdirError: naming the first changed key.
    """
    if not saved:
        return  # a checkpoint written before configs were saved with it
    try:
        saved_config = builder.from_dict(saved)
    except ConfigError:
        return
    changed = changed_keys(saved_config, config)
    if changed:
        old, new = _flatten(to_dict(saved_config)), _flatten(to_dict(config))
        first = changed[0]
        raise WorkdirError(
            f"--resume: {first} is {new.get(first)!r} but the checkpoint of epoch {epoch} in {workdir} was saved with "
            f"{old.get(first)!r} (was {workdir / 'config.yaml'} edited?); set it back to resume, or start a new run "
            "in another --workdir"
        )


def check_data(workdir: Path, fingerprint: dict) -> None:
    """On resume: the data must be the data the run started on.

    Raises:
      WorkdirError: naming what changed (checksum, sizes, split).
    """
    path = workdir / "data.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkdirError(f"--resume: {path} is missing, so the data cannot be checked; start a new run") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise WorkdirError(f"--resume: {path} is unreadable; start a new run") from None
    for key in ("sha256", "num_ratings", "num_users", "num_items", "split", "num_train", "num_valid",
                "implicit_threshold"):
        if saved.get(key) != fingerprint.get(key):
            what = "checksum" if key == "sha256" else key
            raise WorkdirError(
                f"--resume: the data changed since the run started ({what} {str(saved.get(key))[:16]} -> "
                f"{str(fingerprint.get(key))[:16]}, source {fingerprint.get('source')}); a resumed run must train on "
                "the same data: restore the file, or start a new run"
            )


def write_data(workdir: Path, fingerprint: dict) -> None:
    atomic_write_text(workdir / "data.json", json.dumps(fingerprint, indent=2) + "\n")


@contextlib.contextmanager
def writing(workdir: Path, what: str):
    """Turns a failed write (a full disk, permissions) into one line naming what and what to do.

    Raises:
      WorkdirError: from the OSError of the block.
    """
    try:
        yield
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise WorkdirError(
            f"cannot write {what} in {workdir} ({reason}); free space or fix permissions, then continue with "
            f"--workdir {workdir} --resume (the last checkpoint is kept)"
        ) from None


@contextlib.contextmanager
def lock(workdir: Path):
    """An exclusive lock on WORKDIR/.lock, held while a process trains there.

    ``flock`` is released by the kernel when the process dies, so a killed run never leaves a
    stale lock behind.

    Raises:
      WorkdirError: when another process holds it.
    """
    try:
        handle = open(workdir / ".lock", "a+")
    except OSError as err:
        raise WorkdirError(f"--workdir {workdir}: cannot write there ({err.strerror}); choose another folder") from None
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirError(
                f"workdir {workdir} is in use by another training process; wait for it or choose another --workdir"
            ) from None
        yield
    finally:
        handle.close()


# --------------------------------------------------------------------------------- records


def dumps(record: dict) -> str:
    return json.dumps(strict_json(record), allow_nan=False)


def write_metrics(workdir: Path, history: list[dict]) -> None:
    atomic_write_text(workdir / "metrics.jsonl", "".join(dumps(r) + "\n" for r in history))


EXPLICIT_COLUMNS = (("train_loss", "train_loss"), ("valid_mse", "valid_mse"), ("valid_rmse", "valid_rmse"))
HEADER = "epoch  train_loss  valid_mse  valid_rmse  seconds"


def interactive() -> bool:
    """Whether a progress bar belongs on the screen: stderr is a terminal, or this is a notebook's kernel."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def test_key(key: str) -> str:
    """The test part's name for a validation metric: ``valid_rmse`` -> ``test_rmse``, ``ndcg@20`` ->
    ``test_ndcg@20``."""
    return "test_" + key.removeprefix("valid_")


def shown_columns(columns, split) -> tuple:
    """The table's columns for a split: the family's validation columns, the test part's in their place
    when nothing is validated."""
    if len(split.valid) or not len(split.test):
        return tuple(columns)
    return tuple((test_key(key), test_key(name)) if key != "train_loss" else (key, name) for key, name in columns)


def header(columns=EXPLICIT_COLUMNS) -> str:
    """The terminal table's header: ``epoch``, the family's columns, ``seconds``."""
    return "  ".join(["epoch", *(name for _, name in columns), "seconds"])


def format_row(record: dict, columns=EXPLICIT_COLUMNS) -> str:
    cells = [f"{record['epoch']:>5d}"]
    for key, name in columns:
        value = record.get(key)
        cells.append(f"{value:>{len(name)}.6f}" if isinstance(value, (int, float)) else f"{'-':>{len(name)}}")
    cells.append(f"{record['seconds']:>7.2f}")
    return "  ".join(cells)
