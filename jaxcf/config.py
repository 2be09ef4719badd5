"""Experiment configuration: frozen dataclasses, YAML loading, ``--set`` overrides, validation.

Every default lives in the dataclasses below, and nowhere else. YAML is read with
``yaml.safe_load`` only. Unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` with the dotted key, what is allowed and, for unknown keys, a
"did you mean". The training CLI turns that into one line on stderr and exit status 2.

What does not live here: reading data (``jaxcf.data``), building optimizers (``jaxcf.optim``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

PACKAGE_CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line meant for the user."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # A registry name (see jaxcf.data.registry); ignored when `path` is set.
    name: str = "ml-latest-small"
    # Any ratings CSV; overrides `name`.
    path: str | None = None
    user_col: str = "userId"
    item_col: str = "movieId"
    rating_col: str = "rating"
    # The notebook's 80/20 split: the first int(n * 0.2) rows of RandomState(seed).permutation(n).
    valid_fraction: float = 0.2
    # A predefined split of the dataset instead of the random one (ml-100k: u1..u5, ua, ub).
    split: str | None = None
    # Ratings outside this closed range are rejected as bad data; null accepts any finite rating.
    rating_range: tuple[float, float] | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # "dot" is the notebook's EmbeddingDotProd, "bias" its EmbeddingDotProdBias.
    kind: str = "bias"
    n_factors: int = 50
    # Output range of the biased model's scaled sigmoid; null takes (min, max) of the ratings.
    y_range: tuple[float, float] | None = None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    # adamw: decoupled decay (torch.optim.AdamW); adam: coupled L2 (torch.optim.Adam, the notebook's);
    # lazy_adam: row-sparse Adam that only touches the rows in a batch (not the notebook's optimizer).
    name: str = "adamw"
    learning_rate: float = 1.0e-3
    weight_decay: float = 1.0e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1.0e-8
    # L2 on the rows each batch gathers, added to the loss per rating as in Surprise's SVD:
    # row_l2 * (|p_u|^2 + |q_i|^2 + b_u^2 + b_i^2) averaged over the batch (frequent rows are
    # penalised more often). Trained by jaxcf.ensemble / jaxcf.sweep; 0 = off.
    row_l2: float = 0.0
    # Learning-rate schedule over the whole run, as a multiplier of learning_rate: constant,
    # cosine (decay to 0) or onecycle (optax.cosine_onecycle_schedule). Non-constant schedules are
    # trained by jaxcf.ensemble / jaxcf.sweep.
    schedule: str = "constant"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 64
    # Stop after this many epochs without a lower valid RMSE, and keep (export) the best epoch's
    # parameters; 0 turns early stopping off.
    early_stopping_patience: int = 0
    # Validation runs in chunks of this many ratings; it does not change the result.
    eval_batch_size: int = 65536


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    # Save the training state every this many epochs (and always after the last one); 0 = only at the end.
    every_epochs: int = 1
    # How many checkpoints to keep in WORKDIR/checkpoints.
    keep: int = 2


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # Devices along each mesh axis; data * model must equal the number of devices used.
    # Batches are split over `data`; embedding tables and their optimizer state are row-sharded
    # over `model`. {data: 1, model: 1} is a single device, exactly the unsharded program.
    data: int = 1
    model: int = 1


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    # Multi-process JAX (jax.distributed.initialize). null values are read from the environment
    # (JAXCF_COORDINATOR, JAXCF_NUM_PROCESSES, JAXCF_PROCESS_ID); num_processes 1 = single process.
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class EnsembleConfig:
    # Members whose predictions are averaged. 1 (with method seeds) is the single model of jaxcf.train.
    size: int = 1
    # seeds: `size` SGD models trained side by side in one vmapped program, seeds seed, seed+1, ...
    #   (one data split, from `seed`); gibbs: Bayesian MF (BPMF) by Gibbs sampling, the members being
    #   `size` posterior samples (model.kind dot; train.epochs counts sweeps).
    method: str = "seeds"
    # gibbs: independent chains sampled side by side; size must be a multiple of chains.
    chains: int = 1
    # gibbs: sweeps discarded before samples are kept.
    burn_in: int = 20
    # gibbs: alpha, the precision (1 / variance) of a rating around its predicted value.
    noise_precision: float = 2.0


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 42
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    ensemble: EnsembleConfig = dataclasses.field(default_factory=EnsembleConfig)


# Allowed values for enumerated keys: small explicit sets, no getattr dispatch.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.kind": ("dot", "bias"),
    "optim.name": ("adamw", "adam", "lazy_adam"),
    "optim.schedule": ("constant", "cosine", "onecycle"),
    "ensemble.method": ("seeds", "gibbs"),
}


def _known_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _suggest(key: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks and converts one leaf value to the annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if value is None:
        raise ConfigError(f"{key}: must not be null; expected {_type_name(tp)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, e.g. [0.5, 5.0]; got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false; got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number; got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads `1e-3` as a string because it lacks a dot; accept it as the
            # number the user meant rather than failing on a technicality.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number; got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string; got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where}: expected a mapping of keys to values; got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = _known_keys(cls)
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"unknown config key {prefix}{key!s}{_suggest(str(key), known)}; "
                f"allowed keys here: {', '.join(known)}"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, raw[f.name], f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(raw[f.name], tp, f"{prefix}{f.name}")
    return cls(**kwargs)


def validate(config: Config) -> Config:
    """Checks value ranges and names.

    Raises:
      ConfigError: naming the first offending key and what is allowed.
    """
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            raise ConfigError(
                f"{key}: unknown value {value!r}{_suggest(value, allowed)}; allowed: {', '.join(allowed)}"
            )

    def positive(key: str, value: float) -> None:
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{key}: must be a finite number > 0; got {value!r}")

    def at_least(key: str, value: int, low: int) -> None:
        if value < low:
            raise ConfigError(f"{key}: must be an integer >= {low}; got {value!r}")

    positive("optim.learning_rate", config.optim.learning_rate)
    if not (math.isfinite(config.optim.weight_decay) and config.optim.weight_decay >= 0):
        raise ConfigError(f"optim.weight_decay: must be a finite number >= 0; got {config.optim.weight_decay!r}")
    for key in ("b1", "b2"):
        value = getattr(config.optim, key)
        if not 0 <= value < 1:
            raise ConfigError(f"optim.{key}: must be in [0, 1); got {value!r}")
    positive("optim.eps", config.optim.eps)
    at_least("train.epochs", config.train.epochs, 1)
    at_least("train.batch_size", config.train.batch_size, 1)
    at_least("train.eval_batch_size", config.train.eval_batch_size, 1)
    at_least("train.early_stopping_patience", config.train.early_stopping_patience, 0)
    at_least("model.n_factors", config.model.n_factors, 1)
    at_least("checkpoint.every_epochs", config.checkpoint.every_epochs, 0)
    at_least("checkpoint.keep", config.checkpoint.keep, 1)
    at_least("mesh.data", config.mesh.data, 1)
    at_least("mesh.model", config.mesh.model, 1)
    if config.distributed.num_processes is not None:
        at_least("distributed.num_processes", config.distributed.num_processes, 1)
    if config.distributed.process_id is not None:
        at_least("distributed.process_id", config.distributed.process_id, 0)
    if not 0 < config.data.valid_fraction < 1:
        raise ConfigError(f"data.valid_fraction: must be in (0, 1); got {config.data.valid_fraction!r}")
    for key, rng in (("model.y_range", config.model.y_range), ("data.rating_range", config.data.rating_range)):
        if rng is not None and not (all(map(math.isfinite, rng)) and rng[0] < rng[1]):
            raise ConfigError(f"{key}: must be [low, high] with finite low < high; got {list(rng)!r}")
    for key in ("user_col", "item_col", "rating_col"):
        if not getattr(config.data, key):
            raise ConfigError(f"data.{key}: must be a non-empty column name")
    cols = [config.data.user_col, config.data.item_col, config.data.rating_col]
    if len(set(cols)) != 3:
        raise ConfigError(f"data.user_col, data.item_col and data.rating_col must differ; got {cols}")
    _validate_ensemble(config)
    return config


def _validate_ensemble(config: Config) -> None:
    """Checks ``ensemble.*`` and the optimizer extras that only the ensemble trainer implements."""
    ensemble = config.ensemble
    if not (math.isfinite(config.optim.row_l2) and config.optim.row_l2 >= 0):
        raise ConfigError(f"optim.row_l2: must be a finite number >= 0; got {config.optim.row_l2!r}")
    for key in ("size", "chains"):
        if getattr(ensemble, key) < 1:
            raise ConfigError(f"ensemble.{key}: must be an integer >= 1; got {getattr(ensemble, key)!r}")
    if ensemble.burn_in < 0:
        raise ConfigError(f"ensemble.burn_in: must be an integer >= 0; got {ensemble.burn_in!r}")
    if not (math.isfinite(ensemble.noise_precision) and ensemble.noise_precision > 0):
        raise ConfigError(f"ensemble.noise_precision: must be a finite number > 0; got {ensemble.noise_precision!r}")
    if ensemble.method == "gibbs":
        if config.model.kind != "dot":
            raise ConfigError("ensemble.method gibbs samples a dot model (BPMF); set model.kind: dot")
        if ensemble.size % ensemble.chains:
            raise ConfigError(
                f"ensemble.size ({ensemble.size}) must be a multiple of ensemble.chains ({ensemble.chains})"
            )
        per_chain = ensemble.size // ensemble.chains
        if config.train.epochs - ensemble.burn_in < per_chain:
            raise ConfigError(
                f"train.epochs ({config.train.epochs} sweeps) leaves fewer than {per_chain} sweeps per chain after "
                f"ensemble.burn_in ({ensemble.burn_in}); raise train.epochs or lower ensemble.size"
            )
        if config.train.early_stopping_patience:
            raise ConfigError("train.early_stopping_patience does not apply to ensemble.method gibbs; set it to 0")
    elif uses_ensemble_trainer(config) and config.optim.name not in ("adam", "adamw"):
        raise ConfigError(
            f"optim.name {config.optim.name!r}: ensembles, optim.row_l2 and optim.schedule train with adam or adamw"
        )


def uses_ensemble_trainer(config: Config) -> bool:
    """Whether ``config`` needs ``jaxcf.ensemble`` rather than the single-model loop of ``jaxcf.train``:
    an ensemble, or an optimizer extra (row_l2, a schedule) that only that trainer implements."""
    return (
        config.ensemble.size > 1
        or config.ensemble.method != "seeds"
        or config.optim.row_l2 > 0
        or config.optim.schedule != "constant"
    )


def from_dict(raw: Mapping[str, Any] | None) -> Config:
    """Builds and validates a Config from nested plain data (as YAML gives it)."""
    return validate(_build(Config, raw or {}, ""))


def to_dict(config: Config) -> dict[str, Any]:
    """Plain nested data; tuples become lists so that YAML and JSON round-trip."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def resolve_path(name: str | Path) -> Path:
    """A config argument as a file: an existing path, else a config shipped with the package.

    Raises:
      ConfigError: when neither exists.
    """
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (PACKAGE_CONFIG_DIR / path.name, PACKAGE_CONFIG_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.name for p in PACKAGE_CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file not found: {str(name)!r}; give a path to a YAML file or one of: {shipped}")


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"YAML syntax error in {str(path)!r}{where}: {problem}") from None


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies ``key.sub=value`` strings; each value is parsed as YAML (so `null`, `[0, 5]` work)."""
    raw = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. optim.learning_rate=3e-3); got {item!r}")
        key, _, text = item.partition("=")
        key = key.strip()
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse value {text!r}") from None
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, Mapping):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw


def load(name: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Loads a config file (or the defaults) and applies ``--set`` overrides.

    Args:
      name: a YAML path, or the name of a config shipped in ``jaxcf/configs``; None for defaults.
      overrides: ``dotted.key=value`` strings.

    Returns:
      The validated, frozen Config.

    Raises:
      ConfigError: for any unusable file, key or value.
    """
    raw: Any = {}
    if name is not None:
        raw = read_yaml(resolve_path(name))
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config file {str(name)!r} must hold a mapping of sections; got {type(raw).__name__}")
    return from_dict(apply_overrides(dict(raw), overrides))


def dump(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
