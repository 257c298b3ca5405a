"""The Gaussian mixture model: densities, E-step, M-step, init, sampling, validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    assert_equal_on_cpu,
    enable_x64,
    log_joint_oracle,
    log_likelihood_by_enumeration,
    random_params,
    tree_allclose,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxem import elbo, gmm
from jaxem._rowsum import blockwise_sum

COV_TYPES = ["full", "tied", "diag", "spherical"]


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("k, d", [(3, 4), (6, 2)])  # diag/spherical: samples first, last
def test_log_joint_matches_scipy(x64, rng, cov_type, k, d):
    params = random_params(rng, k, d, cov_type)
    x = rng.normal(size=(50, d)) * 3
    np.testing.assert_allclose(gmm.log_joint(params, x), log_joint_oracle(params, x), rtol=1e-10)
    # The E-step's log-likelihood, through its own block layout (gmm._diag_samples_last).
    _, ll = gmm.e_step(params, x)
    oracle = log_joint_oracle(params, x)
    top = oracle.max(axis=1, keepdims=True)
    log_p = top[:, 0] + np.log(np.exp(oracle - top).sum(axis=1))
    np.testing.assert_allclose(float(ll), log_p.mean(), rtol=1e-10)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cov_type=st.sampled_from(["full", "tied"]),
       k=st.integers(1, 9), d=st.integers(1, 40), offset=st.floats(-1e6, 1e6),
       scale=st.floats(1e-3, 1e3))
def test_whitening_product_returns_the_block_exactly(seed, cov_type, k, d, offset, scale):
    # The whitened sweeps take the block samples last from the whitening product's appended
    # identity rows (gmm._whitened_sq_t): those rows are the block itself, bit for bit, in
    # float32, whatever the precisions, and the distances are those of the plain product.
    rng = np.random.default_rng(seed)
    params = random_params(rng, k, d, cov_type, np.float32)
    xc = (rng.normal(size=(37, d)) * scale + offset).astype(np.float32)
    m = params.means - gmm._center(params)[None]
    sq, xt = gmm._whitened_sq_t(params, jnp.asarray(xc).T, m)
    assert xt.shape == (d, 37)
    np.testing.assert_array_equal(np.asarray(xt), xc.T)
    pc = np.asarray(params.precisions_cholesky, np.float64)
    diff = xc[None].astype(np.float64) - np.asarray(m, np.float64)[:, None]  # (K, C, D)
    y = np.einsum("kcd,kde->kce", diff, pc) if cov_type == "full" else diff @ pc
    want = np.sum(y * y, axis=2)
    np.testing.assert_allclose(sq, want, rtol=2e-3, atol=1e-3 * np.max(want))
    # A log-density alone (predict, score) skips the identity rows: same distances.
    sq_only, none = gmm._whitened_sq_t(params, jnp.asarray(xc).T, m, keep_block=False)
    assert none is None
    np.testing.assert_allclose(sq_only, sq, rtol=1e-5, atol=1e-6 * float(np.max(sq)))


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_log_likelihood_equals_sum_over_all_assignments(x64, rng, cov_type):
    # Brute-force oracle: Σ over all K^N latent paths of p(x, z) (N=5, K=3: 243 terms).
    params = random_params(rng, 3, 2, cov_type)
    x = rng.normal(size=(5, 2)) * 2
    _, ll = gmm.e_step(params, x)
    np.testing.assert_allclose(5 * ll, log_likelihood_by_enumeration(params, x), rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cov_type=st.sampled_from(COV_TYPES),
       scale=st.floats(0.01, 100.0))
def test_responsibilities_sum_to_one(seed, cov_type, scale):
    rng = np.random.default_rng(seed)
    params = random_params(rng, 4, 3, cov_type, dtype=np.float32)
    x = (rng.normal(size=(30, 3)) * scale).astype(np.float32)
    log_resp = elbo.posterior(gmm.log_joint(params, x))
    assert np.all(np.isfinite(log_resp))
    # exp(L - logsumexp L) carries a float32 rounding of about eps·|log p(x_n)|.
    log_norm = np.abs(np.asarray(gmm.score_samples(params, x)))
    tol = 8 * np.finfo(np.float32).eps * np.maximum(1.0, log_norm)
    assert np.all(np.abs(np.exp(log_resp).sum(axis=1) - 1.0) <= tol)


def weighted_moments_by_hand(x, resp, w, reg, cov_type):
    """M-step written out with numpy, one component at a time."""
    eps = 10 * np.finfo(np.float64).eps
    nk = (w[:, None] * resp).sum(0) + eps
    means = (w[:, None] * resp).T @ x / nk[:, None]
    covs = []
    for k in range(resp.shape[1]):
        d = x - means[k]
        covs.append((w * resp[:, k] * d.T) @ d / nk[k])
    covs = np.array(covs)
    dim = x.shape[1]
    if cov_type == "full":
        cov = covs + reg * np.eye(dim)
    elif cov_type == "tied":
        cov = (nk[:, None, None] * covs).sum(0) / nk.sum() + reg * np.eye(dim)
    elif cov_type == "diag":
        cov = np.diagonal(covs, axis1=1, axis2=2) + reg
    else:
        cov = np.diagonal(covs, axis1=1, axis2=2).mean(1) + reg
    return nk / nk.sum(), means, cov


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_m_step_equals_weighted_moments_by_hand(x64, rng, cov_type):
    params = random_params(rng, 3, 3, cov_type)
    x = rng.normal(size=(40, 3)) * 2 + 1
    w = rng.uniform(0.1, 3.0, size=40)
    stats, _ = gmm.e_step(params, x, w)
    new = gmm.m_step(stats, reg_covar=0.01)
    resp = np.exp(np.asarray(elbo.posterior(gmm.log_joint(params, x))))
    weights, means, cov = weighted_moments_by_hand(x, resp, w, 0.01, cov_type)
    np.testing.assert_allclose(new.weights, weights, rtol=1e-10)
    np.testing.assert_allclose(new.means, means, rtol=1e-10)
    np.testing.assert_allclose(new.covariances, cov, rtol=1e-10)
    # The precision factor is consistent with the covariance.
    np.testing.assert_allclose(
        gmm.make_params(weights, means, cov, cov_type).precisions_cholesky,
        new.precisions_cholesky, rtol=1e-8)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_integer_weights_equal_repeated_samples(x64, rng, cov_type):
    params = random_params(rng, 2, 2, cov_type)
    x = rng.normal(size=(20, 2))
    counts = rng.integers(0, 4, size=20)
    counts[0] = 1
    s_w, ll_w = gmm.e_step(params, x, counts.astype(float))
    s_r, ll_r = gmm.e_step(params, np.repeat(x, counts, axis=0))
    assert tree_allclose(s_w, s_r, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ll_w, ll_r, rtol=1e-12)


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("chunk_size", [1, 7, 32, 1000])
def test_chunked_e_step_equals_single_pass(x64, rng, cov_type, chunk_size):
    params = random_params(rng, 3, 2, cov_type)
    x = rng.normal(size=(45, 2))
    w = rng.uniform(size=45)
    s1, ll1 = gmm.e_step(params, x, w)
    s2, ll2 = gmm.e_step(params, x, w, chunk_size=chunk_size)
    assert tree_allclose(s1, s2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ll1, ll2, rtol=1e-12)


def test_covariance_types_agree_in_one_dimension(x64, rng):
    x = np.concatenate([rng.normal(-2, 0.5, 60), rng.normal(3, 1.5, 40)])[:, None]
    w = np.array([0.5, 0.5])
    means = np.array([[-1.0], [1.0]])
    var = np.array([1.0, 2.0])
    covs = {"full": var[:, None, None], "diag": var[:, None], "spherical": var}
    results = {}
    for ct, cov in covs.items():
        params = gmm.make_params(w, means, cov, ct)
        for _ in range(5):
            stats, ll = gmm.e_step(params, x)
            params = gmm.m_step(stats, reg_covar=1e-6)
        results[ct] = (ll, params.means, params.covariances.reshape(-1))
    for ct in ("diag", "spherical"):
        for a, b in zip(results["full"], results[ct], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_float32_accurate_with_large_offset(rng, cov_type):
    # Data far from the origin (mean 1e4, unit spread): centred moments keep float32 exact
    # enough that one EM step matches float64 closely.
    x = rng.normal(size=(300, 3)) + 1e4
    params64 = random_params(rng, 2, 3, cov_type)
    means = x[:2] + 0.1
    with enable_x64():
        p64 = gmm.make_params(np.asarray(params64.weights), means,
                              np.asarray(params64.covariances), cov_type)
        s, ll64 = gmm.e_step(p64, x)
        new64 = gmm.m_step(s)
        _, ll64_next = gmm.e_step(new64, x)
        ll64, ll64_next = float(ll64), float(ll64_next)
    p32 = gmm.make_params(np.asarray(params64.weights, np.float32), means.astype(np.float32),
                          np.asarray(params64.covariances, np.float32), cov_type)
    x32 = x.astype(np.float32)
    s, ll32 = gmm.e_step(p32, x32)
    _, ll32_next = gmm.e_step(gmm.m_step(s), x32)
    # x itself is rounded to float32 (spacing ~1e-3 at 1e4), so compare at that scale.
    assert abs(float(ll32) - ll64) < 1e-4 * abs(ll64) + 1e-3
    assert abs(float(ll32_next) - ll64_next) < 1e-4 * abs(ll64_next) + 1e-3


def _diag_problem(rng, k, offset, sep, n_dup, cov_type, n=400, d=3):
    """float32 blobs (plus, optionally, a far component on duplicate points) and params."""
    centers = rng.normal(size=(k, d)) * sep + offset
    x = centers[rng.integers(0, k, n)] + rng.normal(size=(n, d))
    means = centers + 0.3
    if n_dup:  # the last component sits on n_dup copies of one far point
        x[:n_dup] = offset + 3 * sep + 1.0
        means[-1] = x[0] + 0.1
    cov = np.ones((k, d)) if cov_type == "diag" else np.ones(k)
    params = gmm.make_params(np.full(k, 1 / k, np.float32), means.astype(np.float32),
                             cov.astype(np.float32), cov_type)
    return x.astype(np.float32), params


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), offset=st.sampled_from([0.0, 50.0, 1e4]),
       sep=st.floats(0.5, 300.0), n_dup=st.integers(0, 4), k=st.sampled_from([2, 5, 16]),
       cov_type=st.sampled_from(["diag", "spherical"]))
def test_product_moments_agree_with_centred_moments(seed, offset, sep, n_dup, k, cov_type):
    # diag/spherical take second moments as matrix products about the mixture centre unless
    # that would round a variance by more than PRODUCT_MOMENTS_RTOL; either way the M-step
    # must match the moments centred on each mean. A component on duplicate points has true
    # variance 0, so it must come out as reg_covar to ~1e-9: the product form alone would
    # be off by ~eps·distance². (Few distinct K: each shape is a compilation.)
    x, params = _diag_problem(np.random.default_rng(seed), k, offset, sep, n_dup, cov_type)
    stats_a, ll_a = gmm.e_step(params, x, chunk_size=64, moments="product")
    stats_c, ll_c = gmm.e_step(params, x, chunk_size=64, moments="centred")
    assert_equal_on_cpu(float(ll_a), float(ll_c))  # the same E-step densities either way
    auto, centred = gmm.m_step(stats_a, 1e-6), gmm.m_step(stats_c, 1e-6)
    assert_equal_on_cpu(auto.weights, centred.weights, atol=1e-7)
    np.testing.assert_allclose(auto.means, centred.means, rtol=1e-6, atol=1e-6 * sep)
    np.testing.assert_allclose(auto.covariances, centred.covariances, rtol=1e-3)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), offset=st.sampled_from([0.0, 1e3]),
       sep=st.sampled_from([1.0, 30.0, 1e3]), k=st.sampled_from([2, 6]),
       overlap=st.booleans())
def test_tied_moments_in_float32_do_not_round_with_the_separation(seed, offset, sep, k,
                                                                  overlap):
    # tied's moments are products about each sample's responsibility-weighted mean (no
    # (K, D, C) array); expanding them about the mixture centre instead would round the
    # shared covariance by ~eps·(separation/σ)² (8e-2 at 1e3 σ). Against float64, one
    # M-step's covariance must stay within float32's reach of the data itself.
    rng = np.random.default_rng(seed)
    d, n = 3, 600
    centers = rng.normal(size=(k, d)) * sep + offset
    x = centers[rng.integers(0, k, n)] + rng.normal(size=(n, d))
    w = rng.uniform(0.0, 2.0, n) * (rng.uniform(size=n) > 0.1)  # some weight-zero rows
    cov = np.eye(d) * (sep**2 if overlap else 1.0)  # broad: soft responsibilities
    with enable_x64():
        p64 = gmm.make_params(np.full(k, 1 / k), centers + 0.2, cov, "tied")
        s64, _ = gmm.e_step(p64, x, w, chunk_size=128)
        c64 = np.asarray(gmm.m_step(s64, 0.0).covariances)
        m64 = np.asarray(gmm.m_step(s64, 0.0).means)
    p32 = gmm.make_params(np.full(k, 1 / k, np.float32), (centers + 0.2).astype(np.float32),
                          cov.astype(np.float32), "tied")
    s32, _ = gmm.e_step(p32, x.astype(np.float32), w.astype(np.float32), chunk_size=128)
    new = gmm.m_step(s32, 0.0)
    eps = np.finfo(np.float32).eps
    scale = np.max(np.abs(np.diag(c64)))
    # x − c itself rounds by eps·|x − c|: errors ~eps·(separation/σ) are float32's floor.
    reach = 50 * eps * (1 + (abs(offset) + sep * np.sqrt(d)) / np.sqrt(scale))
    assert np.max(np.abs(np.asarray(new.covariances) - c64)) <= reach * scale
    np.testing.assert_allclose(new.means, m64, atol=50 * eps * (abs(offset) + 3 * sep + 3))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), offset=st.sampled_from([0.0, 1e3, 1e5]),
       spread=st.sampled_from([1e-3, 1.0]), d=st.integers(1, 40))
def test_spherical_exact_rows_are_the_centred_moments(seed, offset, spread, d):
    # spherical's exact rows keep only Σ w r |x − μ|² (spread over the columns: its mean over
    # features is what the M-step reads) and take Σ w r (x − μ) through the centre. Against
    # float64 centred moments, on a tight cloud far from the block's centre (where the product
    # form would lose ~eps·(offset/spread)² of the variance), the mean second moment keeps
    # float32's reach of the residuals themselves.
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(3, d)) * offset
    x = mu[rng.integers(0, 3, 300)] + rng.normal(size=(300, d)) * spread
    c = x.mean(axis=0)
    wr = rng.uniform(size=(3, 300))
    xc32, m32 = (x - c).astype(np.float32), (mu - c).astype(np.float32)
    s_x, s_xx = gmm._spherical_moments(jnp.asarray(xc32), jnp.asarray(wr, jnp.float32),
                                       jnp.asarray(m32))
    assert s_xx.shape == (3, d)
    np.testing.assert_array_equal(s_xx, np.broadcast_to(np.asarray(s_xx)[:, :1], (3, d)))
    xc64, m64 = xc32.astype(np.float64), m32.astype(np.float64)
    diff = xc64[None] - m64[:, None]  # (K, C, D)
    want_xx = np.einsum("kc,kcd->k", wr, diff**2) / d
    eps = np.finfo(np.float32).eps
    scale = np.einsum("kc,kcd->k", wr, (np.abs(diff) + eps * np.abs(xc64)[None]) ** 2) / d
    np.testing.assert_allclose(np.asarray(s_xx)[:, 0], want_xx, rtol=0,
                               atol=float(np.max(50 * eps * scale + 1e-30)))
    want_x = np.einsum("kc,kcd->kd", wr, diff)
    reach = 50 * eps * (np.abs(m64) * wr.sum(axis=1)[:, None]
                        + np.einsum("kc,cd->kd", wr, np.abs(xc64)))
    assert np.all(np.abs(np.asarray(s_x) - want_x) <= reach)


def _first_sweep(params, x):
    """The product form's first sweep on (params, x): ``(risky, taken, sweep)``, the
    components failing the check after it, the exact ones, and the sweep itself."""
    def sweep(exact):
        return blockwise_sum(
            lambda xs, ws: gmm._e_step_block(params, xs, ws, exact=exact), x,
            np.ones(len(x), x.dtype), 256)

    exact = gmm._likely_ill_conditioned(params)
    _, _, risky, taken = gmm._product_moments(params, exact, *sweep(exact))
    return np.asarray(risky), np.asarray(taken), sweep


def test_product_moments_check_trips_only_when_needed(rng):
    # Benign float32 data: the product form passes its check (the fast path runs). Three far
    # components collapsing on duplicates while only ceil(16/8) = 2 can be taken exactly:
    # the check must trip, no second product sweep can repair it, and the E-step returns
    # the centred moments.
    x, params = _diag_problem(rng, 16, 1e4, 3.0, 0, "diag", n=2000)
    risky, taken, _ = _first_sweep(params, x)
    assert not np.any(risky & ~taken)

    x, params = _diag_problem(rng, 16, 0.0, 100.0, 0, "diag", n=2000)
    means = np.asarray(params.means).copy()
    for j, k in enumerate([3, 7, 11]):  # components 3, 7, 11 each own 5 copies of a point
        x[5 * j: 5 * j + 5] = 400.0 * (j + 1)
        means[k] = 400.0 * (j + 1) + 0.01
    params = gmm.make_params(params.weights, means, params.covariances, "diag")
    risky, taken, _ = _first_sweep(params, x)
    assert {3, 7, 11} <= set(np.flatnonzero(risky)) and np.any(risky & ~taken)
    assert risky.sum() > 2  # more than the slots: no second product sweep
    auto, _ = gmm.e_step(params, x, moments="product")
    centred, _ = gmm.e_step(params, x, moments="centred")
    assert tree_allclose(auto, centred, rtol=0.0)
    var = np.asarray(gmm.m_step(auto, 1e-6).covariances)[[3, 7, 11]]
    np.testing.assert_allclose(var, 1e-6, rtol=1e-3)


def test_exact_rows_are_taken_for_far_components_and_repaired_for_collapsing_ones(rng):
    # Before the sweep, the components far from the centre relative to their spread (their
    # predicted rounding within EXACT_ROWS_MARGIN of the tolerance) are counted and taken
    # exactly, the farthest first, at most ceil(K/8). Benign data: none.
    x, params = _diag_problem(rng, 16, 1e4, 3.0, 0, "diag", n=2000)
    assert int(gmm._likely_ill_conditioned(params).count) == 0
    eps = np.finfo(np.float32).eps
    for shifts in ({5: 400.0}, {5: 400.0, 9: 800.0, 2: -200.0}, {9: 30.0}):
        means = np.asarray(params.means).copy()
        for j, v in shifts.items():
            means[j] += v
        far = gmm.make_params(params.weights, means, params.covariances, "diag")
        m = means - np.asarray(gmm._center(far))
        ratio = 1 + np.max(m**2 / np.asarray(far.covariances), axis=1)
        at_risk = gmm.EXACT_ROWS_MARGIN * eps * ratio > gmm.PRODUCT_MOMENTS_RTOL
        exact = gmm._likely_ill_conditioned(far)
        assert int(exact.count) == min(at_risk.sum(), 2) and at_risk.sum() >= 1
        np.testing.assert_array_equal(exact.index, np.argsort(-ratio)[:2])
    # A near component on a few points (weight 1e-5) is not taken on a guess ...
    w = np.asarray(params.weights).copy()
    w[5], w[6] = 1e-5, w[6] + w[5] - 1e-5
    small = gmm.make_params(w, params.means, params.covariances, "diag")
    assert int(gmm._likely_ill_conditioned(small).count) == 0
    with jax.enable_x64(True):  # float64 rounds 1e9× less: never needed
        far64 = jax.tree_util.tree_map(
            lambda a: a.astype(np.float64) if hasattr(a, "astype") else a, far)
        assert int(gmm._likely_ill_conditioned(far64).count) == 0
    # ... and if it collapses within the iteration, the check finds it and a second sweep
    # takes it exactly. Here broad now (σ = 60, so that its predicted rounding is small),
    # but its new responsibilities lie on 5 copies of a point 200 away.
    centres = np.array([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    x = (centres[rng.integers(0, 3, 2000)] + rng.normal(size=(2000, 2))).astype(np.float32)
    x[:5] = 200.0
    means = np.concatenate([centres, [[200.01, 200.01]]]).astype(np.float32)
    cov = np.concatenate([np.ones((3, 2)), np.full((1, 2), 60.0**2)]).astype(np.float32)
    params = gmm.make_params(np.asarray([0.323, 0.323, 0.324, 0.03], np.float32), means, cov,
                             "diag")
    risky, taken, sweep = _first_sweep(params, x)
    assert list(risky) == [False, False, False, True] and not np.any(taken)
    moments, _, ok = gmm._product_sweeps(params, gmm._center(params), sweep)
    assert bool(ok)  # repaired: the centred sweep is not needed
    centred, _ = gmm.e_step(params, x, moments="centred")
    for stats in (gmm.GMMStats(*moments, params.means, "diag", live=params.weights > 0),
                  gmm.e_step(params, x, moments="product")[0]):
        new, want = gmm.m_step(stats, 1e-6), gmm.m_step(centred, 1e-6)
        np.testing.assert_allclose(new.covariances, want.covariances, rtol=1e-4)
        np.testing.assert_allclose(new.means, want.means, rtol=1e-6, atol=1e-5)
        assert np.all(np.asarray(new.covariances)[3] < 1.0)  # from 3600


def test_the_repaired_product_form_is_reverse_differentiable(rng):
    # The two product sweeps are a scan of conds, not a while loop: reverse mode runs
    # through them. Where the second sweep repairs a collapsing component, the gradient of
    # the new covariances with respect to the means matches the centred moments'.
    centres = np.array([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    x = (centres[rng.integers(0, 3, 600)] + rng.normal(size=(600, 2))).astype(np.float32)
    x[:5] = 200.0 + rng.normal(size=(5, 2)).astype(np.float32) * 1e-2
    cov = np.concatenate([np.ones((3, 2)), np.full((1, 2), 60.0**2)]).astype(np.float32)
    weights = np.asarray([0.323, 0.323, 0.324, 0.03], np.float32)
    means = np.concatenate([centres, [[200.01, 200.01]]]).astype(np.float32)

    def loss(means, moments):
        params = gmm.make_params(weights, means, cov, "diag")
        stats, ll = gmm.e_step(params, x, moments=moments)
        return jnp.sum(jnp.log(gmm.m_step(stats, 1e-6).covariances)) + ll

    assert _first_sweep(gmm.make_params(weights, means, cov, "diag"), x)[0][3]  # repaired
    got, want = (jax.grad(loss)(jnp.asarray(means), mo) for mo in ("product", "centred"))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-3 * float(jnp.max(jnp.abs(want))))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), count=st.integers(0, 3),
       empty=st.lists(st.booleans(), min_size=3, max_size=3),
       cov_type=st.sampled_from(["diag", "spherical"]))
def test_exact_rows_skip_only_what_adds_nothing(seed, count, empty, cov_type):
    # The exact rows are taken for the first `count` slots, and skipped for a slot whose
    # responsibilities in the block are all zero (a collapsed component elsewhere) — for no
    # member of a vmap, unless it is empty for all. Either way each member gets exactly the
    # rows computed for every slot, zeros beyond `count`.
    rng = np.random.default_rng(seed)
    moments = gmm._spherical_moments if cov_type == "spherical" else gmm._diag_moments
    xc = jnp.asarray(rng.normal(size=(40, 3)) * 5, jnp.float32)
    m = jnp.asarray(rng.normal(size=(2, 3, 3)), jnp.float32)  # two members, 3 slots
    wr = rng.uniform(size=(2, 3, 40)) * (rng.uniform(size=(2, 3, 40)) > 0.3)
    wr[0, np.asarray(empty)] = 0.0  # member 0: these slots hold no responsibility here
    wr = jnp.asarray(wr, jnp.float32)
    got = jax.vmap(lambda w, mm: moments(xc, w, mm, jnp.int32(count)))(wr, m)
    for b in range(2):
        want = moments(xc, wr[b], m[b])  # every slot computed
        for g, w_ in zip(got, want, strict=True):
            scale = float(np.max(np.abs(np.asarray(w_[:count])), initial=1.0))
            assert_equal_on_cpu(g[b, :count], w_[:count], atol=1e-6 * scale)
            assert not np.any(np.asarray(g[b, count:]))


def test_a_count_of_exact_rows_is_agreed_over_a_vmap():
    # Under any vmap the members take as many exact rows as the member needing most, so
    # that the per-component conds stay conds (gmm._most_of_batch).
    counts = jnp.asarray([1, 3, 2], jnp.int32)
    np.testing.assert_array_equal(jax.vmap(gmm._most_of_batch)(counts), [3, 3, 3])
    nested = jax.vmap(jax.vmap(gmm._most_of_batch))(jnp.asarray([[1, 0], [4, 2]]))
    np.testing.assert_array_equal(nested, [[4, 4], [4, 4]])
    assert int(gmm._most_of_batch(jnp.asarray(5))) == 5


@pytest.mark.parametrize("cov_type, moments", [("full", "centred"), ("full", "product"),
                                               ("diag", "product")])
def test_vmapped_restarts_share_one_centre(rng, cov_type, moments):
    # Restarts vmapped with batch_axis centre their blocks on one shared point (the mean of
    # their finite centres), so the data side stays unbatched: each heavy product is one
    # product over R·K components. Each restart's statistics are still its own, to float32
    # rounding, on data far from the origin, and a restart whose parameters went non-finite
    # does not spoil the others.
    k, d, r, chunk = 3, 4, 4, 128
    x = (rng.normal(size=(600, d)) + 1e4).astype(np.float32)
    sets = [random_params(rng, k, d, cov_type, np.float32) for _ in range(r)]
    sets = [gmm.make_params(p.weights, x[i * k:(i + 1) * k] + 0.5, p.covariances, cov_type)
            for i, p in enumerate(sets)]
    batch = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *sets)
    batch = dataclasses.replace(batch, means=batch.means.at[r - 1, 0, 0].set(jnp.nan))

    def one(p):
        return gmm.e_step(p, x, chunk_size=chunk, batch=r, batch_axis="restarts",
                          moments=moments)

    vmapped = jax.jit(jax.vmap(one, axis_name="restarts"))
    stats, ll = vmapped(batch)
    for i in range(r - 1):
        alone, ll_alone = gmm.e_step(sets[i], x, chunk_size=chunk, moments=moments)
        mine = jax.tree_util.tree_map(lambda a, i=i: a[i], stats)
        np.testing.assert_allclose(ll[i], ll_alone, rtol=1e-6)
        np.testing.assert_allclose(mine.nk, alone.nk, rtol=1e-4, atol=1e-3)
        new, new_alone = gmm.m_step(mine), gmm.m_step(alone)
        np.testing.assert_allclose(new.means, new_alone.means, rtol=1e-6)
        np.testing.assert_allclose(new.covariances, new_alone.covariances, rtol=2e-3, atol=1e-5)
    if cov_type == "full":
        # No product batched over restarts has a block of samples in its output.
        hlo = vmapped.lower(batch).compile().as_text()
        dots = [ln for ln in hlo.splitlines() if " dot(" in ln]
        assert dots and not [ln for ln in dots if "batch_dims" in ln and f"{chunk}" in
                             ln.split("dot(")[0]]


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_empty_component_stays_finite(x64, rng, cov_type):
    x = rng.normal(size=(50, 2))
    params = gmm.make_params(np.array([0.5, 0.5]), np.array([[0.0, 0.0], [1e3, 1e3]]),
                             random_params(rng, 2, 2, cov_type).covariances, cov_type)
    stats, _ = gmm.e_step(params, x)
    new = gmm.m_step(stats, reg_covar=1e-6)
    assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(new))
    assert float(new.weights[1]) < 1e-12
    np.testing.assert_allclose(new.means[1], [1e3, 1e3])  # keeps its previous mean


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_sample_moments(rng, cov_type):
    params = random_params(rng, 2, 2, cov_type, dtype=np.float32)
    x, labels = gmm.sample(jax.random.PRNGKey(1), params, 40000)
    assert x.shape == (40000, 2) and np.all(np.diff(np.asarray(labels)) >= 0)
    labels = np.asarray(labels)
    np.testing.assert_allclose(np.bincount(labels, minlength=2) / 40000, params.weights, atol=0.01)
    from helpers import full_covariances
    covs = full_covariances(params)
    for k in range(2):
        xk = np.asarray(x)[labels == k]
        np.testing.assert_allclose(xk.mean(0), params.means[k], atol=0.1 * np.sqrt(covs[k].max()))
        np.testing.assert_allclose(np.cov(xk.T), covs[k], atol=0.1 * covs[k].max())


@pytest.mark.parametrize("method", ["kmeans", "k-means++", "random", "random_from_data"])
def test_init_is_one_m_step_from_the_methods_responsibilities(x64, blobs, method):
    # Each method gives responsibilities (hard for the first three, soft for random), and the
    # initial params are exactly the M-step of them: check the means and covariances by hand.
    from jaxem import kmeans

    key = jax.random.PRNGKey(3)
    params = gmm.init(key, blobs, 3, "full", method=method, reg_covar=1e-6)
    x = np.asarray(blobs)
    if method == "kmeans":
        labels = np.asarray(kmeans.kmeans(key, blobs, 3).labels)
    elif method == "k-means++":
        labels = np.asarray(kmeans.nearest_center(blobs, kmeans.kmeans_plusplus(key, blobs, 3)))
    if method in ("kmeans", "k-means++"):
        for k in range(3):
            xk = x[labels == k]
            np.testing.assert_allclose(params.means[k], xk.mean(0), rtol=1e-12)
            cov = np.cov(xk.T, bias=True) + 1e-6 * np.eye(2)
            np.testing.assert_allclose(params.covariances[k], cov, rtol=1e-10)
            np.testing.assert_allclose(params.weights[k], len(xk) / len(x), rtol=1e-12)
    elif method == "random_from_data":  # one sample per component: its mean is that sample
        dist = np.abs(x[None] - np.asarray(params.means)[:, None]).sum(-1).min(1)
        np.testing.assert_array_equal(dist, 0.0)
        np.testing.assert_allclose(params.covariances, np.stack([1e-6 * np.eye(2)] * 3),
                                   rtol=1e-9)
    else:  # soft uniform responsibilities: every mean is a weighted average of the data
        assert np.all((params.means >= x.min(0)) & (params.means <= x.max(0)))
        assert np.all(np.linalg.eigvalsh(np.asarray(params.covariances)) > 1e-6)
    np.testing.assert_allclose(params.weights.sum(), 1.0, rtol=1e-12)


@pytest.mark.parametrize("cov_type", ["full", "tied", "diag", "spherical"])
@pytest.mark.parametrize("batch", [1, 64])
def test_init_from_labels_in_blocks_is_the_weighted_m_step(x64, cov_type, batch, monkeypatch):
    """Given hard labels (−1: no component), weights with zeros and more rows than a
    block (several blocks at ``batch`` = 64, one at 1), init is the weighted M-step of the
    one-hot responsibilities, checked against numpy in float64; dead slots stay dead."""
    rng = np.random.default_rng(11)
    n, d, k, live = 3000, 3, 5, 4
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, d) + 10.0
    labels = rng.integers(-1, live, n).astype(np.int32)
    w = rng.uniform(0.2, 3.0, n)
    w[rng.choice(n, 300, replace=False)] = 0.0
    reg = 1e-6
    if batch > 1:  # the CPU's budget (a GPU's holds all 3,000 rows in one block)
        monkeypatch.setattr(gmm, "default_budget_bytes", lambda t: gmm.CHUNK_BUDGET_BYTES[t])
        assert gmm.auto_chunk_size(n, k, d, np.float64, cov_type, batch) < n
    params = gmm.init(jax.random.PRNGKey(0), x, k, cov_type, weights=w, labels=labels,
                      n_live=live, reg_covar=reg, batch=batch)
    nk = np.array([w[labels == j].sum() for j in range(live)])
    means = np.stack([np.sum(w[labels == j, None] * x[labels == j], 0) / nk[j]
                      for j in range(live)])
    scatter = np.stack([(w[labels == j, None] * (x[labels == j] - means[j])).T
                        @ (x[labels == j] - means[j]) for j in range(live)])
    np.testing.assert_allclose(params.weights[:live], nk / nk.sum(), rtol=1e-12)
    np.testing.assert_array_equal(params.weights[live:], 0.0)
    np.testing.assert_allclose(params.means[:live], means, rtol=1e-12)
    want = {"full": scatter / nk[:, None, None] + reg * np.eye(d),
            "tied": scatter.sum(0) / nk.sum() + reg * np.eye(d),
            "diag": np.diagonal(scatter, axis1=1, axis2=2) / nk[:, None] + reg,
            "spherical": np.trace(scatter, axis1=1, axis2=2) / (d * nk) + reg}[cov_type]
    got = params.covariances if cov_type == "tied" else params.covariances[:live]
    np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize("batch, error", [(0, ValueError), (-3, ValueError), (2.0, TypeError),
                                          (True, TypeError)])
def test_init_rejects_a_bad_batch_before_compiling(blobs, batch, error):
    with pytest.raises(error, match="batch"):
        gmm.init(jax.random.PRNGKey(0), blobs, 3, "full", batch=batch)


def test_init_responsibilities_are_shared_by_the_covariance_types(x64, blobs):
    # The covariance type only changes the M-step: the four give the same means and weights,
    # and covariances that are the structured versions of the full ones.
    key = jax.random.PRNGKey(3)
    full = gmm.init(key, blobs, 3, "full")
    for cov_type in ("tied", "diag", "spherical"):
        p = gmm.init(key, blobs, 3, cov_type)
        np.testing.assert_allclose(p.means, full.means, rtol=1e-12)
        np.testing.assert_allclose(p.weights, full.weights, rtol=1e-12)
    diag = gmm.init(key, blobs, 3, "diag")
    np.testing.assert_allclose(diag.covariances,
                               np.diagonal(np.asarray(full.covariances), axis1=1, axis2=2),
                               rtol=1e-10)


def test_init_overrides(blobs):
    means = blobs[:3]
    prec = np.stack([np.eye(2) * 2.0] * 3)
    params = gmm.init(jax.random.PRNGKey(0), blobs, 3, "full", means_init=means,
                      precisions_init=prec, weights_init=np.array([0.2, 0.3, 0.5]))
    np.testing.assert_allclose(params.means, means, rtol=1e-6)
    np.testing.assert_allclose(params.covariances, np.linalg.inv(prec), rtol=1e-5)
    np.testing.assert_allclose(params.weights, [0.2, 0.3, 0.5], rtol=1e-6)


def test_make_params_precisions_and_covariances_agree(x64, rng):
    a = rng.normal(size=(2, 3, 3))
    cov = a @ np.swapaxes(a, 1, 2) + np.eye(3)
    p1 = gmm.make_params([0.4, 0.6], rng.normal(size=(2, 3)), cov, "full")
    p2 = gmm.make_params([0.4, 0.6], p1.means, precisions=np.linalg.inv(cov))
    x = rng.normal(size=(10, 3))
    np.testing.assert_allclose(gmm.log_joint(p1, x), gmm.log_joint(p2, x), rtol=1e-10)
    np.testing.assert_allclose(p2.covariances, cov, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d=st.sampled_from([1, 2, 5, 12, 24, 33]),
       batch=st.integers(1, 4), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_lower_triangular_inverse_equals_lapacks(seed, d, batch, scale):
    """The CPU's forward substitution (see _linalg.lower_triangular_inverse; used from
    SUBSTITUTION_MIN_FEATURES up) is the inverse LAPACK's triangular solve gives, and its
    gradient is that solve's."""
    from jaxem import _linalg

    rng = np.random.default_rng(seed)
    a = rng.normal(size=(batch, d, d + 2))
    chol = np.linalg.cholesky(scale * (a @ np.swapaxes(a, 1, 2) / d + 0.1 * np.eye(d)))
    eye = np.broadcast_to(np.eye(d), chol.shape)

    def lapack(t):
        return jax.scipy.linalg.solve_triangular(t, eye, lower=True)

    with enable_x64():
        ours = jax.jit(_linalg._forward_substitution_inverse)(chol)
        np.testing.assert_allclose(ours, np.linalg.inv(chol), rtol=1e-9,
                                   atol=1e-12 * np.abs(np.linalg.inv(chol)).max())
        np.testing.assert_allclose(_linalg.lower_triangular_inverse(chol), lapack(chol),
                                   rtol=1e-9, atol=1e-12 * np.abs(ours).max())
        weights = rng.normal(size=chol.shape)
        grads = [jax.grad(lambda t, f=f: jnp.sum(weights * f(t)))(chol)
                 for f in (_linalg._forward_substitution_inverse, lapack)]
        np.testing.assert_allclose(np.tril(grads[0]), np.tril(grads[1]), rtol=1e-7,
                                   atol=1e-10 * np.abs(grads[1]).max())
    # A factor with NaN (a covariance that was not positive definite) gives NaN rows from
    # there on, never a finite wrong answer.
    bad = chol.astype(np.float32)
    bad[0, d - 1, d - 1] = np.nan
    assert np.all(np.isnan(np.asarray(_linalg._forward_substitution_inverse(bad))[0, d - 1]))
    assert np.all(np.isnan(np.asarray(_linalg.lower_triangular_inverse(bad))[0, d - 1]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(covariance_type="banana"), "covariance_type"),
        (dict(weights=[0.5, 0.6]), "'weights' should be normalized"),
        (dict(weights=[1.0]), r"'weights' should have the shape of \(2,\)"),
        (dict(means=np.zeros(2)), "means must be 2-D"),
        (dict(covariances=np.zeros((2, 2, 2))),
         "'full covariance' should be symmetric, positive-definite"),
        (dict(covariances=np.ones((3, 2, 2))),
         r"'covariances' should have the shape of \(2, 2, 2\)"),
        (dict(means=np.array([[0.0, np.nan], [0, 0]])), "NaN"),
    ],
)
def test_make_params_rejects_bad_input(kwargs, match):
    args = dict(weights=[0.5, 0.5], means=np.zeros((2, 2)), covariances=np.stack([np.eye(2)] * 2),
                covariance_type="full")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gmm.make_params(**args)


