"""Using a trained model: predictions for raw ids, top-k recommendations, similar items, bias
rankings, the cold-start fallback, and the ``python -m jaxcf.recommend`` CLI.

    model = jaxcf.load_model("runs/bias")          # a training workdir or its model/ folder
    model.predict([1, 1], [31, 999999])            # Predictions(ratings, fallback, ...)
    model.recommend(1, k=10)                        # Ranking(ids, titles, scores, fallback)
    model.similar_items(260, k=10)

Fallback policy for ids the model has never seen (``strict=False``, the default). As in Surprise,
only what is known is used, and every fallback is flagged. The answer is the model's own mean
prediction over the training pairs (``seen.safetensors``) of the side that is known:

================  ===========================================================================
unknown           prediction (both model kinds)
================  ===========================================================================
user              the mean of the model's predictions over the item's training ratings
item              the mean of the model's predictions over the user's training ratings
both              the mean of the model's predictions over all training pairs
================  ===========================================================================

A known item (user) without training ratings, one that appeared only in the validation split, has
no mean of its own and gets the overall mean. With no training pairs at all the answer is the
middle of the range (bias model) or 0 (dot model).

Why not Surprise's literal "known terms only", ``sigmoid(b_item)`` scaled? Surprise's biased SVD
adds its biases to the global mean; this model has no global-mean term (the dot product carries
the average), so dropping terms drags every fallback toward the middle of the range. Measured on
the bundled ml-latest-small validation split (bias model, 5 epochs, ``configs/bias.yaml``), as if
the user (item) were unknown: ``sigmoid(b_item)`` scaled gives RMSE 1.257 (``sigmoid(b_user)``
1.180; the midpoint for both 1.329), the rule above 0.993 (0.962; 1.060 for both). A constant
mean training rating gives 1.060.

``fallback="known_terms"`` gives Surprise's literal rule instead (bias model: the scaled sigmoid
of the known biases; the middle of the range when both are unknown), measured above to be worse
here. ``strict=True`` raises :class:`UnknownIdError` instead.

Cold start in :meth:`Model.recommend` (unknown user, not strict): the bias model's items ranked by
learned item bias, the dot model's by number of training ratings; each scored with its
unknown-user fallback above. The :class:`Ranking` is flagged ``fallback``.

What does not live here: reading and verifying the export (``jaxcf.export``), training.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.data.ratings import IdMap
from jaxcf.export import Export, ModelError
from jaxcf.models import gather_rows, score_rows
from jaxcf.ranking import score_block

# Pairs per device call in predict(); smaller requests are padded to the next power of two so that
# a handful of compiled shapes serves every request size.
PREDICT_CHUNK = 65536
# Users per device call in recommend_many(): a [users, num_items] score block (ml-25m: 62k items,
# 256 users = 64 MB of float32).
USERS_PER_CALL = 256


class UnknownIdError(ModelError):
    """A raw user or item id that the model was not trained on (strict mode, or similar_items)."""


class Predictions(NamedTuple):
    """Predictions for (user, item) pairs of raw ids.

    Attributes:
      ratings: float32[n] predicted ratings (the fallback value where ``fallback`` is set).
      fallback: bool[n] True where the user or the item is unknown (see the module's policy table).
      user_known: bool[n].
      item_known: bool[n].
    """

    ratings: np.ndarray
    fallback: np.ndarray
    user_known: np.ndarray
    item_known: np.ndarray


class Ranking(NamedTuple):
    """A ranked list of raw ids, best first.

    Attributes:
      ids: [k] raw ids (items, or users for a user bias ranking).
      titles: k titles, None where unknown (always None for users).
      scores: float32[k] predicted ratings, cosine similarities or biases, as the method says.
      fallback: True for a cold-start answer (unknown user in :meth:`Model.recommend`).
    """

    ids: np.ndarray
    titles: list
    scores: np.ndarray
    fallback: bool = False


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("y_range",))
def _score_pairs(params, users, items, y_range):
    if params["user_embedding"].ndim == 3:  # an ensemble (jaxcf.ensemble): the mean of its members
        return jnp.mean(jax.vmap(lambda p: _score_pairs(p, users, items, y_range))(params), axis=0)
    return score_rows(gather_rows(params, users, items), y_range)


@functools.partial(jax.jit, static_argnames=("k", "y_range"))
def _top_k_unseen(params, users, seen_rows, seen_items, k, y_range):
    """Top-k items for a block of users, with each user's training items masked out.

    users: int32[B]; seen_rows, seen_items: int32[S] (row in the block, item index), padded with
    out-of-range rows that the scatter drops. Returns (float32[B, k] scores, int32[B, k] items).
    """
    scores = score_block(params, users, y_range)
    scores = scores.at[seen_rows, seen_items].set(-jnp.inf, mode="drop")
    return jax.lax.top_k(scores, k)


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k_cosine(unit_items, query, excluded, k):
    """Top-k cosine neighbours of item ``query``; ``excluded`` bool[I] items never returned."""
    cosine = jnp.matmul(unit_items, unit_items[query], precision=jax.lax.Precision.HIGHEST)
    return jax.lax.top_k(jnp.where(excluded, -jnp.inf, cosine), k)


def _as_1d(values: Any) -> np.ndarray:
    array = np.asarray(values)
    return array.reshape(1) if array.ndim == 0 else array


FALLBACKS = ("mean", "known_terms")


class Model:
    """A trained model loaded from an export, with inference for raw ids.

    Attributes:
      kind: ``"dot"`` or ``"bias"``.
      y_range: (low, high) of the biased model's scaled sigmoid; None for the dot model.
      metadata: ``metadata.json``.
      path: the export directory.
      user_ids, item_ids: :class:`IdMap` of raw ids; ``user_ids.raw[i]`` is row ``i``.
      user_embedding: float32[num_users, F]; item_embedding: float32[num_items, F].
      user_bias, item_bias: float32[num_users], float32[num_items] (bias model), else None.
      user_counts, item_counts: int64 training ratings per row (from ``seen.safetensors``).
      titles: list of num_items titles (None where unknown).
    """

    def __init__(self, export: Export):
        self.metadata = export.metadata
        self.path = export.path
        model_info = export.metadata["model"]
        self.kind: str = model_info["kind"]
        self.y_range = tuple(float(v) for v in model_info["y_range"]) if self.kind == "bias" else None
        self.user_ids = IdMap(export.user_ids)
        self.item_ids = IdMap(export.item_ids)
        weights = export.weights
        # An ensemble's tables are stacked [K, rows, d]: predictions and top-k use all of them (the
        # members' mean); similar items and bias rankings use 2-D summaries (jaxcf.ensemble.member_summary).
        self.ensemble_size: int | None = model_info.get("ensemble_size")
        shown = weights
        if weights["user_embedding"].ndim == 3:
            from jaxcf.ensemble import member_summary

            shown = member_summary(weights)
        self.user_embedding = shown["user_embedding"]
        self.item_embedding = shown["item_embedding"]
        self.user_bias = shown["user_bias"][:, 0] if "user_bias" in shown else None
        self.item_bias = shown["item_bias"][:, 0] if "item_bias" in shown else None
        self.seen_users = export.seen_users
        self.seen_items = export.seen_items
        self.user_counts = np.bincount(self.seen_users, minlength=self.num_users)
        self.item_counts = np.bincount(self.seen_items, minlength=self.num_items)
        self.titles: list = [None] * self.num_items
        if export.titles:
            keys = np.asarray([str(k) if isinstance(k, str) else k for k, _ in export.titles])
            positions, known = self.item_ids.lookup(keys)
            for position, is_known, (_, title) in zip(positions.tolist(), known.tolist(), export.titles):
                if is_known:
                    self.titles[position] = str(title)
        # Training pairs grouped by user (CSR), for "exclude seen".
        order = np.argsort(self.seen_users, kind="stable")
        self._seen_by_user = self.seen_items[order]
        self._seen_start = np.concatenate([[0], np.cumsum(self.user_counts)])
        self._params = {name: jnp.asarray(table) for name, table in weights.items()}

    # ------------------------------------------------------------------------------ basics

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def __repr__(self) -> str:
        return f"Model(kind={self.kind!r}, users={self.num_users}, items={self.num_items}, path={str(self.path)!r})"

    def seen(self, user_index: int) -> np.ndarray:
        """int32[m] item indices that user ``user_index`` rated in training."""
        return self._seen_by_user[self._seen_start[user_index] : self._seen_start[user_index + 1]]

    def title(self, item_id: Any) -> str | None:
        """The title of a raw item id, or None."""
        index, known = self.item_ids.lookup(_as_1d(item_id))
        return self.titles[int(index[0])] if known[0] else None

    @functools.cached_property
    def fallback_tables(self) -> tuple[float, np.ndarray, np.ndarray]:
        """The fallback predictions (see the module's policy table), computed on first use.

        Returns:
          (overall float, per_user float32[num_users], per_item float32[num_items]): the mean
          prediction over all training pairs, over each user's, and over each item's (the overall
          mean for rows without training pairs).
        """
        predictions = self._score_known(self.seen_users, self.seen_items).astype(np.float64)
        if len(predictions):
            overall = float(predictions.mean())
        else:
            overall = (self.y_range[0] + self.y_range[1]) / 2 if self.y_range else 0.0

        def per_row(rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
            sums = np.bincount(rows, weights=predictions, minlength=len(counts))
            return np.where(counts > 0, sums / np.maximum(counts, 1), overall).astype(np.float32)

        return overall, per_row(self.seen_users, self.user_counts), per_row(self.seen_items, self.item_counts)

    def fallback_rule(self, user_known: bool, item_known: bool) -> str:
        """The fallback used for a pair, in words (empty when both ids are known)."""
        if user_known and item_known:
            return ""
        if item_known:
            return "mean prediction over the item's training ratings"
        if user_known:
            return "mean prediction over the user's training ratings"
        return f"mean prediction over all training pairs, {self.fallback_tables[0]:.4f}"

    # ------------------------------------------------------------------------------ predict

    def _score_known(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """float32[n] model predictions for index pairs, in chunks on the device."""
        n = len(users)
        out = np.empty(n, np.float32)
        for start in range(0, n, PREDICT_CHUNK):
            u = users[start : start + PREDICT_CHUNK]
            i = items[start : start + PREDICT_CHUNK]
            size = len(u)
            padded = _bucket(size)
            u = np.pad(u.astype(np.int32), (0, padded - size))
            i = np.pad(i.astype(np.int32), (0, padded - size))
            out[start : start + size] = np.asarray(_score_pairs(self._params, u, i, self.y_range))[:size]
        return out

    def _fallback_scores(
        self, users: np.ndarray, items: np.ndarray, user_known, item_known, fallback: str = "mean"
    ) -> np.ndarray:
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback={fallback!r}: choose one of {', '.join(FALLBACKS)}")
        if fallback == "known_terms" and self.kind == "bias":
            # Surprise's literal rule on this model: drop the unknown side's terms, i.e. the scaled
            # sigmoid of the known biases (of 0 when both sides are unknown: the middle of the range).
            logits = np.zeros(len(users), np.float64)
            logits[user_known] += self.user_bias[users[user_known]]
            logits[item_known] += self.item_bias[items[item_known]]
            low, high = self.y_range
            return (1 / (1 + np.exp(-logits)) * (high - low) + low).astype(np.float32)
        overall, per_user, per_item = self.fallback_tables
        scores = np.full(len(users), overall, np.float32)
        only_item = item_known & ~user_known
        only_user = user_known & ~item_known
        scores[only_item] = per_item[items[only_item]]
        scores[only_user] = per_user[users[only_user]]
        return scores

    def lookup_users(self, user_ids: Any, strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Raw user ids -> (int32[n] indices, -1 where unknown; bool[n] known).

        Raises:
          UnknownIdError: with ``strict`` when any id is unknown.
        """
        return self._lookup(self.user_ids, _as_1d(user_ids), "user", strict)

    def lookup_items(self, item_ids: Any, strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Raw item ids -> (int32[n] indices, -1 where unknown; bool[n] known).

        Raises:
          UnknownIdError: with ``strict`` when any id is unknown.
        """
        return self._lookup(self.item_ids, _as_1d(item_ids), "item", strict)

    def _lookup(self, id_map: IdMap, raw: np.ndarray, what: str, strict: bool, hint: str = ""):
        indices, known = id_map.lookup(raw)
        if strict and not known.all():
            first = raw[int(np.argmax(~known))].item()
            more = int((~known).sum()) - 1
            also = f" (and {more} more)" if more else ""
            hint = hint or "use a known id; without strict mode, unknown ids get the documented fallback"
            raise UnknownIdError(
                f"unknown {what} id {first}{also}: not among the {len(id_map)} {what}s the model was trained on; {hint}"
            )
        return indices, known

    def predict(self, user_ids: Any, item_ids: Any, strict: bool = False, fallback: str = "mean") -> Predictions:
        """Predicted ratings for pairs of raw ids.

        Args:
          user_ids, item_ids: raw ids, scalars or sequences of one length (a scalar is repeated).
            Integers or strings; numeric strings match integer ids.
          strict: raise on unknown ids instead of falling back.
          fallback: ``"mean"`` (the default; the module's policy table) or ``"known_terms"``
            (Surprise's literal rule: for the bias model, the scaled sigmoid of the known biases;
            the dot model has no per-side terms, so it uses ``"mean"``).

        Returns:
          :class:`Predictions` with float32[n] ratings and bool[n] fallback flags.

        Raises:
          UnknownIdError: with ``strict`` and an unknown id.
          ValueError: when the two sequences have different lengths.
        """
        users_raw, items_raw = _as_1d(user_ids), _as_1d(item_ids)
        if len(users_raw) == 1 and len(items_raw) != 1:
            users_raw = np.repeat(users_raw, len(items_raw))
        elif len(items_raw) == 1 and len(users_raw) != 1:
            items_raw = np.repeat(items_raw, len(users_raw))
        if len(users_raw) != len(items_raw):
            raise ValueError(f"predict: {len(users_raw)} user ids but {len(items_raw)} item ids; pass one of each")
        users, user_known = self.lookup_users(users_raw, strict)
        items, item_known = self.lookup_items(items_raw, strict)
        both = user_known & item_known
        ratings = self._fallback_scores(users, items, user_known, item_known, fallback)
        if both.any():
            ratings[both] = self._score_known(users[both], items[both])
        return Predictions(ratings, ~both, user_known, item_known)

    # ------------------------------------------------------------------------------ recommend

    def _ranking(self, indices: np.ndarray, scores: np.ndarray, fallback: bool = False) -> Ranking:
        indices = np.asarray(indices, np.int64)
        return Ranking(
            self.item_ids.raw[indices], [self.titles[i] for i in indices.tolist()],
            np.asarray(scores, np.float32), fallback,
        )

    def cold_start(self, k: int = 10) -> Ranking:
        """The answer for an unknown user, flagged ``fallback``: the bias model's items by learned
        item bias, the dot model's by number of training ratings, each scored with its unknown-user
        fallback (the mean prediction over the item's training ratings)."""
        k = max(0, min(k, self.num_items))
        key = self.item_bias if self.kind == "bias" else self.item_counts
        order = np.argsort(-key, kind="stable")[:k]
        return self._ranking(order, self.fallback_tables[2][order], fallback=True)

    def recommend(self, user_id: Any, k: int = 10, exclude_seen: bool = True, strict: bool = False) -> Ranking:
        """The top-k items for one user by predicted rating.

        Args:
          user_id: a raw user id.
          k: how many items (fewer when the user has rated nearly everything).
          exclude_seen: leave out the items the user rated in training.
          strict: raise for an unknown user instead of the cold-start answer.

        Returns:
          A :class:`Ranking` of item ids, titles and float32[k] predicted ratings; for an unknown
          user, :meth:`cold_start` (flagged ``fallback``).

        Raises:
          UnknownIdError: with ``strict`` and an unknown user.
        """
        return self.recommend_many([user_id], k, exclude_seen, strict)[0]

    def recommend_many(
        self, user_ids: Sequence, k: int = 10, exclude_seen: bool = True, strict: bool = False
    ) -> list[Ranking]:
        """:meth:`recommend` for several users, batched on the device (``USERS_PER_CALL`` at a time)."""
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        users, known = self.lookup_users(user_ids, strict)
        results: list[Ranking | None] = [None] * len(users)
        known_positions = np.flatnonzero(known)
        top = min(k, self.num_items)
        for start in range(0, len(known_positions), USERS_PER_CALL):
            block = known_positions[start : start + USERS_PER_CALL]
            block_users = users[block]
            size = len(block_users)
            padded = _bucket(size)
            if exclude_seen:
                seen = [self.seen(int(u)) for u in block_users]
                rows = np.repeat(np.arange(size, dtype=np.int32), [len(s) for s in seen])
                cols = np.concatenate(seen).astype(np.int32) if seen else np.zeros(0, np.int32)
            else:
                rows = cols = np.zeros(0, np.int32)
            # Pad the mask with row `padded` (out of range, dropped by the scatter).
            mask_size = _bucket(max(1, len(rows)))
            rows = np.pad(rows, (0, mask_size - len(rows)), constant_values=padded)
            cols = np.pad(cols, (0, mask_size - len(cols)))
            scores, items = _top_k_unseen(
                self._params, np.pad(block_users.astype(np.int32), (0, padded - size)), rows, cols, top, self.y_range
            )
            scores, items = np.asarray(scores)[:size], np.asarray(items)[:size]
            for position, row_scores, row_items in zip(block.tolist(), scores, items):
                keep = np.isfinite(row_scores)
                results[position] = self._ranking(row_items[keep], row_scores[keep])
        if not known.all():
            cold = self.cold_start(k)
            for position in np.flatnonzero(~known).tolist():
                results[position] = cold
        return results

    # ------------------------------------------------------------------------------ items

    @functools.cached_property
    def _unit_items(self) -> jax.Array:
        norms = np.linalg.norm(self.item_embedding, axis=1, keepdims=True)
        # An all-zero row has no direction; dividing by a tiny floor keeps its cosine at 0, not NaN.
        return jnp.asarray(self.item_embedding / np.maximum(norms, 1e-12))

    def similar_items(self, item_id: Any, k: int = 10, min_ratings: int = 1) -> Ranking:
        """Items whose embeddings have the highest cosine similarity with ``item_id``'s.

        Args:
          item_id: a raw item id (it is never in its own answer).
          k: how many items.
          min_ratings: leave out items with fewer training ratings; an item nobody rated in
            training still has its random initial embedding, so its cosine means nothing.

        Returns:
          A :class:`Ranking` with float32[k] cosine similarities, highest first.

        Raises:
          UnknownIdError: for an unknown item (there is no fallback for similarity).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        index, _ = self._lookup(
            self.item_ids, _as_1d(item_id), "item", True, "similar items need an item the model was trained on"
        )
        query = int(index[0])
        excluded = self.item_counts < min_ratings
        excluded[query] = True
        top = min(k, self.num_items)
        scores, items = _top_k_cosine(self._unit_items, query, jnp.asarray(excluded), top)
        scores, items = np.asarray(scores), np.asarray(items)
        keep = np.isfinite(scores)
        return self._ranking(items[keep], scores[keep])

    def bias_ranking(self, side: str = "item", k: int = 10, lowest: bool = False, min_ratings: int = 0) -> Ranking:
        """Users or items ranked by learned bias (bias model only).

        Args:
          side: ``"item"`` or ``"user"``.
          k: how many.
          lowest: the lowest biases first instead of the highest.
          min_ratings: only rows with at least this many training ratings (few ratings, noisy bias).

        Returns:
          A :class:`Ranking` of raw ids with float32[k] biases (logit units); titles for items.

        Raises:
          ModelError: for the dot model, which has no biases.
        """
        if self.kind != "bias":
            raise ModelError(f"bias rankings need the bias model; this model is {self.kind!r}")
        if side not in ("item", "user"):
            raise ValueError(f"side must be 'item' or 'user'; got {side!r}")
        bias, counts = (self.item_bias, self.item_counts) if side == "item" else (self.user_bias, self.user_counts)
        candidates = np.flatnonzero(counts >= min_ratings)
        order = candidates[np.argsort(bias[candidates] if lowest else -bias[candidates], kind="stable")][:k]
        if side == "item":
            return self._ranking(order, bias[order])
        return Ranking(self.user_ids.raw[order], [None] * len(order), bias[order].astype(np.float32))


def load_model(path: str | Path) -> Model:
    """Loads an exported model (every file checked against its sha256).

    Args:
      path: a training workdir (its ``model/`` folder is used) or an export directory.

    Raises:
      ModelError: missing directory or metadata, a tampered or truncated file, inconsistent contents.
    """
    from jaxcf.ensemble import read_any  # an ensemble export, or a single model's (read_export)

    return Model(read_any(path))


# ------------------------------------------------------------------------------------- CLI


def format_ranking(ranking: Ranking, score_name: str, id_name: str = "item") -> str:
    """A plain-text table: rank, id, score, title."""
    width = max([len(id_name)] + [len(str(v)) for v in ranking.ids.tolist()])
    lines = [f"rank  {id_name:>{width}}  {score_name:>9}  title"]
    for rank, (raw, title, score) in enumerate(zip(ranking.ids.tolist(), ranking.titles, ranking.scores.tolist()), 1):
        shown = title if title is not None else "(no title)"
        lines.append(f"{rank:>4}  {str(raw):>{width}}  {score:>9.4f}  {shown}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jaxcf.recommend", description="Top-k unseen items for a user, by predicted rating."
    )
    parser.add_argument("--model", required=True, help="a training workdir or an exported model folder")
    parser.add_argument("--user", required=True, help="raw user id (as in the ratings file)")
    parser.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    parser.add_argument("--include-seen", action="store_true", help="also rank items the user rated in training")
    parser.add_argument("--strict", action="store_true", help="fail for an unknown user instead of the cold start")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.k < 1:
            raise ValueError(f"--k must be >= 1; got {args.k}")
        model = load_model(args.model)
        ranking = model.recommend(args.user, k=args.k, exclude_seen=not args.include_seen, strict=args.strict)
    except (ModelError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if ranking.fallback:
        how = "learned item bias" if model.kind == "bias" else "number of training ratings"
        print(
            f"user {args.user} is unknown to the model: cold-start answer (fallback), items ranked by {how}; "
            "predicted = the mean prediction over the item's training ratings"
        )
    else:
        index = int(model.lookup_users(args.user)[0][0])
        seen = "" if args.include_seen else f", excluding the {len(model.seen(index))} items they rated in training"
        print(f"top {len(ranking.ids)} for user {args.user} by predicted rating{seen}")
    print(format_ranking(ranking, "predicted"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

