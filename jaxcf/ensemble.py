"""Ensembles as a model: training K members, exporting them as one model, reading them back, scoring.

``python -m jaxcf.train`` hands a config here when :func:`jaxcf.config.uses_ensemble_trainer` says so
(``ensemble.size > 1``, ``ensemble.method: gibbs``, ``optim.row_l2 > 0`` or a non-constant
``optim.schedule``). Two ways to get members:

- ``seeds``: K SGD models with seeds ``seed, seed + 1, ...`` trained side by side in one vmapped
  program (``jaxcf.members.fit_members``) on one data split. ``train.early_stopping_patience`` watches
  the *ensemble's* validation RMSE and exports the parameters of its best epoch.
- ``gibbs``: K posterior samples of Bayesian MF (``jaxcf.gibbs``), each a dot model with the mean
  rating folded in.

The export is the usual ``WORKDIR/model`` folder (``jaxcf.export``) with every table stacked along a
leading member axis (``user_embedding`` float32[K, U, F], ...), and ``metadata.json["model"]`` holding
``ensemble_size`` K and ``ensemble_method``. The ensemble's prediction is the mean of the members'
predictions (for biased members, the mean of their scaled sigmoids). The last record of
``metrics.jsonl`` (``"final": true``) is the exported ensemble's, with ranking metrics
(``jaxcf.ranking``) beside RMSE.

Ensemble runs write no resumable checkpoints: ``--resume`` is refused with a one-line error.

What does not live here: the single-model loop (``jaxcf.train``), the vmapped trainer
(``jaxcf.members``), the sampler (``jaxcf.gibbs``), inference for raw ids (``jaxcf.recommend``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf import export, gibbs, members, models, ranking, train
from jaxcf.config import Config, ConfigError, dump, to_dict
from jaxcf.data import Dataset
from jaxcf.data import load as load_dataset
from jaxcf.fileio import atomic_write_text


@dataclasses.dataclass
class Trained:
    """Members ready to export.

    Attributes:
      params: stacked tables, ``name -> float32[K, rows, d]`` (numpy).
      kind: the members' model kind (``dot`` or ``bias``).
      y_range: the biased members' output range; None for dot members.
      history: one metrics record per epoch (per sweep for gibbs).
      epoch: the epoch whose parameters are exported.
      stopped_early: whether early stopping ended the run.
    """

    params: dict[str, np.ndarray]
    kind: str
    y_range: tuple[float, float] | None
    history: list[dict]
    epoch: int
    stopped_early: bool = False

    @property
    def size(self) -> int:
        return int(next(iter(self.params.values())).shape[0])


def seed_members(config: Config) -> list[members.Member]:
    """The ``ensemble.size`` members of a seeds ensemble: the config with seeds seed, seed+1, ..."""
    return [
        members.Member(dataclasses.replace(config, seed=config.seed + k), {"seed": config.seed + k})
        for k in range(config.ensemble.size)
    ]


def fit(
    config: Config, dataset: Dataset, *, on_epoch: Callable[[dict], None] | None = None, show_progress: bool = False
) -> Trained:
    """Trains the ensemble ``config`` describes on ``dataset``'s split.

    Raises:
      ConfigError: settings this trainer cannot honour (a device mesh, several processes).
      train.TrainingDiverged: when a seeds member's loss becomes NaN or infinite.
    """
    if config.mesh.data * config.mesh.model > 1 or (config.distributed.num_processes or 1) > 1:
        raise ConfigError("ensembles train on one device in one process; set mesh.data and mesh.model to 1")
    if config.ensemble.method == "gibbs":
        result = gibbs.fit(config, dataset, on_epoch=on_epoch)
        return Trained(result.members, "dot", None, result.history, len(result.history))
    seeds = seed_members(config)
    fitted = members.fit_members(config, dataset, seeds, on_epoch=on_epoch, show_progress=show_progress)
    if fitted.diverged.any():
        bad = ", ".join(str(m.config.seed) for m, d in zip(seeds, fitted.diverged) if d)
        raise train.TrainingDiverged(
            f"training diverged for the member(s) with seed {bad}; lower optim.learning_rate"
        )
    use_best = fitted.best_params is not None
    params = fitted.best_params if use_best else fitted.state.params
    y_range = train.make_setup(config, dataset).y_range
    return Trained(
        {name: np.asarray(table, np.float32) for name, table in jax.device_get(params).items()},
        config.model.kind, y_range, fitted.history,
        fitted.best_epoch if use_best else len(fitted.history), fitted.stopped_early,
    )


# ----------------------------------------------------------------------------------- scoring


@functools.partial(jax.jit, static_argnames=("y_range",))
def score_pairs(params: Mapping[str, jax.Array], users: jax.Array, items: jax.Array, y_range) -> jax.Array:
    """The ensemble's predictions for index pairs: the mean of its members'.

    Args:
      params: stacked tables (float32[K, rows, d]); a single model's (float32[rows, d]) also works.
      users, items: int32[n] indices.
      y_range: the biased members' output range; None for dot members.

    Returns:
      float32[n].
    """

    def one(p):
        return models.score_rows(models.gather_rows(p, users, items), y_range)

    if params["user_embedding"].ndim == 3:
        return jnp.mean(jax.vmap(one)(params), axis=0)
    return one(params)


def predict_pairs(
    params: Mapping[str, Any], y_range, users: np.ndarray, items: np.ndarray, chunk: int = 65536
) -> np.ndarray:
    """:func:`score_pairs` over any number of pairs, in fixed-size chunks; float32[n] on the host."""
    device_params = {name: jnp.asarray(table, jnp.float32) for name, table in params.items()}
    y = tuple(float(v) for v in y_range) if y_range is not None else None
    n = len(users)
    chunk = max(1, min(chunk, n))
    out = np.empty(n, np.float32)
    for start in range(0, n, chunk):
        u, i = users[start : start + chunk], items[start : start + chunk]
        size = len(u)
        u, i = np.pad(u, (0, chunk - size)), np.pad(i, (0, chunk - size))
        out[start : start + size] = np.asarray(score_pairs(device_params, jnp.asarray(u, jnp.int32),
                                                           jnp.asarray(i, jnp.int32), y))[:size]
    return out


def final_metrics(trained: Trained, dataset: Dataset) -> dict[str, float]:
    """The exported ensemble's validation RMSE/MAE and ranking metrics, scored as a loader scores it."""
    ratings = dataset.ratings
    train_rows, valid_rows = dataset.split.train, dataset.split.valid
    targets = ratings.ratings[valid_rows].astype(np.float64)
    predictions = predict_pairs(trained.params, trained.y_range, ratings.users[valid_rows], ratings.items[valid_rows])
    diff = predictions.astype(np.float64) - targets
    metrics = {"valid_mse": float(np.mean(diff**2)), "valid_mae": float(np.mean(np.abs(diff)))}
    metrics["valid_rmse"] = math.sqrt(metrics["valid_mse"])
    metrics.update(ranking.model_ranking_metrics(
        trained.params, trained.y_range, ratings.num_items,
        (ratings.users[train_rows], ratings.items[train_rows]),
        (ratings.users[valid_rows], ratings.items[valid_rows], ratings.ratings[valid_rows]),
    ))
    return metrics


