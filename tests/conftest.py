"""Suite-wide settings: strict numerics, and small shared fixtures."""

import jax
import pytest

# Fail on implicit rank promotion: a [batch] vs [batch, 1] broadcast is a classic embedding bug.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def bundled():
    """The bundled ml-latest-small dataset, split as the notebook (seed 42, 20% validation)."""
    from jaxcf import config, data

    return data.load(config.DataConfig(), seed=42)
