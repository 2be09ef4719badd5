"""Every jaxcf family against the library it reimplements, side by side, in one run on one machine.

    python bench/vs_peers.py [--rows bpmf,bfm,ials,ials-cg,bpr,ease,bias] [--quick] [--no-cli]
                             [--sides both|jaxcf] [--json results/vs_peers.json]

The rows (each on the bundled ml-latest-small, Oct 2016; both sides read the same file and split it
the same way; the hyper-parameters of the peer are derived from the resolved jaxcf config):

- ``bpmf-r10``, ``bpmf-r20``: ``configs/bpmf.yaml`` (Gibbs BPMF, one chain, 200 sweeps, the last 180
  kept) with ``model.n_factors`` 10 / 20, against ``myfm.MyFMRegressor`` (rank 10 / 20, ``n_iter``
  200, ``n_kept_samples`` 180) on a one-hot user | item CSR with ``group_shapes=[users, items]``.
  Not the same model: myFM adds a global bias and per-user/item biases and samples the noise
  precision; jaxcf folds the mean in and fixes alpha (1.5). myFM's wheel samples on one thread.
  Seeds 42, 43, 44 on both sides (each also picks the split, shared by both sides).
- ``bfm``: ``configs/bfm.yaml`` (a Bayesian factorisation machine: ids, the user's implicit set and the
  item's "flipped" set, rank, sweeps and kept samples from the config) against myFM on the same
  relational blocks (``side_myfm_bfm``): the same model and priors. Seeds 42, 43, 44.
- ``ials``: ``configs/ials.yaml`` (exact solves) against ``implicit.cpu.als.AlternatingLeastSquares(
  use_cg=False)``; ``ials-cg``: the same with ``implicit.solver=cg implicit.cg_steps=3`` against
  ``use_cg=True`` with ``cg_steps`` 3 (implicit's default, checked). implicit's confidence is
  ``alpha * r``, jaxcf's ``1 + alpha`` for an interaction, so implicit gets ``alpha = 1 + alpha``.
- ``bpr``: implicit 0.7.3's ``BayesianPersonalizedRanking`` at its defaults (100 factors, learning
  rate 0.01, regularisation 0.01, 100 epochs, one negative) against ``configs/bpr.yaml`` set to the
  same arithmetic: ``optim.name=sgd``, ``implicit.negatives=1``, ``model.n_factors=100``,
  ``train.epochs=100``, ``implicit.l2 = reg / 2`` (jaxcf's L2 term is ``l2 * |row|^2``, implicit's
  step subtracts ``reg * row``) and ``implicit.init_std`` = the std of implicit's uniform initial
  factors. Where the library's ``sgd`` steps once per triple (LearnBPR, the batch's triples at once,
  as Hogwild threads), the rate is implicit's 0.01 and the negatives are drawn as implicit draws them
  (``implicit.negative_sampling=popularity``: a random interaction's item; ``verify_negatives``: a
  triple whose negative the user liked is skipped). With an older library, whose ``sgd`` stepped on the
  batch's mean loss, the rate is ``0.01 * train.batch_size`` (the same step per sample) and jaxcf's
  negatives are uniform over the catalogue (see ``jaxcf_bpr``; the JSON records the overrides).
  Seeds 42, 43, 44 on both sides; ``seed`` also picks jaxcf's split, so each seed is its own split,
  shared by both sides (mean ± sample std over the three).
- ``ease``: ``configs/ease.yaml`` against a NumPy/SciPy reference written here (binary X of the
  training interactions over the items that have one, ``P = inv(X'X + lambda I)``,
  ``B = I - P diag(1 / diag P)``), the same lambda, float64.
- ``bias``: ``configs/bias.yaml`` (the notebook's biased model, adamw, 5 epochs, batch 64) against
  the PyTorch port (``reference_torch``: its loader with one DataLoader worker, its ``fit``, the same
  optimizer, ``torch.optim.AdamW``), as ``bench/vs_torch.py`` runs it.

Each side of each row runs in its own fresh process (so peak memory does not mix, and no process
forks with JAX's threads running). What is measured there:

- ``fit_s``: wall seconds from the ratings file to the trained model, imports excluded. jaxcf:
  ``jaxcf.fit(path, config=..., overrides=[...], quiet=True)``: reading, checks, split, compiling,
  every epoch with its validation metrics, the closing metrics and the export. Peers: read the file
  (pandas), map ids, split, build their matrix or loader, fit; no scoring (the notebook's loop in
  the torch port validates after each epoch, as it always does).
- Validation metrics: jaxcf's rows (but ``bias``, whose torch port validates every epoch) run with
  ``train.eval_every`` = their epochs, so they score the validation part after the last epoch only, as
  the peers (which score nothing while they train); every epoch still records its training loss.
- ``per_iter_s``: the median steady-state seconds of one sweep / epoch. jaxcf: the median of
  ``train_seconds`` in ``model.history`` from the second epoch on (training only), except ``bias``,
  where it is ``seconds`` (validation included, as the torch port's epoch is); EASE has one solve.
  Peers: implicit's and myFM's per-iteration callbacks, torch's epochs, EASE's solve.
- ``compile_s`` (jaxcf): the first epoch's ``seconds`` minus the steady-state median.
- ``peak_rss_above_imports_bytes``: ``VmHWM`` after the fit minus ``VmRSS`` right after the side's
  imports (and JAX's backend start). The DataLoader's worker process is not counted.
- the metric, computed here by the same code for both sides: RMSE over every validation pair
  (jaxcf: ``model.predict`` on the raw ids; peers: their prediction), and NDCG@20 / recall@20 by
  ``jaxcf.core.ranking.implicit_metrics`` on the protocol's split (jaxcf's scores from ``model.scores``).
  ``jaxcf_history_metric`` is jaxcf's own figure from its history: equal to ``metric`` up to
  rounding whenever the split is the same.
- threads: jaxcf runs with XLA's default (and NumPy's default BLAS for EASE); implicit with
  ``num_threads`` 1 and 2 (BLAS held to 1 as implicit asks), torch with 1 and 2 threads, the NumPy
  reference with 1 and 2 BLAS threads, myFM with 1 (its only setting). The peer's figures are those of
  its setting with the lowest ``fit_s``; every setting is in the JSON.
- ``cli_s``: wall seconds of ``python -m jaxcf.train --config ... --set ... --quiet --workdir TMP``
  (imports, checkpoints and the export included), and its peak RSS; ``cli_cold`` the same command
  run first, with an empty compilation cache.
- Compiling: each row has its own persistent compilation cache (``jaxcf.enable_compilation_cache``,
  a fresh folder). ``jaxcf_cold`` is the first run of the first seed, the cache empty; then every
  seed runs again in a new process with the cache filled (``jaxcf``: the figures and ratios, what a
  second run of a config costs); ``ratio_fit_s_cold`` is the cold run against the peer.

How to read the figures: ratios are jaxcf / peer, so above 1 means jaxcf is slower. Compare only
within one run; the host is shared (the load average is recorded before and after each side), and
the figures vary from run to run. ``--quick`` (few sweeps and epochs, one seed) is for development
only: its ratios say nothing.

What does not live here: the training code of any side; accuracy tables (``bench/peers.py``,
``bench/vs_implicit.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
import machine  # noqa: E402  (bench/ is not a package; the scripts run as files)

RATINGS = ROOT / "jaxcf" / "data" / "bundled" / "ml-latest-small-2016" / "ratings.csv.gz"
ROW_NAMES = ("bpmf-r10", "bpmf-r20", "bfm", "ials", "ials-cg", "bpr", "ease", "bias")
BPR_SEEDS = (42, 43, 44)  # fixed in advance; each is also jaxcf's split seed (see the docstring)
# implicit 0.7.3's BayesianPersonalizedRanking defaults (checked against its signature in the peer process).
IMPLICIT_BPR = {"factors": 100, "learning_rate": 0.01, "regularization": 0.01, "iterations": 100}
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
MB = 1e6
SIDE_TIMEOUT_S = 1800  # a side that hangs (e.g. a deadlocked kernel) fails its row instead of the run


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long each row runs: the real settings, or ``--quick``'s few sweeps and epochs."""

    quick: bool

    @property
    def sweeps_and_kept(self) -> tuple[int, int] | None:
        return (20, 15) if self.quick else None  # None: the config's (200 sweeps, 180 kept)

    def epochs(self, full: int | None) -> int | None:
        return (2 if full is None else min(full, 5)) if self.quick else full

    @property
    def seeds(self) -> tuple[int, ...]:
        return BPR_SEEDS[:1] if self.quick else BPR_SEEDS


