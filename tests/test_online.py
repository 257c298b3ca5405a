"""Learning one batch at a time (jaxem.online, GaussianMixture.partial_fit)."""

import jax
import numpy as np
import pytest
from conftest import make_blobs
from helpers import tree_allclose
from scipy.optimize import linear_sum_assignment

import jaxem
from jaxem import gmm, online, streamed

COV_TYPES = ["full", "tied", "diag", "spherical"]


@pytest.mark.parametrize("covariance_type", COV_TYPES)
def test_exact_accumulation_is_one_batch_em_step_on_the_union(x64, rng, covariance_type):
    x = make_blobs(rng, n_per=120, k=3, d=3)
    w = rng.uniform(0.1, 3.0, len(x))
    model = gmm.GaussianMixtureModel(covariance_type)
    p0 = model.init(jax.random.PRNGKey(2), x, 3, weights=w)
    cuts = [0, *sorted(rng.choice(np.arange(1, len(x)), 4, replace=False)), len(x)]
    acc = None
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        acc = online.accumulate(model, p0, x[a:b], w[a:b], acc)
    params, ll = online.m_step(model, acc, reg_covar=1e-4)
    ref = jaxem.fit(model, x, p0, weights=w, tol=-1.0, max_iter=1, reg_covar=1e-4)
    assert tree_allclose(params, ref.params, rtol=1e-10, atol=1e-12)
    assert float(ll) == pytest.approx(float(ref.lower_bound), abs=1e-12)


def test_estimator_partial_fit_exact_mode_is_batch_em(x64, rng):
    x = make_blobs(rng, n_per=200, k=3, d=2)
    gm = jaxem.GaussianMixture(3, partial_fit_mode="exact", random_state=0)
    for _ in range(3):  # three passes = three batch EM iterations from the first state
        for i in range(0, len(x), 128):
            gm.partial_fit(x[i:i + 128])
        if _ == 0:
            start = gm.params_
        gm.finish_pass() if _ else None
        if _ == 0:
            gm.finish_pass()
    ref = jaxem.fit(gmm.GaussianMixtureModel("full"), x, start, tol=-1.0, max_iter=3)
    assert tree_allclose(gm.params_, ref.params, rtol=1e-9, atol=1e-12)
    assert gm.lower_bound_ == pytest.approx(float(ref.lower_bounds[-1]), abs=1e-12)
    with pytest.raises(ValueError, match="finish_pass needs"):
        gm.finish_pass()


def _mixture(rng, k=8, d=2, n=1_000_000):
    grid = np.stack(np.meshgrid(np.arange(4), np.arange(2)), -1).reshape(-1, 2)[:k]
    means = 7.0 * grid + rng.uniform(-1, 1, (k, d))  # separated: one optimum to find
    weights = rng.dirichlet(np.full(k, 5.0))
    scales = rng.uniform(0.5, 1.5, k)
    labels = rng.choice(k, n, p=weights)
    x = means[labels] + rng.normal(size=(n, d)) * scales[labels, None]
    return x.astype(np.float32), means, weights, scales


def test_online_em_reaches_batch_em_and_recovers_the_mixture(rng):
    # 1e6 samples of a known 8-component mixture, online EM in 2 passes of 4096-row
    # batches: within 1e-3 of batch EM's mean log-likelihood, and the matched components'
    # means within 0.05, weights within 0.005 and standard deviations within 3% of truth.
    x, means, weights, scales = _mixture(rng)
    model = gmm.GaussianMixtureModel("full")
    p0 = jax.tree_util.tree_map(lambda a: a[0], streamed.initial_params(
        model, x, jax.random.PRNGKey(0), n_components=8, init_rows=20_000))
    batch = jaxem.fit(model, x, p0, tol=1e-7, max_iter=1000)
    for average_from in (None, 100):
        res = online.fit(model, x, p0, batch_rows=4096, n_passes=2, kappa=0.6,
                         average_from=average_from)
        _, ll = model.e_step(res.params, x)
        assert float(batch.lower_bound) - float(ll) < 1e-3
        assert len(res.log_likelihoods) == 2 * -(-len(x) // 4096)
        got = np.asarray(res.params.means)
        cost = np.linalg.norm(got[:, None] - means[None], axis=-1)
        row, col = linear_sum_assignment(cost)
        assert np.max(cost[row, col]) < 0.05
        np.testing.assert_allclose(np.asarray(res.params.weights)[row], weights[col], atol=5e-3)
        sd = np.sqrt(np.diagonal(np.asarray(res.params.covariances), axis1=1, axis2=2))[row]
        np.testing.assert_allclose(sd, scales[col, None] * np.ones((1, 2)), rtol=0.03)


@pytest.mark.parametrize("kappa", [0.5, 0.3, 1.2, float("nan")])
def test_bad_schedules_are_rejected(kappa):
    with pytest.raises(ValueError, match="kappa"):
        online.check_schedule(kappa, 0.0)
    with pytest.raises(ValueError, match="kappa"):
        jaxem.GaussianMixture(2, online_kappa=kappa).partial_fit(np.zeros((4, 1)) + [[0], [1],
                                                                                 [2], [3]])


def test_schedule_offsets_and_steps():
    with pytest.raises(ValueError, match="t0"):
        online.check_schedule(0.7, -1.0)
    with pytest.raises(ValueError, match="average_from"):
        online.check_schedule(0.7, 0.0, 0)
    rho = np.asarray([float(online.step_size(t, 0.7, 2.0)) for t in range(1, 6)])
    assert rho[0] == 1.0 and np.allclose(rho[1:], (np.arange(2, 6) + 2.0) ** -0.7)


def test_partial_fit_follows_scikit_learn_conventions(rng):
    x = make_blobs(rng, n_per=300, k=3, d=2).astype(np.float32)
    x = x[rng.permutation(len(x))]
    gm = jaxem.GaussianMixture(3, random_state=0)
    for i in range(0, len(x), 100):
        assert gm.partial_fit(x[i:i + 100]) is gm
    assert gm.n_iter_ == 9 and len(gm.lower_bounds_) == 9
    full = jaxem.GaussianMixture(3, random_state=0).fit(x)
    assert gm.score(x) > full.score(x) - 0.05
    gm.set_params(n_components=4)
    with pytest.raises(ValueError, match="cannot change between calls"):
        gm.partial_fit(x[:100])
    gm.fit(x)  # fit starts again; partial_fit then initialises anew
    gm.partial_fit(x[:100])
    assert gm.n_iter_ == 1 and gm.means_.shape == (4, 2)
    with pytest.raises(ValueError, match="partial_fit_mode"):
        jaxem.GaussianMixture(2, partial_fit_mode="sometimes").partial_fit(x)
