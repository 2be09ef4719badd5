"""The portable model export: safetensors weights plus JSON, written into ``WORKDIR/model``.

Files: ``weights.safetensors`` (the tables, names as in ``jaxcf.models``), ``ids.json`` (raw ids of
every row, in index order), ``seen.safetensors`` (the training pairs, for "exclude seen" in
recommendations), ``items.json`` (titles, when known) and ``metadata.json`` (config, versions, data
checksum, metrics and the sha256 of every other file, checked on load). No pickles anywhere.

What does not live here: resumable training checkpoints (``jaxcf.checkpoint``), using a loaded
model (``jaxcf.recommend``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
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
