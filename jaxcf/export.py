"""The portable model export: safetensors weights plus JSON, written into ``WORKDIR/model``, and
reading it back with every file verified.

Files: ``weights.safetensors`` (the tables, names as in ``jaxcf.models``), ``ids.json`` (raw ids of
every row, in index order), ``seen.safetensors`` (the training pairs, for "exclude seen" in
recommendations and for the fallback), ``items.json`` (titles, when known) and ``metadata.json``
(config, versions, data checksum, metrics and the sha256 of every other file). :func:`read_export`
checks each listed file against its sha256 before parsing it. No pickles anywhere: JSON and
safetensors only.

What does not live here: resumable training checkpoints (``jaxcf.checkpoint``), using a loaded
model (``jaxcf.recommend``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from jaxcf.fileio import atomic_write_bytes, atomic_write_text

EXPORT_DIR = "model"
FORMAT_VERSION = 1


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

    Args:
      params: the tables of ``jaxcf.models`` (float32[num_users, F], ...).
      user_ids, item_ids: raw ids of every row, in index order ([num_users], [num_items]).
      train_users, train_items: int32[n_train] indices of the training pairs.
      titles: raw item id -> title, when known.

    Returns:
      The export directory.
    """
    from jaxcf import __version__

    out = Path(workdir) / EXPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    weights = {name: np.ascontiguousarray(np.asarray(table, dtype=np.float32)) for name, table in params.items()}
    seen = {"users": np.asarray(train_users, np.int32), "items": np.asarray(train_items, np.int32)}
    files = {
        "weights.safetensors": safetensors.numpy.save(
            weights, metadata={"format": "jaxcf", "kind": model_info["kind"]}
        ),
        "seen.safetensors": safetensors.numpy.save(seen),
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


# ------------------------------------------------------------------------------------- reading

METADATA = "metadata.json"
REQUIRED_FILES = ("weights.safetensors", "seen.safetensors", "ids.json")
TABLES = {
    "dot": ("user_embedding", "item_embedding"),
    "bias": ("user_embedding", "item_embedding", "user_bias", "item_bias"),
}


class ModelError(ValueError):
    """An exported model that cannot be used; the message is one line meant for the user."""


@dataclasses.dataclass(frozen=True)
class Export:
    """The verified contents of an export directory, as NumPy arrays and plain data.

    Attributes:
      path: the export directory.
      metadata: ``metadata.json`` as parsed.
      weights: ``user_embedding`` float32[U, F], ``item_embedding`` float32[I, F] and, for the bias
        model, ``user_bias`` float32[U, 1], ``item_bias`` float32[I, 1].
      user_ids, item_ids: raw ids [U], [I] (int64 or str), in index order.
      seen_users, seen_items: int32[n_train] indices of the training pairs.
      titles: list of (raw item id, title) pairs, or None.
    """

    path: Path
    metadata: dict
    weights: dict[str, np.ndarray]
    user_ids: np.ndarray
    item_ids: np.ndarray
    seen_users: np.ndarray
    seen_items: np.ndarray
    titles: list | None


def find_export(path: str | Path) -> Path:
    """The export directory for ``path``: the directory itself, or ``path/model`` for a training workdir.

    Raises:
      ModelError: when neither holds a ``metadata.json``.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such directory; pass a training workdir or its exported {EXPORT_DIR}/ folder")
    if not path.is_dir():
        raise ModelError(f"{path}: is a file; pass a training workdir or its exported {EXPORT_DIR}/ folder")
    for candidate in (path, path / EXPORT_DIR):
        if (candidate / METADATA).is_file():
            return candidate
    raise ModelError(
        f"{path}: no {METADATA} here or in {path / EXPORT_DIR}; this is not an exported model "
        "(a training run writes one into WORKDIR/model when it finishes)"
    )


def _read_metadata(folder: Path) -> dict:
    try:
        metadata = json.loads((folder / METADATA).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{folder / METADATA}: unreadable ({type(err).__name__}); re-export the model") from None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("files"), dict):
        raise ModelError(f"{folder / METADATA}: has no 'files' table of sha256 digests; re-export the model")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelError(
            f"{folder / METADATA}: export format {version!r}, this jaxcf reads format {FORMAT_VERSION}; "
            "use the jaxcf version that wrote it or re-export"
        )
    for name in REQUIRED_FILES:
        if name not in metadata["files"]:
            raise ModelError(f"{folder / METADATA}: lists no sha256 for {name}; re-export the model")
    return metadata


def _read_verified(folder: Path, metadata: dict) -> dict[str, bytes]:
    """Reads every file that metadata.json lists and checks it against its sha256.

    The bytes that were hashed are the bytes that get parsed, so a file cannot change between the
    check and the use.
    """
    payloads = {}
    for name, expected in metadata["files"].items():
        # Only plain names: a metadata.json must not be able to point the loader outside the folder.
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise ModelError(f"{folder / METADATA}: lists a file outside the export ({name!r}); re-export the model")
        try:
            payload = (folder / name).read_bytes()
        except FileNotFoundError:
            raise ModelError(f"{folder / name}: missing; the export is incomplete, copy or re-export it") from None
        except OSError as err:
            raise ModelError(f"{folder / name}: cannot read ({err.strerror})") from None
        actual = hashlib.sha256(payload).hexdigest()
        if actual != expected:
            raise ModelError(
                f"{folder / name}: sha256 {actual[:12]}… does not match {str(expected)[:12]}… in {METADATA} "
                "(changed or truncated after export); copy the model again or re-export it"
            )
        payloads[name] = payload
    return payloads


def _load_tensors(folder: Path, name: str, payload: bytes) -> dict[str, np.ndarray]:
    try:
        return safetensors.numpy.load(payload)
    except Exception as err:  # safetensors raises its own error types; all mean "not a valid file"
        raise ModelError(f"{folder / name}: not a valid safetensors file ({type(err).__name__}); re-export") from None


def _ids(raw: Any) -> np.ndarray:
    values = np.asarray(raw)
    # Integer ids stay int64 so that they match what the ratings file held; anything else is text.
    return values.astype(np.int64) if values.dtype.kind in "iu" else values.astype(str)


def read_export(path: str | Path) -> Export:
    """Reads and verifies an exported model.

    Args:
      path: an export directory or a training workdir (its ``model/`` folder is used).

    Returns:
      The verified :class:`Export`.

    Raises:
      ModelError: a missing directory or metadata, a file whose sha256 does not match, or contents
        that are inconsistent (shapes, ids, indices).
    """
    folder = find_export(path)
    metadata = _read_metadata(folder)
    payloads = _read_verified(folder, metadata)

    def bad(message: str) -> ModelError:
        return ModelError(f"{folder}: {message}; re-export the model")

    model = metadata.get("model") or {}
    kind = model.get("kind")
    if kind not in TABLES:
        raise bad(f"unknown model kind {kind!r} in {METADATA}")
    weights = _load_tensors(folder, "weights.safetensors", payloads["weights.safetensors"])
    missing = [t for t in TABLES[kind] if t not in weights]
    if missing:
        raise bad(f"weights.safetensors lacks {', '.join(missing)} for a {kind!r} model")
    weights = {t: np.asarray(weights[t], np.float32) for t in TABLES[kind]}
    user_ids, item_ids = _read_ids(payloads, bad)
    num_users, num_items = len(user_ids), len(item_ids)
    user_table, item_table = weights["user_embedding"], weights["item_embedding"]
    if user_table.ndim != 2 or item_table.ndim != 2 or user_table.shape[1] != item_table.shape[1]:
        raise bad(f"embedding shapes {user_table.shape} and {item_table.shape} do not fit together")
    expected_rows = {
        "user_embedding": num_users, "item_embedding": num_items, "user_bias": num_users, "item_bias": num_items,
    }
    for table, rows in expected_rows.items():
        if table in weights and weights[table].shape[0] != rows:
            raise bad(f"{table} has {weights[table].shape[0]} rows but ids.json lists {rows} ids")
    if kind == "bias":
        y_range = model.get("y_range")
        if not (isinstance(y_range, list) and len(y_range) == 2 and y_range[0] < y_range[1]):
            raise bad(f"the bias model needs model.y_range [low, high] in {METADATA}; got {y_range!r}")
    seen_users, seen_items = _read_seen(folder, payloads, num_users, num_items, bad)
    return Export(
        path=folder,
        metadata=metadata,
        weights=weights,
        user_ids=user_ids,
        item_ids=item_ids,
        seen_users=seen_users,
        seen_items=seen_items,
        titles=_read_titles(payloads, bad),
    )


# Pieces of reading an export that the ensemble reader (jaxcf.ensemble.read_ensemble) shares. ``bad``
# turns a message into the reader's ModelError.


def _read_ids(payloads: dict[str, bytes], bad: Callable[[str], ModelError]) -> tuple[np.ndarray, np.ndarray]:
    """The raw user and item ids of ``ids.json``, by row."""
    try:
        ids = json.loads(payloads["ids.json"].decode("utf-8"))
        return _ids(ids["users"]), _ids(ids["items"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise bad("ids.json is not a {'users': [...], 'items': [...]} table") from None


def _read_seen(
    folder: Path, payloads: dict[str, bytes], num_users: int, num_items: int, bad: Callable[[str], ModelError]
) -> tuple[np.ndarray, np.ndarray]:
    """The training pairs of ``seen.safetensors`` as int32 row indices, checked against the id tables."""
    seen = _load_tensors(folder, "seen.safetensors", payloads["seen.safetensors"])
    if "users" not in seen or "items" not in seen or seen["users"].shape != seen["items"].shape:
        raise bad("seen.safetensors needs 'users' and 'items' arrays of one length")
    seen_users, seen_items = seen["users"].astype(np.int32), seen["items"].astype(np.int32)
    if len(seen_users) and (
        seen_users.min() < 0 or seen_users.max() >= num_users or seen_items.min() < 0 or seen_items.max() >= num_items
    ):
        raise bad("seen.safetensors holds indices outside the id tables")
    return seen_users, seen_items


def _read_titles(payloads: dict[str, bytes], bad: Callable[[str], ModelError]) -> list | None:
    """The ``items.json`` titles table, or None when the export has none."""
    if "items.json" not in payloads:
        return None
    try:
        return json.loads(payloads["items.json"].decode("utf-8"))["titles"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise bad("items.json is not a {'titles': [[id, title], ...]} table") from None
