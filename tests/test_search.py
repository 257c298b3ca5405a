"""Components as data (dead slots), the model search in one program per covariance type,
rows padded so that N is not a compile key, and batches of small fits."""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_blobs
from helpers import log_joint_oracle, tree_allclose
from test_em import PoissonMixture, _count_conds

import jaxem
from jaxem import em, gmm, search
from jaxem._padding import MIN_ROWS, padded_size

COV_TYPES = ["full", "tied", "diag", "spherical"]


def _with_dead_slots(params, k_max):
    """``params`` with ``k_max - K`` dead slots appended (weight 0, arbitrary finite values)."""
    k, d = params.means.shape
    extra = k_max - k
    cov_type = params.covariance_type
    if cov_type == "tied":
        cov = params.covariances
    else:
        fill = {"full": np.eye(d) * 3.0, "diag": np.full(d, 2.0), "spherical": 0.5}[cov_type]
        cov = np.concatenate([params.covariances, np.broadcast_to(fill, (extra,) + np.shape(
            fill))])
    return gmm.make_params(np.concatenate([params.weights, np.zeros(extra)]),
                           np.concatenate([params.means, np.full((extra, d), 7.0)]), cov,
                           cov_type)


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("k", [1, 3])
def test_k_live_components_in_a_larger_program_equal_the_k_program(x64, rng, cov_type, k):
    x = make_blobs(rng, n_per=60, k=3, d=3)
    p0 = gmm.init(jax.random.PRNGKey(1), x, k, cov_type)
    model = gmm.GaussianMixtureModel(cov_type)
    small = jaxem.fit(model, x, p0, tol=1e-12, max_iter=40)
    big = jaxem.fit(model, x, _with_dead_slots(p0, 5), tol=1e-12, max_iter=40)
    assert int(big.n_iter) == int(small.n_iter)
    np.testing.assert_allclose(big.lower_bounds, small.lower_bounds, rtol=1e-10)
    live = model.first_components(big.params, k)
    for name in ("weights", "means", "covariances", "precisions_cholesky"):
        np.testing.assert_allclose(getattr(live, name), getattr(small.params, name),
                                   rtol=1e-10, atol=1e-12)
    # Dead slots stay dead: weight exactly 0, no responsibility, not counted.
    assert np.all(np.asarray(big.params.weights)[k:] == 0)
    lj = gmm.log_joint(big.params, x)
    assert np.all(np.exp(np.asarray(jaxem.elbo.posterior(lj)))[:, k:] == 0)
    np.testing.assert_allclose(lj[:, :k], log_joint_oracle(small.params, x), rtol=1e-9)
    assert gmm.n_parameters(big.params) == gmm.n_parameters(small.params)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_the_covariance_type_as_data_fits_each_type_as_its_own_model(x64, rng, cov_type):
    # gmm.AnyCovarianceModel: full layout, the type an index among the hyperparameters, so
    # one program serves the four types of a small search. Initialisation, every
    # iteration's log-likelihood, the final parameters (in the type's own layout) and the
    # parameter count equal the typed model's, dead slots and weights included.
    x = make_blobs(rng, n_per=40, k=3, d=3)
    w = rng.uniform(0.2, 2.0, len(x))
    key = jax.random.PRNGKey(2)
    typed, shared = gmm.GaussianMixtureModel(cov_type), gmm.AnyCovarianceModel()
    structure = gmm.COVARIANCE_TYPES.index(cov_type)
    p_typed = typed.init(key, x, 4, weights=w, method="k-means++", n_live=3)
    p_any = shared.init(key, x, 4, weights=w, method="k-means++", n_live=3,
                        structure=structure)
    assert tree_allclose(gmm.typed_params(p_any, cov_type), p_typed, rtol=1e-10, atol=1e-12)
    a = jaxem.fit(typed, x, p_typed, weights=w, tol=1e-10, max_iter=40)
    b = jaxem.fit(shared, x, p_any, weights=w, tol=1e-10, max_iter=40, structure=structure)
    assert int(a.n_iter) == int(b.n_iter)
    np.testing.assert_allclose(b.lower_bounds, a.lower_bounds, rtol=1e-10)
    assert tree_allclose(gmm.typed_params(b.params, cov_type), a.params, rtol=1e-9, atol=1e-11)
    assert int(shared.n_parameters(b.params, structure=structure)) == gmm.n_parameters(a.params)
    assert np.all(np.asarray(b.params.weights)[3:] == 0)  # the dead slot stays dead
    with pytest.raises(ValueError, match="structure must be an index"):
        jaxem.fit(shared, x, p_any, structure=4)
    with pytest.raises(ValueError, match="covariance_type"):
        gmm.typed_params(p_any, "weird")
    with pytest.raises(ValueError, match="full-layout"):
        gmm.typed_params(p_typed, cov_type) if cov_type != "full" else gmm.typed_params(
            gmm.init(key, x, 2, "diag"), "diag")


