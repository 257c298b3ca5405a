"""The Gaussian mixture model: params, log-joint, E-step, M-step, initialisation, sampling.

Conventions are scikit-learn's (``sklearn.mixture.GaussianMixture``): the four covariance
types ``full``, ``tied``, ``diag``, ``spherical`` with the same array shapes, precision
Cholesky factors, ``reg_covar`` added to the diagonal and ``nk + 10 * eps`` in the M-step.

The E-step returns *additive* sufficient statistics (sums over samples), centred on the
current means so float32 stays accurate when the data sit far from the origin; the M-step is a
closed-form function of those statistics alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching

from jaxem import _cache, _validation
from jaxem._linalg import (
    COVARIANCE_TYPES,
    PRECISION,
    covariances_from_precision_cholesky,
    log_det_precision_cholesky,
    n_covariance_parameters,
    precision_cholesky,
    precision_cholesky_from_precisions,
)
from jaxem._rowsum import blockwise_sum
from jaxem.kmeans import kmeans, kmeans_plusplus, nearest_center

_LOG_2PI = math.log(2.0 * math.pi)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GMMParams:
    """Parameters of a Gaussian mixture (a pytree; ``covariance_type`` is static).

    ``covariances`` and ``precisions_cholesky`` have the shape of the covariance type:
    full (K, D, D), tied (D, D), diag (K, D), spherical (K,).

    A slot whose weight is exactly 0 is *dead*: it takes no responsibility, adds nothing
    to the statistics or the parameter count, and the M-step keeps it dead (weight 0, mean
    unchanged, unit covariance). So K live components can run inside a program built for
    more slots (a model search over K is one program; see :func:`init`'s ``n_live``). A live
    component never reaches weight 0: the M-step gives an empty one ``10·eps``, as
    scikit-learn does.
    """

    weights: jax.Array  # (K,) mixing proportions, sum to 1
    means: jax.Array  # (K, D)
    covariances: jax.Array  # see class docstring
    precisions_cholesky: jax.Array  # same shape as covariances; P @ P.T = inv(covariance)
    covariance_type: str = dataclasses.field(default="full", metadata=dict(static=True))

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def n_features(self) -> int:
        return self.means.shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GMMStats:
    """Expected sufficient statistics of a Gaussian mixture, summed over samples.

    Moments are taken about ``shift`` (the means the E-step used), so they are additive over
    any partition of the samples that shares the same ``shift``: blocks, devices, hosts.
    """

    nk: jax.Array  # (K,) Σ_n w_n r_nk
    sum_x: jax.Array  # (K, D) Σ_n w_n r_nk (x_n - shift_k)
    # full (K, D, D), tied (D, D), diag/spherical (K, D): second moments (spherical: only
    # their mean over features counts; the E-step's product form puts it in every column)
    sum_xx: jax.Array
    shift: jax.Array  # (K, D) centring point of the moments
    covariance_type: str = dataclasses.field(default="full", metadata=dict(static=True))
    live: jax.Array | None = None  # (K,) bool: slots in use (None: all); see GMMParams


def make_params(
    weights: jax.typing.ArrayLike,
    means: jax.typing.ArrayLike,
    covariances: jax.typing.ArrayLike | None = None,
    covariance_type: str = "full",
    *,
    precisions: jax.typing.ArrayLike | None = None,
) -> GMMParams:
    """Build a :class:`GMMParams` from weights, means and covariances (or precisions).

    Args:
      weights: (K,) mixing proportions summing to 1.
      means: (K, D) component means.
      covariances: covariances in scikit-learn's shape for ``covariance_type``.
      covariance_type: ``full``, ``tied``, ``diag`` or ``spherical``.
      precisions: instead of ``covariances``, precision matrices of the same shape.

    Returns:
      The params pytree, with precision Cholesky factors computed. Concrete (non-traced)
      inputs are validated eagerly: wrong shapes, non-finite values, weights not summing to one
      or matrices that are not positive definite raise ``ValueError``.
    """
    _validation.check_covariance_type(covariance_type)
    if (covariances is None) == (precisions is None):
        raise ValueError("give exactly one of covariances and precisions")
    if not _validation.is_traced(weights, means, covariances, precisions):
        m = np.asarray(means)
        if m.ndim != 2:
            raise ValueError(f"means must be 2-D (n_components, n_features), got shape {m.shape}")
        k, d = m.shape
        _validation.check_weights_init(weights, k, "weights")
        _validation.check_means_init(means, k, d, "means")
        name = "covariances" if precisions is None else "precisions"
        _validation.check_spd(
            covariances if precisions is None else precisions, covariance_type, k, d, name
        )
    means = jnp.asarray(means)
    dtype = means.dtype if jnp.issubdtype(means.dtype, jnp.floating) else jnp.result_type(float)
    means = means.astype(dtype)
    weights = jnp.asarray(weights, dtype)
    if precisions is None:
        covariances = jnp.asarray(covariances, dtype)
        prec_chol = precision_cholesky(covariances, covariance_type)
    else:
        precisions = jnp.asarray(precisions, dtype)
        prec_chol = precision_cholesky_from_precisions(precisions, covariance_type)
        covariances = covariances_from_precision_cholesky(prec_chol, covariance_type)
    return GMMParams(weights, means, covariances, prec_chol, covariance_type)


def _log_weights(weights: jax.Array) -> jax.Array:
    """(K,) log π_k, −inf for a dead slot (π_k = 0), with finite gradients everywhere."""
    live = weights > 0
    return jnp.where(live, jnp.log(jnp.where(live, weights, 1.0)), -jnp.inf)


def _center(params: GMMParams) -> jax.Array:
    """(D,) the mixture mean Σ_k π_k μ_k, subtracted from every block first.

    Centring the data once on a point inside the data cloud removes any common offset (data
    at 1e4 with unit spread) before anything is multiplied, which is what float32 needs.
    """
    return jnp.matmul(params.weights, params.means, precision=PRECISION)


def _whitened_sq_t(params: GMMParams, xt: jax.Array, m: jax.Array, keep_block: bool = True):
    """(K, C) squared Mahalanobis distances ``||(x_n − μ_k) P_k||²`` of one block, and the
    block samples last.

    Args:
      params: mixture parameters.
      xt: (D, C) centred samples ``(x − c)ᵀ`` of the block (samples last; a transposed view
        of the (C, D) block is fine).
      m: (K, D) centred means ``μ_k − c``.
      keep_block: static; whether to return the block as below (the E-step's moments use
        it; a log-density alone does not).

    Returns:
      ``(sq, xt)``: the (K, C) distances, and ``xt`` as a (D, C) array of its own, the last
      D rows of the whitening product (an identity appended to the whitening matrix; the
      rows are exact), or ``None`` without ``keep_block``. XLA:CPU otherwise fuses the
      transpose into every later consumer, which then reads the (C, D) block column by
      column: the moments' (K·D, C) operand took 15 of 63 ms an iteration in a traced
      profile at N = 1e5, D = 64, K = 8 (with these rows: 2.3 ms; the fit 61-76 → 50 ms),
      for 1/K more whitening product (full) or twice tied's small one.

    ``full`` whitens each sample for all K components in one product (O(1) entries, no
    cancellation). ``tied`` expands the square into three small products; in the centred
    coordinates its rounding is ~eps·(separation in standard deviations)². (diag and
    spherical: :func:`_diag_log_joint`.)
    """
    cov_type = params.covariance_type
    pc = params.precisions_cholesky
    k, d = m.shape
    mm = functools.partial(jnp.matmul, precision=PRECISION)
    # Rows k·D + e of P_allᵀ are P_k[:, e]; tied whitens once, for all components.
    w_t = jnp.swapaxes(pc, 1, 2).reshape(k * d, d) if cov_type == "full" else pc.T
    rows = w_t.shape[0]
    if keep_block:
        w_t = jnp.concatenate([w_t, jnp.eye(d, dtype=pc.dtype)])
    both = mm(w_t, xt)  # (K·D or D, C), and the block's D rows at the foot
    if cov_type == "full":
        b = jnp.einsum("kd,kde->ke", m, pc, precision=PRECISION).reshape(k * d, 1)
        y = (both[:rows] - b).reshape(k, d, -1)  # (K, D, C)
        sq = jnp.sum(y * y, axis=1)
    else:
        y = both[:rows]  # (D, C)
        b = mm(m, pc)  # (K, D)
        sq = jnp.sum(y * y, axis=0)[None] - 2.0 * mm(b, y) + jnp.sum(b * b, axis=1)[:, None]
    # (rounding can push a tiny distance below zero)
    return jnp.maximum(sq, 0.0), both[rows:] if keep_block else None


def _log_joint_t(params: GMMParams, xt: jax.Array, m: jax.Array, keep_block: bool = True):
    """``(log_joint, xt)``: the (K, C) log-joint of one block in samples-last layout, and
    the block as a (D, C) array (see :func:`_whitened_sq_t`)."""
    d = params.n_features
    sq, xt = _whitened_sq_t(params, xt, m, keep_block)
    log_det = log_det_precision_cholesky(params.precisions_cholesky, params.covariance_type, d)
    log_det = jnp.broadcast_to(log_det, (params.n_components,))
    return -0.5 * (d * _LOG_2PI + sq) + (log_det + _log_weights(params.weights))[:, None], xt


def _diag_samples_last(n_features: int, n_components: int) -> bool:
    """Whether diag/spherical lay a block out samples last (log-joint and responsibilities
    (K, C)) rather than samples first: when K ≥ D. Measured per iteration at N = 1e5,
    float32, samples first / last: D = 8, K = 64 12.4–16.8 / 6.6–7.2 ms; 8 × 32 7.3–8.2 /
    8.0; 16 × 16 3.9–4.6 / 3.3; 32 × 32 11.2–12.1 / 9.8–10.6; but 32 × 8 2.8–2.9 / 4.4 and
    64 × 8 4.8 / 6.9 (there the (D, C) transposes of the block cost more than they save)."""
    return n_components >= n_features


def _diag_log_joint(params: GMMParams, xc: jax.Array, m: jax.Array, samples_last: bool):
    """diag/spherical log-joint of one block as two products.

    Args:
      params: mixture parameters (diag or spherical).
      xc: (C, D) samples minus the centre c.
      m: (K, D) means minus c.

    Returns:
      ``(log_joint, sq)``: the log-joint ``(−½ P²) sqᵀ + (P² m) xcᵀ + b``, (K, C) with
      ``samples_last`` (static; see :func:`_diag_samples_last`), else (C, K); and
      ``sq = (x−c)²`` (C, D) — for spherical its sum over features ``|x−c|²`` (C, 1): the
      precision is one number per component, so the first product is an outer product and
      the moments need only ``r |x−c|²`` (two products of diag's four; spherical ran as
      slow as diag, 7-8x scikit-learn's cheaper spherical at N = 1e5, D = 32 and 64). ``sq``
      and ``xc`` also give the product-form moments ``r sq``, ``r xc``. Rounding is
      ~eps·(distance from c in standard deviations)². Two products rather than one over
      ``[sq, xc]``: XLA:CPU builds that (C, 2D) concatenation element by element, which took
      60% of a diag E-step at N = 1e5, D = 32, K = 8 (5.9 → 2.6 ms). Samples last, so that
      the responsibilities come out (K, C) and the moments are plain products (with (C, K)
      responsibilities, the moments' products over their transpose ran 2× slower: D = 8,
      K = 64, 4,864-row blocks).
    """
    k, d = m.shape
    pc = params.precisions_cholesky
    log_det = log_det_precision_cholesky(pc, params.covariance_type, d)
    mm = functools.partial(jnp.matmul, precision=PRECISION)
    if params.covariance_type == "spherical":
        p2 = pc**2  # (K,)
        sq = jnp.sum(xc * xc, axis=1, keepdims=True)  # (C, 1)
        quad = -0.5 * p2[:, None] * sq.T if samples_last else -0.5 * sq * p2[None]
        p2m = p2[:, None] * m
        m_sq = p2 * jnp.sum(m * m, axis=1)
    else:
        p2 = pc**2  # (K, D)
        sq = xc * xc
        quad = mm(-0.5 * p2, sq.T) if samples_last else mm(sq, -0.5 * p2.T)
        p2m = p2 * m
        m_sq = jnp.sum(p2 * m * m, axis=1)
    const = log_det + _log_weights(params.weights) - 0.5 * (d * _LOG_2PI + m_sq)
    if samples_last:
        return quad + mm(p2m, xc.T) + const[:, None], sq
    return quad + mm(xc, p2m.T) + const[None], sq


def _log_joint_block(params: GMMParams, x: jax.Array) -> jax.Array:
    c = _center(params)
    xc, m = x - c[None], params.means - c[None]
    if params.covariance_type in ("diag", "spherical"):
        return _diag_log_joint(params, xc, m, samples_last=False)[0]
    return _log_joint_t(params, xc.T, m, keep_block=False)[0].T


# The public functions below are jitted: called eagerly (the estimator's predict, notebooks)
# they are one compiled program each, cached across calls, rather than ops dispatched one by
# one and loops traced again on every call. Inside a caller's jit/vmap/grad they are inlined.
@functools.partial(jax.jit, static_argnames="chunk_size")
def log_joint(params: GMMParams, x: jax.Array, *, chunk_size: int | None = None) -> jax.Array:
    """``log π_k + log N(x_n | μ_k, Σ_k)`` for every sample and component.

    Args:
      params: mixture parameters.
      x: (N, D) data.
      chunk_size: rows per block (static; ``None``: automatic), bounding the temporaries.

    Returns:
      (N, K) log-joint matrix.
    """
    x = jnp.asarray(x, params.means.dtype)
    n = x.shape[0]
    if chunk_size is None:
        chunk_size = auto_chunk_size(
            n, params.n_components, params.n_features, x.dtype, params.covariance_type
        )
    if chunk_size >= n:
        return _log_joint_block(params, x)
    n_chunks = -(-n // chunk_size)
    xb = jnp.pad(x, ((0, n_chunks * chunk_size - n), (0, 0)), mode="edge")
    xb = xb.reshape(n_chunks, chunk_size, -1)
    out = jax.lax.map(functools.partial(_log_joint_block, params), xb)
    return out.reshape(n_chunks * chunk_size, -1)[:n]


def _e_step_block(params: GMMParams, x: jax.Array, w: jax.Array, exact=None, c=None,
                  quad=None):
    """One block of the E-step: moments about the current means, and Σ w log p(x_n).

    full/tied are laid out samples-last ((K, C), (K·D, C)) so that the heavy steps are
    single large matrix products (see :func:`_whitened_sq_t` and :func:`_moments_t`);
    diag/spherical around (x−c)² and x−c, samples last when K ≥ D
    (:func:`_diag_log_joint`, :func:`_diag_samples_last`). With
    ``exact`` (:class:`_ExactRows`; diag/spherical) the moments are taken as products
    about the mixture centre, and centred on the means for the first ``exact.count`` of its
    components too (see :func:`_product_moments`). With ``quad = (B, const)`` (full) the
    block is one (C, ~D²/2) array ``z`` of quadratic features: the log-joint is ``z @ B``
    and the moments about c are ``rᵀ z`` (see :func:`_quadratic_moments`). ``c`` is the
    point the block is centred on (default :func:`_center`; restarts share one, see
    :func:`_shared_center`).
    """
    cov_type = params.covariance_type
    c = _center(params) if c is None else c
    xc = x - c[None]  # (C, D)
    m = params.means - c[None]  # (K, D)
    xt = None  # the block samples last, where a sweep makes it (whitened full and tied)
    if cov_type in ("diag", "spherical"):
        last = _diag_samples_last(params.n_features, params.n_components)
        log_prob, sq = _diag_log_joint(params, xc, m, last)  # (K, C) or (C, K); (C, D or 1)
        wr, log_norm = _weighted_responsibilities(log_prob, w, axis=0 if last else 1)
        wr = wr if last else wr.T  # (K, C)
    elif quad is not None:  # full, as a quadratic form (see _full_quadratic_coefs)
        b, const = quad
        z = _quadratic_features(xc)  # (C, n_pairs + D)
        log_prob = jnp.matmul(z, b, precision=PRECISION) + const[None]  # (C, K)
        wr, log_norm = _weighted_responsibilities(log_prob, w, axis=1)  # (C, K)
        p = z.shape[1] - xc.shape[1]
        s = jnp.matmul(wr.T, z, precision=PRECISION)  # (K, n_pairs + D): Σ w r z
        moments = (jnp.sum(wr, axis=0), s[:, p:], s[:, :p])
    else:
        log_prob, xt = _log_joint_t(params, xc.T, m)  # (K, C), (D, C)
        wr, log_norm = _weighted_responsibilities(log_prob, w, axis=0)  # (K, C)
    if exact is None and quad is None:
        moments = _moments_t(xc, wr, m, cov_type, xt)
    elif exact is not None:
        s_sq = jnp.matmul(wr, sq, precision=PRECISION)  # (K, D or 1): Σ w r (x−c)²
        s_lin = jnp.matmul(wr, xc, precision=PRECISION)  # (K, D): Σ w r (x−c)
        idx = exact.index
        # Each slot is a cond of its own (zeros beyond exact.count, or where the block
        # holds none of its responsibility): no cond around them all is needed.
        exact_moments = _spherical_moments if cov_type == "spherical" else _diag_moments
        rows = exact_moments(xc, wr[idx], m[idx], exact.count)
        moments = (jnp.sum(wr, axis=1), s_lin, s_sq, *rows)
    # Weight-zero rows (padding, overlap) add exactly zero, even if their density overflowed;
    # where it did not, d total / d w_n = log p(x_n) still holds at w_n = 0.
    total = jnp.sum(w * jnp.where((w > 0) | jnp.isfinite(log_norm), log_norm, 0.0))
    return moments, total


def _max_over(a: jax.Array, axis: int) -> jax.Array:
    """``jnp.max(a, axis, keepdims=True)`` for a 2-D ``a``; over the leading axis as a tree of
    elementwise maxima of contiguous halves, which XLA:CPU fuses into one vectorised pass
    (its own reduction over the leading axis of a (32, 9,216) block took 0.55 ms, half a
    diag E-step at D = 8, K = 32)."""
    if axis != 0:
        return jnp.max(a, axis=axis, keepdims=True)
    leftovers = []
    while a.shape[0] > 1:
        half = a.shape[0] // 2
        if a.shape[0] % 2:
            leftovers.append(a[-1:])
        a = jnp.maximum(a[:half], a[half:2 * half])
    return functools.reduce(jnp.maximum, leftovers, a)


def _weighted_responsibilities(log_prob: jax.Array, w: jax.Array, axis: int):
    """``(w·r, log p(x))``: responsibilities times the sample weights, and each sample's
    log-density, from the log-joint ``log_prob`` with components along ``axis``.

    ``logsumexp`` and then ``exp(log_prob − log p)`` would exponentiate every entry twice;
    here once: ``e = exp(log_prob − max)``, ``r = e / Σ e``, ``log p = max + log Σ e``
    (measured: diag, N = 1e5, D = 8, K = 64, ~8% of an iteration). A row whose log-joint
    is −inf throughout (an overflow, or padding) gets r = 0 and log p = −inf, as before.
    """
    top = jax.lax.stop_gradient(_max_over(log_prob, axis))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e = jnp.exp(log_prob - top)
    total = jnp.sum(e, axis=axis, keepdims=True)
    r = e / jnp.where(total > 0, total, 1.0)
    w = jnp.expand_dims(w, axis)
    return w * r, jnp.squeeze(top + jnp.log(total), axis)


def _moments_t(xc: jax.Array, wr: jax.Array, m: jax.Array, cov_type: str, xt=None):
    """Weighted moments of one block about per-component points, as large products.

    Args:
      xc: (C, D) samples minus the centre c.
      xt: the same samples last, (D, C), as an array of its own (see
        :func:`_whitened_sq_t`); default ``xc.T``.
      wr: (K, C) sample weight times responsibility (samples last).
      m: (K, D) centring points minus c (the current means, for the E-step).
      cov_type: covariance type (static).

    Returns:
      ``(nk, sum_x, sum_xx)``: Σ w r, Σ w r (x − μ_k), and the second moments about μ_k.
      For ``full`` these are ``Aᵀ (x − c)`` with ``A = w r ⊙ (x − μ_k)`` stacked over
      components, minus a rank-one correction, with ``sum_x`` taken from the same terms: the
      rounding stays proportional to |x − μ_k| (a collapsed component gets ~eps², not
      eps·|x|²).
    """
    k, d = m.shape
    mm = functools.partial(jnp.matmul, precision=PRECISION)
    xt = xc.T if xt is None else xt
    nk = jnp.sum(wr, axis=1)
    if cov_type in ("diag", "spherical"):
        return (nk, *_diag_moments(xc, wr, m))
    if cov_type == "full":
        diff_t = xt[None] - m[:, :, None]  # (K, D, C) x − μ_k
        a_t = (wr[:, None, :] * diff_t).reshape(k * d, -1)
        # One product gives Σ w r (x−μ)(x−c)ᵀ and, through the ones column, Σ w r (x−μ).
        xc1 = jnp.concatenate([xc, jnp.ones((xc.shape[0], 1), xc.dtype)], axis=1)
        s = mm(a_t, xc1).reshape(k, d, d + 1)
        sum_x = s[:, :, d]
        sum_xx = s[:, :, :d] - sum_x[:, :, None] * m[:, None, :]
        sum_xx = 0.5 * (sum_xx + jnp.swapaxes(sum_xx, 1, 2))
    elif cov_type == "tied":
        # About each sample's responsibility-weighted mean m̄ = Σ_k r_k m_k, per sample
        #   Σ_k r_k (x − m_k)(x − m_k)ᵀ = (x − m̄)(x − m̄)ᵀ + ½ Σ_kj r_k r_j (m_k − m_j)(m_k − m_j)ᵀ,
        # and with G = Σ_n w r rᵀ (K, K) and its Laplacian L = diag(Σ_{j≠k} G_kj) − G_offdiag
        # the second term summed over samples is mᵀ L m, and Σ_n w r_k (m̄ − m_k) = −(L m)_k.
        # All products (no (K, D, C) array: 7x faster at N = 1e5, D = 32, K = 8), and no
        # cancellation of terms as large as the components' separation: the residuals are
        # ~σ, and L only holds the overlap between components.
        s = jnp.sum(wr, axis=0)  # (C,) the sample weights
        inv = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
        u = xt - mm(m.T, wr) * inv[None]  # (D, C) x − m̄
        g = mm(wr * inv[None], wr.T)  # (K, K) Σ w r_k r_j
        g_off = g * (1.0 - jnp.eye(k, dtype=g.dtype))
        lm = jnp.sum(g_off, axis=1)[:, None] * m - mm(g_off, m)  # (K, D) L m
        sum_x = mm(wr, u.T) - lm
        sum_xx = mm(u * s[None], u.T) + mm(m.T, lm)
        sum_xx = 0.5 * (sum_xx + sum_xx.T)
    return nk, sum_x, sum_xx


def _pairs(d: int):
    """The feature pairs of :func:`_quadratic_features`: ``(rows, cols, weight)``, static.

    Column ``j·D + i`` holds the pair ``(i, (i + j) mod D)`` for ``j = 0 … ⌊D/2⌋``: the
    diagonal (j = 0) and every other unordered pair once, except that for even D the pairs
    ``j = D/2`` come twice (from both ends). ``weight`` is how many times the symmetric
    quadratic form counts a column: 1 on the diagonal, 2 off it, 1 for a pair seen twice.
    """
    j, i = np.divmod(np.arange(d * (d // 2 + 1)), d)
    weight = np.where(j == 0, 1.0, np.where(2 * j == d, 1.0, 2.0))
    return i, (i + j) % d, weight


def _quadratic_features(xc: jax.Array) -> jax.Array:
    """(C, D(⌊D/2⌋+1) + D): ``[(x−c)_i (x−c)_{(i+j) mod D} for j ≤ D/2, x−c]`` per sample.

    The sufficient statistics of a Gaussian, each product (about) once: the log-joint of all
    K components is then ``z @ B`` and the M-step moments ``rᵀ z``, two products about half
    as wide as the whitened form (D²/2 + 2D columns instead of D² + D). The cyclic packing
    (see :func:`_pairs`) is ⌊D/2⌋+1 shifted copies of the block times the block: contiguous
    slices that XLA fuses into one pass (a gather of the upper triangle runs ~10× slower on
    the CPU, and D ragged row slices compile 2× slower).
    """
    n, d = xc.shape
    xx = jnp.concatenate([xc, xc[:, : d // 2]], axis=1)
    shifted = jnp.stack([xx[:, j:j + d] for j in range(d // 2 + 1)], axis=1)  # (C, J, D)
    return jnp.concatenate([(xc[:, None, :] * shifted).reshape(n, -1), xc], axis=1)


def _precision_matrices(pc: jax.Array) -> jax.Array:
    """(K, D, D) precision matrices ``Λ = P Pᵀ`` from their (K, D, D) Cholesky factors."""
    return jnp.matmul(pc, jnp.swapaxes(pc, 1, 2), precision=PRECISION)


def _full_quadratic_coefs(params: GMMParams, c: jax.Array):
    """``(B, const)`` with ``log π_k + log N(x | μ_k, Σ_k) = (z @ B)_k + const_k``.

    ``z`` is :func:`_quadratic_features` of ``x − c``; with ``Λ = P Pᵀ`` and ``m = μ − c``,
    ``−½ (x−c−m)ᵀ Λ (x−c−m) = −½ Σ_pairs weight·Λ_ij z_ij + (Λ m)ᵀ (x−c) − ½ mᵀ Λ m``.
    """
    pc = params.precisions_cholesky
    d = params.n_features
    m = params.means - c[None]
    lam = _precision_matrices(pc)
    lm = jnp.einsum("kde,ke->kd", lam, m, precision=PRECISION)
    rows, cols, weight = _pairs(d)
    b_quad = -0.5 * lam[:, rows, cols] * weight.astype(lam.dtype)
    b = jnp.concatenate([b_quad, lm], axis=1).T  # (n_pairs + D, K)
    log_det = log_det_precision_cholesky(pc, "full", d)
    const = log_det + _log_weights(params.weights) - 0.5 * (d * _LOG_2PI + jnp.sum(lm * m, axis=1))
    return b, const


def _quadratic_rounding(offset: jax.Array, cov: jax.Array, lam: jax.Array) -> jax.Array:
    """(K,) ``eps · uᵀ |Λ| u`` with ``u = |offset| + sqrt(diag Σ)``: the relative rounding of
    a full covariance (in its own metric) and of the quadratic form, taken about a point
    ``offset`` away from the mean instead of about the mean. With Λ diagonal this is the sum
    over features of diag's ``(m² + σ²)/σ²``; correlations enter through ``|Λ|``.
    """
    u = jnp.abs(offset) + jnp.sqrt(jnp.maximum(jnp.diagonal(cov, axis1=1, axis2=2), 0.0))
    r = jnp.einsum("kd,kde,ke->k", u, jnp.abs(lam), u, precision=PRECISION)
    return jnp.finfo(cov.dtype).eps * r


def _diag_moments(xc: jax.Array, wr: jax.Array, m: jax.Array, count=None):
    """``Σ w r (x − μ_k)`` and ``Σ w r (x − μ_k)²`` (both (R, D)), one component at a time;
    with ``count`` (a traced int), only for the first ``count`` of the R (zeros for the
    rest, at no cost: each component is a ``cond``).

    Two vector–matrix products per component over a (C, D) residual that stays in cache:
    ~3× faster on the CPU than one contraction over a (K, D, C) array.
    """
    def one(wr_k, m_k):
        d = xc - m_k[None]
        return (jnp.matmul(wr_k, d, precision=PRECISION),
                jnp.matmul(wr_k, d * d, precision=PRECISION))

    return _first_of(one, count, xc[0, 0], wr, m)


def _spherical_moments(xc: jax.Array, wr: jax.Array, m: jax.Array, count=None):
    """spherical's :func:`_diag_moments`: ``Σ w r (x − μ_k)`` (R, D), and
    ``Σ w r |x − μ_k|²`` spread over the D columns (its mean over features in each, all the
    M-step reads; see :class:`GMMStats`): one vector–matrix product and one reduction over
    the features of each row per component. (``Σ w r (x − μ_k)`` through the centre,
    ``Σ w r (x−c) − nk m``, rounds by ~eps·|μ − c|, which the M-step's ``|Σ w r (x − μ)|²/nk``
    carries into a collapsed component's variance: 2% of reg_covar for 3 duplicates 7 from
    the centre.)"""
    d = m.shape[1]

    def one(wr_k, m_k):
        res = xc - m_k[None]
        s_xx = jnp.dot(wr_k, jnp.sum(res * res, axis=1), precision=PRECISION)
        return (jnp.matmul(wr_k, res, precision=PRECISION),
                jnp.broadcast_to(s_xx / d, (d,)))

    return _first_of(one, count, xc[0, 0], wr, m)


def _first_of(one, count, zero, wr, *rows):
    """``one(wr_k, *rows_k)`` over the leading axis (``lax.map``), only for the first
    ``count`` (traced, unbatched; ``None``: all) and only where ``wr_k`` is not all zero
    (under a ``vmap``: for no member), zeros for the rest — exactly what those rows add. A
    collapsed component (a few points, variance ~reg_covar) holds responsibility in a few
    blocks only: its exact rows cost one pass over the (C,) row of ``wr`` elsewhere instead
    of one over the (C, D) block (diag, N = 2e5, D = 64, K = 8: one such component took
    ~1/3 of every sweep). ``zero``: a scalar 0 of the block's, so that inside ``shard_map``
    both branches vary over the devices alike."""
    rows = (wr, *rows)
    if count is None:
        return jax.lax.map(lambda a: one(*a), rows)
    like = jax.eval_shape(one, *(r[0] for r in rows))

    def slot(args):
        j, *a = args
        empty = _all_batch_members(jnp.all(a[0] == 0))
        return jax.lax.cond((j < count) & ~empty, lambda: one(*a),
                            lambda: jax.tree_util.tree_map(
                                lambda t: jnp.broadcast_to(zero * 0, t.shape).astype(t.dtype),
                                like))

    return jax.lax.map(slot, (jnp.arange(rows[0].shape[0]), *rows))


# Bytes of the E-step's per-block temporaries. ``full`` spends its block on matrix products,
# which like 512-1024 rows at K = D = 32; tied, diag and spherical hold a few (K, rows) and
# (D, rows) arrays, and like 2-8k rows at K = D = 64 (tied: 1.5-3k rows from D, K = 8…64,
# each within 1.2x of the best size tried at N = 1e5). Measured on a 2-core x86 CPU (see
# benchmarks/README.md).
CHUNK_BUDGET_BYTES = {"full": 8 * 2**20, "tied": 2 * 2**20, "diag": 4 * 2**20,
                      "spherical": 4 * 2**20}
# On accelerators the budgets are this many times larger (bounded by a share of the device's
# memory): a GPU wants large blocks, not cache-sized ones. Measured on an H100
# (benchmarks/bench_blocks.py): with the CPU budgets the E-step ran 2.1x (diag, N = 2e5,
# D = K = 16) to 7.5x (full, N = 1e6, D = K = 32: 512-row blocks) slower than with
# 65,536-262,144-row blocks.
ACCELERATOR_BUDGET_SCALE = 256
ACCELERATOR_BUDGET_MEMORY_SHARE = 1 / 32


def default_budget_bytes(covariance_type: str) -> int:
    """The block budget before any measurement on this machine: :data:`CHUNK_BUDGET_BYTES`
    on CPUs (sized for this project's CPU's caches), :data:`ACCELERATOR_BUDGET_SCALE` times
    that on a GPU or TPU."""
    budget = CHUNK_BUDGET_BYTES[covariance_type]
    return budget if jax.devices()[0].platform == "cpu" else budget * ACCELERATOR_BUDGET_SCALE


def _nearest_shape_budget(by_shape: dict[str, int], n_features: int, n_components: int):
    """The budget measured for the shape ``"DxK"`` nearest to (D, K) in (log D, log K)."""
    def distance(shape):
        d, k = (int(v) for v in shape.split("x"))
        return math.log(d / n_features) ** 2 + math.log(k / n_components) ** 2

    return by_shape[min(sorted(by_shape), key=distance)]


def chunk_budget_bytes(covariance_type: str, n_features: int | None = None,
                       n_components: int | None = None) -> int:
    """The E-step block's temporaries budget on the default backend: given the shape, the
    one measured on this machine for the nearest shape by
    :func:`jaxem.tuning.tune_block_budgets` (``jaxem tune-blocks``) if any, else
    :func:`default_budget_bytes`; on a GPU or TPU at most
    :data:`ACCELERATOR_BUDGET_MEMORY_SHARE` of its memory."""
    tuned = _cache.tuned_block_budgets().get(covariance_type)
    if tuned and n_features is not None and n_components is not None:
        return within_device_memory(_nearest_shape_budget(tuned, n_features, n_components))
    return within_device_memory(default_budget_bytes(covariance_type))


def within_device_memory(budget: int) -> int:
    """``budget`` bytes, on a GPU or TPU at most :data:`ACCELERATOR_BUDGET_MEMORY_SHARE` of
    its memory (CPUs: unchanged)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return budget
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # some backends have no memory statistics
        limit = None
    return int(budget if not limit else min(budget, limit * ACCELERATOR_BUDGET_MEMORY_SHARE))


CHUNK_ROW_ALIGN = 256  # automatic block sizes are multiples of this many rows


def auto_chunk_size(
    n_samples: int, n_components: int, n_features: int, dtype, covariance_type: str = "full",
    batch: int = 1, budget_bytes: int | None = None,
) -> int:
    """Rows per E-step block so that its temporaries fit in ``budget_bytes`` (default
    :func:`chunk_budget_bytes` for this shape).

    ``batch`` parameter sets processed together (vmapped restarts) share the budget.
    """
    itemsize = np.dtype(dtype).itemsize
    k, d = n_components, n_features
    if covariance_type in ("diag", "spherical"):
        # (rows, K) log-joint and responsibilities per set; the (rows, 2D) features of the
        # block are shared by the sets (one centre, see _shared_center).
        per_row = batch * 3 * k + 2 * d
    elif covariance_type == "tied":  # the same, with (D, rows) whitened data and residuals
        per_row = batch * (3 * k + 2 * d)
    else:
        per_row = batch * 3 * k * d
    per_row = per_row * itemsize
    if budget_bytes is None:
        budget_bytes = chunk_budget_bytes(covariance_type, d, k)
    chunk = budget_bytes // per_row
    # Whole multiples of CHUNK_ROW_ALIGN rows: an odd block size (13,107 rows) made the
    # diag E-step at N = 2e5, D = K = 16 1.3x slower than its aligned neighbour (13,056),
    # and full at D = K = 8 1.6x (measured on the 2-core CPU).
    # And never fewer: below it the per-block overhead (~40 ops a block) outweighs the cache:
    # full at N = 1e5, D = K = 64 (170 rows from the budget) ran its quadratic form in
    # 428 ms at 170 rows and 328 ms at 256, its whitened sweep alike (483 / 474 ms).
    chunk = max(chunk - chunk % CHUNK_ROW_ALIGN, CHUNK_ROW_ALIGN)
    return int(min(n_samples, chunk))


def e_step(
    params: GMMParams,
    x: jax.Array,
    weights: jax.Array | None = None,
    *,
    chunk_size: int | None = None,
    axis_name: str | None = None,
    batch: int = 1,
    batch_axis: str | None = None,
    moments: str = "auto",
) -> tuple[GMMStats, jax.Array]:
    """E-step: responsibilities, reduced at once to expected sufficient statistics.

    Args:
      params: current parameters.
      x: (N, D) data.
      weights: optional (N,) non-negative sample weights (default: all ones).
      chunk_size: rows per block (static). The samples stream through in blocks, so peak
        memory is O(chunk_size·K·D) on top of the data. ``None`` picks it from
        :func:`chunk_budget_bytes`; ``chunk_size >= N`` is a single pass.
      axis_name: inside ``shard_map``/``pmap`` over samples, the mapped axis to ``psum`` the
        statistics over (data parallelism); the result is then the same on every device.
      batch: number of parameter sets vmapped together (restarts); the automatic block
        size shrinks accordingly so the temporaries stay in cache.
      batch_axis: inside ``vmap(..., axis_name=batch_axis)`` over parameter sets, the axis
        over which they share one centre for the blocks (:func:`_shared_center`). Under any
        vmap, named or not, the members agree on the path for the moments, so one branch
        runs, not both (:func:`_all_batch_members`).
      moments: ``"product"``: diag/spherical take their second moments as matrix
        products about the mixture centre, with the components whose rounding would
        exceed :data:`PRODUCT_MOMENTS_RTOL` of a variance taken centred on their means (in
        the same sweep, or in a second one for up to ⌈K/8⌉ found after it; beyond that the
        iteration falls back to moments centred on every mean, see
        :func:`_product_sweeps`); full takes log-joint and moments as
        products over quadratic features (:func:`_quadratic_features`) unless their
        rounding would exceed :data:`QUADRATIC_FORM_RTOL`, else whitens. ``"centred"``:
        always whitened/centred. ``"auto"`` (default): ``"product"`` where it pays
        (:func:`_product_form_pays`: large enough N·K·D, and for full 2K ≥ D and
        K·D ≥ 256), else ``"centred"``. Static.

    Returns:
      ``(stats, log_likelihood)``: the statistics summed over samples, and the weighted mean
      of ``log p(x_n)``, ``Σ w_n log p(x_n) / Σ w_n``.
    """
    _validation.check_moments(moments)
    dtype = params.means.dtype
    x = jnp.asarray(x, dtype)
    n = x.shape[0]
    w = jnp.ones((n,), dtype) if weights is None else jnp.asarray(weights, dtype)
    if chunk_size is None:
        chunk_size = auto_chunk_size(
            n, params.n_components, params.n_features, dtype, params.covariance_type, batch
        )
    # One compiled program, also when called eagerly (tests, notebooks): no op-by-op dispatch
    # of the block loop and the fallback branch. Inside a trace the jit is simply inlined.
    return _e_step(params, x, w, chunk_size, axis_name, batch_axis, moments)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _e_step(params, x, w, chunk_size, axis_name, batch_axis, moments):
    # Under reverse-mode differentiation a block is recomputed rather than its O(C·K·D)
    # temporaries stored: a gradient through a fit keeps O(K·D²) per block, not O(N·K·D).
    c = _shared_center(params, batch_axis)

    cov_type = params.covariance_type

    def sweep(exact=None, quad=None):
        block = jax.checkpoint(functools.partial(_e_step_block, exact=exact, c=c, quad=quad))
        sums = blockwise_sum(lambda xs, ws: block(params, xs, ws), x, w, chunk_size, axis_name)
        return sums if axis_name is None else jax.lax.psum(sums, axis_name)

    if moments == "auto":
        moments = "product" if _product_form_pays(x.shape[0], *params.means.shape,
                                                  cov_type) else "centred"
    if cov_type in ("diag", "spherical") and moments == "product":
        (nk, sum_x, sum_xx), total, ok = _product_sweeps(params, c, sweep)
        (nk, sum_x, sum_xx), total = jax.lax.cond(
            _all_batch_members(ok), lambda: ((nk, sum_x, sum_xx), total), lambda: sweep()
        )
    elif cov_type == "full" and moments == "product":
        def fast():
            quad = _full_quadratic_coefs(params, c)
            return _quadratic_moments(params, *sweep(quad=quad), c=c)

        def skipped():  # the current parameters already fail the check: no fast sweep
            k, d = params.means.shape
            zeros = functools.partial(jnp.zeros, dtype=params.means.dtype)
            return (zeros((k,)), zeros((k, d)), zeros((k, d, d))), zeros(()), jnp.array(False)

        ok = _quadratic_form_ok(params, c)
        stats, total, ok = jax.lax.cond(_all_batch_members(ok), fast, skipped)
        (nk, sum_x, sum_xx), total = jax.lax.cond(
            _all_batch_members(ok), lambda: (stats, total), lambda: sweep()
        )
    else:
        (nk, sum_x, sum_xx), total = sweep()
    w_sum = jnp.sum(w)
    if axis_name is not None:
        w_sum = jax.lax.psum(w_sum, axis_name)
    stats = GMMStats(nk, sum_x, sum_xx, params.means, params.covariance_type,
                     live=params.weights > 0)
    return stats, total / w_sum


@custom_batching.custom_vmap
def _all_batch_members(ok: jax.Array) -> jax.Array:
    """``ok`` itself; under any ``vmap`` (restarts, or a user's over datasets or
    hyperparameters), whether it holds for *every* member, unbatched.

    The fast-path guards are the predicates of ``lax.cond``s; a batched predicate turns a
    ``cond`` into a ``select`` that runs both branches (the fast sweep and its fallback)
    every iteration. Agreeing on one predicate keeps one branch: the fallback for all when
    any member needs it, which is exact for every member.
    """
    return ok


@_all_batch_members.def_vmap
def _all_batch_members_vmap(axis_size, in_batched, ok):
    del axis_size
    # Called again on the reduced value, so that an enclosing vmap reduces over its axis too.
    return (_all_batch_members(jnp.all(ok)) if in_batched[0] else ok), False


@custom_batching.custom_vmap
def _most_of_batch(n: jax.Array) -> jax.Array:
    """``n`` itself; under any ``vmap``, the largest member's value, unbatched (as
    :func:`_all_batch_members`, for a count that decides how many ``cond`` branches run)."""
    return n


@_most_of_batch.def_vmap
def _most_of_batch_vmap(axis_size, in_batched, n):
    del axis_size
    return (_most_of_batch(jnp.max(n)) if in_batched[0] else n), False


def _shared_center(params: GMMParams, batch_axis: str | None) -> jax.Array:
    """The centre of the E-step blocks: :func:`_center`, or under vmapped restarts the mean
    of their (finite) centres.

    One centre for all restarts keeps the centred data unbatched, so that every heavy
    product has its parameters on one side only and runs as a single product over R·K
    components; a centre per restart makes R copies of each block and R separate products
    (measured: 8 restarts cost 10.7× one fit, not ~8×). Any point inside the data cloud
    serves float32, and every restart's centre is one (M-step means are weighted means of
    the data).
    """
    c = _center(params)
    return c if batch_axis is None else _mean_over_restarts(c)


@custom_batching.custom_vmap
def _mean_over_restarts(c: jax.Array) -> jax.Array:
    """``c`` itself; under the restarts' vmap (the innermost one), the mean of the finite
    members' values, unbatched.

    A batching rule rather than a ``psum`` over the restarts' axis name: the collective
    over a vmap axis does not type-check inside ``shard_map`` with ``check_vma`` on. Only
    the innermost vmap reduces (the rule does not call itself again): an outer vmap of the
    user's, e.g. over datasets whose clouds differ, keeps one centre per dataset.
    """
    return c


@_mean_over_restarts.def_vmap
def _mean_over_restarts_vmap(axis_size, in_batched, c):
    del axis_size
    if not in_batched[0]:
        return c, False
    ok = jnp.all(jnp.isfinite(c), axis=1, keepdims=True)
    total = jnp.sum(jnp.where(ok, c, 0.0), axis=0)
    return total / jnp.maximum(jnp.sum(ok), 1).astype(c.dtype), False


# Relative rounding accepted from the product form of the diag/spherical second moments.
PRODUCT_MOMENTS_RTOL = 1e-4


# The exact rows are taken only when some component's predicted rounding is within this
# factor of PRODUCT_MOMENTS_RTOL (room for its variance to shrink by as much in one
# iteration); otherwise the check after the sweep is expected to pass without them.
EXACT_ROWS_MARGIN = 4.0


def _exact_slots(n_components: int) -> int:
    """How many components one product-form sweep can take exactly: ⌈K/8⌉ (static)."""
    return -(-n_components // 8)


class _ExactRows(NamedTuple):
    """Which diag/spherical components the product-form sweep also takes centred on their
    means (:func:`_likely_ill_conditioned`)."""

    index: jax.Array  # (⌈K/8⌉,) the components, those most at risk first
    count: jax.Array  # () int: how many of them to take (unbatched under vmap)


def _likely_ill_conditioned(params: GMMParams, c=None) -> _ExactRows:
    """The ⌈K/8⌉ components whose product-form moments would round worst, and how many
    components' predicted rounding comes within :data:`EXACT_ROWS_MARGIN` of
    :data:`PRODUCT_MOMENTS_RTOL` (at most ⌈K/8⌉; under a ``vmap``, the most of any member).

    The rounding of ``Σ r (x−c)²`` relative to a component's variance grows like
    ``eps · ((μ−c)² + σ²)/σ²``, judged on the current parameters: that names components far
    from c relative to their spread, which stay so from one iteration to the next. A
    component that collapses within the iteration (a small one landing on a few close
    points) is not guessed here: the check after the sweep finds it, and a second sweep
    takes it exactly (:func:`_product_sweeps`). (Weighting the prediction by 1/(K·π_k)
    towards small components took the exact rows every iteration on the benchmark grid's
    data — 5 of 15 ms an iteration at N = 1e5, D = 64, K = 32 — for components whose
    rounding stayed 25× below the tolerance.)
    """
    k = params.n_components
    var = jnp.broadcast_to(
        params.covariances if params.covariance_type == "diag" else params.covariances[:, None],
        params.means.shape,
    )
    m = params.means - (_center(params) if c is None else c)[None]
    ratio = 1.0 + jnp.max(m * m / var, axis=1)
    # Dead slots (weight 0) take no responsibility: never worth an exact slot. (NaN
    # parameters compare False below: the rows are taken.)
    live = params.weights > 0
    slots = _exact_slots(k)
    _, idx = jax.lax.top_k(jnp.where(live, ratio, -jnp.inf), slots)
    eps = jnp.finfo(var.dtype).eps
    at_risk = live & ~(EXACT_ROWS_MARGIN * eps * ratio <= PRODUCT_MOMENTS_RTOL)
    return _ExactRows(idx, _most_of_batch(jnp.minimum(jnp.sum(at_risk), slots)))


def _product_sweeps(params: GMMParams, c: jax.Array, sweep):
    """diag/spherical moments in the product form: one sweep, and a second only to repair it.

    The first sweep takes exactly the components :func:`_likely_ill_conditioned` names
    before it. If the check after it (:func:`_product_moments`) fails for at most ⌈K/8⌉
    components (under a ``vmap``: for every member that fails), the sweep runs once more
    with exactly those components taken centred on their means: the same products give the
    same values, so every other component passes again and the repaired ones are exact.
    Returns ``(moments, total, ok)``; ``ok`` is False only where more components failed
    than a sweep can take exactly (then the caller takes the centred sweep).

    The two sweeps are the two steps of one ``fori_loop`` (a ``scan``: reverse-mode
    differentiable), the second a ``cond`` that runs only when needed, so the sweep is
    compiled once. A component that collapses within an iteration (a small one lands on a
    few close points) thus costs one more product sweep, not the centred sweep (~5× one);
    and the first sweep need not guess such collapses (measured at N = 1e5, D = 64, K = 32:
    the exact rows of 4 components cost 5 ms of a 15 ms sweep, taken every iteration when
    small components counted as at risk).
    """
    k, d = params.means.shape
    dtype = params.means.dtype
    slots = _exact_slots(k)

    def one_sweep(exact):
        moments, total, risky, taken = _product_moments(params, exact, *sweep(exact), c=c)
        ok = ~jnp.any(risky & ~taken)
        # The next sweep's exact components: every one at risk (first), if they fit.
        _, index = jax.lax.top_k(risky.astype(dtype), slots)
        return moments, total, ok, jnp.sum(risky, dtype=jnp.int32), index

    first = _likely_ill_conditioned(params, c)

    def step(i, carry):
        moments, total, ok, n_risky, index = carry
        again = ~_all_batch_members(ok) & _all_batch_members(ok | (n_risky <= slots))
        exact = _ExactRows(jnp.where(i == 0, first.index, index),
                           jnp.where(i == 0, first.count, _most_of_batch(n_risky)))
        return jax.lax.cond((i == 0) | again, lambda: one_sweep(exact), lambda: carry)

    zeros = functools.partial(jnp.zeros, dtype=dtype)
    start = ((zeros((k,)), zeros((k, d)), zeros((k, d))), zeros(()), jnp.asarray(True),
             jnp.asarray(0, jnp.int32), jnp.zeros((slots,), jnp.int32))
    moments, total, ok, _, _ = jax.lax.fori_loop(0, 2, step, start)
    return moments, total, ok


def _product_moments(params: GMMParams, exact, moments, total, c=None):
    """Diag/spherical moments about the mixture centre c, moved to the current means.

    ``Σ r (x−μ)² = Σ r (x−c)² − 2 m Σ r (x−c) + nk m²`` (m = μ − c) needs two matrix
    products per block instead of an elementwise pass over a (K, D, block) array — about 3×
    faster — but rounds to ~eps·Σ r (x−c)², which swamps a variance that is small next to
    the component's distance from c (a component on a few points, or collapsing). The
    ``exact`` components were also taken centred on their means in the same sweep, and
    their rows are replaced. Returns the moments, the total, ``risky`` (K,): whether each
    live component's product-form rounding exceeds :data:`PRODUCT_MOMENTS_RTOL` of its new
    centred second moment (judged for the exact ones too, as if they had not been taken),
    and ``taken`` (K,): the exact ones. The moments stand if every risky component was
    taken (otherwise see :func:`_product_sweeps`).
    """
    nk, s1, s2, sum_x_r, sum_xx_r = moments
    m = params.means - (_center(params) if c is None else c)[None]
    sum_x = s1 - nk[:, None] * m
    eps = jnp.finfo(s2.dtype).eps
    if params.covariance_type == "spherical":
        # s2 is (K, 1), Σ r |x−c|²: the moments summed over features, and their mean over
        # features in every column (all that the M-step reads of a spherical sum_xx).
        summed = s2[:, 0] - 2.0 * jnp.sum(m * s1, axis=1) + nk * jnp.sum(m * m, axis=1)
        sum_xx = jnp.broadcast_to(summed[:, None] / m.shape[1], m.shape)
        centred = (summed - jnp.sum(sum_x**2, axis=1) / (nk + 10 * eps))[:, None]
    else:
        sum_xx = s2 - 2.0 * m * s1 + nk[:, None] * m * m
        centred = sum_xx - sum_x**2 / (nk + 10 * eps)[:, None]  # ≈ nk · new variance
    # Empty components get reg_covar whatever this gives; the exact ones are right anyway.
    taken = jnp.zeros(nk.shape, bool).at[exact.index].set(
        jnp.arange(exact.index.shape[0]) < exact.count)
    checked = nk > 10 * eps * jnp.sum(nk)
    risky = checked & jnp.any(eps * s2 > PRODUCT_MOMENTS_RTOL * centred, axis=1)
    sum_x = jnp.where(taken[:, None], sum_x.at[exact.index].set(sum_x_r), sum_x)
    sum_xx = jnp.where(taken[:, None], sum_xx.at[exact.index].set(sum_xx_r), sum_xx)
    return (nk, sum_x, sum_xx), total, risky, taken


# Relative rounding accepted from the quadratic form of ``full``, as
# :func:`_quadratic_rounding` bounds it (summed over features, correlations included). The
# bound is ~2-3x above the error measured against float64 (D = K = 64).
QUADRATIC_FORM_RTOL = 2e-3


# Least work per E-step (N·K·D² for full, N·K·D for diag/spherical) at which "auto" takes
# the product form. That form compiles a second sweep (its fallback), which costs ~0.5-1.5 s
# more compile for full on the CPU and ~0.2 s for diag/spherical; below these sizes ~100
# iterations would not win the extra compile back (diag/spherical at N·K·D = 3.2e6: the
# product form saves 1.3-2.0 ms an iteration; at N = 1e5, D = K = 8: 5.7 -> 2.6 ms).
PRODUCT_FORM_MIN_WORK = {"full": 2**27, "diag": 2**22, "spherical": 2**22}
# full's quadratic form also needs K·D at least this: its rows carry D(D+1)/2 quadratic
# features whatever K, so with few components it costs more than it saves. Measured per
# iteration on the CPU (whitened / quadratic, ms): N = 1e6, D = K = 8: 54-58 / 64-65;
# N = 2e5, D = K = 12: 24 / 31; D = 12, K = 16: 29 / 33; but N = 1e5, D = K = 16: 21 / 18;
# D = 8, K = 64: 52 / 26; D = K = 32: 138 / 87.
QUADRATIC_FORM_MIN_KD = 256


def _product_form_pays(n_samples: int, n_components: int, n_features: int,
                       covariance_type: str) -> bool:
    """Whether ``moments="auto"`` takes the product form (static, from the shapes).

    Only for large enough work per iteration (:data:`PRODUCT_FORM_MIN_WORK`), and for full
    only when 2K ≥ D and K·D ≥ :data:`QUADRATIC_FORM_MIN_KD`: the quadratic form's block is
    a (C, ~D²/2) array whatever K, the whitened form's is (K·D, C); with few components per
    feature the products are too thin to use the wider array well, and with few components
    at all the quadratic features cost more than they save, so the whitened form is faster
    (measured on the CPU: 1.5x faster at D = K = 32, 2x slower at D = 64, K = 8, 1.1x slower
    at D = K = 8). tied has no product form.
    """
    if covariance_type not in PRODUCT_FORM_MIN_WORK:
        return False
    work = n_samples * n_components * n_features
    if covariance_type == "full":
        work *= n_features
        if (2 * n_components < n_features
                or n_components * n_features < QUADRATIC_FORM_MIN_KD):
            return False
    return work >= PRODUCT_FORM_MIN_WORK[covariance_type]


def _quadratic_form_ok(params: GMMParams, c: jax.Array) -> jax.Array:
    """Whether every component's quadratic form about c rounds below
    :data:`QUADRATIC_FORM_RTOL` (:func:`_quadratic_rounding`) under the current parameters,
    so that the log-joints of the fast sweep are accurate. Known before the sweep."""
    lam = _precision_matrices(params.precisions_cholesky)
    risk = _quadratic_rounding(params.means - c[None], params.covariances, lam)
    # False on NaN; dead slots (weight 0, no responsibility) do not count.
    return jnp.all((risk <= QUADRATIC_FORM_RTOL) | (params.weights == 0))


def _quadratic_moments(params: GMMParams, moments, total, c=None):
    """full moments about the mixture centre c (from ``rᵀ z``), moved to the current means.

    ``Σ r (x−μ)(x−μ)ᵀ = S₂ − s₁ mᵀ − m s₁ᵀ + nk m mᵀ`` (m = μ − c) cancels like the diag
    product form. Returns the moments, the total, and whether every live component's new
    covariance kept its rounding (:func:`_quadratic_rounding`, about c) below
    :data:`QUADRATIC_FORM_RTOL`; if not, the caller redoes the sweep whitened.
    """
    nk, s1, s2_packed = moments
    k, d = s1.shape
    m = params.means - (_center(params) if c is None else c)[None]
    rows, cols, _ = _pairs(d)
    s2 = jnp.zeros((k, d, d), s1.dtype).at[:, rows, cols].set(s2_packed)
    s2 = s2.at[:, cols, rows].set(s2_packed)
    sum_x = s1 - nk[:, None] * m
    cross = s1[:, :, None] * m[:, None, :]
    mm_t = m[:, :, None] * m[:, None, :]
    sum_xx = s2 - cross - jnp.swapaxes(cross, 1, 2) + nk[:, None, None] * mm_t
    eps = jnp.finfo(s1.dtype).eps
    nk_eps = nk + 10 * eps
    offset = s1 / nk_eps[:, None]  # new mean − c
    cov = (s2 - s1[:, :, None] * offset[:, None, :]) / nk_eps[:, None, None]
    # Λ through the precision factor (NaN if cov is not positive definite: then risky).
    risk = _quadratic_rounding(offset, cov, _precision_matrices(precision_cholesky(cov, "full")))
    live = nk > 10 * eps * jnp.sum(nk)
    risky = live & ~(risk <= QUADRATIC_FORM_RTOL)  # NaN (a singular covariance) is risky
    return (nk, sum_x, sum_xx), total, ~jnp.any(risky)


def combine_stats(a: GMMStats, b: GMMStats, a_scale: jax.typing.ArrayLike = 1.0,
                  b_scale: jax.typing.ArrayLike = 1.0) -> GMMStats:
    """``a_scale·a + b_scale·b``: the statistics of the union of two sets of samples (or,
    with scales, a blend of them, as online EM's ``(1 − ρ) s + ρ ŝ``), about ``b``'s shift.

    Statistics taken about different shifts (E-steps at different parameters) are first
    moved to a common one, exactly: with ``δ = s_a − s_b`` and ``a₁ = Σ r (x − s_a)``,
    ``Σ r (x − s_b)(x − s_b)ᵀ = S_a + δ a₁ᵀ + a₁ δᵀ + n δ δᵀ`` (diag/spherical: the
    diagonal; tied: summed over components). Blocks of one streamed E-step share their shift,
    and the move is then the identity. ``live`` is ``b``'s.
    """
    cov_type = b.covariance_type
    if a.covariance_type != cov_type:
        raise ValueError(f"cannot combine {a.covariance_type} and {cov_type} statistics")
    delta = a.shift - b.shift  # (K, D)
    nk, s1, s2 = a.nk, a.sum_x, a.sum_xx
    if cov_type in ("full", "tied"):
        cross = s1[:, :, None] * delta[:, None, :]
        extra = cross + jnp.swapaxes(cross, 1, 2) + (
            nk[:, None, None] * delta[:, :, None] * delta[:, None, :])
        s2 = s2 + (extra if cov_type == "full" else jnp.sum(extra, axis=0))
    else:
        s2 = s2 + 2 * delta * s1 + nk[:, None] * delta**2
    s1 = s1 + nk[:, None] * delta
    return GMMStats(a_scale * nk + b_scale * b.nk, a_scale * s1 + b_scale * b.sum_x,
                    a_scale * s2 + b_scale * b.sum_xx, b.shift, cov_type, live=b.live)


@jax.jit
def m_step(stats: GMMStats, reg_covar: jax.typing.ArrayLike = 1e-6) -> GMMParams:
    """M-step: the parameters maximising the expected complete-data log-likelihood.

    Args:
      stats: expected sufficient statistics from :func:`e_step`.
      reg_covar: non-negative value added to the covariance diagonals (traced).

    Returns:
      New parameters: responsibility-weighted means, covariances and weights. A component
      with no responsibility keeps its previous mean and gets covariance ``reg_covar`` and
      weight ~``10·eps``: finite, and free to pick up samples again. A dead slot
      (``stats.live`` False) gets weight 0, its previous mean and a unit covariance.
    """
    cov_type = stats.covariance_type
    dtype = stats.sum_x.dtype
    nk = stats.nk
    live = jnp.ones(nk.shape, bool) if stats.live is None else stats.live
    # scikit-learn's guard against empty components: nk + 10 * eps.
    nk_eps = nk + 10 * jnp.finfo(dtype).eps
    nk_live = jnp.where(live, nk_eps, 0.0)
    delta = stats.sum_x / nk_eps[:, None]  # (K, D) new mean minus shift
    means = stats.shift + delta
    # Σ_n r (d - δ)(d - δ)^T = S2 - (2 nk_eps - nk) δ δ^T, exactly as if centred on the new
    # means (d = x - shift, δ = sum_x / nk_eps).
    c = 2 * nk_eps - nk
    if cov_type == "full":
        cov = (stats.sum_xx - c[:, None, None] * delta[:, :, None] * delta[:, None, :])
        cov = cov / nk_eps[:, None, None]
        cov = cov + reg_covar * jnp.eye(cov.shape[-1], dtype=dtype)
    elif cov_type == "tied":
        outer = jnp.einsum("k,kd,ke->de", c, delta, delta, precision=PRECISION)
        cov = (stats.sum_xx - outer) / jnp.sum(nk_live)
        cov = cov + reg_covar * jnp.eye(cov.shape[-1], dtype=dtype)
    else:
        # Rounding (of the product-form moments in particular) cannot make a variance < 0.
        # spherical: the mean over features first (the E-step's product form keeps only
        # that mean of sum_xx, in every column; see GMMStats).
        var = stats.sum_xx - c[:, None] * delta**2
        var = var if cov_type == "diag" else jnp.mean(var, axis=1)
        cov = jnp.maximum(var, 0.0) / (nk_eps[:, None] if cov_type == "diag" else nk_eps)
        cov = cov + reg_covar
    if cov_type != "tied":  # a dead slot: unit covariance, finite whatever reg_covar
        dead = ~live.reshape((-1,) + (1,) * (cov.ndim - 1))
        cov = jnp.where(dead, jnp.eye(cov.shape[-1], dtype=dtype) if cov_type == "full"
                        else jnp.ones_like(cov), cov)
    cov = cov.astype(dtype)
    weights = nk_live / jnp.sum(nk_live)
    return GMMParams(weights, means, cov, precision_cholesky(cov, cov_type), cov_type)


@jax.jit
def score_samples(params: GMMParams, x: jax.Array) -> jax.Array:
    """(N,) log densities ``log p(x_n)``."""
    return jax.nn.logsumexp(log_joint(params, x), axis=1)


def pad_components(params: GMMParams, n_slots: int) -> GMMParams:
    """``params`` with dead slots appended up to ``n_slots`` components (weight 0, mean 0,
    unit covariance), as NumPy arrays of the params' dtype: the same mixture in a program
    built for more components (see :class:`GMMParams`)."""
    k, d = params.means.shape
    if n_slots <= k:
        return params
    extra = n_slots - k
    dtype = np.asarray(params.means).dtype

    def grow(a, fill):
        a = np.asarray(a)
        return np.concatenate([a, np.broadcast_to(np.asarray(fill, dtype), (extra,) + a.shape[1:])])

    if params.covariance_type == "tied":
        cov, pc = np.asarray(params.covariances), np.asarray(params.precisions_cholesky)
    else:
        unit = np.eye(d, dtype=dtype) if params.covariance_type == "full" else 1.0
        cov, pc = grow(params.covariances, unit), grow(params.precisions_cholesky, unit)
    return GMMParams(grow(params.weights, 0.0), grow(params.means, 0.0), cov, pc,
                     params.covariance_type)


def mixture_entries(n_components: int, n_features: int) -> int:
    """Parameter entries of a K-component mixture over D features, counted as weights,
    means and two (K, D, D) matrices whatever the covariance type: the largest layout, so a
    bound for all, and the count the drivers' compile rules (:mod:`jaxem.em`) were measured
    with."""
    return n_components * (n_features + 1) + 2 * n_components * n_features**2


def n_parameters(params: GMMParams):
    """Number of free parameters (for BIC/AIC), as scikit-learn counts them, of the live
    components: an int, or a () int32 array when ``params`` are traced."""
    d = params.n_features
    if _validation.is_traced(params.weights):
        k = jnp.sum(params.weights > 0).astype(jnp.int32)
        return n_covariance_parameters(params.covariance_type, k, d) + k * d + k - 1
    k = int(np.sum(np.asarray(params.weights) > 0))
    return int(n_covariance_parameters(params.covariance_type, k, d) + k * d + k - 1)


def _row_uniforms(key, n: int, k: int, dtype) -> jax.Array:
    """(n, k) uniform variates, entry (i, j) from ``fold_in(fold_in(key, i), j)``: a row
    does not depend on how many rows follow (zero-weight padding) nor a column on how many
    slots there are (K live components inside a larger program)."""
    def row(i):
        ki = jax.random.fold_in(key, i)
        return jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(ki, j), (), dtype))(
            jnp.arange(k))
    return jax.vmap(row)(jnp.arange(n))


HARD_INIT_METHODS = ("kmeans", "k-means++", "random_from_data")


def initial_labels(key, x, w, n_components: int, method: str, n_live=None) -> jax.Array:
    """(N,) int32 initial assignments of a hard method (``kmeans``, ``k-means++``,
    ``random_from_data``); −1 marks a row assigned to no component (random_from_data seeds
    only K rows). Independent of the covariance type, so a model search seeds once for all
    its types. ``n_live``: only the first ``n_live`` slots get rows."""
    n = x.shape[0]
    if method == "kmeans":
        return kmeans(key, x, n_components, w, n_live=n_live).labels
    if method == "k-means++":
        centers = kmeans_plusplus(key, x, n_components, w, n_live=n_live)
        return nearest_center(x, centers, n_live).astype(jnp.int32)
    # random_from_data: K distinct samples, drawn by weight without replacement (Gumbel
    # top-K, one variate per row), one per live component.
    u = _row_uniforms(key, n, 1, x.dtype)[:, 0]
    tiny = jnp.finfo(x.dtype).tiny
    score = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)) - jnp.log(-jnp.log(
        jnp.maximum(u, tiny))), -jnp.inf)
    _, idx = jax.lax.top_k(score, n_components)
    slot = jnp.arange(n_components)
    slot = jnp.where(slot < (n_components if n_live is None else n_live), slot, -1)
    return jnp.full((n,), -1, jnp.int32).at[idx].set(slot.astype(jnp.int32))


