"""jaxcf's implicit-feedback models against the ``implicit`` library, on the implicit protocol, side by side.

    python bench/vs_implicit.py [--datasets ml-latest-small,ml-100k] [--json results/vs_implicit.json]

The protocol (``jaxcf.data.implicit``, ``jaxcf.core.ranking.implicit_metrics``): interactions are the
ratings of at least 4 stars; test = the first 20% of ``RandomState(42).permutation`` over them;
candidates are the items with a training interaction minus the user's training items. Every model
below is scored by the same ``implicit_metrics`` on the same split, from its own factors.

Compared, in one run on one machine, with the same thread count (2: XLA's pool on this 2-core
machine; ``num_threads=2`` for implicit, BLAS held to 1 thread as implicit asks):

- ``jaxcf iALS`` (``configs/ials.yaml``, exact solves) against ``implicit`` ALS with the same
  factors, regularisation, iterations and confidence (``alpha_implicit = 1 + alpha``: implicit's
  confidence is ``alpha * r``, jaxcf's ``1 + alpha r``), ``use_cg=False`` and float32, and implicit
  ALS at its defaults (conjugate gradient);
- ``implicit`` ALS at its best on a small grid (factors, regularisation, alpha), chosen on the *test*
  split: the peer at its best, a bound that favours it;
- ``jaxcf BPR`` (``configs/bpr.yaml``) against ``implicit`` BPR with the same factors, learning rate,
  regularisation and epochs, and at its best on a small grid (test split again);
- ``jaxcf EASE`` (``configs/ease.yaml``) and ``configs/implicit-best.yaml``, for the table.

Fit seconds are wall time of the fit alone (data already in memory; jaxcf's include compilation).
Prints a table per dataset and writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # implicit's advice; its own threads do the work

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

THREADS = 2
ALS_GRID = {"factors": (64, 128), "regularization": (0.1, 1.0, 10.0, 50.0), "alpha": (1.0, 5.0, 20.0)}
BPR_GRID = {"factors": (64, 128), "learning_rate": (0.01, 0.05, 0.1), "regularization": (0.001, 0.01)}


def protocol(name: str):
    from jaxcf import config, data

    cfg = config.load("ials.yaml", [f"data.name={name}"])
    return data.interactions(data.load(cfg.data, cfg.seed), cfg.data.implicit_threshold, cfg.data.valid_fraction,
                             cfg.seed)


def score_factors(dataset, users: np.ndarray, items: np.ndarray) -> dict:
    from jaxcf.families import _implicit as implicit_family

    return implicit_family.metrics(dataset, {"user_embedding": users.astype(np.float32),
                                             "item_embedding": items.astype(np.float32)})


def user_items(dataset):
    import scipy.sparse as sp

    r, train = dataset.ratings, dataset.split.train
    matrix = sp.csr_matrix((np.ones(len(train), np.float32), (r.users[train], r.items[train])),
                           shape=(r.num_users, r.num_items))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def implicit_als(dataset, factors, regularization, alpha, iterations, use_cg):
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(factors=factors, regularization=regularization, alpha=alpha, iterations=iterations,
                                    use_cg=use_cg, dtype=np.float32, num_threads=THREADS, random_state=42,
                                    calculate_training_loss=False)
    matrix = user_items(dataset)
    start = time.perf_counter()
    model.fit(matrix, show_progress=False)
    seconds = time.perf_counter() - start
    return {"fit_s": seconds, **score_factors(dataset, model.user_factors, model.item_factors)}


def implicit_bpr(dataset, factors, learning_rate, regularization, iterations):
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    model = BayesianPersonalizedRanking(factors=factors, learning_rate=learning_rate, regularization=regularization,
                                        iterations=iterations, num_threads=THREADS, random_state=42)
    matrix = user_items(dataset)
    start = time.perf_counter()
    model.fit(matrix, show_progress=False)
    seconds = time.perf_counter() - start
    return {"fit_s": seconds, **score_factors(dataset, model.user_factors, model.item_factors)}


def jaxcf_model(dataset, config_name: str, name: str, overrides=()) -> tuple[dict, object]:
    from jaxcf import config
    from jaxcf.training import api

    cfg = config.load(config_name, [f"data.name={name}", *overrides])
    start = time.perf_counter()
    with open(os.devnull, "w") as silent:
        trained = api.run(cfg, dataset, quiet=True, out=silent)
    seconds = time.perf_counter() - start
    record = trained.history[-1]
    return {"fit_s": seconds, **{k: v for k, v in record.items() if "@" in k or k in (
        "mrr", "scored_users", "candidates", "protocol")}}, cfg


def grid(space: dict):
    keys = list(space)
    return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]


def run_dataset(name: str) -> dict:
    dataset = protocol(name)
    rows = {}

    def show(label, figures):
        rows[label] = figures
        print(f"  {label:<44} ndcg@20 {figures['ndcg@20']:.4f}  recall@20 {figures['recall@20']:.4f}  "
              f"fit {figures['fit_s']:6.2f} s", flush=True)

    print(f"{name}: {len(dataset.split.train)} training and {len(dataset.split.valid)} test interactions", flush=True)
    ials, cfg = jaxcf_model(dataset, "ials.yaml", name)
    show("jaxcf iALS (configs/ials.yaml)", ials)
    same = {"factors": cfg.model.n_factors, "regularization": cfg.implicit.regularization,
            "alpha": 1 + cfg.implicit.alpha, "iterations": cfg.train.epochs}
    show("implicit ALS, the same settings (exact solves)", {**implicit_als(dataset, **same, use_cg=False),
                                                             "settings": same})
    show("implicit ALS, the same settings (CG)", {**implicit_als(dataset, **same, use_cg=True), "settings": same})
    best_als, best_settings = None, None
    for point in grid(ALS_GRID):
        figures = implicit_als(dataset, **point, iterations=cfg.train.epochs, use_cg=True)
        if best_als is None or figures["ndcg@20"] > best_als["ndcg@20"]:
            best_als, best_settings = figures, point
    show("implicit ALS, best of the grid (chosen on test)", {**best_als, "settings": best_settings,
                                                             "grid": ALS_GRID})
    bpr, bcfg = jaxcf_model(dataset, "bpr.yaml", name)
    show("jaxcf BPR (configs/bpr.yaml)", bpr)
    same_bpr = {"factors": bcfg.model.n_factors, "learning_rate": bcfg.optim.learning_rate,
                "regularization": bcfg.implicit.l2, "iterations": bcfg.train.epochs}
    show("implicit BPR, the same settings", {**implicit_bpr(dataset, **same_bpr), "settings": same_bpr})
    best_bpr, best_bpr_settings = None, None
    for point in grid(BPR_GRID):
        figures = implicit_bpr(dataset, **point, iterations=bcfg.train.epochs)
        if best_bpr is None or figures["ndcg@20"] > best_bpr["ndcg@20"]:
            best_bpr, best_bpr_settings = figures, point
    show("implicit BPR, best of the grid (chosen on test)", {**best_bpr, "settings": best_bpr_settings,
                                                             "grid": BPR_GRID})
    show("jaxcf EASE (configs/ease.yaml)", jaxcf_model(dataset, "ease.yaml", name)[0])
    show("jaxcf configs/implicit-best.yaml", jaxcf_model(dataset, "implicit-best.yaml", name)[0])
    return {"train": len(dataset.split.train), "test": len(dataset.split.valid), "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="ml-latest-small,ml-100k")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    load_before = machine.load_average()
    results = {name: run_dataset(name) for name in args.datasets.split(",")}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "threads": THREADS, "results": results,
            "load_average_before": load_before, "load_average_after": machine.load_average(),
            "machine": machine.describe("jax", "jaxlib", "implicit", "numpy", "scipy"),
        }, indent=2, default=float) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
