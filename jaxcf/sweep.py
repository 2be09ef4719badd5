"""Many models in one compiled program: K SGD models trained side by side with ``jax.vmap``, and the
sweep CLI.

    python -m jaxcf.sweep --config C [--grid KEY=V1,V2,... ...] [--seeds N] [--set KEY=VALUE ...]
                          [--holdout FRACTION] [--out results.json] [--quiet]

Each member is a full config (the base config with one grid point and one seed applied). Members that
differ only in *vmapped* keys (the seed and the continuous optimizer hyper-parameters in
:data:`VMAPPED`) train in one jitted program: one ``lax.scan`` per epoch over a ``vmap`` of the train
step, with ``learning_rate``, ``weight_decay``, ``b1``, ``b2`` and ``eps`` held per member in the
optimizer state (``optax.inject_hyperparams``) and ``row_l2`` passed per member. A grid over any other
key (``model.n_factors``, ``train.batch_size``, ...) compiles one program per distinct value.

A member with seed ``s`` starts from exactly the parameters and batch order that ``python -m
jaxcf.train`` uses with ``seed: s``; the data split always comes from the *base* config's seed, so
every member sees the same training and validation rows. ``--holdout F`` replaces the validation
rows with a random fraction F of the training rows (the real validation rows are then not used at
all), for choosing hyper-parameters without looking at the split one reports.

What does not live here: the single-model loop (``jaxcf.train``), ensemble workdirs and exports
(``jaxcf.ensemble``), Gibbs sampling (``jaxcf.gibbs``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from jaxcf import evaluate, models, train
from jaxcf.config import Config, ConfigError, apply_overrides, from_dict, load, read_yaml, resolve_path, to_dict
from jaxcf.data import DataError, Dataset, Split
from jaxcf.data import load as load_dataset
from jaxcf.fileio import atomic_write_text

# Keys whose values may differ between the members of one compiled program (besides the seed).
VMAPPED = ("optim.learning_rate", "optim.weight_decay", "optim.row_l2", "optim.b1", "optim.b2", "optim.eps")
# The injected optimizer hyper-parameters (a subset of VMAPPED, by their optax names).
INJECTED = ("learning_rate", "weight_decay", "b1", "b2", "eps")


def _adamw(learning_rate, weight_decay, b1, b2, eps) -> optax.GradientTransformation:
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def _adam(learning_rate, weight_decay, b1, b2, eps) -> optax.GradientTransformation:
    # Coupled L2, as torch.optim.Adam(weight_decay=...) and jaxcf.optim.dense("adam").
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))


FACTORIES: dict[str, Callable[..., optax.GradientTransformation]] = {"adamw": _adamw, "adam": _adam}


def schedule_multiplier(name: str, total_steps: int) -> optax.Schedule:
    """The learning-rate multiplier of ``optim.schedule`` over ``total_steps`` optimizer steps."""
    if name == "constant":
        return optax.constant_schedule(1.0)
    if name == "cosine":
        return optax.cosine_decay_schedule(1.0, total_steps)
    if name == "onecycle":
        return optax.cosine_onecycle_schedule(total_steps, 1.0)
    raise ConfigError(f"optim.schedule: unknown value {name!r}; allowed: constant, cosine, onecycle")


def make_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """The member optimizer: ``optim.name`` with its hyper-parameters injected into the state, then the
    schedule's multiplier (which scales the decoupled decay too, as torch's schedulers do).

    Raises:
      ConfigError: for an optimizer that cannot be vmapped (the row-sparse ones).
    """
    factory = FACTORIES.get(config.optim.name)
    if factory is None:
        raise ConfigError(
            f"optim.name {config.optim.name!r}: models trained side by side use adam or adamw; "
            f"the row-sparse optimizers hold their hyper-parameters outside the state"
        )
    hyper = {name: getattr(config.optim, name) for name in INJECTED}
    multiplier = schedule_multiplier(config.optim.schedule, steps_per_epoch * config.train.epochs)
    return optax.chain(optax.inject_hyperparams(factory)(**hyper), optax.scale_by_schedule(multiplier))


def make_member_step(tx: optax.GradientTransformation, y_range: tuple[float, float] | None) -> Callable:
    """A pure ``(state, row_l2, users, items, ratings, weights) -> (state, mse)`` for one member.

    The loss is ``jaxcf.train.weighted_mse`` plus ``row_l2 * sum(w * |row|^2) / sum(w)`` over every
    gathered row (the user's and the item's embedding and bias): Surprise-style L2 on the rows the batch
    touches, once per rating. With ``row_l2 = 0`` the gradient is exactly that of ``jaxcf.train``.
    The returned loss is the MSE alone, as ``jaxcf.train`` reports it.
    """

    def step(state, row_l2, users, items, ratings, weights):
        def loss_fn(params):
            rows = models.gather_rows(params, users, items)
            mse = train.weighted_mse(models.score_rows(rows, y_range), ratings, weights)
            penalty = sum(jnp.sum(weights[:, None] * row * row) for row in rows.values()) / jnp.sum(weights)
            return mse + row_l2 * penalty, mse

        (_, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return train.TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), mse

    return step


def make_members_epoch(tx: optax.GradientTransformation, y_range, batch_size: int) -> Callable:
    """A jitted ``(state[K], row_l2 float32[K], users, items, ratings, orders int32[K, n]) ->
    (state[K], float32[K, num_batches] losses)``: one epoch of K members, one ``lax.scan`` over a
    ``vmap`` of the step. Each member has its own batch order; the state is donated."""
    step = make_member_step(tx, y_range)

    def epoch(state, row_l2, users, items, ratings, order):
        xs = train.epoch_batches(users, items, ratings, order, batch_size)
        return jax.lax.scan(lambda state, batch: step(state, row_l2, *batch), state, xs)

    return jax.jit(jax.vmap(epoch, in_axes=(0, 0, None, None, None, 0)), donate_argnums=(0,))


def _vmapped_scores(y_range) -> Callable:
    @jax.jit
    def scores(params, users, items):
        """float32[K, n]: every member's prediction for the pairs."""
        return jax.vmap(lambda p: models.score_rows(models.gather_rows(p, users, items), y_range))(params)

    return scores


