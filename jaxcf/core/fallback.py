"""What a model answers for ids it has never seen: the fallback policy, flagged on every answer.

Fallback policy (``strict=False``, the default). As in Surprise, only what is known is used, and
every fallback is flagged. The answer is the model's own mean prediction over the training pairs
(``seen.safetensors``) of the side that is known:

================  ===========================================================================
unknown           prediction (both model kinds)
================  ===========================================================================
user              the mean of the model's predictions over the item's training ratings
item              the mean of the model's predictions over the user's training ratings
both              the mean of the model's predictions over all training pairs
================  ===========================================================================

**Known means trained.** An id the model has a table row for but no training rating (one that
appeared only in the validation or test part of the data) is unknown here: its row was never
trained, so it is answered by this policy and flagged, never scored from that row. With no
training pairs at all the answer is the middle of the range (bias model) or 0 (dot model).

The one answer rule (:func:`answer`) serves ``Model.predict`` and every metric that says what a user
gets (``valid_rmse``, ``test_rmse``, ``jaxcf.cli.evaluate``), so they agree to the last digit.

Why not Surprise's literal "known terms only", ``sigmoid(b_item)`` scaled? Surprise's biased SVD
adds its biases to the global mean; this model has no global-mean term (the dot product carries
the average), so dropping terms drags every fallback toward the middle of the range, and it scores
worse on the bundled split (``docs/usage.md`` gives the figures). ``fallback="known_terms"`` gives
that literal rule anyway (bias model: the scaled sigmoid of the known biases; the middle of the
range when both are unknown). ``strict=True`` raises ``UnknownIdError`` instead.

Cold start in ``Model.recommend`` (unknown user, not strict): the bias model's items ranked by
learned item bias, the other models' by number of training ratings (:func:`cold_start_key`); each
scored with its unknown-user fallback above, and the ranking flagged ``fallback``. Items without
training ratings are never recommended, to anyone.

What does not live here: the model and its lookups (``jaxcf.serving.inference``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

FALLBACKS = ("mean", "known_terms")


def trained(rows: np.ndarray, size: int) -> np.ndarray:
    """bool[size]: which rows (users or items) have at least one training pair in ``rows``."""
    return np.bincount(np.asarray(rows, np.int64), minlength=size)[:size] > 0


@dataclasses.dataclass(frozen=True)
class Tables:
    """The mean predictions the policy answers with.

    Attributes:
      overall: over all training pairs.
      per_user: float32[num_users] over each user's (``overall`` where a user has none).
      per_item: float32[num_items] over each item's (``overall`` where an item has none).
    """

    overall: float
    per_user: np.ndarray
    per_item: np.ndarray


def tables(predictions: np.ndarray, users: np.ndarray, items: np.ndarray, num_users: int, num_items: int,
           y_range: tuple[float, float] | None) -> Tables:
    """The policy's tables from the model's predictions on its training pairs (``users``, ``items``)."""
    predictions = predictions.astype(np.float64)
    if len(predictions):
        overall = float(predictions.mean())
    else:
        overall = (y_range[0] + y_range[1]) / 2 if y_range else 0.0

    def per_row(rows: np.ndarray, size: int) -> np.ndarray:
        counts = np.bincount(rows, minlength=size)
        sums = np.bincount(rows, weights=predictions, minlength=size)
        return np.where(counts > 0, sums / np.maximum(counts, 1), overall).astype(np.float32)

    return Tables(overall, per_row(users, num_users), per_row(items, num_items))


def scores(table: Tables, users: np.ndarray, items: np.ndarray, user_known: np.ndarray,
           item_known: np.ndarray) -> np.ndarray:
    """float32[n]: the policy's answer for each pair (meaningful where either side is unknown)."""
    out = np.full(len(users), table.overall, np.float32)
    only_item = item_known & ~user_known
    only_user = user_known & ~item_known
    out[only_item] = table.per_item[items[only_item]]
    out[only_user] = table.per_user[users[only_user]]
    return out


def answer(score_known: Callable[[np.ndarray, np.ndarray], np.ndarray], table: Tables, users: np.ndarray,
           items: np.ndarray, user_known: np.ndarray, item_known: np.ndarray) -> np.ndarray:
    """float32[n]: what the model answers for each pair: its prediction where both ids are known
    (trained), the policy's fallback elsewhere.

    Args:
      score_known: ``(users, items) -> float32[m]`` the model's predictions for index pairs.
      table: from :func:`tables`.
      users, items: int[n] indices (any value where unknown).
      user_known, item_known: bool[n] whether each id is known and trained.
    """
    out = scores(table, users, items, user_known, item_known)
    both = user_known & item_known
    if both.any():
        out[both] = score_known(users[both], items[both])
    return out


def cold_start_key(item_bias: np.ndarray | None, item_counts: np.ndarray) -> np.ndarray:
    """float64[num_items]: the order of the cold-start answer, higher first; items without training
    ratings last (they are never recommended)."""
    key = np.asarray(item_bias if item_bias is not None else item_counts, np.float64).copy()
    key[np.asarray(item_counts) == 0] = -np.inf
    return key


def known_terms(user_bias: np.ndarray, item_bias: np.ndarray, y_range: tuple[float, float], users: np.ndarray,
                items: np.ndarray, user_known: np.ndarray, item_known: np.ndarray) -> np.ndarray:
    """Surprise's literal rule on the biased model: the scaled sigmoid of the known biases (of 0 when
    both sides are unknown: the middle of the range)."""
    logits = np.zeros(len(users), np.float64)
    logits[user_known] += user_bias[users[user_known]]
    logits[item_known] += item_bias[items[item_known]]
    low, high = y_range
    return (1 / (1 + np.exp(-logits)) * (high - low) + low).astype(np.float32)


def rule(table: Tables, user_known: bool, item_known: bool) -> str:
    """The fallback used for a pair, in words (empty when both ids are known)."""
    if user_known and item_known:
        return ""
    if item_known:
        return "mean prediction over the item's training ratings"
    if user_known:
        return "mean prediction over the user's training ratings"
    return f"mean prediction over all training pairs, {table.overall:.4f}"
