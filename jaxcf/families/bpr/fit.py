"""BPR (Rendle, Freudenthaler, Gantner & Schmidt-Thieme 2009) as a family: pairwise ranking by SGD.

A user's score of an item is ``u . v_i + b_i``. Each training interaction (u, i) is paired with
``implicit.negatives`` items j, drawn uniformly from the whole catalogue (``implicit.negative_sampling:
uniform``) or as the item of a random training interaction (``popularity``, as the ``implicit`` library
draws them); with ``implicit.verify_negatives`` a triple whose j the user has interacted with is skipped
(as implicit's ``verify_negative_samples``). The loss of a triple is ``-log sigmoid(s_ui - s_uj)`` plus
``implicit.l2`` times the squared norms of the rows it touches (the user's row, both items' rows and
biases). An epoch is one compiled ``lax.scan`` over the epoch's shuffled interactions
(``jaxcf.core.steps.shuffle_order``). Negatives come from ``fold_in(stream("negatives"), epoch)``, so a
resumed run draws them again.

Two optimizers, both touching only the rows a batch uses:

- ``optim.name: lazy_adam``: the batch's mean loss through the row-sparse engine (``jaxcf.core.sparse``).
- ``optim.name: sgd``: LearnBPR's per-triple step (Rendle et al.; implicit's ``learning_rate`` means
  the same): every triple's gradient times the learning rate is added to its rows, the batch's
  triples at once (a scatter-add; a row touched twice gets both steps, as Hogwild threads apply
  them). implicit's ``regularization`` r is ``implicit.l2 = r / 2`` (its step subtracts ``r * row``).

The export is a dot model: user rows ``[u, 1]``, item rows ``[v, b]``.

What does not live here: the row-sparse engine (``jaxcf.core.sparse``), the metrics, the loop.
"""

from __future__ import annotations

from typing import Any, NamedTuple

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


class Sampler(NamedTuple):
    """What negatives are drawn from: ``pool`` the items a draw picks from (every item once for uniform
    draws, every training interaction's item for popularity draws); ``seen`` each user's training items,
    sorted (``seen[starts[u]:starts[u + 1]]``), for ``implicit.verify_negatives`` (empty otherwise)."""

    pool: jax.Array  # int32[P]
    starts: jax.Array  # int32[U + 1]
    seen: jax.Array  # int32[nnz]
    probes: int  # bisection steps that find an item among a user's (0: no check)


