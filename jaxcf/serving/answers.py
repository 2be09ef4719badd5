"""What inference answers with (``Predictions``, ``Ranking``), and the checks of its arguments.

What does not live here: the model that answers (``jaxcf.serving.inference``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class Predictions(NamedTuple):
    """Predictions for (user, item) pairs of raw ids.

    Attributes:
      ratings: float32[n] predicted ratings (the fallback value where ``fallback`` is set).
      fallback: bool[n] True where the user or the item is unknown (``jaxcf.core.fallback``).
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


def as_list(values: Any) -> list:
    """One raw id or a sequence of them, as a list (ids keep their Python types: no float coercion)."""
    if isinstance(values, (str, bytes)) or np.ndim(values) == 0:
        return [values.item() if isinstance(values, np.generic) else values]
    return list(values.tolist() if hasattr(values, "tolist") else values)


def check_k(k: Any) -> int:
    """``k`` as an int; ValueError unless it is an integer >= 1."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1; got {k!r}")
    return int(k)