def test_model_is_hashable_and_validates(rng):
    assert hash(gmm.GaussianMixtureModel("diag")) == hash(gmm.GaussianMixtureModel("diag"))
    with pytest.raises(ValueError, match="covariance_type"):
        gmm.GaussianMixtureModel("banana")
    with pytest.raises(ValueError, match="chunk_size"):
        gmm.GaussianMixtureModel("full", chunk_size=0)
    with pytest.raises(ValueError, match="moments"):
        gmm.GaussianMixtureModel("diag", moments="fast")
    with pytest.raises(ValueError, match="moments"):
        gmm.e_step(random_params(rng, 2, 2, "diag"), np.zeros((4, 2)), moments="exact")


def test_n_parameters_matches_sklearn_formula(rng):
    for ct, expect in [("full", 3 * 6 + 3 * 3 + 2), ("tied", 6 + 9 + 2), ("diag", 9 + 9 + 2),
                       ("spherical", 3 + 9 + 2)]:
        assert gmm.n_parameters(random_params(rng, 3, 3, ct)) == expect


def test_e_step_is_jittable_and_differentiable(rng):
    params = random_params(rng, 2, 2, "full", dtype=np.float32)
    x = jnp.asarray(rng.normal(size=(10, 2)), jnp.float32)
    g = jax.grad(lambda x: jax.jit(gmm.e_step)(params, x)[1])(x)
    assert g.shape == x.shape and np.all(np.isfinite(g))