# ------------------------------------------------------------------------------ the jaxcf side of each row
# One small function per row: (config, overrides) through the public API. Adapt here when the library changes.


def last_only(config: str, overrides: list[str]) -> list[str]:
    """``train.eval_every`` = the run's epochs: the validation metrics of the last epoch only (the peers
    compute none while they train); every epoch still records its training loss."""
    return [*overrides, f"train.eval_every={resolved(config, overrides).train.epochs}"]


def jaxcf_bpmf(plan: Plan, rank: int) -> tuple[str, list[str]]:
    overrides = [f"model.n_factors={rank}"]
    if plan.sweeps_and_kept:
        sweeps, kept = plan.sweeps_and_kept
        overrides += [f"train.epochs={sweeps}", f"ensemble.size={kept}", f"ensemble.burn_in={sweeps - kept}"]
    return "bpmf.yaml", last_only("bpmf.yaml", overrides)


def jaxcf_ials(plan: Plan, cg: bool) -> tuple[str, list[str]]:
    overrides = ["implicit.solver=cg", "implicit.cg_steps=3"] if cg else []
    if plan.quick:
        overrides.append(f"train.epochs={plan.epochs(None)}")
    return "ials.yaml", last_only("ials.yaml", overrides)


def jaxcf_bpr(plan: Plan, seed: int, batch_size: int, learnbpr: bool) -> tuple[str, list[str]]:
    """bpr.yaml set to implicit's BPR defaults (see the module docstring for the mapping).

    ``learnbpr``: the library's ``sgd`` steps once per triple, as implicit does (``implicit.negative_sampling``
    and ``verify_negatives`` came with that change): the learning rate is implicit's, and the negatives are
    drawn as implicit draws them. Before it, ``sgd`` stepped on the batch's mean loss: the rate is scaled by
    the batch size, and negatives are uniform (the only choice then).
    """
    factors = IMPLICIT_BPR["factors"]
    rate = IMPLICIT_BPR["learning_rate"] * (1 if learnbpr else batch_size)
    sampling = ["implicit.negative_sampling=popularity", "implicit.verify_negatives=true"] if learnbpr else []
    return "bpr.yaml", [
        f"seed={seed}", "optim.name=sgd", "optim.weight_decay=0", f"optim.learning_rate={rate:g}",
        f"train.batch_size={batch_size}", f"implicit.l2={IMPLICIT_BPR['regularization'] / 2}",
        "implicit.negatives=1", *sampling, f"implicit.init_std={1 / (factors * math.sqrt(12)):.6g}",
        f"model.n_factors={factors}", f"train.epochs={plan.epochs(IMPLICIT_BPR['iterations'])}",
        f"train.eval_every={plan.epochs(IMPLICIT_BPR['iterations'])}",
    ]


def jaxcf_ease(plan: Plan) -> tuple[str, list[str]]:
    return "ease.yaml", []


def jaxcf_bias(plan: Plan) -> tuple[str, list[str]]:
    return "bias.yaml", [f"train.epochs={plan.epochs(None)}"] if plan.quick else []


def resolved(config: str, overrides: list[str]):
    """The config jaxcf will run (what the peer's settings are read from)."""
    from jaxcf import config as jconfig

    return jconfig.load(config, overrides)


