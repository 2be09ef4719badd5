"""BPR (Rendle, Freudenthaler, Gantner & Schmidt-Thieme 2009) as a family: pairwise ranking by SGD.

A user's score of an item is ``u . v_i + b_i``. Each training interaction (u, i) is paired with
``implicit.negatives`` items j drawn uniformly from the whole catalogue, and the loss of a triple is
``-log sigmoid(s_ui - s_uj)`` plus ``implicit.l2`` times the squared norms of the rows it touches (the
user's row, both items' rows and biases), averaged over the batch. An epoch is one compiled
``lax.scan`` over the epoch's shuffled interactions (``jaxcf.core.steps.shuffle_order``), with a row-sparse
optimizer (``jaxcf.core.sparse``: ``optim.name: lazy_adam``): a step gathers and updates only the rows its
triples touch, the users' and the items' (positives and negatives together, repeated ids summed).
Negatives come from ``fold_in(stream("negatives"), epoch)``, so a resumed run draws them again.

The export is a dot model: user rows ``[u, 1]``, item rows ``[v, b]``.

What does not live here: the row-sparse engine (``jaxcf.core.sparse``), the metrics, the loop.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.core import distributed, optim, rng, sparse, steps
from jaxcf.core.family import Family
from jaxcf.data import Dataset
from jaxcf.families import _implicit
from jaxcf.families.bpr import SPEC


def init_params(config: Any, num_users: int, num_items: int) -> dict[str, jax.Array]:
    key = rng.stream(config.seed, "init")
    std, factors = config.implicit.init_std, config.model.n_factors
    return {"user_embedding": std * jax.random.normal(jax.random.fold_in(key, 0), (num_users, factors)),
            "item_embedding": std * jax.random.normal(jax.random.fold_in(key, 1), (num_items, factors)),
            "item_bias": jnp.zeros((num_items, 1), jnp.float32)}


def make_step(optimizer: sparse.RowSparse, negatives: int, l2: float, num_items: int):
    """``(packed, key, users, positives, weights) -> (packed, loss)`` for one batch of interactions."""

    def step(packed, key, users, positives, weights):
        batch = users.shape[0]
        negative = jax.random.randint(key, (batch, negatives), 0, num_items, jnp.int32)
        items = jnp.concatenate([positives, negative.reshape(-1)])
        gathered = sparse.gather_rows(packed, users, items)
        total = jnp.sum(weights)

        def loss_fn(rows):
            user, item = rows["user"], rows["item"]
            factors = user.shape[1]
            pos, neg = item[:batch], item[batch:].reshape(batch, negatives, -1)
            s_pos = jnp.sum(user * pos[:, :factors], axis=1) + pos[:, factors]
            s_neg = jnp.sum(user[:, None] * neg[..., :factors], axis=2) + neg[..., factors]
            ranking = -jnp.mean(jax.nn.log_sigmoid(s_pos[:, None] - s_neg), axis=1)
            norms = jnp.sum(user**2, axis=1) + jnp.sum(pos**2, axis=1) + jnp.mean(jnp.sum(neg**2, axis=2), axis=1)
            return jnp.sum(weights * (ranking + l2 * norms)) / total, jnp.sum(weights * ranking) / total

        (_, ranking_loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(gathered)
        real = weights > 0
        user_ids = jnp.where(real, users, -1)
        item_ids = jnp.concatenate([jnp.where(real, positives, -1),
                                    jnp.where(jnp.repeat(real, negatives), negative.reshape(-1), -1)])
        return sparse.sparse_step(optimizer, packed, grads, user_ids, item_ids, gathered), ranking_loss

    return step


def make_epoch(optimizer: sparse.RowSparse, config: Any, num_items: int):
    """A jitted ``(state, key, users, items, order) -> (state, float32[num_batches] losses)``; the state is
    ``jaxcf.core.steps.TrainState`` with row-sparse optimizer state, donated."""
    step = make_step(optimizer, config.implicit.negatives, config.implicit.l2, num_items)
    batch_size = config.train.batch_size

    def epoch(state, key, users, items, order):
        index, weights = steps.epoch_index(order, batch_size)
        keys = jax.random.split(key, index.shape[0])
        packed = sparse.pack(optimizer, state.params, state.opt_state)

        def body(packed, x):
            positions, w, k = x
            return step(packed, k, users.at[positions].get(mode="promise_in_bounds"),
                        items.at[positions].get(mode="promise_in_bounds"), w)

        packed, losses = jax.lax.scan(body, packed, (index, weights, keys))
        params, opt_state = sparse.unpack(optimizer, packed)
        return steps.TrainState(params, opt_state, state.step + index.shape[0]), losses

    return jax.jit(epoch, donate_argnums=(0,))


def export_params(params) -> dict:
    """The dot model that scores as BPR does: ``[u, 1] . [v, b] = u . v + b``."""
    users, items, bias = params["user_embedding"], params["item_embedding"], params["item_bias"]
    return {"user_embedding": jnp.concatenate([users, jnp.ones((users.shape[0], 1), users.dtype)], axis=1),
            "item_embedding": jnp.concatenate([items, bias], axis=1)}


def family(config: Any, dataset: Dataset, layout=None) -> Family:
    """BPR on ``dataset``'s implicit training interactions (one device: the registry refuses a mesh)."""
    ratings = dataset.ratings
    train = steps.rows_by_user(ratings.users, dataset.split.train)
    steps.check_batch_size(config.train.batch_size, len(train), "training interactions")
    num_users, num_items = ratings.num_users, ratings.num_items
    optimizer = optim.build(config.optim, steps.num_batches(len(train), config.train.batch_size) * config.train.epochs)
    users, items = jnp.asarray(ratings.users[train]), jnp.asarray(ratings.items[train])
    epoch_fn = make_epoch(optimizer, config, num_items)
    order_key, negatives_key = rng.stream(config.seed, "order"), rng.stream(config.seed, "negatives")

    def init():
        params = init_params(config, num_users, num_items)
        return steps.TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))

    def epoch(state, number):
        order = steps.shuffle_order(order_key, number, len(train), config.train.batch_size)
        state, losses = epoch_fn(state, jax.random.fold_in(negatives_key, number), users, items, order)
        return state, np.asarray(losses)

    def record(state, number, losses, carry, evaluate=True):
        return _implicit.record(dataset, export_params(state.params), None, number,
                                float(np.mean(losses, dtype=np.float64)), evaluate), carry

    return Family(
        name=SPEC.name, init=init, epoch=epoch, record=record, params=lambda state: export_params(state.params),
        row_axes=distributed.single_row_axes, final=lambda host: _implicit.final(dataset, host),
        model_info=SPEC.model_info(n_factors=config.model.n_factors + 1, y_range=None, num_users=num_users,
                                   num_items=num_items),
        monitor="ndcg@20", maximize=True, columns=_implicit.COLUMNS,
    )
