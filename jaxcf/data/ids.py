"""Raw ids exactly as they appear, and their maps to contiguous indices.

An id column is kept as integers only when *every* id in it is written as a canonical integer
(``0``, ``-3``, ``1234``: no sign on zero, no ``+``, no leading zeros, no spaces, no exponent, no
decimal point) that fits int64; otherwise every id is kept as the text it was written as. So ``007``
and ``7`` are two ids, ``10`` and ``10.0`` are two ids, and an id of 2**63 or more never becomes a
float. The same rule reads a CSV, a DataFrame column and a command-line argument, so an id typed on
the command line finds the row it names or none.

What does not live here: reading files (``jaxcf.data.ratings``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# A canonical integer: what int() of it printed back gives exactly.
CANONICAL_INT = r"^(0|-?[1-9][0-9]*)$"
_CANONICAL = re.compile(CANONICAL_INT)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Floats hold every integer exactly up to 2**53; beyond, a float id cannot name one integer.
_FLOAT_EXACT = 2**53


def _texts_to_ids(texts: pa.Array) -> np.ndarray:
    """int64 when every text is a canonical integer within int64; else the texts as Python str."""
    if len(texts) and pc.all(pc.match_substring_regex(texts, CANONICAL_INT)).as_py():
        try:
            return pc.cast(texts, pa.int64()).to_numpy(zero_copy_only=False).astype(np.int64)
        except (pa.ArrowInvalid, OverflowError):
            pass  # a canonical integer beyond int64: keep every id as text
    return np.asarray(texts.to_pylist(), dtype=object)


def canonical_ids(values: Any) -> np.ndarray:
    """One id column as kept: int64[n], or object[n] of str (see the module docstring).

    Args:
      values: a pyarrow array, a pandas Series or a NumPy array of ids, with no missing values.

    Returns:
      int64[n] or object[n] (Python str).
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        if pa.types.is_integer(values.type):
            if pa.types.is_uint64(values.type) and len(values) and pc.max(values).as_py() > INT64_MAX:
                return _texts_to_ids(pc.cast(values, pa.string()))
            return values.to_numpy(zero_copy_only=False).astype(np.int64)
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            return _texts_to_ids(values)
        values = np.asarray(values.to_pylist(), dtype=object)
    array = values.to_numpy() if isinstance(values, pd.Series) else np.asarray(values)
    if array.dtype.kind == "i":
        return array.astype(np.int64)
    if array.dtype.kind == "u":
        if len(array) and int(array.max()) > INT64_MAX:
            return _texts_to_ids(pa.array([str(int(v)) for v in array.tolist()]))
        return array.astype(np.int64)
    if array.dtype.kind == "f":
        integral = np.isfinite(array) & (array == np.round(array)) & (np.abs(array) <= _FLOAT_EXACT)
        if integral.all():
            return array.astype(np.int64)
        return np.asarray([repr(float(v)) for v in array.tolist()], dtype=object)
    if array.dtype.kind == "b":
        return np.asarray([str(bool(v)) for v in array.tolist()], dtype=object)
    texts = [v if isinstance(v, str) else _text_of(v) for v in array.tolist()]
    return _texts_to_ids(pa.array(texts, type=pa.string()))