def make_sampler(config: Any, users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> Sampler:
    """The :class:`Sampler` of ``config.implicit`` over the training interactions ``(users, items)``."""
    pool = items if config.implicit.negative_sampling == "popularity" else np.arange(num_items)
    if not config.implicit.verify_negatives:
        empty = np.zeros(1, np.int32)
        return Sampler(jnp.asarray(pool, jnp.int32), jnp.asarray(empty), jnp.asarray(empty), 0)
    order = np.lexsort((items, users))
    counts = np.bincount(users, minlength=num_users)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    probes = int(np.ceil(np.log2(max(int(counts.max()), 1) + 1)))
    return Sampler(jnp.asarray(pool, jnp.int32), jnp.asarray(starts), jnp.asarray(items[order], jnp.int32), probes)


def seen_by(sampler: Sampler, users: jax.Array, items: jax.Array) -> jax.Array:
    """bool[B]: whether each user has a training interaction with the item (bisection in their sorted items)."""
    low, high = sampler.starts[users], sampler.starts[users + 1]
    last = sampler.seen.shape[0] - 1

    def probe(_, bounds):
        low, high = bounds
        mid = (low + high) // 2
        below = sampler.seen[jnp.minimum(mid, last)] < items
        open_ = low < high
        return jnp.where(open_ & below, mid + 1, low), jnp.where(open_ & ~below, mid, high)

    low, _ = jax.lax.fori_loop(0, sampler.probes, probe, (low, high))
    return (low < sampler.starts[users + 1]) & (sampler.seen[jnp.minimum(low, last)] == items)


def draw_negatives(sampler: Sampler, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """int32[shape] negatives from the sampler's pool (one draw of a whole epoch's: a draw per step costs
    more than the step on CPU)."""
    return sampler.pool[jax.random.randint(key, shape, 0, sampler.pool.shape[0], jnp.int32)]


def verified(sampler: Sampler, users: jax.Array, negative: jax.Array, weights: jax.Array) -> jax.Array:
    """float[B] weights: a positive's is 0 when verification finds one of its negatives (int32[B, N]) among
    the user's training items (the triple is skipped); unchanged without verification."""
    if not sampler.probes:
        return weights
    batch, negatives = negative.shape
    clash = seen_by(sampler, jnp.repeat(users, negatives), negative.reshape(-1)).reshape(batch, negatives)
    return weights * ~jnp.any(clash, axis=1)


def triple_loss(user, pos, neg, l2):
    """float[B] each positive's loss: ``-log sigmoid(s_ui - s_uj)`` averaged over its negatives, plus ``l2``
    times the squared norms of its rows. ``user`` [B, F], ``pos`` [B, F + 1], ``neg`` [B, N, F + 1] (rows
    ``[v, b]``)."""
    factors = user.shape[1]
    s_pos = jnp.sum(user * pos[:, :factors], axis=1) + pos[:, factors]
    s_neg = jnp.sum(user[:, None] * neg[..., :factors], axis=2) + neg[..., factors]
    ranking = -jnp.mean(jax.nn.log_sigmoid(s_pos[:, None] - s_neg), axis=1)
    norms = jnp.sum(user**2, axis=1) + jnp.sum(pos**2, axis=1) + jnp.mean(jnp.sum(neg**2, axis=2), axis=1)
    return ranking, ranking + l2 * norms


def make_step(optimizer: sparse.RowSparse, sampler: Sampler, negatives: int, l2: float):
    """``(packed, negatives, users, positives, weights) -> (packed, loss)`` for one batch of interactions
    (``negatives`` int32[B, N]), by the row-sparse engine (the batch's mean loss)."""

    def step(packed, negative, users, positives, weights):
        batch = users.shape[0]
        weights = verified(sampler, users, negative, weights)
        negative = negative.reshape(-1)
        items = jnp.concatenate([positives, negative])
        gathered = sparse.gather_rows(packed, users, items)
        total = jnp.maximum(jnp.sum(weights), 1.0)

        def loss_fn(rows):
            item = rows["item"]
            ranking, loss = triple_loss(rows["user"], item[:batch], item[batch:].reshape(batch, negatives, -1), l2)
            return jnp.sum(weights * loss) / total, jnp.sum(weights * ranking) / total

        (_, ranking_loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(gathered)
        real = weights > 0
        user_ids = jnp.where(real, users, -1)
        item_ids = jnp.concatenate([jnp.where(real, positives, -1),
                                    jnp.where(jnp.repeat(real, negatives), negative, -1)])
        return sparse.sparse_step(optimizer, packed, grads, user_ids, item_ids, gathered), ranking_loss

    return step


def make_sgd_step(learning_rate: float, sampler: Sampler, negatives: int, l2: float):
    """``(tables, negatives, users, positives, weights) -> (tables, loss)``: LearnBPR's per-triple SGD step for a
    batch of triples at once (each triple's gradient, times the learning rate, added to its rows).
    ``tables``: ``{"user": [U, F], "item": [I, F + 1]}``, the item rows packed with their biases (so that a
    step is one gather and one scatter-add per table)."""

    def step(tables, negative, users, positives, weights):
        batch = users.shape[0]
        weights = verified(sampler, users, negative, weights)
        items = jnp.concatenate([positives, negative.reshape(-1)])
        rows = {"user": tables["user"].at[users].get(mode="promise_in_bounds"),
                "item": tables["item"].at[items].get(mode="promise_in_bounds")}

        def loss_fn(rows):
            item = rows["item"]
            ranking, loss = triple_loss(rows["user"], item[:batch], item[batch:].reshape(batch, negatives, -1), l2)
            return jnp.sum(weights * loss), jnp.sum(weights * ranking)

        (_, ranking_loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(rows)
        # Skipped and padding triples have weight 0, so their gradients are 0: adding them changes nothing.
        tables = {"user": tables["user"].at[users].add(-learning_rate * grads["user"], mode="promise_in_bounds"),
                  "item": tables["item"].at[items].add(-learning_rate * grads["item"], mode="promise_in_bounds")}
        return tables, ranking_loss / jnp.maximum(jnp.sum(weights), 1.0)

    return step


def pack_items(params) -> dict[str, jax.Array]:
    """The SGD step's tables: the user rows, and the item rows beside their biases."""
    return {"user": jnp.asarray(params["user_embedding"]),
            "item": jnp.concatenate([params["item_embedding"], params["item_bias"]], axis=1)}


def unpack_items(tables) -> dict[str, jax.Array]:
    factors = tables["item"].shape[1] - 1
    return {"user_embedding": tables["user"], "item_embedding": tables["item"][:, :factors],
            "item_bias": tables["item"][:, factors:]}


def make_epoch(optimizer: sparse.RowSparse, config: Any, sampler: Sampler):
    """A jitted ``(state, key, users, items, order) -> (state, float32[num_batches] losses)``; the state is
    ``jaxcf.core.steps.TrainState`` (row-sparse optimizer state; ``{}`` for sgd), donated."""
    negatives, l2 = config.implicit.negatives, config.implicit.l2
    per_triple = config.optim.name == "sgd"
    step = (make_sgd_step(config.optim.learning_rate, sampler, negatives, l2) if per_triple
            else make_step(optimizer, sampler, negatives, l2))
    batch_size = config.train.batch_size

    def epoch(state, key, users, items, order):
        index, weights = steps.epoch_index(order, batch_size)
        drawn = draw_negatives(sampler, key, (*index.shape, negatives))
        carry = pack_items(state.params) if per_triple else sparse.pack(optimizer, state.params, state.opt_state)

        def body(carry, x):
            positions, w, negative = x
            return step(carry, negative, users.at[positions].get(mode="promise_in_bounds"),
                        items.at[positions].get(mode="promise_in_bounds"), w)

        carry, losses = jax.lax.scan(body, carry, (index, weights, drawn))
        params, opt_state = (unpack_items(carry), state.opt_state) if per_triple else sparse.unpack(optimizer, carry)
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
    sampler = make_sampler(config, ratings.users[train], ratings.items[train], num_users, num_items)
    users, items = jnp.asarray(ratings.users[train]), jnp.asarray(ratings.items[train])
    epoch_fn = make_epoch(optimizer, config, sampler)
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
