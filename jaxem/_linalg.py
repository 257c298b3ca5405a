"""Numerics shared by the Gaussian models: precision Cholesky factors and log-determinants.

Conventions follow scikit-learn's ``sklearn.mixture`` so numbers can be compared one for one:
the *precision Cholesky* factor ``P`` of a covariance ``S`` is the upper-triangular matrix with
``P @ P.T = inv(S)``, i.e. ``P = inv(chol(S)).T``. It is unique (positive diagonal), and
every way of building parameters gives this one: from covariances, from precisions (where
scikit-learn's initialisation keeps a lower factor), from a fit or a file. Log densities are
computed through ``P``; no covariance or precision matrix is ever inverted, only
triangular factors, by triangular solves.

Shapes per covariance type (K components, D features):

=========  ==================  =====================
type       covariances         precisions_cholesky
=========  ==================  =====================
full       (K, D, D)           (K, D, D)
tied       (D, D)              (D, D)
diag       (K, D)              (K, D)
spherical  (K,)                (K,)
=========  ==================  =====================
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")

# Every matrix product in jaxem states its precision: on GPUs the default for float32 is TF32
# (10-bit mantissa), which costs three decimal digits in the log-likelihood.
PRECISION = jax.lax.Precision.HIGHEST


# The one table of the covariance types: (shape of covariances and precision factors, number
# of free covariance parameters) for K components and D features.
_COVARIANCE_LAYOUT = {
    "full": lambda k, d: ((k, d, d), k * d * (d + 1) // 2),
    "tied": lambda k, d: ((d, d), d * (d + 1) // 2),
    "diag": lambda k, d: ((k, d), k * d),
    "spherical": lambda k, d: ((k,), k),
}


def covariance_shape(covariance_type: str, n_components: int, n_features: int) -> tuple:
    """Shape of ``covariances`` (and of ``precisions_cholesky``) for a covariance type."""
    return _COVARIANCE_LAYOUT[covariance_type](n_components, n_features)[0]


def n_covariance_parameters(covariance_type: str, n_components: int, n_features: int) -> int:
    """Free parameters in the covariances of a mixture (scikit-learn's count, for BIC/AIC)."""
    return _COVARIANCE_LAYOUT[covariance_type](n_components, n_features)[1]


def full_covariance_matrices(covariances: jax.Array, covariance_type: str,
                             n_components: int, n_features: int) -> jax.Array:
    """(K, D, D) covariance matrices from covariances of any type (plots, oracles)."""
    cov = jnp.asarray(covariances)
    eye = jnp.eye(n_features, dtype=cov.dtype)
    return {
        "full": lambda: cov,
        "tied": lambda: jnp.broadcast_to(cov, (n_components, n_features, n_features)),
        "diag": lambda: cov[:, :, None] * eye,
        "spherical": lambda: cov[:, None, None] * eye,
    }[covariance_type]()


def _chol_to_prec_chol(cov: jax.Array) -> jax.Array:
    # cov: (..., D, D). Non-positive-definite input gives NaN, which callers report.
    return jnp.swapaxes(lower_triangular_inverse(jnp.linalg.cholesky(cov)), -1, -2)


def lower_triangular_inverse(chol: jax.Array) -> jax.Array:
    """``inv(L)`` of lower-triangular matrices (..., D, D); NaN rows where ``L`` has NaN.

    On CPUs from :data:`SUBSTITUTION_MIN_FEATURES` features up by forward substitution in
    JAX operations, otherwise by the backend's triangular solve. (JAX's CPU triangular
    solve calls the LAPACK/BLAS that scipy ships, OpenBLAS, which runs a 32 × 32 solve on
    threads of its own; those threads then spin beside XLA's and slowed a whole EM
    iteration on the 2-core CPU by a quarter to a half: full, N = 1e5, D = 32, K = 8, 36-41
    ms against 21-28 ms with this loop. The Cholesky factorisation itself stays with
    LAPACK: OpenBLAS does not thread it at these sizes.)
    """
    eye = jnp.broadcast_to(jnp.eye(chol.shape[-1], dtype=chol.dtype), chol.shape)
    if chol.shape[-1] < SUBSTITUTION_MIN_FEATURES:
        return solve_triangular(chol, eye, lower=True)
    return jax.lax.platform_dependent(
        chol, cpu=_forward_substitution_inverse,
        default=lambda a: solve_triangular(a, eye, lower=True))


# Below this many features OpenBLAS solves on one thread (measured per iteration, full,
# N = 1e5, LAPACK / loop: D = K = 16 15.3 / 15.1 ms, D = 24, K = 8 12.4 / 12.3 ms), and
# LAPACK's call compiles faster than the loop (a 1,000-dataset fit_batch at D = 2: 0.69
# against 0.78 s).
SUBSTITUTION_MIN_FEATURES = 24


def _forward_substitution_inverse(chol: jax.Array) -> jax.Array:
    d = chol.shape[-1]
    eye = jnp.eye(d, dtype=chol.dtype)
    diag = jnp.diagonal(chol, axis1=-2, axis2=-1)

    def row(i, inv):
        # Row i of inv(L): (e_i − L[i, :i] inv[:i]) / L[i, i]; rows ≥ i of inv are still 0.
        li = jax.lax.dynamic_index_in_dim(chol, i, axis=-2, keepdims=False)
        done = jnp.einsum("...j,...jk->...k", li, inv, precision=PRECISION)
        pivot = jax.lax.dynamic_index_in_dim(diag, i, axis=-1, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(inv, (eye[i] - done) / pivot, i, axis=-2)

    return jax.lax.fori_loop(0, d, row, jnp.zeros_like(chol))


def precision_cholesky(covariances: jax.Array, covariance_type: str) -> jax.Array:
    """Precision Cholesky factors from covariances (scikit-learn's ``precisions_cholesky_``).

    Args:
      covariances: covariances in the shape of ``covariance_type`` (see module docstring).
      covariance_type: one of ``full``, ``tied``, ``diag``, ``spherical``.

    Returns:
      Array of the same shape; NaN where a covariance is not positive definite.
    """
    if covariance_type in ("full", "tied"):
        return _chol_to_prec_chol(covariances)
    # diag/spherical: P = 1/sqrt(var); a non-positive variance gives NaN, not inf.
    return jnp.where(covariances > 0, jax.lax.rsqrt(jnp.maximum(covariances, 0.0)), jnp.nan)


def covariances_from_precision_cholesky(prec_chol: jax.Array, covariance_type: str) -> jax.Array:
    """Covariances ``inv(P @ P.T) = P⁻ᵀ P⁻¹`` from upper precision factors (a triangular solve)."""
    if covariance_type in ("full", "tied"):
        eye = jnp.broadcast_to(jnp.eye(prec_chol.shape[-1], dtype=prec_chol.dtype),
                               prec_chol.shape)
        p_inv = solve_triangular(prec_chol, eye, lower=False)
        return jnp.matmul(jnp.swapaxes(p_inv, -1, -2), p_inv, precision=PRECISION)
    return 1.0 / prec_chol**2


def precisions_from_cholesky(prec_chol: jax.Array, covariance_type: str) -> jax.Array:
    """Precision matrices ``P @ P.T`` (scikit-learn's ``precisions_``)."""
    if covariance_type in ("full", "tied"):
        return jnp.matmul(prec_chol, jnp.swapaxes(prec_chol, -1, -2), precision=PRECISION)
    return prec_chol**2


def _flip(a: jax.Array) -> jax.Array:
    return a[..., ::-1, ::-1]


def precision_cholesky_from_precisions(precisions: jax.Array, covariance_type: str) -> jax.Array:
    """The upper factor ``P`` with ``P @ P.T = precisions`` (for user-given precisions).

    With J the order-reversing permutation, ``chol(J Λ J) = L`` gives ``Λ = (J L J)(J L J)ᵀ``
    and ``J L J`` is upper triangular: the same factor as ``inv(chol(inv(Λ))).T``, without
    inverting anything. NaN where ``precisions`` is not positive definite.
    """
    if covariance_type in ("full", "tied"):
        return _flip(jnp.linalg.cholesky(_flip(precisions)))
    return jnp.sqrt(precisions)


def log_det_precision_cholesky(
    prec_chol: jax.Array, covariance_type: str, n_features: int
) -> jax.Array:
    """``log det P`` per component: (K,) for full/diag/spherical, () for tied.

    Equals ``-0.5 * log det Σ``.
    """
    if covariance_type == "full":
        return jnp.sum(jnp.log(jnp.diagonal(prec_chol, axis1=-2, axis2=-1)), axis=-1)
    if covariance_type == "tied":
        return jnp.sum(jnp.log(jnp.diagonal(prec_chol)))
    if covariance_type == "diag":
        return jnp.sum(jnp.log(prec_chol), axis=-1)
    return n_features * jnp.log(prec_chol)
