"""Peer libraries on jaxcf's own splits: Surprise and myFM accuracy and fit time, measured on one machine.

    python bench/peers.py [--datasets ml-latest-small,ml-100k] [--folds u1,u2,u3,u4,u5]
                          [--peers baseline,svd,svd-tuned,svdpp,knnbaseline,myfm] [--json results/peers.json]
                          [--myfm-ranks 10,20] [--myfm-iter 200] [--myfm-kept 180]

The splits are jaxcf's, loaded with jaxcf's own loaders, so every peer trains and is scored on
exactly the rows jaxcf trains and validates on:

- ``ml-latest-small``: ``data.load(DataConfig(name="ml-latest-small", valid_fraction=0.2), seed=42)``,
  the notebook's random 80/20 split (80,004 training and 20,000 validation ratings);
- ``ml-100k``: ``data.load(DataConfig(name="ml-100k", split="u1"), seed=42)`` ... ``u5``, the official
  folds (80,000 / 20,000 each); reported per fold and as mean ± sample std (ddof 1) over the folds.

RMSE and MAE are computed here, in float64, over every validation rating, from each peer's own
prediction for the (user, item) pair. A pair whose user or item has no training rating still gets
the peer's prediction: Surprise's ``predict`` falls back to its baselines (global mean plus the
known user's or item's bias) or, where an algorithm raises ``PredictionImpossible``, to its default
(the global mean); for myFM every user and item index of the whole table has a one-hot column, so an
unseen id's column is simply empty in training and its weights are whatever the sampler drew for it.
``unknown_pairs`` counts those pairs; ``impossible_predictions`` counts Surprise's fallbacks.

The peers, each at its documented best practice:

- ``baseline``: Surprise ``BaselineOnly()`` with its defaults (ALS baselines: 10 epochs, reg_u 15,
  reg_i 10).
- ``svd``: Surprise ``SVD(random_state=0)`` with its defaults (n_factors 100, n_epochs 20,
  lr_all 0.005, reg_all 0.02), as in Surprise's README benchmark.
- ``svd-tuned``: Surprise ``SVD(random_state=0)``, ``n_factors``, ``n_epochs``, ``lr_all`` and
  ``reg_all`` chosen on a holdout of the TRAINING rows only: ``jaxcf.data.holdout(dataset, 0.1, 42)``,
  i.e. the first 10% of ``numpy.random.RandomState(42 + 1_000_003).permutation(n_train)`` are held
  out and the other 90% train, for each point of :data:`SVD_GRID` (12 points: n_factors {100, 200} x
  (n_epochs, lr_all) {(20, 0.01), (60, 0.005), (60, 0.01)} x reg_all {0.1, 0.15}); the point with the
  lowest holdout RMSE is refitted on all training rows and scored on the validation rows. The
  validation rows choose nothing. Each split (each ml-100k fold) is tuned on its own training rows.
  The grid was laid out after a probe of a few settings on the ml-latest-small and ml-100k u1
  training holdouts (more epochs than the default 20 and reg_all near 0.1 helped; reg_all 0.02 and
  0.05 were clearly worse); it never looked at validation rows.
- ``svdpp``: Surprise ``SVDpp(random_state=0, cache_ratings=True)``, otherwise its defaults
  (n_factors 20, n_epochs 20, lr_all 0.007, reg_all 0.02); ``cache_ratings`` only caches each user's
  ratings during ``fit`` (faster, same arithmetic).
- ``knnbaseline``: Surprise ``KNNBaseline(sim_options={"name": "pearson_baseline", "user_based":
  False})``, item-based with the pearson-baseline similarity (shrinkage 100), k 40, min_k 1, ALS
  baselines: the setting Surprise's docs recommend for this algorithm. On ml-latest-small (9,066
  items) the item-item similarity is a 9,066 x 9,066 float64 matrix (657 MB; computing it holds
  five such matrices, about 3.3 GB).
- ``myfm``: myFM's Bayesian factorization machine, ``myfm.MyFMRegressor(rank=R, random_seed=42)``
  fitted by Gibbs sampling (``n_iter`` 200 sweeps, the last ``n_kept_samples`` 180 kept and their
  predictions averaged) on a scipy.sparse CSR one-hot matrix, one column per user index and one per
  item index, with ``group_shapes=[num_users, num_items]`` so users and items get separate
  hyper-priors (myFM's MovieLens tutorial, "separate variance for movie & user"): a Bayesian FM on
  user and item ids only is BPMF with user and item biases. Ranks 10 and 20 (``myfm-r10``,
  ``myfm-r20``); rank 20 with 200 sweeps and 180 samples matches jaxcf's BPMF configs
  (``configs/best.yaml``, ``configs/bpmf-ml100k.yaml``: 20 factors, 200 sweeps, 180 samples), which
  differ in fixing the noise precision (alpha 1.5) where myFM samples it. myFM's prediction is not
  clipped to the rating scale (Surprise clips by default); ``rmse_clipped``/``mae_clipped`` give the
  clipped figures too.

What is timed (``time.perf_counter``): ``fit_s``, the peer's fit on the training rows (Surprise's
``fit(trainset)``; myFM's ``fit``), without building the Surprise trainset or the CSR matrix
(``prepare_s``, once per split); ``predict_s``, predicting every validation pair (Surprise's
``test``; myFM's ``predict``); for ``svd-tuned`` also ``tune_s``, the whole grid on the holdout.
Surprise is single-threaded (pure Cython/Python); myFM's sampler runs on one thread (its build has
no OpenMP, and ``predict`` is called without ``n_workers``). BLAS/OpenMP pools are limited to
``min(2, os.cpu_count())`` threads through ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and
``MKL_NUM_THREADS`` (set before NumPy is imported, unless already set; recorded in the JSON).
Other processes on the machine skew the times: the load average is recorded before and after. These
are accuracy figures first; the times are indicative.

myFM 0.4.0 imports ``pkg_resources`` (for nothing it uses), which recent setuptools no longer ships;
when it is missing, an empty stand-in module is registered before ``import myfm`` (recorded in the
JSON as ``myfm_pkg_resources_stub``).

What does not live here: jaxcf's own figures (``python -m jaxcf.crossval``, see docs/results.md).
"""