def jaxcf_timings(history: list[dict], per_iter_key: str) -> dict:
    """Compile and steady-state seconds from ``model.history`` (one record per epoch; the last repeats
    the exported epoch with the closing metrics)."""
    by_epoch = {r["epoch"]: r for r in history if "epoch" in r and "seconds" in r}
    records = [by_epoch[k] for k in sorted(by_epoch)]
    seconds = [float(r["seconds"]) for r in records]
    per_iter = [float(r.get(per_iter_key, r["seconds"])) for r in records]
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else None
    return {
        "iterations": len(records),
        "per_iter_s": statistics.median(per_iter[1:]) if len(per_iter) > 1 else per_iter[0],
        "per_iter_key": per_iter_key,
        "per_epoch_with_record_s": steady,  # the median of `seconds`: the epoch plus its record (validation)
        "first_iter_s": seconds[0],
        "compile_s": seconds[0] - steady if steady is not None else None,
        "iter_s": seconds,
        "train_s_total": sum(float(r.get("train_seconds", 0.0)) for r in records),
    }


def jaxcf_metric(model, job: dict) -> dict:
    """The row's metric from the trained model by the public API, on the bench's own split."""
    import numpy as np

    history = model.history
    last = history[-1] if history else {}
    if job["metric"] == "rmse":
        data = explicit_data(read_ratings(job["path"]), job["seed"], job["valid_fraction"])
        valid = data["valid"]
        predicted = model.predict(data["user_raw"][data["users"][valid]].tolist(),
                                  data["item_raw"][data["items"][valid]].tolist()).ratings
        return {**rmse(predicted, data["ratings"][valid]), "jaxcf_history_metric": last.get("valid_rmse")}
    protocol = implicit_protocol(read_ratings(job["path"]), job["seed"], job["threshold"], job["valid_fraction"])
    # The exported tables (implicit models export a dot model), not model.scores: that refuses users with no
    # training interaction, whom the protocol still scores (their rows are what training left there).
    rows, row_known = model.lookup_users(protocol["user_raw"].tolist())
    columns, column_known = model.lookup_items(protocol["item_raw"].tolist())
    users_table = np.where(row_known[:, None], np.asarray(model.user_embedding)[np.maximum(rows, 0)], 0.0)
    items_table = np.where(column_known[:, None], np.asarray(model.item_embedding)[np.maximum(columns, 0)], 0.0)
    return {**ranking(protocol, factor_scores(users_table, items_table)), "jaxcf_history_metric": last.get("ndcg@20"),
            "unknown_to_model": {"users": int((~row_known).sum()), "items": int((~column_known).sum())}}


def side_jaxcf(job: dict) -> dict:
    import jax

    import jaxcf

    jaxcf.fit  # noqa: B018  (imports the training stack now, outside the timing)
    jax.devices()
    if job.get("cache"):  # the documented call; the folder is empty (cold) or filled by the run before (warm)
        jaxcf.enable_compilation_cache(job["cache"])
    base = rss_bytes("VmRSS")
    start = time.perf_counter()
    model = jaxcf.fit(job["path"], config=job["config"], overrides=job["overrides"], quiet=True)
    fit_s = time.perf_counter() - start
    peak = rss_bytes("VmHWM")
    return {"fit_s": fit_s, **jaxcf_timings(model.history, job["per_iter_key"]), **memory(base, peak),
            **jaxcf_metric(model, job), "threads": "XLA default", "device": machine.jax_device()}


# ------------------------------------------------------------------------------ data, read the same way on both sides


def read_ratings(path: str):
    import pandas as pd

    return pd.read_csv(path)


def explicit_data(frame, seed: int, valid_fraction: float) -> dict:
    """jaxcf's split of a ratings table: ids in order of first appearance over the whole file; the
    validation rows are the first ``int(n * fraction)`` of ``RandomState(seed).permutation(n)``."""
    import numpy as np
    import pandas as pd

    users, user_raw = pd.factorize(frame["userId"].to_numpy())
    items, item_raw = pd.factorize(frame["movieId"].to_numpy())
    train, valid = split_rows(len(frame), seed, valid_fraction)
    return {"users": users, "items": items, "user_raw": np.asarray(user_raw), "item_raw": np.asarray(item_raw),
            "ratings": frame["rating"].to_numpy(np.float64), "train": train, "valid": valid}


def implicit_protocol(frame, seed: int, threshold: float, valid_fraction: float) -> dict:
    """jaxcf's implicit protocol: the ratings >= threshold, ids in order of first appearance among
    them, then the same random split over the interactions."""
    return explicit_data(frame[frame["rating"] >= threshold].reset_index(drop=True), seed, valid_fraction)


def split_rows(n: int, seed: int, valid_fraction: float):
    import numpy as np

    valid = np.zeros(n, bool)
    valid[np.random.RandomState(seed).permutation(n)[: int(n * valid_fraction)]] = True
    return np.flatnonzero(~valid), np.flatnonzero(valid)


def interaction_matrix(protocol: dict):
    """float32 CSR users x items, 1 for each training interaction (duplicates counted once)."""
    import numpy as np
    import scipy.sparse as sp

    train = protocol["train"]
    matrix = sp.csr_matrix((np.ones(len(train), np.float32), (protocol["users"][train], protocol["items"][train])),
                           shape=(len(protocol["user_raw"]), len(protocol["item_raw"])))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


# ------------------------------------------------------------------------------ metrics, the same code for both sides


def rmse(predicted, truth) -> dict:
    import numpy as np

    error = np.asarray(predicted, np.float64) - np.asarray(truth, np.float64)
    return {"rmse": float(np.sqrt(np.mean(error * error))), "mae": float(np.mean(np.abs(error))),
            "n_valid": int(len(error))}


def ranking(protocol: dict, score) -> dict:
    from jaxcf.core.ranking import implicit_metrics

    train, test = protocol["train"], protocol["valid"]
    found = implicit_metrics(score, len(protocol["item_raw"]), protocol["users"][train], protocol["items"][train],
                             protocol["users"][test], protocol["items"][test])
    return {key: found[key] for key in ("ndcg@20", "recall@20", "map@20", "scored_users", "candidates")}


def factor_scores(user_factors, item_factors):
    import numpy as np

    return lambda users: (np.asarray(user_factors)[np.asarray(users)] @ np.asarray(item_factors).T).astype(np.float32)


# ------------------------------------------------------------------------------ the peers, each in its own process


