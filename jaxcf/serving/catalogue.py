"""Top-k over the whole catalogue as compiled calls: unseen items for a block of users, cosine
neighbours of an item, and what a user has already seen.

Every item is scored at once (``jaxcf.core.models.score_block``), the items a user has seen are masked out
(a ``bool[B, I]`` mask built on the host), and ``lax.top_k`` picks the best; blocks of users are
padded to powers of two and ``k`` is rounded up to one, so a handful of compiled shapes serves every
request. An ensemble's similar items use :func:`member_summary`.

What does not live here: raw-id lookups and the fallback (``jaxcf.serving.inference``, ``jaxcf.core.fallback``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.core.models import score_block
from jaxcf.core.scoring import bucket


@functools.partial(jax.jit, static_argnames=("k", "y_range"))
def top_k_masked(params, users, excluded, k, y_range):
    """Top-k items for a block of users, with the items of ``excluded`` left out.

    Args:
      users: int32[B] user indices.
      excluded: bool[B, I] items never returned to each user (e.g. those seen in training).

    Returns:
      (float32[B, k] scores, int32[B, k] items); excluded items score -inf (callers drop them).
    """
    scores = score_block(params, users, y_range)
    return jax.lax.top_k(jnp.where(excluded, -jnp.inf, scores), k)


# Every k up to this shares one compiled top-k (the extra candidates cost nothing next to the scores).
MIN_K = 16


def top_k(params, users: np.ndarray, excluded: np.ndarray, k: int, y_range) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_k_masked` for any number of users and any ``k``: the block padded to a power of two and
    ``k`` rounded up to one (few compiled shapes), the answer cut back. Returns host arrays."""
    size, rows = bucket(max(1, len(users))), len(users)
    wanted = min(bucket(max(MIN_K, k)), excluded.shape[1])
    padded_users = np.pad(users.astype(np.int32), (0, size - rows))
    padded_mask = np.pad(excluded, ((0, size - rows), (0, 0)))
    scores, items = top_k_masked(params, padded_users, padded_mask, wanted, y_range)
    return np.asarray(scores)[:rows, :k], np.asarray(items)[:rows, :k]


@functools.partial(jax.jit, static_argnames=("k",))
def top_k_cosine(unit_items, query, excluded, k):
    """Top-k cosine neighbours of item ``query``; ``excluded`` bool[I] items never returned."""
    cosine = jnp.matmul(unit_items, unit_items[query], precision=jax.lax.Precision.HIGHEST)
    return jax.lax.top_k(jnp.where(excluded, -jnp.inf, cosine), k)


def member_summary(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """2-D stand-ins of an ensemble's tables for what is not a prediction (similar items, bias rankings).

    Embeddings: each member's rows scaled to unit length and set side by side ([rows, K * F]), so the
    cosine of two rows is the mean of the members' cosines (a row that is zero in a member contributes
    0 there). Biases: the members' mean.
    """
    out = {}
    for name, table in weights.items():
        if name.endswith("embedding"):
            norms = np.linalg.norm(table, axis=2, keepdims=True)
            unit = table / np.maximum(norms, 1e-12)
            out[name] = np.concatenate(list(unit), axis=1) / math.sqrt(table.shape[0])
        else:
            out[name] = table.mean(axis=0)
    return out


def unit_rows(table: np.ndarray) -> jax.Array:
    """Rows scaled to unit length; an all-zero row has no direction and stays zero (cosine 0, not NaN)."""
    norms = np.linalg.norm(table, axis=1, keepdims=True)
    return jnp.asarray(table / np.maximum(norms, 1e-12))


class SeenItems:
    """The distinct items each user rated in training (CSR), and the masks of :func:`top_k_masked`.

    A rating repeated in the file is one item here.
    """

    def __init__(self, users: np.ndarray, items: np.ndarray, num_users: int, num_items: int):
        width = max(1, num_items)
        pairs = np.unique(users.astype(np.int64) * width + items.astype(np.int64))
        self.items = (pairs % width).astype(np.int32)
        self.start = np.searchsorted(pairs // width, np.arange(num_users + 1))

    def of(self, user: int) -> np.ndarray:
        """int32[m] distinct items of user ``user``."""
        return self.items[self.start[user] : self.start[user + 1]]

    def mask(self, block: np.ndarray, num_items: int) -> np.ndarray:
        """bool[len(block), num_items]: the items each user of ``block`` has seen."""
        out = np.zeros((len(block), num_items), bool)
        for row, user in enumerate(block.tolist()):
            out[row, self.of(user)] = True
        return out
