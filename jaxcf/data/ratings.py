"""Ratings tables: reading a CSV, id maps from raw ids to contiguous indices, and the split.

Everything here is vectorised (pyarrow's CSV reader, ``pandas.factorize``), so it stays fast at
20M+ rows; the notebook's per-row ``.apply(lambda ...)`` is not repeated.

Policies (documented in the README's data section):
- Duplicate (user, item) pairs are kept, each as its own rating, as the notebook does.
- Ids may be integers or strings; they are kept as they appear in the file.
- ``.gz`` and other compressed CSVs are read transparently (by extension).
- Ratings must be finite numbers (and inside ``rating_range`` when one is declared).

What does not live here: the named-dataset registry and downloads (``jaxcf.data.registry``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv


class DataError(ValueError):
    """Data that cannot be used; the message is one line meant for the user."""


@dataclasses.dataclass(frozen=True)
class IdMap:
    """Raw ids <-> contiguous indices. ``raw[i]`` is the raw id of index ``i``.

    Indices follow the order of first appearance in the file, as the notebook's
    ``{k: i for i, k in enumerate(df[col].unique())}`` does.
    """

    raw: np.ndarray

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def _index(self) -> pd.Index:
        return pd.Index(self.raw)

    def lookup(self, raw_ids: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Maps raw ids to indices.

        Args:
          raw_ids: any[n] raw ids. Numeric strings match integer ids (CLI input is text).

        Returns:
          (indices int32[n] with -1 where unknown, known bool[n]).
        """
        values = np.asarray(raw_ids)
        if self.raw.dtype.kind in "iu" and values.dtype.kind in "USO":
            converted = pd.to_numeric(pd.Series(values), errors="coerce")
            values = converted.to_numpy()
            # Non-integers cannot match an integer id.
            bad = ~np.isfinite(values) | (values != np.round(values))
            values = np.where(bad, np.nan, values)
        elif self.raw.dtype.kind in "USO":
            values = values.astype(str)
            index = pd.Index(self.raw.astype(str))
            positions = index.get_indexer(values)
            return positions.astype(np.int32), positions >= 0
        positions = self._index.get_indexer(values)
        return positions.astype(np.int32), positions >= 0