def _text_of(value: Any) -> str:
    """How a non-text id is written: integers as digits, floats as their shortest repr (``1.0``)."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        # As a float column that is not all integers is kept (repr: 1.0 -> "1.0"), so the id 1.0 of
        # such a column is found by the float 1.0 and by the text "1.0".
        return repr(float(value))
    return str(value)


def _int_key(value: Any) -> int | None:
    """The int64 id a query value names, or None when it names none."""
    if isinstance(value, (bool, np.bool_)) or value is None:
        return None
    if isinstance(value, (int, np.integer)):
        number = int(value)
    elif isinstance(value, (float, np.floating)):
        number_f = float(value)
        if not (np.isfinite(number_f) and number_f.is_integer() and abs(number_f) <= _FLOAT_EXACT):
            return None
        number = int(number_f)
    elif isinstance(value, (str, np.str_)):
        if not _CANONICAL.match(value):
            return None
        number = int(value)
    else:
        return None
    return number if INT64_MIN <= number <= INT64_MAX else None


def _str_key(value: Any) -> str | None:
    """The text id a query value names, or None when it names none."""
    if value is None:
        return None
    if isinstance(value, (str, np.str_)):
        text = str(value)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no id (ids are UTF-8 text) is named by it
            return None
        return text
    if isinstance(value, (int, np.integer, float, np.floating, bool, np.bool_)):
        return _text_of(value)
    return None


def _as_list(raw_ids: Any) -> list:
    if isinstance(raw_ids, (str, bytes)) or not isinstance(raw_ids, (Sequence, np.ndarray, pd.Series, pd.Index)):
        return [raw_ids]
    return list(raw_ids.tolist() if hasattr(raw_ids, "tolist") else raw_ids)


@dataclasses.dataclass(frozen=True)
class IdMap:
    """Raw ids <-> contiguous indices. ``raw[i]`` is the raw id of index ``i``.

    Indices follow the order of first appearance in the file, as the notebook's
    ``{k: i for i, k in enumerate(df[col].unique())}`` does. ``raw`` is int64 or object (str).
    """

    raw: np.ndarray

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def integer(self) -> bool:
        """Whether the ids are integers (else text)."""
        return self.raw.dtype.kind in "iu"

    @functools.cached_property
    def _index(self) -> pd.Index:
        return pd.Index(self.raw)

    def keys(self, raw_ids: Any) -> tuple[list, np.ndarray]:
        """Query values in this map's key domain: (keys, valid bool[n]); invalid keys are None."""
        values = _as_list(raw_ids)
        convert = _int_key if self.integer else _str_key
        keys = [convert(v) for v in values]
        return keys, np.asarray([k is not None for k in keys], bool)

    def lookup(self, raw_ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """Maps raw ids to indices.

        Args:
          raw_ids: a raw id or a sequence of them: integers, or text written as in the file
            (command-line input is text: ``"10"`` finds the integer id 10; ``"1e1"``, ``"010"``
            and ``"10.0"`` find none). Values that cannot name an id (None, 2**70 for integer ids)
            are unknown, not errors.

        Returns:
          (indices int32[n] with -1 where unknown, known bool[n]).
        """
        array = raw_ids if isinstance(raw_ids, np.ndarray) else None
        if array is not None and array.ndim == 1 and self.integer and array.dtype.kind == "i":
            positions = self._index.get_indexer(array.astype(np.int64))
            return positions.astype(np.int32), positions >= 0
        keys, valid = self.keys(raw_ids)
        positions = np.full(len(keys), -1, np.int64)
        if valid.any():
            wanted = [k for k in keys if k is not None]
            query = np.asarray(wanted, np.int64) if self.integer else np.asarray(wanted, dtype=object)
            positions[valid] = self._index.get_indexer(query)
        return positions.astype(np.int32), positions >= 0

    def extend(self, raw_ids: Any) -> tuple[IdMap, np.ndarray]:
        """This map with the unknown ones of ``raw_ids`` appended (in order of first appearance).

        Returns:
          (the new map, int32[n] indices of ``raw_ids`` in it).

        Raises:
          ValueError: for a value that cannot be an id of this map (None, text for integer ids, ...).
        """
        keys, valid = self.keys(raw_ids)
        if not valid.all():
            bad = _as_list(raw_ids)[int(np.argmax(~valid))]
            kind = "integer" if self.integer else "text"
            raise ValueError(f"{bad!r} cannot be an id here: this model's ids are {kind}")
        new = [k for k in dict.fromkeys(keys) if k not in self._index] if keys else []
        dtype = np.int64 if self.integer else object
        merged = IdMap(np.concatenate([self.raw, np.asarray(new, dtype=dtype)])) if new else self
        return merged, merged.lookup(np.asarray(keys, dtype=dtype) if self.integer else keys)[0]
