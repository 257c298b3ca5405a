"""Gradients through a fit: unrolled, implicit and envelope, against finite differences."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_blobs
from helpers import enable_x64, tree_allclose

import jaxem
from jaxem import gmm

COV_TYPES = ["full", "tied", "diag", "spherical"]
FD_STEP = 1e-5


def _problem(rng, cov_type, n_per=30):
    """Well-separated blobs (EM converges fast), weights, initial params, a random loss."""
    x = make_blobs(rng, n_per=n_per, k=3, d=2, sep=6.0)
    w = rng.uniform(0.5, 1.5, size=len(x))
    p0 = gmm.init(jax.random.PRNGKey(0), x, 3, cov_type, method="kmeans")
    proj = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape)), p0)
    return jnp.asarray(x), jnp.asarray(w), p0, proj


def _loss_of(fit_fn, p0, proj):
    """A loss reading every parameter and the fitted log-likelihood."""

    def loss(x, w, reg_covar):
        res = fit_fn(x, p0, w, reg_covar)
        leaves = zip(jax.tree_util.tree_leaves(res.params), jax.tree_util.tree_leaves(proj),
                     strict=True)
        return sum(jnp.vdot(a, b) for a, b in leaves) + res.lower_bound

    return loss


def _implicit(model):
    return lambda x, p0, w, r: jaxem.fit_implicit(model, x, p0, weights=w, tol=-1.0,
                                                  max_iter=200, reg_covar=r)


def _unrolled(model, n_steps=12, checkpoint=False):
    return lambda x, p0, w, r: jaxem.fit_unrolled(model, x, p0, weights=w, n_steps=n_steps,
                                                  checkpoint=checkpoint, reg_covar=r)


def _check_against_fd(loss, args, grads, rng, rtol=1e-5):
    for i, (a, g) in enumerate(zip(args, grads, strict=True)):
        v = jnp.asarray(rng.normal(size=np.shape(a)))
        plus = [*args[:i], a + FD_STEP * v, *args[i + 1:]]
        minus = [*args[:i], a - FD_STEP * v, *args[i + 1:]]
        fd = (loss(*plus) - loss(*minus)) / (2 * FD_STEP)
        np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=rtol,
                                   err_msg=f"argument {['x', 'weights', 'reg_covar'][i]}")


@pytest.mark.parametrize("mode", ["unrolled", "implicit"])
@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_gradients_match_finite_differences(x64, rng, cov_type, mode):
    x, w, p0, proj = _problem(rng, cov_type)
    model = gmm.GaussianMixtureModel(cov_type)
    fit_fn = _implicit(model) if mode == "implicit" else _unrolled(model)
    loss = jax.jit(_loss_of(fit_fn, p0, proj))
    args = (x, w, jnp.asarray(1e-2))
    grads = jax.grad(loss, argnums=(0, 1, 2))(*args)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    _check_against_fd(loss, args, grads, rng)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_envelope_gradient_equals_implicit_and_finite_differences(x64, rng, cov_type):
    x, w, p0, _ = _problem(rng, cov_type)
    model = gmm.GaussianMixtureModel(cov_type)

    def fitted(x, w, reg_covar):
        return jaxem.fit_implicit(model, x, p0, weights=w, tol=-1.0, max_iter=300,
                                  reg_covar=reg_covar)

    def total(x, w, reg_covar):  # ℓ(x, θ*(x)): its derivative through the adjoint solve
        return fitted(x, w, reg_covar).lower_bound

    def envelope(x, w, reg_covar):  # the same value, θ* held fixed
        params = fitted(x, w, reg_covar).params
        return jaxem.envelope_log_likelihood(model, params, x, w)

    args = (x, w, jnp.asarray(0.0))  # reg_covar = 0: θ* maximises ℓ
    g_env = jax.grad(envelope, argnums=(0, 1, 2))(*args)
    g_tot = jax.grad(total, argnums=(0, 1, 2))(*args)
    for a, b in zip(g_env[:2], g_tot[:2], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-10)
    # The envelope's partial in reg_covar is zero; at reg_covar = 0 so is the total derivative.
    assert float(g_env[2]) == 0.0 and abs(float(g_tot[2])) < 1e-6
    _check_against_fd(jax.jit(lambda x, w: total(x, w, 0.0)), args[:2], g_env[:2], rng)


def test_envelope_is_an_approximation_when_regularised(x64, rng):
    x, w, p0, _ = _problem(rng, "full")
    model = gmm.GaussianMixtureModel("full")

    def fitted(x, reg):
        return jaxem.fit_implicit(model, x, p0, weights=w, tol=-1.0, max_iter=300, reg_covar=reg)

    total = jax.grad(lambda x: fitted(x, 0.3).lower_bound)(x)
    env = jax.grad(lambda x: jaxem.envelope_log_likelihood(model, fitted(x, 0.3).params, x, w))(x)
    assert not np.allclose(np.asarray(total), np.asarray(env), rtol=1e-3)


def test_implicit_agrees_with_long_unrolled(x64, rng):
    x, w, p0, proj = _problem(rng, "full")
    model = gmm.GaussianMixtureModel("full")
    args = (x, w, jnp.asarray(1e-3))
    g_imp = jax.grad(_loss_of(_implicit(model), p0, proj), argnums=(0, 1, 2))(*args)
    g_unr = jax.grad(_loss_of(_unrolled(model, n_steps=150), p0, proj), argnums=(0, 1, 2))(*args)
    assert tree_allclose(g_imp, g_unr, rtol=1e-6, atol=1e-12)
    # ...but a short unroll is a different (truncated) derivative.
    g_short = jax.grad(_loss_of(_unrolled(model, n_steps=2), p0, proj))(*args)
    assert not np.allclose(np.asarray(g_short), np.asarray(g_imp[0]), rtol=1e-3)


def test_checkpointed_unroll_gives_the_same_gradient(x64, rng):
    x, w, p0, proj = _problem(rng, "diag")
    model = gmm.GaussianMixtureModel("diag")
    args = (x, w, jnp.asarray(1e-3))
    g = jax.grad(_loss_of(_unrolled(model), p0, proj), argnums=(0, 1, 2))(*args)
    g_ck = jax.grad(_loss_of(_unrolled(model, checkpoint=True), p0, proj), argnums=(0, 1, 2))(*args)
    assert tree_allclose(g, g_ck, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cov_type", ["full", "spherical"])
def test_forward_values_are_those_of_fit(x64, rng, cov_type):
    x, w, p0, _ = _problem(rng, cov_type)
    model = gmm.GaussianMixtureModel(cov_type)
    ref = jaxem.fit(model, x, p0, weights=w, tol=-1.0, max_iter=7, reg_covar=1e-3)
    unr = jaxem.fit_unrolled(model, x, p0, weights=w, n_steps=7, reg_covar=1e-3)
    assert tree_allclose(ref.params, unr.params, rtol=1e-13)
    np.testing.assert_allclose(unr.lower_bounds, ref.lower_bounds, rtol=1e-13)
    assert int(unr.n_iter) == 7 and not bool(unr.failed)
    imp = jaxem.fit_implicit(model, x, p0, weights=w, tol=1e-8, max_iter=300, reg_covar=1e-3)
    assert bool(imp.converged)
    # the same iterations as fit's: stopped later (on the parameter residual too), not
    # elsewhere
    ref = jaxem.fit(model, x, p0, weights=w, tol=-1.0, max_iter=int(imp.n_iter),
                    reg_covar=1e-3)
    assert tree_allclose(ref.params, imp.params, rtol=1e-13)
    short = jaxem.fit(model, x, p0, weights=w, tol=1e-8, max_iter=300, reg_covar=1e-3)
    assert int(short.n_iter) <= int(imp.n_iter)
    _, ll = model.e_step(imp.params, x, w)
    assert float(imp.lower_bound) == pytest.approx(float(ll), rel=1e-14)


def test_weight_gradient_at_zero_weight_is_the_log_density(x64, rng):
    x, w, p0, _ = _problem(rng, "full")
    w = w.at[5].set(0.0)
    params = jaxem.fit(gmm.GaussianMixtureModel("full"), x, p0, weights=w).params
    g = jax.grad(lambda w: jaxem.envelope_log_likelihood(
        gmm.GaussianMixtureModel("full"), params, x, w))(w)
    ll = float(jnp.sum(w * gmm.score_samples(params, x)) / jnp.sum(w))
    expected = (float(gmm.score_samples(params, x)[5]) - ll) / float(jnp.sum(w))
    assert float(g[5]) == pytest.approx(expected, rel=1e-10)


def _slow_problem(rng):
    """Two heavily overlapping components: EM (and the adjoint solve) converge slowly."""
    x = np.concatenate([rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + [1.2, 0]])
    p0 = gmm.init(jax.random.PRNGKey(0), x, 2, "full", method="kmeans")
    return jnp.asarray(x), p0


def _grad_with_warnings(fn, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = jax.block_until_ready(jax.grad(fn)(*args))
        jax.effects_barrier()
    return g, [c for c in caught if issubclass(c.category, jaxem.GradientWarning)]


def test_adjoint_non_convergence_is_reported_not_returned(rng):
    x, p0 = _slow_problem(rng)
    model = gmm.GaussianMixtureModel("full")

    def loss(x, **kw):
        return jnp.sum(jaxem.fit_implicit(model, x, p0, **kw).params.means)

    g, caught = _grad_with_warnings(lambda x: loss(x, max_iter=5000), x)
    assert not caught and np.all(np.isfinite(np.asarray(g)))
    g, caught = _grad_with_warnings(lambda x: loss(x, max_iter=5000, adjoint_max_iter=2), x)
    assert len(caught) == 1 and "adjoint solve did not converge" in str(caught[0].message)
    assert np.all(np.isnan(np.asarray(g)))



@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("seed", [1, 2])
def test_float32_implicit_gradient_does_not_depend_on_the_datas_units(cov_type, seed):
    """The gradient of the fitted means with respect to the data is unit-free
    (d μ / d x): the same for the data in metres or in micrometres. The adjoint system is
    solved with each parameter leaf in its own units; in the parameters' units its check
    failed at 1e3 or 1e6 in 4 of these 8 cases (float32 rounding of the pullback alone
    was up to 2e-2 of the right-hand side, and more where covariances are ~1e12) and a
    correct gradient came back NaN with a warning; at 1e-9 the scaled right-hand side is
    below eps in norm, which JAX's GMRES takes for zero unless it is normalised."""
    k = 2
    rng = np.random.default_rng(seed)
    base = make_blobs(rng, n_per=40, k=k, d=2, sep=8.0).astype(np.float32)
    model = gmm.GaussianMixtureModel(cov_type)
    grads = {}
    for scale in (1.0, 1e-9, 1e3, 1e6):
        x = jnp.asarray(base * np.float32(scale))
        # reg_covar in the data's units, so that the fits are the same fit rescaled
        p0 = gmm.init(jax.random.PRNGKey(0), x, k, cov_type, method="kmeans",
                      reg_covar=1e-6 * scale**2)
        loss = lambda x, p0=p0, scale=scale: jnp.sum(  # noqa: E731
            jaxem.fit_implicit(model, x, p0, reg_covar=1e-6 * scale**2).params.means)
        g, caught = _grad_with_warnings(loss, x)
        assert not caught, (scale, [str(c.message) for c in caught])
        grads[scale] = np.asarray(g)
    for scale in (1e-9, 1e3, 1e6):
        assert np.all(np.isfinite(grads[scale]))
        np.testing.assert_allclose(grads[scale], grads[1.0],
                                   atol=2e-3 * np.abs(grads[1.0]).max())


