"""jaxcf's relational Bayesian FM (``jaxcf.families.bfm.sampler``) against myFM on the same blocks, priors and sweeps.

    python bench/parity_bfm.py [--quick] [--datasets small,100k] [--configs ids,svdpp,flipped]
                               [--seeds 0,1,2] [--sweeps 200] [--kept 180] [--json results/parity_bfm.json]

Both sides fit the same relational blocks (``jaxcf.families.bfm.features.relation_block``): a user block row is
``[one-hot user | the items the user rated in training, weighted 1/sqrt(count)]``, an item block row
``[one-hot item | the users who rated it in training, weighted 1/sqrt(count)]``; ``ids`` keeps the
one-hot groups only (BPMF with biases), ``svdpp`` adds the user's set, ``flipped`` both sets (Rendle,
Zhang & Koren 2019). myFM runs ``MyFMRegressor(rank=R, random_seed=s).fit(None, y, X_rel=[user block,
item block], group_shapes=[...], n_iter=200, n_kept_samples=180)`` with its default priors, which
jaxcf's ``Priors`` copies; jaxcf runs ``sampler.run`` with ``fold_in(key(s), ...)`` seeds. Every
user and item index of the table has a row, so a validation pair whose user or item has no training
rating is answered by both from that id's prior draws (the RMSE over pairs with both ids trained is
reported beside the all-pairs one).

Datasets: the bundled ml-latest-small split (``DataConfig()``, seed 42; rank 20) and ml-100k u1
(rank 10; its held-out part is the split's ``test`` rows, u1.test). Figures: validation RMSE, mean
and standard deviation over the seeds per side, wall and CPU seconds of each fit and per sweep
(jaxcf: after compiling, which is reported apart; CPU seconds are this process's, XLA's threads
included, and move less than wall time when other work shares the machine), and a breakdown of one
jaxcf sweep in CPU seconds. Parity: |mean
difference| <= 0.002. ``--quick``: 20 sweeps (10 kept), one seed, for development.

myFM 0.4.0 imports ``pkg_resources`` (for nothing it uses), which recent setuptools no longer ships;
an empty stand-in is registered first when it is missing (as ``bench/peers.py`` does).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # myFM's progress bar

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
from peers import import_myfm  # noqa: E402

CONFIGS = {"ids": (False, False), "svdpp": (True, False), "flipped": (True, True)}
DATASETS = {"small": ({}, 20), "100k": ({"name": "ml-100k", "split": "u1"}, 10)}
# myFM 0.4's figures from docs/ENVIRONMENT.md (rank 20 / 10, 200 sweeps, training implicit sets).
TARGETS = {("small", "flipped"): 0.8444, ("small", "ids"): 0.8569, ("100k", "flipped"): 0.8913}
PARITY = 0.002


class Problem:
    """One dataset and configuration: its blocks, training ratings and held-out pairs."""

    def __init__(self, dataset: str, config: str):
        from jaxcf import config as jaxcf_config
        from jaxcf import data
        from jaxcf.families.bfm import features

        data_kwargs, self.rank = DATASETS[dataset]
        loaded = data.load(jaxcf_config.DataConfig(**data_kwargs), 42)
        ratings, split = loaded.ratings, loaded.split
        self.held_out_part = "valid" if len(split.valid) else "test"
        held = split.valid if len(split.valid) else split.test
        train = split.train
        users, items = ratings.users[train], ratings.items[train]
        user_implicit, item_implicit = CONFIGS[config]
        self.user_block = features.relation_block(users, items, ratings.num_users, ratings.num_items,
                                                  implicit=user_implicit)
        self.item_block = features.relation_block(items, users, ratings.num_items, ratings.num_users,
                                                  implicit=item_implicit)
        self.y = ratings.ratings[train].astype(np.float64)
        self.eval_users, self.eval_items = ratings.users[held], ratings.items[held]
        self.truth = ratings.ratings[held].astype(np.float64)
        trained_users = np.bincount(users, minlength=ratings.num_users) > 0
        trained_items = np.bincount(items, minlength=ratings.num_items) > 0
        self.both_trained = trained_users[self.eval_users] & trained_items[self.eval_items]
        self.sizes = {"n_train": len(train), "n_held_out": len(held), "held_out_part": self.held_out_part,
                      "held_out_both_trained": int(self.both_trained.sum()),
                      "user_block": [self.user_block.num_rows, self.user_block.num_features,
                                     int(len(self.user_block.data))],
                      "item_block": [self.item_block.num_rows, self.item_block.num_features,
                                     int(len(self.item_block.data))],
                      "group_shapes": list(self.user_block.group_sizes + self.item_block.group_sizes)}

    def rmse(self, predicted: np.ndarray) -> dict:
        error = np.asarray(predicted, np.float64) - self.truth
        return {"rmse": float(np.sqrt(np.mean(error ** 2))),
                "rmse_both_trained": float(np.sqrt(np.mean(error[self.both_trained] ** 2)))}


def run_myfm(myfm, problem: Problem, seed: int, sweeps: int, kept: int) -> dict:
    import scipy.sparse as sps

    def relation(matrix, index):
        x = sps.csr_matrix((matrix.data.astype(np.float64), matrix.indices, matrix.indptr),
                           shape=(matrix.num_rows, matrix.num_features))
        return myfm.RelationBlock(np.asarray(index, np.int64), x)

    model = myfm.MyFMRegressor(rank=problem.rank, random_seed=seed)
    train_rel = [relation(problem.user_block, problem.user_block.index),
                 relation(problem.item_block, problem.item_block.index)]
    start, cpu = time.perf_counter(), time.process_time()
    model.fit(None, problem.y, X_rel=train_rel, group_shapes=problem.sizes["group_shapes"], n_iter=sweeps,
              n_kept_samples=kept, callback=lambda *_: (False, None))
    fit_s, fit_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    held_rel = [relation(problem.user_block, problem.eval_users), relation(problem.item_block, problem.eval_items)]
    predicted = model.predict(None, X_rel=held_rel)
    return {"seed": seed, **problem.rmse(predicted), "fit_s": fit_s, "sweep_s": fit_s / sweeps,
            "fit_cpu_s": fit_cpu_s, "sweep_cpu_s": fit_cpu_s / sweeps}


class Sampler:
    """jaxcf's chain for one problem: compiled once, then run per seed."""

    def __init__(self, problem: Problem, sweeps: int, kept: int):
        from jaxcf.families.bfm import features, sampler

        self.core = sampler
        start = time.perf_counter()
        self.blocks = (features.make_block(problem.user_block), features.make_block(problem.item_block))
        self.schedule_s = time.perf_counter() - start
        self.steps = [features.num_steps(b) for b in self.blocks]
        self.y = jnp.asarray(problem.y, jnp.float32)
        self.rows = (jnp.asarray(problem.eval_users, jnp.int32), jnp.asarray(problem.eval_items, jnp.int32))
        self.rank, self.sweeps, self.kept = problem.rank, sweeps, kept

        def chain(seed_key, blocks):
            init_key, run_key = jax.random.split(seed_key)
            state = sampler.init_state(init_key, blocks, self.y, self.rank, len(self.rows[0]))
            state = sampler.run(state, run_key, blocks, self.y, self.rows, sweeps, kept)
            return sampler.posterior_mean(state), state.drift

        self.chain = jax.jit(chain)

    def compile(self) -> dict:
        start = time.perf_counter()
        self.one = self.chain.lower(jax.random.key(0), self.blocks).compile()
        return {"compile_s": time.perf_counter() - start}

    def run(self, problem: Problem, seed: int) -> dict:
        start, cpu = time.perf_counter(), time.process_time()
        mean, drift = jax.block_until_ready(self.one(jax.random.key(seed), self.blocks))
        fit_s, fit_cpu_s = time.perf_counter() - start, time.process_time() - cpu
        return {"seed": seed, **problem.rmse(np.asarray(mean)), "fit_s": fit_s, "sweep_s": fit_s / self.sweeps,
                "fit_cpu_s": fit_cpu_s, "sweep_cpu_s": fit_cpu_s / self.sweeps, "drift": float(drift)}

    def breakdown(self, repeats: int = 3) -> dict:
        """Median CPU seconds of the parts of one sweep, each compiled alone, from a state after 3 sweeps."""
        core, blocks, y = self.core, self.blocks, self.y
        state = core.init_state(jax.random.key(0), blocks, y, self.rank, len(self.rows[0]))
        state = jax.jit(core.run_range)(state, jax.random.key(1), blocks, y, self.rows, 0, 3, 3)
        width = self.rank + 1
        slots = sum(t.features.size for b in blocks for t in b.tiers)
        noise = jax.random.normal(jax.random.key(2), (slots,))

        def timed(function, *args):
            """Median CPU seconds of this process (XLA's threads included): less swayed than wall
            time by other work on the machine."""
            compiled = jax.jit(function).lower(*args).compile()
            jax.block_until_ready(compiled(*args))
            times = []
            for _ in range(repeats):
                start = time.process_time()
                jax.block_until_ready(compiled(*args))
                times.append(time.process_time() - start)
            return statistics.median(times)

        out = {"sweep_s": timed(lambda s, b, k: core.sweep(s, k, b, y, self.rows, jnp.bool_(True)), state, blocks,
                                jax.random.key(3))}
        out["column_s"] = timed(lambda d, n, s, b: core.draw_column(d, n, s.tables, s.cache, b, s.alpha, s.mu, s.lam),
                                jnp.int32(1), noise, state, blocks)
        out["fresh_cache_s"] = timed(lambda s, b: core.fresh_cache(s.w0, s.tables, b, y), state, blocks)
        tiers = []
        for b, block in enumerate(blocks):
            rows, groups = block.num_rows + 1, len(block.group_sizes)
            consts = jnp.ones((rows, 3))
            for tier in block.tiers:
                def one_tier(t, c, sr, k, g=groups):
                    return core.draw_tier(t, jnp.zeros(t.features.shape), c, sr, k, 1.0, 1.0, jnp.zeros(g), jnp.ones(g))

                seconds = timed(one_tier, tier, state.tables[b][:, 1], jnp.zeros((rows, 4)), consts)
                tiers.append({"block": b, "shape": list(tier.rows.shape), "column_s": seconds,
                              "per_step_us": 1e6 * seconds / tier.rows.shape[0]})
        out["tiers"] = tiers
        out["tiers_per_sweep_s"] = width * sum(t["column_s"] for t in tiers)
        out["columns_per_sweep_s"] = width * out["column_s"]
        return out


