"""jaxcf.core.linalg against NumPy, no LAPACK kernel in compiled programs, and the sampler that used to hang."""

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcf.core import linalg

ROOT = Path(__file__).parents[1]


def _spd(rng, batch, size):
    x = rng.normal(size=(*batch, size, size))
    return x @ np.swapaxes(x, -1, -2) + size * np.eye(size)


@pytest.mark.parametrize("batch", [(), (7,), (2, 5)])
@pytest.mark.parametrize("size", [1, 3, 20, 45, 128])  # 45 and 128: blocked (linalg.BLOCK = 32)
def test_cholesky_and_solves_match_numpy(batch, size):
    rng = np.random.default_rng(size)
    a = _spd(rng, batch, size)
    b = rng.normal(size=(*batch, size))
    factor = np.asarray(linalg.cholesky(jnp.asarray(a, jnp.float32)), np.float64)
    expected = np.linalg.cholesky(a)
    # float32 against float64: a condition number of ~10 here keeps every error within a few ulps of 1.
    np.testing.assert_allclose(factor, expected, rtol=2e-5, atol=2e-5, err_msg="cholesky")
    assert np.all(np.triu(factor, 1) == 0), "the factor must be lower triangular"
    f32 = jnp.asarray(expected, jnp.float32)
    np.testing.assert_allclose(linalg.solve_lower(f32, jnp.asarray(b, jnp.float32)),
                               np.linalg.solve(expected, b[..., None])[..., 0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(linalg.solve_lower_transpose(f32, jnp.asarray(b, jnp.float32)),
                               np.linalg.solve(np.swapaxes(expected, -1, -2), b[..., None])[..., 0],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(linalg.solve_lower_blocked(f32, jnp.asarray(b, jnp.float32)),
                               np.linalg.solve(expected, b[..., None])[..., 0], rtol=1e-4, atol=1e-5,
                               err_msg="solve_lower by blocks")
    np.testing.assert_allclose(linalg.solve_lower_transpose_blocked(f32, jnp.asarray(b, jnp.float32)),
                               np.linalg.solve(np.swapaxes(expected, -1, -2), b[..., None])[..., 0],
                               rtol=1e-4, atol=1e-5, err_msg="solve_lower_transpose by blocks")
    for solve in (linalg.cho_solve, linalg.cho_solve_blocked):
        np.testing.assert_allclose(solve(f32, jnp.asarray(b, jnp.float32)),
                                   np.linalg.solve(a, b[..., None])[..., 0], rtol=1e-4, atol=1e-5,
                                   err_msg=solve.__name__)
    root = np.asarray(linalg.inverse_root(jnp.asarray(a, jnp.float32)), np.float64)
    np.testing.assert_allclose(root @ np.swapaxes(root, -1, -2), np.linalg.inv(a), rtol=1e-4, atol=1e-6)


def test_a_matrix_that_is_not_positive_definite_gives_nan():
    a = jnp.asarray([[1.0, 2.0], [2.0, 1.0]], jnp.float32)
    assert np.isnan(np.asarray(linalg.cholesky(a))).any()


@pytest.mark.slow
def test_the_gibbs_sampler_finishes_every_time():
    """The configuration that hung in 1 of 3 runs before (ml-100k u4, 2 chains, 40 sweeps)."""
    command = [
        sys.executable, "-m", "jaxcf.train", "--config", "bpmf.yaml", "--quiet", "--set", "data.name=ml-100k",
        "data.split=u4", "train.epochs=40", "ensemble.size=10", "ensemble.chains=2", "ensemble.burn_in=20",
    ]
    for run in range(3):
        workdir = ROOT / "runs" / f"test-gibbs-hang-{run}"
        subprocess.run(["rm", "-rf", str(workdir)], check=True)
        try:
            done = subprocess.run([*command, "--workdir", str(workdir)], cwd=ROOT, capture_output=True, text=True,
                                  timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"run {run + 1}: the sampler made no progress for 300 s (hung)")
        finally:
            subprocess.run(["rm", "-rf", str(workdir)], check=True)
        assert done.returncode == 0, done.stderr
        assert len([line for line in done.stdout.splitlines() if line.strip().split(" ")[0].isdigit()]) == 40
