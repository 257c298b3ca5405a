"""EM drivers: the while-loop fit, vmapped restarts, stopping rule, failures, genericity."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_blobs
from helpers import tree_allclose

import jaxem
from jaxem import _loop, em, gmm

COV_TYPES = ["full", "tied", "diag", "spherical"]


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_log_likelihood_never_decreases(x64, rng, cov_type):
    x = make_blobs(rng, n_per=80, k=4, d=3, sep=2.0)
    model = gmm.GaussianMixtureModel(cov_type)
    for seed in range(3):
        params = gmm.init(jax.random.PRNGKey(seed), x, 4, cov_type, method="random")
        result = jaxem.fit(model, x, params, tol=-1.0, max_iter=60, reg_covar=0.0)
        hist = np.asarray(result.lower_bounds)
        assert int(result.n_iter) == 60 and not bool(result.failed)
        # Exact ascent, up to float64 rounding of the mean log-likelihood itself.
        assert np.all(np.diff(hist) >= -1e-13 * np.abs(hist[1:]))
        assert hist[-1] > hist[0]


def test_stopping_rule_and_history(x64, blobs):
    model = gmm.GaussianMixtureModel("full")
    params = gmm.init(jax.random.PRNGKey(0), blobs, 3, "full", method="random")
    result = jaxem.fit(model, blobs, params, tol=1e-4, max_iter=200)
    n = int(result.n_iter)
    hist = np.asarray(result.lower_bounds)
    assert bool(result.converged) and 1 < n < 200
    assert abs(hist[n - 1] - hist[n - 2]) < 1e-4 and np.all(np.abs(np.diff(hist[: n - 1])) >= 1e-4)
    assert np.all(np.isnan(hist[n:])) and float(result.lower_bound) == hist[n - 1]
    # A negative tol runs exactly max_iter iterations.
    capped = jaxem.fit(model, blobs, params, tol=-1.0, max_iter=7)
    assert int(capped.n_iter) == 7 and not bool(capped.converged)
    np.testing.assert_allclose(capped.lower_bounds, hist[:7], rtol=1e-12)


def test_max_iter_zero_returns_init(blobs):
    params = gmm.init(jax.random.PRNGKey(0), blobs.astype(np.float32), 3, "diag")
    result = jaxem.fit(gmm.GaussianMixtureModel("diag"), blobs, params, max_iter=0)
    assert int(result.n_iter) == 0 and result.lower_bounds.shape == (0,)
    assert tree_allclose(result.params, params) and float(result.lower_bound) == -np.inf


def test_best_restart_of_one_is_that_restart_without_a_gather():
    """One restart: it is the best (index 0, even with a non-finite bound, as argmax gives),
    taken by a static index, so the program gathers nothing (a kernel per field to compile);
    several: the highest finite bound wins."""
    def runs(bounds):
        n = len(bounds)
        params = {"m": jnp.arange(n * 3.0).reshape(n, 3)}
        return em.FitResult(params, jnp.asarray(bounds), jnp.zeros((n, 4)), jnp.arange(n),
                            jnp.zeros(n, bool), jnp.zeros(n, bool))
    for bound in (-1.5, np.nan):
        one = runs([bound])
        best = _loop.best_restart(one)
        assert int(best.best_index) == 0
        assert tree_allclose(best.best.params, {"m": jnp.arange(3.0)})
        batched = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), one)  # fit_batch's
        for text in (jax.jit(_loop.best_restart).lower(one).as_text(),
                     jax.jit(jax.vmap(_loop.best_restart)).lower(batched).as_text()):
            assert "gather" not in text and "dynamic_slice" not in text
    best = _loop.best_restart(runs([np.nan, -2.0, -3.0]))
    assert int(best.best_index) == 1
    assert tree_allclose(best.best.params, {"m": jnp.arange(3.0, 6.0)})


@pytest.mark.parametrize("cov_type", ["full", "diag"])
def test_a_single_restart_runs_unbatched_and_equals_it_batched_and_alone(x64, rng, cov_type):
    """n_init = 1 runs without a vmap (_loop.over_restarts; the model names no restarts
    axis): the same fit as the first restart's alone, and as a vmap over one restart with
    the model sized and named for it (how n_init > 1 runs each restart)."""
    x = make_blobs(rng, n_per=60, k=3, d=2, sep=2.5)
    model = gmm.GaussianMixtureModel(cov_type, moments="product")
    key = jax.random.PRNGKey(5)
    res = jaxem.fit_restarts(model, x, key, n_components=3, n_init=1, init_method="random",
                             tol=1e-6, max_iter=300)
    assert np.shape(res.restarts.n_iter) == (1,)
    params0 = model.init(jax.random.split(key, 1)[0], x, 3, method="random", reg_covar=1e-6)
    alone = jaxem.fit(model, x, params0, tol=1e-6, max_iter=300)
    named = model.with_batch(1, em.RESTARTS_AXIS)
    hyper = {"reg_covar": jnp.asarray(1e-6)}
    batched = jax.vmap(lambda p: em.run(named, jnp.asarray(x), None, p, jnp.asarray(1e-6),
                                        jnp.asarray(300), hyper),
                       axis_name=em.RESTARTS_AXIS)(
        jax.tree_util.tree_map(lambda a: a[None], params0))
    for other in (alone, jax.tree_util.tree_map(lambda a: a[0], batched)):
        assert int(other.n_iter) == int(res.best.n_iter)
        assert tree_allclose(res.best.params, other.params, rtol=1e-10, atol=1e-12)
        assert float(res.best.lower_bound) == pytest.approx(float(other.lower_bound),
                                                            rel=1e-12)


@pytest.mark.parametrize("cov_type", ["full", "diag"])
def test_vmapped_restart_equals_the_same_restart_alone(x64, rng, cov_type):
    # The product forms (forced: "auto" takes them only for large N): the restarts agree
    # (pmin over the vmap axis) on the path for the moments.
    x = make_blobs(rng, n_per=60, k=3, d=2, sep=2.5)
    model = gmm.GaussianMixtureModel(cov_type, moments="product")
    key = jax.random.PRNGKey(3)
    res = jaxem.fit_restarts(model, x, key, n_components=3, n_init=5, init_method="random",
                             tol=1e-6, max_iter=300)
    n_iters = np.asarray(res.restarts.n_iter)
    assert len(set(n_iters.tolist())) > 1  # restarts stop at different times
    for i, k in enumerate(jax.random.split(key, 5)):
        params0 = model.init(k, x, 3, method="random", reg_covar=1e-6)
        alone = jaxem.fit(model, x, params0, tol=1e-6, max_iter=300)
        assert int(alone.n_iter) == n_iters[i]
        one = jax.tree_util.tree_map(lambda a, i=i: a[i], res.restarts)
        assert tree_allclose(one.params, alone.params, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(one.lower_bounds, alone.lower_bounds, rtol=1e-10)
    best = int(res.best_index)
    assert best == int(np.nanargmax(np.asarray(res.restarts.lower_bound)))
    assert float(res.best.lower_bound) == float(np.max(res.restarts.lower_bound))


@dataclasses.dataclass(frozen=True)
class CountingModel(gmm.GaussianMixtureModel):
    """Counts how often the E-step is traced (= how often the driver compiles)."""

    def e_step(self, params, x, weights=None):
        TRACES.append(1)
        return super().e_step(params, x, weights)


TRACES: list = []


def test_changing_tol_reg_covar_or_data_does_not_recompile(rng):
    TRACES.clear()
    model = CountingModel("full")
    x = make_blobs(rng, n_per=50, k=2, d=2).astype(np.float32)
    params = gmm.init(jax.random.PRNGKey(0), x, 2, "full")
    jaxem.fit(model, x, params, tol=1e-3, reg_covar=1e-6)
    assert len(TRACES) == 1
    jaxem.fit(model, x + 1.0, params, tol=1e-5, reg_covar=1e-3)
    jaxem.fit(CountingModel("full"), x * 2, params, tol=0.5, reg_covar=0.1)
    assert len(TRACES) == 1
    jaxem.fit_restarts(model, x, jax.random.PRNGKey(0), n_components=2, n_init=3, tol=1e-3)
    n = len(TRACES)
    jaxem.fit_restarts(model, -x, jax.random.PRNGKey(1), n_components=2, n_init=3, tol=1e-2,
                       reg_covar=1e-2)
    assert len(TRACES) == n
    # max_iter is traced: any value within the default's history size shares its program ...
    for max_iter in (1, 7, 101, em.history_size(100)):
        r = jaxem.fit(model, x, params, max_iter=max_iter, tol=-1.0)
        assert int(r.n_iter) == max_iter and r.lower_bounds.shape == (max_iter,)
    assert len(TRACES) == n
    # ... and a larger one needs a longer history buffer: one more program.
    jaxem.fit(model, x, params, max_iter=em.history_size(100) + 1)
    assert len(TRACES) == n + 1


def test_a_large_fit_compiles_its_initialisation_apart_with_the_same_result(monkeypatch, rng,
                                                                          x64):
    """Large fits compile the initialisation (k-means) as a program of their own, with the
    older emitters, beside the EM loop's: the fit is the one-program fit's, and no further
    program is compiled for the next fit of the same shapes. In float64: the two halves'
    compiler options round differently (LLVM -O1 against -O2), which float32 carries into
    the precisions' fourth digit after 20 iterations."""
    monkeypatch.delenv(em.QUICK_COMPILE_ENV, raising=False)
    n, d, k = 12_000, 8, 8  # work 1.3e7 > SMALL_COMPILE_MAX_WORK: the default options
    assert em.separate_initialisation(n, gmm.mixture_entries(k, d), 2, 20)
    assert not em.separate_initialisation(256, gmm.mixture_entries(3, 2), 2, 20)  # small
    assert not jax.jit(lambda v: v + em.separate_initialisation(n, 10**4))(0)  # traced
    x = make_blobs(rng, n_per=n // 4, k=4, d=d)
    model = gmm.GaussianMixtureModel("full")

    def fit(seed):
        return jaxem.fit_restarts(model, x, jax.random.PRNGKey(seed), n_components=k, n_init=2,
                                  max_iter=20, tol=1e-4)

    init, loop = em._initial_programs, em._restarts_loop_programs

    def compiled():  # by options: off the CPU (no options) the variants are one program
        return [{v._name: v._cache_size() for v in p} for p in (init, loop)]

    counts = compiled()
    apart = fit(0)
    after = compiled()
    # the initialisation with the small options, the loop with the default ones
    assert after[0] == {**counts[0], init.small._name: counts[0][init.small._name] + 1}
    assert after[1] == {**counts[1], loop.default._name: counts[1][loop.default._name] + 1}
    fit(1)
    assert compiled() == after
    monkeypatch.setenv(em.QUICK_COMPILE_ENV, "0")  # one program, the default options
    assert not em.separate_initialisation(n, gmm.mixture_entries(k, d), 2, 20)
    together = fit(0)
    np.testing.assert_array_equal(apart.restarts.n_iter, together.restarts.n_iter)
    assert int(apart.best_index) == int(together.best_index)
    np.testing.assert_allclose(apart.restarts.lower_bound, together.restarts.lower_bound,
                               rtol=1e-10)
    assert tree_allclose(apart.best.params, together.best.params, rtol=1e-8, atol=1e-10)


@dataclasses.dataclass(frozen=True)
class FailsAtStep3(gmm.GaussianMixtureModel):
    """A GMM whose M-step returns NaN from the 3rd iteration on (simulated breakdown)."""

    def e_step(self, params, x, weights=None):
        p, count = params
        stats, ll = super().e_step(p, x, weights)
        return (stats, count), ll

    def m_step(self, stats, reg_covar=1e-6):
        stats, count = stats
        p = super().m_step(stats, reg_covar)
        bad = count >= 2
        p = jax.tree_util.tree_map(lambda a: jnp.where(bad, jnp.nan, a), p)
        return p, count + 1


def test_failure_keeps_last_finite_params(x64, blobs):
    model = gmm.GaussianMixtureModel("full")
    p0 = gmm.init(jax.random.PRNGKey(0), blobs, 3, "full", method="random")
    reference = jaxem.fit(model, blobs, p0, tol=-1.0, max_iter=2)
    result = jaxem.fit(FailsAtStep3("full"), blobs, (p0, jnp.asarray(0)), tol=-1.0, max_iter=10)
    assert bool(result.failed) and not bool(result.converged)
    assert int(result.n_iter) == 3  # the third E-step ran; its M-step failed
    params, _ = result.params
    assert tree_allclose(params, reference.params, rtol=1e-12)
    assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(params))


