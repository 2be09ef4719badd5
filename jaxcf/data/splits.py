"""Which rows train and which validate: the notebook's random split, and a holdout of the training rows.

What does not live here: reading tables (``jaxcf.data.ratings``), predefined splits of a named
dataset (``jaxcf.data.registry``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxcf.errors import DataError


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


def holdout_split(split: Split, fraction: float, seed: int) -> Split:
    """``split`` with its validation rows replaced by a random ``fraction`` of its training rows.

    The real validation rows are dropped entirely, so choices made on this split never see them.

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