def initial_assignments(key, x, n_components: int, method: str = "kmeans", weights=None,
                        n_live=None) -> jax.Array:
    """What the key decides of an initialisation (:func:`init`'s ``labels``): (N,) int32
    labels for a hard method (:func:`initial_labels`), (N, K) responsibilities for
    ``random``. ``init(key, x, K, method=m, labels=initial_assignments(key, x, K, m))`` is
    ``init(key, x, K, method=m)``."""
    _validation.check_init_method(method)
    x = jnp.asarray(x)
    x = x.astype(x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float))
    n_live = None if n_live is None else jnp.asarray(n_live).astype(jnp.int32)
    if method in HARD_INIT_METHODS:
        w = jnp.ones(x.shape[0], x.dtype) if weights is None else jnp.asarray(weights, x.dtype)
        return initial_labels(key, x, w, n_components, method, n_live)
    return _random_resp(key, x, n_components, n_live)


def _random_resp(key, x, n_components: int, n_live=None):
    """(N, K) random initial responsibilities (``method="random"``, the soft one); columns
    ``≥ n_live`` (dead slots) are zero."""
    live = jnp.arange(n_components) < (n_components if n_live is None else n_live)
    resp = jnp.where(live[None], _row_uniforms(key, x.shape[0], n_components, x.dtype), 0.0)
    return resp / jnp.sum(resp, axis=1, keepdims=True)