from __future__ import annotations

import os

THREADS = str(min(2, os.cpu_count() or 1))
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
for _var in THREAD_VARS:  # before NumPy (and its BLAS) is first imported
    os.environ.setdefault(_var, THREADS)
os.environ.setdefault("TQDM_DISABLE", "1")  # myFM's fit always draws a tqdm bar; read when tqdm is imported

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
import machine  # noqa: E402  (bench/ is not a package; the scripts run as files)

DATASETS = ("ml-latest-small", "ml-100k")
FOLDS = ("u1", "u2", "u3", "u4", "u5")
PEERS = ("baseline", "svd", "svd-tuned", "svdpp", "knnbaseline", "myfm")
SEED = 42  # jaxcf's split seed (the notebook's); also the holdout's and myFM's
HOLDOUT_FRACTION = 0.1
SVD_RANDOM_STATE = 0

# svd-tuned's grid: 12 points, in this order (ties go to the earlier point).
SVD_GRID = [
    {"n_factors": n_factors, "n_epochs": n_epochs, "lr_all": lr_all, "reg_all": reg_all}
    for n_factors, (n_epochs, lr_all), reg_all in itertools.product(
        (100, 200), ((20, 0.01), (60, 0.005), (60, 0.01)), (0.1, 0.15)
    )
]

