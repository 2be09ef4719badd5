"""The experiment config's core: the sections every run has (data, optim, train, checkpoint, mesh,
distributed), their validation, and the machinery that assembles and loads a whole config.

A config is a frozen dataclass tree. Its sections come from two places: the core sections defined here,
and the sections the model families register (``model``, ``ensemble``, ``implicit``, ...: see
``jaxcf.families``), which assembles the full :class:`Config` with :func:`assemble`. Every default lives
in a section's dataclass, and nowhere else. YAML is read with ``yaml.safe_load`` only. Unknown keys,
wrong types and out-of-range values raise :class:`ConfigError` with the dotted key, what is allowed and,
for unknown keys, a "did you mean". The training CLI turns that into one line on stderr and exit status 2.

One concept at some length: the config's core sections, their checks and how a config is assembled.

What does not live here: parsing YAML and overrides into the dataclasses (``jaxcf.core.configfile``), the
families' sections and checks (``jaxcf.families``), reading data (``jaxcf.data``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxcf.core.configfile import apply_overrides, build, read_yaml, suggest
from jaxcf.core.configfile import resolve_path as _resolve_path
from jaxcf.core.errors import ConfigError

PACKAGE_CONFIG_DIR = Path(__file__).parents[1] / "configs"


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
    # The timestamp column of a CSV or DataFrame (numbers or dates): read for leave_last and for a family
    # that uses times (its spec says); null for data without times.
    timestamp_col: str | None = "timestamp"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    # adamw: decoupled decay (torch.optim.AdamW); adam: coupled L2 (torch.optim.Adam, the notebook's);
    # lazy_adam, sgd: row-sparse, touching only the rows in a batch (jaxcf.core.optim; not the notebook's).
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
    # Score the validation and test parts every this many epochs (and always after the last one): for
    # families whose metrics cost more than the epoch they follow (a Gibbs sweep takes milliseconds).
    eval_every: int = 1
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


# Bounds that no useful run comes near; past them a typo (1e8 factors) would exhaust memory before any check
# of the data could say so. The memory a run needs is checked too, once the data is known (jaxcf.core.memory).
MAX_FACTORS = 1 << 16
MAX_MEMBERS = 1 << 14
MAX_EPOCHS = 1 << 20
MAX_BATCH = 1 << 26
# The watchdog: below this an epoch's first call (it compiles) would be taken for a stall.
MIN_STALL_SECONDS = 10.0
MAX_STALL_SECONDS = 7 * 24 * 3600.0

# Allowed values for enumerated keys: small explicit sets, no getattr dispatch.
CHOICES: dict[str, tuple[str, ...]] = {
    "optim.name": ("adamw", "adam", "lazy_adam", "sgd"),
    "optim.schedule": ("constant", "cosine", "onecycle"),
}
# The core sections, in the order a config lists them (the families' sections follow).
CORE_SECTIONS = (("data", DataConfig), ("optim", OptimConfig), ("train", TrainConfig),
                 ("checkpoint", CheckpointConfig), ("mesh", MeshConfig), ("distributed", DistributedConfig))


def choice(key: str, value: str, allowed) -> None:
    """Raises ConfigError unless ``value`` is one of ``allowed`` (with a "did you mean")."""
    if value not in allowed:
        raise ConfigError(f"{key}: unknown value {value!r}{suggest(value, list(allowed))}; allowed: "
                          f"{', '.join(allowed)}")


def positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{key}: must be a finite number > 0; got {value!r}")


def non_negative(key: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{key}: must be a finite number >= 0; got {value!r}")


def at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key}: must be an integer >= {low}; got {value!r}")


def at_most(key: str, value: int, high: int) -> None:
    if value > high:
        raise ConfigError(f"{key}: {value} is more than this library allows ({high}); lower it")


def assemble(family_sections) -> type:
    """The Config class: ``seed``, the core sections, then the families' (``(name, dataclass)`` pairs)."""
    fields = [("seed", int, dataclasses.field(default=42))]
    for name, section in (*CORE_SECTIONS[:1], *family_sections[:1], *CORE_SECTIONS[1:], *family_sections[1:]):
        fields.append((name, section, dataclasses.field(default_factory=section)))
    return dataclasses.make_dataclass("Config", fields, frozen=True)


def validate_core(config, members: int = 1) -> None:
    """Checks the core sections' value ranges and names (the families check their own).

    Args:
      members: seeds the run uses above ``seed`` (an ensemble's members use seed + k).

    Raises:
      ConfigError: naming the first offending key and what is allowed.
    """
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        choice(key, getattr(getattr(config, section), name), allowed)
    # Seeds index NumPy's RandomState (0 .. 2**32 - 1).
    if not 0 <= config.seed <= 2**32 - members:
        raise ConfigError(f"seed: must be an integer in [0, {2**32 - members}] (NumPy's seed range, less the "
                          f"{members - 1} member seed(s) above it); got {config.seed!r}")
    for key, value, high in (("train.epochs", config.train.epochs, MAX_EPOCHS),
                             ("train.batch_size", config.train.batch_size, MAX_BATCH),
                             ("train.eval_batch_size", config.train.eval_batch_size, MAX_BATCH),
                             ("train.eval_every", config.train.eval_every, MAX_EPOCHS)):
        at_most(key, value, high)
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
    at_least("train.eval_every", config.train.eval_every, 1)
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
    check_range("data.rating_range", config.data.rating_range)
    if not math.isfinite(config.data.implicit_threshold):
        raise ConfigError(f"data.implicit_threshold: must be a finite number; got {config.data.implicit_threshold!r}")
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


def check_range(key: str, rng) -> None:
    """A ``[low, high]`` pair (or None) with finite low < high."""
    if rng is not None and not (all(map(math.isfinite, rng)) and rng[0] < rng[1]):
        raise ConfigError(f"{key}: must be [low, high] with finite low < high; got {list(rng)!r}")


def has_validation(data: DataConfig) -> bool:
    """Whether ``data`` gives validation rows (a validation file, a leave-last or random split of the
    training rows); a predefined split (ml-100k's u1-u5) has a test part and no validation."""
    if data.valid_path is not None:
        return True
    if data.split is not None:
        return False
    return bool(data.leave_last) or data.valid_fraction > 0


def _validate_roles(config) -> None:
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


def from_dict(raw: Mapping[str, Any] | None, schema: type, validate) -> Any:
    """Builds and validates a config of ``schema`` from nested plain data (as YAML gives it)."""
    return validate(build(schema, raw or {}, ""))


def to_dict(config) -> dict[str, Any]:
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


def read(name: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """A config file (or nothing: the defaults) as plain data with ``--set`` overrides applied.

    Args:
      name: a YAML path, or the name of a config shipped in ``jaxcf/configs``; None for defaults.
      overrides: ``dotted.key=value`` strings.

    Raises:
      ConfigError: for any unusable file or override.
    """
    raw: Any = {}
    if name is not None:
        raw = read_yaml(resolve_path(name))
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config file {str(name)!r} must hold a mapping of sections; got {type(raw).__name__}")
    return apply_overrides(dict(raw), overrides)


def dump(config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