# ----------------------------------------------------------------------------------- export


def export_ensemble(trained: Trained, config: Config, dataset: Dataset, workdir: Path) -> Path:
    """Writes ``WORKDIR/model`` with stacked tables and ``ensemble_size`` in its metadata."""
    ratings = dataset.ratings
    train_rows = dataset.split.train
    width = next(t.shape[2] for n, t in trained.params.items() if n == "user_embedding")
    return export.export_model(
        workdir,
        params=trained.params,
        user_ids=ratings.user_ids.raw,
        item_ids=ratings.item_ids.raw,
        train_users=ratings.users[train_rows],
        train_items=ratings.items[train_rows],
        config=to_dict(config),
        model_info={
            "kind": trained.kind,
            "n_factors": int(width),
            "y_range": list(trained.y_range) if trained.y_range else None,
            "num_users": ratings.num_users,
            "num_items": ratings.num_items,
            "epoch": trained.epoch,
            "ensemble_size": trained.size,
            "ensemble_method": config.ensemble.method,
        },
        data_info={
            "source": ratings.source,
            "sha256": ratings.sha256,
            "num_ratings": len(ratings),
            "num_train": len(train_rows),
            "num_valid": len(dataset.split.valid),
            "split": dataset.split.name,
        },
        metrics=trained.history,
        titles=dataset.titles,
    )


