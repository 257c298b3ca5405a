"""Test helpers: tree comparison and brute-force oracles."""

import itertools

import jax
import numpy as np
from scipy.stats import multivariate_normal

from jaxem._linalg import full_covariance_matrices


def enable_x64(on: bool = True):
    """Context manager setting JAX's float64 mode (the API moved across JAX versions)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(on)
    from jax.experimental import enable_x64 as legacy  # pragma: no cover - older JAX

    return legacy(on)


def tree_allclose(a, b, rtol=1e-7, atol=0.0) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
        return False
    return all(np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
               for x, y in zip(la, lb, strict=True))


def assert_equal_on_cpu(actual, desired, rtol=1e-5, atol=0.0):
    """Bit for bit on the CPU, where the two programs compared round alike; to ``rtol`` and
    ``atol`` on another backend, where XLA may order two programs' sums differently (seen
    on an H100: one float32 ulp)."""
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(actual, desired)
    else:
        np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol)


def full_covariances(params) -> np.ndarray:
    """(K, D, D) float64 covariance matrices for any covariance type."""
    k, d = np.shape(params.means)
    return np.asarray(full_covariance_matrices(np.asarray(params.covariances, float),
                                               params.covariance_type, k, d), float)


def log_joint_oracle(params, x) -> np.ndarray:
    """(N, K) log π_k + log N(x_n | μ_k, Σ_k) with scipy, component by component."""
    covs = full_covariances(params)
    w = np.asarray(params.weights, float)
    means = np.asarray(params.means, float)
    return np.stack([np.log(w[k]) + multivariate_normal(means[k], covs[k]).logpdf(x)
                     for k in range(len(w))], axis=1).reshape(len(x), len(w))


def log_likelihood_by_enumeration(params, x) -> float:
    """log p(x) as the sum over all K^N latent assignments of the complete-data likelihood."""
    lj = log_joint_oracle(params, np.asarray(x, float))
    n, k = lj.shape
    terms = [sum(lj[i, z[i]] for i in range(n)) for z in itertools.product(range(k), repeat=n)]
    terms = np.array(terms)
    m = terms.max()
    return float(m + np.log(np.sum(np.exp(terms - m))))


def random_params(rng, k, d, covariance_type, dtype=np.float64):
    """Random valid GMM params (via jaxem.gmm.make_params)."""
    from jaxem import gmm

    w = rng.dirichlet(np.ones(k) * 2)
    means = rng.normal(size=(k, d)) * 2
    if covariance_type == "full":
        a = rng.normal(size=(k, d, d))
        cov = a @ np.swapaxes(a, 1, 2) + np.eye(d)
    elif covariance_type == "tied":
        a = rng.normal(size=(d, d))
        cov = a @ a.T + np.eye(d)
    elif covariance_type == "diag":
        cov = rng.uniform(0.5, 2.0, size=(k, d))
    else:
        cov = rng.uniform(0.5, 2.0, size=(k,))
    return gmm.make_params(w.astype(dtype), means.astype(dtype), cov.astype(dtype),
                           covariance_type)
