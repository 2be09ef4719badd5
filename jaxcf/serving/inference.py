"""Using a trained model: predictions for raw ids, top-k recommendations, similar items and bias rankings.

    model = jaxcf.load_model("runs/bias")          # a training workdir or its model/ folder
    model.predict([1, 1], [31, 999999])            # Predictions(ratings, fallback, ...)
    model.recommend(1, k=10)                        # Ranking(ids, titles, scores, fallback)
    model.similar_items(260, k=10)

Raw ids are matched exactly (``jaxcf.data.ids``): an integer id, or its canonical text (``"10"``);
``"1e1"``, ``"010"`` or ``10.5`` match nothing. Ids the model was not trained on get the flagged
fallback of ``jaxcf.core.fallback`` (or ``UnknownIdError`` with ``strict=True``): ids it has never seen,
and ids it has a table row for but no training rating (they appeared only in the validation or test
part), whose rows were never trained. Items without training ratings are never recommended and never
similar. An ensemble's predictions and
top-k use all its members (their mean); its similar items and bias rankings use 2-D summaries
(``jaxcf.serving.catalogue.member_summary``).

This module imports no training code, no optax and no orbax (``tests/test_layers.py`` checks).

One concept at some length: the :class:`Model`, every question a trained model answers for raw ids.

What does not live here: reading and verifying the export (``jaxcf.serving.export``), the scoring rule
(``jaxcf.core.models``), compiled top-k (``jaxcf.serving.catalogue``), the CLIs (``jaxcf.cli.predict``,
``jaxcf.cli.recommend``, ``jaxcf.cli.similar``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf import families
from jaxcf.core import fallback as policy
from jaxcf.core import metrics, scoring
from jaxcf.core.errors import ModelError, UnknownIdError
from jaxcf.core.family import SIGMOID
from jaxcf.data.ids import IdMap
from jaxcf.serving import catalogue, export, heldout
from jaxcf.serving import foldin as foldin_export
from jaxcf.serving.answers import Predictions, Ranking, as_list, check_k
from jaxcf.serving.export import Export

# Users per device call in recommend_many(): a [users, num_items] score block (ml-25m: 62k items,
# 256 users = 64 MB of float32).
USERS_PER_CALL = 256
FALLBACKS = policy.FALLBACKS


class Model:
    """A trained model (loaded from an export, or fresh from ``jaxcf.fit``), with inference for raw ids.

    Attributes:
      kind: the model family (``model.kind``: see ``jaxcf.families``).
      spec: the family's spec (what answers for it: fold-in, the cold start).
      feedback: ``"explicit"`` (predictions are ratings) or ``"implicit"`` (scores that order items).
      has_biases: the biased model's tables and scaled sigmoid (``y_range`` is set).
      y_range: (low, high) of the biased model's scaled sigmoid; None for the dot model.
      metadata: ``metadata.json``.
      history: the training records (``metadata["metrics"]``; the last is the exported model's).
      path: the export directory (None for a model trained in memory and not saved).
      user_ids, item_ids: :class:`IdMap` of raw ids; ``user_ids.raw[i]`` is row ``i``.
      user_embedding: float32[num_users, F]; item_embedding: float32[num_items, F].
      user_bias, item_bias: float32[num_users], float32[num_items] (bias model), else None.
      user_counts, item_counts: int64 training ratings per row (from ``seen.safetensors``).
      titles: list of num_items titles (None where unknown).
    """

    def __init__(self, source: Export):
        self.export = source
        self.metadata = source.metadata
        self.path = source.path
        model_info = source.metadata["model"]
        self.spec = families.for_export(model_info)  # the family that answers for it (fold-in, cold start)
        self.kind: str = self.spec.name
        self.feedback: str = self.spec.feedback
        self.has_biases = families.export_scoring(model_info) == SIGMOID
        self.y_range = tuple(float(v) for v in model_info["y_range"]) if self.has_biases else None
        self.ensemble_size: int | None = model_info.get("ensemble_size")
        self.user_ids = IdMap(source.user_ids)
        self.item_ids = IdMap(source.item_ids)
        weights = source.weights
        shown = catalogue.member_summary(weights) if weights["user_embedding"].ndim == 3 else weights
        self.user_embedding = shown["user_embedding"]
        self.item_embedding = shown["item_embedding"]
        self.user_bias = shown["user_bias"][:, 0] if "user_bias" in shown else None
        self.item_bias = shown["item_bias"][:, 0] if "item_bias" in shown else None
        self.seen_users = source.seen_users
        self.seen_items = source.seen_items
        self.user_counts = np.bincount(self.seen_users, minlength=self.num_users)
        self.item_counts = np.bincount(self.seen_items, minlength=self.num_items)
        self.user_trained, self.item_trained = self.user_counts > 0, self.item_counts > 0
        self._seen = catalogue.SeenItems(self.seen_users, self.seen_items, self.num_users, self.num_items)
        self.titles: list = [None] * self.num_items
        if source.titles:
            positions, known = self.item_ids.lookup([k for k, _ in source.titles])
            for position, is_known, (_, title) in zip(positions.tolist(), known.tolist(), source.titles):
                if is_known:
                    self.titles[position] = str(title)
        self._answers = metrics.Answers(weights, self.y_range, self.seen_users, self.seen_items, self.num_users,
                                        self.num_items)
        self._params = self._answers.params

    # ------------------------------------------------------------------------------ basics

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def history(self) -> list[dict]:
        """The training records (what ``metrics.jsonl`` holds; the last is the exported model's)."""
        return list(self.metadata.get("metrics") or [])

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "in memory"
        return f"Model(kind={self.kind!r}, users={self.num_users}, items={self.num_items}, path={where!r})"

    def save(self, path: str | Path) -> Path:
        """Writes the model as an export folder (what ``load_model`` reads), replacing any export there
        as a whole; a training workdir's ``model/`` is used when ``path`` is a workdir.

        Returns:
          The export folder.
        """
        path = Path(path)
        folder = path / export.EXPORT_DIR if (path / "config.yaml").is_file() else path
        export.save(self.export, folder)
        self.path = folder
        return folder

    def seen(self, user_index: int) -> np.ndarray:
        """int32[m] distinct item indices that user ``user_index`` rated in training."""
        return self._seen.of(user_index)

    def title(self, item_id: Any) -> str | None:
        """The title of a raw item id, or None."""
        index, known = self.item_ids.lookup([item_id])
        return self.titles[int(index[0])] if known[0] else None

    @property
    def fallback_tables(self) -> policy.Tables:
        """The fallback policy's mean predictions (``jaxcf.core.fallback``), computed on first use."""
        return self._answers.tables

    def fallback_rule(self, user_known: bool, item_known: bool) -> str:
        """The fallback used for a pair, in words (empty when both ids are known)."""
        return policy.rule(self.fallback_tables, user_known, item_known)

    # ------------------------------------------------------------------------------ predict

    def lookup_users(self, user_ids: Any, strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Raw user ids -> (int32[n] indices, -1 where not in the id map; bool[n] known: in the map and
        trained, i.e. with at least one training rating).

        Raises:
          UnknownIdError: with ``strict`` when any id is unknown.
        """
        return self._lookup(self.user_ids, self.user_trained, as_list(user_ids), "user", strict)

    def lookup_items(self, item_ids: Any, strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Raw item ids -> (int32[n] indices, -1 where not in the id map; bool[n] known: in the map and
        trained).

        Raises:
          UnknownIdError: with ``strict`` when any id is unknown.
        """
        return self._lookup(self.item_ids, self.item_trained, as_list(item_ids), "item", strict)

    def _lookup(self, id_map: IdMap, trained: np.ndarray, raw: list, what: str, strict: bool, hint: str = ""):
        indices, in_map = id_map.lookup(raw)
        known = in_map & trained[np.maximum(indices, 0)] if len(indices) else in_map
        if strict and not known.all():
            bad = int(np.argmax(~known))
            first = raw[bad]
            shown = first if isinstance(first, str) else repr(first)
            more = int((~known).sum()) - 1
            also = f" (and {more} more)" if more else ""
            hint = hint or "use a known id; without strict mode, unknown ids get the documented fallback"
            if in_map[bad]:
                raise UnknownIdError(
                    f"{what} id {shown}{also} has no training rating in this model (it appeared only in the "
                    f"validation or test data, so its row was never trained); {hint}")
            raise UnknownIdError(
                f"unknown {what} id {shown}{also}: not among the {len(id_map)} {what}s the model was trained on; {hint}"
            )
        return indices, known

    def predict(self, user_ids: Any, item_ids: Any, strict: bool = False, fallback: str = "mean") -> Predictions:
        """Predicted ratings for pairs of raw ids.

        Args:
          user_ids, item_ids: raw ids, scalars or sequences of one length (a scalar is repeated).
          strict: raise on unknown ids instead of falling back.
          fallback: ``"mean"`` (the default policy of ``jaxcf.core.fallback``) or ``"known_terms"``
            (Surprise's literal rule; the dot model has no per-side terms, so it uses ``"mean"``).

        Returns:
          :class:`Predictions` with float32[n] ratings and bool[n] fallback flags.

        Raises:
          UnknownIdError: with ``strict`` and an unknown id.
          ValueError: when the two sequences have different lengths, or an unknown ``fallback``.
        """
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback={fallback!r}: choose one of {', '.join(FALLBACKS)}")
        users_raw, items_raw = as_list(user_ids), as_list(item_ids)
        if len(users_raw) == 1 and len(items_raw) != 1:
            users_raw = users_raw * len(items_raw)
        elif len(items_raw) == 1 and len(users_raw) != 1:
            items_raw = items_raw * len(users_raw)
        if len(users_raw) != len(items_raw):
            raise ValueError(f"predict: {len(users_raw)} user ids but {len(items_raw)} item ids; pass one of each")
        users, user_known = self.lookup_users(users_raw, strict)
        items, item_known = self.lookup_items(items_raw, strict)
        both = user_known & item_known
        if fallback == "known_terms" and self.has_biases:
            ratings = policy.known_terms(self.user_bias, self.item_bias, self.y_range, users, items, user_known,
                                         item_known)
            if both.any():
                ratings[both] = self._answers.score_known(users[both], items[both])
        else:
            ratings, _, _ = self._answers(np.where(user_known, users, -1), np.where(item_known, items, -1))
        return Predictions(ratings, ~both, user_known, item_known)

    # ------------------------------------------------------------------------------ recommend

    def scores(self, user_ids: Any) -> np.ndarray:
        """float32[n, num_items]: every item's score for known users (column j is ``item_ids.raw[j]``),
        as :meth:`predict` answers each pair (seen items included); ensembles give their members' mean. An
        item without training ratings gets the user's fallback (their mean prediction), as from predict.

        Raises:
          UnknownIdError: for an unknown user (they have no scores; :meth:`recommend` has a cold start).
        """
        users, _ = self.lookup_users(user_ids, strict=True)
        out = scoring.score_rows(self._params, users, self.y_range)
        if not self.item_trained.all():
            out[:, ~self.item_trained] = self.fallback_tables.per_user[users][:, None]
        return out

    def _ranking(self, indices: np.ndarray, scores: np.ndarray, is_fallback: bool = False) -> Ranking:
        indices = np.asarray(indices, np.int64)
        return Ranking(
            self.item_ids.raw[indices], [self.titles[i] for i in indices.tolist()],
            np.asarray(scores, np.float32), is_fallback,
        )

    def cold_start(self, k: int = 10) -> Ranking:
        """The answer for an unknown user, flagged ``fallback``: the bias model's items by learned
        item bias, the others' by number of training ratings, each scored with its unknown-user
        fallback (the mean prediction over the item's training ratings); only trained items."""
        k = min(check_k(k), int(self.item_trained.sum()))
        key = policy.cold_start_key(self.item_bias if self.spec.cold_start_by_bias else None, self.item_counts)
        order = np.argsort(-key, kind="stable")[:k]
        return self._ranking(order, self.fallback_tables.per_item[order], is_fallback=True)

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
          ValueError: for k < 1.
        """
        return self.recommend_many([user_id], k, exclude_seen, strict)[0]

    def recommend_many(
        self, user_ids: Sequence, k: int = 10, exclude_seen: bool = True, strict: bool = False
    ) -> list[Ranking]:
        """:meth:`recommend` for several users, batched on the device (``USERS_PER_CALL`` at a time)."""
        k = check_k(k)
        users, known = self.lookup_users(user_ids, strict)
        results: list[Ranking | None] = [None] * len(users)
        known_positions = np.flatnonzero(known)
        top = min(k, self.num_items)
        for start in range(0, len(known_positions), USERS_PER_CALL):
            block = known_positions[start : start + USERS_PER_CALL]
            block_users = users[block]
            excluded = (self._seen.mask(block_users, self.num_items) if exclude_seen
                        else np.zeros((len(block), self.num_items), bool))
            excluded |= ~self.item_trained[None, :]  # an untrained item's row is no answer
            scores, items = catalogue.top_k(self._params, block_users, excluded, top, self.y_range)
            for position, row_scores, row_items in zip(block.tolist(), scores, items):
                keep = np.isfinite(row_scores)
                results[position] = self._ranking(row_items[keep], row_scores[keep])
        if not known.all():
            cold = self.cold_start(k)
            for position in np.flatnonzero(~known).tolist():
                results[position] = cold
        return results

    # ------------------------------------------------------------------------------ fold-in

    def columns(self) -> tuple[str, str, str]:
        """The (user, item, rating) column names of the model's training data (its config's)."""
        data = (self.metadata.get("config") or {}).get("data") or {}
        return data.get("user_col", "userId"), data.get("item_col", "movieId"), data.get("rating_col", "rating")

    def evaluate(self, ratings: Any, *, user_col: str | None = None, item_col: str | None = None,
                 rating_col: str | None = None) -> dict:
        """The metrics a run records, on held-out ratings (``jaxcf.serving.heldout``): for a rating model ``rmse``,
        ``mae``, ``rmse_known``, ``rows``, ``rows_known`` (every row answered as :meth:`predict` answers it)
        and the ranking metrics; for an implicit-feedback model the ranking metrics of its protocol.

        Args:
          ratings: a DataFrame or a CSV path with (user, item, rating) rows; the columns default to the
            training config's ``data.user_col`` / ``item_col`` / ``rating_col``.

        Raises:
          ModelError: unreadable ratings, missing columns or ids, ratings that are not finite numbers.
        """
        default = self.columns()
        cols = (user_col or default[0], item_col or default[1], rating_col or default[2])
        return heldout.evaluate(self, foldin_export.ratings_frame(ratings, cols), cols)

    def fold_in(self, ratings: Any, *, user_col: str | None = None, item_col: str | None = None,
                rating_col: str | None = None, prior_scale: float | None = None) -> Model:
        """A new model in which the users of ``ratings`` are solved from them (``jaxcf.core.foldin``).

        New users are added; known users are solved again from their training ratings and these.
        The item side is frozen; this model is untouched. ``new.fold_in_report`` says what was done,
        including the ratings of items this model does not know (not used; not an error).

        Args:
          ratings: a DataFrame or a CSV path with (user, item, rating) rows; the columns default to
            the training config's ``data.user_col`` / ``item_col`` / ``rating_col``.
          prior_scale: the strength of the prior fitted to the model's users (the regularisation).

        Raises:
          ModelError: unreadable ratings, missing columns or ids, non-finite ratings.
        """
        default = self.columns()
        cols = (user_col or default[0], item_col or default[1], rating_col or default[2])
        frame = foldin_export.ratings_frame(ratings, cols)
        result, report = foldin_export.fold_in(self.export, frame, user_col=cols[0], item_col=cols[1],
                                               rating_col=cols[2], prior_scale=prior_scale)
        folded = Model(result)
        folded.fold_in_report = report
        return folded

    @functools.lru_cache(maxsize=4)  # noqa: B019 (a model is long-lived; one solver per prior scale)
    def _solver(self, prior_scale: float | None):
        return foldin_export.make_solver(self.export.weights, self.metadata, self.user_counts, prior_scale)

    def recommend_from_ratings(self, item_ids: Sequence, ratings: Sequence[float], k: int = 10,
                               prior_scale: float | None = None) -> tuple[Ranking, list]:
        """Top-k for a user known only by these ratings, solved on the fly; this model is unchanged.

        Returns:
          (the :class:`Ranking`, which excludes the rated items; the ids of rated items this model does
          not know, which were not used).

        Raises:
          ValueError: lengths that differ, non-finite ratings, k < 1.
        """
        k = check_k(k)
        items_raw, values = as_list(item_ids), np.asarray(as_list(ratings), np.float64)
        if len(items_raw) != len(values):
            raise ValueError(f"{len(items_raw)} items but {len(values)} ratings; give one rating per item")
        if not np.all(np.isfinite(values)):
            raise ValueError("ratings must be finite numbers")
        low, high = foldin_export.rating_scale(self.export)
        outside = (values < low) | (values > high)
        if outside.any():
            raise ValueError(f"rating {values[int(np.argmax(outside))]:g} is outside this model's rating scale "
                             f"[{low:g}, {high:g}]; give ratings on that scale")
        items, known = self.lookup_items(items_raw)  # an untrained item's row cannot inform the solve
        top, scores = foldin_export.top_k_for_ratings(self._solver(prior_scale), self._params, items[known],
                                               values[known], min(k, self.num_items), self.y_range,
                                               candidates=self.item_trained)
        return self._ranking(top, scores), [raw for raw, ok in zip(items_raw, known) if not ok]

    # ------------------------------------------------------------------------------ items

    @functools.cached_property
    def _unit_items(self) -> jax.Array:
        return catalogue.unit_rows(self.item_embedding)

    def similar_items(self, item_id: Any, k: int = 10, min_ratings: int = 1) -> Ranking:
        """Items whose embeddings have the highest cosine similarity with ``item_id``'s.

        Args:
          item_id: one raw item id (it is never in its own answer).
          k: how many items.
          min_ratings: leave out items with fewer training ratings. An item nobody rated in training
            still has its random initial embedding, so its cosine means nothing: it is always left out
            (``min_ratings`` 0 is 1).

        Returns:
          A :class:`Ranking` with float32[k] cosine similarities, highest first.

        Raises:
          UnknownIdError: for an unknown item (there is no fallback for similarity).
          ValueError: for a sequence of ids (one item at a time) or k < 1.
        """
        k = check_k(k)
        if not (isinstance(item_id, (str, bytes)) or np.ndim(item_id) == 0):
            raise ValueError(f"similar_items takes one item id; got {len(item_id)}: call it once per item")
        index, _ = self._lookup(self.item_ids, self.item_trained, as_list(item_id), "item", True,
                                "similar items need an item the model was trained on")
        query = int(index[0])
        excluded = self.item_counts < max(1, min_ratings)
        excluded[query] = True
        wanted = min(scoring.bucket(max(catalogue.MIN_K, k)), self.num_items)  # few compiled shapes
        scores, items = catalogue.top_k_cosine(self._unit_items, query, jnp.asarray(excluded), wanted)
        scores, items = np.asarray(scores)[:k], np.asarray(items)[:k]
        keep = np.isfinite(scores)
        return self._ranking(items[keep], scores[keep])

    def bias_ranking(self, side: str = "item", k: int = 10, lowest: bool = False, min_ratings: int = 0) -> Ranking:
        """Users or items ranked by learned bias (bias model only).

        Args:
          side: ``"item"`` or ``"user"``.
          k: how many.
          lowest: the lowest biases first instead of the highest.
          min_ratings: only rows with at least this many training ratings (few ratings, noisy bias; an
            untrained row's bias is its initial value, so 0 means 1).

        Returns:
          A :class:`Ranking` of raw ids with float32[k] biases (logit units); titles for items.

        Raises:
          ModelError: for the dot model, which has no biases.
          ValueError: for k < 1 or an unknown side.
        """
        if not self.has_biases:
            raise ModelError(f"bias rankings need a model with biases; this model is {self.kind!r}")
        k = check_k(k)
        if side not in ("item", "user"):
            raise ValueError(f"side must be 'item' or 'user'; got {side!r}")
        bias, counts = (self.item_bias, self.item_counts) if side == "item" else (self.user_bias, self.user_counts)
        candidates = np.flatnonzero(counts >= max(1, min_ratings))
        order = candidates[np.argsort(bias[candidates] if lowest else -bias[candidates], kind="stable")][:k]
        if side == "item":
            return self._ranking(order, bias[order])
        return Ranking(self.user_ids.raw[order], [None] * len(order), bias[order].astype(np.float32))


def load_model(path: str | Path) -> Model:
    """Loads an exported model (every file checked against its sha256 and size).

    Args:
      path: a training workdir (its ``model/`` folder is used) or an export directory.

    Raises:
      ModelError: missing directory or metadata, a tampered or truncated file, inconsistent contents.
    """
    return Model(export.read(path))
