"""Sharded training runs for ``tests/test_distributed.py``, in a process of its own with 8 CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/distributed_worker.py OUT SMALL_CSV

The device count is fixed when JAX starts, so these runs cannot share the test suite's process
(which keeps one device). This script only trains and records; ``tests/test_distributed.py``
computes the single-device references in its own process and makes every comparison. It writes:

``OUT/cases.json``                 per case: config overrides, the metric history, per-leaf shard
                                   fractions and shard shapes, and the compiled epoch's memory
``OUT/<case>.npz``                 the case's trained parameters, unpadded (``distributed.to_host``)
``OUT/full/``                      a CLI run on the whole bundled dataset under a 2x4 mesh
``OUT/resume/``                    a CLI run on SMALL_CSV: 1 epoch under 2x4 (tables padded to a
                                   multiple of 4 rows), resumed to 2 under 1x8 (a multiple of 8)
``OUT/family-<name>/``             CLI runs of the other families under 2x4 on SMALL_CSV: a
                                   4-member ensemble, a Gibbs sampler and iALS (FAMILY_CASES)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxcf import config as cfg
from jaxcf.cli import train
from jaxcf.core import distributed, rng, steps
from jaxcf.data import load as load_dataset
from jaxcf.families.sgd import fit as sgd
from jaxcf.training import loop as trainer

# Training rows used per epoch by the cases: 39 full batches of 64 and a partial one of 4.
SUBSET = 2500


def _case(data: int, model: int, kind: str, optimizer: str, *extra: str) -> list[str]:
    return [f"mesh.data={data}", f"mesh.model={model}", f"model.kind={kind}", f"optim.name={optimizer}", *extra]


# (name, overrides): every mesh shape with both models and both optimizer kinds (dense adam/adamw,
# row-sparse lazy_adam); a 3x2 mesh on 6 of the 8 devices, where `data` divides no batch; batch
# size 60 on 8x1, whose batches are padded to 64 columns. n_factors is 8 unless a case says more.
CASES = {
    "1x8-bias-adam": _case(1, 8, "bias", "adam", "model.n_factors=32"),
    "1x8-dot-lazy_adam": _case(1, 8, "dot", "lazy_adam", "model.n_factors=32"),
    "2x4-bias-lazy_adam": _case(2, 4, "bias", "lazy_adam"),
    "2x4-dot-adamw": _case(2, 4, "dot", "adamw"),
    "8x1-bias-adamw": _case(8, 1, "bias", "adamw", "train.batch_size=60"),
    "8x1-dot-lazy_adam": _case(8, 1, "dot", "lazy_adam"),
    "3x2-bias-lazy_adam": _case(3, 2, "bias", "lazy_adam"),
}
COMMON = ["train.epochs=2", "model.n_factors=8"]
# The other families through the CLI on a 2x4 mesh (SMALL_CSV: 22 users, 2,273 movies: both padded).
FAMILY_CASES = {
    "ensemble": ["ensemble.size=4", "train.epochs=2", "model.n_factors=8"],
    "gibbs": ["model.kind=dot", "ensemble.method=gibbs", "ensemble.size=4", "ensemble.chains=2",
              "ensemble.burn_in=2", "train.epochs=6", "model.n_factors=4"],
    "ials": ["model.kind=ials", "train.epochs=3", "model.n_factors=8", "data.implicit_threshold=3.0",
             "implicit.reg_exponent=1", "implicit.regularization=0.01"],
}


def subset_orders(config: cfg.Config, num_train: int):
    """The seeded shuffle of each epoch, cut to its first SUBSET positions (as the test's reference)."""
    key = rng.stream(config.seed, "order")
    return lambda epoch: steps.shuffle_order(key, epoch, num_train, config.train.batch_size)[:SUBSET]


# Cases whose compiled epoch is compiled a second time for its memory analysis (a dense and a
# row-sparse optimizer, with wider tables so that they, not the batches, dominate the memory; the
# other cases skip the extra compilation).
MEMORY_CASES = ("1x8-bias-adam", "1x8-dot-lazy_adam")


def compiled_memory(setup, layout, state, orders, logical) -> dict:
    """The compiled epoch's per-device memory: a program that gathered a whole table onto one
    device would need at least that table's bytes of temporaries."""
    ratings, rows = setup.dataset.ratings, setup.train_rows
    body = steps.make_epoch_body(setup.optimizer, setup.y_range)
    epoch = distributed.ShardedEpoch(layout, body, setup.config.train.batch_size)
    batches = epoch.batches(ratings.users[rows], ratings.items[rows], ratings.ratings[rows], orders(0))
    l2 = jax.numpy.float32(0)
    memory = epoch.jitted(state).lower(state, l2, batches).compile().memory_analysis()
    return {
        "temp_bytes": memory.temp_size_in_bytes,
        "argument_bytes": memory.argument_size_in_bytes,
        "batch_bytes_per_device": sum(b.addressable_shards[0].data.nbytes for b in batches),
        "logical_state_bytes": {
            jax.tree_util.keystr(path): int(np.prod(leaf.shape)) * leaf.dtype.itemsize
            for path, leaf in jax.tree_util.tree_leaves_with_path(logical)
        },
    }


def run_case(name: str, overrides: list[str], dataset, out: Path) -> dict:
    config = cfg.load("bias.yaml", [*COMMON, *overrides])
    setup = sgd.make_setup(config, dataset)
    orders = subset_orders(config, len(setup.train_rows))
    layout = distributed.make_layout(config)
    family = sgd.family(setup, layout, orders)
    state, progress = trainer.train(family, config, layout.init(family.init, family.row_axes))
    logical = jax.eval_shape(lambda: sgd.init_state(setup))
    np.savez(out / f"{name}.npz", **distributed.to_host(state, logical).params)

    leaves = jax.tree_util.tree_leaves_with_path(state)
    shards = {
        jax.tree_util.keystr(path): {
            "shape": list(leaf.shape),
            "fraction": distributed.shard_fraction(leaf),
            "shard_shapes": sorted({tuple(s.data.shape) for s in leaf.addressable_shards}),
            "devices": len(leaf.addressable_shards),
        }
        for path, leaf in leaves
    }
    return {
        "overrides": [*COMMON, *overrides],
        "history": progress.history,
        "shards": shards,
        "mesh": {"data": layout.data, "model": layout.model},
        "memory": compiled_memory(setup, layout, state, orders, logical) if name in MEMORY_CASES else None,
    }


def main(argv: list[str]) -> int:
    out, small_csv = Path(argv[0]), argv[1]
    out.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_numpy_rank_promotion", "raise")  # as the suite's conftest
    assert jax.device_count() == 8, f"expected 8 CPU devices, got {jax.device_count()}; set XLA_FLAGS"

    dataset = load_dataset(cfg.DataConfig(), seed=42)
    results = {}
    for name, overrides in CASES.items():
        start = time.perf_counter()
        results[name] = run_case(name, overrides, dataset, out)
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    (out / "cases.json").write_text(json.dumps(results, indent=1))

    base = ["--quiet", "--set"]
    full = ["--config", "bias.yaml", "--workdir", str(out / "full"), *base, "mesh.data=2", "mesh.model=4"]
    assert train.main([*full, "train.epochs=1"]) == 0

    small = ["--config", "bias.yaml", "--workdir", str(out / "resume")]
    small_set = [f"data.path={small_csv}", "model.n_factors=8"]
    assert train.main([*small, *base, *small_set, "train.epochs=1", "mesh.data=2", "mesh.model=4"]) == 0
    assert train.main([*small, "--resume", *base, *small_set, "train.epochs=2", "mesh.data=1", "mesh.model=8"]) == 0

    for name, overrides in FAMILY_CASES.items():
        start = time.perf_counter()
        workdir = ["--config", "bias.yaml", "--workdir", str(out / f"family-{name}")]
        assert train.main([*workdir, *base, f"data.path={small_csv}", *overrides, "mesh.data=2", "mesh.model=4"]) == 0
        print(f"family {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
