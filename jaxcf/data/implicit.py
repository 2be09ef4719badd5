"""Implicit feedback from ratings: the interactions a recommender learns from, and their split.

The protocol of ``docs/results.md`` (implicit feedback): the interactions are the ratings of at least
``data.implicit_threshold`` (4 stars by default); rating values are not used further (each
interaction is 1). Id maps follow the order of first appearance among the interactions, built before
the split. The split is the notebook's: test = the first ``int(n * 0.2)`` rows of
``numpy.random.RandomState(seed).permutation(n)`` over the ``n`` interaction rows in file order
(``data.valid_fraction``), training = the rest; the held-out part is in the validation role (its
metrics are recorded unprefixed, ``ndcg@20``, and early stopping may watch them). With
``data.leave_last`` = k, each user's k latest interactions by timestamp are held out instead
(``jaxcf.data.splits.leave_last_split``; users with k or fewer keep all of theirs in training). A
predefined split of a dataset (ml-100k's u1-u5) or parts from files keep their membership: the
interactions of a test part are test interactions (recorded as ``test_ndcg@20``, never choosing
anything).

What does not live here: the ranking metrics of the protocol (``jaxcf.core.ranking.implicit_metrics``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from jaxcf.core.errors import DataError
from jaxcf.data.ids import IdMap
from jaxcf.data.ratings import Ratings
from jaxcf.data.registry import Dataset
from jaxcf.data.splits import Split, leave_last_split, random_split


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
    # Each interaction keeps the role its rating had; the test rows stay test. The training and validation
    # rows are split again over the interactions when their split is a rule (random, leave-last-k-out).
    role = np.zeros(len(ratings), np.int8)  # 0 train, 1 valid, 2 test
    role[dataset.split.valid] = 1
    role[dataset.split.test] = 2
    role = role[rows]
    test = np.flatnonzero(role == 2)
    pool = np.flatnonzero(role != 2)
    if leave_last:
        inner = leave_last_split(table.users[pool], None if table.timestamps is None else table.timestamps[pool],
                                 leave_last, ratings.source)
        split = Split(pool[inner.train], pool[inner.valid], inner.name, test)
    elif dataset.split.name in ("random", "all"):
        inner = random_split(len(pool), valid_fraction, seed)
        split = Split(pool[inner.train], pool[inner.valid], inner.name, test)
    else:  # a predefined split, or parts from files: the interactions of each part
        split = Split(np.flatnonzero(role == 0), np.flatnonzero(role == 1), dataset.split.name, test)
        if not len(split.train) or not (len(split.valid) or len(split.test)):
            raise DataError(f"split {split.name}: no interactions on one side at threshold {threshold}")
    trained = np.zeros(table.num_items, bool)
    trained[table.items[split.train]] = True
    for role in ("valid", "test"):
        rows = getattr(split, role)
        if len(rows) and not trained[table.items[rows]].any():
            raise DataError(f"{ratings.source}: none of the held-out ({role}) interactions is with an item that has a "
                            "training interaction, so no user can be scored and every metric would be NaN; use more "
                            "data (more users), or data.valid_fraction: 0 to train on everything")
    return dataclasses.replace(dataset, ratings=table, split=dataclasses.replace(split, name=f"{split.name}-implicit"),
                               implicit_threshold=float(threshold))


def from_config(dataset: Dataset, data_config, seed: int) -> Dataset:
    """:func:`interactions` with a ``DataConfig``'s threshold, fraction and ``leave_last``."""
    return interactions(dataset, data_config.implicit_threshold, data_config.valid_fraction, seed,
                        data_config.leave_last)