def member_scores(
    params: dict[str, jax.Array], y_range, users: np.ndarray, items: np.ndarray, chunk: int
) -> np.ndarray:
    """Every member's predictions for index pairs, in chunks of ``chunk`` pairs.

    Args:
      params: stacked tables, ``name -> float32[K, rows, d]``.
      users, items: int32[n] indices.

    Returns:
      float32[K, n] on the host.
    """
    fn = _vmapped_scores(y_range)
    k = next(iter(params.values())).shape[0]
    n = len(users)
    chunk = max(1, min(chunk, n))
    out = np.empty((k, n), np.float32)
    for start in range(0, n, chunk):
        u, i = users[start : start + chunk], items[start : start + chunk]
        size = len(u)
        u, i = np.pad(u, (0, chunk - size)), np.pad(i, (0, chunk - size))
        out[:, start : start + size] = np.asarray(fn(params, jnp.asarray(u, jnp.int32), jnp.asarray(i, jnp.int32)))[
            :, :size
        ]
    return out


# ----------------------------------------------------------------------------------- members


class Member(NamedTuple):
    """One model of a sweep: its full config (``config.seed`` is its init and shuffle seed) and the
    grid point that made it (``{dotted key: value}``, without the seed)."""

    config: Config
    point: dict


def static_part(config: Config) -> str:
    """The part of a config that must be equal within one compiled program (JSON, for grouping)."""
    raw = to_dict(config)
    raw.pop("seed")
    for key in VMAPPED:
        section, name = key.split(".")
        raw[section].pop(name)
    return json.dumps(raw, sort_keys=True)


