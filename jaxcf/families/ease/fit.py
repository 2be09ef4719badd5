"""EASE (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data") as a family: closed form.

The item-item matrix ``B`` minimises ``|X - X B|^2 + lambda |B|^2`` subject to ``diag(B) = 0``, with ``X``
the binary user-item matrix of the training interactions:

    P = inv(X'X + lambda I),   B = I - P diag(1 / diag(P))   (so B_ij = -P_ij / P_jj, B_jj = 0)

and a user's scores are ``x_u B``. The one "epoch" computes it, in float64 on the host (SciPy's
LAPACK, outside XLA's thread pool: a sparse Gram, a Cholesky inverse), over the items that have
training interactions (the others keep zero rows and columns). ``lambda`` is ``implicit.ease_lambda``.

The export is a dot model with F = the number of items: user rows ``x_u`` (the training interactions),
item rows ``B[:, i]``, so ``x_u . B[:, i] = (x_u B)_i``; fold-in of a user is their interaction row.

What does not live here: the metrics, the loop.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.sparse

from jaxcf.core import distributed, memory
from jaxcf.core.errors import ConfigError
from jaxcf.core.family import Family
from jaxcf.data import Dataset
from jaxcf.families import _implicit
from jaxcf.families.ease import SPEC

# The largest catalogue EASE is solved for here: an items x items float64 matrix (and its inverse).
MAX_ITEMS = 20_000


def solve(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int, lam: float) -> tuple[np.ndarray, float]:
    """``B``, float32[num_items, num_items], from training interactions (user and item indices), and the
    training loss ``(|X - X B|^2 + lambda |B|^2) / (users * items)`` (float64).

    The Gram matrix is the sparse product ``X'X`` (about ``sum_u |I_u|^2`` work, not ``users * items^2``),
    and ``P`` the inverse of a symmetric positive definite matrix by its Cholesky factor (LAPACK's
    ``potrf`` + ``potri``: ``n^3`` flops, half of a general inverse's ``2 n^3``), in float64, over the items
    with interactions (the others' rows and columns of ``B`` are 0, and so is their part of the loss).

    Raises:
      ConfigError: ``X'X + lambda I`` is not positive definite (``lambda`` 0 and a rank-deficient ``X``).
    """
    active = np.unique(items)
    position = np.full(num_items, -1, np.int64)
    position[active] = np.arange(len(active))
    x = scipy.sparse.csr_matrix((np.ones(len(users)), (users, position[items])), shape=(num_users, len(active)))
    x.data[:] = 1.0  # a repeated interaction is still one 1
    gram = np.asarray((x.T @ x).toarray(), np.float64, order="F")
    gram[np.diag_indices_from(gram)] += lam
    factor, info = scipy.linalg.lapack.dpotrf(gram, lower=0, overwrite_a=1, clean=0)
    del gram
    if info == 0:
        p, info = scipy.linalg.lapack.dpotri(factor, lower=0, overwrite_c=1)
    if info != 0:
        raise ConfigError(f"model.kind ease: X'X + {lam} I is not positive definite; raise implicit.ease_lambda")
    p = np.triu(p)
    p += np.triu(p, 1).T  # potri fills the upper triangle only
    b = p
    b /= -np.diag(p)[None, :].copy()
    np.fill_diagonal(b, 0.0)
    residual = x @ b
    residual[x.nonzero()] -= 1.0
    loss = float((np.sum(residual**2) + lam * np.sum(b**2)) / (num_users * num_items))
    full = np.zeros((num_items, num_items), np.float32)
    full[np.ix_(active, active)] = b
    return full, loss


def interaction_rows(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> np.ndarray:
    """float32[num_users, num_items]: 1 where a user has a training interaction."""
    x = np.zeros((num_users, num_items), np.float32)
    x[users, items] = 1.0
    return x


def family(config: Any, dataset: Dataset, layout=None) -> Family:
    """EASE on ``dataset``'s implicit training interactions (one device, one epoch)."""
    ratings = dataset.ratings
    train = dataset.split.train
    users, items = ratings.users[train], ratings.items[train]
    num_users, num_items = ratings.num_users, ratings.num_items
    if num_items > MAX_ITEMS:
        raise ConfigError(f"model.kind ease: {num_items} items need a {num_items} x {num_items} inverse; this "
                          f"implementation stops at {MAX_ITEMS} items (use model.kind ials)")
    lam = float(config.implicit.ease_lambda)
    # The interaction matrix (float32 users x items, twice: it and its scores) and the items x items solve.
    memory.check(4 * 2 * num_users * num_items + 8 * 3 * num_items**2, "EASE's matrices",
                 "use model.kind ials for this many users and items")
    rows = jnp.asarray(interaction_rows(users, items, num_users, num_items))

    def init():
        return {"item_embedding": jnp.zeros((num_items, num_items), jnp.float32)}

    def epoch(state, number):
        b, loss = solve(users, items, num_users, num_items, lam)
        return {"item_embedding": jnp.asarray(b.T)}, np.asarray([loss])

    def params(state):
        return {"user_embedding": rows, "item_embedding": state["item_embedding"]}

    def record(state, number, losses, carry, evaluate=True):
        return _implicit.record(dataset, params(state), None, number, float(losses[0]), evaluate), carry

    return Family(
        name=SPEC.name, init=init, epoch=epoch, record=record, params=params,
        row_axes=distributed.single_row_axes, final=lambda host: _implicit.final(dataset, host),
        model_info=SPEC.model_info(n_factors=num_items, y_range=None, num_users=num_users, num_items=num_items),
        divergence_hint="raise implicit.ease_lambda",
        monitor="ndcg@20", maximize=True, columns=_implicit.COLUMNS,
    )