DEFAULT_FIXED_POINT_TOL_F32 = 1e-4


@pytest.mark.parametrize("cov_type", ["full", "diag"])
def test_default_implicit_gradient_never_warns_after_a_converged_fit(cov_type):
    # The fit's stopping rule and the gradient's trust check measure the same residual: on
    # overlapping components (slow EM, the case that used to warn by a hair depending on
    # the CPU's rounding), every fit that converges by its own rule gives a trusted gradient.
    model = gmm.GaussianMixtureModel(cov_type)
    n_converged = 0
    for seed in (0, 1, 2, 12345):
        for shift in (1.2, 2.0, 3.0):
            rng = np.random.default_rng(seed)
            x = jnp.asarray(np.concatenate([rng.normal(size=(200, 2)),
                                            rng.normal(size=(200, 2)) + [shift, 0]]))
            p0 = gmm.init(jax.random.PRNGKey(seed), x, 2, cov_type, method="kmeans")
            fit = jaxem.fit_implicit(model, x, p0)
            g, caught = _grad_with_warnings(
                lambda x, p0=p0: jnp.sum(jaxem.fit_implicit(model, x, p0).params.means), x)
            t = model.m_step(model.e_step(fit.params, x)[0])
            residual = float(jaxem.em.relative_change(t, fit.params))
            away = [c for c in caught if "away from a fixed point" in str(c.message)]
            if bool(fit.converged):
                n_converged += 1
                assert residual <= DEFAULT_FIXED_POINT_TOL_F32
                assert not caught, (seed, shift, [str(c.message) for c in caught])
                assert np.all(np.isfinite(np.asarray(g)))
            else:  # max_iter hit: flagged exactly when the residual is over fixed_point_tol
                assert int(fit.n_iter) == 500
                assert len(away) == (residual > DEFAULT_FIXED_POINT_TOL_F32)
    assert n_converged >= 6