def init_members(setup: train.Setup, members: Sequence[Member], tx: optax.GradientTransformation) -> train.TrainState:
    """Stacked initial states: member k's parameters are those of ``jaxcf.train.init_state`` with
    ``seed = members[k].config.seed``, and its injected hyper-parameters are its own."""
    seeds = [m.config.seed for m in members]
    keys = jnp.stack([jax.random.key_data(jax.random.fold_in(jax.random.key(s), 0)) for s in seeds])
    hyper = {name: jnp.asarray([getattr(m.config.optim, name) for m in members], jnp.float32) for name in INJECTED}

    def init(key_data, member_hyper):
        params = models.init_params(setup.model, jax.random.wrap_key_data(key_data))
        params = {name: jnp.asarray(value, jnp.float32) for name, value in params.items()}
        opt_state = tx.init(params)
        injected = opt_state[0]._replace(hyperparams={**opt_state[0].hyperparams, **member_hyper})
        return train.TrainState(params, (injected, *opt_state[1:]), jnp.zeros((), jnp.int32))

    return jax.vmap(init)(keys, hyper)


@dataclasses.dataclass
class MembersResult:
    """What :func:`fit_members` returns.

    Attributes:
      state: the final stacked state (``params`` tables are float32[K, rows, d]).
      history: one record per epoch: the ensemble's ``valid_rmse``/``valid_mse``/``valid_mae`` (the
        mean of the K members' predictions), and per member ``member_valid_rmse``,
        ``member_valid_mae`` and ``member_train_mse`` (lists of K floats; NaN for a diverged member).
      best_epoch: the epoch with the lowest ensemble valid RMSE.
      best_params: the parameters of ``best_epoch`` when early stopping is on, else None.
      diverged: bool[K], members whose loss became NaN or infinite (their metrics are NaN from then on).
      predictions: float32[K, n_valid] the last epoch's validation predictions.
      stopped_early: whether early stopping ended the run.
    """

    state: train.TrainState
    history: list[dict]
    best_epoch: int
    best_params: Any
    diverged: np.ndarray
    predictions: np.ndarray
    stopped_early: bool = False


def fit_members(
    config: Config,
    dataset: Dataset,
    members: Sequence[Member],
    *,
    on_epoch: Callable[[dict], None] | None = None,
    show_progress: bool = False,
) -> MembersResult:
    """Trains K members that share ``static_part`` in one vmapped program.

    Args:
      config: any member's config (the static part is read from it; seeds and vmapped keys from each
        member). ``train.early_stopping_patience`` watches the *ensemble's* valid RMSE and keeps the
        parameters of its best epoch.
      dataset: ratings and the (shared) split.
      members: the K members.
      on_epoch: called with each epoch's record.
      show_progress: a tqdm bar over epochs on stderr.

    Returns:
      :class:`MembersResult`.

    Raises:
      ConfigError: when the members do not share one static part, or the optimizer cannot be vmapped.
    """
    from tqdm.auto import tqdm

    if len({static_part(m.config) for m in members}) != 1:
        raise ConfigError("members of one program may differ only in seed and " + ", ".join(VMAPPED))
    setup = train.make_setup(config, dataset)
    ratings = dataset.ratings
    train_rows, valid_rows = dataset.split.train, dataset.split.valid
    n = len(train_rows)
    tx = make_optimizer(config, train.num_batches(n, config.train.batch_size))
    state = init_members(setup, members, tx)
    epoch_fn = make_members_epoch(tx, setup.y_range, config.train.batch_size)
    row_l2 = jnp.asarray([m.config.optim.row_l2 for m in members], jnp.float32)
    users, items = jnp.asarray(ratings.users[train_rows]), jnp.asarray(ratings.items[train_rows])
    targets = jnp.asarray(ratings.ratings[train_rows])
    valid_users, valid_items = ratings.users[valid_rows], ratings.items[valid_rows]
    valid_targets = ratings.ratings[valid_rows].astype(np.float64)
    shuffle_keys = [jax.random.fold_in(jax.random.key(m.config.seed), 1) for m in members]
    patience = config.train.early_stopping_patience
    diverged = np.zeros(len(members), bool)
    history: list[dict] = []
    best_epoch, best_rmse, best_params, stopped = 0, math.inf, None, False

    bar = tqdm(total=config.train.epochs, disable=not show_progress, desc="members", unit="epoch", leave=False,
               file=sys.stderr)
    for epoch in range(config.train.epochs):
        start = time.perf_counter()
        orders = jnp.stack([train.shuffle_order(key, epoch, n) for key in shuffle_keys])
        state, losses = epoch_fn(state, row_l2, users, items, targets, orders)
        losses = np.asarray(losses)  # the one host sync of the epoch
        train_seconds = time.perf_counter() - start
        diverged |= ~np.all(np.isfinite(losses), axis=1)
        predictions = member_scores(state.params, setup.y_range, valid_users, valid_items,
                                    config.train.eval_batch_size).astype(np.float64)
        predictions[diverged] = np.nan
        errors = predictions - valid_targets[None]
        member_rmse = np.sqrt(np.mean(errors**2, axis=1))
        healthy = ~diverged
        mean_prediction = predictions[healthy].mean(axis=0) if healthy.any() else np.full(len(valid_rows), np.nan)
        valid_mse = evaluate.mse(mean_prediction, valid_targets)
        record = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses[healthy])) if healthy.any() else math.nan,
            "valid_mse": valid_mse,
            "valid_rmse": math.sqrt(valid_mse),
            "valid_mae": evaluate.mae(mean_prediction, valid_targets),
            "members": int(healthy.sum()),
            "member_valid_rmse": member_rmse.tolist(),
            "member_valid_mae": np.mean(np.abs(errors), axis=1).tolist(),
            "member_train_mse": np.where(diverged, np.nan, np.mean(losses, axis=1)).tolist(),
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - start,
        }
        history.append(record)
        if record["valid_rmse"] < best_rmse:
            best_epoch, best_rmse = epoch + 1, record["valid_rmse"]
            if patience:
                best_params = jax.tree.map(jnp.copy, state.params)
        bar.update(1)
        bar.set_postfix(valid_rmse=f"{record['valid_rmse']:.4f}")
        if on_epoch is not None:
            on_epoch(record)
        if patience and epoch + 1 - best_epoch >= patience:
            stopped = True
            break
    bar.close()
    return MembersResult(state, history, best_epoch, best_params, diverged, predictions.astype(np.float32), stopped)


