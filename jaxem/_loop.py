"""The EM loop itself, for every driver: its state (:class:`FitResult`), one iteration
(:func:`em_step` = the model's E-step + :func:`em_update`), the ``lax.while_loop``
(:func:`run`) and the history buffer's sizing.

Shared by the in-memory drivers (:mod:`jaxem.em`, :mod:`jaxem.search`, the differentiable
fits) and the streamed ones (:mod:`jaxem.streamed`), which run the same update on statistics
summed over blocks read from the host. See :mod:`jaxem.em` for the stopping rule.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxem import _validation

RESTARTS_AXIS = "restarts"  # the vmap axis name of restarts, in memory and streamed


def check_model(model) -> None:
    """The model has the contract's two functions and is hashable (a static argument)."""
    if not hasattr(model, "e_step") or not hasattr(model, "m_step"):
        raise TypeError(f"model must define e_step and m_step, got {type(model).__name__}")
    try:
        hash(model)
    except TypeError as e:
        raise TypeError(f"model must be hashable (it is a static argument): {e}") from None


def check_settings(model, tol, max_iter, hyper: dict) -> None:
    """Eager checks of a driver's loop settings: ``max_iter`` an int ≥ 0, ``tol`` real
    (``-inf`` allowed; unchecked when traced), every hyperparameter real, and the model's own
    ``check_hyper``."""
    _validation.check_int(max_iter, "max_iter", 0)
    if not _validation.is_traced(tol):
        _validation.check_real(tol, "tol", allow_negative_infinity=True)
    for name, value in hyper.items():
        _validation.check_real(value, name)
    if hasattr(model, "check_hyper"):
        model.check_hyper(**hyper)


def running(s, max_iter):
    """Whether a fit in state ``s`` goes on: below ``max_iter``, not converged, not failed
    (on traced values, or on NumPy copies of the state on the host)."""
    return (s.n_iter < max_iter) & ~s.converged & ~s.failed


def with_default_hyper(model, hyper: dict, dtype=None) -> dict:
    """``hyper`` with the model's defaults filled in (so that passing or omitting one gives
    the same traced structure, hence one compilation); as arrays of ``dtype`` if given."""
    defaults = model.default_hyper() if hasattr(model, "default_hyper") else {}
    hyper = {**defaults, **hyper}
    return hyper if dtype is None else {k: jnp.asarray(v, dtype) for k, v in hyper.items()}


class FitResult(NamedTuple):
    """Result of :func:`fit` (under :func:`fit_restarts`, every field gains a leading axis)."""

    params: Any  # the model's params pytree
    lower_bound: jax.Array  # () mean log-likelihood at the last E-step (-inf if none ran)
    lower_bounds: jax.Array  # (max_iter,) per-iteration mean log-likelihood; NaN past n_iter
    n_iter: jax.Array  # () int32 number of E-steps that gave a finite log-likelihood
    converged: jax.Array  # () bool: the change fell below tol
    failed: jax.Array  # () bool: a non-finite value stopped the fit; params are the last finite


class RestartsResult(NamedTuple):
    """Result of :func:`fit_restarts`."""

    best: FitResult  # the restart with the highest lower bound
    best_index: jax.Array  # () int32 index of that restart
    restarts: FitResult  # every restart, fields with leading axis (n_init,)


def initial_params(model, x, weights, key, n_init: int, n_components: int, method: str,
                   init_kwargs: dict, hyper: dict):
    """``n_init`` initial parameter sets (leading axis) from ``model.init``, the i-th from
    the i-th of :func:`restart_keys` ``(key, n_init)``; traced (every driver's programs call
    it)."""
    return over_restarts(
        lambda k: model.init(k, x, n_components, weights=weights, method=method,
                             **init_kwargs, **hyper),
        n_init, restart_keys(key, n_init))


def over_restarts(fn, n_init: int, *args):
    """``fn`` over the restarts: ``vmap(fn, axis_name=RESTARTS_AXIS)`` along the leading
    axis of ``args`` (length ``n_init``, static), and for a single restart one plain call
    whose outputs get the axis. Batching a call traces the whole fit a second time (an iris
    fit's tracing: 0.35 s with a vmap of one restart, 0.20 s without); a model sized for
    the restarts then names no axis (:func:`restarts_axis`)."""
    if n_init == 1:
        out = fn(*jax.tree_util.tree_map(lambda a: a[0], args))
        return jax.tree_util.tree_map(lambda a: a[None], out)
    return jax.vmap(fn, axis_name=RESTARTS_AXIS)(*args)


def restarts_axis(n_init: int) -> str | None:
    """The axis name a model's ``with_batch`` gets for ``n_init`` restarts run by
    :func:`over_restarts`: :data:`RESTARTS_AXIS`, or None for one (no vmap to name)."""
    return RESTARTS_AXIS if n_init > 1 else None