def init(
    key: jax.Array,
    x: jax.Array,
    n_components: int,
    covariance_type: str = "full",
    *,
    method: str = "kmeans",
    weights: jax.Array | None = None,
    reg_covar: jax.typing.ArrayLike = 1e-6,
    weights_init: jax.Array | None = None,
    means_init: jax.Array | None = None,
    precisions_init: jax.Array | None = None,
    n_live: jax.typing.ArrayLike | None = None,
    labels: jax.Array | None = None,
    batch: int = 1,
) -> GMMParams:
    """Initial parameters, as scikit-learn's ``init_params``.

    Responsibilities come from ``method`` (``kmeans``: one-hot k-means labels; ``k-means++``:
    nearest k-means++ seed; ``random``: uniform random rows; ``random_from_data``: K samples
    picked as seeds); one M-step turns them into parameters, then any user-given
    ``weights_init``/``means_init``/``precisions_init`` replace the estimate. Unlike
    scikit-learn, the initial weights always sum to one (scikit-learn divides by N, which for
    ``random_from_data`` leaves them summing to K/N).

    Args:
      key: PRNG key.
      x: (N, D) data.
      n_components: K (static).
      covariance_type: static.
      method: static, one of the four names above.
      weights: optional (N,) sample weights.
      reg_covar: regularisation added to covariance diagonals.
      weights_init: optional (K,) weights.
      means_init: optional (K, D) means.
      precisions_init: optional precisions in the shape of ``covariance_type``.
      n_live: optional number of live components, 1..K (traced): the first ``n_live``
        slots are initialised as an ``n_live``-component mixture (for ``kmeans`` and
        ``k-means++``, exactly as with ``n_components=n_live`` and the same key), the rest
        are dead (weight 0; see :class:`GMMParams`).
      labels: optional (N,) int initial assignments (−1: none) or (N, K)
        responsibilities, e.g. from :func:`initial_assignments`, used instead of running
        ``method`` again (``key`` is then not used).
      batch: number of parameter sets initialised together under ``vmap`` (restarts, a
        search's members; static): the blocks of rows shrink so that their temporaries
        stay in cache, as :func:`e_step`'s do.

    Returns:
      :class:`GMMParams`.
    """
    _validation.check_covariance_type(covariance_type)
    _validation.check_init_method(method)
    batch = _validation.check_int(batch, "batch", 1)
    return _init(key, x, n_components, covariance_type, method, weights, reg_covar,
                 weights_init, means_init, precisions_init, n_live, labels, batch=batch)