def test_collapsed_component_without_reg_covar_is_reported(x64, rng):
    # A component sitting on a single isolated point collapses when reg_covar = 0.
    x = np.concatenate([rng.normal(size=(50, 2)), [[40.0, 40.0]]])
    params = gmm.make_params([0.9, 0.1], np.array([[0.0, 0.0], [40.0, 40.0]]),
                             np.stack([np.eye(2), np.eye(2)]), "full")
    result = jaxem.fit(gmm.GaussianMixtureModel("full"), x, params, reg_covar=0.0)
    assert bool(result.failed)
    assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(result.params))
    with_reg = jaxem.fit(gmm.GaussianMixtureModel("full"), x, params, reg_covar=1e-3)
    assert not bool(with_reg.failed) and bool(with_reg.converged)


def test_chunked_fit_equals_plain_fit(x64, blobs):
    params = gmm.init(jax.random.PRNGKey(0), blobs, 3, "tied", method="random")
    plain = jaxem.fit(gmm.GaussianMixtureModel("tied"), blobs, params, tol=1e-8)
    chunked = jaxem.fit(gmm.GaussianMixtureModel("tied", chunk_size=64), blobs, params, tol=1e-8)
    assert int(plain.n_iter) == int(chunked.n_iter)
    assert tree_allclose(plain.params, chunked.params, rtol=1e-9, atol=1e-12)


