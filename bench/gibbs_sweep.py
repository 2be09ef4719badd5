"""One BPMF Gibbs sweep of one chain: ``bpmf.fit``'s, ``bpmf.fast_sweep``'s and myFM's, and the pieces of the fast one.

    python bench/gibbs_sweep.py [--factors 10,20] [--repeats 7] [--myfm-iter 50] [--myfm-repeats 3]
                                [--json results/gibbs_sweep.json]

On the bundled ml-latest-small training split (seed 42: 80,004 ratings, 671 users, 9,066 items),
centred on their mean, alpha 1.5, for each F: the median wall seconds (and, as ``*_min_s``, the
fastest) of ``--repeats`` runs of each program, compiled once before timing; the cases of a group
run round-robin, so that other work on the machine slows them alike:

- ``old_sweep_s``: ``jaxcf.families.bpmf.fit.make_sweep`` (dense count matrices, ``jaxcf.core.linalg`` solves);
- ``new_sweep_s``: ``jaxcf.families.bpmf.fast_sweep.make_sweep`` from the same state and key; ``max_abs_difference``
  is the largest difference between the two sweeps' rows (float32 rounding only: the same draws);
- ``myfm_sweep_s``: ``myfm.MyFMRegressor(rank=F).fit(X, y, n_iter)`` on one-hot user | item columns,
  divided by ``n_iter``, over ``--myfm-repeats`` fits (myFM samples on one thread; its BPMF also
  samples biases and the noise precision);
- the new sweep's pieces, each side on its own: ``gram_*_s`` (``jaxcf.core.rows.normal_equations``:
  bucketed gathers and batched products), ``factor_draw_*_s`` (``jaxcf.core.batchlast`` Cholesky and
  draw of every row from prepared precisions), ``hyper_s`` (both sides' Normal-Wishart draws), and
  the alternatives they replaced: ``gram_segment_sum_items_s`` (one outer product per rating, summed
  by ``jax.ops.segment_sum``), ``factor_draw_linalg_items_s`` (``jaxcf.core.linalg``, batch-first) and
  ``factor_solve_numpy_items_s`` (NumPy's LAPACK ``cholesky`` and ``solve``, on the host);
- ``new_compile_s``, ``old_compile_s``: the first call of each sweep (tracing and compiling; the new
  sweep's Cholesky is written out entry by entry, about F^3 / 6 fused operations per side).

Other processes on the machine skew the times: the load average is recorded before and after (and
around each F, ``load_average_during``), and the CPU model with them; on a busy machine the fastest
run is the better guide to what the code costs, the median to what a run of it took. What does not
live here: the sampler (``jaxcf.families.bpmf.fit``, ``jaxcf.families.bpmf.fast_sweep``).
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

ALPHA = 1.5


def interleaved(cases: dict, repeats: int) -> dict:
    """``{name: (function, args)}`` (each compiled by a first call here) timed round-robin, ``repeats``
    rounds, so that a busy machine slows each case alike: ``{name_s: median, name_min_s: fastest}``."""
    for function, args in cases.values():
        jax.block_until_ready(function(*args))
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (function, args) in cases.items():
            start = time.perf_counter()
            jax.block_until_ready(function(*args))
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, values in times.items():
        out[f"{name}_s"], out[f"{name}_min_s"] = statistics.median(values), min(values)
    return out


def myfm_sweep(split, factors: int, n_iter: int, repeats: int) -> dict:
    """myFM's fit seconds per sweep on one-hot user and item columns (median and fastest of ``repeats`` fits)."""
    import scipy.sparse as sps
    from peers import import_myfm  # its stand-in for the ``pkg_resources`` myFM 0.4 imports

    myfm, _ = import_myfm()
    users, items, ratings, num_users, num_items = split
    n = len(ratings)
    columns = np.stack([users.astype(np.int64), num_users + items.astype(np.int64)], 1).reshape(-1)
    x = sps.csr_matrix((np.ones(2 * n), columns, np.arange(0, 2 * n + 1, 2)), shape=(n, num_users + num_items))
    times = []
    for _ in range(repeats):
        model = myfm.MyFMRegressor(rank=factors, random_seed=42)
        start = time.perf_counter()
        model.fit(x, ratings.astype(np.float64), n_iter=n_iter, group_shapes=[num_users, num_items])
        times.append((time.perf_counter() - start) / n_iter)
    return {"myfm_sweep_s": statistics.median(times), "myfm_sweep_min_s": min(times)}


