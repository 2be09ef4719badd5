"""Top-k over the whole catalogue as compiled calls: unseen items for a block of users, cosine
neighbours of an item, and what a user has already seen.

Every item is scored at once (``jaxcf.models.score_block``), the user's training items are masked
with one scatter, and ``lax.top_k`` picks the best; blocks are padded to powers of two so a handful
of compiled shapes serves every request. An ensemble's similar items use :func:`member_summary`.

What does not live here: raw-id lookups and the fallback (``jaxcf.inference``, ``jaxcf.fallback``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.evaluate import bucket
from jaxcf.models import score_block


@functools.partial(jax.jit, static_argnames=("k", "y_range"))
def top_k_unseen(params, users, seen_rows, seen_items, k, y_range):
    """Top-k items for a block of users, with each user's seen items masked out.

    Args:
      users: int32[B] user indices.
      seen_rows, seen_items: int32[S] (row in the block, item index) to mask, padded with
        out-of-range rows that the scatter drops.

    Returns:
      (float32[B, k] scores, int32[B, k] items); masked items score -inf.
    """
    scores = score_block(params, users, y_range)
    scores = scores.at[seen_rows, seen_items].set(-jnp.inf, mode="drop")
    return jax.lax.top_k(scores, k)


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
    """The distinct items each user rated in training (CSR), and the masks of :func:`top_k_unseen`.

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

    def mask(self, block: np.ndarray, padded_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, items) to mask for the users of ``block``, padded to a power of two with row
        ``padded_rows`` (out of range: dropped)."""
        seen = [self.of(int(u)) for u in block]
        rows = np.repeat(np.arange(len(block), dtype=np.int32), [len(s) for s in seen])
        cols = np.concatenate(seen).astype(np.int32) if seen else np.zeros(0, np.int32)
        size = bucket(max(1, len(rows)))
        return np.pad(rows, (0, size - len(rows)), constant_values=padded_rows), np.pad(cols, (0, size - len(cols)))
