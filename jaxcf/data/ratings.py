"""Ratings tables: a CSV file or a DataFrame read, checked and mapped to contiguous indices.

Everything here is vectorised (pyarrow's CSV reader, ``pandas.factorize``), so it stays fast at
20M+ rows; the notebook's per-row ``.apply(lambda ...)`` is not repeated.

Policies (documented in the README's data section):
- Duplicate (user, item) pairs are kept, each as its own rating, as the notebook does.
- Ids are kept exactly as they appear in the file: integers only when every id of the column is
  written as a canonical integer within int64 (``jaxcf.data.ids``), else text, so "007" is not "7".
- ``.gz`` and other compressed CSVs are read transparently (by extension).
- Ratings must be finite numbers (and inside ``rating_range`` when one is declared).

One concept at some length: a ratings table read and checked, from a file or a frame.

What does not live here: id maps (``jaxcf.data.ids``), splits (``jaxcf.data.splits``), the
named-dataset registry and downloads (``jaxcf.data.registry``).
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

from jaxcf.core.errors import DataError
from jaxcf.data.ids import IdMap, canonical_ids


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
      timestamps: int64[n] when the source has them and they were read (``data.leave_last``), else None.
    """

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    user_ids: IdMap
    item_ids: IdMap
    source: str
    sha256: str
    timestamps: np.ndarray | None = None

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
    text_columns: Sequence[str] = (),
) -> pa.Table:
    """Reads the given columns of a delimited file with pyarrow (fast, multi-threaded).

    ``text_columns`` are read as the text they hold (ids: see ``jaxcf.data.ids``); in them only an
    empty cell is missing ("NA" is an id like any other).

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
    convert_options = pacsv.ConvertOptions(
        include_columns=list(columns), include_missing_columns=False,
        column_types={name: pa.string() for name in text_columns}, strings_can_be_null=True, null_values=[""],
    )
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
                "Set data.user_col / data.item_col / data.rating_col (data.timestamp_col) to match"
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


def _missing(values) -> np.ndarray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return np.asarray(values.is_null().to_numpy(zero_copy_only=False), bool)
    return np.asarray(pd.isna(values), bool)


def ratings_from_columns(
    users_raw,
    items_raw,
    ratings_raw,
    *,
    source: str,
    sha256: str,
    rating_range: tuple[float, float] | None = None,
    names: tuple[str, str, str] = ("user", "item", "rating"),
) -> Ratings:
    """Validates raw columns and builds id maps (order of first appearance) and indices.

    Args:
      users_raw, items_raw: id columns (pyarrow arrays, pandas Series or NumPy arrays); kept as
        ``jaxcf.data.ids.canonical_ids`` says.
      ratings_raw: the ratings column.
    """
    user_col, item_col, rating_col = names
    if len(ratings_raw) == 0:
        raise DataError(f"{source}: has a header but no ratings")
    for col, values in ((user_col, users_raw), (item_col, items_raw)):
        missing = _missing(values)
        if missing.any():
            row = int(np.argmax(missing))
            raise DataError(
                f"{source}: missing {col} id in data row {row + 1}; every rating needs a user and an item id"
            )
    ratings = rating_values(ratings_raw, source, rating_col, rating_range)
    user_codes, user_uniques = pd.factorize(_ids(users_raw, source, user_col))
    item_codes, item_uniques = pd.factorize(_ids(items_raw, source, item_col))
    return Ratings(
        users=user_codes.astype(np.int32),
        items=item_codes.astype(np.int32),
        ratings=ratings.astype(np.float32),
        user_ids=IdMap(_id_array(user_uniques)),
        item_ids=IdMap(_id_array(item_uniques)),
        source=source,
        sha256=sha256,
    )


def _ids(values, source: str, col: str) -> np.ndarray:
    """``canonical_ids`` of a column, with text that is not valid Unicode refused as bad data."""
    try:
        return canonical_ids(values)
    except UnicodeEncodeError:
        texts = [str(v) for v in (values.to_pylist() if hasattr(values, "to_pylist") else list(values))]
        row = next(k for k, text in enumerate(texts) if not _encodable(text))
        raise DataError(f"{source}: the {col} id in data row {row + 1} is not valid Unicode text (a lone surrogate); "
                        "ids must be UTF-8 text") from None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def rating_values(ratings_raw, source: str, rating_col: str = "rating",
                  rating_range: tuple[float, float] | None = None) -> np.ndarray:
    """float64[n]: a rating column checked as training checks it: numbers (not booleans, not text), finite,
    inside ``rating_range`` when one is given. Fold-in and evaluation read ratings through this too.

    Raises:
      DataError: naming the first offending row.
    """
    if isinstance(ratings_raw, (pa.Array, pa.ChunkedArray)):
        ratings_raw = ratings_raw.to_numpy(zero_copy_only=False)
    ratings = ratings_raw.to_numpy() if isinstance(ratings_raw, pd.Series) else np.asarray(ratings_raw)
    if ratings.dtype.kind not in "fiu":
        as_numbers = pd.to_numeric(pd.Series(ratings), errors="coerce").to_numpy()
        bad = np.isnan(as_numbers) & ~pd.isna(ratings)
        row = int(np.argmax(bad)) if bad.any() else 0
        raise DataError(
            f"{source}: column {rating_col!r} is not numeric (data row {row + 1}: {_plain(ratings[row])!r}); "
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
    return ratings


def _plain(value):
    """A NumPy scalar as the Python value it holds (``True``, not ``np.True_``), for messages."""
    return value.item() if isinstance(value, np.generic) else value


def timestamps_from(values, source: str, col: str) -> np.ndarray:
    """A timestamp column as sortable numbers: int64 or float64 as given, dates as int64 nanoseconds.

    Raises:
      DataError: missing values, or values that are neither finite numbers nor dates.
    """
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = values.to_pandas()
    series = pd.Series(values) if not isinstance(values, pd.Series) else values.reset_index(drop=True)
    missing = series.isna().to_numpy()
    if missing.any():
        raise DataError(f"{source}: missing {col} in data row {int(np.argmax(missing)) + 1}; every rating needs a "
                        "timestamp for data.leave_last")
    if pd.api.types.is_datetime64_any_dtype(series):
        return series.to_numpy().astype("datetime64[ns]").astype(np.int64)
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        out = series.to_numpy()
        out = out.astype(np.int64) if out.dtype.kind in "iu" else out.astype(np.float64)
        bad = ~np.isfinite(out) if out.dtype.kind == "f" else np.zeros(len(out), bool)
        if bad.any():
            raise DataError(f"{source}: {col} in data row {int(np.argmax(bad)) + 1} is not a finite number")
        return out
    try:
        return pd.to_datetime(series, utc=True, format="ISO8601").to_numpy().astype("datetime64[ns]").astype(np.int64)
    except (ValueError, TypeError, OverflowError):
        raise DataError(f"{source}: column {col!r} holds neither numbers nor ISO 8601 dates (data row 1: "
                        f"{series.iloc[0]!r}); data.leave_last orders each user's ratings by it") from None


def _id_array(uniques) -> np.ndarray:
    values = np.asarray(uniques)
    return values.astype(np.int64) if values.dtype.kind in "iu" else values.astype(object)


def _column_values(table: pa.Table, name: str):
    column = table.column(name)
    if pa.types.is_null(column.type):
        return np.full(len(column), None, dtype=object)
    return column.combine_chunks()


def load_csv(
    path: str | Path,
    user_col: str = "userId",
    item_col: str = "movieId",
    rating_col: str = "rating",
    *,
    rating_range: tuple[float, float] | None = None,
    source: str | None = None,
    sha256: str | None = None,
    timestamp_col: str | None = None,
) -> Ratings:
    """Reads a ratings CSV (other columns are ignored, as the notebook drops ``timestamp``).

    Args:
      path: a CSV file, optionally compressed (``.gz``, ``.bz2``).
      user_col, item_col, rating_col: column names.
      rating_range: reject ratings outside [low, high] when given.
      timestamp_col: also read this column as the ratings' timestamps (for ``data.leave_last``).

    Returns:
      The Ratings table with id maps in order of first appearance.

    Raises:
      DataError: with one line saying what is wrong and what to do.
    """
    path = Path(path)
    columns = [user_col, item_col, rating_col] + ([timestamp_col] if timestamp_col else [])
    table = read_table(path, columns, text_columns=(user_col, item_col))
    ratings = ratings_from_columns(
        _column_values(table, user_col),
        _column_values(table, item_col),
        _column_values(table, rating_col),
        source=source or str(path),
        sha256=sha256 or file_sha256(path),
        rating_range=rating_range,
        names=(user_col, item_col, rating_col),
    )
    if timestamp_col:
        ratings = dataclasses.replace(
            ratings, timestamps=timestamps_from(table.column(timestamp_col), source or str(path), timestamp_col))
    return ratings


def frame_sha256(users: np.ndarray, items: np.ndarray, ratings: np.ndarray) -> str:
    """A checksum of a table's content (ids as kept, ratings as float64), for data not read from a file."""
    digest = hashlib.sha256()
    for ids in (users, items):
        if ids.dtype.kind in "iu":
            digest.update(b"int64:" + np.ascontiguousarray(ids, np.int64).tobytes())
        else:
            digest.update(b"text:" + "\x1f".join(ids.tolist()).encode("utf-8", "surrogatepass"))
    digest.update(b"ratings:" + np.ascontiguousarray(ratings, np.float64).tobytes())
    return digest.hexdigest()


