"""Metrics as pure functions, predictions for any number of (user, item) pairs (the one copy), what a model
answers for them (:class:`Answers`), and the metrics of a model on the parts of a split.

What the rating metrics measure. ``valid_rmse`` / ``valid_mae`` (``test_*`` for the test part) are over
every evaluated pair, each answered exactly as ``Model.predict`` answers it: the model's prediction
where both ids were trained, the flagged fallback of ``jaxcf.core.fallback`` elsewhere (an id that has a
table row but no training rating included). That is the figure a user gets, and the one every
accuracy figure of this project refers to. Beside it: ``valid_rmse_known`` / ``valid_mae_known`` over
the pairs whose two ids were trained, the counts ``valid_rows`` and ``valid_rows_known``, and the
notebook's own way, every pair scored from its table rows whether trained or not,
``valid_mse_rows`` / ``valid_rmse_rows`` (what the PyTorch parity suite compares).

One concept at some length: what a model answers for pairs and how those answers are scored.

What does not live here: the scoring rule (``jaxcf.core.models``), the fallback policy (``jaxcf.core.fallback``),
the ranking protocol (``jaxcf.core.ranking``), raw-id lookups (``jaxcf.serving.inference``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jaxcf.core import fallback, ranking
from jaxcf.core.models import ITEM_TABLES, USER_TABLES
from jaxcf.core.scoring import predict_pairs

# Pairs per device call when answering (Model.predict, evaluate, the closing metrics): one chunk size
# for all of them, so the same pairs get the same float32 answers on every route.
PREDICT_CHUNK = 65536
SCORING_TABLES = (*USER_TABLES, *ITEM_TABLES)
# The parts of a split that are scored, and the prefix of their metrics.
PARTS = (("valid", "valid_"), ("test", "test_"))


def regression_metrics(predictions: np.ndarray, targets: np.ndarray, prefix: str = "valid_") -> dict[str, float]:
    """MSE, RMSE and MAE in float64, keyed ``valid_mse`` etc."""
    value = mse(predictions, targets)
    return {f"{prefix}mse": value, f"{prefix}rmse": math.sqrt(value), f"{prefix}mae": mae(predictions, targets)}


def rating_metrics(answers: np.ndarray, targets: np.ndarray, known: np.ndarray, prefix: str = "valid_") -> dict:
    """The metrics of answered pairs (see the module docstring): MSE, RMSE and MAE over every pair, RMSE
    and MAE over the known ones, and both counts. Known-pair figures are NaN when no pair is known."""
    out = regression_metrics(answers, targets, prefix)
    out[f"{prefix}rows"] = int(len(targets))
    out[f"{prefix}rows_known"] = int(np.sum(known))
    if np.any(known):
        out[f"{prefix}rmse_known"] = rmse(answers[known], targets[known])
        out[f"{prefix}mae_known"] = mae(answers[known], targets[known])
    else:
        out[f"{prefix}rmse_known"] = out[f"{prefix}mae_known"] = math.nan
    return out


def rows_metrics(predictions: np.ndarray, targets: np.ndarray, prefix: str = "valid_") -> dict:
    """The notebook's way: every pair scored from its table rows, trained or not (``*_mse_rows``,
    ``*_rmse_rows``)."""
    value = mse(predictions, targets)
    return {f"{prefix}mse_rows": value, f"{prefix}rmse_rows": math.sqrt(value)}


def mse(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Mean squared error over all ratings, accumulated in float64."""
    diff = predictions.astype(np.float64) - targets.astype(np.float64)
    return float(np.mean(diff * diff))


def rmse(predictions: np.ndarray, targets: np.ndarray) -> float:
    return math.sqrt(mse(predictions, targets))


def mae(predictions: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean(np.abs(predictions.astype(np.float64) - targets.astype(np.float64))))


def batch_mean_mse(predictions: np.ndarray, targets: np.ndarray, batch_size: int = 128) -> float:
    """The notebook's validation figure: the mean of per-batch MSEs over batches of 128.

    It weights the last, smaller batch like a full one, so it differs slightly from :func:`mse`.
    """
    diff = predictions.astype(np.float64) - targets.astype(np.float64)
    sq = diff * diff
    means = [sq[i : i + batch_size].mean() for i in range(0, len(sq), batch_size)]
    return float(np.mean(means))


