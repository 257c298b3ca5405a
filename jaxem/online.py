"""EM one batch at a time: exact accumulation, and stochastic online EM.

Two ways to learn from data that arrives in batches, both built on the model's additive
statistics and its ``combine_stats`` (see :mod:`jaxem.streamed`):

- **Exact** (:func:`accumulate`, :func:`m_step`): E-steps at fixed parameters, summed over
  any number of batches; the M-step runs when asked. One round over all batches is exactly
  one batch EM iteration on their union (tested), so repeated rounds are batch EM, driven by
  the caller.
- **Stochastic online EM** (Cappé & Moulines 2009, "On-line expectation–maximization
  algorithm for latent data models", JRSS-B 71(3)): after each batch,
  ``s_t = (1 − ρ_t) s_{t−1} + ρ_t ŝ_t``, with ``ŝ_t`` the batch's statistics per unit of
  weight at ``θ_{t−1}``, and ``θ_t = M-step(s_t)``. The step sizes ``ρ_t = (t + t₀)^(−κ)``,
  ``κ ∈ (0.5, 1]``, satisfy Robbins–Monro's Σρ = ∞, Σρ² < ∞; the first batch has ρ = 1
  (there are no statistics yet to blend). Optional Polyak–Ruppert averaging of the
  statistics from batch ``average_from`` on: the reported parameters are the M-step of the
  running mean of ``s_t`` (which smooths the noise that κ < 1 lets through), while the
  recursion itself goes on from ``s_t``.

The GMM's M-step is invariant to the scale of its statistics (weights are ``n_k/Σn``, means
and covariances ratios), so statistics per unit of weight serve it directly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxem import _loop, _validation, blocks, streamed


class Accumulated(NamedTuple):
    """Statistics summed over batches at fixed parameters (exact mode)."""

    params: Any  # the parameters every E-step was taken at
    stats: Any  # the model's statistics, summed
    ll_sum: jax.Array  # () Σ w log p(x)
    weight: jax.Array  # () Σ w


@functools.partial(jax.jit, static_argnames="model")
def _accumulate(model, acc: Accumulated, x, w) -> Accumulated:
    stats, ll = model.e_step(acc.params, x, w)
    w_sum = jnp.sum(w).astype(acc.weight.dtype)
    ll = jnp.where(w_sum > 0, ll.astype(acc.ll_sum.dtype) * w_sum, 0.0)
    return Accumulated(acc.params, streamed.combiner(model)(acc.stats, stats),
                       acc.ll_sum + ll, acc.weight + w_sum)


def _as_batch(x, weights, dtype, name="x"):
    x = _validation.check_data(x, name)
    n = np.shape(x)[0]
    _validation.check_sample_weight(weights, n, "weights")
    w = np.ones(n, dtype) if weights is None else np.asarray(weights, dtype)
    return jnp.asarray(np.asarray(x, dtype)), jnp.asarray(w)


def accumulate(model, params, x, weights=None, acc: Accumulated | None = None) -> Accumulated:
    """Add one batch's E-step statistics at ``params`` to ``acc`` (None: start a sum).

    ``acc.params`` must be ``params``: every batch of a round is taken at the same parameters.
    """
    dtype = np.dtype(_loop.ll_dtype(params))
    xb, wb = _as_batch(x, weights, dtype)
    if acc is None:
        acc = Accumulated(params, streamed.zero_statistics(model, params, xb, wb),
                          jnp.zeros((), dtype), jnp.zeros((), dtype))
    return _accumulate(model, acc, xb, wb)


def m_step(model, acc: Accumulated, **hyper):
    """``(params, mean log-likelihood at acc.params)`` from the accumulated statistics: the
    result of one EM iteration over every batch added since the sum started."""
    if float(acc.weight) <= 0:
        raise ValueError("no sample of positive weight has been accumulated")
    hyper = _loop.with_default_hyper(model, hyper, acc.weight.dtype)
    return _m_step(model, acc.stats, hyper), acc.ll_sum / acc.weight


@functools.partial(jax.jit, static_argnames="model")
def _m_step(model, stats, hyper):
    return model.m_step(stats, **hyper)


class OnlineState(NamedTuple):
    """State of stochastic online EM after ``step`` batches."""

    params: Any  # θ_t = M-step(s_t): the parameters the next E-step is taken at
    stats: Any  # s_t, per unit of weight
    average: Any  # running mean of s_t since average_from (zeros before)
    n_averaged: jax.Array  # () how many s_t the average holds
    step: jax.Array  # () int32 t, batches seen
    log_likelihood: jax.Array  # () mean log-likelihood of the last batch at θ_{t−1}


def check_schedule(kappa, t0, average_from=None):
    """κ ∈ (0.5, 1] (Robbins–Monro: Σρ = ∞ needs κ ≤ 1, Σρ² < ∞ needs κ > 0.5), t₀ ≥ 0,
    ``average_from`` None or an int ≥ 1."""
    kappa = float(_validation.check_real(kappa, "kappa"))
    if not 0.5 < kappa <= 1.0:
        raise ValueError(f"kappa must be in (0.5, 1] so that the steps (t + t0)^-kappa sum to "
                         f"infinity while their squares do not, got {kappa}")
    t0 = float(_validation.check_real(t0, "t0", minimum=0.0))
    if average_from is not None:
        _validation.check_int(average_from, "average_from", 1)
    return kappa, t0


def step_size(t, kappa, t0):
    """ρ_t = (t + t₀)^(−κ) for t ≥ 2; ρ_1 = 1."""
    t = jnp.asarray(t)
    return jnp.where(t <= 1, 1.0, (t + t0) ** (-kappa))


def start(model, params) -> OnlineState:
    """The state before any batch: ``params`` and no statistics."""
    dtype = _loop.ll_dtype(params)
    return OnlineState(params, None, None, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                       jnp.asarray(-jnp.inf, dtype))


@functools.partial(jax.jit, static_argnames=("model", "average"))
def _online_step(model, state: OnlineState, x, w, kappa, t0, average_from, hyper, average):
    combine = streamed.combiner(model)
    stats, ll = model.e_step(state.params, x, w)
    w_sum = jnp.sum(w)
    s_hat = combine(stats, stats, 0.0, 1.0 / w_sum)  # per unit of weight
    t = state.step + 1
    rho = step_size(t, kappa, t0).astype(w_sum.dtype)
    s = s_hat if state.stats is None else combine(state.stats, s_hat, 1.0 - rho, rho)
    params = model.m_step(s, **hyper)
    ok = _loop.all_finite(params) & jnp.isfinite(ll) & (w_sum > 0)
    keep = functools.partial(jax.tree_util.tree_map, lambda new, old: jnp.where(ok, new, old))
    params = keep(params, state.params)
    if state.stats is not None:
        s = keep(s, state.stats)
    else:  # a first batch that failed leaves no statistics behind (ρ of the next is 1)
        s = jax.tree_util.tree_map(lambda a: jnp.where(ok, a, jnp.zeros_like(a)), s)
    n_avg, avg = state.n_averaged, state.average
    if average:
        into = ok & (t >= average_from)
        n_new = n_avg + into.astype(jnp.int32)
        frac = jnp.where(into, 1.0 / jnp.maximum(n_new, 1), 0.0).astype(w_sum.dtype)
        avg = s if avg is None else combine(avg, s, 1.0 - frac, frac)
        avg = jax.tree_util.tree_map(lambda a: jnp.where(n_new > 0, a, jnp.zeros_like(a)), avg)
        n_avg = n_new
    elif avg is None:
        avg = jax.tree_util.tree_map(jnp.zeros_like, s)
    return OnlineState(params, s, avg, n_avg, jnp.where(ok, t, state.step),
                       jnp.where(ok, ll, state.log_likelihood).astype(state.log_likelihood.dtype))


def update(model, state: OnlineState, x, weights=None, *, kappa=0.6, t0=0.0,
           average_from: int | None = None, **hyper) -> OnlineState:
    """One online EM step on a batch (see the module docstring). A batch that would make the
    parameters non-finite is skipped (state unchanged)."""
    kappa, t0 = check_schedule(kappa, t0, average_from)
    dtype = np.dtype(_loop.ll_dtype(state.params))
    xb, wb = _as_batch(x, weights, dtype)
    return _step(model, state, xb, wb, kappa, t0, average_from, hyper)


def _step(model, state, xb, wb, kappa, t0, average_from, hyper):
    dtype = _loop.ll_dtype(state.params)
    hyper = _loop.with_default_hyper(model, hyper, dtype)
    return _online_step(model, state, xb, wb, jnp.asarray(kappa, dtype),
                        jnp.asarray(t0, dtype), jnp.int32(average_from or 0), hyper,
                        average_from is not None)


def current_params(model, state: OnlineState, **hyper):
    """The parameters to report: the M-step of the averaged statistics once averaging has
    begun, else θ_t."""
    if state.n_averaged is None or int(state.n_averaged) == 0:
        return state.params
    hyper = _loop.with_default_hyper(model, hyper, _loop.ll_dtype(state.params))
    return _m_step(model, state.average, hyper)


class OnlineResult(NamedTuple):
    """Result of :func:`fit`."""

    params: Any  # the reported parameters (averaged when averaging ran)
    state: OnlineState
    log_likelihoods: np.ndarray  # (batches,) each batch's mean log-likelihood before its step


def fit(model, data, params, *, batch_rows: int = 4096, n_passes: int = 1, kappa=0.6,
        t0=0.0, average_from: int | None = None, weights=None,
        progress: Callable[[int, float], None] | None = None, **hyper) -> OnlineResult:
    """Stochastic online EM over host data (any :mod:`jaxem.blocks` source, or an array in
    memory), ``batch_rows`` rows per step, ``n_passes`` times over the data.

    Batches are fixed-size blocks of the data in its stored order (the last padded with
    zero-weight rows): shuffle the rows first if their order is not random.
    ``progress(batch, log_likelihood)`` is called on the host after each step.
    """
    kappa, t0 = check_schedule(kappa, t0, average_from)
    _validation.check_int(batch_rows, "batch_rows", 1)
    _validation.check_int(n_passes, "n_passes", 1)
    if not blocks.is_host_data(data):
        data = np.asarray(_validation.check_data(data, "x"))
    data = blocks.HostData(data, weights)
    dtype = np.dtype(_loop.ll_dtype(params))
    state = start(model, params)
    lls = []
    for _ in range(n_passes):
        for _, (xd, wd) in data.device_blocks(batch_rows, dtype):
            state = _step(model, state, xd, wd, kappa, t0, average_from, hyper)
            lls.append(state.log_likelihood)
            if progress is not None:
                progress(len(lls), float(state.log_likelihood))
    return OnlineResult(current_params(model, state, **hyper), state,
                        np.asarray(jax.device_get(lls), np.float64))