@functools.partial(jax.jit, static_argnums=(2, 3, 4), static_argnames="batch")
def _init(key, x, n_components, covariance_type, method, weights, reg_covar, weights_init,
          means_init, precisions_init, n_live=None, labels=None, batch=1):
    x = jnp.asarray(x)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)
    x = x.astype(dtype)
    w = jnp.ones(x.shape[0], dtype) if weights is None else jnp.asarray(weights, dtype)
    n_live = None if n_live is None else jnp.asarray(n_live).astype(jnp.int32)
    # A hard method's responsibilities stay labels, made one-hot block by block in the
    # (K, C) layout the moments take: no (N, K) array (for a search's 64 members at
    # N = 1e5, K = 16, 420 MB, read transposed: 0.9 s of its initialisation).
    if labels is None and method in HARD_INIT_METHODS:
        labels = initial_labels(key, x, w, n_components, method, n_live)
    rows = _random_resp(key, x, n_components, n_live) if labels is None else labels
    hard = rows.ndim == 1

    def weighted_t(r, ws):  # (K, C) weight × responsibility of a block, samples last
        if not hard:
            return r.T * ws[None]
        one_hot = r[None, :] == jnp.arange(n_components, dtype=r.dtype)[:, None]
        return jnp.where(one_hot, ws[None], 0.0)  # label −1: no component

    # Two passes: centre the moments on the responsibility-weighted means first, so that
    # e.g. a single seed point gives a covariance of exactly reg_covar even in float32.
    # The reference point is a sample of positive weight, not a weighted mean: it carries
    # no rounding of its own (a float32 sum of values at 1e6 does, and XLA may compute it
    # twice in different orders), and x − c is exact for the samples near it.
    # (Without weights every row counts: x[0], not an argmax over a constant of size N,
    # which XLA would fold at compile time: 1.7 s at N = 2e5.)
    center = x[0] if weights is None else x[jnp.argmax(w > 0)]
    chunk = auto_chunk_size(x.shape[0], n_components, x.shape[1], dtype, covariance_type,
                            batch)

    def first_moments(block, ws):
        xs, r = block
        wr_t = weighted_t(r, ws)
        return jnp.sum(wr_t, axis=1), jnp.matmul(wr_t, xs - center[None], precision=PRECISION)

    nk, sums = blockwise_sum(first_moments, (x, rows), w, chunk)
    shift = center + jnp.where(nk[:, None] > 0, sums / jnp.where(nk > 0, nk, 1.0)[:, None], 0.0)
    moments = blockwise_sum(
        lambda block, ws: _moments_t(block[0] - center[None], weighted_t(block[1], ws),
                                     shift - center[None], covariance_type),
        (x, rows), w, chunk,
    )
    live = jnp.arange(n_components) < (n_components if n_live is None else n_live)
    params = m_step(GMMStats(*moments, shift, covariance_type, live=live), reg_covar)
    if weights_init is not None:
        params = dataclasses.replace(params, weights=jnp.asarray(weights_init, dtype))
    if means_init is not None:
        params = dataclasses.replace(params, means=jnp.asarray(means_init, dtype))
    if precisions_init is not None:
        precisions_init = jnp.asarray(precisions_init, dtype)
        pc = precision_cholesky_from_precisions(precisions_init, covariance_type)
        params = dataclasses.replace(
            params,
            precisions_cholesky=pc,
            covariances=covariances_from_precision_cholesky(pc, covariance_type),
        )
    return params