def side_myfm(job: dict) -> dict:
    import numpy as np
    import scipy.sparse as sps
    from peers import import_myfm

    myfm, stubbed = import_myfm()
    settings = job["settings"]
    base = rss_bytes("VmRSS")
    stamps: list[float] = []

    def callback(*_):
        stamps.append(time.perf_counter())
        return False, None

    def one_hot(data, rows):
        n, num_users = len(rows), len(data["user_raw"])
        columns = np.stack([data["users"][rows], num_users + data["items"][rows]], 1).astype(np.int64)
        return sps.csr_matrix((np.ones(2 * n), columns.reshape(-1), np.arange(0, 2 * n + 1, 2)),
                              shape=(n, num_users + len(data["item_raw"])))

    start = time.perf_counter()
    data = explicit_data(read_ratings(job["path"]), job["seed"], job["valid_fraction"])
    model = myfm.MyFMRegressor(rank=settings["rank"], random_seed=job["seed"])
    fit_start = time.perf_counter()
    model.fit(one_hot(data, data["train"]), data["ratings"][data["train"]], n_iter=settings["n_iter"],
              n_kept_samples=settings["n_kept_samples"],
              group_shapes=[len(data["user_raw"]), len(data["item_raw"])], callback=callback)
    fit_s = time.perf_counter() - start
    peak = rss_bytes("VmHWM")
    iters = [b - a for a, b in zip([fit_start, *stamps], stamps)]
    predicted = model.predict(one_hot(data, data["valid"]))
    return {"fit_s": fit_s, **peer_timings(iters), **memory(base, peak),
            **rmse(predicted, data["ratings"][data["valid"]]), "threads": 1,
            "threads_note": "myFM 0.4.0's wheel samples on one thread (no OpenMP)", "pkg_resources_stub": stubbed}


def side_myfm_bfm(job: dict) -> dict:
    """myFM on relational blocks (Rendle 2013), as its documentation builds SVD++ and "flipped": one
    block per user (its id, then the items it rated in training, ``1/sqrt(n)`` each) and one per item
    (its id, then its raters), ``group_shapes`` one group per part."""
    import numpy as np
    import scipy.sparse as sps
    from peers import import_myfm

    myfm, stubbed = import_myfm()
    settings = job["settings"]
    base = rss_bytes("VmRSS")
    stamps: list[float] = []

    def callback(*_):
        stamps.append(time.perf_counter())
        return False, None

    def block(own, other, num_own, num_other, with_set):
        """CSR [num_own, num_own (+ num_other)]: the row's id, then its set (1/sqrt(size) each)."""
        identity = sps.identity(num_own, format="csr")
        if not with_set:
            return identity, [num_own]
        pairs = sps.csr_matrix((np.ones(len(own)), (own, other)), shape=(num_own, num_other))
        pairs.sum_duplicates()
        pairs.data[:] = 1.0
        sizes = np.asarray(pairs.sum(axis=1)).ravel()
        scale = sps.diags(1.0 / np.sqrt(np.maximum(sizes, 1.0)))
        return sps.hstack([identity, scale @ pairs], format="csr"), [num_own, num_other]

    start = time.perf_counter()
    data = explicit_data(read_ratings(job["path"]), job["seed"], job["valid_fraction"])
    train, valid = data["train"], data["valid"]
    num_users, num_items = len(data["user_raw"]), len(data["item_raw"])
    users, items = data["users"][train], data["items"][train]
    user_x, user_groups = block(users, items, num_users, num_items, settings["implicit"])
    item_x, item_groups = block(items, users, num_items, num_users, settings["flipped"])
    model = myfm.MyFMRegressor(rank=settings["rank"], random_seed=job["seed"])
    fit_start = time.perf_counter()
    model.fit(None, data["ratings"][train], X_rel=[myfm.RelationBlock(users.astype(np.int64), user_x),
                                                   myfm.RelationBlock(items.astype(np.int64), item_x)],
              group_shapes=user_groups + item_groups, n_iter=settings["n_iter"],
              n_kept_samples=settings["n_kept_samples"], callback=callback)
    fit_s = time.perf_counter() - start
    peak = rss_bytes("VmHWM")
    iters = [b - a for a, b in zip([fit_start, *stamps], stamps)]
    predicted = model.predict(None, X_rel=[myfm.RelationBlock(data["users"][valid].astype(np.int64), user_x),
                                           myfm.RelationBlock(data["items"][valid].astype(np.int64), item_x)])
    return {"fit_s": fit_s, **peer_timings(iters), **memory(base, peak),
            **rmse(predicted, data["ratings"][valid]), "threads": 1,
            "threads_note": "myFM 0.4.0's wheel samples on one thread (no OpenMP)", "pkg_resources_stub": stubbed}


def side_implicit_als(job: dict) -> dict:
    from implicit.cpu.als import AlternatingLeastSquares

    settings, threads = job["settings"], job["threads"]
    default_cg_steps = AlternatingLeastSquares().cg_steps
    base = rss_bytes("VmRSS")
    iters: list[float] = []
    start = time.perf_counter()
    protocol = implicit_protocol(read_ratings(job["path"]), job["seed"], job["threshold"], job["valid_fraction"])
    matrix = interaction_matrix(protocol)
    model = AlternatingLeastSquares(factors=settings["factors"], regularization=settings["regularization"],
                                    alpha=settings["alpha"], iterations=settings["iterations"],
                                    use_cg=settings["use_cg"], dtype="float32", num_threads=threads,
                                    random_state=job["seed"], calculate_training_loss=False)
    model.cg_steps = settings["cg_steps"]
    model.fit(matrix, show_progress=False, callback=lambda _iteration, elapsed, _loss: iters.append(elapsed))
    fit_s = time.perf_counter() - start
    peak = rss_bytes("VmHWM")
    return {"fit_s": fit_s, **peer_timings(iters), **memory(base, peak), "threads": threads,
            "implicit_default_cg_steps": default_cg_steps,
            **ranking(protocol, factor_scores(model.user_factors, model.item_factors))}


