"""Training on a device mesh, in one process or several: JAX's own ``jax.sharding`` and ``jax.distributed``.

The mesh has two axes, named by the config's ``mesh:`` section:

``model``  every embedding table, and every per-row optimizer slot (Adam's moments, ``lazy_adam``'s
           per-row step counts), is split by rows: device ``k`` of the axis holds rows
           ``[k * R / model, (k + 1) * R / model)``. Tables whose row count does not divide ``model``
           are padded with zero rows at the end (see *Padding*).
``data``   every batch is split by columns: each device along the axis trains on ``batch / data``
           of the batch's ratings (batches are padded with zero-weight entries when ``data`` does
           not divide the batch size, which leaves the loss and its gradient unchanged).

Which axis of a state leaf holds the rows is the model family's to say (``row_axes``): axis 0 for a
single model's tables and slots, axis 1 for K members stacked side by side (``[K, rows, d]``), the
row axis of the Gibbs sampler's chains and samples. The epoch is the single-device one
(``jaxcf.core.steps.make_epoch_body``: the same step, the same scan); ``jax.jit`` with
``in_shardings``/``out_shardings`` partitions it. XLA turns a row gather from a
row-sharded table into a local masked gather plus an all-reduce of the ``[batch / data, F]`` rows
over ``model``, and the gradient scatter into a local scatter (plus, for dense optimizers, an
all-reduce of each device's table shard over ``data``; for ``lazy_adam``, batch-sized all-gathers of
ids and row gradients). No device ever holds a whole table (``tests/test_distributed.py`` checks
the compiled program's memory), so no ``shard_map`` was needed.

Several processes (``jax.distributed``): ``jaxcf.core.processes.initialize`` starts them from the config's
``distributed:`` section or the environment (``JAXCF_COORDINATOR``, ``JAXCF_NUM_PROCESSES``,
``JAXCF_PROCESS_ID``). Every process loads the ratings and computes the same shuffled order (it is
a pure function of the seed and the epoch); each then copies to its own devices only its columns of
every batch (:class:`ShardedEpoch`), so no process puts another's slice of the data on a device.
Metrics and predictions come back replicated, so every process sees the same numbers; only process 0
writes files (``jaxcf.training.loop.run``), while every process writes its own shards of a checkpoint
(orbax does that).

Padding. ``jax.Array`` shardings must divide a dimension evenly, so under ``model = m`` a table of
``R`` rows is stored with ``ceil(R / m) * m`` rows; the extra rows start at zero, are never indexed
(ids are ``< R``) and so stay zero under every optimizer here (a zero row has a zero gradient and
zero weight decay), and every reduction over rows that a family makes (the Gibbs sampler's) masks
them. Checkpoints hold the padded arrays; ``jaxcf.training.checkpoint.restore`` pads or truncates rows to the
target's count, which is how a run saved under one mesh resumes under another (or on one device).
:func:`to_host` drops the padding before anything is exported.

The single-device program never comes here: :func:`make_layout` returns None for
``mesh: {data: 1, model: 1}`` in one process, and the callers then run exactly the unsharded code.

One concept at some length: the mesh layout and everything placed, run or fetched through it.

What does not live here: the train step (``jaxcf.core.steps``), the epoch loop (``jaxcf.training.loop``), the
checkpoint format (``jaxcf.training.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxcf.core.errors import ConfigError
from jaxcf.core.processes import num_processes

AXES = ("data", "model")

# ------------------------------------------------------------------------------- layout

RowAxes = Callable[[Any], Any]  # state -> the same structure with each leaf's row axis (int) or None


def single_row_axes(tree: Any) -> Any:
    """Row axes of a single model's state: axis 0 of every leaf with a dimension; scalars replicated."""
    return jax.tree.map(lambda x: 0 if len(x.shape) else None, tree)


def member_row_axes(tree: Any) -> Any:
    """Row axes of K stacked members' state (``[K, rows, ...]``): axis 1; per-member scalars replicated."""
    return jax.tree.map(lambda x: 1 if len(x.shape) >= 2 else None, tree)


