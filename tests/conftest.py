"""Fixtures: float64 mode, seeds and data generators."""

import jax
import numpy as np
import pytest
from helpers import enable_x64


@pytest.fixture
def x64():
    """Run the test body with JAX's float64 mode on."""
    with enable_x64():
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


def make_blobs(rng, n_per=100, k=3, d=2, sep=4.0, offset=0.0):
    """``k`` anisotropic Gaussian blobs of ``n_per`` points in ``d`` dimensions."""
    parts = []
    for _ in range(k):
        a = rng.normal(size=(d, d)) * 0.5 + np.eye(d)
        parts.append(rng.normal(size=(n_per, d)) @ a + sep * rng.normal(size=d) + offset)
    return np.concatenate(parts)


@pytest.fixture
def blobs(rng):
    return make_blobs(rng)
