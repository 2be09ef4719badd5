"""Scale benchmark: row-sparse training on synthetic ratings shaped like MovieLens-20M.

    python bench/scale.py [--ratings 1e6,5e6,2e7] [--batch-size 262144] [--epochs 2]
                          [--optimizer lazy_adam] [--csv-dir DIR] [--json PATH]

Default batch 262,144, learning rate 1e-2, 50 factors, seed 0.

For each size, a fresh child process (so that peak RSS is per size) does what a user's run does:

1. synthesize the ratings once (seeded) and write them as a CSV, ``userId,movieId,rating,timestamp``
   like ML-20M's ``ratings.csv``; the file is cached in ``--csv-dir`` and reused by later runs;
2. read it with ``jaxcf.data.load_csv`` (pyarrow + ``pandas.factorize``), timed; at the end of
   the run its parts (sha256 of the file, pyarrow's read, conversion, factorize) are timed apart;
3. split 80/20 as the notebook does, store the training rows by user (``jaxcf.core.steps.rows_by_user``),
   and train the biased model (50 factors) with a row-sparse optimizer for ``--epochs`` epochs as
   ``jaxcf.training.loop.fit`` runs them: compilation is timed apart (ahead-of-time ``lower().compile()``);
   each epoch draws its order on the host (``jaxcf.core.steps.shuffle_order``, timed as ``order_s``),
   runs the compiled scan, and ends with the validation RMSE (not timed in the epoch).

``ratings_per_s`` is training ratings divided by the median wall seconds of the epochs after the
first (``epoch_s``: the order and the scan). ``overlapped_epoch_s`` is one more epoch with the next
order drawn while the scan runs, which ``fit`` does not do (measured beside it; BENCHMARKS.md).
``peak_rss_bytes`` is the child's peak resident set over everything above (generation, CSV,
loading, training).

The synthetic data: 138,493 users and 26,744 items (ML-20M's counts). Item popularity is a
shifted Zipf law, weight ``(rank + 300) ** -2``; user activity is log-normal (sigma 1.2). Checked
on the 20M file (seed 0): the top item has 67,170 ratings (ML-20M's top movie: 67,310), the median
item 33; users rate 144.5 items on average, median 70 (ML-20M: 144 and 68; but here some users have
a single rating and the most active 20,671, where ML-20M has at least 20 and at most 9,254).
Ratings come from a planted biased low-rank model (rank 8) plus Gaussian noise (sd 0.7), rounded
to half stars in [0.5, 5]: mean 3.48, sd 1.01 (ML-20M: 3.53, 1.05). Predicting the global mean
scores a validation RMSE of 1.01 and the noise alone about 0.71, so the RMSE shows whether training
learns. (user, item) pairs may repeat; ``load_csv`` keeps each row as its own rating.

Why a batch of 262,144 by default: a row-sparse step costs a fixed part per batch (for tables a
batch covers well, ``lazy_adam`` computes every row and keeps the untouched ones: see
``jaxcf.core.sparse.RowSparse.dense_rows_per_id``) plus gathers and scatters per rating, so larger
batches amortise the fixed part. Measured here at 5M ratings: 0.50M ratings/s at 262,144 against
0.34M at 65,536 (load average about 5). Adam's step size does not grow with the batch, so the
default learning rate is 1e-2 (not the notebook's 1e-3) to make two epochs at this batch size
learn. This is a throughput benchmark of ``lazy_adam``, a different optimizer from the notebook's
dense Adam; its RMSE figures are a sanity check, not a tuned result.

What does not live here: the optimizers (``jaxcf.core.optim``) and the epoch (``jaxcf.cli.train``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  (bench/ is not a package; the scripts run as files)

NUM_USERS = 138_493
NUM_ITEMS = 26_744
ITEM_SHIFT, ITEM_EXPONENT = 300.0, 2.0
USER_SIGMA = 1.2
RANK = 8
CHUNK = 1 << 20


def synthesize(num_ratings: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded synthetic ratings shaped like ML-20M (see the module docstring).

    Returns:
      ``userId`` int64[n] and ``movieId`` int64[n] raw ids (movie ids are sparse, as in
      MovieLens), ``rating`` float64[n] half stars in [0.5, 5], ``timestamp`` int64[n].
    """
    rng = np.random.default_rng(seed)
    item_weight = (np.arange(NUM_ITEMS) + 1 + ITEM_SHIFT) ** -ITEM_EXPONENT
    user_weight = rng.lognormal(0.0, USER_SIGMA, NUM_USERS)
    item_cdf = np.cumsum(item_weight) / item_weight.sum()
    user_cdf = np.cumsum(user_weight) / user_weight.sum()
    # The planted model: rating ~ 3.5 + b_u + b_i + <x_u, y_i> + noise, rounded to half stars.
    user_bias = rng.normal(0.0, 0.4, NUM_USERS)
    item_bias = rng.normal(0.0, 0.5, NUM_ITEMS)
    user_factors = rng.normal(0.0, (0.25 / RANK) ** 0.25, (NUM_USERS, RANK))
    item_factors = rng.normal(0.0, (0.25 / RANK) ** 0.25, (NUM_ITEMS, RANK))
    # Raw ids as MovieLens has them: users 1..U, movies sparse in 1..131262 and unordered by popularity.
    item_raw = rng.choice(np.arange(1, 131_263), NUM_ITEMS, replace=False)
    out = {
        "userId": np.empty(num_ratings, np.int64),
        "movieId": np.empty(num_ratings, np.int64),
        "rating": np.empty(num_ratings, np.float64),
        "timestamp": np.empty(num_ratings, np.int64),
    }
    for start in range(0, num_ratings, CHUNK):
        size = min(CHUNK, num_ratings - start)
        users = np.minimum(np.searchsorted(user_cdf, rng.random(size), side="right"), NUM_USERS - 1)
        items = np.minimum(np.searchsorted(item_cdf, rng.random(size), side="right"), NUM_ITEMS - 1)
        score = 3.5 + user_bias[users] + item_bias[items]
        score += np.einsum("ij,ij->i", user_factors[users], item_factors[items])
        score += rng.normal(0.0, 0.7, size)
        part = slice(start, start + size)
        out["userId"][part] = users + 1
        out["movieId"][part] = item_raw[items]
        out["rating"][part] = np.clip(np.round(score * 2) / 2, 0.5, 5.0)
        out["timestamp"][part] = rng.integers(789_652_009, 1_427_784_002, size)
    return out


