"""Folding users into an exported model: reading their ratings, solving them (``jaxcf.foldin``), and a
new export with the new ids, tables and training pairs.

What does not live here: the solver (``jaxcf.foldin``), the Model method that calls this
(``jaxcf.inference.Model.fold_in``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from jaxcf import export
from jaxcf.data.ids import IdMap
from jaxcf.errors import ModelError
from jaxcf.foldin import make_solver, solve_users


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
    """

    users_added: int
    users_updated: int
    ratings_used: int
    unknown_items: list
    unknown_item_ratings: int
    prior_scale: float


def fold_in(source, frame, *, user_col: str, item_col: str, rating_col: str,
            prior_scale: float | None = None):
    """A new export in which the users of ``frame`` are solved from their ratings (see the module docstring).

    New users are appended; a known user is solved again from their training ratings (kept in the
    export) and the new ones. Ratings of items the model does not know are reported, not used.

    Args:
      source: a ``jaxcf.export.Export``.
      frame: a pandas DataFrame with the three columns.

    Returns:
      (the new ``Export``, a :class:`Report`).

    Raises:
      ModelError: missing columns, missing ids, ratings that are not finite numbers, or user ids that
        cannot be ids of this model (text for an integer-id model).
    """
    if not isinstance(frame, pd.DataFrame):
        raise ModelError(f"fold_in takes a pandas DataFrame or a CSV path; got {type(frame).__name__}")
    missing = [c for c in (user_col, item_col, rating_col) if c not in frame.columns]
    if missing:
        raise ModelError(f"the ratings lack column(s) {', '.join(missing)}; they have: "
                         f"{', '.join(map(str, list(frame.columns)[:8])) or '(none)'}")
    ratings = pd.to_numeric(frame[rating_col], errors="coerce").to_numpy(np.float64)
    if len(ratings) == 0:
        raise ModelError("the ratings are empty; give at least one (user, item, rating) row")
    bad = ~np.isfinite(ratings)
    if bad.any():
        row = int(np.argmax(bad))
        raise ModelError(f"rating in row {row + 1} is {frame[rating_col].iloc[row]!r}; ratings must be finite numbers")
    for col in (user_col, item_col):
        if frame[col].isna().any():
            raise ModelError(f"missing {col} id in row {int(np.argmax(frame[col].isna().to_numpy())) + 1}")
    users_before = IdMap(source.user_ids)
    try:
        user_map, user_index = users_before.extend(frame[user_col].tolist())
    except ValueError as err:
        raise ModelError(f"user ids: {err}") from None
    item_index, item_known = IdMap(source.item_ids).lookup(frame[item_col].tolist())
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
                    list(dict.fromkeys(unknown.tolist()))[:100], int((~item_known).sum()), solver.prior_scale)
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


def ratings_frame(ratings, cols: tuple[str, str, str]):
    """A DataFrame of ratings: the one given, or a CSV read with its id columns as text (ids as written).

    Raises:
      ModelError: a missing or unreadable file, or something else than a DataFrame or a path.
    """

    if isinstance(ratings, pd.DataFrame):
        return ratings
    if isinstance(ratings, (str, Path)):
        path = Path(ratings)
        if not path.is_file():
            raise ModelError(f"{path}: no such ratings file; give a CSV with columns {', '.join(cols)}")
        try:
            return pd.read_csv(path, dtype={cols[0]: str, cols[1]: str}, keep_default_na=False, na_values=[""])
        except (ValueError, OSError, UnicodeDecodeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ModelError(f"{path}: cannot read the ratings ({first})") from None
    raise ModelError(f"ratings must be a pandas DataFrame or a CSV path; got {type(ratings).__name__}")
