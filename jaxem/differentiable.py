"""Gradients through an EM fit: unrolled, implicit, and the envelope shortcut.

A fit maps data ``x``, sample weights ``w`` and hyperparameters ``η`` (e.g. ``reg_covar``) to
parameters θ*. ``lax.while_loop`` cannot be reverse-differentiated, so jaxem offers three
ways to get ``d loss(θ*) / d(x, w, η)``:

unrolled (:func:`fit_unrolled`)
    exactly ``n_steps`` EM steps under ``lax.scan``; reverse mode differentiates every step.
    Memory grows linearly with ``n_steps`` (each step keeps its E-step residuals, O(N·K·D)
    for full covariances); ``checkpoint=True`` keeps only each step's parameters and
    recomputes the step in the backward pass (about one more forward fit of time).

implicit (:func:`fit_implicit`)
    the ordinary compiled fit, then the implicit function theorem at its fixed point
    θ* = T(θ*; x, w, η), with T = m_step ∘ e_step::

        dθ*/dη = (I − ∂T/∂θ)⁻¹ ∂T/∂η

    The backward pass solves the adjoint system (I − ∂T/∂θ)ᵀ v = ḡ by GMRES, one
    vector-Jacobian product of T per iteration, then pulls v back through T once. Memory is
    that of one EM step whatever the number of forward iterations.

envelope (:func:`envelope_log_likelihood`)
    at a stationary point of the log-likelihood ℓ, ∂ℓ/∂θ = 0, so dℓ(x, θ*(x))/dx equals the
    partial derivative at fixed θ*: no solve at all. Exact for ``reg_covar = 0`` (the M-step
    then maximises ℓ); with ``reg_covar > 0`` it is off by O(reg_covar).

Parameterisation: the fixed point is taken over the model's own params pytree (for the GMM:
weights, means, covariances and precision Cholesky factors). The M-step returns weights on
the simplex and positive-definite precisions by construction, so θ* stays on that set; the
directions off it (e.g. scaling all weights, the zero triangle of a Cholesky factor) are
mapped to zero by ∂T/∂θ, and the adjoint system is regular wherever EM converges linearly.
Gradients with respect to the initial parameters are zero (the fixed point does not depend
on them locally). Reverse mode only (``jax.grad``, ``jax.vjp``); it composes with ``jax.jit``
and ``jax.vmap``.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxem import _validation, em
from jaxem.em import FitResult


class GradientWarning(UserWarning):
    """An implicit gradient that cannot be trusted: its entries are set to NaN or it was
    taken away from a fixed point. Pair with ``optax.apply_if_finite`` to skip such steps."""


# ----------------------------------------------------------------------------- unrolled


@functools.partial(jax.jit, static_argnames=("model", "n_steps", "checkpoint"))
def _unrolled_jit(model, x, weights, params, tol, n_steps, checkpoint, hyper):
    never = jnp.asarray(-jnp.inf, tol.dtype)

    def step(s: FitResult, _):
        new = em.em_step(model, x, weights, hyper, never, s)
        # After a failure the state stays frozen, as the while_loop would have stopped.
        return jax.tree_util.tree_map(lambda a, b: jnp.where(s.failed, b, a), new, s), None

    if checkpoint:
        step = jax.checkpoint(step)
    out, _ = jax.lax.scan(step, em.initial_state(params, n_steps), length=n_steps)
    bounds = out.lower_bounds
    change = jnp.abs(bounds[-1] - bounds[-2]) if n_steps >= 2 else jnp.inf
    return out._replace(converged=~out.failed & (out.n_iter == n_steps) & (change < tol))


def fit_unrolled(
    model,
    x: jax.typing.ArrayLike,
    params,
    *,
    n_steps: int,
    weights: jax.typing.ArrayLike | None = None,
    tol: jax.typing.ArrayLike = 1e-3,
    checkpoint: bool = False,
    **hyper,
) -> FitResult:
    """Exactly ``n_steps`` EM steps under ``lax.scan``: reverse-mode differentiable.

    The steps are the same as :func:`jaxem.fit`'s; only the loop differs. Gradients flow to
    ``x``, ``weights``, ``hyper`` and the initial ``params``.

    Args:
      model: the model (hashable, static).
      x: (N, D) data.
      params: initial parameters.
      n_steps: number of EM steps (static).
      weights: optional (N,) non-negative per-sample weights.
      tol: only sets ``converged`` (the last step changed ℓ by less than ``tol``); all
        ``n_steps`` always run.
      checkpoint: recompute each step in the backward pass instead of storing its
        residuals: memory O(n_steps·|θ| + one step) instead of O(n_steps · one step).
      **hyper: M-step hyperparameters, e.g. ``reg_covar`` (traced, differentiable).

    Returns:
      :class:`jaxem.FitResult`; ``lower_bounds`` has length ``n_steps``. If a step fails
      (non-finite values) the state freezes there, ``failed`` is set, and gradients through
      the failed step are not meaningful.
    """
    _validation.check_int(n_steps, "n_steps", 1)
    if not isinstance(checkpoint, bool):
        raise TypeError(f"checkpoint must be a bool, got {type(checkpoint).__name__}")
    inp = em.prepare(model, x, params, weights=weights, tol=tol, hyper=hyper)
    return _unrolled_jit(model, inp.x, inp.weights, params, inp.tol, n_steps, checkpoint,
                         inp.hyper)


# ----------------------------------------------------------------------------- implicit


def _fixed_point_map(model, theta, x, w, hyper):
    """T(θ) = m_step(e_step(θ)): EM's update, whose fixed points are the fits."""
    stats, _ = model.e_step(theta, x, w)
    return model.m_step(stats, **hyper)


