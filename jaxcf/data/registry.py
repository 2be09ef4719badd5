"""Named MovieLens datasets: where each lives, how it is parsed, and how it is verified.

- ``ml-latest-small`` (default): bundled, the October 2016 release the notebook uses; CSV.
- ``ml-100k``: bundled; tab-separated ``u.data``, latin-1 ``u.item``; ``data.split`` may name an
  official split (u1-u5, ua, ub) instead of the random one.
- ``ml-latest-small-2018``: downloaded; the September 2018 release; CSV.
- ``ml-1m``: downloaded; ``::``-separated ``ratings.dat``, latin-1 ``movies.dat``.
- ``ml-10m``: downloaded; ``::``-separated ``ratings.dat``, UTF-8 ``movies.dat``.
- ``ml-20m``, ``ml-25m``: downloaded; CSV.

Bundled datasets ship inside the package (``jaxcf/data/bundled``) with their GroupLens README and a
``SHA256SUMS`` of the original, uncompressed bytes; they are verified on every load and need no
network. The others are downloaded from GroupLens on first use into the cache
(``jaxcf.data.download``), checked against the archive sizes and sha256 digests in
:data:`ARCHIVES`. ml-32m is not offered: no sourced checksum for its archive was found.

One concept at some length: the named datasets, where each lives and how each is read and verified.

What does not live here: CSV parsing and splitting (``jaxcf.data.ratings``), downloading and
extraction (``jaxcf.data.download``).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from jaxcf.core.errors import DataError
from jaxcf.data import download
from jaxcf.data.download import Archive
from jaxcf.data.files import from_parts, train_split
from jaxcf.data.ratings import (
    Ratings,
    file_sha256,
    load_csv,
    ratings_from_columns,
    read_table,
    timestamps_from,
)
from jaxcf.data.splits import Split, holdout_split, random_split

BUNDLED_DIR = Path(__file__).parent / "bundled"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A ratings table, its split (training, validation and test rows) and, when known, item metadata
    (raw id -> title)."""

    ratings: Ratings
    split: Split
    titles: dict | None = None
    # Set when the table holds implicit-feedback interactions (jaxcf.data.implicit), to this threshold.
    implicit_threshold: float | None = None

    def fingerprint(self) -> dict:
        """What identifies the data a run trains on (a resumed run must find the same)."""
        ratings = self.ratings
        return {
            "source": ratings.source,
            "sha256": ratings.sha256,
            "num_ratings": len(ratings),
            "num_users": ratings.num_users,
            "num_items": ratings.num_items,
            "split": self.split.name,
            "num_train": len(self.split.train),
            "num_valid": len(self.split.valid),
            "num_test": len(self.split.test),
            "implicit_threshold": self.implicit_threshold,
        }


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
    frame = pd.read_csv(io.BytesIO(payload), engine="pyarrow", usecols=["userId", "movieId", "rating", "timestamp"])
    ratings = ratings_from_columns(
        frame["userId"].to_numpy(),
        frame["movieId"].to_numpy(),
        frame["rating"].to_numpy(),
        source="ml-latest-small",
        sha256=hashlib.sha256(payload).hexdigest(),
        rating_range=rating_range,
        names=("userId", "movieId", "rating"),
    )
    ratings = dataclasses.replace(ratings, timestamps=frame["timestamp"].to_numpy(np.int64))
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
    ratings = dataclasses.replace(ratings, timestamps=frame["timestamp"].to_numpy(np.int64))
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
    # The fold's .test part is a test set: scored and recorded as test_*, never used to choose anything.
    return Dataset(ratings, Split(np.flatnonzero(~mask), np.zeros(0, np.int64), name=split,
                                  test=np.flatnonzero(mask)), titles)


def bundled_frame(name: str = "ml-latest-small") -> pd.DataFrame:
    """A bundled dataset's ratings as a DataFrame, columns ``userId, movieId, rating, timestamp`` (the
    config defaults' names, so ``jaxcf.fit(jaxcf.ratings_frame())`` needs no column settings), in file
    order, checksum verified. Public as ``jaxcf.ratings_frame``.

    Args:
      name: ``ml-latest-small`` (the notebook's October 2016 release) or ``ml-100k`` (``u.data``).

    Raises:
      DataError: another name (the downloaded datasets are read by ``data.name``), or a damaged install.
    """
    if name == "ml-latest-small":
        payload = read_bundled("ml-latest-small-2016", "ratings.csv")
        return pd.read_csv(io.BytesIO(payload), engine="pyarrow", usecols=["userId", "movieId", "rating", "timestamp"])
    if name == "ml-100k":
        frame = _ml100k_frame(read_bundled("ml-100k", "u.data"))
        return frame.rename(columns={"user": "userId", "item": "movieId"})
    raise DataError(f"no bundled dataset {name!r}: choose ml-latest-small or ml-100k "
                    "(the others are downloaded by data.name)")


