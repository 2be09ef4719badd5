"""Experiment configuration: frozen dataclasses, YAML loading, ``--set`` overrides, validation.

Every default lives in the dataclasses below, and nowhere else. YAML is read with
``yaml.safe_load`` only. Unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` with the dotted key, what is allowed and, for unknown keys, a
"did you mean". The training CLI turns that into one line on stderr and exit status 2.

What does not live here: parsing YAML and overrides into the dataclasses (``jaxcf.configfile``),
reading data (``jaxcf.data``), building optimizers (``jaxcf.optim``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxcf.configfile import apply_overrides, build, read_yaml, suggest
from jaxcf.configfile import resolve_path as _resolve_path
from jaxcf.errors import ConfigError

PACKAGE_CONFIG_DIR = Path(__file__).parent / "configs"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # A registry name (see jaxcf.data.registry); ignored when `path` is set.
    name: str = "ml-latest-small"
    # Any ratings CSV; overrides `name`.
    path: str | None = None
    user_col: str = "userId"
    item_col: str = "movieId"
    rating_col: str = "rating"
    # The notebook's 80/20 split: the first int(n * 0.2) rows of RandomState(seed).permutation(n)
    # validate. 0 trains on every row (nothing validated: no early stopping). Not used with valid_path or
    # a predefined split.
    valid_fraction: float = 0.2
    # Your own validation and test files (with data.path, your training file; same columns). Validation
    # is scored every epoch and may drive early stopping; test is scored and recorded as test_* and never
    # chooses anything (jaxcf.data.files).
    valid_path: str | None = None
    test_path: str | None = None
    # A predefined split of the dataset instead of the random one (ml-100k: u1..u5, ua, ub); its .test
    # part is the test set, and nothing is validated unless data.valid_path is set.
    split: str | None = None
    # Ratings outside this closed range are rejected as bad data; null accepts any finite rating.
    rating_range: tuple[float, float] | None = None
    # Implicit-feedback models (model.kind ials, bpr, ease) learn from the ratings of at least this
    # many stars, as interactions (jaxcf.data.implicit); explicit models ignore it.
    implicit_threshold: float = 4.0
    # Leave-last-k-out instead of the random split: each user's k latest ratings (by timestamp_col;
    # for implicit models, latest interactions) validate, the rest train; users with k or fewer
    # keep all in training. 0 = off (valid_fraction's random split).
    leave_last: int = 0
    # The timestamp column of a CSV or DataFrame (numbers or dates); read only for leave_last.
    timestamp_col: str = "timestamp"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # "dot" is the notebook's EmbeddingDotProd, "bias" its EmbeddingDotProdBias (explicit ratings);
    # "ials", "bpr", "ease" learn from implicit feedback (see the implicit section); "blend" is
    # EASE and iALS blended (implicit.blend_ease_weight).
    kind: str = "bias"
    n_factors: int = 50
    # Output range of the biased model's scaled sigmoid; null takes (min, max) of the ratings.
    y_range: tuple[float, float] | None = None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    # adamw: decoupled decay (torch.optim.AdamW); adam: coupled L2 (torch.optim.Adam, the notebook's);
    # lazy_adam, sgd: row-sparse, touching only the rows in a batch (jaxcf.optim; not the notebook's).
    name: str = "adamw"
    learning_rate: float = 1.0e-3
    weight_decay: float = 1.0e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1.0e-8
    # L2 on the rows each batch gathers, added to the loss per rating as in Surprise's SVD:
    # row_l2 * (|p_u|^2 + |q_i|^2 + b_u^2 + b_i^2) averaged over the batch (frequent rows are
    # penalised more often); 0 = off. adam and adamw only.
    row_l2: float = 0.0
    # Learning-rate schedule over the whole run, as a multiplier of learning_rate: constant,
    # cosine (decay to 0) or onecycle (optax.cosine_onecycle_schedule). adam and adamw only.
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
    # The watchdog: a run whose epoch has not finished after this many seconds (or 10x its slowest
    # epoch so far, whichever is longer) dumps every thread's stack and exits with status 3, instead
    # of waiting forever on a hung kernel. 0 turns it off.
    stall_seconds: float = 600.0


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
class ImplicitConfig:
    # iALS (Hu, Koren & Volinsky 2008): an interaction's confidence is 1 + alpha, every other pair's 1.
    alpha: float = 1.0
    # iALS: L2 on each row, lambda * (alpha * |row's interactions| + |other side|) ** reg_exponent:
    # reg_exponent 0 is plain L2 (Hu et al., implicit's ALS), 1 frequency-scaled (Rendle et al. 2022).
    regularization: float = 0.1
    reg_exponent: float = 0.0
    # iALS: exact F x F solves ("cholesky") or conjugate gradient warm-started from the last sweep
    # ("cg", cg_steps steps per row and sweep), cheaper for large F.
    solver: str = "cholesky"
    cg_steps: int = 3
    # iALS and BPR: the standard deviation of the normal initial factors.
    init_std: float = 0.1
    # BPR (Rendle et al. 2009): negatives sampled uniformly per positive, and the L2 weight of the
    # rows a triple touches, in the loss. Trained with optim (lazy_adam recommended).
    negatives: int = 1
    l2: float = 1.0e-4
    # EASE (Steck 2019): the L2 weight lambda of the closed-form item-item model.
    ease_lambda: float = 500.0
    # blend (model.kind blend): EASE's scores times this plus iALS's times (1 - this); both models
    # regress the same 0/1 matrix, so their scores share a scale.
    blend_ease_weight: float = 0.5


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
    implicit: ImplicitConfig = dataclasses.field(default_factory=ImplicitConfig)


# Bounds that no useful run comes near; past them a typo (1e8 factors) would exhaust memory before any check
# of the data could say so. The memory a run needs is checked too, once the data is known (jaxcf.memory).
MAX_FACTORS = 1 << 16
MAX_MEMBERS = 1 << 14
MAX_EPOCHS = 1 << 20
MAX_BATCH = 1 << 26
# The watchdog: below this an epoch's first call (it compiles) would be taken for a stall.
MIN_STALL_SECONDS = 10.0
MAX_STALL_SECONDS = 7 * 24 * 3600.0

# Allowed values for enumerated keys: small explicit sets, no getattr dispatch.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.kind": ("dot", "bias", "ials", "bpr", "ease", "blend"),
    "implicit.solver": ("cholesky", "cg"),
    "optim.name": ("adamw", "adam", "lazy_adam", "sgd"),
    "optim.schedule": ("constant", "cosine", "onecycle"),
    "ensemble.method": ("seeds", "gibbs"),
}


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
                f"{key}: unknown value {value!r}{suggest(value, allowed)}; allowed: {', '.join(allowed)}"
            )

    def positive(key: str, value: float) -> None:
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{key}: must be a finite number > 0; got {value!r}")

    def at_least(key: str, value: int, low: int) -> None:
        if value < low:
            raise ConfigError(f"{key}: must be an integer >= {low}; got {value!r}")

    # Seeds index NumPy's RandomState (0 .. 2**32 - 1), and an ensemble's members use seed + k.
    if not 0 <= config.seed <= 2**32 - 1 - config.ensemble.size:
        raise ConfigError(f"seed: must be an integer in [0, {2**32 - 1 - config.ensemble.size}] (NumPy's seed range, "
                          f"less the {config.ensemble.size} member seed(s) above it); got {config.seed!r}")
    for key, value, high in (("model.n_factors", config.model.n_factors, MAX_FACTORS),
                             ("ensemble.size", config.ensemble.size, MAX_MEMBERS),
                             ("train.epochs", config.train.epochs, MAX_EPOCHS),
                             ("train.batch_size", config.train.batch_size, MAX_BATCH),
                             ("train.eval_batch_size", config.train.eval_batch_size, MAX_BATCH)):
        if value > high:
            raise ConfigError(f"{key}: {value} is more than this library allows ({high}); lower it")
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
    stall = config.train.stall_seconds
    if not (math.isfinite(stall) and (stall == 0 or MIN_STALL_SECONDS <= stall <= MAX_STALL_SECONDS)):
        raise ConfigError(f"train.stall_seconds: must be 0 (no watchdog) or a number of seconds in "
                          f"[{MIN_STALL_SECONDS:g}, {MAX_STALL_SECONDS:g}] (an epoch's first call compiles for "
                          f"seconds); got {stall!r}")
    if config.distributed.process_id is not None:
        at_least("distributed.process_id", config.distributed.process_id, 0)
    if not (math.isfinite(config.data.valid_fraction) and 0 <= config.data.valid_fraction < 1):
        raise ConfigError(f"data.valid_fraction: must be in [0, 1) (0: train on every row); got "
                          f"{config.data.valid_fraction!r}")
    _validate_roles(config)
    for key, rng in (("model.y_range", config.model.y_range), ("data.rating_range", config.data.rating_range)):
        if rng is not None and not (all(map(math.isfinite, rng)) and rng[0] < rng[1]):
            raise ConfigError(f"{key}: must be [low, high] with finite low < high; got {list(rng)!r}")
    for key in ("user_col", "item_col", "rating_col"):
        if not getattr(config.data, key):
            raise ConfigError(f"data.{key}: must be a non-empty column name")
    cols = [config.data.user_col, config.data.item_col, config.data.rating_col]
    if len(set(cols)) != 3:
        raise ConfigError(f"data.user_col, data.item_col and data.rating_col must differ; got {cols}")
    at_least("data.leave_last", config.data.leave_last, 0)
    if config.data.leave_last and config.data.split is not None:
        raise ConfigError(f"data.leave_last={config.data.leave_last} and data.split={config.data.split!r} both choose "
                          "the validation rows; set one of them")
    if config.data.leave_last and (not config.data.timestamp_col or config.data.timestamp_col in cols):
        raise ConfigError("data.timestamp_col: must be a column name other than the user, item and rating columns")
    _validate_ensemble(config)
    _validate_implicit(config)
    return config


def has_validation(data: DataConfig) -> bool:
    """Whether ``data`` gives validation rows (a validation file, a leave-last or random split of the
    training rows); a predefined split (ml-100k's u1-u5) has a test part and no validation."""
    if data.valid_path is not None:
        return True
    if data.split is not None:
        return False
    return bool(data.leave_last) or data.valid_fraction > 0


def _validate_roles(config: Config) -> None:
    data = config.data
    for key in ("valid_path", "test_path"):
        if getattr(data, key) == "":
            raise ConfigError(f"data.{key}: must be a file path or null")
    if data.valid_path is not None and data.leave_last:
        raise ConfigError("data.valid_path and data.leave_last both choose the validation rows; set one of them")
    if config.train.early_stopping_patience and not has_validation(data):
        raise ConfigError(
            "train.early_stopping_patience needs validation rows, and this data gives none (data.valid_fraction 0, "
            "or a predefined split whose .test part is a test set); set data.valid_path or data.valid_fraction, "
            "or set train.early_stopping_patience: 0 (early stopping never watches the test rows)"
        )


IMPLICIT_KINDS = ("ials", "bpr", "ease", "blend")


def is_implicit(config: Config) -> bool:
    """Whether ``config`` trains an implicit-feedback model (``model.kind`` ials, bpr, ease or blend)."""
    return config.model.kind in IMPLICIT_KINDS


def _validate_implicit(config: Config) -> None:
    implicit = config.implicit
    for key in ("alpha", "regularization", "reg_exponent", "l2", "ease_lambda"):
        value = getattr(implicit, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"implicit.{key}: must be a finite number >= 0; got {value!r}")
    if not (math.isfinite(implicit.init_std) and implicit.init_std > 0):
        raise ConfigError(f"implicit.init_std: must be a finite number > 0; got {implicit.init_std!r}")
    for key in ("cg_steps", "negatives"):
        if getattr(implicit, key) < 1:
            raise ConfigError(f"implicit.{key}: must be an integer >= 1; got {getattr(implicit, key)!r}")
    if not math.isfinite(config.data.implicit_threshold):
        raise ConfigError(f"data.implicit_threshold: must be a finite number; got {config.data.implicit_threshold!r}")
    if not is_implicit(config):
        return
    kind = config.model.kind
    if config.ensemble.size != 1 or config.ensemble.method != "seeds":
        raise ConfigError(f"model.kind {kind}: ensembles are of explicit models; set ensemble.size: 1")
    if config.optim.row_l2 or config.optim.schedule != "constant":
        raise ConfigError(f"model.kind {kind}: optim.row_l2 and optim.schedule are for explicit models")
    if not 0 <= config.implicit.blend_ease_weight <= 1:
        raise ConfigError(f"implicit.blend_ease_weight: must be in [0, 1]; got {config.implicit.blend_ease_weight!r}")
    if kind == "blend" and (config.mesh.data * config.mesh.model > 1):
        raise ConfigError("model.kind blend runs on one device (its EASE part): set mesh.data and mesh.model to 1")
    if kind == "ease":
        if config.train.epochs != 1:
            raise ConfigError("model.kind ease is solved in closed form, in one step: set train.epochs: 1")
        if config.mesh.data * config.mesh.model > 1:
            raise ConfigError("model.kind ease runs on one device: set mesh.data and mesh.model to 1")
    if kind == "bpr" and config.mesh.data * config.mesh.model > 1:
        raise ConfigError("model.kind bpr trains on one device: set mesh.data and mesh.model to 1")
    if kind == "bpr" and config.optim.name not in ("lazy_adam", "sgd"):
        raise ConfigError(f"model.kind bpr trains with a row-sparse optimizer (lazy_adam or sgd); got "
                          f"optim.name {config.optim.name!r}")


def _validate_ensemble(config: Config) -> None:
    """Checks ``ensemble.*``, and the optimizer extras that only the dense optimizers implement."""
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
    elif config.optim.name not in ("adam", "adamw") and (
        config.ensemble.size > 1 or config.optim.row_l2 > 0 or config.optim.schedule != "constant"
    ):
        raise ConfigError(
            f"optim.name {config.optim.name!r}: ensembles, optim.row_l2 and optim.schedule train with adam or adamw "
            "(the row-sparse optimizers keep their hyper-parameters outside the state)"
        )


def from_dict(raw: Mapping[str, Any] | None) -> Config:
    """Builds and validates a Config from nested plain data (as YAML gives it)."""
    return validate(build(Config, raw or {}, ""))


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
    return _resolve_path(name, PACKAGE_CONFIG_DIR)


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