PEER_SETTINGS = {
    "baseline": {
        "library": "scikit-surprise",
        "call": "surprise.BaselineOnly()",
        "settings": {"bsl_options": {"method": "als", "n_epochs": 10, "reg_u": 15, "reg_i": 10}},
        "why": "Surprise's defaults (ALS baselines), as in its README benchmark",
    },
    "svd": {
        "library": "scikit-surprise",
        "call": "surprise.SVD(random_state=0)",
        "settings": {"n_factors": 100, "n_epochs": 20, "biased": True, "lr_all": 0.005, "reg_all": 0.02,
                     "init_mean": 0, "init_std_dev": 0.1, "random_state": SVD_RANDOM_STATE},
        "why": "Surprise's defaults, as in its README benchmark",
    },
    "svd-tuned": {
        "library": "scikit-surprise",
        "call": "surprise.SVD(n_factors=..., n_epochs=..., lr_all=..., reg_all=..., random_state=0)",
        "settings": {"grid": SVD_GRID, "holdout": "jaxcf.data.holdout(dataset, 0.1, 42): 10% of the training rows "
                     "(first 10% of RandomState(42 + 1_000_003).permutation(n_train)), the other 90% train",
                     "selection": "lowest holdout RMSE (ties: first in grid order), then refit on all training rows",
                     "random_state": SVD_RANDOM_STATE},
        "why": "SVD's four main hyper-parameters chosen per split on a holdout of that split's training rows; "
               "the validation rows choose nothing",
    },
    "svdpp": {
        "library": "scikit-surprise",
        "call": "surprise.SVDpp(random_state=0, cache_ratings=True)",
        "settings": {"n_factors": 20, "n_epochs": 20, "lr_all": 0.007, "reg_all": 0.02, "init_mean": 0,
                     "init_std_dev": 0.1, "cache_ratings": True, "random_state": SVD_RANDOM_STATE},
        "why": "Surprise's defaults, as in its README benchmark; cache_ratings only speeds up fit",
    },
    "knnbaseline": {
        "library": "scikit-surprise",
        "call": "surprise.KNNBaseline(sim_options={'name': 'pearson_baseline', 'user_based': False})",
        "settings": {"k": 40, "min_k": 1, "sim_options": {"name": "pearson_baseline", "user_based": False,
                                                          "shrinkage": 100, "min_support": 1},
                     "bsl_options": {"method": "als", "n_epochs": 10, "reg_u": 15, "reg_i": 10}},
        "why": "item-based k-NN with the pearson_baseline similarity, which Surprise's docs recommend for "
               "KNNBaseline",
    },
}


def myfm_settings(rank: int, n_iter: int, n_kept: int) -> dict:
    return {
        "library": "myfm",
        "call": f"myfm.MyFMRegressor(rank={rank}, random_seed={SEED}).fit(X, y, n_iter={n_iter}, "
                f"n_kept_samples={n_kept}, group_shapes=[num_users, num_items])",
        "settings": {"rank": rank, "n_iter": n_iter, "n_kept_samples": n_kept, "random_seed": SEED,
                     "features": "scipy.sparse CSR one-hot: one column per user index, one per item index "
                                 "(every index of the table, seen in training or not)",
                     "group_shapes": "[num_users, num_items]", "init_stdev": 0.1, "alpha_0": 1.0, "beta_0": 1.0,
                     "gamma_0": 1.0, "mu_0": 0.0, "reg_0": 1.0, "fit_w0": True, "fit_linear": True,
                     "clipped": False},
        "why": "Bayesian FM on user and item ids = BPMF with biases (myFM's MovieLens tutorial, separate "
               "hyper-priors for users and items); the peer of jaxcf's BPMF configs (20 factors, 200 sweeps, "
               "180 samples)",
    }


# ------------------------------------------------------------------------------ data


