"""jaxcf: explicit-rating collaborative filtering in JAX/Flax.

Public API re-exports only; importing jaxcf has no side effects. The inference names are loaded
on first use, so that ``python -m jaxcf.recommend`` does not find its own module pre-imported.
"""

__version__ = "0.1.0"

from jaxcf.config import Config, ConfigError
from jaxcf.data import DataError
from jaxcf.models import EmbeddingDot, EmbeddingDotBias

_LAZY = {
    "ModelError": "jaxcf.export",
    "Model": "jaxcf.recommend",
    "Predictions": "jaxcf.recommend",
    "Ranking": "jaxcf.recommend",
    "UnknownIdError": "jaxcf.recommend",
    "load_model": "jaxcf.recommend",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxcf' has no attribute {name!r}")


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
