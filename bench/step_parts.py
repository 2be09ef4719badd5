"""Times the parts of a large-batch row-sparse step, and the ways of drawing an epoch's order.

    python bench/step_parts.py [--batch-size 262144] [--repeats 10] [--json PATH]

The shapes are those of ``bench/scale.py`` at 20M ratings: a packed user table of 138,493 rows and
an item table of 26,744 rows, 51 float32 columns each (50 factors and the bias), a batch of 262,144
ratings whose users follow the same log-normal activity and whose items the same shifted Zipf law.
Each part is one jitted function, timed after a warm-up call (median of ``--repeats``):

- the gather of the batch's rows from each table, with the batch in random order and with its
  positions in ascending order (what ``jaxcf.core.steps.shuffle_order`` gives, with training rows
  stored by user: the users of a batch then ascend);
- the scatter-add of the batch's row gradients into a table-sized buffer, the same two ways;
- the dense Adam pass over the user table (what ``lazy_adam`` does per step at this batch size);
- for the epoch's order over 16M training ratings: ``jax.random.permutation`` (a sort on XLA's CPU
  backend), NumPy's ``Generator.permutation``, jaxcf's bucketed permutation and the whole
  ``shuffle_order`` (which adds the per-batch sort, timed alone too), and the device-side take of
  one column by the order (random, and batch-sorted).

What does not live here: the step itself (``jaxcf.core.sparse.make_packed_step``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  (bench/ is not a package; the scripts run as files)

NUM_USERS, NUM_ITEMS, WIDTH = 138_493, 26_744, 51
NUM_TRAIN = 16_000_000


def median_ms(fn, *args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def host_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=262_144)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    load_before = machine.load_average()
    rng = np.random.default_rng(0)
    user_weight = rng.lognormal(0.0, 1.2, NUM_USERS)
    item_weight = (np.arange(NUM_ITEMS) + 301.0) ** -2.0
    users = rng.choice(NUM_USERS, args.batch_size, p=user_weight / user_weight.sum()).astype(np.int32)
    items = rng.choice(NUM_ITEMS, args.batch_size, p=item_weight / item_weight.sum()).astype(np.int32)
    by_user = np.argsort(users, kind="stable")
    user_table = jnp.asarray(rng.normal(size=(NUM_USERS, WIDTH)).astype(np.float32))
    item_table = jnp.asarray(rng.normal(size=(NUM_ITEMS, WIDTH)).astype(np.float32))
    grads = jnp.asarray(rng.normal(size=(args.batch_size, WIDTH)).astype(np.float32))
    batch = {
        "users random": jnp.asarray(users),
        "users ascending": jnp.asarray(users[by_user]),
        "items random": jnp.asarray(items),
        "items, batch by user": jnp.asarray(items[by_user]),
    }

    gather = jax.jit(lambda table, ids: table.at[ids].get(mode="promise_in_bounds"))
    scatter = jax.jit(lambda table, ids, g: jnp.zeros_like(table).at[ids].add(g))

    @jax.jit
    def adam(p, m, v, g):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        return p - 1e-2 * (m / (jnp.sqrt(v) + 1e-8) + 1e-4 * p), m, v

    parts = {}
    for name, ids in batch.items():
        table = user_table if name.startswith("users") else item_table
        parts[f"gather, {name}"] = median_ms(gather, table, ids, repeats=args.repeats)
        parts[f"scatter-add, {name}"] = median_ms(scatter, table, ids, grads, repeats=args.repeats)
    parts["dense Adam pass, user table"] = median_ms(adam, user_table, user_table, user_table, user_table,
                                                     repeats=args.repeats)

    few = max(1, args.repeats // 5)
    key = jax.random.key(0)
    permute = jax.jit(lambda k: jax.random.permutation(k, NUM_TRAIN))
    order = {}
    order["jax.random.permutation, 16M"] = median_ms(permute, key, repeats=few)
    generator = np.random.default_rng(1)
    order["NumPy Generator.permutation, 16M"] = host_ms(lambda: generator.permutation(NUM_TRAIN), few)
    from jaxcf.core import steps

    order["bucketed permutation (jaxcf.core.steps._permutation), 16M"] = host_ms(
        lambda: steps._permutation(generator, NUM_TRAIN), few
    )
    order["jaxcf.core.steps.shuffle_order, 16M"] = host_ms(
        lambda: steps.shuffle_order(key, 0, NUM_TRAIN, args.batch_size), few
    )
    perm = generator.permutation(NUM_TRAIN).astype(np.int32)
    full = NUM_TRAIN - NUM_TRAIN % args.batch_size
    order["sort each batch's positions, 16M"] = host_ms(
        lambda: np.sort(perm[:full].reshape(-1, args.batch_size), axis=1), few
    )
    sorted_perm = perm.copy()
    sorted_perm[:full].reshape(-1, args.batch_size).sort(axis=1)
    column = jnp.arange(NUM_TRAIN, dtype=jnp.int32)
    take = jax.jit(lambda x, o: jnp.take(x, o))
    order["device take of one column, random order"] = median_ms(take, column, jnp.asarray(perm), repeats=few)
    order["device take of one column, batch-sorted"] = median_ms(take, column, jnp.asarray(sorted_perm),
                                                                 repeats=few)

    print(f"batch {args.batch_size:,}; user table {NUM_USERS:,} x {WIDTH}, item table {NUM_ITEMS:,} x {WIDTH}")
    for name, ms in parts.items():
        print(f"  {name:55s} {ms:9.2f} ms per step")
    print(f"epoch order over {NUM_TRAIN:,} training ratings")
    for name, ms in order.items():
        print(f"  {name:55s} {ms / 1e3:9.3f} s per epoch")
    if args.json:
        record = {
            "benchmark": "step_parts",
            "command": " ".join(["python", *sys.argv]),
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "step_parts_ms": parts,
            "epoch_order_ms": order,
            "load_average_before": load_before,
            "load_average_after": machine.load_average(),
            "device": machine.jax_device(),
            "machine": machine.describe("jax", "jaxlib", "numpy"),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
