"""jaxcf: explicit-rating collaborative filtering in JAX/Flax.

Public API re-exports only; importing jaxcf has no side effects.
"""

__version__ = "0.1.0"

from jaxcf.config import Config, ConfigError
from jaxcf.data import DataError
from jaxcf.export import ModelError
from jaxcf.models import EmbeddingDot, EmbeddingDotBias
from jaxcf.recommend import Model, Predictions, Ranking, UnknownIdError, load_model

__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "EmbeddingDot",
    "EmbeddingDotBias",
    "Model",
    "ModelError",
    "Predictions",
    "Ranking",
    "UnknownIdError",
    "__version__",
    "load_model",
]
