"""The row-sparse engine: tables packed per id kind, and steps that touch only the rows a batch uses.

How a row-sparse step works (see :func:`sparse_update`): the tables of one id kind (the user
embedding and user bias; the item embedding and item bias) are packed side by side with their
optimizer slots into one ``float32[rows, width]`` array per slot, so a batch costs one gather and
one scatter per id kind. Duplicate ids are found without sorting (``jnp.unique`` sorts): every
position scatters its own index into an ``int32[rows]`` scratch table, reads back which position
"owns" its id, and the gradients are summed onto the owner with a ``segment_sum`` over the batch.
Only owners write their row back. A group that a batch touches densely (large batches) is updated
for every row instead, untouched rows kept (:func:`apply_dense`), and its gradients are summed a
chunk of ratings at a time (:func:`make_packed_step`).

One concept at some length: the row-sparse engine (packing, gathering, updating only touched rows).

What does not live here: the optimizers' update rules (``jaxcf.core.optim``: ``lazy_adam``, ``sgd``), the
epoch that runs the step (``jaxcf.core.steps``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcf.core import models
from jaxcf.core.models import ITEM_TABLES, USER_TABLES

Params = dict[str, jax.Array]

# Packing order of the tables of each id kind; ``users``/``items`` index the groups' rows.
GROUPS: dict[str, tuple[str, ...]] = {"user": USER_TABLES, "item": ITEM_TABLES}

# Ratings per chunk of a dense row-sparse step (see make_packed_step): [16384, 51] float32
# rows and gradients are 3.3 MB each, which stay in a 32 MiB L3 cache.
DENSE_CHUNK = 16_384


class LazyAdamTableState(NamedTuple):
    """Per-table state of ``lazy_adam`` (what checkpoints hold)."""

    mu: jax.Array  # float32[rows, d] first moment
    nu: jax.Array  # float32[rows, d] second moment
    count: jax.Array  # int32[rows] how many batches have touched each row


class PackedGroup(NamedTuple):
    """The tables of one id kind packed for the row-sparse step.

    ``slots[0]`` holds the parameters (the group's tables side by side, in ``GROUPS`` order) and
    ``slots[1:]`` the optimizer's per-element state (Adam's moments); ``count`` is the per-row step
    count, or None for optimizers without one.
    """

    slots: tuple[jax.Array, ...]  # each float32[num_rows, width]
    count: jax.Array | None  # int32[num_rows]
    # int32[num_rows] scratch for finding repeated ids (see owners); carried from step to step so
    # that a step costs O(batch), not a fill of a table-sized array. Its contents do not matter.
    scratch: jax.Array | None = None


class RowSparse(NamedTuple):
    """A row-sparse optimizer.

    Attributes:
      init: ``params -> state``, a dict of per-table states (an empty dict for ``sgd``).
      slots: float32 vectors per row besides the parameter (2 for Adam's moments, 0 for SGD).
      counted: whether the optimizer keeps a per-row step count.
      update_rows: ``(rows, count int32[b] | None, grads float32[b, w]) -> (rows, count)`` where
        ``rows`` is a tuple of ``1 + slots`` float32[b, w] (parameters, then state): the new values
        of the rows touched in a batch, from their old values and their summed gradients.
      to_slots: ``(state, names) -> list`` of per-slot lists of per-table arrays (pack order).
      from_slots: ``(slot_tables, count_per_table) -> state`` inverse of ``to_slots`` for one
        table: gets ``{name: ([slot arrays], count)}`` and returns the state dict.
      dense_rows_per_id: how a step finds a group's touched rows (the result is the same either
        way). A group with at most this many rows per batch entry is updated *densely*: the
        gradients are scatter-added into a table-sized buffer and every row is computed, touched
        rows kept; a larger group gathers and scatters only the touched rows. The default 4 is
        where the two cost the same on CPU (``BENCHMARKS.md``). 0 forces row-wise, ``inf`` dense.
    """

    init: Callable[[Mapping[str, jax.Array]], Any]
    slots: int
    counted: bool
    update_rows: Callable
    to_slots: Callable
    from_slots: Callable
    dense_rows_per_id: float = 4.0

    def update(
        self, params: Params, state: Any, row_grads: Mapping[str, jax.Array], users: jax.Array, items: jax.Array
    ) -> tuple[Params, Any]:
        """One step on unpacked tables (packs, updates, unpacks; the epoch keeps them packed instead).

        Args:
          params: the tables.
          state: from ``init``.
          row_grads: ``name -> float32[b, d]``: gradients with respect to the gathered rows.
          users, items: int32[b] row ids; a negative id marks a padding entry that touches nothing.

        Returns:
          (new params, new state).
        """
        packed = pack(self, params, state)
        group_grads = {
            group: jnp.concatenate([row_grads[name] for name in packed.tables(group)], axis=1)
            for group in packed.groups
        }
        return unpack(self, sparse_step(self, packed, group_grads, users, items))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["groups"], meta_fields=["names", "widths"])
@dataclasses.dataclass(frozen=True)
class Packed:
    """Row-sparse training state (a pytree): one :class:`PackedGroup` per id kind, and how to unpack it."""

    groups: dict[str, PackedGroup]
    names: tuple[str, ...]  # the tables present, in pack order (static)
    widths: tuple[int, ...]  # columns of each table in ``names`` (static)

    def tables(self, group: str) -> list[str]:
        return [n for n in GROUPS[group] if n in self.names]


def pack(optimizer: RowSparse, params: Mapping[str, jax.Array], state: Any) -> Packed:
    """Packs tables and optimizer state per id kind (one copy of everything; do it once per epoch)."""
    groups, names, widths = {}, [], []
    for group, tables in GROUPS.items():
        present = [n for n in tables if n in params]
        if not present:
            continue
        names += present
        widths += [params[n].shape[1] for n in present]
        slot_tables, counts = optimizer.to_slots(state, present)
        columns = [_side_by_side([params[n] for n in present])]
        columns += [_side_by_side(tables_of_slot) for tables_of_slot in slot_tables]
        # Tables of one id kind share their count: a row of each is touched by the same batches.
        num_rows = columns[0].shape[0]
        groups[group] = PackedGroup(
            tuple(columns), counts[0] if optimizer.counted else None, jnp.zeros((num_rows,), jnp.int32)
        )
    return Packed(groups, tuple(names), tuple(widths))


def _side_by_side(tables: list[jax.Array]) -> jax.Array:
    """``concatenate(tables, axis=1)`` written as a sum of zero-padded tables, which XLA's CPU
    backend runs as one vectorised pass, where its concatenate of a [n, 50] and a [n, 1] table was
    measured several times slower when the row-sparse engine was written."""
    total = sum(t.shape[1] for t in tables)
    out, start = None, 0
    for table in tables:
        padded = jnp.pad(table, ((0, 0), (start, total - start - table.shape[1])))
        out = padded if out is None else out + padded
        start += table.shape[1]
    return out


def unpack(optimizer: RowSparse, packed: Packed) -> tuple[Params, Any]:
    """Inverse of :func:`pack`: ``(params, state)`` with one table per name."""
    width_of = dict(zip(packed.names, packed.widths))
    params, per_table = {}, {}
    for group, packed_group in packed.groups.items():
        start = 0
        for name in packed.tables(group):
            blocks = [slot[:, start : start + width_of[name]] for slot in packed_group.slots]
            start += width_of[name]
            params[name] = blocks[0]
            per_table[name] = (blocks[1:], packed_group.count)
    return params, optimizer.from_slots(per_table)


def gather_rows(packed: Packed, users: jax.Array, items: jax.Array) -> dict[str, jax.Array]:
    """The parameter rows of a batch, one gather per id kind.

    Args:
      users, items: int32[b] in range (padding entries must hold a valid id; their weight is 0).

    Returns:
      ``group -> float32[b, width]``: each group's tables side by side, in ``GROUPS`` order.
    """
    ids = {"user": users, "item": items}
    return {
        group: packed_group.slots[0].at[ids[group]].get(mode="promise_in_bounds")
        for group, packed_group in packed.groups.items()
    }


def table_rows(packed: Packed, group_rows: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Gathered group rows as per-table rows that ``jaxcf.core.models.score_rows`` scores correctly.

    For the biased model (each group is ``[embedding | bias]``) the embeddings are the whole packed
    rows, so the dot product also counts ``user_bias * item_bias``, and the user bias is handed over
    as ``user_bias * (1 - item_bias)`` to cancel it: the logit and its gradient with respect to
    every packed column are the model's (up to float32 rounding of that product). This feeds the
    gathered rows to the dot product as they are: slicing off the bias column, or masking it,
    makes XLA copy every ``[b, F]`` operand and gradient (about a quarter of a step at
    batch 262,144 on CPU).

    Returns:
      ``name -> float32[b, d]``; for the biased model the embeddings are ``[b, F + 1]``.
    """
    width_of = dict(zip(packed.names, packed.widths))
    tables = {group: packed.tables(group) for group in group_rows}
    if all(len(names) == 1 for names in tables.values()):  # no biases: the packed rows are the embeddings
        return {names[0]: group_rows[group] for group, names in tables.items()}
    if sorted(tables) != ["item", "user"] or any(
        len(names) != 2 or width_of[names[1]] != 1 for names in tables.values()
    ):
        raise ValueError(f"unsupported packed layout {packed.names} {packed.widths}")
    users, items = group_rows["user"], group_rows["item"]
    user_bias, item_bias = users[:, -1:], items[:, -1:]
    return {
        tables["user"][0]: users,
        tables["item"][0]: items,
        tables["user"][1]: user_bias * (1 - item_bias),
        tables["item"][1]: item_bias,
    }