def _tree_vdot(a, b):
    return sum(jnp.vdot(u, v) for u, v in zip(jax.tree_util.tree_leaves(a),
                                              jax.tree_util.tree_leaves(b), strict=True))


def _parameter_units(model, theta):
    """Per-leaf units of the parameters for the adjoint solve: the model's own
    (``model.param_scale(params)``, a pytree like ``params``: optional in the model
    contract), else 1 for every leaf. Non-finite or non-positive units count as 1."""
    if hasattr(model, "param_scale"):
        units = model.param_scale(theta)
    else:
        units = jax.tree_util.tree_map(lambda a: jnp.ones((), a.dtype), theta)
    return jax.tree_util.tree_map(
        lambda u: jnp.where(jnp.isfinite(u) & (u > 0), u, jnp.ones_like(u)), units)


def _report(fp_err, fp_tol, adj_err, adj_tol, failed):
    """Host callback of the backward pass: warn about gradients that cannot be trusted."""
    fp_err, adj_err = np.asarray(fp_err), np.asarray(adj_err)
    if np.any(np.asarray(failed)):
        warnings.warn("implicit gradient through a fit that failed (non-finite values); the "
                      "gradient is NaN", GradientWarning, stacklevel=1)
    elif np.any(fp_err > np.asarray(fp_tol)):
        warnings.warn(
            f"implicit gradient taken away from a fixed point: |T(θ) − θ| / |θ| = "
            f"{np.max(fp_err):.2e} > fixed_point_tol = {np.max(fp_tol):.1e}; tighten tol or "
            "raise max_iter of the fit", GradientWarning, stacklevel=1)
    if np.any(adj_err > np.asarray(adj_tol)):
        warnings.warn(
            f"the adjoint solve did not converge (relative residual {np.max(adj_err):.2e} > "
            f"adjoint_tol = {np.max(adj_tol):.1e}); the gradient is NaN. Raise "
            "adjoint_max_iter, or EM converges too slowly here (overlapping components)",
            GradientWarning, stacklevel=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _implicit_fixed_point(model, max_iter, adjoint_max_iter, x, w, params0, tol, hyper, tols):
    run = _forward(model, max_iter, x, w, params0, tol, hyper, tols)
    return run.params, run._replace(params=None)


def _forward(model, max_iter, x, w, params0, tol, hyper, tols):
    """The compiled fit, stopping on the residual the backward pass checks: besides
    ``|Δℓ| < tol``, an iteration must move the parameters by at most half of
    ``fixed_point_tol``, so that the returned θ* (one EM step further, and EM contracts)
    passes the gradient's trust check with a margin."""
    return em.run(model, x, w, params0, tol, max_iter, hyper, param_tol=tols[1] / 2)


def _implicit_fwd(model, max_iter, adjoint_max_iter, x, w, params0, tol, hyper, tols):
    run = _forward(model, max_iter, x, w, params0, tol, hyper, tols)
    residuals = (x, w, run.params, params0, tol, hyper, tols, run.failed)
    return (run.params, run._replace(params=None)), residuals


def _implicit_bwd(model, max_iter, adjoint_max_iter, residuals, cotangents):
    x, w, theta, params0, tol, hyper, tols, failed = residuals
    adjoint_tol, fixed_point_tol = tols
    g = cotangents[0]  # the run's other outputs are returned without gradient
    t_theta, pullback = jax.vjp(functools.partial(_fixed_point_map, model), theta, x, w, hyper)
    # The system is solved with the parameters in the model's units (θ = S θ̃, S per leaf:
    # model.param_scale; the GMM's are σ, σ², 1/σ from its covariances): (I − S ∂Tᵀ S⁻¹)
    # ṽ = S g, v = S⁻¹ ṽ, the right-hand side made of unit norm. In raw units the
    # operator's rounding is set by the largest leaf: with data at 1e6 (covariances ~1e12) a
    # float32 pullback of the exact solution had residual 2e-2 of ‖g‖ in the weights, and a
    # correct gradient became NaN. (And JAX's GMRES treats a vector of norm below eps as
    # zero: a right-hand side of norm 1e-8 came back as v = 0.)
    scale = _parameter_units(model, theta)
    mul = functools.partial(jax.tree_util.tree_map, jnp.multiply)
    div = functools.partial(jax.tree_util.tree_map, jnp.divide)

    def adjoint_operator(v):  # ṽ ↦ (I − S ∂Tᵀ S⁻¹) ṽ, i.e. v ↦ (I − ∂T/∂θ)ᵀ v scaled
        return jax.tree_util.tree_map(jnp.subtract, v, mul(scale, pullback(div(v, scale))[0]))

    rhs = mul(scale, g)
    rhs_norm = jnp.sqrt(_tree_vdot(rhs, rhs))
    rhs_norm = jnp.where(jnp.isfinite(rhs_norm) & (rhs_norm > 0), rhs_norm, 1.0)
    rhs = jax.tree_util.tree_map(lambda a: a / rhs_norm, rhs)
    restart = min(adjoint_max_iter, 20)
    # GMRES's own residual estimate can be optimistic in float32: aim a little lower.
    v, _ = jax.scipy.sparse.linalg.gmres(
        adjoint_operator, rhs, tol=adjoint_tol / 4, atol=0.0, restart=restart,
        maxiter=-(-adjoint_max_iter // restart), solve_method="incremental",
    )
    # GMRES gives no verdict: measure the true residual of what it returns.
    r = jax.tree_util.tree_map(jnp.subtract, rhs, adjoint_operator(v))
    g_norm = jnp.sqrt(_tree_vdot(rhs, rhs))
    adj_err = jnp.where(g_norm > 0, jnp.sqrt(_tree_vdot(r, r)) / jnp.where(g_norm > 0, g_norm, 1),
                        0.0)
    v = jax.tree_util.tree_map(lambda a: a * rhs_norm, div(v, scale))
    fp_err = em.relative_change(t_theta, theta)
    jax.debug.callback(_report, fp_err, fixed_point_tol, adj_err, adjoint_tol, failed)
    _, gx, gw, ghyper = pullback(v)
    trusted = (adj_err <= adjoint_tol) & ~failed
    gx, gw, ghyper = jax.tree_util.tree_map(
        lambda a: jnp.where(trusted, a, jnp.nan), (gx, gw, ghyper))
    zeros = functools.partial(jax.tree_util.tree_map, jnp.zeros_like)
    return gx, gw, zeros(params0), zeros(tol), ghyper, zeros(tols)


_implicit_fixed_point.defvjp(_implicit_fwd, _implicit_bwd)


@functools.partial(jax.jit, static_argnames=("model", "max_iter", "adjoint_max_iter"))
def _implicit_jit(model, x, w, params, tol, max_iter, adjoint_max_iter, tols, hyper):
    theta, run = _implicit_fixed_point(model, max_iter, adjoint_max_iter, x, w, params, tol,
                                       hyper, tols)
    run = jax.lax.stop_gradient(run)
    # ℓ at the returned fixed point, differentiable along both paths (through θ* and direct).
    _, ll = model.e_step(theta, x, w)
    return run._replace(params=theta, lower_bound=ll.astype(run.lower_bound.dtype))


def fit_implicit(
    model,
    x: jax.typing.ArrayLike,
    params,
    *,
    weights: jax.typing.ArrayLike | None = None,
    tol: jax.typing.ArrayLike = 1e-6,
    max_iter: int = 500,
    adjoint_tol: jax.typing.ArrayLike | None = None,
    adjoint_max_iter: int = 100,
    fixed_point_tol: jax.typing.ArrayLike | None = None,
    **hyper,
) -> FitResult:
    """:func:`jaxem.fit`, differentiated at its fixed point by the implicit function theorem.

    The forward pass is the ordinary compiled ``while_loop`` fit. In the backward pass the
    adjoint system ``(I − ∂T/∂θ)ᵀ v = ḡ`` (T = m_step ∘ e_step) is solved by GMRES; its cost
    is one vector-Jacobian product of T (about three EM steps of time, one of memory) per
    GMRES iteration, independent of how many iterations the forward fit took.

    Untrustworthy gradients are reported, never silent: the backward pass issues a
    :class:`GradientWarning` when the fit stopped away from a fixed point
    (``max|T(θ) − θ| / max|θ| > fixed_point_tol`` for some leaf) and, when the adjoint solve
    misses ``adjoint_tol`` within ``adjoint_max_iter`` products or the fit failed, also sets
    the gradient to NaN.

    Args:
      model: the model (hashable, static).
      x: (N, D) data (differentiable).
      params: initial parameters (no gradient flows to them).
      weights: optional (N,) non-negative per-sample weights (differentiable).
      tol: the fit's tolerance on the change of the mean log-likelihood (traced). Tighter
        than :func:`jaxem.fit`'s default, because the gradient is that of the fixed point.
        The fit converges only when, besides, an iteration moves the parameters by at most
        ``fixed_point_tol / 2`` (relative, per leaf): the stopping rule and the gradient's
        trust check measure the same thing, so a fit that converged by its own rule never
        warns.
      max_iter: the fit's iteration cap (static).
      adjoint_tol: relative residual the adjoint solve must reach (traced), measured with
        the parameters in the model's units (``model.param_scale``; for the GMM σ, σ²,
        1/σ). Default: √eps of the dtype (3e-4 in float32, 1.5e-8 in float64).
      adjoint_max_iter: cap on vector-Jacobian products in the adjoint solve (static).
      fixed_point_tol: largest relative fixed-point residual ``max|T(θ) − θ| / max|θ|``
        accepted without a warning (traced); the forward fit stops at half of it (see
        ``tol``). Default: 1e-4 in float32, 1e-8 in float64 (the gradient's relative error
        is about this residual times 1/(1 − EM's rate of convergence)).
      **hyper: M-step hyperparameters, e.g. ``reg_covar`` (traced, differentiable).

    Returns:
      :class:`jaxem.FitResult` whose ``params`` are differentiable and whose ``lower_bound``
      is the mean log-likelihood *at* those params (one E-step after the loop, so that it is
      differentiable too); ``lower_bounds``, ``n_iter`` and the flags carry no gradient.
    """
    _validation.check_int(adjoint_max_iter, "adjoint_max_iter", 1)
    inp = em.prepare(model, x, params, weights=weights, tol=tol, max_iter=max_iter,
                     hyper=hyper, ones=True)
    dtype = inp.x.dtype
    eps = float(jnp.finfo(dtype).eps)
    if adjoint_tol is None:
        adjoint_tol = eps**0.5
    if fixed_point_tol is None:
        # The gradient's error grows like the residual over (1 − EM's rate): measured on
        # the wine data (K = 3, full), a residual of 1e-3 gave gradients 1.5-3.5% off, 1e-4
        # 0.3%, 1e-5 0.03%. float32 cannot go much below 1e-4 on ill-conditioned fits (its
        # rounding floor was 2e-5 on 40 points in 8-D), so that is its default.
        fixed_point_tol = 1e-4 if dtype == jnp.float32 else 1e-8
    _validation.check_real(adjoint_tol, "adjoint_tol", minimum=0.0)
    _validation.check_real(fixed_point_tol, "fixed_point_tol", minimum=0.0)
    tols = (jnp.asarray(adjoint_tol, dtype), jnp.asarray(fixed_point_tol, dtype))
    return _implicit_jit(model, inp.x, inp.weights, params, inp.tol, max_iter,
                         adjoint_max_iter, tols, inp.hyper)


# ----------------------------------------------------------------------------- envelope


def envelope_log_likelihood(
    model, params, x: jax.typing.ArrayLike, weights: jax.typing.ArrayLike | None = None
) -> jax.Array:
    """Mean log-likelihood at fitted ``params``, differentiated with ``params`` held fixed.

    At a fixed point of EM with ``reg_covar = 0`` the parameters maximise the log-likelihood,
    so its total derivative in ``x`` or ``weights`` equals this partial one (the envelope
    theorem): the cheap gradient, no adjoint solve. Not for hyperparameters (their partial
    derivative at fixed θ is zero) nor for losses other than the fitted log-likelihood.
    """
    _validation.check_data(x, "x")
    return model.e_step(jax.lax.stop_gradient(params), x, weights)[1]