# ------------------------------------------------------------------------------ downloaded

# Official GroupLens archives. Sizes and sha256 digests of ml-latest-small (2018), ml-1m, ml-20m and
# ml-25m: tensorflow/datasets @ 1c076ac3c19c8ea83e1d1a75e0623c9a699e0d7c :
# tensorflow_datasets/url_checksums/movielens.txt (see shared/data/PROVENANCE.md). ml-10m: sha256
# from ISG-Siegen/OmniRec @ e498cceb6be13e3d287f0777355929645fc5871c :
# src/omnirec/data_loaders/movielens_small.py (its digests for ml-1m, ml-20m, ml-25m and
# ml-latest-small equal tensorflow/datasets'); the size, 65566137 bytes, is the one an independent
# public download record gives with that same digest (that record also lists the MD5 that GroupLens
# publishes as ml-10m.zip.md5 and many projects check, ce571fd55effeba0271552578f2648bd).
ARCHIVES: dict[str, Archive] = {
    "ml-latest-small-2018": Archive(
        "ml-latest-small-2018", "ml-latest-small.zip", "ml-latest-small", 978202,
        "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
    ),
    "ml-1m": Archive(
        "ml-1m", "ml-1m.zip", "ml-1m", 5917549, "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"
    ),
    "ml-10m": Archive(
        "ml-10m", "ml-10m.zip", "ml-10M100K", 65566137,
        "813c411ccb6122564edfe752e7f80c4dcc5aa25fa94c93622f6877a7ba252862",
    ),
    "ml-20m": Archive(
        "ml-20m", "ml-20m.zip", "ml-20m", 198702078, "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3"
    ),
    "ml-25m": Archive(
        "ml-25m", "ml-25m.zip", "ml-25m", 261978986, "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa"
    ),
}


def _no_split(name: str, split: str | None) -> None:
    if split is not None:
        raise DataError(f"data.split={split!r}: {name} has no predefined splits; use data.split: null")


