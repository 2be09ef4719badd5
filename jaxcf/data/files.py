"""A dataset from your own data: a training part, and optionally a validation and a test part, each a CSV
file or a pandas DataFrame.

    data: {path: train.csv, valid_path: valid.csv, test_path: test.csv}      # any of the last two
    jaxcf.fit("train.csv", valid="valid.csv", test=test_frame)                # the same from Python

Every part is read and checked as one ratings table is (``jaxcf.data.ratings``: the config's column
names, ids kept exactly as written, finite ratings inside ``data.rating_range``); the id maps are built
over the parts in order (training first), so an id that appears only in the validation or test part
has an index but no training rating: every model answers it with its flagged fallback.

The roles (``jaxcf.data.splits``): the training part trains; without a validation part,
``data.valid_fraction`` of it (the notebook's random split; 0 = none) or ``data.leave_last`` of each
user's latest ratings validate instead; the test part is scored and recorded as ``test_*`` and never
chooses anything.

What does not live here: reading one table (``jaxcf.data.ratings``), the named datasets
(``jaxcf.data.registry``), the split rules (``jaxcf.data.splits``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from jaxcf.core.errors import DataError
from jaxcf.data.ids import IdMap
from jaxcf.data.ratings import Ratings, load_csv, ratings_from_frame
from jaxcf.data.splits import Split, leave_last_split, random_split

ROLES = ("train", "valid", "test")


def read_part(part: Any, data_config, role: str, timestamps: bool) -> Ratings:
    """One part (a CSV path or a DataFrame) as a checked Ratings table with the config's columns.

    Raises:
      DataError: as for any ratings table; a part that is neither a path nor a DataFrame.
    """
    cols = (data_config.user_col, data_config.item_col, data_config.rating_col)
    stamp = data_config.timestamp_col if timestamps else None
    if isinstance(part, pd.DataFrame):
        source = "DataFrame" if role == "train" else f"the {role} DataFrame"
        return ratings_from_frame(part, *cols, rating_range=data_config.rating_range, source=source,
                                  timestamp_col=stamp)
    if isinstance(part, (str, Path)):
        return load_csv(part, *cols, rating_range=data_config.rating_range, timestamp_col=stamp)
    raise DataError(f"the {role} data must be a pandas DataFrame or a path to a ratings CSV; got {type(part).__name__}")


def merge(tables: list[Ratings]) -> tuple[Ratings, list[np.ndarray]]:
    """One table from several, with id maps over all of them in order of first appearance.

    Ids keep their type: a part whose ids are integers joins a part whose ids are text as the text of
    those integers (``7`` and ``"7"`` are then one id, ``"007"`` another).

    Returns:
      (the table, the row indices of each part in it).
    """
    if len(tables) == 1:
        return tables[0], [np.arange(len(tables[0]))]

    def column(side: str) -> np.ndarray:
        arrays = [getattr(t, f"{side}_ids").raw[getattr(t, f"{side}s")] for t in tables]
        if all(a.dtype.kind in "iu" for a in arrays):
            return np.concatenate([a.astype(np.int64) for a in arrays])
        return np.concatenate([a.astype(str).astype(object) if a.dtype.kind in "iu" else a for a in arrays])

    users, items = column("user"), column("item")
    user_codes, user_uniques = pd.factorize(users)
    item_codes, item_uniques = pd.factorize(items)
    stamps = [t.timestamps for t in tables]
    timestamps = np.concatenate(stamps) if all(s is not None for s in stamps) else None
    digest = hashlib.sha256("|".join(t.sha256 for t in tables).encode()).hexdigest()
    merged = Ratings(
        users=user_codes.astype(np.int32), items=item_codes.astype(np.int32),
        ratings=np.concatenate([t.ratings for t in tables]).astype(np.float32),
        user_ids=IdMap(_id_array(user_uniques)), item_ids=IdMap(_id_array(item_uniques)),
        source=" + ".join(t.source for t in tables), sha256=digest, timestamps=timestamps,
    )
    bounds = np.cumsum([0] + [len(t) for t in tables])
    return merged, [np.arange(bounds[k], bounds[k + 1]) for k in range(len(tables))]


def _id_array(uniques) -> np.ndarray:
    values = np.asarray(uniques)
    return values.astype(np.int64) if values.dtype.kind in "iu" else values.astype(object)


def train_split(users: np.ndarray, timestamps: np.ndarray | None, rows: np.ndarray, data_config, seed: int,
                source: str) -> Split:
    """The validation rows chosen among the training part's ``rows``: leave-last-k-out, else the random
    split of ``data.valid_fraction`` (0: none)."""
    if data_config.leave_last:
        inner = leave_last_split(users[rows], None if timestamps is None else timestamps[rows],
                                 data_config.leave_last, source)
        return Split(rows[inner.train], rows[inner.valid], inner.name)
    inner = random_split(len(rows), data_config.valid_fraction, seed)
    return Split(rows[inner.train], rows[inner.valid], inner.name)


def from_parts(train: Any, valid: Any, test: Any, data_config, seed: int,
               timestamps: bool = False) -> tuple[Ratings, Split]:
    """The merged table and its split from a training part and optional validation and test parts.

    Args:
      timestamps: read ``data.timestamp_col`` of every part (a family that uses times); without it, only
        the training part's, and only for ``data.leave_last``.

    Raises:
      DataError: an unreadable part, a missing timestamp column, or a split that leaves the training rows empty.
    """
    if (timestamps or data_config.leave_last) and not data_config.timestamp_col:
        raise DataError("data.timestamp_col is null, and this run needs times (data.leave_last, or a model family "
                        "that uses them); name the timestamp column")
    if valid is not None and data_config.leave_last:
        raise DataError("data.leave_last chooses validation rows and a validation part was given too; use one")
    parts = [("train", train), ("valid", valid), ("test", test)]
    tables = [read_part(part, data_config, role, timestamps or (bool(data_config.leave_last) and role == "train"))
              for role, part in parts if part is not None]
    if data_config.leave_last and not timestamps:  # only the training part needs them; the others may lack them
        tables = [t if t.timestamps is not None else dataclasses.replace(t, timestamps=np.zeros(len(t), np.int64))
                  for t in tables]
    table, rows = merge(tables)
    given = [role for role, part in parts if part is not None]
    by_role = dict(zip(given, rows))
    empty = np.zeros(0, np.int64)
    if "valid" in by_role:
        split = Split(by_role["train"], by_role["valid"], "files")
    else:
        split = train_split(table.users, table.timestamps, by_role["train"], data_config, seed, table.source)
    return table, dataclasses.replace(split, test=by_role.get("test", empty))