def side_implicit_bpr(job: dict) -> dict:
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    settings, threads = job["settings"], job["threads"]
    signature = inspect.signature(BayesianPersonalizedRanking.__init__)
    defaults = {name: p.default for name, p in signature.parameters.items() if name in IMPLICIT_BPR}
    base = rss_bytes("VmRSS")
    iters: list[float] = []
    start = time.perf_counter()
    protocol = implicit_protocol(read_ratings(job["path"]), job["seed"], job["threshold"], job["valid_fraction"])
    matrix = interaction_matrix(protocol)
    model = BayesianPersonalizedRanking(**settings, num_threads=threads, random_state=job["seed"])
    model.fit(matrix, show_progress=False, callback=lambda _epoch, elapsed, *_: iters.append(elapsed))
    fit_s = time.perf_counter() - start
    peak = rss_bytes("VmHWM")
    return {"fit_s": fit_s, **peer_timings(iters), **memory(base, peak), "threads": threads,
            "library_defaults": defaults, "settings_are_library_defaults": defaults == IMPLICIT_BPR,
            **ranking(protocol, factor_scores(model.user_factors, model.item_factors))}


def side_numpy_ease(job: dict) -> dict:
    import numpy as np

    base = rss_bytes("VmRSS")
    start = time.perf_counter()
    protocol = implicit_protocol(read_ratings(job["path"]), job["seed"], job["threshold"], job["valid_fraction"])
    matrix = interaction_matrix(protocol)
    solve_start = time.perf_counter()
    active = np.flatnonzero(np.asarray(matrix.sum(axis=0)).ravel() > 0)  # items with a training interaction
    x = matrix[:, active]
    gram = (x.T @ x).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += job["settings"]["ease_lambda"]
    p = np.linalg.inv(gram)
    b = np.eye(len(active)) - p / np.diag(p)[None, :]  # I - P diag(1 / diag P): zero diagonal
    solve_s = time.perf_counter() - solve_start
    fit_s = time.perf_counter() - start
    peak = rss_bytes("VmHWM")
    num_items = len(protocol["item_raw"])

    def score(users):
        out = np.zeros((len(users), num_items), np.float32)
        out[:, active] = x[np.asarray(users)] @ b
        return out

    return {"fit_s": fit_s, **peer_timings([solve_s]), **memory(base, peak), "threads": job["threads"],
            "threads_note": "BLAS threads (OPENBLAS/OMP/MKL_NUM_THREADS)", **ranking(protocol, score)}


def side_torch(job: dict) -> dict:
    import torch
    import torch.nn as nn

    from reference_torch import notebook as nb
    from reference_torch.train import build_model, build_optimizer

    settings, threads = job["settings"], job["threads"]
    torch.set_num_threads(threads)
    base = rss_bytes("VmRSS")
    stamps: list[float] = []
    start = time.perf_counter()
    frame, _, _ = nb.map_ids(nb.load_ratings(job["path"]))
    mask = nb.split_mask(len(frame), job["seed"], job["valid_fraction"])
    train_dl, valid_dl = nb.make_dataloaders(frame, mask, settings["batch_size"],
                                             generator=torch.Generator().manual_seed(43), num_workers=1)
    model = build_model("bias", int(frame["userId"].max()) + 1, int(frame["movieId"].max()) + 1,
                        settings["n_factors"], min_rating=float(frame["rating"].min()),
                        max_rating=float(frame["rating"].max()), generator=torch.Generator().manual_seed(job["seed"]))
    optimizer = build_optimizer(settings["optimizer"], model.parameters(), settings["learning_rate"],
                                settings["weight_decay"])
    fit_start = time.perf_counter()
    nb.fit(model, train_dl, settings["epochs"], optimizer, nn.MSELoss(), valid_dl,
           on_epoch=lambda *_: stamps.append(time.perf_counter()), verbose=False)
    fit_s = time.perf_counter() - start
    peak = rss_bytes("VmHWM")
    iters = [b - a for a, b in zip([fit_start, *stamps], stamps)]
    predicted = nb.predict(model, valid_dl)
    return {"fit_s": fit_s, **peer_timings(iters), **memory(base, peak), **rmse(predicted, frame["rating"][mask]),
            "threads": torch.get_num_threads(), "dataloader_workers": 1}


SIDES = {"jaxcf": side_jaxcf, "myfm": side_myfm, "myfm-bfm": side_myfm_bfm, "implicit-als": side_implicit_als,
         "implicit-bpr": side_implicit_bpr, "numpy-ease": side_numpy_ease, "torch": side_torch}


def peer_timings(iters: list[float]) -> dict:
    return {"iterations": len(iters), "per_iter_s": statistics.median(iters) if iters else None,
            "iter_s": iters}


def rss_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak so far) of this process, from /proc/self/status."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return machine.peak_rss_bytes()  # no /proc: ru_maxrss, the peak


def memory(base: int, peak: int) -> dict:
    return {"rss_after_imports_bytes": base, "peak_rss_bytes": peak, "peak_rss_above_imports_bytes": peak - base}


# ------------------------------------------------------------------------------ the parent: rows of jobs


@dataclasses.dataclass
class Row:
    """One row: the jaxcf config (per seed) and the peer's side, settings and thread counts."""

    name: str
    title: str
    metric: str  # "rmse" or "ndcg@20"
    config: str
    overrides: dict[int, list[str]]  # seed -> jaxcf overrides
    peer: str  # a key of SIDES
    peer_settings: dict
    peer_threads: tuple[int, ...]
    data: dict  # valid_fraction (and threshold for implicit rows)
    per_iter_key: str = "train_seconds"
    notes: tuple[str, ...] = ()


