"""The batched F x F Cholesky and solves of ``jaxcf.core.linalg``, and the exact iALS sweep, old and new way.

    python bench/linalg.py [--repeats 3] [--json results/linalg.json]

On 9,066 random systems (F x F each, ``X'X + 10 I``), for F in 32, 64, 128: the median seconds of
``jaxcf.core.linalg.cholesky`` against its unblocked form (one column per step), of ``cho_solve`` (forward
and back substitution one entry per step) against ``cho_solve_blocked``, and of both steps on chunks
of 32 systems at a time (``lax.map``), as the iALS sweep runs them; each compiled once before timing.
Then one whole exact iALS sweep (``configs/ials.yaml``, F = 128, ml-latest-small's implicit protocol)
as training runs it, beside the same sweep the way jaxcf ran it before (each row's ``sum v v'`` as a
dense count matrix times every item's ``v v'``, then the whole batch factored and solved at once):
the same rows (max difference printed), side by side in one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

SYSTEMS = 9066


def timed(function, *args, repeats: int) -> float:
    compiled = jax.jit(function)
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def in_chunks(a, b):
    from jaxcf.core import linalg

    return jax.lax.map(lambda pair: linalg.cho_solve_blocked(linalg.cholesky(pair[0]), pair[1]), (a, b),
                       batch_size=32)


def dense_sweep(cfg, dataset, state, repeats: int) -> tuple[float, float]:
    """The exact sweep as jaxcf ran it before on one device, and still runs it on a mesh: per-row
    normal equations from the dense count matrix, the whole batch factored and solved at once
    (``ials.make_sides(..., mesh=True)``). Returns its median seconds and the largest difference from
    the current sweep's rows, from the same state."""
    from jaxcf.families.ials import fit as ials

    r, train = dataset.ratings, dataset.split.train
    users, items = r.users[train], r.items[train]
    sides = (ials.make_sides(users, items, r.num_users, r.num_items, "cholesky", mesh=True),
             ials.make_sides(items, users, r.num_items, r.num_users, "cholesky", mesh=True))
    counts = (np.bincount(users, minlength=r.num_users).astype(np.float32),
              np.bincount(items, minlength=r.num_items).astype(np.float32))
    sides, counts = jax.tree.map(jnp.asarray, sides), jax.tree.map(jnp.asarray, counts)
    sweep = jax.jit(ials.make_sweep(*sides, *counts, ials.settings_of(cfg), r.num_users, r.num_items))
    old = jax.block_until_ready(sweep(state))
    new, _ = ials.family(cfg, dataset).epoch(jax.tree.map(jnp.copy, state), 0)  # it donates its input
    difference = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(old, new))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(sweep(state))
        times.append(time.perf_counter() - start)
    return statistics.median(times), difference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from jaxcf import config, data
    from jaxcf.core import linalg
    from jaxcf.families.ials import fit as ials

    load_before = machine.load_average()
    rows = {}
    key = jax.random.key(0)
    for size in (32, 64, 128):
        x = jax.random.normal(key, (SYSTEMS, 2 * size, size)) * 0.1
        a = jnp.matmul(jnp.swapaxes(x, 1, 2), x) + 10.0 * jnp.eye(size)
        b = jax.random.normal(jax.random.fold_in(key, 1), (SYSTEMS, size))
        factor = linalg.cholesky(a)
        whole = linalg.cho_solve(factor, b)
        row = {
            "cholesky_unblocked_s": timed(linalg._cholesky_unblocked, a, repeats=args.repeats),
            "cholesky_s": timed(linalg.cholesky, a, repeats=args.repeats),
            "cho_solve_s": timed(linalg.cho_solve, factor, b, repeats=args.repeats),
            "cho_solve_blocked_s": timed(linalg.cho_solve_blocked, factor, b, repeats=args.repeats),
            "both_in_chunks_of_32_s": timed(in_chunks, a, b, repeats=args.repeats),
            "max_abs_difference": float(jnp.max(jnp.abs(whole - linalg.cho_solve(linalg._cholesky_unblocked(a), b)))),
            "max_abs_difference_blocked_solve": float(jnp.max(jnp.abs(whole - linalg.cho_solve_blocked(factor, b)))),
        }
        rows[size] = row
        print(f"F = {size:3d}: cholesky {row['cholesky_unblocked_s']:.3f} s unblocked, {row['cholesky_s']:.3f} s "
              f"blocked; cho_solve {row['cho_solve_s']:.3f} s, by blocks {row['cho_solve_blocked_s']:.3f} s; "
              f"both by blocks in chunks of 32 systems {row['both_in_chunks_of_32_s']:.3f} s; "
              f"max |difference| {row['max_abs_difference']:.2g}, "
              f"{row['max_abs_difference_blocked_solve']:.2g}", flush=True)
    cfg = config.load("ials.yaml")
    dataset = data.interactions(data.load(cfg.data, cfg.seed), 4.0, 0.2, cfg.seed)
    family = ials.family(cfg, dataset)
    state = family.init()
    start = time.perf_counter()
    state, _ = family.epoch(state, 0)  # compiles
    first = time.perf_counter() - start
    times = []
    for number in range(1, 1 + args.repeats):
        start = time.perf_counter()
        state, _ = family.epoch(state, number)
        times.append(time.perf_counter() - start)
    sweep = statistics.median(times)
    print(f"exact iALS sweep, configs/ials.yaml (F = {cfg.model.n_factors}): {sweep:.3f} s "
          f"(the first, compiling: {first:.2f} s)", flush=True)
    before, difference = dense_sweep(cfg, dataset, state, args.repeats)
    print(f"the same sweep the way jaxcf ran it before: {before:.3f} s; max |difference| of the rows "
          f"{difference:.2g}", flush=True)
    if args.json:
        machine.write_json(args.json, {
            "benchmark": "linalg", "command": " ".join(["python", *sys.argv]), "systems": SYSTEMS,
            "block": linalg.BLOCK, "sizes": rows, "ials_sweep_s": sweep, "ials_first_sweep_s": first,
            "ials_sweep_before_s": before, "ials_sweep_max_abs_difference": difference,
            "device": machine.jax_device(),
        }, load_before, "jax", "jaxlib")
    return 0


if __name__ == "__main__":
    sys.exit(main())