def read_ensemble(path: str | Path) -> export.Export:
    """Reads and verifies an exported ensemble (every file checked against its sha256).

    Returns:
      An :class:`jaxcf.export.Export` whose ``weights`` are stacked: float32[K, rows, d].

    Raises:
      jaxcf.export.ModelError: a missing or tampered file, or tables whose shapes do not fit
        ``ensemble_size``, the id tables or each other.
    """
    # The verified reading of jaxcf.export, minus its 2-D table check; the checks below replace it.
    folder = export.find_export(path)
    metadata = export._read_metadata(folder)
    payloads = export._read_verified(folder, metadata)

    def bad(message: str) -> export.ModelError:
        return export.ModelError(f"{folder}: {message}; re-export the model")

    model = metadata.get("model") or {}
    size, kind = model.get("ensemble_size"), model.get("kind")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise bad(f"metadata.json model.ensemble_size must be an integer >= 1 for an ensemble; got {size!r}")
    if kind not in export.TABLES:
        raise bad(f"unknown model kind {kind!r} in metadata.json")
    weights = export._load_tensors(folder, "weights.safetensors", payloads["weights.safetensors"])
    missing = [t for t in export.TABLES[kind] if t not in weights]
    if missing:
        raise bad(f"weights.safetensors lacks {', '.join(missing)} for a {kind!r} ensemble")
    weights = {t: np.asarray(weights[t], np.float32) for t in export.TABLES[kind]}
    user_ids, item_ids = export._read_ids(payloads, bad)
    rows = {"user_embedding": len(user_ids), "item_embedding": len(item_ids),
            "user_bias": len(user_ids), "item_bias": len(item_ids)}
    width = weights["user_embedding"].shape[-1]
    for name, table in weights.items():
        expected = (size, rows[name], width if name.endswith("embedding") else 1)
        if table.shape != expected:
            raise bad(f"{name} has shape {table.shape}, expected {expected} (ensemble_size, ids, width)")
    if kind == "bias":
        y_range = model.get("y_range")
        if not (isinstance(y_range, list) and len(y_range) == 2 and y_range[0] < y_range[1]):
            raise bad(f"a bias ensemble needs model.y_range [low, high] in metadata.json; got {y_range!r}")
    seen_users, seen_items = export._read_seen(folder, payloads, len(user_ids), len(item_ids), bad)
    titles = export._read_titles(payloads, bad)
    return export.Export(folder, metadata, weights, user_ids, item_ids, seen_users, seen_items, titles)