def test_fit_composes_with_jit_and_vmap_over_datasets(rng):
    model = gmm.GaussianMixtureModel("diag")
    xs = np.stack([make_blobs(rng, n_per=40, k=2, d=2) for _ in range(3)]).astype(np.float32)
    params = gmm.init(jax.random.PRNGKey(0), xs[0], 2, "diag")

    @jax.jit
    def fit_all(xs):
        return jax.vmap(lambda x: jaxem.fit(model, x, params, tol=1e-4).lower_bound)(xs)

    batched = np.asarray(fit_all(jnp.asarray(xs)))
    single = [float(jaxem.fit(model, x, params, tol=1e-4).lower_bound) for x in xs]
    np.testing.assert_allclose(batched, single, rtol=1e-5)


def _count_primitive(jaxpr, name: str) -> int:
    """``name`` primitives in a jaxpr and every jaxpr nested in it."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _count_primitive(inner, name)
    return n


def _count_conds(jaxpr) -> int:
    """``cond`` primitives in a jaxpr and every jaxpr nested in it."""
    return _count_primitive(jaxpr, "cond")


def test_the_history_is_recorded_without_a_scatter_under_vmap(rng):
    # Each iteration's log-likelihood enters the history by an elementwise select: under a
    # vmap (restarts, fit_batch's datasets) an indexed update is a scatter, which XLA:CPU
    # ran as a loop over the members every iteration. The history is each member's own.
    xs = np.stack([make_blobs(rng, n_per=20, k=2, d=2, sep=s) for s in (1.0, 3.0, 6.0)])
    xs = xs.astype(np.float32)
    model = gmm.GaussianMixtureModel("full")
    params = jax.vmap(lambda x: model.init(jax.random.PRNGKey(0), x, 2, method="random"))(xs)

    def fit(p, x):
        return _loop.run(model, x, None, p, 1e-4, 12, {"reg_covar": 1e-6}, n_history=16)

    assert _count_primitive(jax.make_jaxpr(jax.vmap(fit))(params, xs).jaxpr, "scatter") == 0
    batched = jax.vmap(fit)(params, xs)
    for b in range(len(xs)):
        alone = fit(jax.tree_util.tree_map(lambda a, b=b: a[b], params), xs[b])
        n = int(alone.n_iter)
        assert int(batched.n_iter[b]) == n and 1 <= n <= 12
        np.testing.assert_allclose(batched.lower_bounds[b], alone.lower_bounds, rtol=1e-5)
        history = np.asarray(alone.lower_bounds)
        assert np.all(np.isfinite(history[:n])) and np.all(np.isnan(history[n:]))


@pytest.mark.parametrize("cov_type", ["full", "diag"])
def test_fast_path_guards_stay_conds_under_a_user_vmap(rng, cov_type):
    # The product forms are guarded by lax.conds. Under a vmap over datasets their
    # predicates would be batched, turning each cond into a select that runs the fast sweep
    # *and* its fallback every iteration. The members agree on one predicate instead: the
    # vmapped program keeps every cond of the single one, and each dataset still gets its
    # own fit.
    model = gmm.GaussianMixtureModel(cov_type, moments="product")
    xs = np.stack([make_blobs(rng, n_per=40, k=2, d=2) for _ in range(3)]).astype(np.float32)
    params = gmm.init(jax.random.PRNGKey(0), xs[0], 2, cov_type)

    def one(x):
        return jaxem.fit(model, x, params, tol=-1.0, max_iter=5).params.means

    single = _count_conds(jax.make_jaxpr(one)(xs[0]).jaxpr)
    batched = _count_conds(jax.make_jaxpr(jax.vmap(one))(jnp.asarray(xs)).jaxpr)
    assert single >= 1 and batched == single
    got = jax.jit(jax.vmap(one))(jnp.asarray(xs))
    for x, means in zip(xs, got, strict=True):
        np.testing.assert_allclose(means, one(x), rtol=1e-5, atol=1e-6)


def test_params_of_another_covariance_type_are_refused(rng):
    x = rng.normal(size=(30, 2))
    full = gmm.init(jax.random.PRNGKey(0), x, 2, "full")
    diag_model = gmm.GaussianMixtureModel("diag")
    with pytest.raises(ValueError, match="covariance_type='full' but the model is"):
        jaxem.fit(diag_model, x, full)
    with pytest.raises(ValueError, match="covariance_type='full' but the model is"):
        jaxem.fit_unrolled(diag_model, x, full, n_steps=2)
    with pytest.raises(ValueError, match="covariance_type='full' but the model is"):
        jax.jit(lambda p: diag_model.e_step(p, x))(full)  # static: also when traced
    with pytest.raises(ValueError, match="x has 3 features but params have 2"):
        jaxem.fit(gmm.GaussianMixtureModel("full"), np.ones((30, 3)), full)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=np.zeros(5)), ValueError, "2-D"),
        (dict(x=np.array([[0.0, np.nan]] * 5)), ValueError, "NaN"),
        (dict(tol=float("nan")), ValueError, "tol"),
        (dict(max_iter=-1), ValueError, "max_iter"),
        (dict(max_iter=2.5), TypeError, "max_iter"),
        (dict(weights=-np.ones(30)), ValueError, "non-negative"),
        (dict(weights=np.ones(3)), ValueError, "shape"),
        (dict(reg_covar=-1.0), ValueError, "reg_covar"),
        (dict(reg_covar=float("inf")), ValueError, "reg_covar"),
        (dict(learning_rate=0.1), TypeError, "unknown hyperparameter"),
    ],
)
def test_fit_rejects_bad_input(rng, kwargs, error, match):
    x = rng.normal(size=(30, 2)).astype(np.float32)
    params = gmm.init(jax.random.PRNGKey(0), x, 2, "full")
    args = dict(x=x, tol=1e-3, max_iter=10)
    args.update(kwargs)
    x = args.pop("x")
    with pytest.raises(error, match=match):
        jaxem.fit(gmm.GaussianMixtureModel("full"), x, params, **args)


def test_fit_restarts_rejects_bad_input(rng):
    x = rng.normal(size=(5, 2))
    model = gmm.GaussianMixtureModel("full")
    with pytest.raises(ValueError, match="n_components"):
        jaxem.fit_restarts(model, x, jax.random.PRNGKey(0), n_components=6)
    with pytest.raises(ValueError, match="n_init"):
        jaxem.fit_restarts(model, x, jax.random.PRNGKey(0), n_components=2, n_init=0)
    with pytest.raises(ValueError, match="init_params"):
        jaxem.fit_restarts(model, x, jax.random.PRNGKey(0), n_components=2, init_method="nope")
    with pytest.raises(TypeError, match="e_step"):
        jaxem.fit(object(), x, None)


# ---------------------------------------------------------------- a non-Gaussian model
@dataclasses.dataclass(frozen=True)
class PoissonMixture:
    """A mixture of independent Poissons: proves the drivers know nothing about Gaussians."""

    def log_joint(self, params, x):
        log_w, rates = params
        return (log_w[None] + x @ jnp.log(rates).T - jnp.sum(rates, axis=1)[None]
                - jnp.sum(jax.scipy.special.gammaln(x + 1), axis=1, keepdims=True))

    def e_step(self, params, x, weights=None):
        w = jnp.ones(x.shape[0], x.dtype) if weights is None else weights
        lj = self.log_joint(params, x)
        norm = jax.nn.logsumexp(lj, axis=1)
        wr = w[:, None] * jnp.exp(lj - norm[:, None])
        return (jnp.sum(wr, 0), wr.T @ x), jnp.sum(w * norm) / jnp.sum(w)

    def m_step(self, stats, floor=1e-6):
        nk, sx = stats
        return jnp.log(nk / jnp.sum(nk)), sx / nk[:, None] + floor

    def init(self, key, x, n_components, *, weights=None, method=None, floor=1e-6):
        idx = jax.random.choice(key, x.shape[0], (n_components,), replace=False)
        return jnp.full((n_components,), -jnp.log(n_components)), x[idx] + 0.5


def test_generic_driver_fits_a_poisson_mixture(x64, rng):
    x = np.concatenate([rng.poisson(2.0, size=(300, 2)), rng.poisson(15.0, size=(200, 2))])
    x = x.astype(float)
    res = jaxem.fit_restarts(PoissonMixture(), x, jax.random.PRNGKey(0), n_components=2,
                             n_init=4, tol=1e-10, max_iter=500)
    log_w, rates = res.best.params
    order = np.argsort(np.asarray(rates[:, 0]))
    np.testing.assert_allclose(np.asarray(rates)[order], [[2, 2], [15, 15]], rtol=0.1)
    np.testing.assert_allclose(np.exp(np.asarray(log_w))[order], [0.6, 0.4], atol=0.05)
    hist = np.asarray(res.best.lower_bounds)[: int(res.best.n_iter)]
    assert np.all(np.diff(hist) >= -1e-12 * np.abs(hist[1:]))



@dataclasses.dataclass(frozen=True)
class LargePoissonMixture(PoissonMixture):
    """The same model, reporting a parameter count as large as a big Gaussian fit's."""

    def n_entries(self, n_components, n_features):
        return 10**6