@pytest.mark.parametrize("method", ["kmeans", "k-means++", "random"])
def test_init_of_n_live_slots_equals_the_n_live_component_init(x64, rng, method):
    x = make_blobs(rng, n_per=40, k=4, d=2)
    for k in (1, 2, 4):
        small = gmm.init(jax.random.PRNGKey(3), x, k, "full", method=method)
        big = gmm.init(jax.random.PRNGKey(3), x, 6, "full", method=method, n_live=k)
        np.testing.assert_allclose(big.means[:k], small.means, rtol=1e-10)
        np.testing.assert_allclose(big.covariances[:k], small.covariances, rtol=1e-10)
        np.testing.assert_allclose(big.weights[:k], small.weights, rtol=1e-10)
        assert np.all(np.asarray(big.weights)[k:] == 0)


def _restarts_programs():
    return em._restarts_programs.cache_size()


def _programs():
    return search._search_programs.cache_size()


def test_a_search_is_one_program_per_type_and_each_cell_equals_its_own_fit(x64, rng):
    x = make_blobs(rng, n_per=50, k=3, d=2)
    before = _programs()
    result = jaxem.select(x, range(1, 7), COV_TYPES, n_init=2, seed=4, tol=1e-3,
                          init_method="kmeans")  # the estimator's tol
    # Small: the four types share one program, the type as data (gmm.AnyCovarianceModel).
    assert _programs() - before == 1
    # Another N in the same row bucket, another seed, tol and max_iter: no new program.
    again = jaxem.select(x[:140], range(1, 7), COV_TYPES, n_init=2, seed=5, tol=1e-4,
                         max_iter=60, init_method="kmeans")
    assert _programs() - before == 1
    assert again.bic.shape == (6, 4)
    for k in (1, 3, 6):
        for j, cov_type in enumerate(COV_TYPES):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm = jaxem.GaussianMixture(k, covariance_type=cov_type, n_init=2,
                                           random_state=4).fit(x)
            i = result.ks.index(k)
            np.testing.assert_allclose(result.bic[i, j], gm.bic(x), rtol=1e-9)
            np.testing.assert_allclose(result.aic[i, j], gm.aic(x), rtol=1e-9)
            assert result.n_iter[i, j] == gm.n_iter_
            assert result.n_parameters[i, j] == gm._n_parameters()
    # ICL = BIC − 2 Σ log r at the hard assignments (Biernacki et al. 2000), from scipy.
    for (k, cov_type), params in result.params.items():
        lj = log_joint_oracle(params, x)
        log_r = lj - np.logaddexp.reduce(lj, axis=1, keepdims=True)
        i, j = result.ks.index(k), result.covariance_types.index(cov_type)
        np.testing.assert_allclose(result.icl[i, j],
                                   result.bic[i, j] - 2 * np.sum(np.max(log_r, axis=1)),
                                   rtol=1e-9)
    best = np.unravel_index(np.argmin(result.bic), result.bic.shape)
    assert result.best == (result.ks[best[0]], result.covariance_types[best[1]]) == (3, "full")


def test_larger_searches_compile_a_program_per_type_with_the_same_results(x64, rng,
                                                                         monkeypatch):
    # Beyond search.SHARED_SEARCH_MAX_WORK each type runs its own program (its own,
    # cheaper E-step); the table is the shared program's.
    x = make_blobs(rng, n_per=30, k=3, d=2)
    settings = dict(n_init=2, seed=3, tol=1e-6, init_method="kmeans")
    before = _programs()
    shared = jaxem.select(x, [1, 2, 3], COV_TYPES, **settings)
    assert _programs() - before == 1
    monkeypatch.setattr(search, "SHARED_SEARCH_MAX_WORK", 0)
    typed = jaxem.select(x, [1, 2, 3], COV_TYPES, **settings)
    assert _programs() - before == 1 + len(COV_TYPES)
    for name in ("bic", "aic", "icl", "log_likelihood"):
        np.testing.assert_allclose(typed.table(name) if name != "log_likelihood" else
                                   typed.log_likelihood, getattr(shared, name), rtol=1e-9)
    np.testing.assert_array_equal(typed.n_iter, shared.n_iter)
    np.testing.assert_array_equal(typed.n_parameters, shared.n_parameters)
    for cell, params in typed.params.items():
        assert params.covariance_type == shared.params[cell].covariance_type
        assert tree_allclose(params, shared.params[cell], rtol=1e-8, atol=1e-10)