def _required(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise DataError(
            f"{path}: missing from the extracted archive; delete {folder} (and its .zip) to fetch it again"
        )
    return path


def _dat_titles(path: Path, encoding: str) -> dict:
    """``MovieID::Title::Genres`` lines; titles may contain ':' but never '::'."""
    payload = path.read_bytes()
    try:
        text = payload.decode(encoding)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid {encoding} text; delete the extracted folder to fetch it again") from None
    titles = {}
    for line in text.splitlines():
        fields = line.split("::", 2)
        if len(fields) >= 2 and fields[0].strip().isdigit():
            titles[int(fields[0])] = fields[1]
    return titles


def _csv_titles(path: Path) -> dict:
    movies = pd.read_csv(path, usecols=["movieId", "title"], encoding="utf-8")
    return dict(zip(movies["movieId"].to_numpy().tolist(), movies["title"].tolist()))


def _downloaded_csv(name: str, split, valid_fraction: float, seed: int, rating_range) -> Dataset:
    """The ml-latest-small (2018) / ml-20m / ml-25m layout: ``ratings.csv`` and ``movies.csv``."""
    _no_split(name, split)
    folder = download.fetch(ARCHIVES[name])
    ratings_path = _required(folder, "ratings.csv")
    ratings = load_csv(ratings_path, rating_range=rating_range, source=name, timestamp_col="timestamp")
    titles = _csv_titles(_required(folder, "movies.csv"))
    return Dataset(ratings, random_split(len(ratings), valid_fraction, seed), titles)


# ``UserID::MovieID::Rating::Timestamp``: pyarrow's reader takes one-character delimiters, so the
# line is split on ':' and the empty fields between the two colons are ignored.
DAT_COLUMNS = ("user", "_1", "item", "_3", "rating", "_5", "timestamp")


def _downloaded_dat(name: str, movies_encoding: str, split, valid_fraction: float, seed: int, rating_range) -> Dataset:
    """The ml-1m / ml-10m layout: ``ratings.dat`` and ``movies.dat``, ``::``-separated."""
    _no_split(name, split)
    folder = download.fetch(ARCHIVES[name])
    ratings_path = _required(folder, "ratings.dat")
    table = read_table(ratings_path, ["user", "item", "rating", "timestamp"], delimiter=":", header=False,
                       names=DAT_COLUMNS)
    ratings = ratings_from_columns(
        table.column("user").to_numpy(),
        table.column("item").to_numpy(),
        table.column("rating").to_numpy(),
        source=name,
        sha256=file_sha256(ratings_path),
        rating_range=rating_range,
        names=("UserID", "MovieID", "Rating"),
    )
    ratings = dataclasses.replace(ratings, timestamps=timestamps_from(table.column("timestamp"), name, "Timestamp"))
    titles = _dat_titles(_required(folder, "movies.dat"), movies_encoding)
    return Dataset(ratings, random_split(len(ratings), valid_fraction, seed), titles)


Loader = Callable[[str | None, float, int, "tuple[float, float] | None"], Dataset]

# Small explicit registry: name -> loader.
DATASETS: dict[str, Loader] = {
    "ml-latest-small": _ml_latest_small,
    "ml-100k": _ml_100k,
    "ml-latest-small-2018": functools.partial(_downloaded_csv, "ml-latest-small-2018"),
    "ml-1m": functools.partial(_downloaded_dat, "ml-1m", "latin-1"),
    "ml-10m": functools.partial(_downloaded_dat, "ml-10m", "utf-8"),
    "ml-20m": functools.partial(_downloaded_csv, "ml-20m"),
    "ml-25m": functools.partial(_downloaded_csv, "ml-25m"),
}


def from_frame(frame, data_config, seed: int, *, valid=None, test=None, timestamps: bool = False) -> Dataset:
    """A Dataset from a pandas DataFrame (or a CSV path: the training part), with optional validation and test parts
    (DataFrames or CSV paths; by default ``data.valid_path`` and ``data.test_path``): the config's column
    names and checks (``jaxcf.data.files``).

    Raises:
      DataError: as for a CSV file.
    """
    if data_config.split is not None:
        raise DataError("data.split names a predefined split of a registry dataset; it cannot be used with a DataFrame")
    valid = valid if valid is not None else data_config.valid_path
    test = test if test is not None else data_config.test_path
    ratings, split = from_parts(frame, valid, test, data_config, seed, timestamps)
    return Dataset(ratings, split)


def _leave_last(dataset: Dataset, data_config) -> Dataset:
    """The dataset with ``data.leave_last``'s split of its training rows when it is set (its test rows stay)."""
    if not data_config.leave_last:
        return dataset
    ratings, split = dataset.ratings, dataset.split
    rows = np.sort(np.concatenate([split.train, split.valid]))
    chosen = train_split(ratings.users, ratings.timestamps, rows, data_config, 0, ratings.source)
    return dataclasses.replace(dataset, split=dataclasses.replace(chosen, test=split.test))


def holdout(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """The dataset with its validation rows replaced by a random ``fraction`` of its training rows
    (``jaxcf.data.splits.holdout_split``)."""
    return dataclasses.replace(dataset, split=holdout_split(dataset.split, fraction, seed))


def load(data_config, seed: int, timestamps: bool = False) -> Dataset:
    """Loads the dataset a ``DataConfig`` names (``path`` overrides ``name``) and splits it.

    With ``data.path``, ``data.valid_path`` and ``data.test_path`` give the validation and test parts
    (``jaxcf.data.files``); ``timestamps`` reads their ``data.timestamp_col`` too (the named datasets always
    have times). Downloadable datasets are fetched into the cache on first use (``jaxcf.data.download``).

    Raises:
      DataError: unknown names, unreadable or invalid files, impossible splits, failed downloads.
    """
    if data_config.path is not None:
        if data_config.split is not None:
            raise DataError(
                "data.split names a predefined split of a registry dataset; it cannot be used with data.path"
            )
        ratings, split = from_parts(data_config.path, data_config.valid_path, data_config.test_path, data_config,
                                    seed, timestamps)
        return Dataset(ratings, split)
    if data_config.valid_path is not None or data_config.test_path is not None:
        raise DataError("data.valid_path and data.test_path go with your own training file: set data.path to it "
                        f"(data.name {data_config.name!r} is a bundled or downloaded dataset)")
    loader = DATASETS.get(data_config.name)
    if loader is None:
        raise DataError(
            f"data.name={data_config.name!r} is not a known dataset; choose one of {', '.join(DATASETS)} "
            "or set data.path to a ratings CSV"
        )
    return _leave_last(loader(data_config.split, data_config.valid_fraction, seed, data_config.rating_range),
                       data_config)
