"""Training on a device mesh, in one process or several: JAX's own ``jax.sharding`` and ``jax.distributed``.

The mesh has two axes, named by the config's ``mesh:`` section:

``model``  every embedding table, and every per-row optimizer slot (Adam's moments, ``lazy_adam``'s
           per-row step counts), is split by rows: device ``k`` of the axis holds rows
           ``[k * R / model, (k + 1) * R / model)``. Tables whose row count does not divide ``model``
           are padded with zero rows at the end (see *Padding*).
``data``   every batch is split by columns: each device along the axis trains on ``batch / data``
           of the batch's ratings (batches are padded with zero-weight entries when ``data`` does
           not divide the batch size, which leaves the loss and its gradient unchanged).

The train step is the single-device one (``jaxcf.steps.make_train_step``, or for a row-sparse
optimizer ``make_packed_sparse_step`` on tables packed once per epoch); ``jax.jit`` with
``in_shardings``/``out_shardings`` partitions the scan over it. XLA turns a row gather from a
row-sharded table into a local masked gather plus an all-reduce of the ``[batch / data, F]`` rows
over ``model``, and the gradient scatter into a local scatter (plus, for dense optimizers, an
all-reduce of each device's table shard over ``data``; for ``lazy_adam``, batch-sized all-gathers of
ids and row gradients). No device ever holds a whole table (``tests/test_distributed.py`` checks
the compiled program's memory), so no ``shard_map`` was needed.

Several processes (``jax.distributed``): :func:`initialize` starts them from the config's
``distributed:`` section or the environment (``JAXCF_COORDINATOR``, ``JAXCF_NUM_PROCESSES``,
``JAXCF_PROCESS_ID``). Every process loads the ratings and computes the same shuffled order (it is
a pure function of the seed and the epoch); each then copies to its own devices only its columns of
every batch (:meth:`Layout.make_train_epoch`), so no process puts another's slice of the data on a
device. Metrics and predictions come back replicated, so every process sees the same numbers; only
process 0 writes files (``jaxcf.train.run``), while every process writes its own shards of a
checkpoint (orbax does that).

Padding. ``jax.Array`` shardings must divide a dimension evenly, so under ``model = m`` a table of
``R`` rows is stored with ``ceil(R / m) * m`` rows; the extra rows start at zero, are never indexed
(ids are ``< R``) and so stay zero under every optimizer here (a zero row has a zero gradient and
zero weight decay). Checkpoints hold the padded arrays; ``jaxcf.checkpoint.restore`` pads or
truncates rows to the target's count, which is how a run saved under one mesh resumes under another
(or on one device). :func:`to_host` drops the padding before anything is exported.

The single-device program never comes here: :func:`make_layout` returns None for
``mesh: {data: 1, model: 1}`` in one process, and the callers then run exactly the unsharded code.

What does not live here: the train step and the fit loop (``jaxcf.train``), the checkpoint format
(``jaxcf.checkpoint``), optimizers (``jaxcf.optim``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxcf import optim
from jaxcf.config import Config, ConfigError, DistributedConfig

AXES = ("data", "model")

# Environment variables read when the config's distributed section leaves a value null.
ENVIRONMENT = {
    "coordinator_address": "JAXCF_COORDINATOR",
    "num_processes": "JAXCF_NUM_PROCESSES",
    "process_id": "JAXCF_PROCESS_ID",
}


# --------------------------------------------------------------------------- processes


def resolve(config: DistributedConfig) -> DistributedConfig:
    """The distributed section with null values filled from the environment.

    Raises:
      ConfigError: when an environment variable that should hold an integer does not.
    """
    values = {}
    for field, variable in ENVIRONMENT.items():
        value = getattr(config, field)
        text = os.environ.get(variable, "").strip()
        if value is None and text:
            if field == "coordinator_address":
                value = text
            else:
                low = 1 if field == "num_processes" else 0
                try:
                    value = int(text)
                except ValueError:
                    value = None
                if value is None or value < low:
                    raise ConfigError(f"{variable}={text!r}: expected an integer >= {low} (distributed.{field})")
        values[field] = value
    return DistributedConfig(**values)


def num_processes(config: DistributedConfig) -> int:
    """How many processes the config (or the environment) asks for; 1 when it names none."""
    return resolve(config).num_processes or 1


def initialize(config: DistributedConfig) -> bool:
    """Starts multi-process JAX (``jax.distributed.initialize``) when more than one process is asked for.

    Call it in every process, before anything else touches JAX. A single process is a no-op and
    leaves JAX untouched.

    Returns:
      True when running as one of several processes.

    Raises:
      ConfigError: when the coordinator address or the process id is missing or out of range.
    """
    resolved = resolve(config)
    count = resolved.num_processes or 1
    if count == 1:
        return False
    if jax.distributed.is_initialized():
        if jax.process_count() != count:
            raise ConfigError(
                f"distributed.num_processes is {count}, but JAX was already started with {jax.process_count()}"
            )
        return True
    if not resolved.coordinator_address:
        raise ConfigError(
            f"distributed.num_processes is {count}: set distributed.coordinator_address (or "
            f"{ENVIRONMENT['coordinator_address']}) to host:port of process 0, e.g. 10.0.0.1:1234"
        )
    if resolved.process_id is None or not 0 <= resolved.process_id < count:
        raise ConfigError(
            f"distributed.process_id (or {ENVIRONMENT['process_id']}) must be 0..{count - 1} "
            f"for {count} processes; got {resolved.process_id!r}"
        )
    # CPU devices of different processes talk through gloo: the default in jax 0.10, but "none"
    # (no cross-process CPU collectives) in some earlier versions.
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=resolved.coordinator_address,
        num_processes=count,
        process_id=resolved.process_id,
    )
    return True


# ------------------------------------------------------------------------------- layout


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    if x.ndim == 0 or x.shape[0] == rows:
        return x
    return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the training state and the data live on a ``(data, model)`` mesh.

    Every leaf of the training state with at least one dimension is a per-row table (parameters,
    and optimizer slots shaped like them); it is sharded by rows over ``model`` and replicated over
    ``data``. Scalars (step counts) are replicated.
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

    def sharding(self, ndim: int) -> NamedSharding:
        """The sharding of a state leaf of ``ndim`` dimensions: rows over ``model``, or replicated."""
        return NamedSharding(self.mesh, PartitionSpec("model") if ndim else PartitionSpec())

    def abstract(self, tree: Any) -> Any:
        """``tree`` (arrays or shape structs, unpadded or padded) as padded, sharded shape structs.

        This is the restore target of a checkpoint under this mesh.
        """

        def leaf(x):
            shape = tuple(x.shape)
            if shape:
                shape = (self.padded_rows(shape[0]), *shape[1:])
            return jax.ShapeDtypeStruct(shape, x.dtype, sharding=self.sharding(len(shape)))

        return jax.tree.map(leaf, tree)

    def init(self, init_fn: Callable[[], Any]) -> Any:
        """Runs ``init_fn`` (e.g. ``lambda: init_state(setup)``) straight into the padded, sharded layout.

        The values are those of the single-device init bit for bit: JAX's partitionable threefry
        draws the same random numbers whatever the sharding.
        """
        target = self.abstract(jax.eval_shape(init_fn))

        def padded():
            return jax.tree.map(lambda x, t: _pad_rows(x, t.shape[0] if t.shape else 0), init_fn(), target)

        return jax.jit(padded, out_shardings=jax.tree.map(lambda t: t.sharding, target))()

    def place(self, tree: Any) -> Any:
        """Pads and shards an existing state (host arrays, one-device arrays, or already placed).

        Arrays on one process's devices must hold the same values in every process.
        """

        def leaf(x, target):
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                if x.shape != target.shape:
                    raise ValueError(f"a global array of shape {x.shape} cannot be placed as {target.shape}")
                return x if x.sharding.is_equivalent_to(target.sharding, x.ndim) else jax.device_put(x, target.sharding)
            host = np.asarray(x)
            if host.ndim:
                host = np.pad(host, [(0, target.shape[0] - host.shape[0])] + [(0, 0)] * (host.ndim - 1))
            return jax.make_array_from_callback(host.shape, target.sharding, lambda index: host[index])

        return jax.tree.map(leaf, tree, self.abstract(tree))

    def make_train_epoch(
        self,
        optimizer: Any,
        y_range: tuple[float, float] | None,
        batch_size: int,
        *,
        make_step: Callable,
        make_packed_step: Callable,
    ) -> ShardedEpoch:
        """The sharded counterpart of ``jaxcf.steps.make_train_epoch`` (the same call signature).

        Args:
          optimizer, y_range, batch_size: as for ``jaxcf.steps.make_train_epoch``.
          make_step, make_packed_step: ``jaxcf.steps.make_train_step`` and
            ``make_packed_sparse_step``, passed in by the caller rather than imported here
            (``jaxcf.train`` imports this module, and under ``python -m jaxcf.train`` a second import
            would bring a second ``TrainState`` class).
        """
        return ShardedEpoch(self, epoch_body(optimizer, y_range, make_step, make_packed_step), batch_size)

    def make_predict(
        self, predict_fn: Callable, users: np.ndarray, items: np.ndarray, chunk: int
    ) -> Callable[[Any], np.ndarray]:
        """Predictions for fixed (user, item) pairs from sharded parameters, the same in every process.

        Args:
          predict_fn: ``(params, users, items) -> float32[b]`` (``jaxcf.evaluate.make_predict_fn``).
          users, items: int32[n] row ids on the host, the same in every process.
          chunk: pairs per device call (rounded up to a multiple of ``data``).

        Returns:
          ``params -> float32[n]`` predictions on the host. The pairs go to the devices once, split
          over ``data``.
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
            out = [np.asarray(jitted(params, u, i))[:size] for u, i, size in chunks]
            return np.concatenate(out) if out else np.zeros(0, np.float32)

        return predict

    def sync(self, name: str) -> None:
        """Waits until every process reaches the barrier ``name``; nothing to wait for in one process."""
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(name)