def test_search_validates_before_compiling(rng):
    x = rng.normal(size=(20, 2))
    with pytest.raises(ValueError, match="larger than the number of samples"):
        jaxem.select(x, [1, 30])
    with pytest.raises(ValueError, match="criterion"):
        jaxem.select(x, [1, 2], criterion="bicc")
    with pytest.raises(ValueError, match="covariance_type"):
        jaxem.select(x, [1, 2], ["ful"])
    with pytest.raises(TypeError, match="ks"):
        jaxem.select(x, [1.5])
    if not jax.config.jax_enable_x64:  # float64 data fitted in float32: checked as fit does
        with pytest.raises(ValueError, match="x has values up to 1e\\+39"):
            jaxem.select(np.vstack([x, [[1e39, 0.0]]]), [1, 2])
        with pytest.warns(jaxem.PrecisionWarning, match="x is float64"):
            jaxem.select(x * 1e-3 + 1e6, [1], "spherical", max_iter=1)


def test_gaussian_mixture_ic_chooses_k_and_type_and_acts_as_the_chosen_mixture(rng):
    x = make_blobs(rng, n_per=80, k=3, d=2, sep=8.0)
    gm = jaxem.GaussianMixtureIC(range(1, 6), covariance_type=["full", "spherical"],
                                 n_init=2, random_state=0).fit(x)
    assert gm.n_components_ == 3 and gm.means_.shape == (3, 2)
    assert gm.criteria_["bic"].shape == (5, 2)
    i, j = np.unravel_index(np.argmin(gm.criteria_["bic"]), (5, 2))
    assert (i + 1, gm.criteria_["covariance_type"][j]) == (3, gm.covariance_type_)
    np.testing.assert_allclose(gm.bic(x), gm.criteria_["bic"][i, j], rtol=1e-4)
    assert len(np.unique(gm.predict(x))) == 3
    from sklearn.base import clone

    assert clone(gm).get_params()["n_components"] == range(1, 6)
    icl = jaxem.GaussianMixtureIC([2, 3], criterion="icl", covariance_type="full",
                                  random_state=0).fit(x)
    assert icl.n_components_ == 3 and np.all(icl.criteria_["icl"] >= icl.criteria_["bic"])


