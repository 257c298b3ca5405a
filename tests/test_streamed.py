"""Streamed exact EM over host data (jaxem.blocks, jaxem.streamed): the same fit as in memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_blobs
from helpers import tree_allclose

import jaxem
from jaxem import blocks, gmm, streamed

COV_TYPES = ["full", "tied", "diag", "spherical"]


class Chunks:
    """A block source: ``x`` (and weights) cut at the given row boundaries, re-iterable."""

    def __init__(self, x, weights=None, cuts=(), pairs=True):
        self.x, self.w, self.cuts, self.pairs = x, weights, cuts, pairs

    def __iter__(self):
        edges = [0, *self.cuts, len(self.x)]
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            if self.pairs:
                w = np.ones(b - a) if self.w is None else self.w[a:b]
                yield self.x[a:b], w
            else:
                yield self.x[a:b]


def _data(rng, n_per=150):
    return make_blobs(rng, n_per=n_per, k=3, d=3)


@pytest.mark.parametrize("covariance_type", COV_TYPES)
def test_streamed_fit_equals_in_memory_fit(x64, rng, tmp_path, covariance_type):
    # Property over sources and block sizes: whatever way the rows are cut and read (a
    # .npy path, a memmap view, a block source with weights and uneven blocks, a block
    # size that does not divide N), the streamed fit is the in-memory fit to 1e-10.
    x = _data(rng)
    w = rng.uniform(0.2, 2.0, len(x))
    path = tmp_path / "x.npy"
    np.save(path, x)
    model = gmm.GaussianMixtureModel(covariance_type)
    p0 = model.init(jax.random.PRNGKey(1), x, 3, weights=w)
    ref = jaxem.fit(model, x, p0, weights=w, tol=-1.0, max_iter=12)
    cuts = sorted(rng.choice(np.arange(1, len(x)), size=5, replace=False).tolist())
    sources = [
        (path, w),
        (np.load(path, mmap_mode="r"), w),
        (Chunks(x, w, cuts), None),
    ]
    for source, weights in sources:
        block_rows = int(rng.integers(17, 300))
        got = streamed.fit(model, source, p0, weights=weights, tol=-1.0, max_iter=12,
                           block_rows=block_rows)
        assert int(got.n_iter) == 12
        diff = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                zip(jax.tree_util.tree_leaves(got.params),
                    jax.tree_util.tree_leaves(ref.params), strict=True)]
        assert max(diff) < 1e-10, (type(source), block_rows, diff)
        np.testing.assert_allclose(got.lower_bounds, ref.lower_bounds, rtol=0, atol=1e-10)
    # jaxem.fit dispatches host data to the streamed driver.
    via_fit = jaxem.fit(model, path, p0, weights=w, tol=-1.0, max_iter=12)
    assert tree_allclose(via_fit.params, ref.params, rtol=0, atol=1e-10)


def test_streamed_stopping_rule_and_failure_match_in_memory(x64, rng, tmp_path):
    x = _data(rng)
    model = gmm.GaussianMixtureModel("diag")
    p0 = model.init(jax.random.PRNGKey(0), x, 3)
    ref = jaxem.fit(model, x, p0, tol=1e-3, max_iter=200)
    got = streamed.fit(model, Chunks(x, cuts=[100]), p0, tol=1e-3, max_iter=200,
                       block_rows=128)
    assert bool(got.converged) and int(got.n_iter) == int(ref.n_iter)
    assert float(got.lower_bound) == pytest.approx(float(ref.lower_bound), abs=1e-10)
    none = streamed.fit(model, Chunks(x), p0, max_iter=0)
    assert int(none.n_iter) == 0 and tree_allclose(none.params, p0)


def test_streamed_restarts_equal_in_memory_fit_from_the_same_start(x64, rng):
    x = _data(rng)
    model = gmm.GaussianMixtureModel("full")
    key = jax.random.PRNGKey(3)
    res = jaxem.fit_restarts(model, Chunks(x, cuts=[50, 300]), key, n_components=3,
                             n_init=3, tol=1e-4, max_iter=100)
    starts = streamed.initial_params(model, Chunks(x, cuts=[7]), key, n_components=3,
                                     n_init=3)
    for r in range(3):
        p0 = jax.tree_util.tree_map(lambda a, r=r: a[r], starts)
        ref = jaxem.fit(model, x, p0, tol=1e-4, max_iter=100)
        assert int(res.restarts.n_iter[r]) == int(ref.n_iter)
        assert abs(float(res.restarts.lower_bound[r]) - float(ref.lower_bound)) < 1e-10
    best = int(np.argmax(np.asarray(res.restarts.lower_bound)))
    assert int(res.best_index) == best


def test_subsample_is_uniform_weighted_and_independent_of_block_cuts(rng):
    x = np.arange(20_000, dtype=np.float64).reshape(-1, 2)  # 10,000 rows
    w = np.ones(len(x))
    w[::2] = 0.0  # even rows never chosen
    a, wa = blocks.subsample(blocks.HostData(Chunks(x, w, [3, 4000, 4001])), 500, 7, np.float64)
    b, _ = blocks.subsample(blocks.HostData(x, w), 500, 7, np.float64)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 500 and np.all(wa == 1.0)
    rows = (a[:, 0] / 2).astype(int)
    assert np.all(rows % 2 == 1) and len(np.unique(rows)) == 500  # no replacement
    # Uniform over the odd rows: the mean row index is near the middle.
    assert abs(rows.mean() - 5000) < 4 * 2887 / np.sqrt(500)
    # No more positive rows than m: the data themselves, weights kept.
    c, wc = blocks.subsample(blocks.HostData(x[:50], np.linspace(0, 1, 50)), 500, 1,
                             np.float64)
    assert len(c) == 49 and np.allclose(wc, np.linspace(0, 1, 50)[1:])


def test_memmap_views_are_read_from_their_file_rows(rng, tmp_path):
    x = rng.normal(size=(1000, 4)).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x)
    view = np.load(path, mmap_mode="r")[123:877]
    data = blocks.HostData(view)
    assert data.path is not None  # file reads, not the mapping
    got = np.concatenate([b.x[:b.n_valid] for b in data.blocks(256, np.float32)])
    np.testing.assert_array_equal(got, x[123:877])
    last = list(data.blocks(256, np.float32))[-1]
    assert last.n_valid == 754 - 512 and np.all(last.weights[last.n_valid:] == 0)


def test_host_data_errors_are_clear(rng, tmp_path):
    x = rng.normal(size=(300, 2))
    model = gmm.GaussianMixtureModel("diag")
    p0 = model.init(jax.random.PRNGKey(0), x, 2)
    with pytest.raises(TypeError, match="re-iterable"):
        jaxem.fit(model, (b for b in [x]), p0)
    with pytest.raises(ValueError, match="no such file"):
        jaxem.fit(model, str(tmp_path / "missing.npy"), p0)
    bad = x.copy()
    bad[257, 1] = np.nan
    with pytest.raises(ValueError, match="NaN.*rows 256..299"):
        streamed.fit(model, Chunks(bad, cuts=[256]), p0, block_rows=256)
    with pytest.raises(ValueError, match="3 features, the first had 2"):
        streamed.fit(model, _Two(), p0)
    with pytest.raises(ValueError, match="devices cannot be given"):
        jaxem.fit(model, Chunks(x), p0, devices=[])
    with pytest.raises(ValueError, match="x has 2 features but params have 3"):
        streamed.fit(gmm.GaussianMixtureModel("diag"), Chunks(x),
                     model.init(jax.random.PRNGKey(0), np.ones((5, 3)), 2))


class _Two:
    def __iter__(self):
        yield np.zeros((5, 2))
        yield np.zeros((5, 3))


def test_combine_stats_recentres_exactly(x64, rng):
    # Statistics of one set of rows taken about two shifts, moved to a common one, are
    # the same statistics: combine(a about s1, zero) == the same rows about s2.
    k, d, n = 3, 4, 50
    x = rng.normal(size=(n, d))
    r = rng.dirichlet(np.ones(k), n)
    s1, s2 = rng.normal(size=(k, d)), rng.normal(size=(k, d))

    def stats(shift, cov_type):
        dx = x[None] - shift[:, None]  # (K, N, D)
        if cov_type in ("full", "tied"):
            s2nd = np.einsum("nk,knd,kne->kde", r, dx, dx)
            s2nd = s2nd if cov_type == "full" else s2nd.sum(0)
        else:
            s2nd = np.einsum("nk,knd->kd", r, dx**2)
        return gmm.GMMStats(jnp.asarray(r.sum(0)), jnp.asarray(np.einsum("nk,knd->kd", r, dx)),
                            jnp.asarray(s2nd), jnp.asarray(shift), cov_type)

    for cov_type in COV_TYPES:
        a, b = stats(s1, cov_type), stats(s2, cov_type)
        zero = gmm.GMMStats(b.nk * 0, b.sum_x * 0, b.sum_xx * 0, b.shift, cov_type)
        moved = gmm.combine_stats(a, zero)
        assert tree_allclose(moved, b, rtol=1e-12, atol=1e-9), cov_type
        half = gmm.combine_stats(a, b, 0.25, 0.75)
        assert tree_allclose(half, b, rtol=1e-12, atol=1e-9), cov_type


def test_progress_per_iteration_and_per_block(rng):
    x = _data(rng)
    model = gmm.GaussianMixtureModel("diag")
    p0 = model.init(jax.random.PRNGKey(0), x, 3)
    its, rows = [], []
    streamed.fit(model, Chunks(x, cuts=[100, 200]), p0, tol=-1.0, max_iter=3, block_rows=128,
                 progress=lambda r, i, ll, c: its.append((r, i)),
                 block_progress=lambda i, done, n: rows.append((i, done, n)),
                 block_progress_after=0.0)
    assert its == [(0, 1), (0, 2), (0, 3)]
    assert rows == [(i, done, None) for i in (1, 2, 3) for done in (128, 256, 384, 450)]


@pytest.mark.filterwarnings("ignore:Best performing initialization")
def test_estimator_fits_a_memmap_like_the_array(x64, rng, tmp_path):
    x = _data(rng)
    path = tmp_path / "x.npy"
    np.save(path, x)
    a = jaxem.GaussianMixture(3, random_state=0, tol=1e-6).fit(x)
    b = jaxem.GaussianMixture(3, random_state=0, tol=1e-6).fit(np.load(path, mmap_mode="r"))
    assert b.n_iter_ == a.n_iter_ and abs(b.lower_bound_ - a.lower_bound_) < 1e-10
    np.testing.assert_allclose(b.means_, a.means_, atol=1e-9)
    np.testing.assert_array_equal(b.predict(x), a.predict(x))
    # warm start continues on host data too
    c = jaxem.GaussianMixture(3, random_state=0, warm_start=True, max_iter=2, tol=-1).fit(x)
    d = jaxem.GaussianMixture(3, random_state=0, warm_start=True, max_iter=2, tol=-1).fit(path)
    c.fit(x)
    d.fit(path)
    np.testing.assert_allclose(d.means_, c.means_, atol=1e-9)
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        jaxem.GaussianMixture(500).fit(path)


def test_in_memory_initialisation_uses_a_subsample_beyond_init_rows(x64, rng):
    x = _data(rng, n_per=400)
    model = gmm.GaussianMixtureModel("full")
    key = jax.random.PRNGKey(0)
    full = jaxem.fit_restarts(model, x, key, n_components=3, max_iter=0)
    sub = jaxem.fit_restarts(model, x, key, n_components=3, max_iter=0, init_rows=200)
    same = jaxem.fit_restarts(model, x, key, n_components=3, max_iter=0, init_rows=len(x))
    assert tree_allclose(same.best.params, full.best.params, rtol=0, atol=0)
    assert not tree_allclose(sub.best.params, full.best.params, rtol=1e-6)
    # ... still a sensible start: EM from it reaches the same optimum.
    a = jaxem.fit_restarts(model, x, key, n_components=3, tol=1e-8, max_iter=300)
    b = jaxem.fit_restarts(model, x, key, n_components=3, tol=1e-8, max_iter=300,
                           init_rows=200)
    assert abs(float(a.best.lower_bound) - float(b.best.lower_bound)) < 1e-6


def test_a_model_without_combine_stats_streams_too(x64, rng):
    # The streamed and online drivers need of a model only its additive statistics: the
    # test suite's Poisson mixture (no combine_stats: its statistics are summed leaf by
    # leaf) streams to the in-memory fit, and learns online.
    from test_em import PoissonMixture

    from jaxem import online

    x = np.concatenate([rng.poisson(2.0, size=(300, 2)), rng.poisson(15.0, size=(200, 2))])
    x = x[rng.permutation(len(x))].astype(float)
    model = PoissonMixture()
    p0 = model.init(jax.random.PRNGKey(0), x, 2)
    ref = jaxem.fit(model, x, p0, tol=-1.0, max_iter=15)
    got = jaxem.fit(model, Chunks(x, cuts=[123, 400]), p0, tol=-1.0, max_iter=15)
    assert tree_allclose(got.params, ref.params, rtol=1e-10, atol=1e-12)
    res = online.fit(model, x, p0, batch_rows=50, n_passes=5, kappa=0.7)
    rates = np.sort(np.asarray(res.params[1])[:, 0])
    np.testing.assert_allclose(rates, [2, 15], rtol=0.15)


def test_parallel_readers_deliver_every_block_in_order(rng, tmp_path):
    # A float64 file read for a float32 fit by 3 threads at once: the same blocks, in the
    # same order, as one reader; a value beyond float32 is refused, naming its rows.
    x = rng.normal(size=(1000, 3))
    path = tmp_path / "x.npy"
    np.save(path, x)
    data = blocks.HostData(path)
    one = [b for b, _ in data.device_blocks(128, np.float32, workers=1)]
    three = [(b, np.asarray(xd)) for b, (xd, _) in data.device_blocks(128, np.float32,
                                                                       workers=3)]
    assert [b.start for b in one] == [b.start for b, _ in three] == list(range(0, 1000, 128))
    for a, (b, on_device) in zip(one, three, strict=True):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(on_device, b.x)
    np.testing.assert_array_equal(np.concatenate([b.x[:b.n_valid] for b in one]),
                                  x.astype(np.float32))
    x[700, 2] = 1e39
    np.save(path, x)
    with pytest.raises(ValueError, match="beyond float32's range.*rows 640..767"):
        list(blocks.HostData(path).device_blocks(128, np.float32, workers=3))
    x[700, 2] = np.inf
    np.save(path, x)
    with pytest.raises(ValueError, match="NaN or infinite.*rows 640..767"):
        list(blocks.HostData(path).device_blocks(128, np.float64, workers=2))


class _Vanishing(Chunks):
    """A block source whose third reading fails, as a file on a lost mount would."""

    def __init__(self, x):
        super().__init__(x, cuts=[200])
        self.reads = 0

    def __iter__(self):
        self.reads += 1
        if self.reads == 3:
            raise OSError("the mount went away")
        yield from super().__iter__()


def test_a_pass_that_fails_part_way_keeps_the_finished_iterations(x64, rng):
    x = _data(rng)
    model = gmm.GaussianMixtureModel("diag")
    p0 = model.init(jax.random.PRNGKey(0), x, 3)
    ref = jaxem.fit(model, x, p0, tol=-1.0, max_iter=1)
    with pytest.raises(OSError, match="mount") as info:
        streamed.fit(model, _Vanishing(x), p0, tol=-1.0, max_iter=10)
    # reads: 1 = the feature count, 2 = iteration 1, 3 = iteration 2 fails
    done = info.value.partial_result
    assert int(done.n_iter) == 1 and not bool(done.failed)
    assert tree_allclose(done.params, ref.params, rtol=1e-12, atol=1e-12)


def test_a_truncated_npy_is_refused_before_any_pass(rng, tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, rng.normal(size=(100, 3)))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 24)
    with pytest.raises(ValueError, match="truncated"):
        blocks.HostData(path)
    np.save(path, np.arange(10.0))
    with pytest.raises(ValueError, match="2-D"):
        blocks.HostData(path)