class Split:
    """One split's rows, as jaxcf loads them, in the forms the peers take."""

    def __init__(self, dataset: str, name: str | None):
        from jaxcf import config, data

        if name is None:
            data_config = config.DataConfig(name=dataset, valid_fraction=0.2)
        else:
            data_config = config.DataConfig(name=dataset, split=name)
        self.loaded = data.load(data_config, seed=SEED)
        self.dataset = dataset
        self.name = self.loaded.split.name
        ratings = self.loaded.ratings
        self.num_users, self.num_items = ratings.num_users, ratings.num_items
        self.users, self.items = ratings.users, ratings.items
        self.ratings = ratings.ratings.astype(np.float64)
        self.user_raw, self.item_raw = ratings.user_ids.raw, ratings.item_ids.raw
        self.train, self.valid = self.loaded.split.train, self.loaded.split.valid
        train_ratings = self.ratings[self.train]
        # The rating scale Surprise clips to: that of the training rows (0.5-5 and 1-5 here).
        self.scale = (float(train_ratings.min()), float(train_ratings.max()))

    def holdout(self) -> tuple[np.ndarray, np.ndarray]:
        """The inner training rows and the held-out training rows (``jaxcf.data.holdout``)."""
        from jaxcf import data

        split = data.holdout(self.loaded, HOLDOUT_FRACTION, SEED).split
        return split.train, split.valid

    def unknown(self, train_rows: np.ndarray, test_rows: np.ndarray) -> dict:
        seen_users = np.zeros(self.num_users, bool)
        seen_items = np.zeros(self.num_items, bool)
        seen_users[self.users[train_rows]] = True
        seen_items[self.items[train_rows]] = True
        user_unknown = ~seen_users[self.users[test_rows]]
        item_unknown = ~seen_items[self.items[test_rows]]
        return {
            "unknown_pairs": int(np.sum(user_unknown | item_unknown)),
            "unknown_user_pairs": int(np.sum(user_unknown)),
            "unknown_item_pairs": int(np.sum(item_unknown)),
        }


def metrics(predicted: np.ndarray, truth: np.ndarray) -> dict:
    error = np.asarray(predicted, np.float64) - np.asarray(truth, np.float64)
    return {"rmse": float(np.sqrt(np.mean(error * error))), "mae": float(np.mean(np.abs(error)))}


# ------------------------------------------------------------------------------ Surprise


def surprise_trainset(split: Split, rows: np.ndarray):
    """A Surprise trainset of the given rows, with the raw ids of the files."""
    import pandas as pd
    from surprise import Dataset, Reader

    frame = pd.DataFrame({
        "user": split.user_raw[split.users[rows]],
        "item": split.item_raw[split.items[rows]],
        "rating": split.ratings[rows],
    })
    return Dataset.load_from_df(frame, Reader(rating_scale=split.scale)).build_full_trainset()


def surprise_testset(split: Split, rows: np.ndarray) -> list[tuple]:
    return list(zip(split.user_raw[split.users[rows]].tolist(), split.item_raw[split.items[rows]].tolist(),
                    split.ratings[rows].tolist(), strict=True))


def surprise_run(algo, trainset, testset) -> dict:
    start = time.perf_counter()
    algo.fit(trainset)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    predictions = algo.test(testset)
    predict_s = time.perf_counter() - start
    predicted = np.array([p.est for p in predictions], np.float64)
    truth = np.array([t[2] for t in testset], np.float64)
    return {
        **metrics(predicted, truth),
        "fit_s": fit_s,
        "predict_s": predict_s,
        "impossible_predictions": sum(bool(p.details.get("was_impossible")) for p in predictions),
    }


def make_surprise(peer: str, params: dict | None = None):
    import surprise

    if peer == "baseline":
        return surprise.BaselineOnly(verbose=False)
    if peer == "svd":
        return surprise.SVD(random_state=SVD_RANDOM_STATE)
    if peer == "svd-tuned":
        return surprise.SVD(random_state=SVD_RANDOM_STATE, **params)
    if peer == "svdpp":
        return surprise.SVDpp(random_state=SVD_RANDOM_STATE, cache_ratings=True)
    if peer == "knnbaseline":
        return surprise.KNNBaseline(sim_options={"name": "pearson_baseline", "user_based": False}, verbose=False)
    raise ValueError(peer)