def test_eager_calls_compile_once_per_shape(rng):
    """Called outside jit, the public array functions are cached compiled programs: a second
    call with new data, key or parameters of the same shapes compiles nothing (their loops
    used to be traced and compiled again on every call)."""
    from jaxem import kmeans

    compiles = []

    def listen(event, secs, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    def calls(seed):
        key = jax.random.PRNGKey(seed)
        x = jnp.asarray(np.random.default_rng(seed).normal(size=(40, 3)), jnp.float32)
        kmeans.kmeans(key, x, 3)
        kmeans.kmeans_plusplus(key, x, 3)
        p = gmm.init(key, x, 3, "full", method="kmeans")
        stats, _ = gmm.e_step(p, x)
        p = gmm.m_step(stats, 1e-3)
        return [elbo.posterior(gmm.log_joint(p, x)), gmm.score_samples(p, x), gmm.log_joint(p, x),
                gmm.sample(key, p, 7)]

    jax.block_until_ready(calls(0))
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        jax.block_until_ready(calls(1))
    finally:  # the listener is process-wide: the worker's later tests must not feed it
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == []


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d=st.integers(1, 6), k=st.integers(1, 4))
def test_quadratic_features_give_the_log_joint(seed, d, k):
    # full's fast path writes every component's log-joint as z @ B + const over the cyclic
    # pair features (odd and even D, the pairs j = D/2 seen twice): it must equal the
    # whitened log-joint (float64, so only the algebra is tested here).
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(k, d, d))
    with enable_x64():
        params = gmm.make_params(rng.dirichlet(np.ones(k)), rng.normal(size=(k, d)) * 3,
                                 a @ np.swapaxes(a, 1, 2) + 0.5 * np.eye(d), "full")
        x = jnp.asarray(rng.normal(size=(30, d)) * 3)
        c = jnp.asarray(rng.normal(size=d))
        b, const = gmm._full_quadratic_coefs(params, c)
        z = gmm._quadratic_features(x - c[None])
        assert z.dtype == jnp.float64
        np.testing.assert_allclose(z @ b + const[None], gmm.log_joint(params, x), rtol=1e-9,
                                   atol=1e-9)