def build_rows(names: list[str], plan: Plan) -> list[Row]:
    rows = []
    for name in names:
        if name.startswith("bpmf"):
            config, overrides = jaxcf_bpmf(plan, int(name.split("-r")[1]))
            by_seed = {seed: [f"seed={seed}", *overrides] for seed in plan.seeds}
            cfg = resolved(config, by_seed[plan.seeds[0]])
            rows.append(Row(name, f"Gibbs BPMF F={cfg.model.n_factors} vs myFM rank {cfg.model.n_factors}", "rmse",
                            config, by_seed, "myfm",
                            {"rank": cfg.model.n_factors, "n_iter": cfg.train.epochs,
                             "n_kept_samples": cfg.ensemble.size, "group_shapes": "[num_users, num_items]"},
                            (1,), {"valid_fraction": cfg.data.valid_fraction},
                            notes=("myFM adds w0 and per-user/item biases and samples the noise precision; jaxcf "
                                   f"folds the mean in and fixes alpha {cfg.ensemble.noise_precision}",
                                   "myFM 0.4.0's wheel is single-threaded")))
        elif name == "bfm":
            overrides = (["train.epochs=20", "ensemble.size=15", "ensemble.burn_in=5"] if plan.quick else [])
            by_seed = {seed: last_only("bfm.yaml", [f"seed={seed}", *overrides]) for seed in plan.seeds}
            cfg = resolved("bfm.yaml", by_seed[plan.seeds[0]])
            groups = {group: bool(getattr(cfg.bfm, group)) for group in ("user", "item", "implicit", "flipped")}
            rows.append(Row(name, "Bayesian FM (" + " + ".join(g for g, on in groups.items() if on) + f") F="
                            f"{cfg.model.n_factors} vs myFM", "rmse", "bfm.yaml", by_seed, "myfm-bfm",
                            {"rank": cfg.model.n_factors, "n_iter": cfg.train.epochs,
                             "n_kept_samples": cfg.ensemble.size, **groups}, (1,),
                            {"valid_fraction": cfg.data.valid_fraction},
                            notes=("the same model and priors on both sides: relational blocks user | implicit "
                                   "items and item | flipped users, implicit sets from training pairs only",
                                   "myFM 0.4.0's wheel is single-threaded")))
        elif name in ("ials", "ials-cg"):
            config, overrides = jaxcf_ials(plan, cg=name == "ials-cg")
            cfg = resolved(config, overrides)
            rows.append(Row(name, f"iALS {'CG' if cfg.implicit.solver == 'cg' else 'exact'} vs implicit ALS", "ndcg@20",
                            config, {cfg.seed: overrides}, "implicit-als",
                            {"factors": cfg.model.n_factors, "regularization": cfg.implicit.regularization,
                             "alpha": 1 + cfg.implicit.alpha, "iterations": cfg.train.epochs,
                             "use_cg": cfg.implicit.solver == "cg", "cg_steps": cfg.implicit.cg_steps},
                            (1, 2), implicit_data(cfg),
                            notes=("implicit alpha = 1 + jaxcf alpha (implicit's confidence is alpha * r)",
                                   f"jaxcf reg_exponent {cfg.implicit.reg_exponent} (0: plain L2, as implicit)")))
        elif name == "bpr":
            default = resolved("bpr.yaml", [])
            learnbpr = hasattr(default.implicit, "negative_sampling")  # see jaxcf_bpr
            batch_size = default.train.batch_size
            by_seed = {seed: jaxcf_bpr(plan, seed, batch_size, learnbpr)[1] for seed in plan.seeds}
            cfg = resolved("bpr.yaml", by_seed[plan.seeds[0]])
            sgd = (f"sgd per triple, lr {cfg.optim.learning_rate} (implicit's)" if learnbpr else
                   f"sgd on the mean over batches of {batch_size}, lr {cfg.optim.learning_rate} = implicit's 0.01 "
                   "per sample")
            negatives = ("negatives drawn as implicit draws them (a random interaction's item) and verified"
                         if learnbpr else "negatives: implicit draws them from random interactions' items "
                         "(popularity) and skips liked ones; jaxcf uniform over all items")
            rows.append(Row(name, "BPR vs implicit BPR (its defaults)", "ndcg@20", "bpr.yaml", by_seed,
                            "implicit-bpr", {**IMPLICIT_BPR, "iterations": cfg.train.epochs}, (1, 2),
                            implicit_data(cfg),
                            notes=(f"jaxcf: {sgd}; l2 {cfg.implicit.l2} (loss l2*|row|^2) = implicit's reg 0.01 "
                                   "(gradient reg*row)", negatives,
                                   "seed also picks jaxcf's split: each seed is one split, shared by both sides")))
        elif name == "ease":
            config, overrides = jaxcf_ease(plan)
            cfg = resolved(config, overrides)
            rows.append(Row(name, "EASE vs NumPy/SciPy reference", "ndcg@20", config, {cfg.seed: overrides},
                            "numpy-ease", {"ease_lambda": cfg.implicit.ease_lambda}, (1, 2), implicit_data(cfg),
                            notes=("one solve: per_iter_s is the solve (Gram, inverse, B) on both sides",
                                   "jaxcf's NumPy solve runs with NumPy's default BLAS threads")))
        elif name == "bias":
            config, overrides = jaxcf_bias(plan)
            cfg = resolved(config, overrides)
            rows.append(Row(name, "notebook bias model vs PyTorch port", "rmse", config, {cfg.seed: overrides},
                            "torch", {"n_factors": cfg.model.n_factors, "optimizer": cfg.optim.name,
                                      "learning_rate": cfg.optim.learning_rate,
                                      "weight_decay": cfg.optim.weight_decay, "batch_size": cfg.train.batch_size,
                                      "epochs": cfg.train.epochs}, (1, 2),
                            {"valid_fraction": cfg.data.valid_fraction}, per_iter_key="seconds",
                            notes=("per_iter_s includes each epoch's validation on both sides",)))
    return rows


def implicit_data(cfg) -> dict:
    return {"valid_fraction": cfg.data.valid_fraction, "threshold": cfg.data.implicit_threshold}


