"""The strong-generalisation protocol: users held out of training entirely, folded in from part of their
ratings, and scored on the rest, beside the two answers without fold-in.

For a config and a dataset:

1. Held-out users: the first ``held_fraction`` of ``RandomState(seed + 7).permutation`` over the users
   with at least 2 ratings. Each one's ratings, in file order, are split by
   ``RandomState(seed + 11)``: a random ``history_fraction`` of them (at least one) is their history,
   the rest (at least one) their targets.
2. The base model is trained on every other user's ratings (the config's own random split of those
   rows into training and validation); the held-out users are unknown to it.
3. Three answers for the targets, each scored with RMSE, MAE and ranking metrics:
   ``fallback`` (the base model's flagged answer for unknown users), ``fold_in`` (the base model with
   the histories folded in: ``Model.fold_in``), and ``joint`` (a model trained with the histories
   among its training rows, the same split otherwise: retraining, the upper bound fold-in aims at).
   Ranking: for each held-out user with a target of at least ``threshold`` stars, every item the
   model knows minus the user's history items, ranked; precision/recall/NDCG@k as ``jaxcf.core.ranking``.

``choose_prior_scale`` picks fold-in's regularisation on the *training* users only: the same protocol
run inside the base model's rows, so the reported held-out users never inform the choice.

Implicit-feedback models (``run_implicit``): the same users and rows over the interactions; the three
answers are scored with the implicit protocol's metrics (``jaxcf.core.ranking.implicit_metrics``): a held-out
user's candidates are the items with a training interaction in the base model, minus their history;
relevant are their target items among them. The fallback answer ranks by popularity (the cold start).

What does not live here: fold-in itself (``jaxcf.core.foldin``), the CLI (``python -m jaxcf.crossval --protocol
strong``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd

from jaxcf.core import metrics, ranking
from jaxcf.core.errors import DataError
from jaxcf.data import Dataset, Split, random_split
from jaxcf.data.ratings import ratings_from_frame
from jaxcf.serving.inference import Model
from jaxcf.training import api

KS = (5, 10, 20)
THRESHOLD = 4.0


@dataclasses.dataclass(frozen=True)
class Held:
    """Which rows are whose: ``train`` rows of the other users, and the held-out users' ``history`` and
    ``targets`` rows (indices into the dataset's table)."""

    users: np.ndarray
    train: np.ndarray
    history: np.ndarray
    targets: np.ndarray


def hold_out(dataset: Dataset, held_fraction: float, history_fraction: float, seed: int) -> Held:
    """The protocol's users and rows (see the module docstring).

    Raises:
      DataError: when too few users have two ratings.
    """
    ratings = dataset.ratings
    counts = np.bincount(ratings.users, minlength=ratings.num_users)
    eligible = np.flatnonzero(counts >= 2)
    size = int(len(eligible) * held_fraction)
    if size < 1 or size >= len(eligible):
        raise DataError(f"--held-users {held_fraction}: must leave some of the {len(eligible)} users with two or "
                        "more ratings on each side")
    users = np.sort(eligible[np.random.RandomState(seed + 7).permutation(len(eligible))[:size]])
    is_held = np.isin(ratings.users, users)
    history, targets = [], []
    rng = np.random.RandomState(seed + 11)
    for user in users.tolist():
        rows = np.flatnonzero(ratings.users == user)
        keep = min(len(rows) - 1, max(1, int(round(len(rows) * history_fraction))))
        chosen = np.zeros(len(rows), bool)
        chosen[rng.permutation(len(rows))[:keep]] = True
        history.append(rows[chosen])
        targets.append(rows[~chosen])
    return Held(users, np.flatnonzero(~is_held), np.sort(np.concatenate(history)), np.sort(np.concatenate(targets)))


def _frame(dataset: Dataset, rows: np.ndarray, cols: Sequence[str]) -> pd.DataFrame:
    r = dataset.ratings
    return pd.DataFrame({cols[0]: r.user_ids.raw[r.users[rows]], cols[1]: r.item_ids.raw[r.items[rows]],
                         cols[2]: r.ratings[rows]})


def _dataset(frame: pd.DataFrame, config, extra_train: int = 0, implicit: float | None = None) -> Dataset:
    """A Dataset of ``frame``: the config's random split of its first rows, and its last ``extra_train`` rows
    always in training (``implicit``: the interactions' threshold, for implicit-feedback rows)."""
    data = config.data
    table = ratings_from_frame(frame, data.user_col, data.item_col, data.rating_col)
    base = len(frame) - extra_train
    split = random_split(base, data.valid_fraction, config.seed)
    train = np.concatenate([split.train, np.arange(base, len(frame))])
    return Dataset(table, Split(train, split.valid, name="strong"), None, implicit_threshold=implicit)


def score(model: Model, targets: pd.DataFrame, history: pd.DataFrame, cols: Sequence[str]) -> dict:
    """RMSE, MAE and ranking metrics of ``model`` on the held-out users' targets."""
    user_col, item_col, rating_col = cols
    predictions = model.predict(targets[user_col].tolist(), targets[item_col].tolist())
    values = targets[rating_col].to_numpy(np.float64)
    result = metrics.regression_metrics(predictions.ratings, values, prefix="")
    result["fallback_share"] = float(np.mean(predictions.fallback))
    kmax = max(KS)
    seen = history.groupby(user_col)[item_col].apply(set).to_dict()
    relevant = targets[targets[rating_col] >= THRESHOLD].groupby(user_col)[item_col].apply(set).to_dict()
    users = sorted(relevant, key=str)
    lists = model.recommend_many(users, k=kmax + max((len(seen.get(u, ())) for u in users), default=0))
    discounts = 1.0 / np.log2(np.arange(2, kmax + 2))
    sums = {f"{name}@{k}": 0.0 for k in KS for name in ("precision", "recall", "ndcg")}
    for user, answer in zip(users, lists):
        ranked = [i for i in answer.ids.tolist() if i not in seen.get(user, set())][:kmax]
        hits = np.asarray([i in relevant[user] for i in ranked] + [False] * (kmax - len(ranked)), float)
        for k in KS:
            ideal = np.sum(discounts[: min(k, len(relevant[user]))])
            sums[f"precision@{k}"] += hits[:k].sum() / k
            sums[f"recall@{k}"] += hits[:k].sum() / len(relevant[user])
            sums[f"ndcg@{k}"] += float(np.sum(hits[:k] * discounts[:k]) / ideal)
    result.update({name: total / max(1, len(users)) for name, total in sums.items()})
    result["ranking_users"] = len(users)
    return result


def run(config, dataset: Dataset, *, held_fraction: float = 0.1, history_fraction: float = 0.8,
        prior_scale: float | None = None, joint: bool = True) -> dict:
    """The protocol on ``dataset`` (see the module docstring); returns every figure as plain data."""
    cols = (config.data.user_col, config.data.item_col, config.data.rating_col)
    held = hold_out(dataset, held_fraction, history_fraction, config.seed)
    train_frame, history, targets = (_frame(dataset, rows, cols) for rows in (held.train, held.history, held.targets))
    result = {"held_users": len(held.users), "history_ratings": len(held.history),
              "target_ratings": len(held.targets), "train_ratings": len(held.train), "prior_scale": prior_scale}
    with open(os.devnull, "w") as silent:
        start = time.perf_counter()
        base = Model(api.run(config, _dataset(train_frame, config), quiet=True, out=silent).export())
        result["base_seconds"] = time.perf_counter() - start
        result["fallback"] = score(base, targets, history, cols)
        start = time.perf_counter()
        folded = base.fold_in(history, user_col=cols[0], item_col=cols[1], rating_col=cols[2],
                              prior_scale=prior_scale)
        result["fold_in_seconds"] = time.perf_counter() - start
        result["prior_scale"] = folded.fold_in_report.prior_scale
        known = folded.lookup_users(dataset.ratings.user_ids.raw[held.users].tolist())[1]
        result["unknown_after_fold_in"] = int((~known).sum())
        result["fold_in"] = score(folded, targets, history, cols)
        if joint:
            start = time.perf_counter()
            frame = pd.concat([train_frame, history], ignore_index=True)
            trained = api.run(config, _dataset(frame, config, len(history)), quiet=True, out=silent)
            result["joint_seconds"] = time.perf_counter() - start
            result["joint"] = score(Model(trained.export()), targets, history, cols)
    return result


def choose_prior_scale(config, dataset: Dataset, scales: Sequence[float], *, held_fraction: float = 0.1,
                       history_fraction: float = 0.8) -> tuple[float, dict]:
    """The prior scale with the lowest fold-in RMSE on held-out users drawn from the *training* users only.

    Returns:
      (the chosen scale, {scale: fold-in RMSE}).
    """
    held = hold_out(dataset, held_fraction, history_fraction, config.seed)
    inner = _frame(dataset, held.train, (config.data.user_col, config.data.item_col, config.data.rating_col))
    inner_dataset = _dataset(inner, config)
    inner_config = dataclasses.replace(config, seed=config.seed + 1)  # other users and rows than the outer draw
    cols = (config.data.user_col, config.data.item_col, config.data.rating_col)
    inner_held = hold_out(inner_dataset, held_fraction, history_fraction, inner_config.seed)
    train_frame, history, targets = (_frame(inner_dataset, rows, cols)
                                     for rows in (inner_held.train, inner_held.history, inner_held.targets))
    with open(os.devnull, "w") as silent:
        base = Model(api.run(inner_config, _dataset(train_frame, inner_config), quiet=True, out=silent).export())
    figures = {}
    for scale in scales:
        folded = base.fold_in(history, user_col=cols[0], item_col=cols[1], rating_col=cols[2], prior_scale=scale)
        predictions = folded.predict(targets[cols[0]].tolist(), targets[cols[1]].tolist()).ratings
        figures[float(scale)] = math.sqrt(metrics.mse(predictions, targets[cols[2]].to_numpy()))
    return min(figures, key=figures.get), figures


def score_implicit(model: Model, answer: str, users: list, history: pd.DataFrame, targets: pd.DataFrame,
                   candidates: np.ndarray, cols: Sequence[str]) -> dict:
    """The implicit protocol's metrics of one answer for the held-out ``users`` (see the module docstring).

    Args:
      answer: ``"fallback"`` (rank by training interactions per item) or a model that knows the users.
      candidates: raw ids of the items with a training interaction in the base model.
    """
    position = {user: n for n, user in enumerate(users)}

    def pairs(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        items, known = model.lookup_items(frame[cols[1]].tolist())
        return (np.asarray([position[u] for u in frame[cols[0]].tolist()], np.int64)[known], items[known])

    known_items = np.isin(model.item_ids.raw, candidates)
    if answer == "fallback":
        popularity = np.asarray(model.item_counts, np.float32)

        def score_fn(block):
            return np.tile(popularity, (len(block), 1))
    else:
        raw = np.asarray(users, dtype=object)

        def score_fn(block):
            return model.scores(raw[np.asarray(block)].tolist())
    return ranking.implicit_metrics(score_fn, model.num_items, *pairs(history), *pairs(targets), known=known_items)


def run_implicit(config, dataset: Dataset, *, held_fraction: float = 0.1, history_fraction: float = 0.8,
                 joint: bool = True) -> dict:
    """The protocol for an implicit-feedback model on the interactions ``dataset`` (its split is not used)."""
    cols = (config.data.user_col, config.data.item_col, config.data.rating_col)
    held = hold_out(dataset, held_fraction, history_fraction, config.seed)
    train_frame, history, targets = (_frame(dataset, rows, cols) for rows in (held.train, held.history, held.targets))
    users = sorted(set(dataset.ratings.user_ids.raw[held.users].tolist()), key=str)
    result = {"held_users": len(held.users), "history_interactions": len(held.history),
              "target_interactions": len(held.targets), "train_interactions": len(held.train)}
    threshold = dataset.implicit_threshold
    with open(os.devnull, "w") as silent:
        start = time.perf_counter()
        fitted = api.run(config, _dataset(train_frame, config, implicit=threshold), quiet=True, out=silent)
        base = Model(fitted.export())
        result["base_seconds"] = time.perf_counter() - start
        candidates = base.item_ids.raw[np.asarray(base.item_counts) > 0]
        result["fallback"] = score_implicit(base, "fallback", users, history, targets, candidates, cols)
        start = time.perf_counter()
        interactions = history.assign(**{cols[2]: threshold})  # every history row is an interaction
        folded = base.fold_in(interactions, user_col=cols[0], item_col=cols[1], rating_col=cols[2])
        result["fold_in_seconds"] = time.perf_counter() - start
        result["fold_in"] = score_implicit(folded, "model", users, history, targets, candidates, cols)
        if joint:
            start = time.perf_counter()
            frame = pd.concat([train_frame, history], ignore_index=True)
            trained = api.run(config, _dataset(frame, config, len(history), threshold), quiet=True, out=silent)
            result["joint_seconds"] = time.perf_counter() - start
            result["joint"] = score_implicit(Model(trained.export()), "model", users, history, targets, candidates,
                                             cols)
    return result
