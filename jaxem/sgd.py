"""Gradient-based fits of a model's log-likelihood with an optax optimizer.

EM is not the only way to maximise ``ℓ(θ) = (1/N) Σ_n log Σ_k p(x_n, z_n = k | θ)``: any
first-order optimizer can climb it directly, on the full data or on mini-batches, once the
parameters are mapped to an unconstrained space (for the Gaussian mixture: log-weights,
means, and precision Cholesky factors with a log-diagonal). That is

- the **baseline EM must beat**: ``benchmarks/bench_sgd.py`` measures iterations and time
  to the same log-likelihood for both, from the same initial parameters;
- the path for **mini-batch training inside a larger model**, where the mixture's
  log-likelihood is one term of a loss optimised by gradients anyway (dynamax's
  ``fit_sgd`` plays the same part).

The driver is generic: it needs the model's ``log_joint`` and the two maps
``to_unconstrained(params)`` / ``from_unconstrained(u)``; it knows nothing about Gaussians.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from jaxem import _validation, em


class SGDResult(NamedTuple):
    """Result of :func:`fit_sgd`."""

    params: Any  # the model's params pytree: the last finite ones
    log_likelihoods: jax.Array  # (n_steps,) mean log-likelihood of each step's batch, NaN
    #                              past a failure
    n_steps: jax.Array  # () int32 steps taken before a failure (n_steps if none)
    failed: jax.Array  # () bool: a non-finite loss or gradient stopped the updates


def _mean_log_likelihood(model, u, x, w):
    log_joint = model.log_joint(model.from_unconstrained(u), x)
    chex.assert_rank(log_joint, 2)  # (B, K), the model contract
    chex.assert_equal_shape_prefix((log_joint, x), 1)
    return jnp.sum(w * jax.nn.logsumexp(log_joint, axis=1)) / jnp.sum(w)


@functools.partial(jax.jit, static_argnames=("model", "optimizer", "n_steps", "batch_size"))
def _sgd_jit(model, optimizer, x, w, params, key, n_steps, batch_size):
    n = x.shape[0]
    value_and_grad = jax.value_and_grad(
        lambda u, xb, wb: -_mean_log_likelihood(model, u, xb, wb))
    u0 = model.to_unconstrained(params)

    def step(carry, step_key):
        u, opt_state, failed = carry
        if batch_size is None:
            xb, wb = x, w
        else:
            idx = jax.random.randint(step_key, (batch_size,), 0, n)
            xb, wb = x[idx], w[idx]
        loss, grads = value_and_grad(u, xb, wb)
        updates, new_state = optimizer.update(grads, opt_state, u)
        new_u = optax.apply_updates(u, updates)
        ok = (~failed & jnp.isfinite(loss) & em.all_finite(grads)
              & em.all_finite(model.from_unconstrained(new_u)))
        keep = functools.partial(jax.tree_util.tree_map, lambda a, b: jnp.where(ok, a, b))
        ll = jnp.where(failed | ~jnp.isfinite(loss), jnp.nan, -loss)
        return (keep(new_u, u), keep(new_state, opt_state), ~ok), (ll, ok)

    keys = jax.random.split(key, n_steps)
    init = (u0, optimizer.init(u0), jnp.asarray(False))
    (u, _, failed), (lls, oks) = jax.lax.scan(step, init, keys)
    return SGDResult(model.from_unconstrained(u), lls, jnp.sum(oks).astype(jnp.int32), failed)


def fit_sgd(
    model,
    x: jax.typing.ArrayLike,
    params,
    *,
    optimizer: optax.GradientTransformation | None = None,
    n_steps: int = 1000,
    batch_size: int | None = None,
    weights: jax.typing.ArrayLike | None = None,
    key: jax.Array | None = None,
) -> SGDResult:
    """Maximise the mean log-likelihood by gradient steps of an optax optimizer.

    Each step computes ``−ℓ`` on the whole data (``batch_size=None``) or on ``batch_size``
    rows drawn uniformly with replacement (weighted by ``weights``), differentiates it with
    respect to the model's unconstrained parameters and applies ``optimizer``'s update, all
    in one compiled ``lax.scan``.

    Args:
      model: the model (hashable, static); needs ``log_joint``, ``to_unconstrained`` and
        ``from_unconstrained``.
      x: (N, D) data.
      params: initial parameters.
      optimizer: an optax transformation (static; hashable). Default ``optax.adam(1e-2)``.
      n_steps: number of steps (static).
      batch_size: rows per step (static), or None for the full data.
      weights: optional (N,) non-negative sample weights.
      key: PRNG key for the mini-batches (default ``PRNGKey(0)``).

    Returns:
      :class:`SGDResult`. A non-finite loss or gradient stops the updates (``failed``) and
      the last finite parameters are returned, as :func:`jaxem.fit` does.

    Note:
      Unlike EM's M-step, nothing here adds ``reg_covar``: maximum likelihood lets a
      component collapse onto a few points, and a gradient fit can follow it there.
    """
    for name in ("log_joint", "to_unconstrained", "from_unconstrained"):
        if not hasattr(model, name):
            raise TypeError(f"fit_sgd needs model.{name}; {type(model).__name__} has none")
    _validation.check_int(n_steps, "n_steps", 1)
    if batch_size is not None:
        _validation.check_int(batch_size, "batch_size", 1)
    if optimizer is None:
        optimizer = _default_optimizer()
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax GradientTransformation, got "
                        f"{type(optimizer).__name__}")
    inp = em.prepare(model, x, params, weights=weights, ones=True)
    key = jax.random.PRNGKey(0) if key is None else key
    return _sgd_jit(model, optimizer, inp.x, inp.weights, params, key, n_steps, batch_size)


@functools.cache
def _default_optimizer() -> optax.GradientTransformation:
    # One object, so that calls without an optimizer share one compilation.
    return optax.adam(1e-2)
