"""The batched F x F Cholesky and solves of ``jaxcf.linalg``: blocked against unblocked, and the iALS sweep.

    python bench/linalg.py [--repeats 3] [--json results/linalg.json]

On the systems one iALS half-sweep solves over ml-latest-small's items (9,066 of them, F x F each,
``G + alpha sum v v' + lambda I`` with random factors), for F in 32, 64, 128: the median seconds of
``jaxcf.linalg.cholesky`` against its unblocked form (one column per step, what jaxcf ran before
blocking), and of ``cho_solve`` (forward and back substitution), each compiled once before timing.
Then one whole exact iALS sweep (``configs/ials.yaml``, F = 128) as training runs it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from jaxcf import config, data, ials, linalg

    load_before = machine.load_average()
    rows = {}
    key = jax.random.key(0)
    for size in (32, 64, 128):
        x = jax.random.normal(key, (SYSTEMS, 2 * size, size)) * 0.1
        a = jnp.matmul(jnp.swapaxes(x, 1, 2), x) + 10.0 * jnp.eye(size)
        b = jax.random.normal(jax.random.fold_in(key, 1), (SYSTEMS, size))
        factor = linalg.cholesky(a)
        row = {
            "cholesky_unblocked_s": timed(linalg._cholesky_unblocked, a, repeats=args.repeats),
            "cholesky_s": timed(linalg.cholesky, a, repeats=args.repeats),
            "cho_solve_s": timed(linalg.cho_solve, factor, b, repeats=args.repeats),
            "max_abs_difference": float(jnp.max(jnp.abs(linalg.cho_solve(factor, b) - linalg.cho_solve(
                linalg._cholesky_unblocked(a), b)))),
        }
        rows[size] = row
        print(f"F = {size:3d}: cholesky {row['cholesky_unblocked_s']:.3f} s unblocked, {row['cholesky_s']:.3f} s "
              f"blocked; cho_solve {row['cho_solve_s']:.3f} s; "
              f"max |difference| {row['max_abs_difference']:.2g}", flush=True)
    cfg = config.load("ials.yaml")
    dataset = data.interactions(data.load(cfg.data, cfg.seed), 4.0, 0.2, cfg.seed)
    family = ials.family(cfg, dataset)
    state = family.init()
    state, _ = family.epoch(state, 0)  # compiles
    times = []
    for number in range(1, 1 + args.repeats):
        start = time.perf_counter()
        state, _ = family.epoch(state, number)
        times.append(time.perf_counter() - start)
    sweep = statistics.median(times)
    print(f"exact iALS sweep, configs/ials.yaml (F = {cfg.model.n_factors}): {sweep:.3f} s", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "linalg", "command": " ".join(["python", *sys.argv]), "systems": SYSTEMS,
            "block": linalg.BLOCK, "sizes": rows, "ials_sweep_s": sweep, "load_average_before": load_before,
            "load_average_after": machine.load_average(), "device": machine.jax_device(),
            "machine": machine.describe("jax", "jaxlib"),
        }, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
