"""Folding users into an exported model: reading their ratings, solving them (``jaxcf.core.foldin``), and a
new export with the new ids, tables and training pairs.

What does not live here: the solver (``jaxcf.core.foldin``), the Model method that calls this
(``jaxcf.serving.inference.Model.fold_in``).
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxcf import families
from jaxcf.core.errors import ModelError
from jaxcf.core.family import SIGMOID
from jaxcf.core.fileio import UnsafeFileError, read_regular
from jaxcf.core.foldin import solve_users
from jaxcf.data.ids import IdMap
from jaxcf.serving import export
from jaxcf.serving.catalogue import top_k
from jaxcf.serving.export import implicit_threshold
from jaxcf.serving.heldout import checked_ratings

# The largest ratings file fold-in reads.
MAX_RATINGS_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class Report:
    """What a fold-in did.

    Attributes:
      users_added: users new to the model.
      users_updated: known users whose rows were solved again (from their training ratings and the new ones).
      ratings_used: ratings the solves used (training ratings of updated users included).
      unknown_items: raw ids of items in the ratings that the model does not know (their ratings are
        not used; such items stay flagged fallbacks).
      unknown_item_ratings: how many ratings named them.
      prior_scale: the regularisation used.
      below_threshold: (implicit-feedback models) rows rated under the model's interaction threshold
        (``data.implicit_threshold``, as in training): not interactions, not used.
      users_without_interactions: (implicit-feedback models) users left out, having no interaction
        with an item the model knows; they stay unknown (the cold start answers them).
    """

    users_added: int
    users_updated: int
    ratings_used: int
    unknown_items: list
    unknown_item_ratings: int
    prior_scale: float
    below_threshold: int = 0
    users_without_interactions: int = 0


def fold_in(source, frame, *, user_col: str, item_col: str, rating_col: str,
            prior_scale: float | None = None):
    """A new export in which the users of ``frame`` are solved from their ratings (see the module docstring).

    New users are appended; a known user is solved again from their training ratings (kept in the
    export) and the new ones. Ratings of items the model does not know are reported, not used.

    Args:
      source: a ``jaxcf.serving.export.Export``.
      frame: a pandas DataFrame with the three columns.

    Returns:
      (the new ``Export``, a :class:`Report`).

    Raises:
      ModelError: missing columns, missing ids, ratings that are not finite numbers, or user ids that
        cannot be ids of this model (text for an integer-id model).
    """
    if not isinstance(frame, pd.DataFrame):
        raise ModelError(f"fold_in takes a pandas DataFrame or a CSV path; got {type(frame).__name__}")
    ratings = checked_ratings(frame, (user_col, item_col, rating_col))
    low, high = rating_scale(source)
    outside = (ratings < low) | (ratings > high)
    if outside.any():
        row = int(np.argmax(outside))
        raise ModelError(f"rating {ratings[row]:g} in row {row + 1} is outside this model's rating "
                         f"scale [{low:g}, {high:g}] (its training ratings'); fold-in takes ratings on that scale")
    frame, ratings, below, left_out = _interactions(source, frame, ratings, user_col, item_col)
    users_before = IdMap(source.user_ids)
    try:
        user_map, user_index = users_before.extend(frame[user_col].tolist())
    except ValueError as err:
        raise ModelError(f"user ids: {err}") from None
    item_index, item_known = trained_items(source, frame[item_col].tolist())
    unknown = frame[item_col][~item_known]
    solver = make_solver(source.weights, source.metadata,
                         np.bincount(source.seen_users, minlength=len(users_before)), prior_scale)

    affected = np.unique(user_index)
    position = {int(u): k for k, u in enumerate(affected.tolist())}
    new_users = np.asarray([position[int(u)] for u in user_index[item_known]], np.int64)
    history_users, history_items, history_ratings = [new_users], [item_index[item_known]], [ratings[item_known]]
    known_before = affected[affected < len(users_before)]
    if len(known_before) and source.seen_ratings is not None:
        mask = np.isin(source.seen_users, known_before)
        history_users.append(np.asarray([position[int(u)] for u in source.seen_users[mask]], np.int64))
        history_items.append(source.seen_items[mask])
        history_ratings.append(source.seen_ratings[mask].astype(np.float64))
    rows = solve_users(solver, np.concatenate(history_users), np.concatenate(history_items).astype(np.int64),
                       np.concatenate(history_ratings), len(affected))
    solved = solver.tables(rows)

    weights = {name: np.array(table) for name, table in source.weights.items()}
    grow = len(user_map) - len(users_before)
    for name, table in solved.items():
        current = weights[name]
        axis = 1 if current.ndim == 3 else 0
        if grow:
            pad = [(0, 0)] * current.ndim
            pad[axis] = (0, grow)
            current = np.pad(current, pad)
        if axis:
            current[:, affected] = table
        else:
            current[affected] = table
        weights[name] = current
    seen_users = np.concatenate([source.seen_users, user_index[item_known]]).astype(np.int32)
    seen_items = np.concatenate([source.seen_items, item_index[item_known]]).astype(np.int32)
    seen_ratings = None if source.seen_ratings is None else np.concatenate(
        [source.seen_ratings, ratings[item_known].astype(np.float32)])
    report = Report(int(grow), int(len(known_before)), int(sum(len(h) for h in history_items)),
                    list(dict.fromkeys(unknown.tolist()))[:100], int((~item_known).sum()), solver.prior_scale,
                    below, left_out)
    metadata = source.metadata
    model_info = {**metadata["model"], "num_users": len(user_map)}
    folds = [*model_info.get("fold_ins", []), {"users_added": report.users_added, "users_updated":
                                               report.users_updated, "ratings": int(item_known.sum()),
                                               "prior_scale": report.prior_scale}]
    model_info["fold_ins"] = folds
    titles = dict(source.titles) if source.titles else None
    result = export.build(
        params=weights, user_ids=user_map.raw, item_ids=source.item_ids, train_users=seen_users,
        train_items=seen_items, config=metadata.get("config", {}), model_info=model_info,
        data_info=metadata.get("data", {}), metrics=metadata.get("metrics", []), titles=titles,
        train_ratings=seen_ratings,
    )
    return result, report


def make_solver(weights: Mapping[str, np.ndarray], metadata: Mapping, counts: np.ndarray,
                prior_scale: float | None = None):
    """The fold-in solver of an export's family (its spec's maths, ``jaxcf.families``)."""
    return families.for_export(metadata["model"]).solver(weights, metadata, counts, prior_scale)


def rating_scale(source) -> tuple[float, float]:
    """The ratings a model can take: the biased model's output range; else the declared
    ``data.rating_range``; else the range of its training ratings (an implicit model's: any number)."""
    model = source.metadata["model"]
    if model.get("feedback") == "implicit":
        return -math.inf, math.inf  # interactions are ratings at or above the threshold; the value is not used
    if families.export_scoring(model) == SIGMOID:
        low, high = model["y_range"]
        return float(low), float(high)
    declared = ((source.metadata.get("config") or {}).get("data") or {}).get("rating_range")
    if declared:
        return float(declared[0]), float(declared[1])
    if source.seen_ratings is not None and len(source.seen_ratings):
        return float(source.seen_ratings.min()), float(source.seen_ratings.max())
    return -math.inf, math.inf


def trained_items(source, raw: list) -> tuple[np.ndarray, np.ndarray]:
    """(int32[n] indices, bool[n] known) of raw item ids; an item without training ratings is not known:
    its row was never trained, so its ratings cannot inform a solve."""
    index, known = IdMap(source.item_ids).lookup(raw)
    counts = np.bincount(source.seen_items, minlength=len(source.item_ids))
    return index, known & (counts[np.maximum(index, 0)] > 0) if len(index) else known


def _interactions(source, frame, ratings, user_col: str, item_col: str):
    """For an implicit-feedback model, the rows that are interactions with a known item, and the users
    that have one; (frame, ratings, rows under the threshold, users left out). Others pass through."""
    threshold = implicit_threshold(source.metadata)
    if threshold is None:
        return frame, ratings, 0, 0
    usable = ratings >= threshold
    _, item_known = trained_items(source, frame[item_col].tolist())
    with_one = frame[user_col][usable & item_known].unique()
    keep = usable & frame[user_col].isin(with_one).to_numpy()
    if not keep.any():
        raise ModelError(f"no row is an interaction with an item this model knows (a rating >= {threshold:g}, "
                         "the model's data.implicit_threshold); nothing to fold in")
    left_out = int(frame[user_col].nunique() - len(with_one))
    return frame[keep], ratings[keep], int((~usable).sum()), left_out


def ratings_frame(ratings, cols: tuple[str, str, str]):
    """A DataFrame of ratings: the one given, or a CSV read with its id columns as text (ids as written).

    Raises:
      ModelError: a missing or unreadable file, or something else than a DataFrame or a path.
    """

    if isinstance(ratings, pd.DataFrame):
        return ratings
    if isinstance(ratings, (str, Path)):
        path = Path(ratings)
        if not path.exists():
            raise ModelError(f"{path}: no such ratings file; give a CSV with columns {', '.join(cols)}")
        try:
            payload = read_regular(path, MAX_RATINGS_BYTES)
        except UnsafeFileError as err:
            raise ModelError(f"{err}; fold-in reads a regular CSV file of at most {MAX_RATINGS_BYTES >> 20} MiB "
                             "(train a model on more)") from None
        except OSError as err:
            raise ModelError(f"{path}: cannot read the ratings ({err.strerror})") from None
        try:
            return pd.read_csv(io.BytesIO(payload), dtype={cols[0]: str, cols[1]: str}, keep_default_na=False,
                               na_values=[""])
        except (ValueError, OSError, UnicodeDecodeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ModelError(f"{path}: cannot read the ratings ({first})") from None
    raise ModelError(f"ratings must be a pandas DataFrame or a CSV path; got {type(ratings).__name__}")


def top_k_for_ratings(solver, params: Mapping, items: np.ndarray, ratings: np.ndarray, k: int,
                      y_range, candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k items for one user solved from (items, ratings), the rated items excluded. For an
    implicit-feedback model only ratings at or above its interaction threshold count (as in training);
    with none, the answer is the average user's.

    Returns:
      (int[k'] item indices, float32[k'] predicted ratings), best first.
    """
    threshold = getattr(solver, "threshold", None)  # implicit feedback: only interactions count, as in training
    used = np.ones(len(items), bool) if threshold is None else ratings >= threshold
    if used.any() or threshold is None:
        rows = solve_users(solver, np.zeros(int(used.sum()), np.int64), items[used].astype(np.int64), ratings[used], 1)
        params = {**params, **{name: jnp.asarray(table) for name, table in solver.tables(rows).items()}}
    else:  # no interaction to solve from: the average user's row (ranks by mean predicted preference)
        params = {**params, "user_embedding": jnp.mean(jnp.asarray(params["user_embedding"]), axis=0, keepdims=True)}
    excluded = np.zeros((1, params["item_embedding"].shape[-2]), bool)
    if candidates is not None:  # only trained items are answers
        excluded[0] = ~np.asarray(candidates, bool)
    excluded[0, items] = True
    scores, top = top_k(params, np.zeros(1, np.int32), excluded, k, y_range)
    keep = np.isfinite(scores[0])
    return top[0][keep], scores[0][keep]
