"""The experiment config (``jaxcf.Config``): a frozen dataclass tree of sections, loaded from YAML with
``--set`` overrides and validated.

    from jaxcf import config
    cfg = config.load("bias.yaml", ["optim.learning_rate=3e-3"])   # a path or a shipped name; None: defaults

Its sections come from the core (``data``, ``optim``, ``train``, ``checkpoint``, ``mesh``, ``distributed``:
``jaxcf.core.config``) and from the model families through their registry (``model``, ``ensemble``,
``implicit``, ...: ``jaxcf.families``). This module gathers what a user needs of both.
"""

from jaxcf.core.config import (
    CORE_SECTIONS,
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_FACTORS,
    MAX_MEMBERS,
    PACKAGE_CONFIG_DIR,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DistributedConfig,
    MeshConfig,
    OptimConfig,
    TrainConfig,
    dump,
    has_validation,
    resolve_path,
    to_dict,
)
from jaxcf.families import Config, from_dict, load, replace, translate, validate
from jaxcf.families._sections import EnsembleConfig, ImplicitConfig, ModelConfig

__all__ = [
    "CORE_SECTIONS", "MAX_BATCH", "MAX_EPOCHS", "MAX_FACTORS", "MAX_MEMBERS", "PACKAGE_CONFIG_DIR",
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DistributedConfig", "EnsembleConfig",
    "ImplicitConfig", "MeshConfig", "ModelConfig", "OptimConfig", "TrainConfig", "dump", "from_dict",
    "has_validation", "load", "replace", "resolve_path", "to_dict", "translate", "validate",
]