def _full_problem(rng, k, d, offset, sep, n_dup, n=600):
    """float32 blobs with full covariances (optionally a far component on duplicates)."""
    centers = rng.normal(size=(k, d)) * sep + offset
    x = centers[rng.integers(0, k, n)] + rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    means = centers + 0.3
    if n_dup:
        x[:n_dup] = offset + 3 * sep + 1.0
        means[-1] = x[0] + 0.1
    params = gmm.make_params(np.full(k, 1 / k, np.float32), means.astype(np.float32),
                             np.stack([np.eye(d, dtype=np.float32)] * k), "full")
    return x.astype(np.float32), params


@pytest.mark.parametrize("offset, sep, n_dup", [(0.0, 3.0, 0), (1e4, 3.0, 0), (0.0, 30.0, 0),
                                                 (50.0, 5.0, 4)])
def test_quadratic_form_agrees_with_centred_moments(rng, offset, sep, n_dup):
    # full with 2K >= D takes the log-joint and moments as products over quadratic
    # features about the mixture centre when its rounding bound allows, else the whitened
    # sweep: either way the M-step must match the centred moments, each covariance to
    # 3e-3 of its own scale (so a component collapsing on duplicates to ~reg_covar too).
    x, params = _full_problem(rng, 4, 4, offset, sep, n_dup)
    stats_a, ll_a = gmm.e_step(params, x, chunk_size=64, moments="product")
    stats_c, ll_c = gmm.e_step(params, x, chunk_size=64, moments="centred")
    assert abs(float(ll_a) - float(ll_c)) < 1e-5 * abs(float(ll_c))
    auto, centred = gmm.m_step(stats_a, 1e-6), gmm.m_step(stats_c, 1e-6)
    np.testing.assert_allclose(auto.weights, centred.weights, rtol=1e-4)
    np.testing.assert_allclose(auto.means, centred.means, rtol=1e-5, atol=1e-4 * sep)
    err = np.abs(np.asarray(auto.covariances) - np.asarray(centred.covariances))
    scale = np.max(np.abs(np.asarray(centred.covariances)), axis=(1, 2))
    assert np.all(np.max(err, axis=(1, 2)) <= 3e-3 * scale), (np.max(err, axis=(1, 2)), scale)