def tune_svd(split: Split) -> dict:
    """svd-tuned's grid on the holdout of the training rows; returns the chosen point and every score."""
    inner, held = split.holdout()
    trainset = surprise_trainset(split, inner)
    testset = surprise_testset(split, held)
    scores = []
    start = time.perf_counter()
    for point in SVD_GRID:
        result = surprise_run(make_surprise("svd-tuned", point), trainset, testset)
        scores.append({**point, "holdout_rmse": result["rmse"], "holdout_mae": result["mae"],
                       "fit_s": result["fit_s"]})
    tune_s = time.perf_counter() - start
    best = min(range(len(scores)), key=lambda k: scores[k]["holdout_rmse"])  # first of equals
    return {"chosen": dict(SVD_GRID[best]), "chosen_holdout_rmse": scores[best]["holdout_rmse"], "tune_s": tune_s,
            "n_holdout_train": len(inner), "n_holdout": len(held),
            "holdout_unknown_pairs": split.unknown(inner, held)["unknown_pairs"], "grid_scores": scores}


# ------------------------------------------------------------------------------ myFM


def import_myfm() -> tuple[types.ModuleType, bool]:
    """``import myfm``; registers an empty ``pkg_resources`` first when setuptools no longer ships one
    (myFM 0.4.0 imports ``DistributionNotFound`` and ``get_distribution`` from it and uses neither)."""
    stubbed = False
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pkg_resources")

        class DistributionNotFound(Exception):
            pass

        def get_distribution(name):
            raise DistributionNotFound(name)

        stub.DistributionNotFound = DistributionNotFound
        stub.get_distribution = get_distribution
        sys.modules["pkg_resources"] = stub
        stubbed = True
    import myfm

    return myfm, stubbed


def one_hot(split: Split, rows: np.ndarray):
    """CSR rows ``[user one-hot | item one-hot]`` over every user and item index of the table."""
    import scipy.sparse as sps

    n = len(rows)
    columns = np.stack([split.users[rows].astype(np.int64), split.num_users + split.items[rows].astype(np.int64)], 1)
    return sps.csr_matrix(
        (np.ones(2 * n, np.float64), columns.reshape(-1), np.arange(0, 2 * n + 1, 2, dtype=np.int64)),
        shape=(n, split.num_users + split.num_items),
    )


def myfm_run(myfm, split: Split, rank: int, n_iter: int, n_kept: int, x_train, x_valid) -> dict:
    model = myfm.MyFMRegressor(rank=rank, random_seed=SEED)
    start = time.perf_counter()
    model.fit(x_train, split.ratings[split.train], n_iter=n_iter, n_kept_samples=n_kept,
              group_shapes=[split.num_users, split.num_items], callback=lambda *_: (False, None))
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    predicted = np.asarray(model.predict(x_valid), np.float64)
    predict_s = time.perf_counter() - start
    truth = split.ratings[split.valid]
    clipped = metrics(np.clip(predicted, *split.scale), truth)
    return {**metrics(predicted, truth), "fit_s": fit_s, "predict_s": predict_s,
            "rmse_clipped": clipped["rmse"], "mae_clipped": clipped["mae"]}


# ------------------------------------------------------------------------------ the run


