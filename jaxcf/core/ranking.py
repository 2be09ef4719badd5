"""Ranking metrics for explicit-rating models: precision@k, recall@k and NDCG@k, and their protocol.

The protocol (the one ``docs/results.md`` reports):

- **Relevant** items of a user are the user's *held-out* (validation) ratings of at least
  ``threshold`` (4 stars by default).
- **Evaluated users** are the users with at least one relevant held-out item; the metrics are the
  mean over them.
- **Candidates**: every item the model was trained on (with a training rating) that the user did not
  rate in *training*: what ``Model.recommend`` may return. The user's held-out items (relevant or not)
  are candidates like any item nobody showed them; so a model gains nothing from knowing which items
  were held out. A user without training ratings gets the cold-start answer, as from ``recommend``.
- **Ranking** is by predicted rating, highest first (``lax.top_k``; ties go to the lower item index).
- ``precision@k = hits / k``; ``recall@k = hits / |relevant|``; ``NDCG@k = DCG / IDCG`` with binary
  gains, ``DCG = sum over hits at rank r (1-based) of 1 / log2(r + 1)``, and IDCG the DCG of
  ``min(k, |relevant|)`` hits at the top.

With ~9,000 candidate items per user and a handful of relevant ones, these numbers are small (a
model that ranks at random has precision@10 of about |relevant| / 9,000); they compare models on
one split, not across datasets.

What does not live here: the scoring rule (``jaxcf.core.models.score_block``), RMSE/MAE
(``jaxcf.core.metrics``), top-k for raw ids (``jaxcf.serving.inference``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.core.models import score_block

DEFAULT_KS = (5, 10, 20)
DEFAULT_THRESHOLD = 4.0
# Users scored per device call: a [users, num_items] block (ml-latest-small: 256 x 9,066 floats per member).
USERS_PER_BLOCK = 256


@functools.partial(jax.jit, static_argnames=("k",))
def _top_hits(scores, seen_rows, seen_items, relevant_rows, relevant_items, excluded, cold, use_cold, k):
    """bool[B, k]: whether each of the top-k unseen candidate items of each row is relevant; rows with
    ``use_cold`` are ranked by ``cold`` (the cold-start answer) instead of their scores."""
    scores = jnp.where(use_cold[:, None], cold[None, :], scores)
    scores = jnp.where(excluded[None, :], -jnp.inf, scores)
    scores = scores.at[seen_rows, seen_items].set(-jnp.inf, mode="drop")
    best, top = jax.lax.top_k(scores, k)
    relevant = jnp.zeros(scores.shape, bool).at[relevant_rows, relevant_items].set(True, mode="drop")
    return jnp.take_along_axis(relevant, top, axis=1) & (best > -jnp.inf)  # fewer candidates than k: no hit


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
    candidates: np.ndarray | None = None,
    trained_users: np.ndarray | None = None,
    cold_scores: np.ndarray | None = None,
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
      candidates: bool[num_items] the items that may be recommended (default: all).
      trained_users: bool[num_users] users with training ratings; the others are ranked by
        ``cold_scores`` (float[num_items], higher first). Default: every user by its scores.

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
    excluded = np.zeros(num_items, bool) if candidates is None else ~np.asarray(candidates, bool)
    cold = np.zeros(num_items, np.float32) if cold_scores is None else np.asarray(cold_scores, np.float32)
    for start in range(0, len(users), users_per_block):
        block = users[start : start + users_per_block]
        size = len(block)
        padded = np.pad(block, (0, users_per_block - size))
        use_cold = (np.zeros(len(padded), bool) if trained_users is None
                    else ~np.asarray(trained_users, bool)[padded])
        seen_rows, seen_cols = _pairs_of(block, seen, users_per_block)
        relevant_rows, relevant_cols = _pairs_of(block, relevant, users_per_block)
        scores = score_fn(padded)
        hits = np.asarray(_top_hits(scores, seen_rows, seen_cols, relevant_rows, relevant_cols, excluded, cold,
                                    use_cold, kmax))[:size]
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
    **who: np.ndarray | None,
) -> dict[str, float]:
    """:func:`ranking_metrics` for a model's (or a stacked ensemble's) tables.

    Args:
      params: tables as in ``jaxcf.core.models.score_block``.
      train: (users, items) int32 training pairs; valid: (users, items, ratings) held-out ratings.
      who: ``candidates``, ``trained_users`` and ``cold_scores`` as for :func:`ranking_metrics`.
    """
    device_params = {name: jnp.asarray(table, jnp.float32) for name, table in params.items()}
    y = tuple(float(v) for v in y_range) if y_range is not None else None
    return ranking_metrics(
        lambda users: score_block(device_params, jnp.asarray(users, jnp.int32), y), num_items,
        *train, *valid, ks=ks, threshold=threshold, **who,
    )


# ------------------------------------------------------------------------------ implicit feedback

IMPLICIT_KS = (10, 20, 50)


@functools.partial(jax.jit, static_argnames=("k",))
def _implicit_block(scores, excluded, relevant, k):
    """For a block of users: (bool[B, k] top-k hits, int32[B, k] top-k items, int32[B] rank of the
    first relevant item among the candidates, 1-based). Ties are ordered as ``top_k`` orders them, the
    lower item index first, so a user whose scores all tie gains nothing from it."""
    scores = jnp.where(excluded, -jnp.inf, scores)
    _, top = jax.lax.top_k(scores, k)
    hits = jnp.take_along_axis(relevant, top, axis=1)
    best = jnp.max(jnp.where(relevant, scores, -jnp.inf), axis=1)[:, None]
    first = jnp.argmax(relevant & (scores == best), axis=1)[:, None]  # the lowest index among the best
    index = jnp.arange(scores.shape[1])[None, :]
    rank = jnp.sum((scores > best) | ((scores == best) & (index < first)), axis=1) + 1
    return hits, top, rank


def implicit_metrics(
    score_fn: Callable[[np.ndarray], jax.Array],
    num_items: int,
    train_users: np.ndarray,
    train_items: np.ndarray,
    test_users: np.ndarray,
    test_items: np.ndarray,
    ks: Sequence[int] = IMPLICIT_KS,
    users_per_block: int = USERS_PER_BLOCK,
    known: np.ndarray | None = None,
    cold_start: bool = True,
) -> dict:
    """The implicit-feedback protocol's ranking metrics (``docs/results.md``; Rendle et al.'s definitions).

    Candidates for a user: every item with at least one training interaction, minus the user's
    training items. Relevant: the user's test items that are candidates; users with none are not
    scored. ``recall@k = hits / min(k, |relevant|)``; ``ndcg@k``: binary gains, the ideal DCG over
    ``min(k, |relevant|)`` hits; ``map@k``: the mean over the relevant ranks r <= k of precision@r,
    divided by ``min(k, |relevant|)``; ``mrr``: 1 / the rank of the first relevant candidate in the
    full ranking; ``hit@k``: whether any relevant item is in the top k; ``coverage@k``: the share of
    candidate items in at least one scored user's top k. Averages over scored users.

    Args:
      score_fn: ``int32[B] users -> float[B, num_items]`` scores, higher is better.
      train_users, train_items, test_users, test_items: int index pairs.
      known: bool[num_items], the candidate items when they are not the training pairs' items (the
        strong-generalisation protocol, whose held-out users' histories are not the model's training).
      cold_start: rank a user without training interactions as ``Model.recommend`` answers an unknown
        user, by the items' numbers of training interactions (ties to the lower index), not by the
        user's untrained row. Off for the strong-generalisation protocol, whose users are folded in.

    Returns:
      ``{"recall@20": ..., ..., "mrr": ..., "protocol": "implicit-holdout", "scored_users": n,
      "candidates": number of items with a training interaction}``.
    """
    ks = sorted({int(k) for k in ks})
    if known is None:
        known = np.zeros(num_items, bool)
        known[train_items] = True
    kmax = min(ks[-1], int(known.sum()))
    seen = _group(np.asarray(train_users), np.asarray(train_items))
    popularity = np.bincount(np.asarray(train_items, np.int64), minlength=num_items).astype(np.float32)
    candidates_test = known[test_items]
    relevant = _group(np.asarray(test_users)[candidates_test], np.asarray(test_items)[candidates_test])
    scored = (u for u, items in relevant.items() if len(np.setdiff1d(items, seen.get(u, []))))
    users = np.asarray(sorted(scored), np.int32)
    result: dict = {"protocol": "implicit-holdout", "scored_users": int(len(users)), "candidates": int(known.sum())}
    names = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg", "map", "hit", "coverage")] + ["mrr"]
    if not len(users):
        return {**result, **{name: math.nan for name in names}}
    discounts = 1.0 / np.log2(np.arange(2, kmax + 2))
    sums = {name: 0.0 for name in names}
    covered = {k: np.zeros(num_items, bool) for k in ks}
    for start in range(0, len(users), users_per_block):
        block = users[start : start + users_per_block]
        size = len(block)
        padded = np.pad(block, (0, users_per_block - size))
        excluded = np.tile(~known, (users_per_block, 1))
        relevant_mask = np.zeros((users_per_block, num_items), bool)
        for row, user in enumerate(block.tolist()):
            excluded[row, seen.get(user, [])] = True
            relevant_mask[row, relevant[user]] = True
        relevant_mask &= ~excluded
        scores = score_fn(padded)
        if cold_start:
            untrained = np.asarray([len(seen.get(int(u), ())) == 0 for u in padded])
            if untrained[:size].any():
                scores = jnp.where(jnp.asarray(untrained)[:, None], jnp.asarray(popularity)[None], scores)
        hits, top, rank = _implicit_block(scores, excluded, relevant_mask, kmax)
        hits, top, rank = np.asarray(hits)[:size], np.asarray(top)[:size], np.asarray(rank)[:size]
        counts = relevant_mask[:size].sum(axis=1).astype(np.float64)
        sums["mrr"] += float(np.sum(1.0 / rank))
        for k in ks:
            kk = min(k, kmax)
            found = hits[:, :kk]
            ideal_n = np.minimum(counts, k).astype(int)
            ideal = np.cumsum(discounts)[np.minimum(ideal_n, kmax) - 1]
            precision_at = np.cumsum(found, axis=1) / np.arange(1, kk + 1)
            sums[f"recall@{k}"] += float(np.sum(found.sum(axis=1) / np.minimum(counts, k)))
            sums[f"ndcg@{k}"] += float(np.sum((found * discounts[:kk]).sum(axis=1) / ideal))
            sums[f"map@{k}"] += float(np.sum((precision_at * found).sum(axis=1) / np.minimum(counts, k)))
            sums[f"hit@{k}"] += float(np.sum(found.any(axis=1)))
            covered[k][top[:, :kk].ravel()] = True
    out = {name: total / len(users) for name, total in sums.items()}
    for k in ks:
        out[f"coverage@{k}"] = float(covered[k][known].sum() / known.sum())
    return {**result, **out}


def split_implicit_metrics(dataset, score_fn: Callable[[np.ndarray], jax.Array]) -> dict:
    """:func:`implicit_metrics` of ``score_fn`` on a dataset's validation part (keys unprefixed: ``ndcg@20``)
    and test part (``test_ndcg@20``), each against its training interactions."""
    ratings, split = dataset.ratings, dataset.split
    out = {}
    for rows, prefix in ((split.valid, ""), (split.test, "test_")):
        if len(rows):
            found = implicit_metrics(score_fn, ratings.num_items, ratings.users[split.train],
                                     ratings.items[split.train], ratings.users[rows], ratings.items[rows])
            out.update({prefix + name: value for name, value in found.items()})
    return out