# ----------------------------------------------------------------------------------- splits


def holdout_split(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """The dataset with its validation rows replaced by a random ``fraction`` of its training rows.

    The real validation rows are dropped entirely, so choices made on this split never see them.

    Raises:
      DataError: when the fraction leaves either part empty.
    """
    train_rows = dataset.split.train
    size = int(len(train_rows) * fraction)
    if not 0 < fraction < 1 or size < 1 or size >= len(train_rows):
        raise DataError(f"--holdout {fraction}: must leave a non-empty part of the {len(train_rows)} training rows")
    # A stream of its own (seed + 1000003), so the inner split is not the outer split's permutation.
    permutation = np.random.RandomState(seed + 1_000_003).permutation(len(train_rows))
    inner = np.sort(train_rows[permutation[size:]])
    held = np.sort(train_rows[permutation[:size]])
    return dataclasses.replace(dataset, split=Split(inner, held, name=f"{dataset.split.name}-holdout{fraction:g}"))


# ----------------------------------------------------------------------------------- CLI


def parse_grid(items: Sequence[str]) -> dict[str, list]:
    """``KEY=V1,V2,...`` strings -> ``{key: [values]}``; values are parsed as YAML scalars."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise ConfigError(f"--grid expects KEY=V1,V2,... (e.g. optim.weight_decay=1e-5,1e-4); got {item!r}")
        if key == "seed":
            raise ConfigError("--grid seed=...: use --seeds N (members get seeds seed, seed+1, ...)")
        values = []
        for part in text.split(","):
            try:
                values.append(yaml.safe_load(part))
            except yaml.YAMLError:
                raise ConfigError(f"--grid {key}: cannot parse value {part!r}") from None
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; put all its values in one --grid")
        grid[key] = values
    return grid


def make_members(base_raw: dict, overrides: Sequence[str], grid: dict[str, list], seeds: int) -> list[Member]:
    """One member per grid point and seed, each validated as a full config.

    Raises:
      ConfigError: naming the grid point whose config is invalid.
    """
    base = from_dict(apply_overrides(base_raw, overrides))
    members = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        for offset in range(seeds):
            sets = [*overrides, *(f"{k}={json.dumps(v)}" for k, v in point.items()), f"seed={base.seed + offset}"]
            try:
                config = from_dict(apply_overrides(base_raw, sets))
            except ConfigError as err:
                raise ConfigError(f"grid point {point}: {err}") from None
            # Record the values as the config resolved them (YAML reads `1e-3` as text, the config a number).
            members.append(Member(config, {key: _resolved(config, key) for key in keys}))
    return members


def _resolved(config: Config, dotted: str) -> Any:
    value: Any = to_dict(config)
    for part in dotted.split("."):
        value = value[part]
    return value


def run_sweep(
    base: Config, members: Sequence[Member], dataset_for: Callable[[Config], Dataset], *, quiet: bool = False, out=None
) -> dict:
    """Trains every member (one program per static part) and summarises.

    Returns:
      The JSON-ready results: per member its grid point, seed, final and best valid RMSE/MAE and best
      epoch; per program its members and timing; the best member; the ensemble of all members.
    """
    out = out if out is not None else sys.stdout
    groups: dict[str, list[int]] = {}
    for index, member in enumerate(members):
        groups.setdefault(static_part(member.config), []).append(index)
    results: list[dict | None] = [None] * len(members)
    programs = []
    all_predictions = []
    for group_number, indices in enumerate(groups.values()):
        group = [members[i] for i in indices]
        dataset = dataset_for(group[0].config)
        start = time.perf_counter()

        def show(record, group_number=group_number):
            if not quiet:
                print(
                    f"program {group_number + 1}/{len(groups)} epoch {record['epoch']:>3d}  "
                    f"best member {np.nanmin(record['member_valid_rmse']):.4f}  "
                    f"ensemble of {record['members']} {record['valid_rmse']:.4f}  {record['seconds']:.2f}s",
                    file=out, flush=True,
                )

        fitted = fit_members(group[0].config, dataset, group, on_epoch=show)
        seconds = time.perf_counter() - start
        epoch_seconds = [r["seconds"] for r in fitted.history]
        programs.append({
            "members": len(group),
            "static": {k: v for k, v in json.loads(static_part(group[0].config)).items() if k != "data"},
            "split": dataset.split.name,
            "num_train": len(dataset.split.train),
            "num_valid": len(dataset.split.valid),
            "seconds": seconds,
            "epoch_seconds": epoch_seconds,
            "ensemble_valid_rmse": fitted.history[-1]["valid_rmse"],
        })
        all_predictions.append((dataset.split.name, fitted.predictions[~fitted.diverged]))
        for k, i in enumerate(indices):
            curve = [r["member_valid_rmse"][k] for r in fitted.history]
            best = int(np.nanargmin(curve)) if not np.all(np.isnan(curve)) else 0
            results[i] = {
                "member": i,
                "program": group_number,
                "point": members[i].point,
                "seed": members[i].config.seed,
                "diverged": bool(fitted.diverged[k]),
                "valid_rmse": curve[-1],
                "valid_mae": fitted.history[-1]["member_valid_mae"][k],
                "best_valid_rmse": curve[best],
                "best_epoch": best + 1,
                "valid_rmse_by_epoch": curve,
            }
    finite = [r for r in results if r is not None and math.isfinite(r["valid_rmse"])]
    summary: dict[str, Any] = {
        "config": to_dict(base),
        "members": results,
        "programs": programs,
        "best_member": min(finite, key=lambda r: r["valid_rmse"]) if finite else None,
        "seconds": sum(p["seconds"] for p in programs),
    }
    # The ensemble of every member is meaningful only when all programs share one validation set.
    if len({name for name, _ in all_predictions}) == 1 and finite:
        dataset = dataset_for(base)
        targets = dataset.ratings.ratings[dataset.split.valid].astype(np.float64)
        mean = np.concatenate([p for _, p in all_predictions]).astype(np.float64).mean(axis=0)
        summary["ensemble_of_all"] = {"members": len(finite), "valid_rmse": evaluate.rmse(mean, targets),
                                      "valid_mae": evaluate.mae(mean, targets)}
    summary["by_point"] = _by_point(results)
    return summary


def _by_point(results: list[dict]) -> list[dict]:
    """Per grid point: the members' mean and std of the final valid RMSE over seeds."""
    points: dict[str, list[float]] = {}
    for r in results:
        points.setdefault(json.dumps(r["point"], sort_keys=True), []).append(r["valid_rmse"])
    rows = []
    for key, values in points.items():
        values_arr = np.asarray(values, np.float64)
        rows.append({"point": json.loads(key), "seeds": len(values), "valid_rmse_mean": float(np.mean(values_arr)),
                     "valid_rmse_std": float(np.std(values_arr))})
    return sorted(rows, key=lambda r: r["valid_rmse_mean"] if math.isfinite(r["valid_rmse_mean"]) else math.inf)


def format_summary(summary: dict) -> str:
    lines = ["member  seed  valid_rmse  best_rmse@epoch  point"]
    for r in summary["members"]:
        flag = "  DIVERGED" if r["diverged"] else ""
        lines.append(
            f"{r['member']:>6d}  {r['seed']:>4d}  {r['valid_rmse']:>10.4f}  "
            f"{r['best_valid_rmse']:>9.4f}@{r['best_epoch']:<5d}  {json.dumps(r['point'])}{flag}"
        )
    if summary["best_member"] is not None:
        b = summary["best_member"]
        lines.append(
            f"best member: {b['member']} (seed {b['seed']}, {json.dumps(b['point'])}) valid_rmse {b['valid_rmse']:.4f}"
        )
    for row in summary["by_point"]:
        lines.append(
            f"point {json.dumps(row['point'])}: valid_rmse {row['valid_rmse_mean']:.4f} ± {row['valid_rmse_std']:.4f} "
            f"over {row['seeds']} seeds"
        )
    if "ensemble_of_all" in summary:
        e = summary["ensemble_of_all"]
        lines.append(
            f"ensemble of all {e['members']} members: valid_rmse {e['valid_rmse']:.4f}, valid_mae {e['valid_mae']:.4f}"
        )
    lines.append(f"{len(summary['members'])} models in {len(summary['programs'])} compiled program(s), "
                 f"{summary['seconds']:.1f}s")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxcf.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file, or the name of a shipped config (bias.yaml, ...)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="values of one config key to sweep (repeatable; the grid is their product)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per grid point: seed, seed+1, ... (default 1)")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys for every member")
    parser.add_argument("--holdout", type=float, default=None, metavar="FRACTION",
                        help="validate on this fraction of the training rows instead of the validation split")
    parser.add_argument("--out", type=Path, help="results JSON (default: runs/sweep-<time>.json)")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.seeds < 1:
            raise ConfigError(f"--seeds must be >= 1; got {args.seeds}")
        base_raw: Any = {}
        if args.config is not None:
            base_raw = read_yaml(resolve_path(args.config)) or {}
            if not isinstance(base_raw, dict):
                raise ConfigError(f"config file {args.config!r} must hold a mapping of sections")
        base = load(args.config, args.set)
        if base.ensemble.method != "seeds":
            raise ConfigError("the sweep trains SGD models; ensemble.method gibbs is trained by python -m jaxcf.train")
        members = make_members(base_raw, args.set, parse_grid(args.grid), args.seeds)
        cache: dict[str, Dataset] = {}

        def dataset_for(config: Config) -> Dataset:
            key = json.dumps(to_dict(config)["data"], sort_keys=True)
            if key not in cache:
                # Every member's split comes from the base seed: members differ in init and order only.
                dataset = load_dataset(config.data, base.seed)
                cache[key] = holdout_split(dataset, args.holdout, base.seed) if args.holdout is not None else dataset
            return cache[key]

        summary = run_sweep(base, members, dataset_for, quiet=args.quiet)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary["command"] = " ".join(["python -m jaxcf.sweep", *(argv if argv is not None else sys.argv[1:])])
    summary["holdout"] = args.holdout
    out_path = args.out or Path("runs") / f"sweep-{dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.json"
    atomic_write_text(out_path, json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    print(f"results in {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
