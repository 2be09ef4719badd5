"""Relational blocks of a Bayesian factorisation machine, and the schedule that samples their features.

Rendle (2013), "Scaling Factorization Machines to Relational Data": a rating's feature vector is the
concatenation of one row of each block, so a block holds one row per distinct user (or item), not one
per rating. Here a block is ``[one-hot id | implicit set]``, either part optional: the user block's row
``u`` is user ``u``'s one-hot column and the items ``u`` rated, each weighted ``1 / sqrt(|N(u)|)``
(Bayesian SVD++: Koren 2008's implicit feedback, sampled as Rendle, Zhang & Koren 2019 do); the item
block's row ``i`` is item ``i``'s one-hot column and the users who rated ``i``, weighted
``1 / sqrt(|N(i)|)`` (their "flipped" model). Every user and item index of the table has a row,
trained or not, as myFM's ``RelationBlock`` over the whole id range has. The ratings a block's rows
are indexed by (``index``) and the pairs its sets are made of may differ: sets may also hold the
evaluated pairs (``bfm.implicit_from: all``), the ratings never do.

The schedule (:func:`make_block`). Two features of one block may be drawn together only when no block
row holds both: then no rating sees both, and their full conditionals are independent Gaussians.
Each group's features are coloured into classes of such features (first fit, heaviest first); the
one-hot group is a single class (a row holds one id), the features that no row holds (items nobody
rated) join it, drawn from the prior. Classes live in tiers by feature degree, each tier a padded
array ``[classes, features, degree]`` so that ``lax.scan`` can walk it. Padding points at one extra
block row and one extra feature past the real ones, with value 0, so it adds nothing.

What does not live here: the sampler (``jaxcf.families.bfm.sampler``), which groups a config switches on
(``jaxcf.families.bfm.fit``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

# The degree ranges of the tiers: a tier's classes are padded to its largest degree, so tiers 2x apart
# keep the padding under 2x the real entries, and the many rare features do not pay for the few heavy.
# Each tier is one loop to compile (about a second); on ml-latest-small's flipped model tiers 2x apart
# draw a sweep in 0.35 CPU-seconds against 0.43 with tiers 4x apart (bench/parity_bfm.py's breakdown).
DEGREE_CAPS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclasses.dataclass(frozen=True)
class BlockMatrix:
    """One relational block on the host: a CSR matrix ``[num_rows, sum(group_sizes)]``.

    Attributes:
      index: int32[n] the block row of each training rating.
      indptr: int64[num_rows + 1], indices: int32[nnz] (columns local to the block), data: float32[nnz].
      group_sizes: the number of columns of each feature group, in column order.
    """

    index: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    group_sizes: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def num_features(self) -> int:
        return int(sum(self.group_sizes))

    def dense(self) -> np.ndarray:
        """float64[num_rows, num_features] (tests and small examples only)."""
        out = np.zeros((self.num_rows, self.num_features))
        rows = np.repeat(np.arange(self.num_rows), np.diff(self.indptr))
        np.add.at(out, (rows, self.indices), self.data)
        return out


def relation_block(own: np.ndarray, other: np.ndarray, num_own: int, num_other: int, *, ids: bool = True,
                   implicit: bool = False, set_own: np.ndarray | None = None,
                   set_other: np.ndarray | None = None) -> BlockMatrix:
    """``[one-hot own id | other ids seen with it, weighted 1/sqrt(count)]``, one row per own id.

    Args:
      own, other: int[n] the training ratings' ids on this side (users for the user block) and the other.
      num_own, num_other: the id ranges (every id gets a row or a column, trained or not).
      ids: whether to hold the one-hot id group (``num_own`` columns).
      implicit: whether to hold the implicit-set group (``num_other`` columns).
      set_own, set_other: int[m] the pairs the sets are made of (default: ``own``, ``other``).

    Returns:
      The block, with ``index = own`` (row ``u`` is id ``u``) and its groups in that order (``(num_own,)``,
      ``(num_other,)`` or ``(num_own, num_other)``). A pair seen twice counts once in the set.

    Raises:
      ValueError: a block with neither group.
    """
    if not (ids or implicit):
        raise ValueError("a block needs the id group, the implicit-set group or both")
    own = np.asarray(own, np.int64)
    set_own = own if set_own is None else np.asarray(set_own, np.int64)
    set_other = np.asarray(other if set_other is None else set_other, np.int64)
    rows, cols, vals, groups = [], [], [], ()
    if ids:
        rows.append(np.arange(num_own))
        cols.append(np.arange(num_own))
        vals.append(np.ones(num_own))
        groups = (num_own,)
    if implicit:
        pairs = np.unique(set_own * num_other + set_other)
        set_rows, set_cols = pairs // num_other, pairs % num_other
        counts = np.bincount(set_rows, minlength=num_own)
        rows.append(set_rows)
        cols.append(sum(groups) + set_cols)
        vals.append(1.0 / np.sqrt(counts[set_rows]))
        groups = (*groups, num_other)
    rows, cols, vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    order = np.lexsort((cols, rows))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=num_own))])
    return BlockMatrix(own.astype(np.int32), indptr.astype(np.int64), cols[order].astype(np.int32),
                       vals[order].astype(np.float32), groups)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["rows", "values", "features", "groups"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Tier:
    """Classes whose features are drawn together, padded to one shape.

    Attributes:
      rows: int32[classes, size, degree] the block rows holding each feature (padding: the extra row
        ``num_rows``).
      values: float32[classes, size, degree] the entries x (padding: 0).
      features: int32[classes, size] the class's features, block-local (padding: ``num_features``).
      groups: int32[classes, size] each feature's group within the block (padding: 0).
    """

    rows: jax.Array
    values: jax.Array
    features: jax.Array
    groups: jax.Array


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["index", "entry_rows", "entry_features", "entry_values", "row_counts", "tiers"],
                   meta_fields=["num_rows", "group_sizes"])
@dataclasses.dataclass(frozen=True)
class Block:
    """A block on the device: its entries (for ``X @ table``), its ratings' rows and its schedule.

    Attributes:
      index: int32[n] the block row of each training rating.
      entry_rows, entry_features: int32[nnz], entry_values: float32[nnz] the block matrix's entries.
      row_counts: float32[num_rows + 1] training ratings per block row (the padding row: 0).
      tiers: the classes, in the order a sweep draws them.
      num_rows: block rows; group_sizes: columns per group.
    """

    index: jax.Array
    entry_rows: jax.Array
    entry_features: jax.Array
    entry_values: jax.Array
    row_counts: jax.Array
    tiers: tuple[Tier, ...]
    num_rows: int
    group_sizes: tuple[int, ...]

    @property
    def num_features(self) -> int:
        return int(sum(self.group_sizes))


def colour(feature_rows: list[np.ndarray], num_rows: int, size: int) -> list[list[int]]:
    """First-fit classes of at most ``size`` features, no two of which share a row.

    Args:
      feature_rows: for each feature (in the order to place them), the int array of rows holding it.
      num_rows: the number of block rows.
      size: the most features one class may hold.

    Returns:
      The classes, as lists of positions into ``feature_rows``.
    """
    occupied = np.zeros((num_rows, 64), bool)
    load = np.zeros(64, np.int64)
    classes: list[list[int]] = []
    for position, rows in enumerate(feature_rows):
        taken = occupied[rows].any(axis=0) | (load >= size)
        chosen = int(np.argmin(taken[:len(classes) + 1]))  # the first free class, else a new one
        if chosen == len(classes):
            classes.append([])
            if chosen + 1 >= occupied.shape[1]:
                occupied = np.concatenate([occupied, np.zeros_like(occupied)], axis=1)
                load = np.concatenate([load, np.zeros_like(load)])
        occupied[rows, chosen] = True
        load[chosen] += 1
        classes[chosen].append(position)
    return classes


def _pad_tier(classes: list[np.ndarray], csc: tuple, num_rows: int, num_features: int, group_of: np.ndarray) -> Tier:
    """Padded host arrays of ``classes`` (arrays of block-local feature ids; ``group_of[f]`` is f's group)."""
    indptr, rows, values = csc
    size = max(len(c) for c in classes)
    degree = max(1, max(int(np.max(indptr[c + 1] - indptr[c])) for c in classes))
    out_rows = np.full((len(classes), size, degree), num_rows, np.int32)
    out_values = np.zeros((len(classes), size, degree), np.float32)
    out_features = np.full((len(classes), size), num_features, np.int32)
    out_groups = np.zeros((len(classes), size), np.int32)
    for k, members in enumerate(classes):
        out_features[k, :len(members)] = members
        out_groups[k, :len(members)] = group_of[members]
        for slot, feature in enumerate(members):
            span = slice(indptr[feature], indptr[feature + 1])
            out_rows[k, slot, :span.stop - span.start] = rows[span]
            out_values[k, slot, :span.stop - span.start] = values[span]
    return Tier(out_rows, out_values, out_features, out_groups)


def schedule(matrix: BlockMatrix) -> list[Tier]:
    """The classes of every group of ``matrix`` (host arrays; see the module docstring)."""
    num_rows, num_features = matrix.num_rows, matrix.num_features
    entry_rows = np.repeat(np.arange(num_rows), np.diff(matrix.indptr))
    order = np.lexsort((entry_rows, matrix.indices))
    csc_indptr = np.concatenate([[0], np.cumsum(np.bincount(matrix.indices, minlength=num_features))])
    csc = (csc_indptr, entry_rows[order].astype(np.int32), matrix.data[order])
    degree = np.diff(csc_indptr)
    group_of = np.repeat(np.arange(len(matrix.group_sizes)), matrix.group_sizes)
    # A one-hot group (no row holds two of its features) is one class, drawn at once; so are the
    # features no row holds (items nobody rated: drawn from their prior), with the first such group.
    # Two one-hot groups of one block may share rows, so each is a class of its own.
    at_once, coloured = [], []
    start = 0
    for group_size in matrix.group_sizes:
        ids = np.arange(start, start + group_size)
        start += group_size
        in_group = (matrix.indices >= ids[0]) & (matrix.indices <= ids[-1])
        used = ids[degree[ids] > 0]
        if np.bincount(entry_rows[in_group], minlength=num_rows).max() <= 1:
            at_once.append(used)
        else:
            coloured.append(used)
    empty = np.flatnonzero(degree == 0)
    at_once = [np.concatenate([at_once[0], empty])] + at_once[1:] if at_once else [empty]
    tiers = [_pad_tier([c], csc, num_rows, num_features, group_of) for c in at_once if len(c)]
    for used in coloured:
        low = 0
        for cap in (*DEGREE_CAPS[:-1], max(DEGREE_CAPS[-1], int(degree.max()))):
            members = used[(degree[used] > low) & (degree[used] <= cap)]
            low = cap
            if not len(members):
                continue
            members = members[np.argsort(-degree[members], kind="stable")]
            feature_rows = [csc[1][csc_indptr[f]:csc_indptr[f + 1]] for f in members]
            # No fewer classes than the busiest row has features here; aim for about that many.
            busiest = np.bincount(np.concatenate(feature_rows), minlength=num_rows).max()
            classes = colour(feature_rows, num_rows, -(-len(members) // busiest))
            tiers.append(_pad_tier([members[c] for c in classes], csc, num_rows, num_features, group_of))
    return tiers


def make_block(matrix: BlockMatrix) -> Block:
    """The device form of ``matrix`` with its schedule (host work: a second or so on ml-latest-small)."""
    tiers = tuple(jax.tree.map(jax.numpy.asarray, tier) for tier in schedule(matrix))
    entry_rows = np.repeat(np.arange(matrix.num_rows), np.diff(matrix.indptr)).astype(np.int32)
    counts = np.bincount(matrix.index, minlength=matrix.num_rows + 1).astype(np.float32)
    return Block(jax.numpy.asarray(matrix.index), jax.numpy.asarray(entry_rows), jax.numpy.asarray(matrix.indices),
                 jax.numpy.asarray(matrix.data), jax.numpy.asarray(counts), tiers, matrix.num_rows,
                 tuple(matrix.group_sizes))


def num_steps(block: Block) -> int:
    """How many classes a sweep walks per column of the table (one loop step each)."""
    return sum(int(tier.features.shape[0]) for tier in block.tiers)