def is_ensemble(path: str | Path) -> bool:
    """Whether the export at ``path`` (a workdir or its model folder) declares an ``ensemble_size``.

    Raises:
      jaxcf.export.ModelError: when there is no readable export there.
    """
    folder = export.find_export(path)
    try:
        metadata = json.loads((folder / export.METADATA).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # read_export reports what is wrong with it
    return isinstance(metadata, dict) and isinstance(metadata.get("model"), dict) and \
        metadata["model"].get("ensemble_size") is not None


def read_any(path: str | Path) -> export.Export:
    """:func:`read_ensemble` for an ensemble, :func:`jaxcf.export.read_export` for a single model."""
    return read_ensemble(path) if is_ensemble(path) else export.read_export(path)


def member_summary(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """2-D stand-ins of an ensemble's tables for what is not a prediction (similar items, bias rankings).

    Embeddings: each member's rows scaled to unit length and set side by side ([rows, K * F]), so the
    cosine of two rows is the mean of the members' cosines (a row that is zero in a member contributes
    0 there). Biases: the members' mean.
    """
    out = {}
    for name, table in weights.items():
        if name.endswith("embedding"):
            norms = np.linalg.norm(table, axis=2, keepdims=True)
            unit = table / np.maximum(norms, 1e-12)
            out[name] = np.concatenate(list(unit), axis=1) / math.sqrt(table.shape[0])
        else:
            out[name] = table.mean(axis=0)
    return out


# ----------------------------------------------------------------------------------- run


def run(
    config: Config,
    workdir: Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    dataset: Dataset | None = None,
    out=None,
) -> train.Progress:
    """Trains the ensemble ``config`` describes into ``workdir``: config.yaml, metrics.jsonl, model/.

    The contract of :func:`jaxcf.train.run`, without checkpoints.

    Raises:
      ConfigError, DataError, train.WorkdirError: before anything is written.
      train.TrainingDiverged: a member's loss became NaN or infinite.
    """
    out = out if out is not None else sys.stdout
    if resume:
        raise train.WorkdirError(
            "--resume: ensemble runs write no checkpoints to continue from; start a new run in a fresh --workdir"
        )
    if workdir.exists() and not workdir.is_dir():
        raise train.WorkdirError(f"--workdir {workdir}: exists and is not a directory; choose another path")
    if workdir.exists() and any((workdir / n).exists() for n in ("config.yaml", "metrics.jsonl", "model")):
        raise train.WorkdirError(f"workdir {workdir} already holds a run; choose a new --workdir")
    dataset = dataset if dataset is not None else load_dataset(config.data, config.seed)
    workdir.mkdir(parents=True, exist_ok=True)
    with train.workdir_lock(workdir):
        atomic_write_text(workdir / "config.yaml", dump(config))
        history: list[dict] = []
        print(train.HEADER, file=out)

        def on_epoch(record: dict) -> None:
            history.append(record)
            print(train.format_row(record), file=out, flush=True)
            _write_metrics(workdir, history)

        start = time.perf_counter()
        trained = fit(config, dataset, on_epoch=on_epoch, show_progress=not quiet and sys.stderr.isatty())
        train_seconds = time.perf_counter() - start
        # The closing record is the exported ensemble's, scored exactly as a loaded model scores it,
        # with the ranking metrics beside RMSE: the last epoch's record completed, or, when early
        # stopping exported an earlier epoch, a copy of that epoch's record completed and appended.
        exported = next(r for r in reversed(history) if r["epoch"] == trained.epoch)
        final = {**exported, "final": True, "members": trained.size, **final_metrics(trained, dataset),
                 "train_seconds_total": train_seconds}
        trained.history = [*history[:-1], final] if exported is history[-1] else [*history, final]
        _write_metrics(workdir, trained.history)
        export_ensemble(trained, config, dataset, workdir)
    print(
        f"ensemble of {trained.size} ({config.ensemble.method}): valid_rmse {final['valid_rmse']:.4f}  "
        f"valid_mae {final['valid_mae']:.4f}  precision@10 {final['precision@10']:.4f}  "
        f"recall@10 {final['recall@10']:.4f}  ndcg@10 {final['ndcg@10']:.4f}",
        file=out,
    )
    best = min(trained.history, key=lambda r: r["valid_rmse"])
    return train.Progress(
        epoch=len(history), history=trained.history, best_epoch=int(best["epoch"]), best_rmse=best["valid_rmse"],
        stopped_early=trained.stopped_early,
    )


def _write_metrics(workdir: Path, history: list) -> None:
    atomic_write_text(workdir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))