@pytest.mark.parametrize("init_params", ["kmeans", "random", "random_from_data"])
def test_refits_on_nearby_sizes_compile_once_and_equal_the_unpadded_fit(x64, rng,
                                                                        init_params):
    x = make_blobs(rng, n_per=60, k=3, d=2)
    assert padded_size(100) == padded_size(150) == MIN_ROWS
    programs = _restarts_programs()
    fits = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in (100, 120, 150):
            fits[n] = jaxem.GaussianMixture(3, init_params=init_params, n_init=2,
                                            random_state=1, tol=1e-6).fit(x[:n])
    assert _restarts_programs() - programs <= 1
    # Small fits run K components in 8 slots: K = 1..8 share that program too, and
    # predict pads the same way.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in (1, 2, 5, 8):
            other = jaxem.GaussianMixture(k, init_params=init_params, n_init=2,
                                          random_state=1).fit(x[:120])
            assert other.means_.shape == (k, 2) and other.predict(x).max() < k
    assert _restarts_programs() - programs <= 1
    model = gmm.GaussianMixtureModel("full")
    for n, gm in fits.items():
        exact = em.fit_restarts(model, x[:n], jax.random.PRNGKey(1), n_components=3, n_init=2,
                                init_method=init_params, tol=1e-6)
        np.testing.assert_allclose(gm.means_, exact.best.params.means, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(gm.lower_bound_, exact.best.lower_bound, rtol=1e-10)
        np.testing.assert_array_equal(gm.predict(x[:n]), np.argmax(
            gmm.log_joint(gm.params_, x[:n]), axis=1))


def test_a_batch_of_ragged_datasets_is_one_program_and_equals_separate_fits(x64, rng):
    sizes = [30, 45, 60]
    data = [make_blobs(rng, n_per=n // 3, k=3, d=2) for n in sizes]
    n_max = max(sizes)
    x = np.stack([np.concatenate([d, np.zeros((n_max - len(d), 2))]) for d in data])
    w = np.stack([np.arange(n_max) < len(d) for d in data]).astype(float)
    key = jax.random.PRNGKey(0)
    model = gmm.GaussianMixtureModel("full")
    batch = jaxem.fit_batch(model, x, key, n_components=3, n_init=2, weights=w, tol=1e-8)
    assert batch.best.params.means.shape == (3, 3, 2)
    for b, (d, k) in enumerate(zip(data, jax.random.split(key, 3), strict=True)):
        one = em.fit_restarts(model, d, k, n_components=3, n_init=2, tol=1e-8)
        _assert_same_restarts(batch, b, one, rtol=1e-10, means_tol=dict(rtol=1e-8, atol=1e-10))
    with pytest.raises(ValueError, match="dataset 1 has 2 sample"):
        jaxem.fit_batch(model, x, key, n_components=3, weights=w * (np.arange(n_max) < 2) *
                        np.array([1, 1, 1])[:, None] + w * np.array([1, 0, 1])[:, None])
    with pytest.raises(ValueError, match="3-D"):
        jaxem.fit_batch(model, x[0], key, n_components=3)


@pytest.mark.parametrize("n_init", [1, 2])
@pytest.mark.parametrize("cov_type", ["full", "diag"])
def test_float32_datasets_far_apart_fit_as_well_in_a_batch_as_alone(rng, cov_type, n_init):
    # Each dataset is centred on its own mixture, not on a point shared across the batch:
    # datasets at ±3e4 with unit spread fitted beside each other in float32 keep the
    # accuracy of their separate fits (a centre shared by the batch, near 0, cost them
    # 2e-4 of the log-likelihood and a different iteration count).
    offsets = (3e4, -3e4, 0.0)
    x = np.stack([make_blobs(rng, n_per=60, k=3, d=2, sep=3.0) + off
                  for off in offsets]).astype(np.float32)
    key = jax.random.PRNGKey(0)
    model = gmm.GaussianMixtureModel(cov_type)
    batch = jaxem.fit_batch(model, x, key, n_components=3, n_init=n_init)
    for b, k in enumerate(jax.random.split(key, len(offsets))):
        one = em.fit_restarts(model, x[b], k, n_components=3, n_init=n_init)
        _assert_same_restarts(batch, b, one, rtol=1e-5,
                              means_tol=dict(atol=1e-3 * (1 + abs(offsets[b])) ** 0.5))


def test_a_batch_of_a_model_initialised_in_one_stage_equals_separate_fits(x64, rng):
    # A model without initial_assignments (optional in the contract) starts its loop from
    # init's parameters, made in the first program: each dataset's fit is its own. And in
    # float64: its programs (not stored: the model is not keyed) are traced in this thread,
    # under this test's `enable_x64` block, not in the shards' threads (float32 before).
    x = np.stack([rng.poisson(lam, size=(80, 2)).astype(float)
                  for lam in ((2.0, 9.0), (5.0, 1.0), (12.0, 3.0))])
    assert not hasattr(PoissonMixture(), "initial_assignments")
    key = jax.random.PRNGKey(2)
    batch = jaxem.fit_batch(PoissonMixture(), x, key, n_components=2, n_init=2, tol=1e-8)
    assert batch.restarts.lower_bound.dtype == np.float64
    for b, k in enumerate(jax.random.split(key, len(x))):
        one = em.fit_restarts(PoissonMixture(), x[b], k, n_components=2, n_init=2, tol=1e-8)
        np.testing.assert_array_equal(batch.restarts.n_iter[b], one.restarts.n_iter)
        np.testing.assert_allclose(batch.restarts.lower_bound[b], one.restarts.lower_bound,
                                   rtol=1e-10)
        assert tree_allclose(jax.tree_util.tree_map(lambda a, b=b: a[b], batch.restarts.params),
                             one.restarts.params, rtol=1e-8, atol=1e-10)


def _assert_same_restarts(batch, b, one, rtol, means_tol):
    """Dataset ``b`` of a ``fit_batch`` result ran the restarts of its separate
    ``fit_restarts`` (``one``): each restart's iterations, bound and means, and the best
    bound. (Which of two restarts that reach the same optimum is "best" is float rounding:
    the best's own parameters are compared through the restarts.)"""
    np.testing.assert_array_equal(batch.restarts.n_iter[b], one.restarts.n_iter)
    np.testing.assert_allclose(batch.restarts.lower_bound[b], one.restarts.lower_bound,
                               rtol=rtol)
    np.testing.assert_allclose(batch.restarts.params.means[b], one.restarts.params.means,
                               **means_tol)
    np.testing.assert_allclose(batch.best.lower_bound[b], one.best.lower_bound, rtol=rtol)
    best = int(batch.best_index[b])
    np.testing.assert_allclose(batch.best.params.means[b], one.restarts.params.means[best],
                               **means_tol)


def test_a_batch_in_shards_fits_each_dataset_as_one_shard_does(x64, rng, monkeypatch):
    # On the CPU fit_batch splits the datasets into shards run by threads of their own
    # (em.batch_shards: one per core), the last shard padded with copies of the last
    # dataset: the same fits whatever the number of shards, nothing of the padding returned.
    xs = np.stack([make_blobs(rng, n_per=12, k=3, d=2) for _ in range(7)])
    model = gmm.GaussianMixtureModel("full")
    results = {}
    for shards in (1, 3, 7):
        monkeypatch.setattr(em, "batch_shards", lambda n, s=shards: min(s, n))
        results[shards] = jaxem.fit_batch(model, xs, jax.random.PRNGKey(4), n_components=3,
                                          n_init=2, tol=1e-8)
    one = results[1]
    for shards in (3, 7):
        many = results[shards]
        assert jax.tree_util.tree_structure(many) == jax.tree_util.tree_structure(one)
        for got, want in zip(jax.tree_util.tree_leaves(many), jax.tree_util.tree_leaves(one),
                             strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(many.restarts.n_iter, one.restarts.n_iter)
        np.testing.assert_allclose(many.restarts.lower_bound, one.restarts.lower_bound,
                                   rtol=1e-10)
        assert tree_allclose(many.restarts.params, one.restarts.params, rtol=1e-8, atol=1e-10)
    monkeypatch.undo()
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count())
    assert em.batch_shards(1) == 1 and em.batch_shards(10**6) == cores


@pytest.mark.parametrize("cov_type", ["full", "diag"])
def test_a_batch_run_one_after_another_equals_it_vmapped(x64, rng, cov_type):
    # fit_batch runs its fits one after another on the CPU and as one vmap on an
    # accelerator (em.batch_sequentially): the same fits either way, ragged sizes and
    # restarts included.
    sizes = (40, 25, 33)
    n_max = max(sizes)
    x = np.stack([np.concatenate([make_blobs(rng, n_per=-(-n // 3), k=3, d=2)[:n],
                                  np.zeros((n_max - n, 2))]) for n in sizes])
    w = np.stack([np.arange(n_max) < n for n in sizes]).astype(float)
    model = gmm.GaussianMixtureModel(cov_type).with_batch(1, None)
    hyper = {"reg_covar": jnp.float64(1e-6)}

    def program(sequential):
        return jax.jit(lambda x, w, key: em._batch_program(
            model, x, w, key, 1e-8, 200, 2, 3, "kmeans", hyper, 256, sequential))(
            x, w, jax.random.PRNGKey(3))

    vmapped, one_by_one = program(False), program(True)
    np.testing.assert_array_equal(one_by_one.best.n_iter, vmapped.best.n_iter)
    np.testing.assert_array_equal(one_by_one.best_index, vmapped.best_index)
    np.testing.assert_allclose(one_by_one.best.lower_bound, vmapped.best.lower_bound, rtol=1e-12)
    assert tree_allclose(one_by_one.best.params, vmapped.best.params, rtol=1e-9, atol=1e-12)
    assert em.batch_sequentially() == (jax.default_backend() == "cpu")


@pytest.mark.parametrize("cov_type", ["full", "diag"])
def test_a_batch_keeps_every_fast_path_guard_a_cond(rng, cov_type):
    # A batched predicate would turn each guard into a select running both sweeps; the
    # vmapped batch program (an accelerator's) keeps the conds of the single-dataset
    # program (gmm._all_batch_members).
    xs = np.stack([make_blobs(rng, n_per=20, k=2, d=2) for _ in range(4)]).astype(np.float32)
    model = gmm.GaussianMixtureModel(cov_type, moments="product").with_batch(1, None)
    hyper = {"reg_covar": jnp.float32(1e-6)}

    def program(x, key):
        return em._batch_program(model, x, jnp.ones(x.shape[:2]), key, 1e-3, 10, 1, 2,
                                 "kmeans", hyper, 16)

    key = jax.random.PRNGKey(0)
    single = _count_conds(jax.make_jaxpr(program)(xs[:1], key).jaxpr)
    batched = _count_conds(jax.make_jaxpr(program)(xs, key).jaxpr)
    assert single >= 1 and batched == single


def test_several_init_methods_run_in_one_search_and_keep_the_best(x64, rng):
    x = make_blobs(rng, n_per=40, k=4, d=2, sep=3.0)
    one = {m: jaxem.select(x, [2, 4], ["full"], n_init=2, seed=3, init_method=m)
           for m in ("kmeans", "random_from_data")}
    both = jaxem.select(x, [2, 4], ["full"], n_init=2, seed=3,
                        init_method=("kmeans", "random_from_data"))
    # The first method's restarts are exactly kmeans's: the mix is never worse than them.
    assert np.all(both.bic <= one["kmeans"].bic + 1e-9)
    assert both.n_iter.shape == (2, 1)


def test_quick_compile_is_on_for_small_top_level_programs_unless_turned_off(monkeypatch):
    small, big = gmm.mixture_entries(3, 2), gmm.mixture_entries(64, 64)
    monkeypatch.delenv(em.QUICK_COMPILE_ENV, raising=False)
    assert em.small_program(256, small) and em.quick_compile(256, small)
    assert not em.quick_compile(10**5, big)
    # a small program whose EM loop runs long (many restarts × iterations) is optimised:
    # unoptimised code would run the loop 3-4× slower on every call
    assert em.small_program(256, small, 320) and em.small_program(256, small, 320, max_iter=10)
    assert not em.quick_compile(256, small, 320, max_iter=100)
    # ... though still with the older emitters, which compile faster and run as fast there
    variants = em.jit_variants(lambda x: x, ())
    assert em.compile_variant(256, small, 320, max_iter=100) == "small"
    assert variants.pick(256, small, 320, max_iter=100) is variants.small
    assert variants.pick(256, small) is variants.quick
    assert variants.pick(10**5, big) is variants.default
    assert em.compile_variant(256, small, 600) == "small"  # up to SMALL_COMPILE_MAX_WORK
    assert em.compile_variant(256, small, 2000) == "default"
    assert not jax.jit(lambda v: v + em.quick_compile(256, small))(0)  # inside a trace
    assert jax.jit(lambda v: v + (em.compile_variant(256, small, 320, 100) == "default"))(0)
    for off in ("0", "false", "no"):
        monkeypatch.setenv(em.QUICK_COMPILE_ENV, off)
        assert not em.quick_compile(256, small)
        assert em.compile_variant(256, small, 320, max_iter=100) == "default"


def test_progress_reports_each_type_as_its_program_finishes(rng):
    x = make_blobs(rng, n_per=40, k=2, d=2)
    seen = []
    result = jaxem.select(x, (1, 2, 3), ("diag", "full"), progress=seen.append)
    assert [(p.covariance_type, p.index, p.n_types) for p in seen] == [("diag", 0, 2),
                                                                      ("full", 1, 2)]
    for p in seen:
        j = result.covariance_types.index(p.covariance_type)
        assert p.ks == result.ks and p.seconds > 0
        for name in ("bic", "aic", "icl", "n_iter", "converged", "failed"):
            np.testing.assert_array_equal(getattr(p, name), getattr(result, name)[:, j])
    with pytest.raises(TypeError, match="progress must be callable"):
        jaxem.select(x, (1, 2), "diag", progress="yes")


def test_the_functional_api_and_the_search_command_do_not_import_scikit_learn(tmp_path):
    """scikit-learn (0.7 s to import) is loaded only for the estimators."""
    import subprocess
    import sys

    np.savetxt(tmp_path / "x.csv", make_blobs(np.random.default_rng(0), n_per=30, k=2, d=2),
               delimiter=",")
    code = (
        "import sys\n"
        "import jaxem\n"
        "from jaxem import cli\n"
        f"assert cli.main(['select', {str(tmp_path / 'x.csv')!r}, '--k', '1:2',"
        " '--covariance-type', 'diag']) == 0\n"
        "assert 'sklearn' not in sys.modules, 'the search imported scikit-learn'\n"
        "assert issubclass(jaxem.GaussianMixture, __import__('sklearn').base.BaseEstimator)\n"
        "assert jaxem.GaussianMixtureIC.__module__ == 'jaxem.gaussian_mixture_ic'\n"
        "assert 'GaussianMixture' in dir(jaxem)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, env={**__import__("os").environ,
                                           "JAXEM_NO_COMPILATION_CACHE": "1"})
    assert out.returncode == 0, out.stderr
    assert "Chosen by BIC" in out.stdout


def test_gaussian_mixture_ic_verbose_reports_each_type(rng, capsys):
    x = make_blobs(rng, n_per=40, k=2, d=2)
    ic = jaxem.GaussianMixtureIC((1, 2), covariance_type=("full", "spherical"), verbose=1)
    ic.fit(x)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[1/2] full: K=[1, 2] in ")
    assert lines[1].startswith("[2/2] spherical: K=[1, 2] in ")
    j = ic.search_.covariance_types.index("full")
    assert f"lowest BIC {ic.search_.bic[:, j].min():.1f}" in lines[0]
    assert any(ln.startswith(f"chosen: K={ic.n_components_}") for ln in lines)


def test_kmeans_plusplus_runs_once_per_trial_count_and_equals_the_per_k_seeding(rng):
    """ks with equal candidate counts share one k-means++ run (a prefix of its centres):
    every (K, restart)'s labels equal the K-cluster seeding with the same key."""
    from jaxem.kmeans import seeding_trials

    ks = (1, 2, 3, 6, 8, 11)
    group_live, group_of = search._trial_groups(ks, 11)
    for k, g in zip(ks, group_of, strict=True):
        assert seeding_trials(int(group_live[g])) == seeding_trials(k) and group_live[g] >= k
    assert len(group_live) == len({seeding_trials(k) for k in range(1, 12)}) == 3
    x = jnp.asarray(make_blobs(rng, n_per=100, k=4, d=3), jnp.float32)
    w = jnp.asarray(rng.uniform(0.5, 2.0, size=x.shape[0]), jnp.float32)
    key = jax.random.PRNGKey(7)
    shared = search._seeding_programs.default(x, w, key, jnp.asarray(ks, jnp.int32),
                                              group_live, group_of, 11, 3, ("k-means++",))[0]
    keys = search._method_keys(key, 0, 3)
    for i, k in enumerate(ks):
        for r in range(3):
            alone = gmm.initial_labels(keys[r], x, w, k, "k-means++")
            np.testing.assert_array_equal(shared[i * 3 + r], alone)


@pytest.mark.parametrize("cov_type", ["full", "diag"])
def test_criteria_summed_over_row_blocks_equal_the_whole_data_oracle(x64, cov_type):
    """More rows than one evaluation block (search.EVALUATION_ROWS): the final
    log-likelihood and the ICL term are summed block by block (the last block overlapping
    its predecessor, padded rows and zero-weight rows adding nothing), and equal scipy's
    over the whole data with the cell's parameters."""
    rng = np.random.default_rng(7)
    x = make_blobs(rng, n_per=900, k=3, d=2)  # 2,700 rows: three blocks and a padded tail
    assert x.shape[0] > 2 * search.EVALUATION_ROWS
    w = rng.uniform(0.5, 2.0, len(x))
    w[rng.choice(len(x), 200, replace=False)] = 0.0
    result = jaxem.select(x, [1, 3], cov_type, n_init=1, weights=w, tol=1e-3)
    for i, k in enumerate(result.ks):
        lj = log_joint_oracle(result.params[k, cov_type], x)
        log_norm = np.logaddexp.reduce(lj, axis=1)
        log_lik = np.sum(w * log_norm)
        hard = np.sum(w * (np.max(lj, axis=1) - log_norm))
        assert result.log_likelihood[i, 0] == pytest.approx(log_lik / w.sum(), rel=1e-9)
        n_params = result.n_parameters[i, 0]
        assert result.bic[i, 0] == pytest.approx(-2 * log_lik + n_params * np.log(w.sum()),
                                                 rel=1e-9)
        assert result.icl[i, 0] == pytest.approx(result.bic[i, 0] - 2 * hard, rel=1e-9)


def test_each_cell_keeps_the_restart_with_the_best_final_log_likelihood(x64):
    """The criteria are made of the log-likelihood at a restart's final parameters, so the
    cell keeps the restart whose final parameters score best (not the one with the best
    last bound, one M-step older): the cell's value is the maximum over its restarts. The
    data and the two-iteration cap are chosen so that the two rules disagree in some
    cells (restarts still climbing at different speeds)."""
    x = make_blobs(np.random.default_rng(2), n_per=30, k=3, d=2, sep=2.0)
    settings = dict(n_init=6, tol=1e-3, max_iter=2)
    result = jaxem.select(x, [2, 4], ["full", "diag"], seed=1, init_method="kmeans",
                          **settings)  # the estimator's restarts
    disagree = 0
    for i, k in enumerate(result.ks):
        for j, cov_type in enumerate(result.covariance_types):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm = jaxem.GaussianMixture(k, covariance_type=cov_type, random_state=1,
                                           **settings).fit(x)
            runs = gm.fit_result_.restarts
            model = gmm.GaussianMixtureModel(cov_type)
            finals = [float(np.mean(jax.nn.logsumexp(model.log_joint(
                model.first_components(jax.tree_util.tree_map(lambda a, r=r: a[r],
                                                              runs.params), k), x), axis=1)))
                      for r in range(6)]
            assert result.log_likelihood[i, j] == pytest.approx(max(finals), rel=1e-9)
            disagree += int(np.argmax(finals) != np.argmax(np.asarray(runs.lower_bound)))
    assert disagree >= 1


def test_screening_runs_on_the_best_short_runs_exactly(x64):
    """screen=(s, keep): every restart runs s iterations, the keep with the highest bound
    per cell go on to max_iter exactly as if never stopped; the cell is the best of those
    by final log-likelihood. Checked against each restart's own fit (the estimator's
    restarts, same keys): after s iterations, and to the end."""
    # Data on which screening drops some cell's best restart (with seed 2: checked below).
    x = make_blobs(np.random.default_rng(6), n_per=30, k=3, d=2, sep=2.5)
    common = dict(n_init=6, seed=2, tol=1e-8, init_method="kmeans")
    ks, types = [2, 4], ["full", "diag"]
    everything = jaxem.select(x, ks, types, max_iter=40, screen=None, **common)
    keep_all = jaxem.select(x, ks, types, max_iter=40, screen=(3, 6), **common)
    np.testing.assert_array_equal(keep_all.bic, everything.bic)  # nothing dropped: one loop
    screened = jaxem.select(x, ks, types, max_iter=40, screen=(3, 2), **common)
    differs = 0
    for i, k in enumerate(ks):
        for j, cov_type in enumerate(types):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fits = [jaxem.GaussianMixture(k, covariance_type=cov_type, n_init=6,
                                              random_state=2, tol=1e-8, max_iter=m).fit(x)
                        for m in (3, 40)]
            model = gmm.GaussianMixtureModel(cov_type)
            short = np.asarray(fits[0].fit_result_.restarts.lower_bound)
            runs = fits[1].fit_result_.restarts
            finals = np.array([float(np.mean(jax.nn.logsumexp(model.log_joint(
                model.first_components(jax.tree_util.tree_map(lambda a, r=r: a[r],
                                                              runs.params), k), x), axis=1)))
                for r in range(6)])
            kept = np.argsort(-short)[:2]
            assert screened.log_likelihood[i, j] == pytest.approx(finals[kept].max(), rel=1e-10)
            assert everything.log_likelihood[i, j] == pytest.approx(finals.max(), rel=1e-10)
            differs += int(finals[kept].max() < finals.max() - 1e-9)
    assert differs >= 1  # the data make screening drop a cell's best restart somewhere
    # The estimator and the command pass it on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a cell stopped by max_iter
        gm = jaxem.GaussianMixtureIC(ks, covariance_type=types, n_init=6, random_state=2,
                                     tol=1e-8, max_iter=40, init_params="kmeans",
                                     screen=(3, 2)).fit(x)
    np.testing.assert_array_equal(gm.criteria_["bic"], screened.bic)
    assert gm.get_params()["screen"] == (3, 2)
    with pytest.raises(TypeError, match="screen"):
        jaxem.select(x, ks, types, screen=3)
    with pytest.raises(ValueError, match="kept runs"):
        jaxem.select(x, ks, types, screen=(3, 0))


def test_search_defaults_depend_on_the_number_of_rows():
    # 64 restarts on small data (mclust's optima in every cell of the benchmark), fewer as
    # the rows grow: a power of two (a compile key), never more restarts for more rows,
    # restarts × rows bounded once past the maximum, at least the minimum.
    assert search.default_n_init(272) == search.MAX_SEARCH_N_INIT == 64
    assert search.default_n_init(1) == 64
    assert search.default_n_init(2_000) == 32 and search.default_n_init(8_000) == 8
    assert search.default_n_init(10**7) == search.MIN_SEARCH_N_INIT == 4
    previous = search.MAX_SEARCH_N_INIT
    for n in np.unique(np.geomspace(1, 10**6, 400).astype(int)):
        r = search.default_n_init(int(n))
        assert r & (r - 1) == 0 and r <= previous
        assert r == search.MIN_SEARCH_N_INIT or r * n <= search.SEARCH_RESTART_ROWS
        previous = r
    gm = jaxem.GaussianMixtureIC()
    assert gm.n_init is None and gm.tol == search.SEARCH_TOL
    with pytest.raises(ValueError, match="n_init"):
        jaxem.GaussianMixtureIC(n_init=0).fit(np.zeros((10, 2)))