@functools.partial(jax.jit, static_argnames="n_samples")
def sample(key: jax.Array, params: GMMParams, n_samples: int) -> tuple[jax.Array, jax.Array]:
    """Draw samples from the mixture.

    Args:
      key: PRNG key.
      params: mixture parameters.
      n_samples: number of samples (static).

    Returns:
      ``(x, labels)``: (n_samples, D) samples and (n_samples,) component labels, sorted by
      label as scikit-learn returns them.
    """
    k_label, k_noise = jax.random.split(key)
    d = params.n_features
    dtype = params.means.dtype
    labels = jax.random.categorical(k_label, jnp.log(params.weights), shape=(n_samples,))
    labels = jnp.sort(labels)
    eps = jax.random.normal(k_noise, (n_samples, d), dtype)
    cov = params.covariances
    if params.covariance_type == "full":
        chol = jnp.linalg.cholesky(cov)
        # Rows in blocks, so that the gathered factors are (block, D, D), never (n, D, D).
        block = max(1, min(n_samples, 2**20 // (d * d)))
        n_blocks = -(-n_samples // block)
        pad = n_blocks * block - n_samples
        lab = jnp.pad(labels, (0, pad)).reshape(n_blocks, block)
        e = jnp.pad(eps, ((0, pad), (0, 0))).reshape(n_blocks, block, d)
        noise = jax.lax.map(
            lambda a: jnp.einsum("nde,ne->nd", chol[a[0]], a[1], precision=PRECISION), (lab, e))
        noise = noise.reshape(-1, d)[:n_samples]
    elif params.covariance_type == "tied":
        noise = jnp.matmul(eps, jnp.linalg.cholesky(cov).T, precision=PRECISION)
    elif params.covariance_type == "diag":
        noise = jnp.sqrt(cov[labels]) * eps
    else:
        noise = jnp.sqrt(cov[labels])[:, None] * eps
    return params.means[labels] + noise, labels.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class GaussianMixtureModel:
    """The Gaussian mixture as an EM model: what the drivers in :mod:`jaxem.em` call.

    Immutable and hashable, so it is a static argument of the jitted drivers.

    Attributes:
      covariance_type: ``full``, ``tied``, ``diag`` or ``spherical``.
      chunk_size: E-step block size (see :func:`e_step`); None picks it automatically.
      batch: parameter sets vmapped together (set by :meth:`with_batch`).
      batch_axis: the vmap axis name of those sets (set by :meth:`with_batch`).
      moments: ``"auto"``, ``"product"`` or ``"centred"``: whether full/diag/spherical
        take the faster product forms (see :func:`e_step`).
    """

    covariance_type: str = "full"
    chunk_size: int | None = None
    batch: int = 1
    batch_axis: str | None = None
    moments: str = "auto"

    def __post_init__(self):
        _validation.check_covariance_type(self.covariance_type)
        if self.chunk_size is not None:
            _validation.check_int(self.chunk_size, "chunk_size", 1)
        _validation.check_moments(self.moments)

    def with_batch(self, n: int, axis_name: str | None = None) -> GaussianMixtureModel:
        """This model sized for ``n`` parameter sets vmapped over ``axis_name`` (restarts)."""
        return dataclasses.replace(self, batch=n, batch_axis=axis_name)

    def default_hyper(self) -> dict:
        """Default M-step hyperparameters (the drivers fill these in)."""
        return {"reg_covar": 1e-6}

    def param_scale(self, params: GMMParams) -> GMMParams:
        """The parameters' units, for the implicit gradient's adjoint solve: σ for the
        means, σ² for the covariances, 1/σ for the precision factors and 1 for the weights,
        with σ² the mean variance of the live components (a scale of the data's own,
        where the means' magnitude is not: a mixture centred at 0 has means ~0)."""
        cov = params.covariances
        if params.covariance_type in ("full", "tied"):
            cov = jnp.diagonal(cov, axis1=-2, axis2=-1)
        if params.covariance_type != "tied":
            live = (params.weights > 0).astype(cov.dtype)
            per_component = cov if cov.ndim == 1 else jnp.mean(cov, axis=-1)
            var = jnp.sum(live * per_component) / jnp.maximum(jnp.sum(live), 1.0)
        else:
            var = jnp.mean(cov)
        sigma = jnp.sqrt(var)
        one = jnp.ones((), var.dtype)
        return GMMParams(one, sigma, var, 1.0 / sigma, params.covariance_type)

    def n_entries(self, n_components: int, n_features: int) -> int:
        """Parameter entries of a fit of this size, for the drivers' compile rules
        (:func:`mixture_entries`)."""
        return mixture_entries(n_components, n_features)

    def check_hyper(self, reg_covar=1e-6, **unknown):
        """Eager check of the M-step hyperparameters (called by the drivers)."""
        if unknown:
            raise TypeError(f"unknown hyperparameter(s) for the GMM: {sorted(unknown)}")
        _validation.check_real(reg_covar, "reg_covar", minimum=0.0)

    def check_params(self, params, x=None):
        """Eager check that ``params`` are this model's (called by the drivers).

        ``covariance_type`` travels statically with the params, so the same check also runs
        when traced (see :meth:`e_step`): full params never run as a diag model.
        """
        if not isinstance(params, GMMParams):
            return  # a subclass with params of its own checks them itself
        if params.covariance_type != self.covariance_type:
            raise ValueError(
                f"params have covariance_type={params.covariance_type!r} but the model is "
                f"GaussianMixtureModel({self.covariance_type!r}); build the model with the "
                "params' covariance type or initialise params for this model"
            )
        if x is not None and np.ndim(x) == 2 and params.n_features != np.shape(x)[1]:
            raise ValueError(
                f"x has {np.shape(x)[1]} features but params have {params.n_features}"
            )

    def log_joint(self, params: GMMParams, x: jax.Array) -> jax.Array:
        self.check_params(params)
        return log_joint(params, x)

    def e_step(self, params: GMMParams, x: jax.Array, weights: jax.Array | None = None,
               axis_name: str | None = None):
        self.check_params(params)
        return e_step(params, x, weights, chunk_size=self.chunk_size, axis_name=axis_name,
                      batch=self.batch, batch_axis=self.batch_axis, moments=self.moments)

    def m_step(self, stats: GMMStats, reg_covar: jax.typing.ArrayLike = 1e-6) -> GMMParams:
        if stats.covariance_type != self.covariance_type:
            raise ValueError(
                f"stats have covariance_type={stats.covariance_type!r} but the model is "
                f"GaussianMixtureModel({self.covariance_type!r})"
            )
        return m_step(stats, reg_covar)

    def combine_stats(self, a: GMMStats, b: GMMStats, a_scale=1.0, b_scale=1.0) -> GMMStats:
        """See :func:`combine_stats` (the streamed and online drivers' sum of statistics)."""
        return combine_stats(a, b, a_scale, b_scale)

    def initial_assignments(self, key, x, n_components: int, *, weights=None,
                            method="kmeans", n_live=None, **hyper):
        """What the key decides of :meth:`init` (see :func:`initial_assignments`): the
        first of its two stages, the second ``init(None, …, assignments=a)``."""
        return initial_assignments(key, x, n_components, method, weights, n_live)

    def init(self, key, x, n_components: int, *, weights=None, method="kmeans",
             assignments=None, **kwargs):
        kwargs.setdefault("batch", self.batch)
        if assignments is not None:
            kwargs["labels"] = assignments
        return init(
            key, x, n_components, self.covariance_type, method=method, weights=weights, **kwargs
        )

    def n_parameters(self, params: GMMParams, **hyper):
        """Free parameters of the live components (``hyper``: the M-step's
        hyperparameters, which do not change the count here)."""
        return n_parameters(params)

    def first_components(self, params: GMMParams, k: int) -> GMMParams:
        """The mixture of the first ``k`` slots (the live ones of a model search)."""
        cov = params.covariances if self.covariance_type == "tied" else params.covariances[:k]
        pc = (params.precisions_cholesky if self.covariance_type == "tied"
              else params.precisions_cholesky[:k])
        return GMMParams(params.weights[:k], params.means[:k], cov, pc, self.covariance_type)

    def to_unconstrained(self, params: GMMParams) -> dict:
        """Parameters as free arrays for gradient-based fits (:func:`jaxem.fit_sgd`).

        Log-weights; means; the precision Cholesky factor's log-diagonal and strict upper
        triangle (full/tied), or log of it (diag/spherical). Every array of the right
        shape maps back to valid parameters (:meth:`from_unconstrained`).
        """
        self.check_params(params)
        pc = params.precisions_cholesky
        u = {"log_weights": jnp.log(params.weights), "means": params.means}
        if self.covariance_type in ("full", "tied"):
            u["log_diag"] = jnp.log(jnp.diagonal(pc, axis1=-2, axis2=-1))
            u["upper"] = jnp.triu(pc, 1)
        else:
            u["log_precision_cholesky"] = jnp.log(pc)
        return u

    def from_unconstrained(self, u: dict) -> GMMParams:
        """Valid :class:`GMMParams` from the free arrays of :meth:`to_unconstrained`."""
        cov_type = self.covariance_type
        if cov_type in ("full", "tied"):
            pc = jnp.triu(u["upper"], 1) + jnp.exp(u["log_diag"])[..., None] * jnp.eye(
                u["log_diag"].shape[-1], dtype=u["log_diag"].dtype)
        else:
            pc = jnp.exp(u["log_precision_cholesky"])
        return GMMParams(jax.nn.softmax(u["log_weights"]), u["means"],
                         covariances_from_precision_cholesky(pc, cov_type), pc, cov_type)


def structured_covariances(params: GMMParams, structure, reg_covar) -> GMMParams:
    """Full-layout ``params`` whose covariances take the form of the covariance type
    ``COVARIANCE_TYPES[structure]`` (``structure`` may be traced): each component's own
    (full), the weight-averaged scatter shared by all slots (tied), the diagonal (diag),
    the mean variance times the identity (spherical); ``reg_covar`` on every diagonal.

    Applied to the full M-step's (or initialisation's) parameters this is that type's M-step
    in full layout: ``Σ_k w_k (Σ_k − reg·I) + reg·I`` is tied's pooled scatter over N, the
    diagonal of a full covariance is diag's variance, its mean spherical's. Dead slots keep a
    unit covariance (tied: the shared one, as tied's own layout has no per-slot matrix).
    """
    cov = params.covariances
    eye = jnp.eye(params.n_features, dtype=cov.dtype)
    scatter = jnp.einsum("k,kde->de", params.weights, cov - reg_covar * eye,
                         precision=PRECISION)
    tied = jnp.broadcast_to(scatter + reg_covar * eye, cov.shape)
    var = jnp.diagonal(cov, axis1=1, axis2=2)
    diag = var[:, :, None] * eye
    spherical = jnp.mean(var, axis=1)[:, None, None] * eye
    index = jnp.asarray(structure).astype(jnp.int32)
    cov = jnp.stack([cov, tied, diag, spherical])[index]
    return GMMParams(params.weights, params.means, cov, precision_cholesky(cov, "full"), "full")


def typed_params(params: GMMParams, covariance_type: str) -> GMMParams:
    """The ``covariance_type`` layout of full-layout params that have that type's structure
    (:func:`structured_covariances`), sliced on the host: no program runs."""
    _validation.check_covariance_type(covariance_type)
    if params.covariance_type != "full":
        raise ValueError("typed_params takes full-layout params (AnyCovarianceModel's), got "
                         f"covariance_type={params.covariance_type!r}")
    cov, pc = np.asarray(params.covariances), np.asarray(params.precisions_cholesky)
    take = {"full": lambda a: a, "tied": lambda a: a[0],
            "diag": lambda a: np.diagonal(a, axis1=1, axis2=2).copy(),
            "spherical": lambda a: a[:, 0, 0].copy()}[covariance_type]
    return GMMParams(np.asarray(params.weights), np.asarray(params.means), take(cov), take(pc),
                     covariance_type)


@dataclasses.dataclass(frozen=True)
class AnyCovarianceModel(GaussianMixtureModel):
    """A Gaussian mixture in full layout whose covariance type is *data*: the
    hyperparameter ``structure``, an index into ``COVARIANCE_TYPES`` (``full``, ``tied``,
    ``diag``, ``spherical``), projects every M-step and the initialisation onto that type
    (:func:`structured_covariances`). One compiled program then serves all four types, which
    is what a model search on small data needs (compiling a program per type costs seconds,
    running it milliseconds). Each fit equals the typed model's fit (same keys) to rounding;
    :func:`typed_params` gives back the type's own layout. Per iteration it costs what
    ``full`` costs (K·D² per sample), so the search uses it only for small programs.
    """

    covariance_type: str = "full"

    def __post_init__(self):
        if self.covariance_type != "full":
            raise ValueError("AnyCovarianceModel holds parameters in full layout: "
                             f"covariance_type must be 'full', got {self.covariance_type!r}")
        super().__post_init__()

    def default_hyper(self) -> dict:
        return {"reg_covar": 1e-6, "structure": 0}

    def check_hyper(self, reg_covar=1e-6, structure=0, **unknown):
        super().check_hyper(reg_covar, **unknown)
        if structure not in range(len(COVARIANCE_TYPES)):
            raise ValueError(f"structure must be an index into {COVARIANCE_TYPES}, "
                             f"got {structure!r}")

    def m_step(self, stats: GMMStats, reg_covar=1e-6, structure=0) -> GMMParams:
        return structured_covariances(super().m_step(stats, reg_covar), structure, reg_covar)

    def init(self, key, x, n_components: int, *, weights=None, method="kmeans",
             reg_covar=1e-6, structure=0, **kwargs):
        params = super().init(key, x, n_components, weights=weights, method=method,
                              reg_covar=reg_covar, **kwargs)
        return structured_covariances(params, structure, reg_covar)

    def n_parameters(self, params: GMMParams, structure=0, **hyper):
        """Free parameters of the live components for the type ``structure`` selects."""
        k = jnp.sum(params.weights > 0).astype(jnp.int32)
        d = params.n_features
        counts = jnp.stack([jnp.asarray(n_covariance_parameters(t, k, d), jnp.int32)
                            for t in COVARIANCE_TYPES])
        return counts[jnp.asarray(structure).astype(jnp.int32)] + k * d + k - 1
