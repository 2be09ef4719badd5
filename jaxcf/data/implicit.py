"""Implicit feedback from ratings: the interactions a recommender learns from, and their split.

The protocol of ``docs/results.md`` (implicit feedback): the interactions are the ratings of at least
``data.implicit_threshold`` (4 stars by default); rating values are not used further (each
interaction is 1). Id maps follow the order of first appearance among the interactions, built before
the split. The split is the notebook's: test = the first ``int(n * 0.2)`` rows of
``numpy.random.RandomState(seed).permutation(n)`` over the ``n`` interaction rows in file order
(``data.valid_fraction``), training = the rest. A predefined split of a dataset (ml-100k's u1-u5)
keeps its membership instead: the interactions of its test part are the test interactions. With
``data.leave_last`` = k, each user's k latest interactions by timestamp are the test
(``jaxcf.data.splits.leave_last_split``; users with k or fewer keep all of theirs in training).

What does not live here: the ranking metrics of the protocol (``jaxcf.ranking.implicit_metrics``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from jaxcf.data.ids import IdMap
from jaxcf.data.ratings import Ratings
from jaxcf.data.registry import Dataset
from jaxcf.data.splits import Split, leave_last_split, random_split
from jaxcf.errors import DataError


def interactions(dataset: Dataset, threshold: float, valid_fraction: float, seed: int, leave_last: int = 0) -> Dataset:
    """``dataset`` as implicit feedback (see the module docstring).

    Raises:
      DataError: when no rating reaches the threshold, or the split leaves a part empty.
    """
    ratings = dataset.ratings
    keep = ratings.ratings >= threshold
    if not keep.any():
        raise DataError(f"{ratings.source}: no rating is >= data.implicit_threshold {threshold}; lower it")
    rows = np.flatnonzero(keep)
    user_codes, user_rows = pd.factorize(ratings.users[rows])
    item_codes, item_rows = pd.factorize(ratings.items[rows])
    table = Ratings(
        users=user_codes.astype(np.int32), items=item_codes.astype(np.int32),
        ratings=np.ones(len(rows), np.float32),
        user_ids=IdMap(ratings.user_ids.raw[user_rows]), item_ids=IdMap(ratings.item_ids.raw[item_rows]),
        source=ratings.source, sha256=ratings.sha256,
        timestamps=None if ratings.timestamps is None else ratings.timestamps[rows],
    )
    if leave_last:
        split = leave_last_split(table.users, table.timestamps, leave_last, ratings.source)
    elif dataset.split.name == "random":
        split = random_split(len(rows), valid_fraction, seed)
    else:  # a predefined split: the interactions of each part
        in_test = np.zeros(len(ratings), bool)
        in_test[dataset.split.valid] = True
        split = Split(np.flatnonzero(~in_test[rows]), np.flatnonzero(in_test[rows]), name=dataset.split.name)
        if not len(split.train) or not len(split.valid):
            raise DataError(f"split {split.name}: no interactions on one side at threshold {threshold}")
    return dataclasses.replace(dataset, ratings=table, split=dataclasses.replace(split, name=f"{split.name}-implicit"),
                               implicit_threshold=float(threshold))


def from_config(dataset: Dataset, data_config, seed: int) -> Dataset:
    """:func:`interactions` with a ``DataConfig``'s threshold, fraction and ``leave_last``."""
    return interactions(dataset, data_config.implicit_threshold, data_config.valid_fraction, seed,
                        data_config.leave_last)
