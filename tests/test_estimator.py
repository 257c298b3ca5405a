"""jaxem.GaussianMixture: scikit-learn's interface, checked number for number against it."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import make_blobs
from helpers import enable_x64

import jaxem
from jaxem import ConvergenceWarning, GaussianMixture

sklearn = pytest.importorskip("sklearn")
from sklearn import datasets  # noqa: E402
from sklearn.mixture import GaussianMixture as SkGaussianMixture  # noqa: E402

COV_TYPES = ["full", "tied", "diag", "spherical"]


def _datasets():
    rng = np.random.default_rng(0)
    return {
        "blobs": make_blobs(rng, n_per=150, k=3, d=3, sep=3.0),
        "iris": datasets.load_iris().data,
        "wine": datasets.load_wine().data,
        "breast_cancer": datasets.load_breast_cancer().data[:, :8],
    }


DATA = _datasets()


def _sklearn_init(x, k, cov_type, seed=0):
    """Initial weights/means/precisions from a one-iteration scikit-learn fit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = SkGaussianMixture(k, covariance_type=cov_type, max_iter=1, random_state=seed).fit(x)
    return dict(weights_init=sk.weights_, means_init=sk.means_, precisions_init=sk.precisions_)


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("name", list(DATA))
def test_float64_matches_sklearn(name, cov_type):
    x = DATA[name]
    init = _sklearn_init(x, 3, cov_type)
    kw = dict(covariance_type=cov_type, tol=1e-6, max_iter=500, reg_covar=1e-6, **init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sklearn.exceptions.ConvergenceWarning)
        sk = SkGaussianMixture(3, **kw).fit(x)
    with enable_x64():
        jm = GaussianMixture(3, **kw).fit(x)
        assert jm.means_.dtype == np.float64
        assert jm.n_iter_ == sk.n_iter_
        assert jm.converged_ == sk.converged_
        np.testing.assert_allclose(jm.lower_bound_, sk.lower_bound_, rtol=1e-6)
        np.testing.assert_allclose(jm.lower_bounds_, sk.lower_bounds_, rtol=1e-6)
        for attr in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
            scale = np.abs(getattr(sk, attr)).max()
            np.testing.assert_allclose(getattr(jm, attr), getattr(sk, attr), rtol=1e-6,
                                       atol=1e-9 * scale, err_msg=attr)
        # Inference on the fitted parameters agrees too.
        np.testing.assert_allclose(jm.score_samples(x), sk.score_samples(x), rtol=1e-6)
        np.testing.assert_allclose(jm.bic(x), sk.bic(x), rtol=1e-6)
        np.testing.assert_allclose(jm.aic(x), sk.aic(x), rtol=1e-6)
        assert np.mean(jm.predict(x) == sk.predict(x)) > 0.99


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("name", ["blobs", "iris", "wine"])
def test_float32_lower_bound_close_to_sklearn_float64(name, cov_type):
    x = DATA[name]
    init = _sklearn_init(x, 3, cov_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = SkGaussianMixture(3, covariance_type=cov_type, tol=0.0, max_iter=30, **init).fit(x)
        jm = GaussianMixture(3, covariance_type=cov_type, tol=-1.0, max_iter=30, **init).fit(x)
    assert jm.means_.dtype == np.float32
    np.testing.assert_allclose(jm.lower_bounds_, sk.lower_bounds_, rtol=1e-4)


def test_default_fit_is_as_good_as_sklearn(rng):
    x = make_blobs(rng, n_per=200, k=4, d=2, sep=3.0)
    sk = SkGaussianMixture(4, n_init=5, random_state=0).fit(x)
    jm = GaussianMixture(4, n_init=5, random_state=0).fit(x)
    assert jm.converged_
    assert jm.lower_bound_ > sk.lower_bound_ - 1e-2
    assert len(jm.fit_result_.restarts.lower_bound) == 5


def test_attributes_and_methods(rng):
    x = make_blobs(rng).astype(np.float32)
    gm = GaussianMixture(3, random_state=0).fit(x)
    assert gm.weights_.shape == (3,) and gm.means_.shape == (3, 2)
    assert gm.covariances_.shape == gm.precisions_.shape == gm.precisions_cholesky_.shape
    np.testing.assert_allclose(gm.covariances_ @ gm.precisions_, np.stack([np.eye(2)] * 3),
                               atol=1e-4)
    assert gm.lower_bounds_.shape == (gm.n_iter_,) and gm.lower_bounds_[-1] == gm.lower_bound_
    proba = gm.predict_proba(x)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(gm.predict(x), proba.argmax(1))
    np.testing.assert_array_equal(gm.fit_predict(x), gm.predict(x))
    np.testing.assert_allclose(gm.score(x), gm.score_samples(x).mean(), rtol=1e-6)
    xs, ys = gm.sample(500)
    assert xs.shape == (500, 2) and ys.shape == (500,) and np.all(np.diff(ys) >= 0)
    assert isinstance(gm.params_, jaxem.GMMParams)
    assert gm.get_params()["n_components"] == 3
    assert gm.set_params(n_components=2).n_components == 2


def test_sample_weight_equals_repeated_rows(rng):
    x = make_blobs(rng, n_per=40)
    counts = rng.integers(1, 4, size=len(x))
    init = _sklearn_init(x, 3, "full")
    with enable_x64():
        a = GaussianMixture(3, tol=1e-8, **init).fit(x, sample_weight=counts.astype(float))
        b = GaussianMixture(3, tol=1e-8, **init).fit(np.repeat(x, counts, axis=0))
    assert a.means_.dtype == np.float64
    assert a.n_iter_ == b.n_iter_
    np.testing.assert_allclose(a.means_, b.means_, rtol=1e-8)
    np.testing.assert_allclose(a.covariances_, b.covariances_, rtol=1e-8)


def test_warm_start_continues_the_same_run(rng):
    # Two warm calls of 3 iterations are one run of 6: the same parameters and bounds. A warm
    # start that re-initialised (or ignored warm_start) would start again from k-means.
    x = make_blobs(rng)
    with enable_x64():
        one = GaussianMixture(3, max_iter=6, tol=-1.0, random_state=0)
        with pytest.warns(ConvergenceWarning):
            one.fit(x)
        warm = GaussianMixture(3, max_iter=3, tol=-1.0, warm_start=True, random_state=0)
        with pytest.warns(ConvergenceWarning):
            warm.fit(x)
        first = warm.lower_bounds_.copy()
        with pytest.warns(ConvergenceWarning):
            warm.fit(x)
    np.testing.assert_allclose(np.concatenate([first, warm.lower_bounds_]), one.lower_bounds_,
                               rtol=1e-12)
    np.testing.assert_allclose(warm.means_, one.means_, rtol=1e-12)
    np.testing.assert_allclose(warm.covariances_, one.covariances_, rtol=1e-12)


def test_warm_start_detects_convergence_across_calls(rng):
    # scikit-learn's contract: fit(max_iter=1) repeated with warm_start eventually converges,
    # because each call's change is measured from the previous call's lower bound.
    x = make_blobs(rng)
    gm = GaussianMixture(3, max_iter=1, warm_start=True, random_state=0)
    bounds = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(100):
            gm.fit(x)
            bounds.append(gm.lower_bound_)
            if gm.converged_:
                break
    assert gm.converged_ and 2 < len(bounds) < 100
    assert abs(bounds[-1] - bounds[-2]) < gm.tol  # converged on the change across calls
    assert np.all(np.diff(bounds) > -1e-5 * np.abs(bounds[1:]))  # one continued ascent


def test_warm_start_with_other_width_raises_and_changed_shape_starts_cold(rng):
    x = make_blobs(rng)
    gm = GaussianMixture(3, warm_start=True, random_state=0).fit(x)
    with pytest.raises(ValueError, match="X has 3 features, but warm_start=True continues"):
        gm.fit(np.column_stack([x, x[:, :1]]))
    # A changed n_components or covariance_type cannot continue the old parameters: the fit
    # starts cold and every attribute has the new shapes.
    gm.set_params(n_components=2).fit(x)
    assert gm.means_.shape == (2, 2) and gm.covariances_.shape == (2, 2, 2)
    gm.set_params(covariance_type="diag").fit(x)
    assert gm.covariances_.shape == (2, 2) and gm.precisions_cholesky_.shape == (2, 2)


def test_sklearn_exception_classes_are_raised(rng):
    from sklearn.exceptions import ConvergenceWarning as SkConvergenceWarning
    from sklearn.exceptions import NotFittedError as SkNotFittedError

    try:
        GaussianMixture(2).predict(rng.normal(size=(5, 2)))
    except SkNotFittedError as e:
        assert isinstance(e, jaxem.estimator.NotFittedError) and isinstance(e, AttributeError)
    else:
        raise AssertionError("predict before fit must raise NotFittedError")
    with pytest.warns(SkConvergenceWarning):
        GaussianMixture(3, max_iter=1, random_state=0).fit(make_blobs(rng))


from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402


@parametrize_with_checks([GaussianMixture(n_components=2, max_iter=20, random_state=0)])
def test_sklearn_estimator_checks(estimator, check):
    # scikit-learn's own contract for estimators, every check, in float64 as scikit-learn.
    with enable_x64(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


def test_x64_input_selects_float64_only_in_x64_mode(rng):
    x = make_blobs(rng)
    assert GaussianMixture(2, random_state=0).fit(x).means_.dtype == np.float32
    with enable_x64():
        assert GaussianMixture(2, random_state=0).fit(x).means_.dtype == np.float64
        gm32 = GaussianMixture(2, random_state=0).fit(x.astype(np.float32))
        assert gm32.means_.dtype == np.float32


def test_sklearn_clone_pipeline_gridsearch(rng):
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = rng.permutation(make_blobs(rng, n_per=60, k=3))  # shuffled: folds see every blob
    gm = GaussianMixture(3, covariance_type="diag", reg_covar=1e-4, random_state=1)
    c = clone(gm)
    assert c.get_params() == gm.get_params() and not hasattr(c, "params_")
    pipe = make_pipeline(StandardScaler(), GaussianMixture(3, random_state=0)).fit(x)
    assert pipe.predict(x).shape == (len(x),)
    search = GridSearchCV(GaussianMixture(random_state=0), {"n_components": [1, 3]}, cv=3)
    search.fit(x)
    assert search.best_params_["n_components"] == 3


def test_works_without_sklearn():
    code = (
        "import sys; sys.modules['sklearn'] = None\n"
        "import numpy as np, jaxem\n"
        "x = np.random.default_rng(0).normal(size=(50, 2))\n"
        "gm = jaxem.GaussianMixture(2, random_state=0).fit(x)\n"
        "assert gm.get_params()['n_components'] == 2\n"
        "gm.set_params(n_components=3)\n"
        "assert issubclass(jaxem.ConvergenceWarning, UserWarning)\n"
        "print('ok', gm.n_components)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok 3"


def test_not_converged_warns(rng):
    x = make_blobs(rng)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        GaussianMixture(3, max_iter=1, random_state=0).fit(x)


@pytest.mark.parametrize(
    "params, fit_x, error, match",
    [
        (dict(covariance_type="banana"), None, ValueError, "covariance_type"),
        (dict(init_params="nope"), None, ValueError, "init_params"),
        (dict(n_components=0), None, ValueError, "n_components"),
        (dict(n_components=2.0), None, TypeError, "n_components"),
        (dict(n_components=500), None, ValueError, "n_components"),
        (dict(reg_covar=-1e-3), None, ValueError, "reg_covar"),
        (dict(tol=float("nan")), None, ValueError, "tol"),
        (dict(max_iter=-1), None, ValueError, "max_iter"),
        (dict(n_init=0), None, ValueError, "n_init"),
        (dict(weights_init=[0.5, 0.5]), None, ValueError, "weights_init"),
        (dict(weights_init=[0.5, 0.4, 0.3]), None, ValueError,
         "'weights_init' should be normalized"),
        (dict(means_init=np.zeros((3, 5))), None, ValueError, "means_init"),
        (dict(precisions_init=np.zeros((3, 2, 2))), None, ValueError,
         "'full precision' should be symmetric, positive-definite"),
        (dict(precisions_init=np.ones((2, 2, 2))), None, ValueError, "precisions_init"),
        (dict(covariance_type="diag", precisions_init=-np.ones((3, 2))), None, ValueError,
         "positive"),
        ({}, np.zeros(10), ValueError, "2-D"),
        ({}, np.array([[1.0, np.nan]] * 10), ValueError, "NaN"),
        ({}, np.array([[1.0, np.inf]] * 10), ValueError, "infinite"),
        ({}, np.array([["a", "b"]] * 10), TypeError, "numeric"),
        ({}, np.zeros((2, 2)), ValueError, "n_samples >= n_components"),
    ],
)
def test_bad_input_raises_clear_error(rng, params, fit_x, error, match):
    x = rng.normal(size=(20, 2)) if fit_x is None else fit_x
    kw = dict(n_components=3)
    kw.update(params)
    with pytest.raises(error, match=match):
        GaussianMixture(**kw).fit(x)


@pytest.mark.parametrize(
    "weights, match",
    [(-np.ones(20), "non-negative"), (np.ones(5), "shape"), (np.full(20, np.nan), "NaN"),
     (np.zeros(20), "all zero")],
)
def test_bad_sample_weight(rng, weights, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(2).fit(rng.normal(size=(20, 2)), sample_weight=weights)


def test_predict_before_fit_and_wrong_width(rng):
    with pytest.raises(ValueError, match="not fitted"):
        GaussianMixture(2).predict(rng.normal(size=(5, 2)))
    gm = GaussianMixture(2, random_state=0).fit(rng.normal(size=(30, 2)))
    with pytest.raises(ValueError, match="X has 3 features, but GaussianMixture is expecting 2"):
        gm.predict(rng.normal(size=(5, 3)))


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_degenerate_data_stays_finite(rng, cov_type):
    dup = np.repeat(rng.normal(size=(3, 2)) * 5, 20, axis=0)
    const = np.column_stack([rng.normal(size=60), np.full(60, 7.0)])
    for x in (dup, const):
        # float32 with the default reg_covar: converges, no warning (the second moments
        # are centred so that a collapsed component carries ~eps² rounding, not eps·|x|²).
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            gm = GaussianMixture(3, covariance_type=cov_type, random_state=0).fit(x)
        assert gm.converged_
        for attr in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
            assert np.all(np.isfinite(getattr(gm, attr))), attr
        assert np.isfinite(gm.score(x))


def test_component_losing_all_samples_is_finite(rng):
    x = rng.normal(size=(100, 2))
    means = np.array([[0.0, 0.0], [0.5, 0.5], [1e3, 1e3]])
    gm = GaussianMixture(3, means_init=means, random_state=0).fit(x)
    assert gm.weights_[2] < 1e-5 and np.all(np.isfinite(gm.covariances_))


def test_singular_start_without_reg_covar_is_reported(rng):
    const = np.column_stack([rng.normal(size=60), np.full(60, 7.0)])
    with pytest.raises(ValueError, match="reg_covar"):
        GaussianMixture(2, reg_covar=0.0, random_state=0).fit(const)


def test_behaves_as_sklearn_where_its_users_rely_on_it(rng):
    # Facts from scikit-learn's own mixture tests, checked on jaxem with our data.
    from sklearn.exceptions import NotFittedError as SkNotFittedError

    x = make_blobs(rng, n_per=50, k=2, d=2)
    gm = GaussianMixture(2, random_state=0)
    for method in ("score", "score_samples", "predict", "predict_proba"):
        with pytest.raises(SkNotFittedError, match="This GaussianMixture instance is not "
                           "fitted yet. Call 'fit' with appropriate arguments"):
            getattr(gm, method)(x)
    with pytest.raises(SkNotFittedError):
        gm.sample(0)  # not fitted is said before the bad n_samples
    gm.fit(x)
    with pytest.raises(ValueError, match="Invalid value for 'n_samples'"):
        gm.sample(0)
    # max_iter=0 hands back the initialisation
    means = [[20.0, 30.0], [30.0, 25.0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        zero = GaussianMixture(2, means_init=means, max_iter=0, random_state=0).fit(x)
    np.testing.assert_allclose(zero.means_, means)
    # one component on three samples fits and samples
    one = GaussianMixture(1).fit(rng.normal(size=(3, 2)))
    assert one.sample()[0].shape == (1, 2)
    # fitted precisions are the inverse covariances, for every type
    for cov_type in COV_TYPES:
        g = GaussianMixture(2, covariance_type=cov_type, random_state=0).fit(x)
        cov, prec = g.covariances_, g.precisions_
        if cov_type in ("full", "tied"):
            np.testing.assert_allclose(prec, np.linalg.inv(cov), rtol=1e-3, atol=1e-6)
        else:
            np.testing.assert_allclose(prec, 1.0 / cov, rtol=1e-5)
    # a longer fit scores higher than one iteration from the same (poor) start
    kw = dict(reg_covar=0, means_init=x[:2], random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        short = GaussianMixture(2, max_iter=1, **kw).fit(x)
        long = GaussianMixture(2, max_iter=300, **kw).fit(x)
    assert long.score(x) > short.score(x) + 1e-3
