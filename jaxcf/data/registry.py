"""Named MovieLens datasets: where each lives, how it is parsed, and how it is verified.

Bundled datasets ship inside the package (``jaxcf/data/bundled``) with their GroupLens README and a
``SHA256SUMS`` of the original, uncompressed bytes; they are verified on every load and need no
network.

What does not live here: CSV parsing and splitting (``jaxcf.data.ratings``).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from jaxcf.data.ratings import (
    DataError,
    Ratings,
    Split,
    load_csv,
    random_split,
    ratings_from_columns,
)

BUNDLED_DIR = Path(__file__).parent / "bundled"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A ratings table, its split and, when known, item metadata (raw id -> title)."""

    ratings: Ratings
    split: Split
    titles: dict | None = None


def _bundled_sums(folder: Path) -> dict[str, str]:
    sums = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        sums[name] = digest
    return sums


def read_bundled(folder: str, name: str) -> bytes:
    """Returns the original bytes of a bundled file, verified against its SHA256SUMS entry.

    Raises:
      DataError: when the file is missing or its checksum does not match (a damaged install).
    """
    base = BUNDLED_DIR / folder
    path = base / name
    gz = base / f"{name}.gz"
    try:
        payload = gzip.decompress(gz.read_bytes()) if gz.exists() else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"bundled dataset file {folder}/{name} cannot be read ({err}); reinstall jaxcf") from None
    expected = _bundled_sums(base).get(name)
    actual = hashlib.sha256(payload).hexdigest()
    if expected != actual:
        raise DataError(
            f"bundled dataset file {folder}/{name} fails its sha256 check "
            f"(expected {expected}, got {actual}); reinstall jaxcf"
        )
    return payload


def _movie_titles(payload: bytes) -> dict:
    movies = pd.read_csv(io.BytesIO(payload), usecols=["movieId", "title"])
    return dict(zip(movies["movieId"].to_numpy().tolist(), movies["title"].tolist()))


def _ml_latest_small(split: str | None, valid_fraction: float, seed: int, rating_range) -> Dataset:
    payload = read_bundled("ml-latest-small-2016", "ratings.csv")
    frame = pd.read_csv(io.BytesIO(payload), engine="pyarrow", usecols=["userId", "movieId", "rating"])
    ratings = ratings_from_columns(
        frame["userId"].to_numpy(),
        frame["movieId"].to_numpy(),
        frame["rating"].to_numpy(),
        source="ml-latest-small",
        sha256=hashlib.sha256(payload).hexdigest(),
        rating_range=rating_range,
        names=("userId", "movieId", "rating"),
    )
    if split is not None:
        raise DataError(f"data.split={split!r}: ml-latest-small has no predefined splits; use data.split: null")
    titles = _movie_titles(read_bundled("ml-latest-small-2016", "movies.csv"))
    return Dataset(ratings, random_split(len(ratings), valid_fraction, seed), titles)


ML100K_SPLITS = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")


def _ml100k_frame(payload: bytes) -> pd.DataFrame:
    return pd.read_csv(
        io.BytesIO(payload), sep="\t", header=None, names=["user", "item", "rating", "timestamp"]
    )


def _ml_100k(split: str | None, valid_fraction: float, seed: int, rating_range) -> Dataset:
    payload = read_bundled("ml-100k", "u.data")
    frame = _ml100k_frame(payload)
    ratings = ratings_from_columns(
        frame["user"].to_numpy(),
        frame["item"].to_numpy(),
        frame["rating"].to_numpy(),
        source="ml-100k",
        sha256=hashlib.sha256(payload).hexdigest(),
        rating_range=rating_range,
        names=("user", "item", "rating"),
    )
    items = pd.read_csv(
        io.BytesIO(read_bundled("ml-100k", "u.item")), sep="|", header=None, encoding="latin-1",
        usecols=[0, 1], names=["item", "title"],
    )
    titles = dict(zip(items["item"].tolist(), items["title"].tolist()))
    if split is None:
        return Dataset(ratings, random_split(len(ratings), valid_fraction, seed), titles)
    if split not in ML100K_SPLITS:
        raise DataError(f"data.split={split!r}: unknown ml-100k split; choose one of {', '.join(ML100K_SPLITS)}")
    test = _ml100k_frame(read_bundled("ml-100k", f"{split}.test"))
    # ml-100k has no duplicate (user, item) pairs, so a pair identifies a rating; base = u.data - test.
    key = frame["user"].to_numpy() * 10_000 + frame["item"].to_numpy()
    test_key = test["user"].to_numpy() * 10_000 + test["item"].to_numpy()
    mask = np.isin(key, test_key)
    return Dataset(ratings, Split(np.flatnonzero(~mask), np.flatnonzero(mask), name=split), titles)


Loader = Callable[[str | None, float, int, "tuple[float, float] | None"], Dataset]

# Small explicit registry: name -> loader. Downloadable releases are added in the same table.
DATASETS: dict[str, Loader] = {
    "ml-latest-small": _ml_latest_small,
    "ml-100k": _ml_100k,
}


def load(data_config, seed: int) -> Dataset:
    """Loads the dataset a ``DataConfig`` names (``path`` overrides ``name``) and splits it.

    Raises:
      DataError: unknown names, unreadable or invalid files, impossible splits.
    """
    if data_config.path is not None:
        if data_config.split is not None:
            raise DataError("data.split names a predefined split of a registry dataset; it cannot be used with data.path")
        ratings = load_csv(
            data_config.path, data_config.user_col, data_config.item_col, data_config.rating_col,
            rating_range=data_config.rating_range,
        )
        return Dataset(ratings, random_split(len(ratings), data_config.valid_fraction, seed))
    loader = DATASETS.get(data_config.name)
    if loader is None:
        raise DataError(
            f"data.name={data_config.name!r} is not a known dataset; choose one of {', '.join(DATASETS)} "
            "or set data.path to a ratings CSV"
        )
    return loader(data_config.split, data_config.valid_fraction, seed, data_config.rating_range)