def run_split(split: Split, peers: list[str], args, emit) -> list[dict]:
    """Every requested peer on one split; ``emit`` is called with each record as it comes in."""
    records = []
    common = {"dataset": split.dataset, "split": split.name, "n_train": len(split.train),
              "n_valid": len(split.valid), **split.unknown(split.train, split.valid)}
    surprise_peers = [p for p in peers if p != "myfm"]
    if surprise_peers:
        start = time.perf_counter()
        trainset = surprise_trainset(split, split.train)
        testset = surprise_testset(split, split.valid)
        prepare_s = time.perf_counter() - start
        for peer in surprise_peers:
            record = {**common, "peer": peer, "prepare_s": prepare_s}
            if peer == "svd-tuned":
                tuning = tune_svd(split)
                record.update(surprise_run(make_surprise(peer, tuning["chosen"]), trainset, testset))
                record["tuning"] = tuning
            else:
                record.update(surprise_run(make_surprise(peer), trainset, testset))
            record["load_average"] = machine.load_average()
            records.append(record)
            emit(record)
        del trainset, testset
    if "myfm" in peers:
        myfm, _ = import_myfm()
        start = time.perf_counter()
        x_train, x_valid = one_hot(split, split.train), one_hot(split, split.valid)
        prepare_s = time.perf_counter() - start
        for rank in args.myfm_ranks:
            record = {**common, "peer": f"myfm-r{rank}", "prepare_s": prepare_s}
            record.update(myfm_run(myfm, split, rank, args.myfm_iter, args.myfm_kept, x_train, x_valid))
            record["load_average"] = machine.load_average()
            records.append(record)
            emit(record)
    return records


def summarize(records: list[dict]) -> dict:
    """Per dataset and peer: mean ± sample std (ddof 1) over the splits, and the per-split figures."""
    out: dict = {}
    for record in records:
        out.setdefault(record["dataset"], {}).setdefault(record["peer"], []).append(record)
    summaries: dict = {}
    for dataset, by_peer in out.items():
        summaries[dataset] = {}
        for peer, rows in by_peer.items():
            entry: dict = {"splits": [r["split"] for r in rows], "n_splits": len(rows)}
            for key in ("rmse", "mae", "fit_s", "predict_s"):
                values = [r[key] for r in rows]
                entry[f"{key}_mean"] = statistics.fmean(values)
                entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
                entry[f"{key}_per_split"] = dict(zip(entry["splits"], values, strict=True))
            entry["unknown_pairs_per_split"] = {r["split"]: r["unknown_pairs"] for r in rows}
            if peer == "svd-tuned":
                entry["chosen_per_split"] = {r["split"]: r["tuning"]["chosen"] for r in rows}
            summaries[dataset][peer] = entry
    return summaries


def format_line(r: dict) -> str:
    extra = ""
    if "tuning" in r:
        chosen = r["tuning"]["chosen"]
        extra = (f"  chosen n_factors={chosen['n_factors']} n_epochs={chosen['n_epochs']} "
                 f"lr_all={chosen['lr_all']} reg_all={chosen['reg_all']} "
                 f"(holdout {r['tuning']['chosen_holdout_rmse']:.4f}, grid {r['tuning']['tune_s']:.1f}s)")
    if "rmse_clipped" in r:
        extra = f"  clipped rmse {r['rmse_clipped']:.4f}"
    return (f"{r['dataset']:<16} {r['split']:<7} {r['peer']:<12} rmse {r['rmse']:.4f}  mae {r['mae']:.4f}  "
            f"fit {r['fit_s']:8.2f}s  predict {r['predict_s']:6.2f}s  unknown pairs {r['unknown_pairs']}{extra}")


def print_summary(summaries: dict) -> None:
    print()
    print(f"{'dataset':<16} {'peer':<12} {'splits':>6} {'RMSE':>17} {'MAE':>17} {'fit s (mean)':>12}  first split")
    for dataset, by_peer in summaries.items():
        for peer, s in by_peer.items():
            def pm(key, s=s):
                std = s[f"{key}_std"]
                return f"{s[f'{key}_mean']:.4f}" + (f" ± {std:.4f}" if std is not None else " " * 9)

            first = s["splits"][0]
            print(f"{dataset:<16} {peer:<12} {s['n_splits']:>6} {pm('rmse'):>17} {pm('mae'):>17} "
                  f"{s['fit_s_mean']:>12.2f}  {first}: {s['rmse_per_split'][first]:.4f} / "
                  f"{s['mae_per_split'][first]:.4f}")
    sys.stdout.flush()