def test_drivers_size_programs_by_the_models_own_parameter_count(monkeypatch, rng):
    """The compile rules go by the model's ``n_entries`` (the Gaussian count lives in the
    Gaussian model): a model without one counts a weight and a mean per component, and one
    reporting a large count is compiled as a large fit is (the initialisation apart)."""
    monkeypatch.delenv(em.QUICK_COMPILE_ENV, raising=False)
    assert em.model_entries(PoissonMixture(), 3, 4) == 3 * 5
    assert em.model_entries(LargePoissonMixture(), 3, 4) == 10**6
    assert (em.model_entries(gmm.GaussianMixtureModel("diag"), 3, 4)
            == gmm.mixture_entries(3, 4) == 3 * 5 + 2 * 3 * 16)
    x = rng.poisson(3.0, size=(400, 2)).astype(np.float32)

    def initial_programs():
        return em._initial_programs.cache_size()

    before = initial_programs()
    small = jaxem.fit_restarts(PoissonMixture(), x, jax.random.PRNGKey(0), n_components=2,
                               n_init=2, max_iter=5)
    assert initial_programs() == before  # one small program: initialisation and loop
    large = jaxem.fit_restarts(LargePoissonMixture(), x, jax.random.PRNGKey(0), n_components=2,
                               n_init=2, max_iter=5)
    assert initial_programs() == before + 1  # the initialisation compiled apart
    np.testing.assert_array_equal(small.restarts.n_iter, large.restarts.n_iter)
    np.testing.assert_allclose(np.asarray(small.restarts.lower_bound),
                               np.asarray(large.restarts.lower_bound), rtol=1e-5)