def pieces(factors: int, sides, fast_sides, state, repeats: int) -> dict:
    """Each side's normal equations and factor-and-draw on their own, and the alternatives they replaced."""
    from jaxcf.core import batchlast, linalg, rows
    from jaxcf.families.bpmf import fit as gibbs

    users, items = state
    lam = jnp.eye(factors) * 2.0
    cases = {}
    for name, other, index in (("users", items, fast_sides[0]), ("items", users, fast_sides[1])):
        cases[f"gram_{name}"] = (jax.jit(rows.normal_equations), (other, index))
        gram, rhs = jax.jit(rows.normal_equations)(other, index)
        precision = lam[:, :, None] + ALPHA * gram
        cases[f"factor_draw_{name}"] = (jax.jit(lambda p, b: batchlast.gaussian_draw(batchlast.cholesky(p), b, b)),
                                        (precision, rhs))
    cases["hyper"] = (jax.jit(lambda k, u, i: (gibbs.sample_hyperparameters(k, u), gibbs.sample_hyperparameters(k, i))),
                      (jax.random.key(1), users, items))
    own, other, num_rows = sides

    def segment_gram(vectors):
        picked = vectors[other]
        return jax.ops.segment_sum(picked[:, :, None] * picked[:, None, :], own, num_segments=num_rows)

    def linalg_draw(precision, rhs):
        factor = linalg.cholesky(precision)
        return linalg.cho_solve(factor, rhs) + linalg.solve_lower_transpose(factor, rhs)

    first = jnp.transpose(precision, (2, 0, 1))  # the items' systems, batch-first
    host, host_rhs = np.asarray(first), np.asarray(rhs.T)[..., None]
    cases["gram_segment_sum_items"] = (jax.jit(segment_gram), (users,))
    cases["factor_draw_linalg_items"] = (jax.jit(linalg_draw), (first, rhs.T))
    cases["factor_solve_numpy_items"] = (lambda: (np.linalg.cholesky(host), np.linalg.solve(host, host_rhs)), ())
    return interleaved(cases, repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factors", default="10,20", help="comma-separated F values")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--myfm-iter", type=int, default=50, help="myFM sweeps per timed fit")
    parser.add_argument("--myfm-repeats", type=int, default=3, help="timed myFM fits")
    parser.add_argument("--no-myfm", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from jaxcf import config, data
    from jaxcf.families.bpmf import fast_sweep
    from jaxcf.families.bpmf import fit as gibbs

    load_before = machine.load_average()
    dataset = data.load(config.DataConfig(), 42)
    ratings, train = dataset.ratings, dataset.split.train
    users, items = ratings.users[train], ratings.items[train]
    mean = float(np.mean(ratings.ratings[train], dtype=np.float64))
    centred = ratings.ratings[train].astype(np.float64) - mean
    num_users, num_items = ratings.num_users, ratings.num_items
    old_sides = [jax.tree.map(jnp.asarray, gibbs.make_side(a, b, centred, n, m))
                 for a, b, n, m in ((users, items, num_users, num_items), (items, users, num_items, num_users))]
    start = time.perf_counter()
    new_sides = [fast_sweep.make_side(a, b, centred, n, m)
                 for a, b, n, m in ((users, items, num_users, num_items), (items, users, num_items, num_users))]
    build_s = time.perf_counter() - start
    new_sides = [jax.tree.map(jnp.asarray, side) for side in new_sides]
    print(f"{machine.cpu_model()}, {machine.jax_device()}; {len(train):,} ratings, {num_users:,} users, "
          f"{num_items:,} items; RowIndex built in {build_s:.2f} s", flush=True)
    results = {}
    for factors in [int(f) for f in args.factors.split(",")]:
        keys = jax.random.split(jax.random.key(0), 1)
        state = (0.1 * jax.random.normal(jax.random.key(1), (1, num_users, factors)),
                 0.1 * jax.random.normal(jax.random.key(2), (1, num_items, factors)))
        old = jax.jit(lambda k, u, i, a, b: gibbs.make_sweep(a, b, ALPHA)(k, u, i))
        new = jax.jit(lambda k, u, i, a, b: fast_sweep.make_sweep(a, b, ALPHA)(k, u, i))
        load = machine.load_average()
        start = time.perf_counter()
        new_rows = jax.block_until_ready(new(keys, *state, *new_sides))
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        old_rows = jax.block_until_ready(old(keys, *state, *old_sides))
        old_compile_s = time.perf_counter() - start
        row = {
            **interleaved({"old_sweep": (old, (keys, *state, *old_sides)),
                           "new_sweep": (new, (keys, *state, *new_sides))}, args.repeats),
            "new_compile_s": compile_s,
            "old_compile_s": old_compile_s,
            "max_abs_difference": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(old_rows, new_rows)),
            "max_abs_row": max(float(jnp.max(jnp.abs(a))) for a in old_rows),
        }
        if not args.no_myfm:
            split = (users, items, ratings.ratings[train], num_users, num_items)
            row.update(myfm_sweep(split, factors, args.myfm_iter, args.myfm_repeats))
        row.update(pieces(factors, (jnp.asarray(items), jnp.asarray(users), num_items), new_sides,
                          (state[0][0], state[1][0]), args.repeats))
        row["load_average_during"] = [load, machine.load_average()]
        results[factors] = row
        print(f"\nF = {factors} (one chain; ms, median and fastest of {args.repeats}; "
              f"load average {row['load_average_during']})")
        for name, value in row.items():
            if name.endswith("_min_s") or name == "load_average_during":
                continue
            fastest = row.get(name.removesuffix("_s") + "_min_s")
            shown = f"{1e3 * value:10.2f}" if name.endswith("_s") else f"{value:10.3g}"
            print(f"  {name:30s}{shown}" + (f"  (fastest {1e3 * fastest:8.2f})" if fastest is not None else ""))
        print(f"  old / new {row['old_sweep_s'] / row['new_sweep_s']:.1f}x" + (
            f", myFM / new {row['myfm_sweep_s'] / row['new_sweep_s']:.1f}x" if "myfm_sweep_s" in row else ""),
            flush=True)
    if args.json:
        machine.write_json(args.json, {
            "benchmark": "gibbs_sweep", "command": " ".join(["python", *sys.argv]), "alpha": ALPHA,
            "ratings": len(train), "users": num_users, "items": num_items, "index_build_s": build_s,
            "myfm_iter": args.myfm_iter, "factors": results, "device": machine.jax_device(),
        }, load_before, "jax", "jaxlib", "myfm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
