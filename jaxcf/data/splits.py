"""Which rows train, which validate and which test: the notebook's random split, leave-last-k-out, and a
holdout of the training rows.

Three roles. **Training** rows fit the model. **Validation** rows are scored after every epoch and may
choose things (early stopping's epoch, hyper-parameters). **Test** rows are scored and recorded
(``test_*``) but never choose anything. Any part may be empty but training.

What does not live here: reading tables (``jaxcf.data.ratings``), predefined splits of a named
dataset (``jaxcf.data.registry``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxcf.core.errors import DataError


@dataclasses.dataclass(frozen=True)
class Split:
    """Row indices (into a Ratings table) of the training, validation and test parts, in file order."""

    train: np.ndarray
    valid: np.ndarray
    name: str = "random"
    test: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))


def random_split(num_ratings: int, valid_fraction: float, seed: int) -> Split:
    """The notebook's 80/20 split, seeded as the notebook meant.

    Validation is the first ``int(n * valid_fraction)`` entries of
    ``np.random.RandomState(seed).permutation(n)``. Both parts keep file order, as the notebook's
    boolean ``mask`` does. (The notebook wrote ``np.random.seed = 42``, which assigns to the
    attribute instead of calling it, so its own split was unseeded.) ``valid_fraction`` 0 trains on
    every row and validates nothing.

    Raises:
      DataError: when the training part, or a validation part that was asked for, would be empty.
    """
    if valid_fraction == 0:
        if num_ratings < 1:
            raise DataError("no ratings to train on")
        return Split(train=np.arange(num_ratings), valid=np.zeros(0, np.int64), name="all")
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


def holdout_split(split: Split, fraction: float, seed: int) -> Split:
    """``split`` with its validation rows replaced by a random ``fraction`` of its training rows.

    The real validation and test rows are dropped entirely, so choices made on this split never see them.

    Raises:
      DataError: when the fraction leaves either part empty.
    """
    train_rows = split.train
    size = int(len(train_rows) * fraction)
    if not 0 < fraction < 1 or size < 1 or size >= len(train_rows):
        raise DataError(f"--holdout {fraction}: must leave a non-empty part of the {len(train_rows)} training rows")
    # A stream of its own (seed + 1000003), so the inner split is not the outer split's permutation.
    permutation = np.random.RandomState(seed + 1_000_003).permutation(len(train_rows))
    inner = np.sort(train_rows[permutation[size:]])
    held = np.sort(train_rows[permutation[:size]])
    return Split(inner, held, name=f"{split.name}-holdout{fraction:g}")


def with_test(split: Split, test: np.ndarray) -> Split:
    """``split`` with ``test`` as its test rows."""
    return dataclasses.replace(split, test=np.asarray(test, np.int64))


def subset(split: Split, rows: np.ndarray) -> Split:
    """The split restricted to a subset of the table's rows (``rows``, ascending), renumbered: row
    ``rows[k]`` becomes ``k``; each part keeps the rows it had."""
    position = np.full(int(rows.max()) + 1 if len(rows) else 0, -1, np.int64)
    position[rows] = np.arange(len(rows))

    def part(indices: np.ndarray) -> np.ndarray:
        indices = indices[indices < len(position)]
        mapped = position[indices]
        return mapped[mapped >= 0]

    return Split(part(split.train), part(split.valid), split.name, part(split.test))


def leave_last_split(users: np.ndarray, timestamps: np.ndarray | None, k: int, source: str = "the data") -> Split:
    """Leave-last-k-out: each user's ``k`` latest ratings by timestamp validate, the rest train.

    Ties in time go to the later row of the file. Users with ``k`` or fewer ratings keep all of them
    in training (they have no history to learn from otherwise). Both parts keep file order.

    Raises:
      DataError: no timestamps, or no user with more than ``k`` ratings.
    """
    if timestamps is None:
        raise DataError(f"{source}: has no timestamps; data.leave_last needs a timestamp column (data.timestamp_col)")
    users = np.asarray(users)
    rows = np.arange(len(users))
    order = np.lexsort((rows, timestamps, users))  # by user, then time, then file row
    sorted_users = users[order]
    counts = np.bincount(users)
    ends = np.cumsum(counts)[sorted_users]  # one past each row's user's last sorted position
    from_end = ends - np.arange(len(users))  # 1 for a user's latest rating
    chosen = (from_end <= k) & (counts[sorted_users] > k)
    if not chosen.any():
        raise DataError(f"data.leave_last={k}: no user of {source} has more than {k} ratings; lower it")
    mask = np.zeros(len(users), bool)
    mask[order[chosen]] = True
    return Split(train=np.flatnonzero(~mask), valid=np.flatnonzero(mask), name=f"last-{k}")