def test_quadratic_form_check_trips_only_when_needed(rng):
    # Benign data: the bound holds before and after the sweep (the fast path is kept).
    # A far component collapsing on duplicate points: the check trips and the E-step
    # returns exactly the whitened, centred statistics.
    x, params = _full_problem(rng, 4, 4, 1e4, 3.0, 0)
    c = gmm._center(params)
    assert bool(gmm._quadratic_form_ok(params, c))
    sums = blockwise_sum(lambda xs, ws: gmm._e_step_block(
        params, xs, ws, c=c, quad=gmm._full_quadratic_coefs(params, c)), x, np.ones(600), 128)
    assert bool(gmm._quadratic_moments(params, *sums, c=c)[2])

    x, params = _full_problem(rng, 4, 4, 0.0, 10.0, 5)
    cov = np.stack([np.eye(4, dtype=np.float32)] * 4)
    cov[-1] *= 1e-6  # already collapsing: fails before the sweep
    tight = gmm.make_params(params.weights, params.means, cov, "full")
    assert not bool(gmm._quadratic_form_ok(tight, gmm._center(tight)))
    auto, _ = gmm.e_step(tight, x, moments="product")
    centred, _ = gmm.e_step(tight, x, moments="centred")
    assert tree_allclose(auto, centred, rtol=0.0)
    # Unit covariances pass before the sweep, but the new covariance of the component on
    # the duplicates is ~0: the check after the sweep trips.
    c = gmm._center(params)
    assert bool(gmm._quadratic_form_ok(params, c))
    sums = blockwise_sum(lambda xs, ws: gmm._e_step_block(
        params, xs, ws, c=c, quad=gmm._full_quadratic_coefs(params, c)), x, np.ones(600), 128)
    assert not bool(gmm._quadratic_moments(params, *sums, c=c)[2])
    auto, _ = gmm.e_step(params, x, moments="product")
    centred, _ = gmm.e_step(params, x, moments="centred")
    assert tree_allclose(auto, centred, rtol=0.0)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 10**8), k=st.integers(1, 256), d=st.integers(1, 256),
       cov_type=st.sampled_from(COV_TYPES))
