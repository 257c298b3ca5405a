"""Numerics shared by the Gaussian models: precision Cholesky factors and log-determinants.

Conventions follow scikit-learn's ``sklearn.mixture`` so numbers can be compared one for one:
the *precision Cholesky* factor ``P`` of a covariance ``S`` is the upper-triangular matrix with
``P @ P.T = inv(S)``, i.e. ``P = inv(chol(S)).T``. Log densities are computed through ``P``;
no covariance is ever inverted explicitly.

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


def covariance_shape(covariance_type: str, n_components: int, n_features: int) -> tuple:
    """Shape of ``covariances`` (and of ``precisions_cholesky``) for a covariance type."""
    return {
        "full": (n_components, n_features, n_features),
        "tied": (n_features, n_features),
        "diag": (n_components, n_features),
        "spherical": (n_components,),
    }[covariance_type]


def _chol_to_prec_chol(cov: jax.Array) -> jax.Array:
    # cov: (..., D, D). Non-positive-definite input gives NaN, which callers report.
    chol = jnp.linalg.cholesky(cov)
    eye = jnp.broadcast_to(jnp.eye(cov.shape[-1], dtype=cov.dtype), cov.shape)
    return jnp.swapaxes(solve_triangular(chol, eye, lower=True), -1, -2)


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
    """Covariances ``inv(P @ P.T)`` from precision factors, through triangular solves.

    ``P`` may be upper (computed from covariances) or lower (from user-given precisions).
    """
    if covariance_type in ("full", "tied"):
        precisions = precisions_from_cholesky(prec_chol, covariance_type)
        lower = jnp.linalg.cholesky(precisions)
        eye = jnp.broadcast_to(jnp.eye(lower.shape[-1], dtype=lower.dtype), lower.shape)
        inv_lower = solve_triangular(lower, eye, lower=True)
        return jnp.matmul(jnp.swapaxes(inv_lower, -1, -2), inv_lower, precision=PRECISION)
    return 1.0 / prec_chol**2


def precisions_from_cholesky(prec_chol: jax.Array, covariance_type: str) -> jax.Array:
    """Precision matrices ``P @ P.T`` (scikit-learn's ``precisions_``)."""
    if covariance_type in ("full", "tied"):
        return jnp.matmul(prec_chol, jnp.swapaxes(prec_chol, -1, -2), precision=PRECISION)
    return prec_chol**2


def precision_cholesky_from_precisions(precisions: jax.Array, covariance_type: str) -> jax.Array:
    """A factor ``P`` with ``P @ P.T = precisions`` (for user-given ``precisions_init``).

    Like scikit-learn this takes the lower Cholesky factor of the precision; every formula in
    jaxem uses ``P`` only through ``P @ P.T`` and ``diag(P)``, so lower and upper factors give
    the same densities.
    """
    if covariance_type in ("full", "tied"):
        return jnp.linalg.cholesky(precisions)
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