def _pad_axis(x: jax.Array, axis: int | None, rows: int) -> jax.Array:
    if axis is None or x.shape[axis] == rows:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, rows - x.shape[axis])
    return jnp.pad(x, pad)


def _axes_leaves(tree: Any, axes: Any) -> list:
    """The row axes, one per leaf of ``tree`` (None leaves of ``axes`` are kept)."""
    return jax.tree.leaves(axes, is_leaf=lambda a: a is None) if axes is not None else [None] * len(
        jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the training state and the data live on a ``(data, model)`` mesh.

    Every leaf of a training state with a row axis (given by the family's ``row_axes``) is sharded
    along it over ``model`` and replicated over ``data``; other leaves are replicated.
    """

    mesh: Mesh

    @property
    def data(self) -> int:
        return self.mesh.shape["data"]

    @property
    def model(self) -> int:
        return self.mesh.shape["model"]

    @property
    def is_primary(self) -> bool:
        """Whether this process writes the run's files (process 0)."""
        return jax.process_index() == 0

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def padded_rows(self, rows: int) -> int:
        """Rows of a table of ``rows`` rows as stored on this mesh (a multiple of ``model``)."""
        return -(-rows // self.model) * self.model

    def sharding(self, ndim: int, axis: int | None = 0) -> NamedSharding:
        """The sharding of a leaf of ``ndim`` dimensions whose rows are on ``axis`` (None: replicated)."""
        if axis is None or ndim == 0:
            return self.replicated
        spec = [None] * ndim
        spec[axis] = "model"
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def abstract(self, tree: Any, row_axes: RowAxes = single_row_axes) -> Any:
        """``tree`` (arrays or shape structs, unpadded or padded) as padded, sharded shape structs.

        This is the restore target of a checkpoint under this mesh.
        """
        treedef = jax.tree.structure(tree)
        leaves = jax.tree.leaves(tree)
        axes = _axes_leaves(tree, row_axes(tree))
        out = []
        for x, axis in zip(leaves, axes):
            shape = list(x.shape)
            if axis is not None and shape:
                shape[axis] = self.padded_rows(shape[axis])
            out.append(jax.ShapeDtypeStruct(tuple(shape), x.dtype, sharding=self.sharding(len(shape), axis)))
        return jax.tree.unflatten(treedef, out)

    def init(self, init_fn: Callable[[], Any], row_axes: RowAxes = single_row_axes) -> Any:
        """Runs ``init_fn`` straight into the padded, sharded layout.

        The values are those of the single-device init bit for bit: JAX's partitionable threefry
        draws the same random numbers whatever the sharding.
        """
        logical = jax.eval_shape(init_fn)
        target = self.abstract(logical, row_axes)
        axes = _axes_leaves(logical, row_axes(logical))
        treedef = jax.tree.structure(logical)

        def padded():
            leaves = jax.tree.leaves(init_fn())
            targets = jax.tree.leaves(target)
            return jax.tree.unflatten(treedef, [
                _pad_axis(x, a, t.shape[a]) if a is not None else x for x, a, t in zip(leaves, axes, targets)
            ])

        return jax.jit(padded, out_shardings=jax.tree.map(lambda t: t.sharding, target))()

    def place(self, tree: Any, row_axes: RowAxes = single_row_axes) -> Any:
        """Pads and shards an existing state (host arrays, one-device arrays, or already placed).

        Arrays on one process's devices must hold the same values in every process.
        """
        target = self.abstract(tree, row_axes)
        axes = _axes_leaves(tree, row_axes(tree))

        def leaf(x, t, axis):
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                if x.shape != t.shape:
                    raise ValueError(f"a global array of shape {x.shape} cannot be placed as {t.shape}")
                return x if x.sharding.is_equivalent_to(t.sharding, x.ndim) else jax.device_put(x, t.sharding)
            host = np.asarray(x)
            if axis is not None and host.ndim:
                pad = [(0, 0)] * host.ndim
                pad[axis] = (0, t.shape[axis] - host.shape[axis])
                host = np.pad(host, pad)
            return jax.make_array_from_callback(host.shape, t.sharding, lambda index: host[index])

        leaves = [leaf(x, t, a) for x, t, a in zip(jax.tree.leaves(tree), jax.tree.leaves(target), axes)]
        return jax.tree.unflatten(jax.tree.structure(tree), leaves)

    def replicate(self, tree: Any) -> Any:
        """Host data (the same in every process) copied whole to every device of the mesh."""

        def leaf(x):
            if x is None:
                return None
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, self.replicated, lambda index: host[index])

        return jax.tree.map(leaf, tree)

    def make_predict(
        self, predict_fn: Callable, users: np.ndarray, items: np.ndarray, chunk: int
    ) -> Callable[[Any], np.ndarray]:
        """Predictions for fixed (user, item) pairs from sharded parameters, the same in every process.

        Args:
          predict_fn: ``(params, users, items) -> float32[..., b]`` (pairs on the last axis).
          users, items: int32[n] row ids on the host, the same in every process.
          chunk: pairs per device call (rounded up to a multiple of ``data``).

        Returns:
          ``params -> float32[..., n]`` predictions on the host. The pairs go to the devices once,
          split over ``data``.
        """
        n = len(users)
        chunk = -(-max(1, min(chunk, n)) // self.data) * self.data
        sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        chunks = []
        for start in range(0, n, chunk):
            size = min(chunk, n - start)
            placed = []
            for values in (users, items):
                host = np.zeros(chunk, values.dtype)
                host[:size] = values[start : start + size]
                placed.append(jax.make_array_from_callback(host.shape, sharding, lambda index, h=host: h[index]))
            chunks.append((*placed, size))
        jitted = jax.jit(predict_fn, out_shardings=self.replicated)

        def predict(params):
            out = [np.asarray(jitted(params, u, i))[..., :size] for u, i, size in chunks]
            return np.concatenate(out, axis=-1) if out else np.zeros(0, np.float32)

        return predict

    def fetch(self, fn: Callable, *args) -> Any:
        """``fn(*args)`` jitted with replicated outputs, on the host: the same values in every process."""
        return jax.tree.map(np.asarray, jax.jit(fn, out_shardings=self.replicated)(*args))

    def sync(self, name: str) -> None:
        """Waits until every process reaches the barrier ``name``; nothing to wait for in one process."""
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(name)


class ShardedEpoch:
    """One epoch on a mesh: ``(state, l2, users, items, ratings, order) -> (state, losses)``.

    ``users``/``items``/``ratings`` are the training rows on the host (int32/int32/float32[n], the
    same in every process) and ``order`` int[m] the epoch's positions into them (int[K, m] for K
    members). The batches are those of the single-device epoch: ``order`` cut into
    ``ceil(m / batch_size)`` batches, the last padded with zero-weight entries. They go to the
    devices as ``[num_batches, width]`` arrays (``[K, num_batches, width]`` for members) split by
    columns over ``data`` (``width`` is ``batch_size`` rounded up to a multiple of ``data``, the
    extra columns zero-weight too), and each process builds only its own columns: it reads only the
    ratings its devices train on. ``body`` is ``jaxcf.core.steps.make_epoch_body``'s. The state is donated.
    """

    def __init__(self, layout: Layout, body: Callable, batch_size: int, *, members: bool = False,
                 row_axes: RowAxes = single_row_axes):
        self.layout = layout
        self.batch_size = batch_size
        self.members = members
        self.row_axes = row_axes
        self.width = -(-batch_size // layout.data) * layout.data
        spec = PartitionSpec(None, None, "data") if members else PartitionSpec(None, "data")
        self.batch_sharding = NamedSharding(layout.mesh, spec)

        def run(state, l2, batches):
            return body(state, l2, batches, lambda x: x)

        self._run = jax.vmap(run, in_axes=(0, 0, 0)) if members else run
        self._jitted: dict[Any, Any] = {}

    def batches(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray, order: np.ndarray) -> tuple:
        """The epoch's batches as global arrays: (users, items, ratings, weights)."""
        order = np.asarray(order)
        orders = order if self.members else order[None]
        count = orders.shape[1]
        num_batches = -(-count // self.batch_size)
        flat = np.full((orders.shape[0], num_batches * self.batch_size), -1, np.int64)
        flat[:, :count] = orders
        positions = np.full((orders.shape[0], num_batches, self.width), -1, np.int64)
        positions[:, :, : self.batch_size] = flat.reshape(orders.shape[0], num_batches, self.batch_size)
        if not self.members:
            positions = positions[0]

        def column(values):
            def shard(index):
                # Called only for this process's devices, so a process reads only its own ratings.
                where = positions[index]
                real = where >= 0
                if values is None:  # the weights
                    return real.astype(ratings.dtype)
                return np.where(real, values[np.maximum(where, 0)], 0).astype(values.dtype)

            return jax.make_array_from_callback(positions.shape, self.batch_sharding, shard)

        return column(users), column(items), column(ratings), column(None)

    def jitted(self, state: Any) -> Any:
        """The compiled-on-first-use ``(state, l2, batches) -> (state, losses)`` for states shaped like ``state``."""
        key = jax.tree.structure(state)
        if key not in self._jitted:
            axes = _axes_leaves(state, self.row_axes(state))
            shardings = jax.tree.unflatten(key, [
                self.layout.sharding(x.ndim, a) for x, a in zip(jax.tree.leaves(state), axes)
            ])
            self._jitted[key] = jax.jit(
                self._run,
                in_shardings=(shardings, self.layout.replicated, self.batch_sharding),
                out_shardings=(shardings, self.layout.replicated),
                donate_argnums=(0,),
            )
        return self._jitted[key]

    def __call__(self, state, l2, users, items, ratings, order):
        return self.jitted(state)(state, l2, self.batches(users, items, ratings, order))


def make_layout(config) -> Layout | None:
    """The mesh layout the config asks for, or None for a single device in a single process.

    Call ``jaxcf.core.processes.initialize`` first when running several processes.

    Raises:
      ConfigError: when the mesh does not match the devices.
    """
    data, model = config.mesh.data, config.mesh.model
    processes = num_processes(config.distributed)
    if data * model == 1 and processes == 1:
        return None
    devices = jax.devices()
    if processes > 1 and data * model != len(devices):
        raise ConfigError(
            f"mesh.data * mesh.model = {data * model}, but the {jax.process_count()} processes have "
            f"{len(devices)} devices in all; with several processes the mesh must use every device"
        )
    if data * model > len(devices):
        raise ConfigError(
            f"mesh.data * mesh.model = {data * model}, but only {len(devices)} device(s) are visible; "
            "use a smaller mesh (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N before "
            "starting Python gives N devices)"
        )
    # Auto axes: jit's in/out shardings steer the partitioner, and the step is the unsharded code.
    mesh = jax.make_mesh(
        (data, model), AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices[: data * model]
    )
    return Layout(mesh)


def to_host(tree: Any, logical: Any, row_axes: RowAxes = single_row_axes) -> Any:
    """Host copies of a (possibly sharded, padded) tree, cut to the ``logical`` (unpadded) shapes.

    A collective with several processes: every process calls it and gets the whole arrays.

    Args:
      tree: arrays.
      logical: the same structure with the unpadded shapes (arrays or shape structs).
      row_axes: which axis of each leaf holds the rows.

    Returns:
      numpy arrays of the logical shapes.
    """
    axes = _axes_leaves(logical, row_axes(logical))

    def leaf(x, like, axis):
        if x.is_fully_addressable or x.is_fully_replicated:
            host = np.asarray(x)
        else:
            host = multihost_utils.process_allgather(x, tiled=True)
        if axis is None or not host.ndim:
            return host
        return np.take(host, np.arange(like.shape[axis]), axis=axis)

    leaves = [leaf(x, like, a) for x, like, a in zip(jax.tree.leaves(tree), jax.tree.leaves(logical), axes)]
    return jax.tree.unflatten(jax.tree.structure(logical), leaves)


def shard_fraction(array: jax.Array) -> float:
    """The largest fraction of ``array``'s elements that any one device holds (1.0: unsharded)."""
    size = math.prod(array.shape) or 1
    return max(math.prod(shard.data.shape) for shard in array.addressable_shards) / size
