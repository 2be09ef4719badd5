"""jaxcf: explicit-rating collaborative filtering in JAX/Flax.

Public API re-exports only; importing jaxcf has no side effects.
"""

__version__ = "0.1.0"

from jaxcf.config import Config, ConfigError
from jaxcf.data import DataError
from jaxcf.models import EmbeddingDot, EmbeddingDotBias

__all__ = ["Config", "ConfigError", "DataError", "EmbeddingDot", "EmbeddingDotBias", "__version__"]
