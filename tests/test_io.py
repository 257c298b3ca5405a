"""Save/load: round trips predict exactly; every kind of bad file is refused clearly."""

import numpy as np
import pytest
from conftest import make_blobs
from helpers import random_params, tree_allclose

import jaxem
from jaxem import io

COV_TYPES = ["full", "tied", "diag", "spherical"]


@pytest.fixture(scope="module")
def fitted():
    x = make_blobs(np.random.default_rng(0), n_per=60, k=3, d=3)
    return x, {ct: jaxem.GaussianMixture(3, covariance_type=ct, random_state=0).fit(x)
               for ct in COV_TYPES}


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_round_trip_predicts_exactly(tmp_path, fitted, cov_type):
    x, models = fitted
    gm = models[cov_type]
    path = gm.save(tmp_path / "model")
    assert path.name == "model.npz" and path.exists()
    loaded = jaxem.GaussianMixture.load(path)
    np.testing.assert_array_equal(loaded.predict(x), gm.predict(x))
    np.testing.assert_array_equal(loaded.predict_proba(x), gm.predict_proba(x))
    np.testing.assert_array_equal(loaded.score_samples(x), gm.score_samples(x))
    for attr in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
        np.testing.assert_array_equal(getattr(loaded, attr), getattr(gm, attr))
    assert (loaded.converged_, loaded.n_iter_, loaded.lower_bound_) == (
        gm.converged_, gm.n_iter_, gm.lower_bound_)
    assert loaded.covariance_type == cov_type and loaded.n_components == 3
    # the functional API reads the same file
    assert tree_allclose(jaxem.load(path), gm.params_, rtol=0)
    path2 = jaxem.save(tmp_path / "params.npz", gm.params_)
    assert tree_allclose(jaxem.load(path2), gm.params_, rtol=0)