# ---------------------------------------------------------------- data parallel over devices
SHARDED_SCRIPT = r'''
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
import jaxem
from jaxem import gmm

assert jax.local_device_count() == 4
rng = np.random.default_rng(0)
x = np.concatenate([rng.normal(size=(334, 3)) + 4 * i for i in range(3)])[:1001]  # 1001 % 4 != 0
w = rng.uniform(0.5, 2.0, size=len(x))
leaves = jax.tree_util.tree_leaves
for ct in ["full", "tied", "diag", "spherical"]:
    model = gmm.GaussianMixtureModel(ct, chunk_size=100, moments="product")
    params = gmm.init(jax.random.PRNGKey(0), x, 3, ct, method="random")
    one = jaxem.fit(model, x, params, weights=w, tol=1e-8, devices=jax.devices()[:1])
    four = jaxem.fit(model, x, params, weights=w, tol=1e-8)  # default: all 4 devices
    assert int(one.n_iter) == int(four.n_iter) > 2
    for a, b in zip(leaves(one.params), leaves(four.params)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(one.lower_bounds, four.lower_bounds, rtol=1e-12)
# diag: the driver's restarts × devices path plus the moments check agreed over both axes
model = gmm.GaussianMixtureModel("diag", moments="product")
params = gmm.init(jax.random.PRNGKey(0), x, 3, "diag", method="random")
r1 = jaxem.fit_restarts(model, x, jax.random.PRNGKey(1), n_components=3, n_init=3,
                        init_method="random_from_data", devices=jax.devices()[:1])
r4 = jaxem.fit_restarts(model, x, jax.random.PRNGKey(1), n_components=3, n_init=3,
                        init_method="random_from_data")
np.testing.assert_array_equal(r1.restarts.n_iter, r4.restarts.n_iter)
np.testing.assert_allclose(r1.restarts.lower_bound, r4.restarts.lower_bound, rtol=1e-10)
gm = jaxem.GaussianMixture(3, random_state=0).fit(x)
assert gm.converged_
calls = []
def record(restart, iteration, ll, change):
    calls.append((restart, iteration, ll))
sharded = jaxem.fit(model, x, params, progress=record)
jax.effects_barrier()
assert [c[1] for c in calls] == list(range(1, int(sharded.n_iter) + 1))  # once, not per device


class Forgetful(gmm.GaussianMixtureModel):
    """Takes axis_name but never reduces over it: each device would keep its own answer."""

    def e_step(self, params, x, weights=None, axis_name=None):
        return super().e_step(params, x, weights)


try:
    jaxem.fit(Forgetful("diag"), x, params)
except Exception as e:  # the replication check of shard_map
    assert "data" in str(e), e
else:
    raise AssertionError("a model that forgets to psum must fail loudly when sharded")
print("sharded ok")
'''


