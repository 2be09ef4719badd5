"""Ranking metrics for explicit-rating models: precision@k, recall@k and NDCG@k, and their protocol.

The protocol (the one ``docs/results.md`` reports):

- **Relevant** items of a user are the user's *held-out* (validation) ratings of at least
  ``threshold`` (4 stars by default).
- **Evaluated users** are the users with at least one relevant held-out item; the metrics are the
  mean over them.
- **Candidates**: every item of the model that the user did not rate in *training*. The user's
  held-out items (relevant or not) are candidates like any item nobody showed them; so a model gains
  nothing from knowing which items were held out.
- **Ranking** is by predicted rating, highest first (``lax.top_k``; ties go to the lower item index).
- ``precision@k = hits / k``; ``recall@k = hits / |relevant|``; ``NDCG@k = DCG / IDCG`` with binary
  gains, ``DCG = sum over hits at rank r (1-based) of 1 / log2(r + 1)``, and IDCG the DCG of
  ``min(k, |relevant|)`` hits at the top.

With ~9,000 candidate items per user and a handful of relevant ones, these numbers are small (a
model that ranks at random has precision@10 of about |relevant| / 9,000); they compare models on
one split, not across datasets.

What does not live here: the scoring rule (``jaxcf.models.score_block``), RMSE/MAE
(``jaxcf.evaluate``), top-k for raw ids (``jaxcf.inference``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.models import score_block

DEFAULT_KS = (5, 10, 20)
DEFAULT_THRESHOLD = 4.0
# Users scored per device call: a [users, num_items] block (ml-latest-small: 256 x 9,066 floats per member).
USERS_PER_BLOCK = 256


@functools.partial(jax.jit, static_argnames=("k",))
def _top_hits(scores, seen_rows, seen_items, relevant_rows, relevant_items, k):
    """bool[B, k]: whether each of the top-k unseen items of each row is relevant."""
    scores = scores.at[seen_rows, seen_items].set(-jnp.inf, mode="drop")
    _, top = jax.lax.top_k(scores, k)
    relevant = jnp.zeros(scores.shape, bool).at[relevant_rows, relevant_items].set(True, mode="drop")
    return jnp.take_along_axis(relevant, top, axis=1)


def _pairs_of(block: np.ndarray, by_user: dict[int, np.ndarray], pad_row: int) -> tuple[np.ndarray, np.ndarray]:
    """(row in block, item) pairs for the users of ``block``, padded to a power of two with ``pad_row``
    (out of range: the scatters drop it), so a handful of shapes serves every block."""
    lists = [by_user.get(int(u), np.zeros(0, np.int64)) for u in block]
    rows = np.repeat(np.arange(len(block), dtype=np.int32), [len(x) for x in lists])
    cols = np.concatenate(lists).astype(np.int32) if lists else np.zeros(0, np.int32)
    size = 1 << max(0, (max(1, len(rows)) - 1).bit_length())
    return np.pad(rows, (0, size - len(rows)), constant_values=pad_row), np.pad(cols, (0, size - len(cols)))


def _group(users: np.ndarray, items: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(users, kind="stable")
    users, items = users[order], items[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(users)]
    return {int(users[s]): items[s:e] for s, e in zip(starts, ends)}


def ranking_metrics(
    score_fn: Callable[[np.ndarray], jax.Array],
    num_items: int,
    train_users: np.ndarray,
    train_items: np.ndarray,
    valid_users: np.ndarray,
    valid_items: np.ndarray,
    valid_ratings: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    threshold: float = DEFAULT_THRESHOLD,
    users_per_block: int = USERS_PER_BLOCK,
) -> dict[str, float]:
    """Precision@k, recall@k and NDCG@k under the module's protocol.

    Args:
      score_fn: ``int32[B] user indices -> float32[B, num_items]`` predicted ratings (e.g.
        ``lambda users: score_block(params, users, y_range)``); called with blocks of a fixed size.
      num_items: the number of items the model scores.
      train_users, train_items: int32[n_train] the training pairs (never recommended back).
      valid_users, valid_items: int32[n_valid] held-out pairs; valid_ratings: float32[n_valid].
      ks: cut-offs (each <= num_items).
      threshold: a held-out rating of at least this is relevant.
      users_per_block: users scored per call.

    Returns:
      ``{"precision@k": ..., "recall@k": ..., "ndcg@k": ... for each k, "ranking_users": number of
      evaluated users, "ranking_threshold": threshold}``; NaN metrics when no user has a relevant item.
    """
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1 or ks[-1] > num_items:
        raise ValueError(f"ks must be in [1, {num_items}]; got {list(ks)}")
    kmax = ks[-1]
    keep = np.asarray(valid_ratings) >= threshold
    relevant = _group(np.asarray(valid_users)[keep], np.asarray(valid_items)[keep])
    seen = _group(np.asarray(train_users), np.asarray(train_items))
    users = np.asarray(sorted(relevant), np.int32)
    result: dict[str, float] = {"ranking_users": int(len(users)), "ranking_threshold": float(threshold)}
    if not len(users):
        for k in ks:
            result.update({f"precision@{k}": math.nan, f"recall@{k}": math.nan, f"ndcg@{k}": math.nan})
        return result
    discounts = 1.0 / np.log2(np.arange(2, kmax + 2))
    sums = {f"{name}@{k}": 0.0 for k in ks for name in ("precision", "recall", "ndcg")}
    for start in range(0, len(users), users_per_block):
        block = users[start : start + users_per_block]
        size = len(block)
        padded = np.pad(block, (0, users_per_block - size))
        seen_rows, seen_cols = _pairs_of(block, seen, users_per_block)
        relevant_rows, relevant_cols = _pairs_of(block, relevant, users_per_block)
        scores = score_fn(padded)
        hits = np.asarray(_top_hits(scores, seen_rows, seen_cols, relevant_rows, relevant_cols, kmax))[:size]
        counts = np.asarray([len(relevant[int(u)]) for u in block], np.float64)
        for k in ks:
            found = hits[:, :k].sum(axis=1)
            dcg = (hits[:, :k] * discounts[:k]).sum(axis=1)
            ideal = np.cumsum(discounts[:k])[np.minimum(counts, k).astype(int) - 1]
            sums[f"precision@{k}"] += float(np.sum(found / k))
            sums[f"recall@{k}"] += float(np.sum(found / counts))
            sums[f"ndcg@{k}"] += float(np.sum(dcg / ideal))
    result.update({name: total / len(users) for name, total in sums.items()})
    return result


def model_ranking_metrics(
    params: Mapping[str, np.ndarray],
    y_range: tuple[float, float] | None,
    num_items: int,
    train: tuple[np.ndarray, np.ndarray],
    valid: tuple[np.ndarray, np.ndarray, np.ndarray],
    ks: Sequence[int] = DEFAULT_KS,
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, float]:
    """:func:`ranking_metrics` for a model's (or a stacked ensemble's) tables.

    Args:
      params: tables as in ``jaxcf.models.score_block``.
      train: (users, items) int32 training pairs; valid: (users, items, ratings) held-out ratings.
    """
    device_params = {name: jnp.asarray(table, jnp.float32) for name, table in params.items()}
    y = tuple(float(v) for v in y_range) if y_range is not None else None
    return ranking_metrics(
        lambda users: score_block(device_params, jnp.asarray(users, jnp.int32), y), num_items,
        *train, *valid, ks=ks, threshold=threshold,
    )
