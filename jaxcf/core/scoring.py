"""Scoring many pairs or rows in fixed-size device calls: the one chunked scorer.

Every chunk of a call has the same size (the tail is padded), so one compiled program serves a whole
array; requests of varying sizes round their call size up to a power of two (``round_up``), so a handful
of compiled shapes serves them all. On a mesh the pairs are placed once, split over its ``data`` axis
(``jaxcf.core.distributed.Layout.make_predict``).

- :func:`chunked`: ``fn`` over the leading axis of index arrays, in chunks (the mechanism).
- :func:`predict_pairs`: a model's predictions for (user, item) pairs (``jaxcf.core.models.score_pairs``).
- :func:`pair_predictor`: ``params -> predictions`` for fixed pairs, any scoring function, one device or a
  mesh (what a family scores its validation and test pairs with, every epoch).
- :func:`score_rows`: every item's score for blocks of users (``jaxcf.core.models.score_block``).

What does not live here: the scoring rule (``jaxcf.core.models``), what an answer is (``jaxcf.core.metrics``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.core.models import score_block, score_pairs

MIN_ROUND = 256  # the smallest call ``round_up`` makes: requests of 1-256 pairs share one compiled shape
USERS_PER_BLOCK = 256  # users per call of :func:`score_rows`


def bucket(n: int) -> int:
    """The power of two at or above ``n``: request sizes rounded so a few compiled shapes serve all."""
    return 1 << max(0, (n - 1).bit_length())


def chunked(fn: Callable, arrays: tuple[np.ndarray, ...], chunk: int, round_up: bool = False,
            min_size: int = MIN_ROUND, axis: int = -1) -> np.ndarray | None:
    """``fn(*padded chunk)`` over index arrays of one length n, concatenated along ``axis``.

    Args:
      fn: ``(*int32[size]) -> float32[...]`` with ``size`` entries along ``axis``.
      arrays: int[n] arrays (indices), the same length.
      chunk: the most entries per call; every call has the same size, the tail padded with index 0.
      round_up: the call size is ``min(chunk, the power of two at or above max(n, min_size))`` rather than
        ``min(chunk, n)``.
      axis: the axis of ``fn``'s result that the entries are on.

    Returns:
      The results on the host, or None when n is 0.
    """
    n = len(arrays[0])
    size = max(1, min(chunk, bucket(max(n, min_size)) if round_up else n))
    out = []
    for start in range(0, n, size):
        parts = [np.asarray(a[start : start + size], np.int32) for a in arrays]
        count = len(parts[0])
        if count < size:
            parts = [np.pad(p, (0, size - count)) for p in parts]
        result = np.asarray(fn(*(jnp.asarray(p) for p in parts)))
        out.append(np.take(result, np.arange(count), axis=axis))
    return np.concatenate(out, axis=axis) if out else None


def predict_pairs(
    params: Mapping[str, jax.Array],
    users: np.ndarray,
    items: np.ndarray,
    y_range: tuple[float, float] | None = None,
    *,
    chunk: int = 65536,
    per_member: bool = False,
    round_up: bool = False,
) -> np.ndarray:
    """``jaxcf.core.models.score_pairs`` over any number of index pairs (:func:`chunked`).

    Args:
      params: a model's tables, or an ensemble's stacked ones.
      users, items: int[n] indices in range.
      y_range: the biased model's output range; None for the dot model.
      chunk, round_up: as :func:`chunked`.
      per_member: an ensemble's per-member predictions instead of their mean.

    Returns:
      float32[n] (or float32[K, n] with ``per_member``) on the host.
    """
    y = tuple(float(v) for v in y_range) if y_range is not None else None
    out = chunked(lambda u, i: score_pairs(params, u, i, y, per_member), (users, items), chunk, round_up)
    if out is not None:
        return out
    members = next(iter(params.values())).shape[0] if per_member and params["user_embedding"].ndim == 3 else None
    return np.zeros((members, 0) if members else (0,), np.float32)


def pair_predictor(predict_fn: Callable, users: np.ndarray, items: np.ndarray, chunk: int,
                   layout=None) -> Callable[[object], np.ndarray]:
    """``params -> float32[..., n]`` predictions for the fixed pairs ``users, items`` on the host.

    Args:
      predict_fn: ``(params, users, items) -> float32[..., b]`` (pairs on the last axis); jitted here.
      users, items: int[n] indices.
      chunk: pairs per device call.
      layout: a ``jaxcf.core.distributed.Layout`` (sharded parameters), or None for one device.
    """
    if layout is not None:
        return layout.make_predict(predict_fn, users, items, chunk)
    jitted = jax.jit(predict_fn)
    return lambda params: chunked(functools.partial(jitted, params), (users, items), chunk)


@functools.partial(jax.jit, static_argnames=("y_range",))
def _score_block(params, users, y_range):
    return score_block(params, users, y_range)


def score_rows(params, users: np.ndarray, y_range) -> np.ndarray:
    """float32[n, I] host scores of every item for ``users``, a power-of-two block at a time (few shapes)."""
    out = chunked(lambda u: _score_block(params, u, y_range), (np.asarray(users),), USERS_PER_BLOCK, round_up=True,
                  min_size=1, axis=0)
    return out if out is not None else np.zeros((0, params["item_embedding"].shape[-2]), np.float32)