def epoch_body(
    optimizer: Any, y_range: tuple[float, float] | None, make_step: Callable, make_packed_step: Callable
) -> Callable:
    """``(state, batches) -> (state, float32[num_batches] losses)``: ``jaxcf.train``'s epoch after its batching.

    ``batches`` are (users, items, ratings, weights), each ``[num_batches, batch]``. As in
    ``jaxcf.steps.make_train_epoch``, a row-sparse optimizer trains on packed tables, packed once
    before the scan and unpacked after it.
    """
    if isinstance(optimizer, optim.RowSparse):
        packed_step = make_packed_step(optimizer, y_range)

        def sparse_body(state, xs):
            packed = optim.pack(optimizer, state.params, state.opt_state)
            packed, losses = jax.lax.scan(lambda carry, batch: packed_step(carry, *batch), packed, xs)
            params, opt_state = optim.unpack(optimizer, packed)
            return state._replace(params=params, opt_state=opt_state, step=state.step + xs[0].shape[0]), losses

        return sparse_body
    step = make_step(optimizer, y_range)

    def body(state, xs):
        return jax.lax.scan(lambda carry, batch: step(carry, *batch), state, xs)

    return body


class ShardedEpoch:
    """One epoch on a mesh: ``(state, users, items, ratings, order) -> (state, float32[num_batches] losses)``.

    ``users``/``items``/``ratings`` are the training rows on the host (int32/int32/float32[n], the
    same in every process) and ``order`` int32[m] the epoch's positions into them. The batches are
    those of the single-device epoch: ``order`` cut into ``ceil(m / batch_size)`` batches, the
    last padded with zero-weight entries. They go to the devices as ``[num_batches, width]``
    arrays split by columns over ``data`` (``width`` is ``batch_size`` rounded up to a multiple of
    ``data``, the extra columns zero-weight too), and each process builds only its own columns:
    it reads only the ratings its devices train on. The state is donated.
    """

    def __init__(self, layout: Layout, body: Callable, batch_size: int):
        self.layout = layout
        self.batch_size = batch_size
        self.width = -(-batch_size // layout.data) * layout.data
        self.batch_sharding = NamedSharding(layout.mesh, PartitionSpec(None, "data"))
        self._body = body
        self._jitted: dict[Any, Any] = {}

    def batches(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray, order: np.ndarray) -> tuple:
        """The epoch's batches as global arrays: (users, items, ratings, weights), each [num_batches, width]."""
        order = np.asarray(order)
        num_batches = -(-len(order) // self.batch_size)
        flat = np.full(num_batches * self.batch_size, -1, np.int64)
        flat[: len(order)] = order
        positions = np.full((num_batches, self.width), -1, np.int64)
        positions[:, : self.batch_size] = flat.reshape(num_batches, self.batch_size)

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
        """The compiled-on-first-use ``(state, batches) -> (state, losses)`` for states shaped like ``state``."""
        key = jax.tree.structure(state)
        if key not in self._jitted:
            shardings = jax.tree.map(lambda x: self.layout.sharding(x.ndim), state)
            self._jitted[key] = jax.jit(
                self._body,
                in_shardings=(shardings, self.batch_sharding),
                out_shardings=(shardings, self.layout.replicated),
                donate_argnums=(0,),
            )
        return self._jitted[key]

    def __call__(self, state, users, items, ratings, order):
        return self.jitted(state)(state, self.batches(users, items, ratings, order))


def make_layout(config: Config) -> Layout | None:
    """The mesh layout the config asks for, or None for a single device in a single process.

    Call :func:`initialize` first when running several processes.

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


def to_host(tree: Any, logical: Any) -> Any:
    """Host copies of a (possibly sharded, padded) tree, cut to the ``logical`` (unpadded) shapes.

    A collective with several processes: every process calls it and gets the whole arrays.

    Args:
      tree: arrays.
      logical: the same structure with the unpadded shapes (arrays or shape structs).

    Returns:
      numpy arrays of the logical shapes.
    """

    def leaf(x, like):
        if x.is_fully_addressable or x.is_fully_replicated:
            host = np.asarray(x)
        else:
            host = multihost_utils.process_allgather(x, tiled=True)
        return host[: like.shape[0]] if host.ndim else host

    return jax.tree.map(leaf, tree, logical)


def shard_fraction(array: jax.Array) -> float:
    """The largest fraction of ``array``'s elements that any one device holds (1.0: unsharded)."""
    size = math.prod(array.shape) or 1
    return max(math.prod(shard.data.shape) for shard in array.addressable_shards) / size