def test_sharded_fit_equals_single_device_fit():
    import subprocess
    import sys

    # CPU devices forced by XLA_FLAGS: on a GPU machine JAX would take its one GPU instead.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sharded ok" in out.stdout


def test_devices_argument_is_checked(blobs):
    params = gmm.init(jax.random.PRNGKey(0), blobs, 2, "full")
    with pytest.raises(TypeError, match="axis_name"):
        jaxem.fit(PoissonMixture(), blobs, params, devices=[jax.devices()[0]] * 2)


def test_data_closed_over_inside_jit_is_still_validated(blobs):
    """A concrete array captured by the caller's jit is checked eagerly, not traced."""
    x = jnp.asarray(blobs, jnp.float32)
    model = gmm.GaussianMixtureModel("diag")
    params = gmm.init(jax.random.PRNGKey(0), x, 3, "diag", method="kmeans")
    bound = jax.jit(lambda r: jaxem.fit(model, x, params, reg_covar=r).lower_bound)
    assert float(bound(1e-3)) == pytest.approx(
        float(jaxem.fit(model, x, params, reg_covar=1e-3).lower_bound), rel=1e-6)
    bad = x.at[3, 1].set(jnp.inf)
    with pytest.raises(ValueError, match="x contains 1 NaN or infinite"):
        jax.jit(lambda r: jaxem.fit(model, bad, params, reg_covar=r).lower_bound)(1e-3)


