"""The portable model export (format 3): one writer and one reader, for every kind of model.

Files in ``WORKDIR/model``: ``weights.safetensors`` (the tables, names as in ``jaxcf.core.models``; an
ensemble's stacked along a leading member axis; any table a family keeps for itself, never scored, is
declared with its shape in the model section's ``extra_tables``), ``ids.json`` (raw ids of every row, in
index order), ``seen.safetensors`` (the training pairs and their ratings, for "exclude seen", the
fallback and fold-in of known users), ``items.json`` (titles, when known) and ``metadata.json`` (model,
data, config, metrics, and every other file's size and sha256). No pickles anywhere: JSON and safetensors only.

Written as a whole: every file goes into a new folder beside ``model/``, which then replaces it in one
rename (``jaxcf.core.fileio.replace_directory``), so a failed export (a full disk, a kill) leaves the
previous one intact.

Read with nothing taken on trust: ``metadata.json`` is bounded; every listed file must be a regular
file of exactly its declared size, matching its sha256; the fields that change predictions (kind,
output range, sizes, members) are also stored in the weights file's own header and must agree,
finite and ordered; and the weights' header holds the sha256 of the rest of ``metadata.json`` (every
section but the file list: model, config, data, metrics), so no field that changes an answer (an
implicit model's threshold and alpha, the validation error fold-in's prior reads) can change
unnoticed. Ids must be unique integers or texts; tables must be finite float32 of the declared
shapes. Anything else is a :class:`jaxcf.core.errors.ModelError` with one line. Exports of format 2 (no
digest) still load: :attr:`Export.unverified` names the fields nothing verifies, and the CLIs say so.

A reader never sees a half-replaced export: every file is read through one handle on the folder, and
when the folder was replaced while it was being read (an export written over it), it is read again,
so the reader gets the old export or the new one, whole.

One concept at some length: the export format, with its one writer and its one reader (they share
the checks of every field), so that nothing can be written that the reader would refuse.

What does not live here: resumable checkpoints (``jaxcf.training.checkpoint``), using a model
(``jaxcf.serving.inference``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from jaxcf import families
from jaxcf.core.errors import ModelError
from jaxcf.core.family import PRODUCT, SIGMOID
from jaxcf.core.fileio import (
    UnsafeFileError,
    read_regular,
    replace_directory,
    replaceable,
    staging_directory,
    strict_json,
)

EXPORT_DIR = "model"
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
# What a format-2 export (no metadata digest) leaves unverified.
UNVERIFIED_V2 = ("metadata.json's model fields beyond kind, y_range, sizes and members", "config", "data", "metrics")
# Reads of a folder that was replaced meanwhile are retried this many times.
READ_ATTEMPTS = 5
METADATA = "metadata.json"
REQUIRED_FILES = ("weights.safetensors", "seen.safetensors", "ids.json")
# The tables of each scoring rule (jaxcf.core.models).
TABLES = {
    PRODUCT: ("user_embedding", "item_embedding"),
    SIGMOID: ("user_embedding", "item_embedding", "user_bias", "item_bias"),
}
# Bounds on what a reader accepts: metadata.json, and any one listed file.
MAX_METADATA_BYTES = 256 << 20
MAX_FILE_BYTES = 64 << 30
# The model fields that change predictions, stored in metadata.json and in the weights' header.
HEADER_FIELDS = ("kind", "scoring", "y_range", "num_users", "num_items", "n_factors", "ensemble_size")


@dataclasses.dataclass(frozen=True)
class Export:
    """The verified contents of an export, as NumPy arrays and plain data.

    Attributes:
      path: the export directory (None for a model built in memory).
      metadata: ``metadata.json`` as parsed (``model``, ``data``, ``config``, ``metrics``, ...).
      weights: ``user_embedding`` float32[U, F], ``item_embedding`` float32[I, F] and, for the bias
        model, ``user_bias`` float32[U, 1], ``item_bias`` float32[I, 1]; an ensemble's are stacked
        (float32[K, U, F], ...).
      user_ids, item_ids: raw ids [U], [I] (int64, or object of str), in index order.
      seen_users, seen_items: int32[n_train] indices of the training pairs.
      titles: list of (raw item id, title) pairs, or None.
      seen_ratings: float32[n_train] the training pairs' ratings, or None when not stored.
      unverified: the parts of ``metadata.json`` that no checksum covers (a format-2 export's); empty for
        the current format.
    """

    path: Path | None
    metadata: dict
    weights: dict[str, np.ndarray]
    user_ids: np.ndarray
    item_ids: np.ndarray
    seen_users: np.ndarray
    seen_items: np.ndarray
    titles: list | None
    seen_ratings: np.ndarray | None = None
    unverified: tuple = ()

    @property
    def model(self) -> dict:
        return self.metadata["model"]


def _json_ids(raw: np.ndarray) -> list:
    return [int(v) for v in raw.tolist()] if raw.dtype.kind in "iu" else [str(v) for v in raw.tolist()]


def metadata_digest(metadata: Mapping[str, Any]) -> str:
    """The sha256 of ``metadata`` without its file list, as canonical JSON (sorted keys, no spaces)."""
    covered = {key: value for key, value in metadata.items() if key != "files"}
    text = json.dumps(strict_json(covered), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _header(metadata: Mapping[str, Any]) -> dict[str, str]:
    """The weights' ``__metadata__``: one key holding sorted JSON, so the file's bytes are reproducible
    (safetensors writes several metadata keys in a random order)."""
    model = metadata["model"]
    fields = {"format": "jaxcf", "format_version": FORMAT_VERSION, **{key: model.get(key) for key in HEADER_FIELDS},
              "metadata_sha256": metadata_digest(metadata)}
    return {"jaxcf": json.dumps(fields, sort_keys=True, separators=(",", ":"))}


def build(
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
    train_ratings: np.ndarray | None = None,
) -> Export:
    """An :class:`Export` from a trained model's parts, checked as the reader checks a folder.

    Args:
      params: the tables of ``jaxcf.core.models`` (an ensemble's stacked along a leading axis).
      user_ids, item_ids: raw ids of every row, in index order.
      train_users, train_items: int[n_train] indices of the training pairs.
      model_info: ``kind``, ``n_factors``, ``y_range``, ``num_users``, ``num_items``, ``epoch`` and, for
        an ensemble, ``ensemble_size`` and ``ensemble_method``.
      titles: raw item id -> title, when known.
      train_ratings: float[n_train] the training pairs' ratings (kept for fold-in of known users).

    Raises:
      ModelError: parts that do not fit together (shapes, sizes) or non-finite weights.
    """
    from jaxcf import __version__

    weights = {name: np.ascontiguousarray(np.asarray(table, dtype=np.float32)) for name, table in params.items()}
    title_pairs = None
    if titles:
        title_pairs = [[int(k) if isinstance(k, (int, np.integer)) else str(k), str(v)] for k, v in titles.items()]
    metadata = {
        "format_version": FORMAT_VERSION,
        "jaxcf_version": __version__,
        "model": dict(model_info),
        "data": dict(data_info),
        "config": dict(config),
        "metrics": list(metrics),
    }
    ratings = None if train_ratings is None else np.asarray(train_ratings, np.float32)
    result = Export(None, metadata, weights, np.asarray(user_ids), np.asarray(item_ids),
                    np.asarray(train_users, np.int32), np.asarray(train_items, np.int32), title_pairs, ratings)
    _check(result, "the model", _header(metadata))
    return result


def payloads(result: Export) -> dict[str, bytes]:
    """The bytes of every file of the export but ``metadata.json``."""
    files = {
        "weights.safetensors": safetensors.numpy.save(result.weights, metadata=_header(result.metadata)),
        "seen.safetensors": safetensors.numpy.save({
            "users": result.seen_users, "items": result.seen_items,
            **({"ratings": result.seen_ratings} if result.seen_ratings is not None else {}),
        }),
        "ids.json": json.dumps({"users": _json_ids(result.user_ids), "items": _json_ids(result.item_ids)}).encode(),
    }
    if result.titles:
        files["items.json"] = json.dumps({"titles": result.titles}).encode()
    return files


def is_export(folder: Path) -> bool:
    """Whether ``folder`` is an export jaxcf wrote (a ``metadata.json`` listing its files) holding nothing
    else: the only kind of folder :func:`save` replaces."""
    try:
        metadata = json.loads(read_regular(folder / METADATA, MAX_METADATA_BYTES).decode("utf-8"))
        listed = set(metadata["files"]) | {METADATA}
        return isinstance(metadata.get("format_version"), int) and {p.name for p in folder.iterdir()} <= listed
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def check_target(folder: str | Path) -> None:
    """Refuses a folder :func:`save` must not replace (``jaxcf.core.fileio.replaceable``).

    Raises:
      ModelError: one line naming what is there and what to do.
    """
    reason = replaceable(Path(folder), is_export, "model export")
    if reason is not None:
        raise ModelError(reason)


def save(result: Export, folder: str | Path) -> Path:
    """Writes ``result`` as an export folder, replacing an export there as a whole (never anything else:
    :func:`check_target`).

    Returns:
      The folder.

    Raises:
      ModelError: a target that is not a missing or empty folder or a previous export.
    """
    folder = Path(folder)
    check_target(folder)
    result = dataclasses.replace(result, metadata={**result.metadata, "format_version": FORMAT_VERSION})
    result.metadata.pop("files", None)
    files = payloads(result)
    metadata = {**result.metadata,
                "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                          for name, data in files.items()}}
    text = json.dumps(strict_json(metadata), indent=2, allow_nan=False)
    with staging_directory(folder) as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        (staging / METADATA).write_text(text, encoding="utf-8")
        replace_directory(staging, folder)
    return folder


def write(workdir: str | Path, **parts: Any) -> Path:
    """:func:`build` then :func:`save` into ``WORKDIR/model``."""
    return save(build(**parts), Path(workdir) / EXPORT_DIR)


# ------------------------------------------------------------------------------------- reading


def implicit_threshold(metadata) -> float | None:
    """The interaction threshold of an implicit-feedback export (None for a rating model)."""
    if metadata["model"].get("feedback") != "implicit":
        return None
    value = (metadata.get("data") or {}).get("implicit_threshold")
    if value is None:
        value = ((metadata.get("config") or {}).get("data") or {}).get("implicit_threshold", 4.0)
    return float(value)


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
        if (candidate / METADATA).exists():
            return candidate
    raise ModelError(
        f"{path}: no {METADATA} here or in {path / EXPORT_DIR}; this is not an exported model "
        "(a training run writes one into WORKDIR/model when it finishes)"
    )


def _read(folder: Path, name: str, max_bytes: int, exact: int | None = None, dir_fd: int | None = None) -> bytes:
    try:
        return read_regular(folder / name if dir_fd is None else Path(name), max_bytes, exact, dir_fd=dir_fd)
    except FileNotFoundError:
        raise ModelError(f"{folder / name}: missing; the export is incomplete, copy or re-export it") from None
    except UnsafeFileError as err:
        raise ModelError(f"{folder / name}: {str(err).split(': ', 1)[-1]}; an export holds only regular files of "
                         "their declared sizes: re-export") from None
    except OSError as err:
        raise ModelError(f"{folder / name}: cannot read ({err.strerror})") from None


def _read_metadata(folder: Path, dir_fd: int | None = None) -> dict:
    payload = _read(folder, METADATA, MAX_METADATA_BYTES, dir_fd=dir_fd)
    try:
        metadata = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ModelError(f"{folder / METADATA}: not valid JSON; re-export the model") from None
    if not isinstance(metadata, dict):
        raise ModelError(f"{folder / METADATA}: not a JSON object; re-export the model")
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise ModelError(
            f"{folder / METADATA}: export format {version!r}, this jaxcf reads formats "
            f"{', '.join(map(str, READABLE_VERSIONS))}; use the jaxcf version that wrote it or re-export"
        )
    files = metadata.get("files")
    if not isinstance(files, dict) or not isinstance(metadata.get("model"), dict):
        raise ModelError(f"{folder / METADATA}: needs 'model' and 'files' tables; re-export the model")
    for name, entry in files.items():
        # Only plain names: a metadata.json must not be able to point the loader outside the folder.
        if not isinstance(name, str) or Path(name).name != name or name in (".", "..", METADATA):
            raise ModelError(f"{folder / METADATA}: lists a file outside the export ({name!r}); re-export the model")
        size, digest = (entry or {}).get("bytes") if isinstance(entry, dict) else None, \
            entry.get("sha256") if isinstance(entry, dict) else None
        if not (isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_FILE_BYTES
                and isinstance(digest, str)):
            raise ModelError(f"{folder / METADATA}: the entry of {name} needs 'bytes' and 'sha256'; re-export")
    for name in REQUIRED_FILES:
        if name not in files:
            raise ModelError(f"{folder / METADATA}: lists no {name}; re-export the model")
    return metadata


def _read_verified(folder: Path, metadata: dict, dir_fd: int | None = None) -> dict[str, bytes]:
    """Reads every listed file (exactly its declared size) and checks its sha256; the bytes hashed are
    the bytes parsed, so a file cannot change between the check and the use."""
    out = {}
    for name, entry in metadata["files"].items():
        payload = _read(folder, name, entry["bytes"], entry["bytes"], dir_fd=dir_fd)
        actual = hashlib.sha256(payload).hexdigest()
        if actual != entry["sha256"]:
            raise ModelError(
                f"{folder / name}: sha256 {actual[:12]}… does not match {entry['sha256'][:12]}… in {METADATA} "
                "(changed or damaged after export); copy the model again or re-export it"
            )
        out[name] = payload
    return out


def _weights_header(payload: bytes) -> dict:
    """The ``__metadata__`` of a safetensors payload (its first 8 bytes give the JSON header's length)."""
    if len(payload) < 8:
        raise ValueError("too short")
    (length,) = struct.unpack("<Q", payload[:8])
    if length > len(payload) - 8:
        raise ValueError("header longer than the file")
    header = json.loads(payload[8 : 8 + length].decode("utf-8"))
    return header.get("__metadata__") or {}


def read(path: str | Path) -> Export:
    """Reads and verifies an exported model.

    Args:
      path: an export directory or a training workdir (its ``model/`` folder is used).

    Raises:
      ModelError: anything missing, tampered, unbounded, inconsistent or non-finite (one line).
    """
    folder = find_export(path)
    for attempt in range(READ_ATTEMPTS):
        try:
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            raise ModelError(f"{folder}: cannot open ({err.strerror})") from None
        try:
            opened = os.fstat(dir_fd)
            return _read_from(folder, dir_fd)
        except ModelError:
            # An export written over this one while it was read: read the new one, whole.
            if attempt + 1 == READ_ATTEMPTS or not _replaced(folder, opened):
                raise
        finally:
            os.close(dir_fd)
    raise AssertionError("unreachable")


def _replaced(folder: Path, opened: os.stat_result) -> bool:
    """Whether ``folder`` now names another directory than the one that was opened."""
    try:
        now = os.stat(folder)
    except OSError:
        return True
    return (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino)


def _read_from(folder: Path, dir_fd: int) -> Export:
    """Every file of the export, read through one handle on its folder (a replaced folder cannot mix in)."""
    metadata = _read_metadata(folder, dir_fd)
    files = _read_verified(folder, metadata, dir_fd)
    where = f"{folder}"
    try:
        weights = safetensors.numpy.load(files["weights.safetensors"])
        header = _weights_header(files["weights.safetensors"])
        seen = safetensors.numpy.load(files["seen.safetensors"])
        ids = json.loads(files["ids.json"].decode("utf-8"))
        titles = json.loads(files["items.json"].decode("utf-8"))["titles"] if "items.json" in files else None
    except ModelError:
        raise
    except Exception as err:  # safetensors and json raise their own types; all mean "malformed"
        raise ModelError(f"{where}: a file's contents are malformed ({type(err).__name__}); re-export the model") \
            from None
    if not (isinstance(ids, dict) and isinstance(ids.get("users"), list) and isinstance(ids.get("items"), list)):
        raise ModelError(f"{where}: ids.json is not a {{'users': [...], 'items': [...]}} table; re-export the model")
    if "users" not in seen or "items" not in seen:
        raise ModelError(f"{where}: seen.safetensors needs 'users' and 'items' arrays; re-export the model")
    unverified = UNVERIFIED_V2 if metadata["format_version"] == 2 else ()
    result = Export(folder, metadata, weights, _ids(ids["users"], where, "users"), _ids(ids["items"], where, "items"),
                    seen["users"], seen["items"], titles, seen.get("ratings"), unverified)
    _check(result, where, header)
    return dataclasses.replace(result, seen_users=result.seen_users.astype(np.int32),
                               seen_items=result.seen_items.astype(np.int32))


def _ids(raw: list, where: str, what: str) -> np.ndarray:
    """Ids as stored: all integers within int64 (not booleans), or all texts; unique."""
    if all(isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63 for v in raw):
        values = np.asarray(raw, np.int64).reshape(-1)
    elif all(isinstance(v, str) for v in raw):
        values = np.asarray(raw, dtype=object).reshape(-1)
    else:
        raise ModelError(f"{where}: ids.json {what} must be all integers (within int64) or all texts; re-export")
    if len(set(values.tolist())) != len(values):
        raise ModelError(f"{where}: ids.json lists a {what[:-1]} id twice; re-export the model")
    return values


def _extra_tables(model: Mapping[str, Any], bad) -> dict[str, tuple[int, ...]]:
    """A family's own tables (what its fold-in needs, say; never scored): ``extra_tables``, name -> shape."""
    declared, scoring = model.get("extra_tables") or {}, {name for names in TABLES.values() for name in names}
    if not isinstance(declared, dict) or not all(
            isinstance(name, str) and name not in scoring and isinstance(shape, list) and shape
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
            for name, shape in declared.items()):
        raise bad(f"extra_tables must map new table names to shapes (lists of sizes); got {declared!r}")
    return {name: tuple(shape) for name, shape in declared.items()}


def _check(result: Export, where: str, header: Mapping[str, Any]) -> None:
    """The consistency checks shared by :func:`read` and :func:`build`."""

    def bad(message: str) -> ModelError:
        return ModelError(f"{where}: {message}; re-export the model")

    model = result.model
    try:
        fields = json.loads(header.get("jaxcf", ""))
    except json.JSONDecodeError:
        raise bad("the weights' header has no jaxcf fields (not a jaxcf export, or damaged)") from None
    if not isinstance(fields, dict):
        raise bad("the weights' header has no jaxcf fields (not a jaxcf export, or damaged)")
    for key in HEADER_FIELDS:
        stored = fields.get(key)
        if stored != model.get(key):
            raise bad(f"metadata.json says {key} {model.get(key)!r} but the weights' header says {stored!r}")
    if result.metadata.get("format_version", FORMAT_VERSION) >= 3 and (
            fields.get("metadata_sha256") != metadata_digest(result.metadata)):
        raise bad("metadata.json was changed after export (it does not match the digest in the weights' header)")
    kind, members = model.get("kind"), model.get("ensemble_size")
    scoring = families.export_scoring(model)
    if scoring not in TABLES or families.export_kind(model) not in families.SPECS:
        raise bad(f"unknown model kind {kind!r}")
    if members is not None and not (isinstance(members, int) and not isinstance(members, bool) and members >= 1):
        raise bad(f"ensemble_size must be an integer >= 1; got {members!r}")
    y_range = model.get("y_range")
    if scoring == SIGMOID:
        if not (isinstance(y_range, list) and len(y_range) == 2 and all(isinstance(v, (int, float)) and
                not isinstance(v, bool) and math.isfinite(v) for v in y_range) and y_range[0] < y_range[1]):
            raise bad(f"the biased model needs a finite y_range [low, high] with low < high; got {y_range!r}")
    elif y_range is not None:
        raise bad(f"a {kind!r} model has no y_range; got {y_range!r}")
    declared = _extra_tables(model, bad)
    names = (*TABLES[scoring], *declared)
    missing = [t for t in names if t not in result.weights]
    extra = [t for t in result.weights if t not in names]
    if missing or extra:
        raise bad(f"weights.safetensors must hold exactly {', '.join(names)} for a {kind!r} model")
    num_users, num_items = len(result.user_ids), len(result.item_ids)
    if model.get("num_users") != num_users or model.get("num_items") != num_items:
        raise bad(f"metadata.json says {model.get('num_users')} users and {model.get('num_items')} items but "
                  f"ids.json lists {num_users} and {num_items}")
    width = result.weights["user_embedding"].shape[-1] if result.weights["user_embedding"].ndim else None
    if model.get("n_factors") != width:
        raise bad(f"n_factors {model.get('n_factors')!r} does not match the embeddings' width {width}")
    rows = {"user_embedding": num_users, "item_embedding": num_items, "user_bias": num_users, "item_bias": num_items}
    lead = (members,) if members is not None else ()
    for name, table in result.weights.items():
        expected = (declared[name] if name in declared
                    else (*lead, rows[name], width if name.endswith("embedding") else 1))
        if table.dtype != np.float32 or table.shape != expected:
            raise bad(f"{name} is {table.dtype}{list(table.shape)}, expected float32{list(expected)}")
        if not np.all(np.isfinite(table)):
            raise bad(f"{name} holds NaN or infinite values")
    users, items = result.seen_users, result.seen_items
    if users.shape != items.shape or users.ndim != 1 or users.dtype.kind not in "iu" or items.dtype.kind not in "iu":
        raise bad("seen.safetensors needs integer 'users' and 'items' arrays of one length")
    if len(users) and (users.min() < 0 or users.max() >= num_users or items.min() < 0 or items.max() >= num_items):
        raise bad("seen.safetensors holds indices outside the id tables")
    ratings = result.seen_ratings
    if ratings is not None and (ratings.shape != users.shape or ratings.dtype != np.float32
                                or not np.all(np.isfinite(ratings))):
        raise bad("seen.safetensors 'ratings' must be finite float32, one per training pair")
    if result.titles is not None and not (
        isinstance(result.titles, list)
        and all(isinstance(p, list) and len(p) == 2 and isinstance(p[1], str) for p in result.titles)
    ):
        raise bad("items.json is not a {'titles': [[id, title], ...]} table")
