"""Bayesian factorisation machines as a family of the one loop: chains of the Gibbs sampler, one sweep per
epoch, and the kept samples as dot models.

The state holds ``ensemble.chains`` chains of ``jaxcf.families.bfm.sampler`` (every leaf with a leading
chain axis; each chain's ``pred_sum`` is its running sum of the evaluated pairs' predictions at the kept
sweeps, so no stored sample is ever scored again) and the kept samples, already in the export's form
(:func:`sample_tables`): a slot per kept sweep, as BPMF keeps them (``ensemble.size / ensemble.chains``
per chain, evenly spaced after ``ensemble.burn_in``, ending with the last sweep). One sweep of every
chain is one compiled call (vmapped over the chains); the blocks, ratings and evaluated pairs are its
arguments, never constants baked into the program.

The evaluated pairs are every training, validation and test pair (training first: the fallback's means
are taken over them, as ``jaxcf.core.metrics.Evaluation`` wants), so a record's ``valid_rmse`` is the
posterior mean's, each pair answered as ``predict`` answers it.

What does not live here: the sampler (``sampler``), the blocks (``features``), the spec and config
(``jaxcf.families.bfm``), fold-in (``foldin``), the loop.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.core import metrics, rng
from jaxcf.core.errors import ConfigError, DataError
from jaxcf.core.family import Family
from jaxcf.data import Dataset
from jaxcf.families.bfm import IMPLICIT_TABLE, PRIOR_TABLE, SPEC, features, groups, sampler

# The dot model's tables, in the export's form; the family's own tables (fold-in's) follow them.
SCORING_TABLES = ("user_embedding", "item_embedding")


class BfmState(NamedTuple):
    """The family's state.

    Attributes:
      chains: the chains (``sampler.State``, every leaf with a leading axis of ``ensemble.chains``).
      kept: the kept samples by export table (:func:`sample_tables`), each float32[S, C, rows, d]: slot
        ``s`` holds the chains' samples of the ``s``-th kept sweep (zeros until then).
    """

    chains: sampler.State
    kept: dict[str, jax.Array]


class Groups(NamedTuple):
    """Where the groups sit in the blocks (block 0 the users', block 1 the items').

    Attributes:
      user_group: the user-id group's index among all groups (its priors' row), or None when off.
      implicit_rows: the first row of the implicit-set vectors in the user block's table, or None when off.
    """

    user_group: int | None
    implicit_rows: int | None


def kept_sweeps(sweeps: int, burn_in: int, per_chain: int) -> list[int]:
    """The 1-based sweeps whose samples are kept: ``per_chain`` of them, evenly spaced, ending with the last
    sweep, all after the burn-in (as BPMF keeps them).

    Raises:
      DataError: when fewer than ``per_chain`` sweeps follow the burn-in (``jaxcf.families.bfm.validate``
        refuses such a config first).
    """
    thin = (sweeps - burn_in) // per_chain
    if thin < 1:
        raise DataError(f"{sweeps} sweeps after a burn-in of {burn_in} cannot give {per_chain} samples per chain")
    return [sweeps - thin * j for j in reversed(range(per_chain))]


def make_blocks(config: Any, dataset: Dataset) -> tuple[features.BlockMatrix, features.BlockMatrix]:
    """The user and item blocks of ``config.bfm``'s groups, over the training ratings; the sets from the
    training pairs, or with ``implicit_from: all`` from every pair of the split."""
    ratings, split = dataset.ratings, dataset.split
    section = config.bfm
    train = split.train
    pairs = train if section.implicit_from == "train" else np.concatenate([train, split.valid, split.test])
    users, items = ratings.users[train], ratings.items[train]
    set_users, set_items = ratings.users[pairs], ratings.items[pairs]
    num_users, num_items = ratings.num_users, ratings.num_items
    user_block = features.relation_block(users, items, num_users, num_items, ids=section.user,
                                         implicit=section.implicit, set_own=set_users, set_other=set_items)
    item_block = features.relation_block(items, users, num_items, num_users, ids=section.item,
                                         implicit=section.flipped, set_own=set_items, set_other=set_users)
    return user_block, item_block


def sample_tables(chain: sampler.State, num_users: int, num_items: int, where: Groups) -> dict[str, jax.Array]:
    """One sample as the export holds it (see ``jaxcf.families.bfm``).

    Returns:
      ``user_embedding`` float32[U, F + 2] rows ``[P(u), b_u, 1]``; ``item_embedding`` float32[I, F + 2]
      rows ``[Q(i), 1, w0 + b_i]``; with the user-id group :data:`PRIOR_TABLE` float32[3, F + 1] (its prior
      mean and precision, factors then the weight, and alpha repeated); with the implicit group
      :data:`IMPLICIT_TABLE` float32[I, F + 1] (each item's set vector, then its weight).
    """
    (q_users, q_items), (s_users, s_items) = chain.cache.q, chain.cache.s
    q_users, s_users = q_users[:num_users], s_users[:num_users]  # the blocks' last row pads
    q_items, s_items = q_items[:num_items], s_items[:num_items]
    ones_u, ones_i = jnp.ones((num_users, 1), q_users.dtype), jnp.ones((num_items, 1), q_items.dtype)
    out = {
        "user_embedding": jnp.concatenate([q_users[:, 1:], sampler.own_terms(q_users, s_users)[:, None], ones_u], 1),
        "item_embedding": jnp.concatenate([q_items[:, 1:], ones_i,
                                           (chain.w0 + sampler.own_terms(q_items, s_items))[:, None]], 1),
    }

    def factors_first(rows):  # a table's columns are [w, v_1 .. v_F]; fold-in's unknowns are [v, w]
        return jnp.concatenate([rows[..., 1:], rows[..., :1]], axis=-1)

    if where.user_group is not None:
        g = where.user_group
        alpha = jnp.full(chain.mu.shape[1], chain.alpha, chain.mu.dtype)
        out[PRIOR_TABLE] = jnp.stack([factors_first(chain.mu[g]), factors_first(chain.lam[g]), alpha])
    if where.implicit_rows is not None:
        start = where.implicit_rows
        out[IMPLICIT_TABLE] = factors_first(chain.tables[0][start:start + num_items])
    return out


# The compiled programs of a run (``family`` jits them; tests/test_bfm.py compiles and lowers the same).


def init_chains(keys: jax.Array, blocks: tuple, y: jax.Array, eval_rows: tuple, rank: int) -> sampler.State:
    """C chains at myFM's start (``keys`` [C]; ``sampler.init_state``), every leaf with a chain axis."""
    return jax.vmap(lambda key: sampler.init_state(key, blocks, y, rank, len(eval_rows[0])))(keys)


def sweep_chains(chains: sampler.State, keys: jax.Array, keep: jax.Array, blocks: tuple, y: jax.Array,
                 eval_rows: tuple) -> sampler.State:
    """One sweep of every chain (``keys`` [C]; ``keep`` bool[]: the sweep's predictions join ``pred_sum``)."""
    return jax.vmap(lambda c, k: sampler.sweep(c, k, blocks, y, eval_rows, keep))(chains, keys)


def chain_tables(chains: sampler.State, num_users: int, num_items: int, where: Groups) -> dict[str, jax.Array]:
    """Every chain's current sample as the export holds it (:func:`sample_tables`, with a chain axis)."""
    return jax.vmap(lambda c: sample_tables(c, num_users, num_items, where))(chains)


def current_predictions(chains: sampler.State, eval_rows: tuple) -> jax.Array:
    """float32[C, m]: each chain's current prediction of the evaluated pairs."""
    return jax.vmap(lambda c: sampler.predict_rows(c.w0, c.cache.q, c.cache.s, eval_rows))(chains)


def train_mse(chains: sampler.State) -> jax.Array:
    """float32[C]: each chain's mean squared training residual (the residual is the sampler's own)."""
    return jnp.mean(chains.cache.e * chains.cache.e, axis=1)


def table_shapes(num_users: int, num_items: int, rank: int, where: Groups) -> dict[str, tuple[int, ...]]:
    """The shape of each table of one sample (:func:`sample_tables`)."""
    shapes = {"user_embedding": (num_users, rank + 2), "item_embedding": (num_items, rank + 2)}
    if where.user_group is not None:
        shapes[PRIOR_TABLE] = (3, rank + 1)
    if where.implicit_rows is not None:
        shapes[IMPLICIT_TABLE] = (num_items, rank + 1)
    return shapes


def family(config: Any, dataset: Dataset, layout=None) -> Family:
    """The sampler as a family: ``ensemble.chains`` chains of ``train.epochs`` sweeps (on one device).

    ``model.n_factors`` is the rank F; ``ensemble.size`` samples are kept in all, ``size / chains`` per
    chain; the groups are ``config.bfm``'s.
    """
    if layout is not None:  # the spec refuses a mesh first (Spec.mesh False); a caller that skips it lands here
        raise ConfigError("model.kind bfm trains on one device: set mesh.data and mesh.model to 1")
    ratings, split = dataset.ratings, dataset.split
    size, chains, rank = config.ensemble.size, config.ensemble.chains, config.model.n_factors
    per_chain = size // chains
    kept = kept_sweeps(config.train.epochs, config.ensemble.burn_in, per_chain)
    slot_of = {sweep: slot for slot, sweep in enumerate(kept)}
    num_users, num_items = ratings.num_users, ratings.num_items
    section = config.bfm
    where = Groups(0 if section.user else None, (num_users if section.user else 0) if section.implicit else None)
    user_block, item_block = make_blocks(config, dataset)
    blocks = (features.make_block(user_block), features.make_block(item_block))
    y = jnp.asarray(ratings.ratings[split.train], jnp.float32)
    evaluation = metrics.Evaluation.of(dataset, None)
    eval_rows = (jnp.asarray(evaluation.users, jnp.int32), jnp.asarray(evaluation.items, jnp.int32))
    role = "valid" if evaluation.has("valid") else "test" if evaluation.has("test") else None
    label = {"implicit_from": section.implicit_from}
    chain_keys = jnp.stack([jax.random.fold_in(rng.stream(config.seed, "chains"), c) for c in range(chains)])
    init_keys = jnp.stack([jax.random.fold_in(rng.stream(config.seed, "init"), c) for c in range(chains)])

    def store(state, slot):
        tables = chain_tables(state.chains, num_users, num_items, where)
        return state._replace(kept={name: state.kept[name].at[slot].set(tables[name]) for name in state.kept})

    init_fn = jax.jit(functools.partial(init_chains, rank=rank))
    sweep_fn = jax.jit(sweep_chains, donate_argnums=(0,))
    store_fn = jax.jit(store, donate_argnums=(0,))
    current_fn = jax.jit(current_predictions)
    train_fn = jax.jit(train_mse)

    shapes = table_shapes(num_users, num_items, rank, where)

    def init():
        return BfmState(init_fn(init_keys, blocks, y, eval_rows),
                        {name: jnp.zeros((per_chain, chains, *shape)) for name, shape in shapes.items()})

    def epoch(state, number):
        sweep_number = number + 1
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(chain_keys, sweep_number)
        keep = sweep_number in slot_of
        state = state._replace(chains=sweep_fn(state.chains, keys, jnp.bool_(keep), blocks, y, eval_rows))
        if keep:
            state = store_fn(state, slot_of[sweep_number])
        return state, np.asarray(train_fn(state.chains), np.float64)  # the sweep's host sync

    def record(state, number, losses, carry, evaluate=True):
        count = sum(sweep <= number + 1 for sweep in kept) * chains
        result = {"epoch": number + 1, "train_loss": float(np.mean(losses)), "members": count, **label}
        if not evaluate:
            return result, carry
        scores = np.asarray(current_fn(state.chains, eval_rows), np.float64)
        ensemble = (np.sum(np.asarray(state.chains.pred_sum, np.float64), axis=0) / count if count
                    else np.mean(scores, axis=0))
        result.update(evaluation.metrics(ensemble))
        if role:  # each chain's current sample as a model of its own
            part = evaluation.part(role)
            errors = np.sqrt(np.mean((scores[:, part] - evaluation.targets[part]) ** 2, axis=1))
            result[f"sample_{role}_rmse"] = float(np.mean(errors))
        result["noise_precision"] = float(np.mean(np.asarray(state.chains.alpha)))
        result["drift"] = float(np.max(np.asarray(state.chains.drift)))
        if not np.all(np.isfinite(ensemble)):  # the loop decides
            result["diverged"] = "the sampler's predictions are not finite"
        return result, carry

    def params(state):
        return {name: table.reshape(-1, *table.shape[2:]) for name, table in state.kept.items()}

    def finite(state):
        c = state.chains
        return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(t)) for t in (c.w0, c.alpha, *c.tables)]))

    extra = {name: [size, *shape] for name, shape in shapes.items() if name not in SCORING_TABLES}
    return Family(
        name=SPEC.name,
        init=init,
        epoch=epoch,
        record=record,
        params=params,
        row_axes=lambda state: jax.tree.map(lambda _: None, state),
        final=lambda tables: metrics.final_metrics(dataset, None, {name: tables[name] for name in SCORING_TABLES}),
        model_info=SPEC.model_info(n_factors=rank + 2, y_range=None, num_users=num_users, num_items=num_items,
                                   ensemble_size=size, rank=rank, groups=groups(config), **label,
                                   extra_tables=extra),
        finite=jax.jit(finite),
        divergence_hint="check the ratings (they must be finite and of a moderate scale)",
    )