@dataclasses.dataclass(frozen=True)
class Ratings:
    """A ratings table mapped to contiguous indices.

    Attributes:
      users: int32[n] user indices in [0, num_users).
      items: int32[n] item indices in [0, num_items).
      ratings: float32[n].
      user_ids, item_ids: the id maps.
      source: where the table came from (a path or a dataset name).
      sha256: checksum of the bytes the table was parsed from.
    """

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    user_ids: IdMap
    item_ids: IdMap
    source: str
    sha256: str

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def __len__(self) -> int:
        return len(self.ratings)

    @property
    def rating_range(self) -> tuple[float, float]:
        return float(self.ratings.min()), float(self.ratings.max())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def read_table(
    path: str | Path,
    columns: Sequence[str],
    *,
    delimiter: str = ",",
    header: bool = True,
    names: Sequence[str] | None = None,
    encoding: str = "utf8",
) -> pa.Table:
    """Reads the given columns of a delimited file with pyarrow (fast, multi-threaded).

    Raises:
      DataError: missing/unreadable file, missing columns, malformed rows.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found; check data.path (or use data.name for a bundled dataset)")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a ratings CSV file")
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty; expected a CSV with a header row and ratings")
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror}") from None
    read_options = pacsv.ReadOptions(
        column_names=list(names) if names is not None else None,
        autogenerate_column_names=False,
        encoding=encoding,
        block_size=1 << 24,
    )
    parse_options = pacsv.ParseOptions(delimiter=delimiter)
    convert_options = pacsv.ConvertOptions(include_columns=list(columns), include_missing_columns=False)
    try:
        table = pacsv.read_csv(path, read_options, parse_options, convert_options)
    except UnicodeDecodeError:
        # pyarrow decodes header names with Python's codec, outside its own error handling.
        raise DataError(f"{path}: the header is not valid UTF-8 text; re-encode the file as UTF-8") from None
    except pa.ArrowException as err:
        message = _first_line(err)
        if "include_columns" in message or "No such column" in message:
            try:
                header_names = pacsv.read_csv(
                    path, read_options, parse_options, pacsv.ConvertOptions()
                ).column_names
            except (pa.ArrowException, UnicodeDecodeError):
                header_names = []
            missing = [c for c in columns if c not in header_names]
            shown = ", ".join(header_names[:8]) or "(none readable)"
            hint = " (is the delimiter right?)" if len(header_names) == 1 else ""
            raise DataError(
                f"{path}: missing column(s) {', '.join(missing)}; the file has: {shown}{hint}. "
                "Set data.user_col / data.item_col / data.rating_col to match"
            ) from None
        if "UTF8" in message or "utf8" in message.lower() or "decode" in message.lower():
            raise DataError(f"{path}: not valid UTF-8 text ({message}); re-encode the file as UTF-8") from None
        if isinstance(err, pa.ArrowInvalid):
            raise DataError(f"{path}: cannot parse CSV: {message}") from None
        raise DataError(f"{path}: cannot read: {message}") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {_first_line(err)}") from None
    for name in table.column_names:
        # pyarrow reads bytes that are not UTF-8 as a binary column instead of failing.
        if pa.types.is_binary(table.column(name).type) or pa.types.is_large_binary(table.column(name).type):
            raise DataError(
                f"{path}: column {name!r} holds bytes that are not valid UTF-8; re-encode the file as UTF-8"
            )
    return table


def ratings_from_columns(
    users_raw: np.ndarray,
    items_raw: np.ndarray,
    ratings_raw: np.ndarray,
    *,
    source: str,
    sha256: str,
    rating_range: tuple[float, float] | None = None,
    names: tuple[str, str, str] = ("user", "item", "rating"),
) -> Ratings:
    """Validates raw columns and builds id maps (order of first appearance) and indices."""
    user_col, item_col, rating_col = names
    if len(ratings_raw) == 0:
        raise DataError(f"{source}: has a header but no ratings")
    for col, values in ((user_col, users_raw), (item_col, items_raw)):
        missing = pd.isna(values)
        if missing.any():
            row = int(np.argmax(missing))
            raise DataError(
                f"{source}: missing {col} id in data row {row + 1}; every rating needs a user and an item id"
            )
    ratings = np.asarray(ratings_raw)
    if ratings.dtype.kind not in "fiu":
        as_numbers = pd.to_numeric(pd.Series(ratings), errors="coerce").to_numpy()
        bad = np.isnan(as_numbers) & ~pd.isna(ratings)
        row = int(np.argmax(bad)) if bad.any() else 0
        raise DataError(
            f"{source}: column {rating_col!r} is not numeric (data row {row + 1}: {ratings[row]!r}); "
            "ratings must be numbers"
        )
    ratings = ratings.astype(np.float64)
    bad = ~np.isfinite(ratings)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(
            f"{source}: rating in data row {row + 1} is {ratings[row].item()!r}; ratings must be finite numbers"
        )
    if rating_range is not None:
        low, high = rating_range
        outside = (ratings < low) | (ratings > high)
        if outside.any():
            row = int(np.argmax(outside))
            raise DataError(
                f"{source}: rating {ratings[row].item()!r} in data row {row + 1} is outside data.rating_range "
                f"[{low}, {high}]; fix the file or the declared range"
            )
    user_codes, user_uniques = pd.factorize(users_raw)
    item_codes, item_uniques = pd.factorize(items_raw)
    return Ratings(
        users=user_codes.astype(np.int32),
        items=item_codes.astype(np.int32),
        ratings=ratings.astype(np.float32),
        user_ids=IdMap(np.asarray(user_uniques)),
        item_ids=IdMap(np.asarray(item_uniques)),
        source=source,
        sha256=sha256,
    )


def _column_values(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name)
    if pa.types.is_null(column.type):
        return np.full(len(column), None, dtype=object)
    if pa.types.is_integer(column.type) and column.null_count == 0:
        return column.to_numpy().astype(np.int64)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.to_numpy(zero_copy_only=False).astype(object)
    return column.to_numpy(zero_copy_only=False)


def load_csv(
    path: str | Path,
    user_col: str = "userId",
    item_col: str = "movieId",
    rating_col: str = "rating",
    *,
    rating_range: tuple[float, float] | None = None,
    source: str | None = None,
    sha256: str | None = None,
) -> Ratings:
    """Reads a ratings CSV (other columns are ignored, as the notebook drops ``timestamp``).

    Args:
      path: a CSV file, optionally compressed (``.gz``, ``.bz2``).
      user_col, item_col, rating_col: column names.
      rating_range: reject ratings outside [low, high] when given.

    Returns:
      The Ratings table with id maps in order of first appearance.

    Raises:
      DataError: with one line saying what is wrong and what to do.
    """
    path = Path(path)
    table = read_table(path, [user_col, item_col, rating_col])
    return ratings_from_columns(
        _column_values(table, user_col),
        _column_values(table, item_col),
        _column_values(table, rating_col),
        source=source or str(path),
        sha256=sha256 or file_sha256(path),
        rating_range=rating_range,
        names=(user_col, item_col, rating_col),
    )


@dataclasses.dataclass(frozen=True)
class Split:
    """Row indices (into a Ratings table) of the training and validation parts, in file order."""

    train: np.ndarray
    valid: np.ndarray
    name: str = "random"


def random_split(num_ratings: int, valid_fraction: float, seed: int) -> Split:
    """The notebook's 80/20 split, seeded as the notebook meant.

    Validation is the first ``int(n * valid_fraction)`` entries of
    ``np.random.RandomState(seed).permutation(n)``. Both parts keep file order, as the notebook's
    boolean ``mask`` does. (The notebook wrote ``np.random.seed = 42``, which assigns to the
    attribute instead of calling it, so its own split was unseeded.)

    Raises:
      DataError: when either part would be empty.
    """
    num_valid = int(num_ratings * valid_fraction)
    if num_valid < 1 or num_ratings - num_valid < 1:
        raise DataError(
            f"too few ratings to split: {num_ratings} ratings with data.valid_fraction={valid_fraction} "
            "leave an empty training or validation set; use more data or change the fraction"
        )
    permutation = np.random.RandomState(seed).permutation(num_ratings)
    mask = np.zeros(num_ratings, dtype=bool)
    mask[permutation[:num_valid]] = True
    return Split(train=np.flatnonzero(~mask), valid=np.flatnonzero(mask), name="random")
