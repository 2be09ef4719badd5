"""Metrics as pure functions, predictions for any number of (user, item) pairs (the one copy), and the
closing metrics of a model on a split.

What does not live here: the scoring rule (``jaxcf.models``), the ranking protocol (``jaxcf.ranking``),
raw-id lookups (``jaxcf.inference``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf import ranking
from jaxcf.models import score_pairs

MIN_ROUND = 256  # the smallest call ``round_up`` makes: requests of 1-256 pairs share one compiled shape


def bucket(n: int) -> int:
    """The power of two at or above ``n``: request sizes rounded so a few compiled shapes serve all."""
    return 1 << max(0, (n - 1).bit_length())


def predict_pairs(
    params: Mapping[str, jax.Array],
    users: np.ndarray,
    items: np.ndarray,
    y_range: tuple[float, float] | None = None,
    *,
    chunk: int = 65536,
    per_member: bool = False,
    round_up: bool = False,
) -> np.ndarray:
    """``jaxcf.models.score_pairs`` over any number of index pairs, in fixed-size chunks.

    Args:
      params: a model's tables, or an ensemble's stacked ones.
      users, items: int[n] indices in range.
      y_range: the biased model's output range; None for the dot model.
      chunk: pairs per device call; every call has this size (the tail is padded), so one compiled
        program serves the whole array.
      per_member: an ensemble's per-member predictions instead of their mean.
      round_up: make the call size ``min(chunk, the power of two at or above max(n, MIN_ROUND))``
        instead of ``min(chunk, n)``: for many requests of varying sizes (inference), a few
        compiled shapes.

    Returns:
      float32[n] (or float32[K, n] with ``per_member``) on the host.
    """
    n = len(users)
    size = max(1, min(chunk, bucket(max(n, MIN_ROUND)) if round_up else n))
    y = tuple(float(v) for v in y_range) if y_range is not None else None
    out = []
    for start in range(0, n, size):
        u = np.asarray(users[start : start + size], np.int32)
        i = np.asarray(items[start : start + size], np.int32)
        count = len(u)
        if count < size:
            u, i = np.pad(u, (0, size - count)), np.pad(i, (0, size - count))
        scores = np.asarray(score_pairs(params, jnp.asarray(u), jnp.asarray(i), y, per_member))
        out.append(scores[..., :count])
    if out:
        return np.concatenate(out, axis=-1)
    members = next(iter(params.values())).shape[0] if per_member and params["user_embedding"].ndim == 3 else None
    return np.zeros((members, 0) if members else (0,), np.float32)


def regression_metrics(predictions: np.ndarray, targets: np.ndarray, prefix: str = "valid_") -> dict[str, float]:
    """MSE, RMSE and MAE in float64, keyed ``valid_mse`` etc."""
    value = mse(predictions, targets)
    return {f"{prefix}mse": value, f"{prefix}rmse": math.sqrt(value), f"{prefix}mae": mae(predictions, targets)}


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


def final_metrics(dataset, y_range, params: Mapping[str, np.ndarray]) -> dict[str, float]:
    """A model's validation RMSE/MAE and ranking metrics on ``dataset``'s split, scored as a loaded
    model scores it: what the closing record of a run holds, and what ``jaxcf.crossval`` reports."""
    ratings = dataset.ratings
    train_rows, valid_rows = dataset.split.train, dataset.split.valid
    predictions = predict_pairs(params, ratings.users[valid_rows], ratings.items[valid_rows], y_range)
    metrics = regression_metrics(predictions, ratings.ratings[valid_rows])
    ks = [k for k in ranking.DEFAULT_KS if k <= ratings.num_items] or [ratings.num_items]
    metrics.update(ranking.model_ranking_metrics(
        params, y_range, ratings.num_items,
        (ratings.users[train_rows], ratings.items[train_rows]),
        (ratings.users[valid_rows], ratings.items[valid_rows], ratings.ratings[valid_rows]), ks=ks,
    ))
    return metrics
