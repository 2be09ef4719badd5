"""A trained model's metrics on held-out ratings from anywhere: a file or a DataFrame of (user, item, rating)
rows, scored by the code that scores a run's validation and test parts.

- A rating model: every row answered exactly as ``Model.predict`` answers it (``jaxcf.core.metrics.Answers``:
  the model's prediction where both ids were trained, the flagged fallback elsewhere), giving
  ``rmse``, ``mae``, ``mse`` over every row, ``rmse_known`` / ``mae_known`` over rows whose two ids were
  trained, the counts ``rows``, ``rows_known``, ``rows_fallback``, and the ranking metrics
  (``precision@k``, ``recall@k``, ``ndcg@k``; recommendations as ``Model.recommend`` makes them, users
  the model does not know ranked by its cold start).
- An implicit-feedback model: the rows rated at least the model's interaction threshold are the
  held-out interactions, ranked as the training records rank them (``jaxcf.core.ranking.implicit_metrics``:
  recall, NDCG, MAP, hit rate and coverage at 10, 20 and 50, MRR), with ``rows`` and
  ``rows_interactions``.

Ids are matched exactly as the model's (``jaxcf.data.ids``). What does not live here: the metrics
(``jaxcf.core.metrics``, ``jaxcf.core.ranking``), the CLI (``jaxcf.cli.evaluate``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxcf import families
from jaxcf.core import metrics, ranking
from jaxcf.core.errors import DataError, ModelError
from jaxcf.core.family import SIGMOID
from jaxcf.core.models import score_block
from jaxcf.data.ratings import column_problem, rating_values
from jaxcf.serving.export import implicit_threshold


def checked_ratings(frame: pd.DataFrame, cols: tuple[str, str, str], source: str = "the ratings") -> np.ndarray:
    """float64[n] the rating column of ``frame``, checked as training checks ratings (numbers, finite), with
    both id columns present, once each, and no id missing.

    Raises:
      ModelError: a missing or repeated column, a missing id, an empty table, a rating that is not a finite
        number.
    """
    user_col, item_col, rating_col = cols
    problem = column_problem(frame, cols)
    if problem:
        raise ModelError(f"{source}: {problem}")
    if len(frame) == 0:
        raise ModelError(f"{source}: empty; give at least one (user, item, rating) row")
    for col in (user_col, item_col):
        if frame[col].isna().any():
            raise ModelError(f"{source}: missing {col} id in row {int(np.argmax(frame[col].isna().to_numpy())) + 1}")
    try:
        return rating_values(frame[rating_col], source, rating_col)
    except DataError as err:
        raise ModelError(str(err)) from None


def _user_indices(model, raw: list) -> np.ndarray:
    """Indices of raw user ids; each id the model's map lacks gets an index of its own past the table."""
    indices, _ = model.user_ids.lookup(raw)
    missing = indices < 0
    if missing.any():
        codes, _ = pd.factorize(pd.Series(raw, dtype=object)[missing].astype(str))
        indices = indices.astype(np.int64)
        indices[missing] = model.num_users + codes
    return indices.astype(np.int64)


def evaluate(model, frame: pd.DataFrame, cols: tuple[str, str, str]) -> dict:
    """The metrics of ``model`` on the rows of ``frame`` (see the module docstring).

    Args:
      model: a ``jaxcf.serving.inference.Model``.
      frame: the held-out rows.
      cols: the (user, item, rating) column names.

    Raises:
      ModelError: unusable rows (``checked_ratings``).
    """
    values = checked_ratings(frame, cols)
    users = _user_indices(model, frame[cols[0]].tolist())
    items, _ = model.item_ids.lookup(frame[cols[1]].tolist())
    items = items.astype(np.int64)
    if model.feedback == "implicit":
        return _implicit(model, users, items, values)
    out = metrics.part_metrics(model._answers, users, items, values, "")
    out["rows_fallback"] = out["rows"] - out["rows_known"]
    return out


def _implicit(model, users: np.ndarray, items: np.ndarray, values: np.ndarray) -> dict:
    threshold = implicit_threshold(model.metadata)
    use = (values >= threshold) & (items >= 0)
    params = model._answers.params

    def score(block):
        return score_block(params, np.minimum(np.asarray(block, np.int32), model.num_users - 1), None)

    out = ranking.implicit_metrics(score, model.num_items, model.seen_users, model.seen_items, users[use], items[use])
    out.update(rows=int(len(values)), rows_interactions=int(use.sum()), implicit_threshold=threshold)
    return out


def split_metrics(source, dataset) -> dict:
    """An export's metrics on a dataset's validation and test parts, as a run's closing record holds them:
    for a rating model ``jaxcf.core.metrics.final_metrics``, for an implicit one the protocol's ranking
    metrics (``jaxcf.core.ranking.split_implicit_metrics``)."""
    spec = families.for_export(source.model)
    if spec.implicit:
        params = {name: jnp.asarray(table) for name, table in source.weights.items()}
        return ranking.split_implicit_metrics(dataset, lambda users: score_block(params, jnp.asarray(users), None))
    y_range = tuple(source.model["y_range"]) if families.export_scoring(source.model) == SIGMOID else None
    return metrics.final_metrics(dataset, y_range, source.weights)