def test_product_form_pays_rule(n, k, d, cov_type):
    # "auto" takes the product form only when the work per iteration repays compiling a
    # second sweep, never for tied (it has none), and for full only with 2K >= D and
    # K·D >= QUADRATIC_FORM_MIN_KD; more samples never switch it off.
    pays = gmm._product_form_pays(n, k, d, cov_type)
    if cov_type == "tied" or (cov_type == "full" and (
            2 * k < d or k * d < gmm.QUADRATIC_FORM_MIN_KD)):
        assert not pays
    else:
        work = n * k * d * (d if cov_type == "full" else 1)
        assert pays == (work >= gmm.PRODUCT_FORM_MIN_WORK[cov_type])
    assert not pays or gmm._product_form_pays(2 * n, k, d, cov_type)


def test_auto_takes_the_product_form_only_where_it_pays(rng, monkeypatch):
    # At test sizes "auto" is the centred computation exactly (one sweep to compile). With
    # the thresholds lowered to 1 it is the product form (not identical to centred) where
    # 2K >= D and still centred where 2K < D. (N = 613 and 617 are used by no other test, so
    # no program traced under the default threshold is reused.)
    for k, n, product_pays in [(2, 613, False), (4, 617, True)]:
        x, params = _full_problem(rng, k, 8, 0.0, 3.0, 0, n=n)
        centred, _ = gmm.e_step(params, x, moments="centred")
        product, _ = gmm.e_step(params, x, moments="product")
        assert not tree_allclose(product, centred, rtol=0.0)
        assert tree_allclose(gmm.e_step(params, x)[0], centred, rtol=0.0)
        with monkeypatch.context() as m:
            m.setitem(gmm.PRODUCT_FORM_MIN_WORK, "full", 1)
            m.setattr(gmm, "QUADRATIC_FORM_MIN_KD", 1)
            auto, _ = gmm.e_step(params, x[:-1])
        expect, _ = gmm.e_step(params, x[:-1], moments="product" if product_pays else "centred")
        assert tree_allclose(auto, expect, rtol=0.0)


