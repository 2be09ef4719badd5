"""Metrics as pure functions, and chunked prediction over a whole ratings array.

What does not live here: training (``jaxcf.train``) or raw-id lookups (``jaxcf.recommend``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.models import gather_rows, score_rows


def make_predict_fn(y_range: tuple[float, float] | None) -> Callable:
    """A jitted ``(params, users, items) -> float32[batch]`` for the model's scoring rule."""

    @jax.jit
    def predict(params, users, items):
        return score_rows(gather_rows(params, users, items), y_range)

    return predict


def predict_chunked(predict_fn: Callable, params, users: np.ndarray, items: np.ndarray, chunk: int) -> np.ndarray:
    """Predicts any number of pairs in fixed-size chunks (one compilation; the tail is padded).

    Args:
      users, items: int32[n] indices.
      chunk: ratings per device call.

    Returns:
      float32[n] predictions on the host.
    """
    n = len(users)
    chunk = max(1, min(chunk, n))
    out = []
    for start in range(0, n, chunk):
        u = users[start : start + chunk]
        i = items[start : start + chunk]
        size = len(u)
        if size < chunk:
            u = np.pad(u, (0, chunk - size))
            i = np.pad(i, (0, chunk - size))
        out.append(np.asarray(predict_fn(params, jnp.asarray(u), jnp.asarray(i)))[:size])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


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
