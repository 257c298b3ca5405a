"""Fixtures: float64 mode, seeds and data generators; one XLA compilation cache per run."""

import os
import shutil
import tempfile

import jax
import numpy as np
import pytest
from helpers import enable_x64


def pytest_configure(config):
    """Share compiled programs between the xdist workers and the processes the suite starts
    (the ``jaxem`` command, notebook kernels): most of the suite's time is XLA compilation,
    and many tests compile the same program. The cache lives for this run only. Block
    budgets measured on this machine (``jaxem tune-blocks``) are ignored: the suite's block
    sizes must not depend on the developer's machine."""
    os.environ["JAXEM_NO_TUNING"] = "1"
    if hasattr(config, "workerinput") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return  # a worker inherits the controller's cache; a user's own cache is kept
    path = tempfile.mkdtemp(prefix="jaxem-test-xla-cache-")
    config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each test module ends by dropping JAX's compiled programs: a worker that keeps every
    program of the suite runs out of memory mappings (see jaxem/_cache.py). The next
    module loads what it shares from the run's compilation cache."""
    yield
    jax.clear_caches()


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
