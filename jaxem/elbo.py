"""The evidence lower bound, model-agnostic.

Everything here works on the (N, K) log-joint matrix ``L[n, k] = log p(x_n, z_n = k | θ)`` of
any discrete latent-variable model and a variational distribution ``log_q`` (N, K) whose rows
are log-probabilities. Each quantity is a sum over samples. The identity EM rests on is

    log p(x) = ELBO(q) + KL(q ‖ p(z | x))       for every q,

with ``ELBO(q) = E_q[log p(x, z)] + H(q)``. The E-step sets ``q = p(z | x)``, closing the KL
gap; the M-step raises ``E_q[log p(x, z)]``. :func:`kl_gap` returns the residual of that
identity, which must be zero up to rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _support(log_q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(zero, safe_log_q)``: where q = 0 (log_q = -inf), and log_q with 0 there.

    The double-``where`` pattern: every expression is built from ``safe_log_q`` and masked
    with ``zero`` afterwards, so that no branch evaluates ``0 · (−inf)``; gradients at a q
    with exact zeros (one-hot rows) are then finite, not NaN.
    """
    zero = jnp.isneginf(log_q)
    return zero, jnp.where(zero, 0.0, log_q)


def _q_times(log_q: jax.Array, values: jax.Array) -> jax.Array:
    # Σ q·values with the convention 0·anything = 0 where q = 0.
    zero, safe_log_q = _support(log_q)
    safe_values = jnp.where(zero, 0.0, values)
    return jnp.sum(jnp.where(zero, 0.0, jnp.exp(safe_log_q) * safe_values))


def log_marginal(log_joint: jax.Array) -> jax.Array:
    """``Σ_n log Σ_k exp L[n, k]`` = log p(x).

    Args:
      log_joint: (N, K) log-joint matrix.
    """
    return jnp.sum(jax.nn.logsumexp(log_joint, axis=1))


def posterior(log_joint: jax.Array) -> jax.Array:
    """(N, K) log posterior ``log p(z_n = k | x_n)``, each row normalised relative to its
    largest entry (``log_softmax``): exact in the differences where ``log_joint −
    logsumexp`` would round them to the resolution of a large ``log p(x_n)``."""
    return jax.nn.log_softmax(log_joint, axis=1)


def entropy(log_q: jax.Array) -> jax.Array:
    """``H(q) = -Σ_n Σ_k q log q``.

    Args:
      log_q: (N, K) rows of log-probabilities.
    """
    return -_q_times(log_q, _support(log_q)[1])


def expected_log_joint(log_joint: jax.Array, log_q: jax.Array) -> jax.Array:
    """``E_q[log p(x, z)] = Σ_n Σ_k q[n, k] L[n, k]``, the part the M-step maximises."""
    return _q_times(log_q, log_joint)


def elbo(log_joint: jax.Array, log_q: jax.Array) -> jax.Array:
    """``ELBO(q) = E_q[log p(x, z)] + H(q)``.

    Args:
      log_joint: (N, K) log-joint matrix.
      log_q: (N, K) rows of log-probabilities.
    """
    return _q_times(log_q, log_joint - _support(log_q)[1])


def kl_to_posterior(log_joint: jax.Array, log_q: jax.Array) -> jax.Array:
    """``KL(q ‖ p(z | x)) = Σ_n Σ_k q (log q − log p(z | x))`` (≥ 0).

    Args:
      log_joint: (N, K) log-joint matrix.
      log_q: (N, K) rows of log-probabilities.
    """
    return _q_times(log_q, _support(log_q)[1] - posterior(log_joint))


def kl_gap(log_joint: jax.Array, log_q: jax.Array) -> jax.Array:
    """Residual of the identity ``log p(x) − (ELBO(q) + KL(q ‖ p(z|x)))``; zero up to rounding."""
    return log_marginal(log_joint) - (elbo(log_joint, log_q) + kl_to_posterior(log_joint, log_q))