def git_state() -> dict:
    """The commit of the checkout jaxcf's loaders came from, and whether its tree had local changes."""
    import subprocess

    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "tracked_files_modified": None if status is None else bool(status)}


def thread_settings() -> dict:
    found: dict = {var: os.environ.get(var) for var in THREAD_VARS}
    found["cpu_count"] = os.cpu_count()
    found["sched_getaffinity"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    try:
        from threadpoolctl import threadpool_info

        found["threadpoolctl"] = [{k: info.get(k) for k in ("user_api", "internal_api", "num_threads", "version")}
                                  for info in threadpool_info()]
    except ImportError:
        found["threadpoolctl"] = None
    found["surprise"] = "single-threaded (Cython/Python loops; no thread option)"
    found["myfm"] = "one thread: its Gibbs sampler has no OpenMP in this build; predict called without n_workers"
    return found


def parse_list(choices):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if choices is not None and v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}")
        return list(dict.fromkeys(values))

    return parse


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected comma-separated positive integers")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=parse_list(DATASETS), default=list(DATASETS))
    parser.add_argument("--folds", type=parse_list(FOLDS), default=list(FOLDS), help="ml-100k's official folds")
    parser.add_argument("--peers", type=parse_list(PEERS), default=list(PEERS))
    parser.add_argument("--myfm-ranks", type=parse_ints, default=[10, 20])
    parser.add_argument("--myfm-iter", type=int, default=200, help="Gibbs sweeps")
    parser.add_argument("--myfm-kept", type=int, default=180, help="the last sweeps kept and averaged")
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "peers.json", help="write the results here")
    args = parser.parse_args(argv)
    if not 1 <= args.myfm_kept <= args.myfm_iter:
        parser.error("--myfm-kept must be between 1 and --myfm-iter")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    _, stubbed = import_myfm() if "myfm" in args.peers else (None, False)
    peers_run = [p for p in PEERS if p in args.peers]
    settings = {p: PEER_SETTINGS[p] for p in peers_run if p != "myfm"}
    if "myfm" in peers_run:
        for rank in args.myfm_ranks:
            settings[f"myfm-r{rank}"] = myfm_settings(rank, args.myfm_iter, args.myfm_kept)
    result = {
        "benchmark": "peers",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine.describe("scikit-surprise", "myfm", "numpy", "scipy", "pandas", "jaxcf"),
        "jaxcf_checkout": git_state(),
        "threads": thread_settings(),
        "myfm_pkg_resources_stub": stubbed,
        "load_average_before": machine.load_average(),
        "seed": SEED,
        "datasets": args.datasets,
        "folds": args.folds if "ml-100k" in args.datasets else [],
        "metrics": "RMSE and MAE in float64 over every validation rating, from each peer's prediction",
        "peers": settings,
        "complete": False,
        "splits": [],
    }

    def write() -> None:
        result["summaries"] = summarize(result["splits"])
        result["peak_rss_bytes"] = machine.peak_rss_bytes()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        partial = args.json.with_suffix(args.json.suffix + ".partial")
        partial.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(partial, args.json)

    def emit(record: dict) -> None:
        print(format_line(record), flush=True)
        result["splits"].append(record)
        write()  # after each result, so an interrupted run keeps what it measured

    plan = [(d, None) for d in args.datasets if d == "ml-latest-small"]
    plan += [(d, fold) for d in args.datasets if d == "ml-100k" for fold in args.folds]
    for dataset, fold in plan:
        split = Split(dataset, fold)
        run_split(split, peers_run, args, emit)
    result["load_average_after"] = machine.load_average()
    result["complete"] = True
    write()
    print_summary(result["summaries"])
    print(f"\nwrote {args.json}", flush=True)
    return 0 if all(math.isfinite(r["rmse"]) for r in result["splits"]) else 1


if __name__ == "__main__":
    sys.exit(main())
