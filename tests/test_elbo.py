"""The ELBO module: log p(x) = ELBO(q) + KL(q ‖ p(z|x)) for any q."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import enable_x64, random_params
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxem import elbo, gmm


def random_log_q(rng, n, k, sharpness, dtype):
    logits = rng.normal(size=(n, k)) * sharpness
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits, dtype), axis=1))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sharpness=st.floats(0.0, 20.0),
       scale=st.floats(0.1, 30.0), use_x64=st.booleans())
def test_identity_holds_for_any_q(seed, sharpness, scale, use_x64):
    rng = np.random.default_rng(seed)
    dtype = np.float64 if use_x64 else np.float32
    with enable_x64(use_x64):
        lj = jnp.asarray(rng.normal(size=(20, 4)) * scale - scale, dtype)
        log_q = random_log_q(rng, 20, 4, sharpness, dtype)
        log_px = float(elbo.log_marginal(lj))
        gap = float(elbo.kl_gap(lj, log_q))
        kl = float(elbo.kl_to_posterior(lj, log_q))
        bound = float(elbo.elbo(lj, log_q))
        # Rounding scales with the magnitudes summed, which can dwarf |log p(x)| when
        # per-sample terms of both signs cancel.
        scale = max(abs(log_px), float(jnp.sum(jnp.abs(jax.nn.logsumexp(lj, axis=1)))),
                    float(jnp.sum(jnp.exp(log_q) * jnp.abs(lj))), 1.0)
    tol = 1e-10 if use_x64 else 1e-5
    assert abs(gap) <= tol * scale
    assert kl >= -tol * scale
    assert bound <= log_px + tol * scale


def test_at_posterior_kl_is_zero_and_elbo_is_log_marginal(x64, rng):
    lj = jnp.asarray(rng.normal(size=(30, 5)) * 4)
    post = elbo.posterior(lj)
    assert abs(float(elbo.kl_to_posterior(lj, post))) < 1e-12
    np.testing.assert_allclose(elbo.elbo(lj, post), elbo.log_marginal(lj), rtol=1e-12)



@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), offset=st.floats(1e5, 1e8))
def test_posterior_is_normalised_however_large_the_log_joint(seed, offset):
    """float32 log-joints ~ −offset with O(1) differences: the posterior is normalised
    relative to each row's largest entry, so it sums to one and equals the float64 softmax
    of the same float32 values (``lj − logsumexp(lj)`` rounds to ulp(offset), up to 8)."""
    rng = np.random.default_rng(seed)
    lj = np.asarray(rng.normal(size=(20, 4)) * 2 - offset, np.float32)
    post = np.exp(np.asarray(elbo.posterior(jnp.asarray(lj)), np.float64))
    lj64 = lj.astype(np.float64)
    oracle = np.exp(lj64 - np.logaddexp.reduce(lj64, axis=1, keepdims=True))
    np.testing.assert_allclose(post.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(post, oracle, atol=1e-5)


def test_hard_q_with_zeros_is_finite(x64, rng):
    # q with exact zeros (log q = -inf): 0·log 0 = 0, nothing becomes NaN.
    lj = jnp.asarray(rng.normal(size=(10, 3)))
    labels = rng.integers(0, 3, size=10)
    log_q = jnp.where(jax.nn.one_hot(labels, 3) > 0, 0.0, -jnp.inf)
    assert float(elbo.entropy(log_q)) == 0.0
    for value in (elbo.elbo(lj, log_q), elbo.kl_to_posterior(lj, log_q)):
        assert np.isfinite(float(value))
    assert abs(float(elbo.kl_gap(lj, log_q))) < 1e-12


def test_entropy_of_uniform(x64):
    log_q = jnp.full((7, 4), -np.log(4.0))
    np.testing.assert_allclose(elbo.entropy(log_q), 7 * np.log(4.0), rtol=1e-14)


def test_elbo_splits_into_expected_log_joint_plus_entropy(x64, rng):
    lj = jnp.asarray(rng.normal(size=(10, 3)))
    log_q = random_log_q(rng, 10, 3, 2.0, np.float64)
    np.testing.assert_allclose(
        elbo.elbo(lj, log_q), elbo.expected_log_joint(lj, log_q) + elbo.entropy(log_q),
        rtol=1e-12)


@pytest.mark.parametrize("cov_type", ["full", "tied", "diag", "spherical"])
def test_elbo_at_e_step_q_equals_driver_log_likelihood(x64, rng, blobs, cov_type):
    # Along a fit, the ELBO at q = p(z | x, θ_i) equals the log-likelihood EM records at step i.
    import jaxem

    params = gmm.init(jax.random.PRNGKey(0), blobs, 3, cov_type, method="random")
    model = gmm.GaussianMixtureModel(cov_type)
    result = jaxem.fit(model, blobs, params, tol=-1.0, max_iter=6)
    n = blobs.shape[0]
    for i in range(6):
        lj = gmm.log_joint(params, blobs)
        bound = elbo.elbo(lj, elbo.posterior(lj)) / n
        np.testing.assert_allclose(bound, result.lower_bounds[i], rtol=1e-10)
        # A stale q (from the previous parameters) gives a strictly lower bound, lower by
        # exactly KL(q_stale ‖ p(z | x, θ_new)), which is positive because θ moved.
        stats, _ = gmm.e_step(params, blobs)
        new = gmm.m_step(stats)
        lj_new = gmm.log_joint(new, blobs)
        stale = float(elbo.elbo(lj_new, elbo.posterior(lj)))
        log_p = float(elbo.log_marginal(lj_new))
        kl = float(elbo.kl_to_posterior(lj_new, elbo.posterior(lj)))
        assert kl > 1e-8 * abs(log_p)
        assert stale < log_p
        np.testing.assert_allclose(log_p - stale, kl, rtol=0, atol=1e-10 * abs(log_p))
        params = new


def test_kl_gap_closes_at_each_e_step_for_gmm(x64, rng):
    params = random_params(rng, 3, 2, "full")
    x = rng.normal(size=(25, 2))
    lj = gmm.log_joint(params, x)
    q_random = random_log_q(rng, 25, 3, 3.0, np.float64)
    assert float(elbo.kl_to_posterior(lj, q_random)) > 1e-3
    assert abs(float(elbo.kl_to_posterior(lj, elbo.posterior(gmm.log_joint(params, x))))) < 1e-12


def test_gradients_are_finite_where_q_has_exact_zeros(x64, rng):
    # One-hot rows (q = 0 exactly: log q = -inf) are what a hard assignment gives. The
    # derivative of Σ q·f(log q) with respect to log q_nk is q_nk·(f + f'), which is 0 where
    # q_nk = 0: the gradients must be that, not 0·(−inf) = NaN.
    lj = jnp.asarray(rng.normal(size=(6, 3)))
    labels = rng.integers(0, 3, size=6)
    log_q = jnp.where(jax.nn.one_hot(labels, 3) > 0, 0.0, -jnp.inf)
    q = np.asarray(jnp.exp(log_q))
    post = np.asarray(elbo.posterior(lj))
    expected = {  # d/d log_q of each quantity, by hand
        "entropy": -q * (np.where(q > 0, np.asarray(log_q), 0.0) + 1.0),
        "elbo": q * (np.asarray(lj) - 1.0),
        "kl_to_posterior": q * (1.0 - post),
    }
    for name, want in expected.items():
        fn = getattr(elbo, name)
        args = (log_q,) if name == "entropy" else (lj, log_q)
        g = jax.grad(lambda a, fn=fn, args=args: fn(*args[:-1], a))(log_q)
        assert np.all(np.isfinite(np.asarray(g))), name
        np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-12, err_msg=name)
    # and with respect to the log-joint, through the posterior
    g = jax.grad(lambda lj: elbo.kl_to_posterior(lj, log_q))(lj)
    assert np.all(np.isfinite(np.asarray(g)))
