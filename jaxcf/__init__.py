"""jaxcf: collaborative filtering in JAX/Flax.

Public API re-exports only; importing jaxcf has no side effects. ``jaxcf.fit`` is resolved on first
use: training brings optax and orbax, which loading a model and predicting never needs.
"""

__version__ = "0.2.0"

from jaxcf.config import Config
from jaxcf.core.cache import enable_compilation_cache
from jaxcf.core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    JaxcfError,
    ModelError,
    TrainingDiverged,
    TrainingStalled,
    UnknownIdError,
    WorkdirError,
)
from jaxcf.core.models import EmbeddingDot, EmbeddingDotBias
from jaxcf.data.registry import bundled_frame as ratings_frame
from jaxcf.serving.inference import Model, Predictions, Ranking, load_model


def __getattr__(name: str):
    if name == "fit":  # the training stack, imported only when asked for (see the module docstring)
        from jaxcf.training.api import fit

        return fit
    raise AttributeError(f"module 'jaxcf' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "EmbeddingDot",
    "EmbeddingDotBias",
    "JaxcfError",
    "Model",
    "ModelError",
    "Predictions",
    "Ranking",
    "TrainingDiverged",
    "TrainingStalled",
    "UnknownIdError",
    "WorkdirError",
    "__version__",
    "enable_compilation_cache",
    "fit",
    "load_model",
    "ratings_frame",
]