def child_env(side: str, threads: int | None, cache: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env["TQDM_DISABLE"] = "1"  # myFM always draws a bar
    if side in ("implicit-als", "implicit-bpr"):
        env.update(OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")  # implicit's advice; num_threads does the work
    elif side in ("myfm", "myfm-bfm", "numpy-ease", "torch"):
        env.update({var: str(threads or 1) for var in THREAD_VARS})
    else:  # jaxcf: every default; its compilation cache only where a run names one (cold, then warm)
        env["JAXCF_COMPILATION_CACHE"] = cache or "off"
    return env


def run_side(job: dict, threads: int | None) -> dict:
    """One side in a fresh process; its result, or ``{"error": ...}``."""
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps({**job, "threads": threads}))
        load = machine.load_average()
        try:
            done = subprocess.run([sys.executable, __file__, "--job", str(job_path), "--out", str(out_path)],
                                  cwd=ROOT, env=child_env(job["side"], threads, job.get("cache")),
                                  stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, timeout=SIDE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {SIDE_TIMEOUT_S} s", "threads": threads}
        if done.returncode != 0 or not out_path.is_file():
            return {"error": f"exit {done.returncode}: {done.stderr.strip()[-1500:]}", "threads": threads}
        return {**json.loads(out_path.read_text()), "load_average_before": load,
                "load_average_after": machine.load_average()}


def run_cli(config: str, overrides: list[str], cache: str) -> dict:
    """Wall seconds and peak RSS (``wait4``) of the training command a user types, with its compilation
    cache in ``cache``."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "jaxcf.train", "--config", config, "--set", *overrides, f"data.path={RATINGS}",
               "--quiet", "--workdir", str(Path(tmp) / "run")]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env("jaxcf", None, cache), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        watchdog = threading.Timer(SIDE_TIMEOUT_S, proc.kill)
        watchdog.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        watchdog.cancel()
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
        code = os.waitstatus_to_exitcode(status)
        shown = " ".join(Path(c).name if c == sys.executable else c for c in cmd[:-2])
        if code != 0:
            return {"command": shown, "error": f"exit {code}: {stderr.strip()[-1500:]}"}
        return {"command": shown + " --workdir TMP", "cli_s": seconds, "cli_peak_rss_bytes": usage.ru_maxrss * 1024}


AGGREGATED = ("fit_s", "per_iter_s", "compile_s", "first_iter_s", "train_s_total", "per_epoch_with_record_s",
              "peak_rss_above_imports_bytes",
              "peak_rss_bytes", "rmse", "mae", "ndcg@20", "recall@20", "map@20", "jaxcf_history_metric")


def aggregate(runs: list[dict]) -> dict:
    """Mean (and sample std over seeds) of each figure; the runs themselves under ``runs``."""
    good = [r for r in runs if "error" not in r]
    out: dict = {"runs": runs}
    if len(good) < len(runs):
        out["error"] = "; ".join(r["error"] for r in runs if "error" in r)
    for key in AGGREGATED:
        values = [r[key] for r in good if r.get(key) is not None]
        if values and len(values) == len(good):
            out[key] = statistics.fmean(values)
            if len(values) > 1:
                out[key + "_std"] = statistics.stdev(values)
    if good:
        out["threads"] = good[0].get("threads")
    return out


def run_row(row: Row, path: str, cli: bool, say, peers: bool = True) -> dict:
    base_job = {"path": path, "metric": row.metric, **row.data}
    cache = tempfile.mkdtemp(prefix="jaxcf-xla-")  # this row's persistent compilation cache, empty now
    jaxcf_runs = []
    seeds = list(row.overrides)

    def jaxcf_run(seed):
        overrides = row.overrides[seed]
        say(f"  jaxcf  {row.config} {' '.join(overrides)}")
        return run_side({**base_job, "side": "jaxcf", "seed": seed, "config": row.config, "overrides": overrides,
                         "per_iter_key": row.per_iter_key, "cache": cache}, None)

    cold = jaxcf_run(seeds[0])  # the cache is empty: every program compiles
    for seed in seeds:  # new processes, the cache filled: what a second run of the config costs
        jaxcf_runs.append(jaxcf_run(seed))
    by_threads = {}
    for threads in row.peer_threads if peers else ():
        runs = []
        for seed in row.overrides:
            say(f"  {row.peer}  threads {threads}  seed {seed}")
            runs.append(run_side({**base_job, "side": row.peer, "seed": seed, "settings": row.peer_settings}, threads))
        by_threads[threads] = aggregate(runs)
    timed = {t: a for t, a in by_threads.items() if "fit_s" in a and "error" not in a}
    best = min(timed, key=lambda t: timed[t]["fit_s"]) if timed else row.peer_threads[0]
    result = {"title": row.title, "metric_name": row.metric, "config": row.config,
              "overrides_by_seed": {str(s): o for s, o in row.overrides.items()}, "seeds": list(row.overrides),
              "peer": row.peer, "peer_settings": row.peer_settings, "notes": list(row.notes),
              "jaxcf": aggregate(jaxcf_runs), "jaxcf_cold": cold, "peer_best_threads": best if peers else None,
              "peer_result": by_threads[best] if peers else {"skipped": "--sides jaxcf"},
              "peer_by_threads": {str(t): a for t, a in by_threads.items()}}
    if cli:
        first_seed = next(iter(row.overrides))
        say(f"  CLI    {row.config} (seed {first_seed})")
        cli_cache = tempfile.mkdtemp(prefix="jaxcf-xla-cli-")
        result["cli_cold"] = run_cli(row.config, row.overrides[first_seed], cli_cache)
        result["cli"] = run_cli(row.config, row.overrides[first_seed], cli_cache)
    jax_side, peer_side = result["jaxcf"], result["peer_result"]
    for key in ("fit_s", "per_iter_s"):
        if jax_side.get(key) and peer_side.get(key):
            result[f"ratio_{key}"] = jax_side[key] / peer_side[key]
    if cold.get("fit_s") and peer_side.get("fit_s"):
        result["ratio_fit_s_cold"] = cold["fit_s"] / peer_side["fit_s"]
    if jax_side.get("peak_rss_above_imports_bytes") and peer_side.get("peak_rss_above_imports_bytes"):
        result["ratio_peak_rss"] = jax_side["peak_rss_above_imports_bytes"] / peer_side["peak_rss_above_imports_bytes"]
    shutil.rmtree(cache, ignore_errors=True)
    if cli:
        shutil.rmtree(cli_cache, ignore_errors=True)
    if "cli_s" in result.get("cli", {}) and jax_side.get("fit_s"):
        result["cli_over_fit"] = result["cli"]["cli_s"] / jax_side["fit_s"]
    return result


# ------------------------------------------------------------------------------ output


def fmt(value, spec: str, std=None) -> str:
    if value is None:
        return "-"
    text = format(value, spec)
    return text + (f"±{format(std, spec)}" if std is not None else "")


def print_table(rows: dict) -> None:
    head = (f"{'row':<9} {'jaxcf fit s':>12} {'cold':>6} {'peer fit s':>11} {'ratio':>6} | {'jaxcf/iter':>10} "
            f"{'peer/iter':>10} "
            f"{'ratio':>6} | {'compile':>7} {'CLI s':>6} | {'metric':<8} {'jaxcf':>14} {'peer':>14} | "
            f"{'RSS MB jaxcf':>12} {'peer':>6} | thr")
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        j, p = r["jaxcf"], r["peer_result"]
        metric = r["metric_name"]
        print(f"{name:<9} {fmt(j.get('fit_s'), '.2f'):>12} {fmt(r.get('jaxcf_cold', {}).get('fit_s'), '.1f'):>6} "
              f"{fmt(p.get('fit_s'), '.2f'):>11} "
              f"{fmt(r.get('ratio_fit_s'), '.1f'):>6} | {fmt(j.get('per_iter_s'), '.4f'):>10} "
              f"{fmt(p.get('per_iter_s'), '.4f'):>10} {fmt(r.get('ratio_per_iter_s'), '.1f'):>6} | "
              f"{fmt(j.get('compile_s'), '.2f'):>7} {fmt(r.get('cli', {}).get('cli_s'), '.1f'):>6} | "
              f"{metric:<8} {fmt(j.get(metric), '.4f', j.get(metric + '_std')):>14} "
              f"{fmt(p.get(metric), '.4f', p.get(metric + '_std')):>14} | "
              f"{fmt(j.get('peak_rss_above_imports_bytes', 0) / MB, '.0f'):>12} "
              f"{fmt(p.get('peak_rss_above_imports_bytes', 0) / MB, '.0f'):>6} | {r.get('peer_best_threads')}")
        for side, figures in (("jaxcf", j), ("peer", p)):
            if "error" in figures:
                print(f"          {side} failed: {figures['error'].splitlines()[-1][:200]}")
    sys.stdout.flush()


def print_breakdown(rows: dict) -> None:
    """Where jaxcf's whole fit goes: training epochs, the rest (loading, compiling, records, export)."""
    print(f"\n{'row':<9} {'jaxcf fit s':>11} {'of it training':>14} {'1st epoch':>9} {'epoch+record':>12} "
          f"{'CLI s':>6} {'CLI peak MB':>11}")
    for name, r in rows.items():
        j, cli = r["jaxcf"], r.get("cli", {})
        peak = cli.get("cli_peak_rss_bytes")
        print(f"{name:<9} {fmt(j.get('fit_s'), '.2f'):>11} {fmt(j.get('train_s_total'), '.2f'):>14} "
              f"{fmt(j.get('first_iter_s'), '.2f'):>9} {fmt(j.get('per_epoch_with_record_s'), '.4f'):>12} "
              f"{fmt(cli.get('cli_s'), '.1f'):>6} {fmt(peak / MB if peak else None, '.0f'):>11}")
    sys.stdout.flush()


def git_state() -> dict:
    """The commit measured, and how many tracked files differed from it (the library was being edited)."""
    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"),
            "tracked_files_modified": None if status is None else len(status.splitlines())}


def parse_rows(text: str) -> list[str]:
    wanted = [v.strip() for v in text.split(",") if v.strip()]
    chosen = [name for name in ROW_NAMES if any(name == w or name.startswith(w + "-") for w in wanted)]
    unknown = [w for w in wanted if not any(n == w or n.startswith(w + "-") for n in ROW_NAMES)]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown row(s) {','.join(unknown) or text!r}; choose from "
                                         f"{','.join(ROW_NAMES)} (bpmf selects both ranks)")
    return chosen


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=parse_rows, default=list(ROW_NAMES), help=f"any of {','.join(ROW_NAMES)}")
    parser.add_argument("--quick", action="store_true", help="few sweeps/epochs, one seed: for development only")
    parser.add_argument("--no-cli", action="store_true", help="skip timing python -m jaxcf.train")
    parser.add_argument("--sides", choices=("both", "jaxcf"), default="both",
                        help="jaxcf: time jaxcf's side of each row only (a machine without the peers, e.g. a GPU's)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)  # internal: one side, in a child process
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.job is not None:
        job = json.loads(args.job.read_text())
        args.out.write_text(json.dumps(SIDES[job["side"]](job), default=float))
        return 0
    if not RATINGS.is_file():
        print(f"{RATINGS}: the bundled ratings file is missing", file=sys.stderr)
        return 2
    plan = Plan(quick=args.quick)
    load_before = machine.load_average()
    checkout = git_state()  # at the start: the library may change while the rows run
    start = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f}s] {text}", file=sys.stderr, flush=True)

    results = {}
    for row in build_rows(args.rows, plan):
        say(f"{row.name}: {row.title}")
        results[row.name] = run_row(row, str(RATINGS), not args.no_cli, say, peers=args.sides == "both")
        if args.json:  # after each row, so an interrupted run keeps what it measured
            partial = args.json.with_suffix(args.json.suffix + ".partial")
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"complete": False, "rows": results}, indent=2, default=float) + "\n")
    print()
    print_table(results)
    print_breakdown(results)
    failed = any("error" in r["jaxcf"] or "error" in r["peer_result"] or "error" in r.get("cli", {})
                 for r in results.values())
    if args.json:
        record = {"benchmark": "vs_peers", "command": " ".join([Path(sys.executable).name, *sys.argv]),
                  "quick": args.quick, "sides": args.sides, "jaxcf_checkout": checkout,
                  "ratings": str(RATINGS.relative_to(ROOT)),
                  "wall_s": time.perf_counter() - start,
                  "how_to_read": "ratio_* = jaxcf / peer (above 1: jaxcf slower); one run on a shared host",
                  "threads": {"jaxcf": "XLA default (NumPy default BLAS for EASE)",
                              "implicit": "num_threads 1 and 2, best reported; OPENBLAS_NUM_THREADS=1",
                              "myfm": "1: myFM 0.4.0's wheel is single-threaded (no OpenMP)",
                              "torch": "1 and 2 intra-op threads, best reported; one DataLoader worker",
                              "numpy-ease": "1 and 2 BLAS threads, best reported"},
                  "rows": results}
        machine.write_json(args.json, record, load_before, "jax", "jaxlib", "implicit", "myfm", "torch", "numpy",
                           "scipy", "pandas")
        args.json.with_suffix(args.json.suffix + ".partial").unlink(missing_ok=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