def summarise(runs: list[dict]) -> dict:
    out = {}
    for key in ("rmse", "rmse_both_trained", "fit_s", "sweep_s", "fit_cpu_s", "sweep_cpu_s"):
        values = [r[key] for r in runs]
        out[key] = statistics.mean(values)
        out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 sweeps (10 kept), one seed")
    parser.add_argument("--datasets", default="small,100k")
    parser.add_argument("--configs", default="ids,svdpp,flipped")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sweeps", type=int, default=200)
    parser.add_argument("--kept", type=int, default=180)
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("results/parity_bfm.json"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    sweeps, kept = args.sweeps, args.kept
    if args.quick:
        seeds, sweeps, kept = seeds[:1], 20, 10
    load_before = machine.load_average()
    myfm, _ = import_myfm()
    print(f"CPU: {machine.cpu_model()} ({os.cpu_count()} cores); load {load_before}; {sweeps} sweeps, {kept} kept, "
          f"seeds {seeds}", flush=True)
    records = []
    for dataset in args.datasets.split(","):
        for config in args.configs.split(","):
            problem = Problem(dataset, config)
            sampler = Sampler(problem, sweeps, kept)
            record = {"dataset": dataset, "config": config, "rank": problem.rank, **problem.sizes,
                      "schedule_s": sampler.schedule_s, "steps_per_column": sampler.steps,
                      "target_myfm": TARGETS.get((dataset, config))}
            record.update(sampler.compile())
            # Alternate the sides seed by seed, so that load on the machine falls on both alike.
            ours, theirs = [], []
            for seed in seeds:
                ours.append(sampler.run(problem, seed))
                theirs.append(run_myfm(myfm, problem, seed, sweeps, kept))
                print(f"  {dataset} {config} seed {seed}: jaxcf {ours[-1]['rmse']:.4f} ({ours[-1]['fit_s']:.1f} s), "
                      f"myFM {theirs[-1]['rmse']:.4f} ({theirs[-1]['fit_s']:.1f} s)", flush=True)
            record["jaxcf_runs"], record["myfm_runs"] = ours, theirs
            record["jaxcf"], record["myfm"] = summarise(ours), summarise(theirs)
            difference = record["jaxcf"]["rmse"] - record["myfm"]["rmse"]
            record["rmse_difference"] = difference
            record["parity"] = abs(difference) <= PARITY
            if not args.no_breakdown:
                record["jaxcf_breakdown"] = sampler.breakdown()
            records.append(record)
            print_record(record)
    print_table(records)
    result = {"benchmark": "parity_bfm", "sweeps": sweeps, "kept": kept, "seeds": seeds, "parity_limit": PARITY,
              "quick": args.quick, "records": records}
    machine.write_json(args.json, result, load_before, "jax", "jaxlib", "numpy", "myfm")
    return 0


def print_record(record: dict) -> None:
    if "jaxcf_breakdown" in record:
        parts = record["jaxcf_breakdown"]
        print(f"  jaxcf sweep, CPU s: {parts['sweep_s']:.3f} = {parts['columns_per_sweep_s']:.3f} in columns (of which "
              f"{parts['tiers_per_sweep_s']:.3f} in class loops) + {parts['fresh_cache_s']:.3f} recomputing the "
              "residual + the rest (hyper-parameters, draws)")
        for tier in parts["tiers"]:
            print(f"    block {tier['block']} tier {tier['shape']}: {1e3 * tier['column_s']:.2f} ms per column, "
                  f"{tier['per_step_us']:.1f} us per class")


def print_table(records: list[dict]) -> None:
    print(f"{'dataset':8} {'config':8} {'R':>3} {'jaxcf RMSE':>16} {'myFM RMSE':>16} {'diff':>8} {'parity':>6} "
          f"{'both-trained j/m':>15} {'target':>6} | {'jaxcf s/sweep':>13} {'myFM s/sweep':>12} (wall; CPU)")
    for r in records:
        j, m = r["jaxcf"], r["myfm"]
        target = f"{r['target_myfm']:.4f}" if r["target_myfm"] else ""
        print(f"{r['dataset']:8} {r['config']:8} {r['rank']:>3} {j['rmse']:.4f} ± {j['rmse_std']:.4f} "
              f"{m['rmse']:.4f} ± {m['rmse_std']:.4f} {r['rmse_difference']:+8.4f} {str(r['parity']):>6} "
              f"{j['rmse_both_trained']:.4f}/{m['rmse_both_trained']:.4f} {target:>6} | "
              f"{j['sweep_s']:.3f}; {j['sweep_cpu_s']:.3f}   {m['sweep_s']:.3f}; {m['sweep_cpu_s']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