def restart_keys(key, n_init: int) -> jax.Array:
    """The restarts' keys: ``jax.random.split(key, n_init)``."""
    return jax.random.split(key, n_init)


def best_restart(runs: FitResult) -> RestartsResult:
    """The restarts' runs (leading axis) with the best picked: the highest lower bound; a
    restart that never produced a finite bound cannot win."""
    if runs.lower_bound.shape[0] == 1:
        # Nothing to choose: a static index, where a traced one gathers every field (a
        # kernel each to compile: ~20 in a fit_batch program, ~0.1 s).
        return RestartsResult(jax.tree_util.tree_map(lambda a: a[0], runs), jnp.int32(0), runs)
    score = jnp.where(jnp.isfinite(runs.lower_bound), runs.lower_bound, -jnp.inf)
    best_index = jnp.argmax(score).astype(jnp.int32)
    best = jax.tree_util.tree_map(lambda a: a[best_index], runs)
    return RestartsResult(best, best_index, runs)


def all_finite(tree) -> jax.Array:
    """Whether every leaf of a pytree is finite (traced: a () bool array).

    The floating leaves are checked as one flat vector, a single reduction to compile,
    rather than one per leaf (four for a mixture's parameters in every EM loop)."""
    leaves = jax.tree_util.tree_leaves(tree)
    floats = [jnp.ravel(a) for a in leaves if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]
    ok = jnp.asarray(True)
    if floats:
        dtype = jnp.result_type(*floats)
        ok = jnp.all(jnp.isfinite(jnp.concatenate([a.astype(dtype) for a in floats])))
    return ok


def ll_dtype(params) -> jnp.dtype:
    leaves = jax.tree_util.tree_leaves(params)
    floats = [a.dtype for a in leaves if jnp.issubdtype(a.dtype, jnp.floating)]
    return jnp.result_type(*floats) if floats else jnp.result_type(float)


def relative_change(new, old) -> jax.Array:
    """max over leaves of max|new − old| / max|old|: how far one EM step moved the params.

    At ``new = T(old)`` this is the relative fixed-point residual of ``old``.
    """
    errs = [jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), jnp.finfo(b.dtype).tiny)
            for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old),
                            strict=True)]
    return functools.reduce(jnp.maximum, errs)


def em_step(model, x, weights, hyper, tol, s: FitResult, axis_name=None,
            param_tol=None) -> FitResult:
    """One EM iteration on the loop state: E-step at ``s.params``, then :func:`em_update`.

    Shared by the ``while_loop`` of :func:`run`, the implicit fit and the ``scan`` of the
    unrolled fit.
    """
    sharded = {} if axis_name is None else {"axis_name": axis_name}
    stats, ll = model.e_step(s.params, x, weights, **sharded)
    return em_update(model, hyper, tol, s, stats, ll, param_tol)


def em_update(model, hyper, tol, s: FitResult, stats, ll, param_tol=None) -> FitResult:
    """The rest of an iteration once the E-step's ``(stats, ll)`` at ``s.params`` are known:
    record ℓ, M-step, stopping decision.

    A non-finite ℓ or non-finite new parameters set ``failed`` and keep the old parameters.
    ``converged`` is ``|ℓ − ℓ_prev| < tol`` and, when ``param_tol`` is given, also
    :func:`relative_change` of the parameters ``<= param_tol``. The streamed drivers call it
    on statistics summed over blocks.
    """
    dtype = s.lower_bound.dtype
    new_params = model.m_step(stats, **hyper)
    # The model contract, checked when traced (no run-time cost): one log-likelihood, and
    # new params of the very structure and shapes the E-step read.
    chex.assert_shape(ll, ())
    chex.assert_trees_all_equal_shapes(new_params, s.params)
    ll = ll.astype(dtype)
    ll_ok = jnp.isfinite(ll)
    ok = ll_ok & all_finite(new_params)
    params = jax.tree_util.tree_map(
        lambda new, old: jnp.where(ok, new, old).astype(old.dtype), new_params, s.params
    )
    converged = ok & (jnp.abs(ll - s.lower_bound) < tol)
    if param_tol is not None:
        converged = converged & (relative_change(new_params, s.params) <= param_tol)
    return FitResult(
        params=params,
        lower_bound=jnp.where(ll_ok, ll, s.lower_bound),
        lower_bounds=_record(s.lower_bounds, s.n_iter, ll, ll_ok),
        n_iter=s.n_iter + ll_ok.astype(jnp.int32),
        converged=converged,
        failed=~ok,
    )