def test_float32_implicit_gradient_is_accurate_on_real_data():
    # Standardised wine, K = 3, full, reg_covar = 1e-3: the float32 implicit gradient of the
    # fitted means with respect to the data against a float64 one at a tight fixed point.
    # (With the former fixed_point_tol of 1e-3 it was 2-3.5% off, without a warning.)
    from sklearn.datasets import load_wine

    x = load_wine().data
    x = (x - x.mean(0)) / x.std(0)
    model = gmm.GaussianMixtureModel("full")
    # One start for both precisions (k-means in float32 may seed another optimum): the best
    # of 8 float64 restarts, so that the gradient is taken at the same (best) optimum
    # whatever one seeding draws (a single k-means start can end at a worse optimum, from
    # which float32 stops just short of fixed_point_tol=1e-5).
    with enable_x64(True):
        start = jax.tree_util.tree_map(np.asarray, jaxem.fit_restarts(
            model, jnp.asarray(x), jax.random.PRNGKey(0), n_components=3, n_init=8,
            reg_covar=1e-3, tol=1e-10, max_iter=1000).best.params)

    def gradient(dtype, **kw):
        with enable_x64(dtype == np.float64):
            xx = jnp.asarray(x, dtype)
            p0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), start)
            loss = lambda xx: jnp.sum(  # noqa: E731
                jaxem.fit_implicit(model, xx, p0, reg_covar=1e-3, **kw).params.means)
            g, caught = _grad_with_warnings(loss, xx)
            assert not caught
            return np.asarray(g, np.float64)

    reference = gradient(np.float64, fixed_point_tol=1e-10, tol=1e-12, max_iter=2000)
    err = np.abs(gradient(np.float32) - reference).max() / np.abs(reference).max()
    assert err < 5e-3  # measured 2.9e-3 with the defaults, 3.4e-4 at fixed_point_tol=1e-5
    err = (np.abs(gradient(np.float32, fixed_point_tol=1e-5) - reference).max()
           / np.abs(reference).max())
    assert err < 1e-3


