"""fit_sgd: gradient ascent of the log-likelihood with optax, the baseline EM must beat."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_blobs
from helpers import random_params
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxem
from jaxem import gmm

COV_TYPES = ["full", "tied", "diag", "spherical"]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cov_type=st.sampled_from(COV_TYPES))
def test_unconstrained_maps_are_inverse_and_always_valid(seed, cov_type):
    rng = np.random.default_rng(seed)
    model = gmm.GaussianMixtureModel(cov_type)
    params = random_params(rng, 3, 4, cov_type)
    back = model.from_unconstrained(model.to_unconstrained(params))
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # any free arrays of the right shapes give valid parameters
    u = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype),
                               model.to_unconstrained(params))
    p = model.from_unconstrained(u)
    np.testing.assert_allclose(float(jnp.sum(p.weights)), 1.0, rtol=1e-5)
    gmm.make_params(np.asarray(p.weights, float) / float(np.sum(p.weights)), p.means,
                    p.covariances, cov_type)  # validates: positive definite, finite


@pytest.mark.parametrize("cov_type", ["full", "spherical"])
def test_full_batch_adam_reaches_the_em_optimum(rng, cov_type):
    # Well-separated blobs have one optimum from a k-means start: EM (reg_covar=0) and adam
    # must agree on it, and adam's log-likelihood must climb there.
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([c + rng.normal(size=(150, 2)) * [1.0, 0.5] for c in centres])
    x = x.astype(np.float32)
    model = gmm.GaussianMixtureModel(cov_type)
    cov = {"full": np.stack([np.eye(2) * 4] * 3), "spherical": np.full(3, 4.0)}[cov_type]
    p0 = gmm.make_params(np.array([0.5, 0.3, 0.2], np.float32),
                         (centres + [[1.5, -1.0], [-1.0, 1.5], [1.0, 1.0]]).astype(np.float32),
                         cov.astype(np.float32), cov_type)  # near the optimum, not at it
    em = jaxem.fit(model, x, p0, tol=1e-7, max_iter=300, reg_covar=0.0)
    res = jaxem.fit_sgd(model, x, p0, optimizer=optax.adam(3e-2), n_steps=1500)
    lls = np.asarray(res.log_likelihoods)
    assert not bool(res.failed) and int(res.n_steps) == 1500
    assert lls[-1] > lls[0] + 1e-3
    np.testing.assert_allclose(lls[-1], float(em.lower_bound), rtol=2e-5)
    np.testing.assert_allclose(np.sort(np.asarray(res.params.means)[:, 0]),
                               np.sort(np.asarray(em.params.means)[:, 0]), atol=1e-2)
    # the history is that of the parameters: the last entry is ℓ before the last update
    _, ll = model.e_step(res.params, x)
    np.testing.assert_allclose(float(ll), lls[-1], rtol=1e-5)


def test_mini_batches_and_weights(rng):
    x = make_blobs(rng, n_per=300, k=2, d=2, sep=8.0).astype(np.float32)
    model = gmm.GaussianMixtureModel("diag")
    p0 = gmm.init(jax.random.PRNGKey(0), x, 2, "diag")
    full = jaxem.fit_sgd(model, x, p0, optimizer=optax.adam(3e-2), n_steps=800)
    mini = jaxem.fit_sgd(model, x, p0, optimizer=optax.adam(1e-2), n_steps=1500,
                         batch_size=64, key=jax.random.PRNGKey(1))
    ll_full, ll_mini = (float(model.e_step(r.params, x)[1]) for r in (full, mini))
    assert ll_mini > ll_full - 0.02 * abs(ll_full)  # noisy steps, same neighbourhood
    # integer weights are repetitions: the full-batch loss is the same
    counts = rng.integers(1, 4, size=len(x))
    a = jaxem.fit_sgd(model, x, p0, weights=counts.astype(np.float32), n_steps=50)
    b = jaxem.fit_sgd(model, np.repeat(x, counts, axis=0), p0, n_steps=50)
    np.testing.assert_allclose(a.log_likelihoods, b.log_likelihoods, rtol=1e-4)


def test_divergence_is_reported_and_the_last_finite_params_kept(rng):
    x = make_blobs(rng, n_per=50, k=2, d=2).astype(np.float32)
    model = gmm.GaussianMixtureModel("full")
    p0 = gmm.init(jax.random.PRNGKey(0), x, 2, "full")
    res = jaxem.fit_sgd(model, x, p0, optimizer=optax.sgd(1e12), n_steps=20)
    assert bool(res.failed) and int(res.n_steps) < 20
    assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(res.params))
    lls = np.asarray(res.log_likelihoods)
    assert np.all(np.isnan(lls[int(res.n_steps) + 1:]))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(n_steps=0), ValueError, "n_steps"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(optimizer="adam"), TypeError, "optax"),
        (dict(weights=-np.ones(20)), ValueError, "non-negative"),
    ],
)
def test_bad_input(rng, kwargs, error, match):
    x = rng.normal(size=(20, 2))
    p0 = gmm.init(jax.random.PRNGKey(0), x, 2, "full")
    with pytest.raises(error, match=match):
        jaxem.fit_sgd(gmm.GaussianMixtureModel("full"), x, p0, **kwargs)
    with pytest.raises(TypeError, match="fit_sgd needs model.log_joint"):
        jaxem.fit_sgd(object(), x, p0)


class _TracedOnce(gmm.GaussianMixtureModel):
    """A GMM whose log_joint may be traced once only (chex.assert_max_traces)."""


def test_new_data_values_and_start_do_not_recompile(rng):
    import chex

    model = _TracedOnce("diag")
    traced = chex.assert_max_traces(gmm.log_joint.__wrapped__, n=1)  # the unjitted function
    _TracedOnce.log_joint = lambda self, params, x: traced(params, x)
    x = rng.normal(size=(60, 2)).astype(np.float32)
    p0 = gmm.init(jax.random.PRNGKey(0), x, 2, "diag")
    opt = optax.adam(1e-2)
    jaxem.fit_sgd(model, x, p0, optimizer=opt, n_steps=5)
    jaxem.fit_sgd(model, x * 2 + 1, p0, optimizer=opt, n_steps=5)
    jaxem.fit_sgd(model, x, gmm.init(jax.random.PRNGKey(1), x, 2, "diag"), optimizer=opt,
                  n_steps=5, weights=np.ones(60, np.float32))
    with pytest.raises(AssertionError, match="traced > 1 times"):  # a new shape must trace
        jaxem.fit_sgd(model, x[:30], p0, optimizer=opt, n_steps=5)