def test_progress_reports_every_iteration_of_every_restart(blobs):
    calls = []

    def record(restart, iteration, ll, change):
        calls.append((restart, iteration, ll, change))

    model = gmm.GaussianMixtureModel("full")
    params = gmm.init(jax.random.PRNGKey(0), blobs, 3, "full", method="random")
    one = jaxem.fit(model, blobs, params, tol=1e-4, progress=record)
    jax.effects_barrier()
    n = int(one.n_iter)
    assert [c[:2] for c in calls] == [(0, i) for i in range(1, n + 1)]
    np.testing.assert_allclose([c[2] for c in calls], one.lower_bounds[:n], rtol=1e-6)
    np.testing.assert_allclose([c[3] for c in calls[1:]], np.diff(one.lower_bounds[:n]),
                               rtol=1e-4, atol=1e-6)
    calls.clear()
    runs = jaxem.fit_restarts(model, blobs, jax.random.PRNGKey(1), n_components=3, n_init=3,
                              progress=record)
    jax.effects_barrier()
    for r in range(3):  # frozen restarts stay silent while the others go on
        mine = [c for c in calls if c[0] == r]
        assert [c[1] for c in mine] == list(range(1, int(runs.restarts.n_iter[r]) + 1))
        assert mine[-1][2] == pytest.approx(float(runs.restarts.lower_bound[r]), rel=1e-6)