def _record(history: jax.Array, i: jax.Array, value: jax.Array, keep: jax.Array) -> jax.Array:
    """``history`` with entry ``i`` set to ``value`` where ``keep``: an elementwise select
    over the buffer rather than an indexed update, which under a ``vmap`` (restarts, a
    batch of datasets) is a scatter that XLA:CPU runs as a loop over the members — a
    1,000-dataset ``fit_batch`` ran a 1,000-step loop every EM iteration and compiled it (5
    kernels). The buffer is at most a few hundred entries."""
    return jnp.where(keep & (jnp.arange(history.shape[0]) == i), value, history)


def initial_state(params, n_history: int, lower_bound=-jnp.inf) -> FitResult:
    """The loop state before the first iteration; ``lower_bound`` is the ℓ the first
    iteration's change is measured from (-inf: a fresh fit; a warm start passes its last)."""
    dtype = ll_dtype(params)
    return FitResult(
        params=params,
        lower_bound=jnp.asarray(lower_bound, dtype),
        lower_bounds=jnp.full((max(n_history, 1),), jnp.nan, dtype),
        n_iter=jnp.asarray(0, jnp.int32),
        converged=jnp.asarray(False),
        failed=~all_finite(params),
    )


@dataclasses.dataclass(frozen=True)
class Progress:
    """Host-side hook called once per EM iteration from inside the compiled loop.

    Hashable (it is a static argument): equal hooks share one compilation.
    """

    fn: Callable[[int, int, float, float], None]  # (restart, iteration, loglik, change)

    def __call__(self, active, restart, iteration, ll, change):
        # Under vmap the loop body also runs for restarts that have stopped; skip those.
        for a, r, i, v, c in zip(*np.broadcast_arrays(active, restart, iteration, ll, change),
                                 strict=True):
            if a:
                self.fn(int(r), int(i), float(v), float(c))


def history_size(max_iter: int) -> int:
    """Length of the per-iteration history buffer for ``max_iter``: the next power of two
    (at least 128), so that ``max_iter`` is traced, not a compile key, and nearby values
    share one program. The drivers hand back its first ``max_iter`` entries."""
    return max(128, 1 << max(int(max_iter) - 1, 0).bit_length())


def run(model, x, weights, params, tol, max_iter, hyper, axis_name=None,
        progress: Progress | None = None, restart=0, lower_bound=-jnp.inf,
        param_tol=None, n_history: int | None = None,
        state: FitResult | None = None) -> FitResult:
    """The EM loop itself; traced inside jit (and vmap for restarts, shard_map for devices).

    ``lower_bound`` and ``param_tol``: see :func:`initial_state` and :func:`em_step`.
    ``n_history`` (static): the history buffer's length, ``>= max_iter``, which may then be
    traced; the whole buffer is returned. ``None``: ``max_iter`` (a Python int), and the
    history is exactly ``max_iter`` long. ``state``: a loop state to go on from (a run
    stopped by a smaller ``max_iter``, with the same ``n_history``) instead of a fresh one
    from ``params``: the run then goes on exactly as if it had not stopped.
    """
    params = params if state is None else state.params
    tol = jnp.asarray(tol, ll_dtype(params))

    def cond(s: FitResult):
        return running(s, max_iter)

    def body(s: FitResult) -> FitResult:
        new = em_step(model, x, weights, hyper, tol, s, axis_name, param_tol)
        if progress is not None:
            active = cond(s) & (new.n_iter > s.n_iter)
            if axis_name is not None:  # one report, not one per device
                active = active & (jax.lax.axis_index(axis_name) == 0)
            jax.debug.callback(progress, active[None], jnp.asarray(restart)[None],
                               new.n_iter[None], new.lower_bound[None],
                               (new.lower_bound - s.lower_bound)[None])
        return new

    sized = n_history is not None
    n_history = n_history if sized else max_iter
    if state is None:
        state = initial_state(params, n_history, lower_bound)
    out = jax.lax.while_loop(cond, body, state)
    return out if sized else out._replace(lower_bounds=out.lower_bounds[:max_iter])


def trim_history(result, max_iter: int):
    """``result`` (a :class:`FitResult`, or a :class:`RestartsResult`) with its history
    buffers cut to ``max_iter`` entries (see :func:`history_size`)."""
    if isinstance(result, RestartsResult):
        return RestartsResult(trim_history(result.best, max_iter), result.best_index,
                              trim_history(result.restarts, max_iter))
    history = result.lower_bounds
    if not _validation.is_traced(history):
        # Cut on the host and put back: slicing the device array eagerly would compile a
        # program for every history shape. (Unless JAX could not hold the host's dtype:
        # float64 outside x64 mode.)
        host = np.asarray(history)[..., :max_iter]
        if jax.dtypes.canonicalize_dtype(host.dtype) == host.dtype:
            return result._replace(lower_bounds=jax.device_put(host))
    return result._replace(lower_bounds=history[..., :max_iter])