def write_csv(path: Path, columns: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    partial = path.with_suffix(".partial")
    pacsv.write_csv(pa.table(columns), partial)
    os.replace(partial, path)


def _sync(x):
    import jax

    return jax.block_until_ready(x)


def run_one(args: argparse.Namespace, num_ratings: int) -> dict:
    """One size, measured in this process (the parent starts one child per size)."""
    record: dict = {"num_ratings": num_ratings, "load_average_before": machine.load_average()}
    csv_dir = Path(args.csv_dir)
    csv_dir.mkdir(parents=True, exist_ok=True)
    path = csv_dir / f"synthetic-ml20m-shaped-{num_ratings}-seed{args.seed}.csv"
    if not path.is_file():
        start = time.perf_counter()
        columns = synthesize(num_ratings, args.seed)
        record["synthesize_s"] = time.perf_counter() - start
        start = time.perf_counter()
        write_csv(path, columns)
        record["write_csv_s"] = time.perf_counter() - start
        del columns
    record["csv_bytes"] = path.stat().st_size

    import jax
    import jax.numpy as jnp

    from jaxcf.config import OptimConfig
    from jaxcf.core import metrics, models, optim, rng, scoring, sparse, steps
    from jaxcf.data import load_csv, random_split

    start = time.perf_counter()
    ratings = load_csv(path)
    record["load_csv_s"] = time.perf_counter() - start
    record["rss_after_load_bytes"] = machine.peak_rss_bytes()
    record["num_users"], record["num_items"] = ratings.num_users, ratings.num_items

    split = random_split(len(ratings), 0.2, args.seed)
    start = time.perf_counter()
    train_rows = steps.rows_by_user(ratings.users, split.train)  # as jaxcf.families.sgd.make_setup stores them
    record["rows_by_user_s"] = time.perf_counter() - start
    valid_rows = split.valid
    record["num_train"], record["num_valid"] = len(train_rows), len(valid_rows)
    users = jnp.asarray(ratings.users[train_rows])
    items = jnp.asarray(ratings.items[train_rows])
    targets = jnp.asarray(ratings.ratings[train_rows])
    valid = (ratings.users[valid_rows], ratings.items[valid_rows], ratings.ratings[valid_rows])
    y_range = ratings.rating_range
    num_users, num_items = ratings.num_users, ratings.num_items
    del ratings, split, train_rows, valid_rows

    config = OptimConfig(name=args.optimizer, learning_rate=args.learning_rate, weight_decay=args.weight_decay)
    optimizer = optim.build(config, args.epochs)
    if args.dense_rows_per_id is not None:
        optimizer = optimizer._replace(dense_rows_per_id=args.dense_rows_per_id)
    record["dense_rows_per_id"] = optimizer.dense_rows_per_id
    model = models.build(num_users, num_items, args.n_factors, y_range)
    params = models.init_params(model, jax.random.key(args.seed))
    state = steps.TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    dense_chunk = sparse.DENSE_CHUNK if args.dense_chunk is None else args.dense_chunk
    record["dense_chunk"] = dense_chunk
    epoch_fn = steps.make_train_epoch(optimizer, y_range, args.batch_size, dense_chunk=dense_chunk)
    l2 = jnp.float32(0)
    shuffle_key = rng.stream(args.seed, "order")
    num_train = int(users.shape[0])

    def draw(epoch):
        start = time.perf_counter()
        return steps.shuffle_order(shuffle_key, epoch, num_train, args.batch_size), time.perf_counter() - start

    order, _ = draw(0)
    start = time.perf_counter()
    compiled = epoch_fn.lower(state, l2, users, items, targets, order).compile()
    record["compile_s"] = time.perf_counter() - start

    epochs = []
    for epoch in range(args.epochs):
        # As jaxcf's SGD family runs an epoch: draw its order on the host, run the compiled scan, wait
        # for the losses. epoch_s is all of it, wall clock.
        start, cpu_start = time.perf_counter(), time.process_time()
        order, order_s = draw(epoch)
        state, losses = compiled(state, l2, users, items, targets, order)
        losses = np.asarray(losses)  # the epoch's one host sync
        epoch_s, epoch_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        start = time.perf_counter()
        predictions = scoring.predict_pairs(state.params, valid[0], valid[1], y_range, chunk=1 << 20)
        valid_s = time.perf_counter() - start
        epochs.append({
            "epoch": epoch + 1,
            "epoch_s": epoch_s,
            "order_s": order_s,  # of epoch_s: the host drawing the order
            "epoch_cpu_s": epoch_cpu_s,  # CPU seconds of this process (all threads) during the epoch
            "valid_s": valid_s,
            "train_loss_mean": float(np.mean(losses, dtype=np.float64)),
            "valid_rmse": metrics.rmse(predictions, valid[2]),
        })
        print(f"  {num_ratings:>11,} ratings  epoch {epoch + 1}: {epoch_s:7.2f} s  "
              f"({num_train / epoch_s / 1e6:5.2f} M ratings/s)  valid RMSE {epochs[-1]['valid_rmse']:.4f}",
              file=sys.stderr, flush=True)
    # The first epoch runs on a cold cache and right after compilation; with 2+ epochs report the later ones.
    timed = epochs[1:] if len(epochs) > 1 else epochs
    epoch_s = float(np.median([e["epoch_s"] for e in timed]))
    record["order_s"] = float(np.median([e["order_s"] for e in timed]))
    # Drawing the next epoch's order while the device runs this one (measured slower: the two
    # contend for memory bandwidth; jaxcf's epoch draws it first). One more epoch, after the timed ones.
    start = time.perf_counter()
    state, losses = compiled(state, l2, users, items, targets, order)
    draw(args.epochs)
    np.asarray(losses)
    record["overlapped_epoch_s"] = time.perf_counter() - start
    record.update(
        batch_size=args.batch_size,
        num_batches=steps.num_batches(num_train, args.batch_size),
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        n_factors=args.n_factors,
        global_mean_rmse=float(np.sqrt(np.mean((valid[2] - np.asarray(targets).mean()) ** 2))),
        epochs=epochs,
        epoch_s=epoch_s,
        ratings_per_s=num_train / epoch_s,
        # Under contention wall time inflates; CPU time per rating is the steadier figure to compare runs.
        ratings_per_cpu_s=num_train / float(np.median([e["epoch_cpu_s"] for e in timed])),
        peak_rss_bytes=machine.peak_rss_bytes(),
        load_average_after=machine.load_average(),
        device=machine.jax_device(),
    )
    # Last, so that reading the file again does not count in the peak RSS above.
    del state, users, items, targets, compiled, order
    record["load_csv_parts_s"] = time_load_parts(path)
    return record


def time_load_parts(path: Path) -> dict[str, float]:
    """Where ``load_csv``'s time goes: the pieces it is made of, timed one by one."""
    import pandas as pd

    from jaxcf.data.ratings import file_sha256, read_table

    parts = {}
    start = time.perf_counter()
    file_sha256(path)
    parts["sha256"] = time.perf_counter() - start
    start = time.perf_counter()
    table = read_table(path, ["userId", "movieId", "rating"])
    parts["pyarrow_read_csv"] = time.perf_counter() - start
    start = time.perf_counter()
    columns = {name: table.column(name).to_numpy() for name in ("userId", "movieId", "rating")}
    parts["to_numpy"] = time.perf_counter() - start
    del table
    start = time.perf_counter()
    pd.factorize(columns["userId"])
    pd.factorize(columns["movieId"])
    parts["factorize_ids"] = time.perf_counter() - start
    return parts


def parse_sizes(text: str) -> list[int]:
    sizes = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--ratings: {part!r} is not a number; e.g. 1e6,5e6,2e7") from None
        if not (math.isfinite(value) and value >= 1000 and value == int(value)):
            raise argparse.ArgumentTypeError(f"--ratings: {part!r} must be a whole number >= 1000")
        sizes.append(int(value))
    return sizes


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=parse_sizes, default=[20_000_000], help="sizes, e.g. 1e6,5e6,2e7")
    parser.add_argument("--batch-size", type=positive_int, default=262_144)
    parser.add_argument("--epochs", type=positive_int, default=2, help="the first is reported, the later timed")
    parser.add_argument("--optimizer", choices=("lazy_adam", "sgd"), default="lazy_adam")
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--n-factors", type=positive_int, default=50)
    parser.add_argument("--dense-chunk", type=int, default=None,
                        help="ratings per chunk of a dense row-sparse step (default jaxcf.core.sparse.DENSE_CHUNK; "
                        "0: none)")
    parser.add_argument("--dense-rows-per-id", type=float, default=None,
                        help="jaxcf.core.sparse.RowSparse.dense_rows_per_id (default: the optimizer's; 0: every table "
                             "row-wise, inf: every table dense)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv-dir", default=os.path.join(tempfile.gettempdir(), "jaxcf-bench-scale"),
                        help="where the synthetic CSVs are written once and reused")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size in this process
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        record = run_one(args, args.one)
        args.json.write_text(json.dumps(record))
        return 0
    results = []
    for size in args.ratings:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "one.json"
            child = [sys.executable, __file__, "--one", str(size), "--json", str(out),
                     "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
                     "--optimizer", args.optimizer, "--learning-rate", str(args.learning_rate),
                     "--weight-decay", str(args.weight_decay), "--n-factors", str(args.n_factors),
                     "--seed", str(args.seed), "--csv-dir", args.csv_dir]
            if args.dense_rows_per_id is not None:
                child += ["--dense-rows-per-id", str(args.dense_rows_per_id)]
            if args.dense_chunk is not None:
                child += ["--dense-chunk", str(args.dense_chunk)]
            done = subprocess.run(child)
            if done.returncode != 0:
                print(f"error: the run with {size:,} ratings failed (exit {done.returncode})", file=sys.stderr)
                return 1
            results.append(json.loads(out.read_text()))
    print(f"{'ratings':>12} {'train':>11} {'load_csv s':>10} {'compile s':>9} {'epoch s':>8} "
          f"{'M ratings/s':>11} {'peak RSS GB':>11} {'valid RMSE':>10}")
    for r in results:
        print(f"{r['num_ratings']:>12,} {r['num_train']:>11,} {r['load_csv_s']:>10.2f} {r['compile_s']:>9.2f} "
              f"{r['epoch_s']:>8.2f} {r['ratings_per_s'] / 1e6:>11.2f} {r['peak_rss_bytes'] / 1e9:>11.2f} "
              f"{r['epochs'][-1]['valid_rmse']:>10.4f}")
    if args.json:
        summary = {
            "benchmark": "scale",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine.describe("jax", "jaxlib", "numpy", "pyarrow", "pandas"),
            "runs": results,
            # The largest size's figures at the top level, for a quick look.
            **{k: results[-1][k] for k in ("num_ratings", "ratings_per_s", "epoch_s", "compile_s",
                                           "peak_rss_bytes", "load_csv_s")},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