@pytest.mark.parametrize("cov_type", ["full", "tied", "diag", "spherical"])
def test_automatic_block_sizes_are_whole_multiples_of_the_row_alignment(cov_type):
    """Odd block sizes ran the E-step up to 1.6x slower, and blocks below CHUNK_ROW_ALIGN
    rows paid more in per-block overhead than they saved: the automatic size is a whole
    multiple of CHUNK_ROW_ALIGN rows, at least one, or all N rows in one block."""
    for n in (100, 5_000, 200_000, 10**6):
        for k, d in ((3, 2), (8, 8), (16, 16), (32, 32), (64, 64)):
            for batch in (1, 4, 32):
                c = gmm.auto_chunk_size(n, k, d, np.float32, cov_type, batch)
                assert c == n or (c < n and c % gmm.CHUNK_ROW_ALIGN == 0), (n, k, d, batch, c)
                assert c >= min(n, gmm.CHUNK_ROW_ALIGN)
                # and below the budget's size only where the budget allowed less than one
                budget = gmm.chunk_budget_bytes(cov_type, d, k)
                small = gmm.auto_chunk_size(n, k, d, np.float32, cov_type, batch,
                                            budget_bytes=budget // 2)
                assert small <= c


def test_block_budget_follows_the_backend(monkeypatch):
    # CPUs keep the cache-sized budgets; a GPU gets ACCELERATOR_BUDGET_SCALE times more,
    # capped by a share of its memory, and so far larger blocks. Both devices faked here,
    # so the test reads the same on any backend.
    import jax.numpy as jnp

    class FakeGPU:
        platform = "gpu"

        def __init__(self, limit):
            self.limit = limit

        def memory_stats(self):
            return {"bytes_limit": self.limit}

    class FakeCPU(FakeGPU):
        platform = "cpu"

    monkeypatch.setattr(gmm.jax, "devices", lambda *a: [FakeCPU(2**30)])
    assert gmm.chunk_budget_bytes("full") == gmm.CHUNK_BUDGET_BYTES["full"]
    cpu_rows = gmm.auto_chunk_size(10**6, 32, 32, jnp.float32, "full")
    monkeypatch.setattr(gmm.jax, "devices", lambda *a: [FakeGPU(80 * 2**30)])
    big = gmm.chunk_budget_bytes("full")
    assert big == gmm.CHUNK_BUDGET_BYTES["full"] * gmm.ACCELERATOR_BUDGET_SCALE
    gpu_rows = gmm.auto_chunk_size(10**6, 32, 32, jnp.float32, "full")
    assert gpu_rows >= 100 * cpu_rows and gpu_rows % gmm.CHUNK_ROW_ALIGN == 0
    monkeypatch.setattr(gmm.jax, "devices", lambda *a: [FakeGPU(2**30)])  # a 1 GiB device
    assert gmm.chunk_budget_bytes("full") == 2**30 // 32
    # the same cap holds for every budget tried or measured (jaxem.tuning)
    assert gmm.within_device_memory(2**40) == 2**30 // 32
    assert gmm.within_device_memory(2**20) == 2**20


@pytest.mark.parametrize("method", ["kmeans", "k-means++", "random", "random_from_data"])
@pytest.mark.parametrize("model", [gmm.GaussianMixtureModel("full"),
                                   gmm.GaussianMixtureModel("spherical"),
                                   gmm.AnyCovarianceModel("full")])
def test_init_in_two_stages_is_init(x64, rng, method, model):
    # What the key decides (labels; random responsibilities), then the rest without a key:
    # init's parameters (fit_batch on the CPU runs the second stage in its loop's program).
    x = np.concatenate([rng.normal(size=(40, 2)) + c for c in ((0, 0), (6, 0), (0, 6))])
    w = rng.uniform(0.5, 2.0, len(x))
    hyper = {"reg_covar": 1e-6, **({"structure": 2} if isinstance(model, gmm.AnyCovarianceModel)
                                   else {})}
    key = jax.random.PRNGKey(3)
    a = model.initial_assignments(key, x, 3, weights=w, method=method, **hyper)
    assert a.shape == ((len(x), 3) if method == "random" else (len(x),))
    staged = model.init(None, x, 3, weights=w, method=method, assignments=a, **hyper)
    assert tree_allclose(staged, model.init(key, x, 3, weights=w, method=method, **hyper),
                         rtol=1e-12, atol=1e-14)