def owners(ids: jax.Array, scratch: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For each batch position, the position that owns its id; without sorting.

    Args:
      ids: int32[b] row ids; negative ids are padding.
      scratch: int32[num_rows], any contents (only entries written here are read back).

    Returns:
      (owner int32[b]: the position whose slot collects the gradients of ``ids[j]`` (a padding
       position owns itself), is_owner bool[b]: true at exactly one position per distinct real id,
       the scratch array to pass to the next call).
    """
    num_rows = scratch.shape[0]
    position = jnp.arange(ids.shape[0], dtype=jnp.int32)
    real = ids >= 0
    safe = jnp.where(real, ids, num_rows)
    # With repeated ids one of the writes wins (which one does not matter: every position reads
    # back the same winner). Entries from earlier batches are never read.
    scratch = scratch.at[safe].set(position, mode="drop")
    owner = jnp.where(real, scratch.at[safe].get(mode="fill", fill_value=0), position)
    return owner, real & (owner == position), scratch


def sparse_update(
    optimizer: RowSparse,
    group: PackedGroup,
    ids: jax.Array,
    grads: jax.Array,
    gathered: jax.Array | None = None,
) -> PackedGroup:
    """Applies one row-sparse step to a packed group (row-wise or dense: see ``RowSparse.dense_rows_per_id``).

    Args:
      optimizer: a :class:`RowSparse`.
      group: the packed tables of one id kind.
      ids: int32[b] row ids; negative ids are padding and touch no row.
      grads: float32[b, width] gradients with respect to the gathered parameter rows.
      gathered: float32[b, width] = ``group.slots[0][ids]`` when the caller already has it (the
        train step gathered the parameter rows for the forward pass); padding entries may hold any row.

    Returns:
      The updated group.
    """
    num_rows = group.slots[0].shape[0]
    if updates_densely(optimizer, group, ids.shape[0]):
        return apply_dense(optimizer, group, accumulate(zero_accumulator(group), ids, grads))
    scratch = group.scratch if group.scratch is not None else jnp.zeros((num_rows,), jnp.int32)
    owner, is_owner, scratch = owners(ids, scratch)
    summed = jax.ops.segment_sum(grads, owner, num_segments=ids.shape[0])
    safe = jnp.maximum(ids, 0)
    if gathered is None:
        gathered = group.slots[0].at[safe].get(mode="promise_in_bounds")
    rows = (gathered, *(slot.at[safe].get(mode="promise_in_bounds") for slot in group.slots[1:]))
    count = None if group.count is None else group.count.at[safe].get(mode="promise_in_bounds")
    new_rows, new_count = optimizer.update_rows(rows, count, summed)
    # Only owners write; every other position goes to an out-of-range row and is dropped.
    target = jnp.where(is_owner, ids, num_rows)
    slots = tuple(
        slot.at[target].set(new, mode="drop", unique_indices=True) for slot, new in zip(group.slots, new_rows)
    )
    if count is not None:
        count = group.count.at[target].set(new_count, mode="drop", unique_indices=True)
    return PackedGroup(slots, count, scratch)


def updates_densely(optimizer: RowSparse, group: PackedGroup, batch_size: int) -> bool:
    """Whether a step of ``batch_size`` ids updates ``group`` densely (``RowSparse.dense_rows_per_id``)."""
    return group.slots[0].shape[0] <= optimizer.dense_rows_per_id * batch_size


def accumulate(
    acc: tuple[jax.Array, jax.Array], ids: jax.Array, grads: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Adds a batch's row gradients into a table-sized sum, and marks the rows it touches.

    Args:
      acc: (float32[num_rows, width] summed gradients, bool[num_rows] touched).
      ids: int32[b]; negative ids are padding and go nowhere.
      grads: float32[b, width].
    """
    summed, touched = acc
    safe = jnp.where(ids >= 0, ids, summed.shape[0])  # padding goes out of range and is dropped
    # On CPU this adds in batch order, as the row-wise path's segment_sum does: the same sums.
    return summed.at[safe].add(grads, mode="drop"), touched.at[safe].set(True, mode="drop")


def apply_dense(optimizer: RowSparse, group: PackedGroup, acc: tuple[jax.Array, jax.Array]) -> PackedGroup:
    """The row-sparse step computed for every row, with untouched rows kept as they were.

    Cheaper than gathering and scattering the touched rows when the batch touches a large part of
    the table: XLA's scatters cost several times a streaming pass per row on CPU.

    Args:
      acc: from :func:`accumulate`, starting at zeros and False.
    """
    summed, touched = acc
    new_rows, new_count = optimizer.update_rows(group.slots, group.count, summed)
    slots = tuple(jnp.where(touched[:, None], new, old) for new, old in zip(new_rows, group.slots))
    count = None if group.count is None else jnp.where(touched, new_count, group.count)
    return PackedGroup(slots, count, group.scratch)


def zero_accumulator(group: PackedGroup) -> tuple[jax.Array, jax.Array]:
    return jnp.zeros_like(group.slots[0]), jnp.zeros((group.slots[0].shape[0],), bool)


def sparse_step(
    optimizer: RowSparse,
    packed: Packed,
    group_grads: Mapping[str, jax.Array],
    users: jax.Array,
    items: jax.Array,
    gathered: Mapping[str, jax.Array] | None = None,
) -> Packed:
    """One row-sparse step on every group of ``packed``.

    Args:
      group_grads: ``group -> float32[b, width]`` gradients with respect to the gathered group rows.
      users, items: int32[b] row ids; negative ids are padding.
      gathered: the result of :func:`gather_rows` for these ids, to avoid gathering twice.
    """
    ids = {"user": users, "item": items}
    groups = {}
    for group, packed_group in packed.groups.items():
        groups[group] = sparse_update(
            optimizer, packed_group, ids[group], group_grads[group], None if gathered is None else gathered[group]
        )
    return Packed(groups, packed.names, packed.widths)


def make_packed_step(
    optimizer: RowSparse, y_range: tuple[float, float] | None, chunk_size: int = DENSE_CHUNK
) -> Callable:
    """A pure ``(packed, users, items, ratings, weights) -> (packed, loss)`` for a row-sparse optimizer.

    ``packed`` is :class:`jaxcf.Packed`: each id kind's tables and optimizer slots side by side,
    so the rows gathered for the forward pass are the rows the optimizer updates (one gather and one
    scatter per id kind and batch).

    When every table is updated densely (large batches: see ``RowSparse.dense_rows_per_id``) and
    the batch is a multiple of ``chunk_size`` larger than it, the batch's gradients are computed
    ``chunk_size`` ratings at a time and summed into table-sized buffers, then every table is
    updated once: the same step (the same parameters score every chunk, and the sums are added in
    batch order, as one scatter of the whole batch adds them), but each chunk's rows and gradients
    stay in cache instead of streaming ``[batch, F]`` arrays through memory.
    """

    def loss_and_grads(packed, users, items, ratings, weights, total_weight):
        def loss_of_group_rows(group_rows):
            rows = table_rows(packed, group_rows)
            err = models.score_rows(rows, y_range) - ratings
            return jnp.sum(weights * err * err) / total_weight

        gathered = gather_rows(packed, users, items)
        loss, group_grads = jax.value_and_grad(loss_of_group_rows)(gathered)
        return loss, group_grads, gathered

    def step(packed, users, items, ratings, weights):
        # Padding entries must not count as touching a row (they would advance its moments).
        real = weights > 0
        ids = {"user": jnp.where(real, users, -1), "item": jnp.where(real, items, -1)}
        total_weight = jnp.sum(weights)
        batch = users.shape[0]
        chunked = (
            batch > chunk_size > 0
            and batch % chunk_size == 0
            and all(updates_densely(optimizer, g, batch) for g in packed.groups.values())
        )
        if not chunked:
            loss, group_grads, gathered = loss_and_grads(packed, users, items, ratings, weights, total_weight)
            return sparse_step(optimizer, packed, group_grads, ids["user"], ids["item"], gathered), loss

        def chunk(carry, xs):
            accs, loss = carry
            chunk_users, chunk_items, chunk_ratings, chunk_weights, chunk_ids = xs
            part, group_grads, _ = loss_and_grads(
                packed, chunk_users, chunk_items, chunk_ratings, chunk_weights, total_weight
            )
            accs = {g: accumulate(accs[g], chunk_ids[g], group_grads[g]) for g in accs}
            return (accs, loss + part), None

        def split(x):
            return x.reshape(batch // chunk_size, chunk_size, *x.shape[1:])

        accs = {g: zero_accumulator(group) for g, group in packed.groups.items()}
        xs = jax.tree.map(split, (users, items, ratings, weights, ids))
        (accs, loss), _ = jax.lax.scan(chunk, (accs, jnp.zeros((), jnp.float32)), xs)
        groups = {g: apply_dense(optimizer, group, accs[g]) for g, group in packed.groups.items()}
        return Packed(groups, packed.names, packed.widths), loss

    return step
