"""k-means initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxem import kmeans


def well_separated(rng, k=4, n_per=50, d=3):
    centers = np.eye(k, d) * 50 if k <= d else rng.normal(size=(k, d)) * 50
    x = np.concatenate([c + rng.normal(size=(n_per, d)) for c in centers])
    return x.astype(np.float32), centers


def test_kmeans_recovers_separated_clusters(rng):
    x, centers = well_separated(rng, k=3)
    res = kmeans.kmeans(jax.random.PRNGKey(0), x, 3)
    found = np.asarray(res.centers)
    # Every true centre has a found centre within a few noise standard errors.
    d = np.linalg.norm(found[:, None] - centers[None], axis=-1)
    assert np.all(d.min(axis=0) < 0.5)
    labels = np.asarray(res.labels)
    for j in range(3):
        assert len(set(labels[j * 50:(j + 1) * 50].tolist())) == 1
    np.testing.assert_allclose(res.inertia, np.sum((x - found[labels]) ** 2), rtol=1e-3)


def test_kmeans_plusplus_picks_data_points_one_per_cluster(rng):
    x, centers = well_separated(rng, k=3)
    seeds = np.asarray(kmeans.kmeans_plusplus(jax.random.PRNGKey(1), x, 3))
    assert all(np.any(np.all(np.isclose(x, s, atol=1e-3), axis=1)) for s in seeds)
    nearest = np.argmin(np.linalg.norm(seeds[:, None] - centers[None], axis=-1), axis=1)
    assert sorted(nearest.tolist()) == [0, 1, 2]


def test_zero_weight_points_are_ignored(rng):
    x, _ = well_separated(rng, k=3)
    outliers = np.full((20, 3), 1e4, np.float32)
    xw = np.concatenate([x, outliers])
    w = np.concatenate([np.ones(len(x)), np.zeros(20)]).astype(np.float32)
    res = kmeans.kmeans(jax.random.PRNGKey(0), xw, 3, weights=w)
    assert np.all(np.abs(np.asarray(res.centers)) < 100)


def test_duplicate_points_give_finite_centres():
    x = np.zeros((30, 2), np.float32)
    res = kmeans.kmeans(jax.random.PRNGKey(0), x, 3)
    assert np.all(np.isfinite(np.asarray(res.centers)))


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_kmeans_is_vmappable_over_keys(rng, offset):
    x, _ = well_separated(rng, k=3)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    res = jax.vmap(lambda k: kmeans.kmeans(k, x + offset, 3))(keys)
    assert res.centers.shape == (4, 3, 3)
    single = kmeans.kmeans(keys[2], x + offset, 3)
    np.testing.assert_allclose(res.inertia[2], single.inertia, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d=st.integers(1, 6), k=st.integers(1, 5),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_squared_distances_match_float64(seed, d, k, scale):
    # Feature by feature up to SMALL_FEATURES (no cancellation), the expanded form above
    # it (clipped at 0): both within float32 rounding of the float64 distances, never < 0.
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(30, d)) * scale).astype(np.float32)
    c = (rng.normal(size=(k, d)) * scale).astype(np.float32)
    got = np.asarray(kmeans._sq_distances(jnp.asarray(x), jnp.sum(jnp.asarray(x) ** 2, axis=1),
                                          jnp.asarray(c)))
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    want = ((x64[:, None] - c64[None]) ** 2).sum(axis=2)
    eps = np.finfo(np.float32).eps
    if d <= kmeans.SMALL_FEATURES:  # each term rounds relative to itself
        tol = 4 * d * eps * want
    else:  # the expanded form rounds like |x|² + |c|²
        tol = 8 * d * eps * ((x64**2).sum(1)[:, None] + (c64**2).sum(1)[None])
    assert got.shape == (30, k) and np.all(got >= 0)
    assert np.all(np.abs(got - want) <= tol + 1e-30)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_seeding_variates_are_the_uniforms_of_their_index(dtype):
    # A threefry key's variate (i, j) is jax.random.uniform's element of flat index
    # i·_DRAW_STRIDE + j (one hash each, not fold_in's two): the same whatever the number of
    # clusters or candidates, for a raw key and a typed one.
    with jax.enable_x64(dtype == jnp.float64):
        key = jax.random.PRNGKey(7)
        flat = np.asarray(jax.random.uniform(key, (2 * kmeans._DRAW_STRIDE + 3,), dtype))
        for k, t in [(3, 3), (2, 4)]:
            for given in (key, jax.random.wrap_key_data(key)):
                u = np.asarray(kmeans._seeding_uniforms(given, k, t, dtype))
                assert u.dtype == dtype and u.shape == (k, t)
                want = flat[np.arange(k)[:, None] * kmeans._DRAW_STRIDE + np.arange(t)[None]]
                np.testing.assert_array_equal(u, want)


def test_seeding_variates_of_another_generator_keep_their_index():
    # A key of another generator folds the index in: still one variate per index, in
    # [0, 1), a K-cluster draw the prefix of a larger one.
    key = jax.random.key(3, impl="rbg")
    small = np.asarray(kmeans._seeding_uniforms(key, 2, 3, jnp.float32))
    large = np.asarray(kmeans._seeding_uniforms(key, 4, 3, jnp.float32))
    np.testing.assert_array_equal(small, large[:2])
    assert np.all((large >= 0) & (large < 1)) and len(np.unique(large)) == large.size
    seeds = kmeans.kmeans_plusplus(key, np.arange(20.0, dtype=np.float32)[:, None], 3)
    assert seeds.shape == (3, 1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 12), live=st.integers(1, 12),
       ties=st.booleans())
def test_nearest_centre_is_the_first_of_the_closest_live_ones(seed, k, live, ties):
    # Up to SMALL_CLUSTERS the columns are compared in turn; either way the index is
    # argmin's over the live centres (the first of equals) and the distance its minimum.
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=(25, 2)).astype(np.float32)
    c = (rng.integers(-3, 4, size=(k, 2)) if ties else rng.normal(size=(k, 2))).astype(
        np.float32)
    alive = np.arange(k) < min(live, k)
    index, best = kmeans._nearest(jnp.asarray(x), jnp.sum(jnp.asarray(x) ** 2, axis=1),
                                  jnp.asarray(c), jnp.asarray(alive))
    d2 = np.where(alive[None], ((x[:, None] - c[None]) ** 2).sum(2), np.inf)
    np.testing.assert_array_equal(np.asarray(index), np.argmin(d2, axis=1))
    np.testing.assert_allclose(np.asarray(best), d2.min(axis=1), rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from([1, 2, 7, 200, 256, 257, 5000]),
       kind=st.sampled_from(["normal", "ties", "zeros", "wide"]), wide=st.booleans())
def test_argsort_by_integer_passes_is_jnp_argsort(seed, n, kind, wide):
    # The seeding's canonical order sorts single integers in passes (fast on XLA:CPU), not
    # (value, index) pairs: the same stable order, ties by index, -0.0 equal to 0.0, in
    # float32 and float64.
    rng = np.random.default_rng(seed)
    v = rng.normal(size=n)
    if kind == "ties":
        v = np.round(v, 1)
    elif kind == "zeros":
        v[rng.random(n) < 0.4] = 0.0
        v[rng.random(n) < 0.3] = -0.0
    elif kind == "wide":
        v = v * 10.0 ** rng.integers(-30, 30, n)
    from helpers import enable_x64

    with enable_x64(wide):
        values = jnp.asarray(v, jnp.float64 if wide else jnp.float32)
        got = np.asarray(jax.jit(kmeans._argsort)(values))
        np.testing.assert_array_equal(got, np.asarray(jnp.argsort(values)))


@pytest.mark.parametrize("n", [1, 3, kmeans.SMALL_CDF_ROWS, kmeans.SMALL_CDF_ROWS + 1])
def test_prefix_sums_are_the_cumulative_sums(rng, n):
    # A draw's CDF: by a triangular product up to SMALL_CDF_ROWS rows, else cumsum; both the
    # prefix sums to float32 rounding, non-decreasing for non-negative masses.
    mass = (rng.exponential(size=n) * (rng.random(n) > 0.2)).astype(np.float32)
    got = np.asarray(jax.jit(kmeans._prefix_sums)(mass))
    np.testing.assert_allclose(got, np.cumsum(mass.astype(np.float64)), rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(got) >= 0)