def _arrays(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _tamper(tmp_path, source, name, change):
    arrays = _arrays(source)
    change(arrays)
    out = tmp_path / f"bad_{name}.npz"
    np.savez(out, **arrays)
    return out


def _set(key, value):
    return lambda a: a.__setitem__(key, value)


BAD = {
    "format": (_set("format", np.array("something-else")), "not a jaxem model"),
    "version": (_set("format_version", np.array(99)), "format version 99"),
    "missing": (lambda a: a.pop("means"), "missing array"),
    "extra": (_set("payload", np.zeros(3)), "unexpected array"),
    "cov_type": (_set("covariance_type", np.array("banana")), "unknown covariance_type"),
    "shape": (lambda a: a.__setitem__("means", a["means"][:, :2]), "shape"),
    "weights": (lambda a: a.__setitem__("weights", a["weights"] * 1.5), "sum to 1"),
    "nan": (lambda a: a["means"].__setitem__((0, 0), np.nan), "NaN"),
    "dtype": (lambda a: a.__setitem__("weights", a["weights"].astype(np.int64)), "dtype"),
    "not_pd": (lambda a: a["precisions_cholesky"].__setitem__((0, 0, 0), -1.0),
               "positive diagonal"),
    "mismatch": (lambda a: a.__setitem__("covariances", a["covariances"] * 1.05),
                 "does not match"),
    "scalar": (_set("n_iter", np.array([1, 2])), "n_iter must be a scalar"),
    "settings_json": (_set("settings", np.array("{n_init: 3")), "settings are not valid JSON"),
    "settings_kind": (_set("settings", np.array('{"n_init": [1, 2]}')),
                      "settings must be a JSON object of numbers"),
    "settings_list": (_set("settings", np.array('["n_init"]')), "settings must be a JSON"),
    "settings_array": (_set("settings", np.array(["{}", "{}"])), "settings must be one string"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_tampered_files_are_refused(tmp_path, fitted, kind):
    _, models = fitted
    good = models["full"].save(tmp_path / "good.npz")
    change, message = BAD[kind]
    bad = _tamper(tmp_path, good, kind, change)
    with pytest.raises(jaxem.ModelFileError, match=message):
        jaxem.load(bad)
    assert isinstance(jaxem.ModelFileError("x"), ValueError)


@pytest.mark.parametrize("cov_type", ["diag", "spherical"])
def test_non_positive_variances_are_refused(tmp_path, fitted, cov_type):
    good = fitted[1][cov_type].save(tmp_path / "good.npz")
    bad = _tamper(tmp_path, good, "neg", lambda a: a["covariances"].__setitem__(0, -1.0))
    with pytest.raises(jaxem.ModelFileError, match="positive"):
        jaxem.load(bad)


def test_unreadable_truncated_and_pickled_files(tmp_path, fitted):
    good = fitted[1]["full"].save(tmp_path / "good.npz")
    with pytest.raises(FileNotFoundError, match="no model file"):
        jaxem.load(tmp_path / "absent.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip file")
    with pytest.raises(jaxem.ModelFileError, match="not a readable"):
        jaxem.load(junk)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(jaxem.ModelFileError):
        jaxem.load(truncated)
    arrays = _arrays(good)
    arrays["means"] = np.array([object()] * 3, dtype=object)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **arrays)  # an object array: needs pickle to read
    with pytest.raises(jaxem.ModelFileError, match="means has dtype object"):
        jaxem.load(pickled)


def test_a_crash_while_writing_leaves_the_old_file_intact(tmp_path, fitted, monkeypatch):
    path = fitted[1]["full"].save(tmp_path / "model.npz")
    before = path.read_bytes()

    def crash(f, **arrays):
        f.write(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(io.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        fitted[1]["diag"].save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary left behind


def test_a_loaded_model_keeps_how_it_was_fitted(tmp_path):
    from sklearn.base import clone

    x = make_blobs(np.random.default_rng(3), n_per=50, k=3, d=2)
    gm = jaxem.GaussianMixture(3, covariance_type="diag", n_init=3, random_state=42,
                               max_iter=40, tol=1e-4, reg_covar=1e-5, init_params="random",
                               means_init=None).fit(x)
    loaded = jaxem.GaussianMixture.load(gm.save(tmp_path / "m.npz"))
    assert loaded.get_params() == gm.get_params()
    assert repr(loaded) == repr(gm)
    # a refit of the loaded (or cloned) estimator repeats the fit
    refit = clone(loaded).fit(x)
    np.testing.assert_array_equal(refit.means_, gm.means_)
    # arrays and RandomState objects are not stored: their defaults come back
    means = gm.means_
    gm2 = jaxem.GaussianMixture(3, means_init=means, random_state=np.random.RandomState(0),
                                n_init=2).fit(x)
    loaded2 = jaxem.GaussianMixture.load(gm2.save(tmp_path / "m2.npz"))
    assert loaded2.means_init is None and loaded2.random_state is None
    assert loaded2.n_init == 2
    # files written before settings were stored still load, as the bare K and type
    arrays = _arrays(tmp_path / "m.npz")
    del arrays["settings"]
    arrays["format_version"] = np.array(2)
    np.savez(tmp_path / "v2.npz", **arrays)
    old = jaxem.GaussianMixture.load(tmp_path / "v2.npz")
    assert (old.n_components, old.covariance_type, old.n_init) == (3, "diag", 1)
    # the settings cannot contradict the parameters: K and type come from the arrays
    arrays = _arrays(tmp_path / "m.npz")
    arrays["settings"] = np.array('{"n_components": 7, "covariance_type": "full", "tol": 0.5, '
                                  '"unknown_option": 1}')
    np.savez(tmp_path / "odd.npz", **arrays)
    odd = jaxem.GaussianMixture.load(tmp_path / "odd.npz")
    assert (odd.n_components, odd.covariance_type, odd.tol) == (3, "diag", 0.5)


def test_gaussian_mixture_ic_saves_the_chosen_models_settings(tmp_path):
    x = make_blobs(np.random.default_rng(4), n_per=50, k=2, d=2)
    ic = jaxem.GaussianMixtureIC((1, 2, 3), covariance_type=("full", "diag"), n_init=2,
                                 random_state=5, max_iter=60).fit(x)
    loaded = jaxem.GaussianMixtureIC.load(ic.save(tmp_path / "ic.npz"))
    assert type(loaded) is jaxem.GaussianMixture
    assert (loaded.n_components, loaded.covariance_type) == (ic.n_components_,
                                                             ic.covariance_type_)
    assert (loaded.n_init, loaded.random_state, loaded.max_iter, loaded.init_params) == (
        2, 5, 60, "k-means++")
    # which reproduces the chosen cell
    np.testing.assert_allclose(loaded.fit(x).means_, ic.means_, rtol=1e-5, atol=1e-5)


def test_save_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="not fitted"):
        jaxem.GaussianMixture(2).save(tmp_path / "m.npz")
    with pytest.raises(TypeError, match="GMMParams"):
        jaxem.save(tmp_path / "m.npz", {"weights": [1.0]})
    params = jaxem.GaussianMixture(1).fit(np.random.default_rng(0).normal(size=(20, 2))).params_
    with pytest.raises(TypeError, match=r"settings\['means_init'\]"):
        jaxem.save(tmp_path / "m.npz", params, settings={"means_init": np.zeros((1, 2))})
    with pytest.raises(TypeError, match="str keys"):
        jaxem.save(tmp_path / "m.npz", params, settings={1: 2})
    assert not (tmp_path / "m.npz").exists()


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_every_way_of_building_params_saves_and_loads(tmp_path, cov_type):
    # One precision-factor convention everywhere (upper triangular, scikit-learn's fitted
    # precisions_cholesky_): params from covariances, from precisions, from an
    # initialisation given precisions_init, from a fit and from an estimator all save, load
    # and give the same factor as inv(chol(Σ))ᵀ.
    import jax

    from jaxem import gmm
    from jaxem._linalg import precisions_from_cholesky

    rng = np.random.default_rng(1)
    x = make_blobs(rng, n_per=40, k=2, d=3)
    base = random_params(rng, 2, 3, cov_type)
    precisions = np.asarray(precisions_from_cholesky(base.precisions_cholesky, cov_type))
    built = {
        "covariances": gmm.make_params(base.weights, base.means, base.covariances, cov_type),
        "precisions": gmm.make_params(base.weights, base.means, covariance_type=cov_type,
                                      precisions=precisions),
        "init": gmm.init(jax.random.PRNGKey(0), x, 2, cov_type, precisions_init=precisions),
        "fit": jaxem.fit(gmm.GaussianMixtureModel(cov_type), x, base, max_iter=3).params,
    }
    with pytest.warns(jaxem.ConvergenceWarning, match="no EM iteration ran"):
        built["estimator"] = jaxem.GaussianMixture(
            2, covariance_type=cov_type, max_iter=0, precisions_init=precisions,
            random_state=0).fit(x)
    for how, model in built.items():
        path = jaxem.save(tmp_path / f"{how}.npz", model)
        params = model.params_ if how == "estimator" else model
        loaded = jaxem.load(path)
        assert tree_allclose(loaded, params, rtol=0), how
        if cov_type in ("full", "tied"):
            cov = np.asarray(params.covariances, float)
            expected = np.swapaxes(np.linalg.inv(np.linalg.cholesky(cov)), -1, -2)
            np.testing.assert_allclose(np.asarray(params.precisions_cholesky), expected,
                                       rtol=1e-4, atol=1e-5, err_msg=how)
        if how in ("precisions", "init", "estimator"):
            np.testing.assert_allclose(
                precisions_from_cholesky(loaded.precisions_cholesky, cov_type), precisions,
                rtol=1e-4, err_msg=how)