def debiased_ema(
    avg_loss: float, batch_num: int, losses: np.ndarray, momentum: float = 0.98
) -> tuple[float, int, float]:
    """The notebook's smoothed training loss, continued over one epoch's batch losses.

    ``avg = avg * m + loss * (1 - m)`` per batch, debiased by ``1 - m ** batch_num``; the running
    ``batch_num`` counts batches over all epochs, as in the notebook. Computed on the host in
    float64, as the notebook's Python floats are.

    Returns:
      (avg_loss, batch_num, debiased loss).
    """
    for loss in np.asarray(losses, dtype=np.float64).tolist():
        batch_num += 1
        avg_loss = avg_loss * momentum + loss * (1 - momentum)
    return avg_loss, batch_num, avg_loss / (1 - momentum**batch_num)


class Answers:
    """What a rating model answers for index pairs (``Model.predict``'s rule, the one copy).

    Args:
      params: the model's tables (an ensemble's stacked; tables other than ``jaxcf.core.models``'s are left out).
      y_range: the biased model's output range, or None.
      seen_users, seen_items: int[n] the training pairs (they say which ids were trained, and the
        fallback's means are taken over them).
      num_users, num_items: the table sizes.
    """

    def __init__(self, params: Mapping, y_range, seen_users: np.ndarray, seen_items: np.ndarray, num_users: int,
                 num_items: int):
        # The scoring tables only: an export may hold a family's own tables too (never scored).
        self.params = {name: jnp.asarray(table) for name, table in params.items() if name in SCORING_TABLES}
        self.y_range = tuple(float(v) for v in y_range) if y_range is not None else None
        self.seen_users, self.seen_items = np.asarray(seen_users), np.asarray(seen_items)
        self.num_users, self.num_items = num_users, num_items
        self.user_trained = fallback.trained(self.seen_users, num_users)
        self.item_trained = fallback.trained(self.seen_items, num_items)

    def score_known(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """float32[n]: the model's own predictions (no fallback), in chunks of PREDICT_CHUNK."""
        return predict_pairs(self.params, users, items, self.y_range, chunk=PREDICT_CHUNK, round_up=True)

    @functools.cached_property
    def tables(self) -> fallback.Tables:
        """The fallback's mean predictions, computed on first use."""
        predictions = self.score_known(self.seen_users, self.seen_items)
        return fallback.tables(predictions, self.seen_users, self.seen_items, self.num_users, self.num_items,
                               self.y_range)

    def known(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bool[n], bool[n]): whether each index names a trained user / item (an index outside the
        tables, e.g. -1, names none)."""

        def known(indices, trained):
            indices = np.asarray(indices, np.int64)
            inside = (indices >= 0) & (indices < len(trained))
            return inside & trained[np.where(inside, indices, 0)] if len(indices) else inside

        return known(users, self.user_trained), known(items, self.item_trained)

    def __call__(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(float32[n] answers, bool[n] user known, bool[n] item known) for index pairs (-1: not in the map)."""
        user_known, item_known = self.known(users, items)
        if not (user_known & item_known).all():
            answers = fallback.answer(self.score_known, self.tables, users, items, user_known, item_known)
        else:  # nothing falls back: the tables are not needed
            answers = self.score_known(users, items)
        return answers, user_known, item_known


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The pairs a rating model is scored on after every epoch, in one array (training pairs first: the
    fallback's means are taken over them), and the metrics of predictions for them.

    Attributes:
      users, items: int32[n_train + n_valid + n_test] every pair to predict, in that order.
    """

    users: np.ndarray
    items: np.ndarray
    targets: np.ndarray
    bounds: dict  # role -> (start, end) into users/items
    num_users: int
    num_items: int
    y_range: tuple | None

    @classmethod
    def of(cls, dataset, y_range) -> Evaluation:
        ratings, split = dataset.ratings, dataset.split
        rows = [getattr(split, role) for role in ("train", "valid", "test")]
        edges = np.cumsum([0] + [len(r) for r in rows])
        bounds = {role: (int(edges[k]), int(edges[k + 1])) for k, role in enumerate(("train", "valid", "test"))}
        every = np.concatenate(rows)
        return cls(ratings.users[every], ratings.items[every], ratings.ratings[every], bounds, ratings.num_users,
                   ratings.num_items, tuple(y_range) if y_range is not None else None)

    def part(self, role: str) -> slice:
        start, end = self.bounds[role]
        return slice(start, end)

    @functools.cached_property
    def trained(self) -> tuple[np.ndarray, np.ndarray]:
        train = self.part("train")
        return (fallback.trained(self.users[train], self.num_users),
                fallback.trained(self.items[train], self.num_items))

    def has(self, role: str) -> bool:
        start, end = self.bounds[role]
        return end > start

    def metrics(self, predictions: np.ndarray) -> dict:
        """The validation and test metrics (module docstring) of float[n] predictions for ``users, items``."""
        predictions = np.asarray(predictions)
        train = self.part("train")
        table = fallback.tables(predictions[train], self.users[train], self.items[train], self.num_users,
                                self.num_items, self.y_range)
        user_trained, item_trained = self.trained
        out = {}
        for role, prefix in PARTS:
            if not self.has(role):
                continue
            part = self.part(role)
            users, items, targets, raw = self.users[part], self.items[part], self.targets[part], predictions[part]
            user_known, item_known = user_trained[users], item_trained[items]
            known = user_known & item_known
            answers = fallback.scores(table, users, items, user_known, item_known)
            answers[known] = raw[known]
            out.update(rating_metrics(answers, targets, known, prefix))
            out.update(rows_metrics(raw, targets, prefix))
        return out

    def monitor_rmse(self, metrics: dict) -> float | None:
        """The RMSE the divergence check reads: the validation figure, else the test one, else None."""
        return metrics.get("valid_rmse", metrics.get("test_rmse"))


def part_metrics(answers: Answers, users: np.ndarray, items: np.ndarray, targets: np.ndarray, prefix: str) -> dict:
    """The metrics of one evaluated part (module docstring): every pair answered as ``Model.predict``
    answers it, the table rows' figures when every pair has rows, and the ranking metrics of
    ``jaxcf.core.ranking`` with recommendations as ``Model.recommend`` makes them (trained items only; users
    without training ratings get the cold start). The ranking's validation keys are unprefixed
    (``ndcg@10``), the others prefixed (``test_ndcg@10``).

    Args:
      answers: the model.
      users, items: int[n] indices; an index outside the tables (-1, or past the end for a user the
        model has never seen: give each such user an index of their own) is an unknown id.
      targets: float[n] ratings.
      prefix: ``"valid_"``, ``"test_"`` or ``""``.
    """
    users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
    answered, user_known, item_known = answers(users, items)
    out = rating_metrics(answered, targets, user_known & item_known, prefix)
    in_map = (users >= 0) & (users < answers.num_users) & (items >= 0) & (items < answers.num_items)
    if in_map.all():
        out.update(rows_metrics(predict_pairs(answers.params, users, items, answers.y_range), targets, prefix))
    ranked_rows = (items >= 0) & (items < answers.num_items) & (users >= 0)
    num_items = answers.num_items
    ks = [k for k in ranking.DEFAULT_KS if k <= num_items] or [num_items]
    extra = int(users[ranked_rows].max(initial=-1)) + 1 - answers.num_users
    trained_users = np.concatenate([answers.user_trained, np.zeros(max(0, extra), bool)])
    cold = fallback.cold_start_key(_mean_bias(answers.params), np.bincount(answers.seen_items, minlength=num_items))
    ranked = ranking.model_ranking_metrics(
        answers.params, answers.y_range, num_items, (answers.seen_users, answers.seen_items),
        (users[ranked_rows], items[ranked_rows], targets[ranked_rows]), ks=ks, candidates=answers.item_trained,
        trained_users=trained_users, cold_scores=cold)
    out.update({(name if prefix == "valid_" else prefix + name): value for name, value in ranked.items()})
    return out


def final_metrics(dataset, y_range, params: Mapping[str, np.ndarray]) -> dict[str, float]:
    """A model's metrics on ``dataset``'s validation and test parts (:func:`part_metrics`), each pair
    answered exactly as a loaded model answers it: what the closing record of a run holds, and what
    ``jaxcf.training.crossval`` reports."""
    ratings, split = dataset.ratings, dataset.split
    answers = Answers(params, y_range, ratings.users[split.train], ratings.items[split.train], ratings.num_users,
                      ratings.num_items)
    out: dict[str, float] = {}
    for role, prefix in PARTS:
        rows = getattr(split, role)
        if len(rows):
            out.update(part_metrics(answers, ratings.users[rows], ratings.items[rows], ratings.ratings[rows], prefix))
    return out


def _mean_bias(params: Mapping) -> np.ndarray | None:
    """The item biases the cold start ranks by (an ensemble's mean), or None for a model without them."""
    if "item_bias" not in params:
        return None
    bias = np.asarray(params["item_bias"])
    return (bias.mean(axis=0) if bias.ndim == 3 else bias)[:, 0]