def column_problem(frame: pd.DataFrame, wanted: Sequence[str]) -> str | None:
    """What is wrong with a frame's columns for ``wanted`` (missing, or named twice), or None."""
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        shown = ", ".join(map(str, list(frame.columns)[:8])) or "(none)"
        return f"missing column(s) {', '.join(map(str, missing))}; it has: {shown}"
    twice = [c for c in wanted if int((frame.columns == c).sum()) > 1]
    if twice:
        return f"column(s) {', '.join(map(str, twice))} appear more than once; name each column once"
    return None


def ratings_from_frame(
    frame: pd.DataFrame,
    user_col: str = "userId",
    item_col: str = "movieId",
    rating_col: str = "rating",
    *,
    rating_range: tuple[float, float] | None = None,
    source: str = "DataFrame",
    timestamp_col: str | None = None,
) -> Ratings:
    """A Ratings table from a pandas DataFrame, checked and mapped exactly as :func:`load_csv` does.

    Raises:
      DataError: missing columns, missing ids, ratings that are not finite numbers.
    """
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"expected a pandas DataFrame or a path to a CSV; got {type(frame).__name__}")
    wanted = (user_col, item_col, rating_col) + ((timestamp_col,) if timestamp_col else ())
    problem = column_problem(frame, wanted)
    if problem:
        raise DataError(f"{source}: {problem}. Set data.user_col / data.item_col / data.rating_col "
                        "(data.timestamp_col) to match")
    table = ratings_from_columns(
        frame[user_col], frame[item_col], frame[rating_col], source=source, sha256="",
        rating_range=rating_range, names=(user_col, item_col, rating_col),
    )
    digest = frame_sha256(table.user_ids.raw[table.users], table.item_ids.raw[table.items], table.ratings)
    stamps = timestamps_from(frame[timestamp_col], source, timestamp_col) if timestamp_col else None
    return dataclasses.replace(table, sha256=digest, timestamps=stamps)