def test_gradient_through_an_unconverged_fit_warns(rng):
    x, p0 = _slow_problem(rng)
    model = gmm.GaussianMixtureModel("full")
    g, caught = _grad_with_warnings(
        lambda x: jnp.sum(jaxem.fit_implicit(model, x, p0, max_iter=3).params.means), x)
    assert len(caught) == 1 and "away from a fixed point" in str(caught[0].message)
    assert np.all(np.isfinite(np.asarray(g)))  # an approximation, flagged, not NaN


def test_jit_vmap_grad_compose(x64, rng):
    model = gmm.GaussianMixtureModel("full")
    datasets = jnp.stack([jnp.asarray(make_blobs(rng, n_per=20, k=3, d=2, sep=6.0))
                          for _ in range(3)])
    p0 = gmm.init(jax.random.PRNGKey(0), datasets[0], 3, "full", method="kmeans")

    def loss(x, p0, reg_covar):
        res = jaxem.fit_implicit(model, x, p0, tol=-1.0, max_iter=100, reg_covar=reg_covar)
        return jnp.sum(res.params.covariances) + res.lower_bound

    grad = jax.grad(loss, argnums=(0, 2))
    one = [jax.jit(grad)(x, p0, 1e-3) for x in datasets]
    # jit of grad is grad
    assert tree_allclose(grad(datasets[0], p0, 1e-3), one[0], rtol=1e-12)
    # vmap of grad over datasets (batched products round differently, at ~1e-13 of the
    # largest entry, so small entries get an absolute tolerance)
    batched = jax.vmap(grad, in_axes=(0, None, None))(datasets, p0, 1e-3)
    assert tree_allclose(batched, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *one),
                         rtol=1e-10, atol=1e-10)
    # vmap over restarts (initial parameters), and grad of a vmapped fit
    inits = jax.vmap(lambda k: gmm.init(k, datasets[0], 3, "full", method="kmeans"))(
        jax.random.split(jax.random.PRNGKey(1), 2))
    per_restart = jax.vmap(grad, in_axes=(None, 0, None))(datasets[0], inits, 1e-3)
    for i in range(2):
        p_i = jax.tree_util.tree_map(lambda a, i=i: a[i], inits)
        assert tree_allclose(jax.tree_util.tree_map(lambda a, i=i: a[i], per_restart),
                             jax.jit(grad)(datasets[0], p_i, 1e-3), rtol=1e-10, atol=1e-10)
    g_sum = jax.grad(lambda xs: jnp.sum(jax.vmap(loss, in_axes=(0, None, None))(xs, p0, 1e-3)))(
        datasets)
    assert tree_allclose(g_sum, jnp.stack([g[0] for g in one]), rtol=1e-10, atol=1e-10)
    # the unrolled fit composes the same way
    unrolled = jax.vmap(jax.grad(lambda x: jnp.sum(
        jaxem.fit_unrolled(model, x, p0, n_steps=5).params.means)))(datasets)
    assert unrolled.shape == datasets.shape and np.all(np.isfinite(np.asarray(unrolled)))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, x, p: jaxem.fit_unrolled(m, x, p, n_steps=0), ValueError, "n_steps"),
        (lambda m, x, p: jaxem.fit_unrolled(m, x, p, n_steps=2, checkpoint=1), TypeError,
         "checkpoint"),
        (lambda m, x, p: jaxem.fit_unrolled(m, x, p, n_steps=2, reg_covar=-1.0), ValueError,
         "reg_covar"),
        (lambda m, x, p: jaxem.fit_implicit(m, x, p, adjoint_max_iter=0), ValueError,
         "adjoint_max_iter"),
        (lambda m, x, p: jaxem.fit_implicit(m, x, p, adjoint_tol=-1e-3), ValueError,
         "adjoint_tol"),
        (lambda m, x, p: jaxem.fit_implicit(m, x, p, fixed_point_tol=float("nan")), ValueError,
         "fixed_point_tol"),
        (lambda m, x, p: jaxem.fit_implicit(m, x, p, weights=-np.ones(len(x))), ValueError,
         "weights"),
        (lambda m, x, p: jaxem.fit_implicit(m, x.at[0, 0].set(jnp.nan), p), ValueError, "x"),
        (lambda m, x, p: jaxem.fit_implicit(
            m, x, gmm.GMMParams(p.weights * jnp.nan, p.means, p.covariances,
                                p.precisions_cholesky, p.covariance_type)), ValueError, "params"),
        (lambda m, x, p: jaxem.envelope_log_likelihood(m, p, x[0]), ValueError, "x"),
    ],
)
def test_bad_input_is_rejected_eagerly(rng, call, error, match):
    x, _, p0, _ = _problem(rng, "full", n_per=5)
    with pytest.raises(error, match=match):
        call(gmm.GaussianMixtureModel("full"), x.astype(jnp.float32), p0)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_the_models_parameter_units_follow_the_data(cov_type):
    """``GaussianMixtureModel.param_scale``: 1 for the weights, σ for the means, σ² for the
    covariances, 1/σ for the precision factors, σ² the live components' mean variance — so
    data scaled by c scale the units by c, c², 1/c whatever the means' magnitude."""
    rng = np.random.default_rng(0)
    x = make_blobs(rng, n_per=30, k=3, d=2, sep=5.0)
    model = gmm.GaussianMixtureModel(cov_type)
    params = gmm.pad_components(gmm.init(jax.random.PRNGKey(0), x, 3, cov_type), 5)
    units = model.param_scale(params)
    assert jax.tree_util.tree_structure(units) == jax.tree_util.tree_structure(params)
    full = jaxem._linalg.full_covariance_matrices(params.covariances, cov_type, 5, 2)
    live = np.asarray(params.weights) > 0
    var = np.mean(np.diagonal(np.asarray(full), axis1=1, axis2=2)[live])
    assert float(units.weights) == 1.0
    np.testing.assert_allclose(float(units.covariances), var, rtol=1e-5)
    np.testing.assert_allclose(float(units.means), np.sqrt(var), rtol=1e-5)
    np.testing.assert_allclose(float(units.precisions_cholesky), 1 / np.sqrt(var), rtol=1e-5)
    scaled = gmm.pad_components(gmm.init(jax.random.PRNGKey(0), x * 1e3 - 7e3, 3, cov_type,
                                         reg_covar=1e-6 * 1e6), 5)
    np.testing.assert_allclose(float(model.param_scale(scaled).means),
                               1e3 * float(units.means), rtol=1e-3)
