"""Nothing silent, nothing crashes: the findings of a fuzzing campaign, one test each, and a
fuzz suite of our own (hypothesis, bounded) that asserts the contract on generated input:
a clean error of the promised type and exit status, or a finite result."""

import warnings
import zipfile

import jax
import numpy as np
import pytest
from conftest import make_blobs
from helpers import enable_x64
from hypothesis import HealthCheck, example, given, reject, settings
from hypothesis import strategies as st
from test_cli import run

import jaxem
from jaxem import ConvergenceWarning, GaussianMixture, PrecisionWarning, gmm

FUZZ = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _one_line_error(out, code=2):
    assert out.returncode == code, (out.returncode, out.stdout[-500:], out.stderr[-1000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in out.stderr
    assert "internal error" not in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def fitted2d():
    x = make_blobs(np.random.default_rng(0), n_per=60, k=2, d=2)
    return x, GaussianMixture(2, random_state=0).fit(x)


def _loads_valid_or_refuses(path):
    """The load contract: a ModelFileError, or parameters that are finite and valid."""
    try:
        params = jaxem.load(path)
    except jaxem.ModelFileError:
        return
    assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(params))
    assert abs(float(np.sum(params.weights)) - 1.0) < 1e-4


# ------------------------------------------------------------------ 1. huge sample requests
def test_a_huge_sample_is_refused_not_a_crash(fitted2d, tmp_path):
    _, gm = fitted2d
    for n in (5 * 10**9, 10**9):
        with pytest.raises(ValueError, match="draw in batches"):
            gm.sample(n)
    path = gm.save(tmp_path / "m.npz")
    line = _one_line_error(run("sample", path, "-n", "10000000000"))
    assert "draw in batches" in line


# ------------------------------------------- 2. a float64 model stays float64, end to end
def test_a_float64_model_keeps_its_precision_through_save_load_and_predict(tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(300, 2)) * 0.05 + 1e6,
                        rng.normal(size=(300, 2)) * 0.05 + 1e6 + 0.1])
    with enable_x64():
        gm = GaussianMixture(2, random_state=0).fit(x)
        labels, proba = gm.predict(x), gm.predict_proba(x)
    assert gm.means_.dtype == np.float64
    path = gm.save(tmp_path / "m.npz")
    loaded = GaussianMixture.load(path)  # x64 is off here
    assert not jax.config.jax_enable_x64 and loaded.means_.dtype == np.float64
    np.testing.assert_array_equal(loaded.predict(x), labels)
    np.testing.assert_allclose(loaded.predict_proba(x), proba, rtol=1e-9, atol=1e-12)
    assert loaded.score_samples(x).dtype == np.float64
    # the command: fit --float64, then predict without it
    csv = tmp_path / "off.csv"
    np.savetxt(csv, x, delimiter=",", fmt="%.17g")
    assert run("fit", csv, "-k", "2", "--float64", "--quiet", "--out",
               tmp_path / "c.npz").returncode == 0
    out = run("predict", tmp_path / "c.npz", csv)
    cli_labels = np.array(out.stdout.split(), int)
    with enable_x64():
        reference = GaussianMixture.load(tmp_path / "c.npz")
        np.testing.assert_array_equal(cli_labels, reference.predict(x))


# ----------------------------------------------------- 3. far points: finite, or a clear error
def test_far_points_get_the_nearest_components_responsibility(fitted2d):
    _, gm = fitted2d
    far = np.array([[1e20, 1e20], [3e19, 3e19], [-3e19, 1e19]])
    proba = gm.predict_proba(far)
    assert np.all(np.isfinite(proba)) and np.allclose(proba.sum(1), 1.0)
    scores = gm.score_samples(far)
    assert np.all(np.isfinite(scores)) and np.all(scores < -1e30)
    # the nearest component in the model's metric (Mahalanobis, float64 by hand)
    prec = gm.precisions_.astype(np.float64)
    d2 = np.stack([np.einsum("nd,de,ne->n", far - m, p, far - m)
                   for m, p in zip(gm.means_.astype(np.float64), prec, strict=True)], 1)
    np.testing.assert_array_equal(gm.predict(far), np.argmin(d2, axis=1))
    with pytest.raises(ValueError, match="too far from every component"):
        gm.predict([[1e300, 1e300]])



def test_responsibilities_sum_to_one_where_the_log_density_is_coarse():
    """Between two tight components, |log p(x)| ~ 1e7, where float32 resolves it only to
    ~1: the responsibilities are taken relative to each row's largest log-joint
    (``log_softmax``), so every row still sums to one and matches the softmax of its own
    log-joint (``lj − log p(x)`` summed to up to 1.135 here)."""
    x = np.repeat([[0.0], [9.0]], 50, axis=0)
    gm = GaussianMixture(2, covariance_type="spherical", random_state=0).fit(x)
    assert np.asarray(gm.covariances_).max() < 2e-6  # the regularisation alone
    mid = np.float32(4.5)
    q = (mid + np.arange(-24, 25, dtype=np.float32) * np.spacing(mid))[:, None]
    lj, log_px, log_r = gm._densities(q)
    assert np.abs(log_px).min() > 1e6  # coarse: ulp(log p) >= 0.125
    proba = gm.predict_proba(q)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    lj64 = lj.astype(np.float64)
    oracle = np.exp(lj64 - np.logaddexp.reduce(lj64, axis=1, keepdims=True))
    np.testing.assert_allclose(proba, oracle, atol=1e-6)
    assert np.any(oracle.min(axis=1) > 0.01)  # some rows are genuinely shared



@settings(max_examples=60, deadline=None)
@given(start=st.floats(-1e6, 1e6), steps=st.lists(st.floats(0.0, 1.0), min_size=1,
                                                  max_size=30),
       tol=st.sampled_from([0.0, 1e-6, 1e-3]), where=st.integers(0, 29),
       drop=st.floats(1.5, 100.0))
def test_a_decreasing_log_likelihood_is_found_beyond_rounding(start, steps, tol, where, drop):
    """``log_likelihood_drop``: nothing in a history that never decreases (rounding-sized
    dips included), and a decrease beyond both ``tol`` and DROP_RTOL of the history's size
    found at its iteration (counted from 1)."""
    from jaxem.estimator import DROP_RTOL, log_likelihood_drop

    rng = np.random.default_rng(len(steps))
    history = start + np.cumsum(np.asarray(steps) * max(1.0, abs(start)) * 1e-3)
    dips = rng.uniform(0, 0.1, len(history)) * DROP_RTOL * np.max(np.abs(history))
    assert log_likelihood_drop(history - dips * (len(history) > 1), tol) is None
    if len(history) < 2:
        return
    j = 1 + where % (len(history) - 1)  # the step into entry j goes down
    bound = max(tol, DROP_RTOL * np.max(np.abs(history)))
    dropped = history.copy()
    dropped[j:] -= (history[j] - history[j - 1]) + drop * bound
    found = log_likelihood_drop(dropped, tol)
    assert found is not None and found[1] == j + 1
    assert found[0] == pytest.approx(drop * bound, rel=1e-3, abs=1e-6 * bound)


def test_a_fit_whose_log_likelihood_decreased_warns_of_its_precision():
    """Seen by fuzzing: float32 data at 1e4 with unit spread, a component collapsed onto one
    sample (variance reg_covar, σ = 1e-3 = the data's resolution) — the log-likelihood went
    −0.9508 → −0.9544 and the fit stopped by a rule it cannot keep. The estimator says so."""
    gm = GaussianMixture(2)
    history = np.full(128, np.nan, np.float32)
    history[:5] = [-0.976, -0.958, -0.9508, -0.9544, -0.9540]
    params = gmm.make_params(np.array([0.5, 0.5]), np.array([[0.0], [1.0]]),
                             np.array([[[1.0]], [[1.0]]]), "full")
    fit = jaxem.FitResult(params, np.float32(-0.9540), history, np.int32(5), np.bool_(True),
                          np.bool_(False))
    with pytest.warns(PrecisionWarning, match=r"decreased by 0.0036 at iteration 4"):
        gm._set_fitted(fit, 1)
    history[3:5] = [-0.95085, -0.9508]  # a dip within tol (1e-3): no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm._set_fitted(fit._replace(lower_bounds=history), 1)


# --------------------------------------------------------------------- 4. byte-order marks
@pytest.mark.parametrize("header", [False, True])
def test_a_csv_with_a_byte_order_mark_keeps_every_row_and_its_names(tmp_path, header):
    x = np.random.default_rng(0).normal(size=(120, 2))
    text = ("a,b\n" if header else "") + "\n".join(f"{float(u)!r},{float(v)!r}" for u, v in x)
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    from jaxem.cli import load_data

    data, names = load_data(path, with_names=True)
    assert data.shape == (120, 2) and names == (["a", "b"] if header else None)
    np.testing.assert_allclose(data, x)
    if header:
        np.testing.assert_allclose(load_data(path, "a"), x[:, :1])
    latin = tmp_path / "latin.csv"
    latin.write_bytes("caf\xe9,b\n1,2\n".encode("latin-1"))
    line = _one_line_error(run("fit", latin))
    assert "latin.csv" in line and "UTF-8" in line


# ------------------------------------------------------- 5. small inputs, huge allocations
def test_model_members_are_checked_before_they_are_read(tmp_path, fitted2d):
    _, gm = fitted2d
    good = gm.save(tmp_path / "good.npz")
    # an extra member, deflated from 200 MB of zeros to ~200 kB: refused by its name
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
        with zout.open("payload.npy", "w") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f8", "fortran_order": False, "shape": (25_000_000,)})
            chunk = bytes(2**20)
            for _ in range(200):
                f.write(chunk)
    assert bomb.stat().st_size < 2e6
    with pytest.raises(jaxem.ModelFileError, match="unexpected array"):
        jaxem.load(bomb)
    # a known member declaring an enormous shape: refused from its header
    huge = tmp_path / "huge.npz"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(huge, "w") as zout:
        for info in zin.infolist():
            if info.filename == "means.npy":
                with zout.open("means.npy", "w") as f:
                    np.lib.format.write_array_header_1_0(
                        f, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)})
            else:
                zout.writestr(info, zin.read(info))
    with pytest.raises(jaxem.ModelFileError, match="too large"):
        jaxem.load(huge)


def test_data_files_and_ranges_declaring_too_much_are_refused_first(tmp_path):
    npy = tmp_path / "big.npy"
    with open(npy, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f8", "fortran_order": False, "shape": (10**11, 2)})
        f.write(bytes(64))
    line = _one_line_error(run("fit", npy))
    assert "big.npy" in line and "declares shape" in line
    csv = tmp_path / "x.csv"
    np.savetxt(csv, np.random.default_rng(0).normal(size=(30, 2)), delimiter=",")
    for spec in ("1:1000000000", "1:30000000"):
        line = _one_line_error(run("select", csv, "--k", spec))
        assert "larger than the number of samples (30)" in line
    assert "the range is empty (5 > 1)" in _one_line_error(run("select", csv, "--k", "5:1"))


# --------------------------------------------------------------- 6. every bad file, one error
def test_damaged_model_files_raise_model_file_error_only(tmp_path, fitted2d):
    _, gm = fitted2d
    raw = gm.save(tmp_path / "good.npz").read_bytes()
    rng = np.random.default_rng(0)
    for i in range(200):
        data = bytearray(raw)
        for pos in rng.integers(0, len(data), size=rng.integers(1, 4)):
            data[pos] ^= int(rng.integers(1, 256))
        path = tmp_path / f"flip{i}.npz"
        path.write_bytes(bytes(data))
        _loads_valid_or_refuses(path)
    for name, change in (("zero_d", lambda a: a.update(
            means=np.zeros((2, 0)), covariances=np.zeros((2, 0, 0)),
            precisions_cholesky=np.zeros((2, 0, 0)))),):
        bad = dict(np.load(tmp_path / "good.npz"))
        change(bad)
        np.savez(tmp_path / f"{name}.npz", **bad)
        with pytest.raises(jaxem.ModelFileError):
            jaxem.load(tmp_path / f"{name}.npz")
    with zipfile.ZipFile(tmp_path / "good.npz") as zin, \
            zipfile.ZipFile(tmp_path / "junk_member.npz", "w") as zout:
        for info in zin.infolist():
            body = b"\x00junk" if info.filename == "weights.npy" else zin.read(info)
            zout.writestr(info, body)
    with pytest.raises(jaxem.ModelFileError):
        jaxem.load(tmp_path / "junk_member.npz")


# --------------------------------------------- 7. a tampered precision is caught, any scale
def test_a_tampered_precision_is_caught_on_an_ill_scaled_covariance(tmp_path):
    p = gmm.make_params(np.array([0.5, 0.5]), np.zeros((2, 2)),
                        np.stack([np.diag([1e8, 1e-8]), np.eye(2)]), "full")
    path = jaxem.save(tmp_path / "m.npz", p)
    jaxem.load(path)  # the untouched file loads
    arrays = dict(np.load(path))
    arrays["precisions_cholesky"][0, 0, 0] *= 5
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(jaxem.ModelFileError, match="does not match"):
        jaxem.load(tmp_path / "bad.npz")


# ------------------------------------------------------------------ 8. exit status and seeds
def test_bad_files_and_seeds_exit_2_and_raise_value_errors(tmp_path):
    junk = tmp_path / "x.npz"
    junk.write_bytes(np.random.default_rng(0).bytes(300))
    assert "x.npz" in _one_line_error(run("fit", junk))
    csv = tmp_path / "x.csv"
    np.savetxt(csv, np.random.default_rng(0).normal(size=(30, 2)), delimiter=",")
    assert "--seed" in _one_line_error(run("fit", csv, "--seed", str(2**64)))
    for seed in (2**64, np.uint64(2**63), 2**32):
        with pytest.raises(ValueError, match="random_state"):
            GaussianMixture(2, random_state=seed).fit(np.random.default_rng(0).normal(
                size=(30, 2)))


# ------------------------------------------------- 9. every path checked before any work
def test_paths_and_sizes_are_checked_before_any_fit(tmp_path):
    csv = tmp_path / "x.csv"
    np.savetxt(csv, np.random.default_rng(0).normal(size=(30, 2)), delimiter=",")
    for args, where in (
            (("fit", csv, "--out", tmp_path / "nodir" / "sub" / "m.npz"), "nodir"),
            (("fit", csv, "--plot", tmp_path / "nodir" / "p.png"), "nodir"),
            (("select", csv, "--k", "1:2", "--out", tmp_path / "nodir" / "m.npz"), "nodir"),
            (("demo", "--plot", tmp_path / "nodir" / "p.png"), "nodir"),
            (("demo", "--max-k", "273"), "--max-k 273")):
        out = run(*args)
        line = _one_line_error(out)
        assert where in line and ".tmp" not in line
        assert "iter" not in out.stdout and "Fitting" not in out.stdout  # no work was done
    with pytest.raises(FileNotFoundError, match="no such folder"):
        jaxem.save(tmp_path / "nodir" / "m.npz", GaussianMixture(1).fit(np.ones((3, 1)) *
                                                                         [[1.0], [2], [3]]))


# ---------------------------------------------------------------------------- 10. max_iter=0
def test_max_iter_zero_reports_the_initial_bound(fitted2d):
    x, _ = fitted2d
    with pytest.warns(ConvergenceWarning, match="no EM iteration ran"):
        gm = GaussianMixture(2, max_iter=0, random_state=0).fit(x)
    assert np.isfinite(gm.lower_bound_) and gm.n_iter_ == 0
    np.testing.assert_allclose(gm.lower_bound_, gm.score(x), rtol=1e-5)
    out = run("fit", _csv_of(x, "mi0"), "-k", "2", "--max-iter", "0", "--quiet")
    assert out.returncode == 0 and "-inf" not in out.stdout
    assert "no EM iteration ran" in out.stderr


def _csv_of(x, name):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / f"{name}.csv"
    np.savetxt(path, x, delimiter=",", fmt="%.17g")
    return path


# ------------------------------------------------------ 11. float64 data rounded to float32
def test_float64_data_that_float32_cannot_resolve_warn():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(200, 2)) * 0.05 + 1e6,
                        rng.normal(size=(200, 2)) * 0.05 + 1e6 + 0.1])
    with pytest.warns(PrecisionWarning, match="jax_enable_x64"):
        GaussianMixture(2, random_state=0).fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        GaussianMixture(2, random_state=0).fit(rng.normal(size=(200, 2)) + 100)
    # Weighted, the same data once failed at initialisation (a float32 weighted mean at 1e6,
    # computed twice by XLA in different orders): the reference point is now a sample.
    with pytest.warns(PrecisionWarning):
        gm = GaussianMixture(2, random_state=0).fit(x, sample_weight=np.ones(len(x)))
    assert np.all(np.isfinite(gm.covariances_)) and gm.n_iter_ > 0


# ---------------------------------------------------------------------- 13. honest messages
def test_overflow_is_named_as_such(tmp_path, fitted2d):
    with pytest.raises(ValueError, match="beyond the float32 range"):
        GaussianMixture(2).fit(np.full((20, 2), 1e308))
    with pytest.raises(ValueError, match="overflow float32"):
        GaussianMixture(2).fit(np.random.default_rng(0).normal(size=(20, 2)) * 1e20)
    with pytest.raises(ValueError, match="overflows float32"):
        GaussianMixture(2, reg_covar=1e39).fit(np.random.default_rng(0).normal(size=(20, 2)))
    csv = _csv_of(np.random.default_rng(0).normal(size=(20, 2)), "ok")
    assert "overflows float32" in _one_line_error(run("fit", csv, "--reg-covar", "1e39"))
    big = _csv_of(np.full((20, 2), 1e308), "big")
    assert "float32 range" in _one_line_error(run("fit", big))
    # predict on such data: the answer, no stray RuntimeWarning (the suite makes them errors)
    _, gm = fitted2d
    with pytest.raises(ValueError, match="too far"):
        gm.predict(np.full((3, 2), 1e308))


# -------------------------------------------------------------------- 15. feature names
def test_feature_names_are_kept_and_checked_end_to_end(tmp_path):
    pd = pytest.importorskip("pandas")
    x = make_blobs(np.random.default_rng(1), n_per=50, k=2, d=3)
    frame = pd.DataFrame(x, columns=["a", "b", "c"])
    gm = GaussianMixture(2, random_state=0).fit(frame)
    np.testing.assert_array_equal(gm.feature_names_in_, ["a", "b", "c"])
    with pytest.raises(ValueError, match="feature names should match"):
        gm.predict(frame[["c", "b", "a"]])
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        gm.predict(x)
    loaded = GaussianMixture.load(gm.save(tmp_path / "m.npz"))
    np.testing.assert_array_equal(loaded.feature_names_in_, ["a", "b", "c"])
    np.testing.assert_array_equal(loaded.predict(frame), gm.predict(frame))
    # the command: predict matches columns by header name, and refuses a missing one
    frame.to_csv(tmp_path / "fit.csv", index=False)
    assert run("fit", tmp_path / "fit.csv", "-k", "2", "--quiet", "--out",
               tmp_path / "c.npz").returncode == 0
    frame[["c", "a", "b"]].to_csv(tmp_path / "reordered.csv", index=False)
    same = run("predict", tmp_path / "c.npz", tmp_path / "fit.csv").stdout
    assert run("predict", tmp_path / "c.npz", tmp_path / "reordered.csv").stdout == same
    frame[["a", "b"]].assign(d=1.0).to_csv(tmp_path / "other.csv", index=False)
    assert "lacks the column(s) ['c']" in _one_line_error(
        run("predict", tmp_path / "c.npz", tmp_path / "other.csv"))


# ------------------------------------------------------------- 16. column ranges and --drop
def test_columns_by_range_and_drop(tmp_path):
    from jaxem.cli import load_data

    x = np.random.default_rng(0).normal(size=(10, 5))
    path = tmp_path / "w.csv"
    np.savetxt(path, x, delimiter=",", header="a,b,c,d,target", comments="")
    np.testing.assert_array_equal(load_data(path, "0:4"), x[:, :4])
    np.testing.assert_array_equal(load_data(path, ":2,target"), x[:, [0, 1, 4]])
    np.testing.assert_array_equal(load_data(path, drop="target"), x[:, :4])
    np.testing.assert_array_equal(load_data(path, "1:", drop="c,-1"), x[:, [1, 3]])
    assert "selects no column" in _one_line_error(run("fit", path, "--columns", "7:9"))
    assert "leaves no column" in _one_line_error(run("fit", path, "--drop", "0:5"))


# ===================================================================== the fuzz suite
_VALUE = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                   st.integers(-10**6, 10**6), st.sampled_from(["", "x", "1e", "--", "nan"]))


@FUZZ
@given(rows=st.integers(0, 12), cols=st.integers(1, 3), header=st.booleans(),
       bom=st.booleans(), cells=st.lists(_VALUE, min_size=36, max_size=36),
       extra=st.sampled_from(["", ",", "\n\n", "# comment\n", ",,,\n"]))
def test_fuzz_csv_files_for_the_command(tmp_path_factory, rows, cols, header, bom, cells,
                                        extra):
    lines = [",".join(f"h{j}" for j in range(cols))] if header else []
    lines += [",".join(str(cells[(i * cols + j) % 36]) for j in range(cols))
              for i in range(rows)]
    path = tmp_path_factory.mktemp("fuzz") / "d.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + ("\n".join(lines) + extra).encode())
    out = run("fit", path, "-k", "1", "--max-iter", "3", "--quiet")
    if out.returncode == 0:  # a fit: its printed log-likelihood is a number
        ll = float(out.stdout.split("mean log-likelihood ")[1].split(";")[0])
        assert np.isfinite(ll)
    else:
        _one_line_error(out)


@FUZZ
@given(kind=st.sampled_from(["npy", "npz"]), data=st.binary(min_size=0, max_size=400),
       keep_header=st.booleans())
def test_fuzz_binary_data_files_for_the_command(tmp_path_factory, kind, data, keep_header):
    path = tmp_path_factory.mktemp("fuzz") / f"d.{kind}"
    if keep_header and kind == "npy":  # a real header, then arbitrary bytes
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f8", "fortran_order": False, "shape": (len(data) // 16, 2)})
            f.write(data)
    else:
        path.write_bytes(data)
    out = run("fit", path, "-k", "1", "--max-iter", "2", "--quiet")
    if out.returncode != 0:
        _one_line_error(out)


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory):
    x = make_blobs(np.random.default_rng(0), n_per=20, k=2, d=2)
    path = GaussianMixture(2, covariance_type="diag", random_state=0).fit(x).save(
        tmp_path_factory.mktemp("m") / "m.npz")
    return path.read_bytes()


@FUZZ
@given(cut=st.integers(0, 10**6), flips=st.lists(st.tuples(st.integers(0, 10**6),
                                                           st.integers(1, 255)), max_size=6))
def test_fuzz_mutated_model_files_for_load(tmp_path_factory, model_bytes, cut, flips):
    data = bytearray(model_bytes[: max(1, len(model_bytes) - cut % len(model_bytes))])
    for pos, bit in flips:
        data[pos % len(data)] ^= bit
    path = tmp_path_factory.mktemp("fuzz") / "m.npz"
    path.write_bytes(bytes(data))
    _loads_valid_or_refuses(path)


@FUZZ
@given(n_components=st.one_of(st.integers(-2, 4), st.floats(-1, 3), st.none()),
       covariance_type=st.sampled_from(["full", "tied", "diag", "spherical", "x", None]),
       tol=st.one_of(st.floats(allow_nan=True), st.integers(-1, 1)),
       reg_covar=st.one_of(st.floats(allow_nan=True), st.just(0.0)),
       max_iter=st.one_of(st.integers(-1, 3), st.floats(0, 3)),
       random_state=st.one_of(st.none(), st.integers(-1, 2**65)),
       init_params=st.sampled_from(["kmeans", "k-means++", "random", "random_from_data", "?"]))
# A finite tol just beyond float32's range (it once overflowed to inf with a warning).
@example(n_components=1, covariance_type="full", tol=3.4028235677973366e38, reg_covar=0.0,
         max_iter=0, random_state=None, init_params="kmeans")
def test_fuzz_estimator_arguments(n_components, covariance_type, tol, reg_covar, max_iter,
                                  random_state, init_params):
    x = make_blobs(np.random.default_rng(2), n_per=10, k=2, d=2)
    gm = GaussianMixture(n_components, covariance_type=covariance_type, tol=tol,
                         reg_covar=reg_covar, max_iter=max_iter, random_state=random_state,
                         init_params=init_params)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm.fit(x)
    except (ValueError, TypeError) as e:
        assert str(e)  # a message, naming what was wrong
        return
    for attr in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert np.all(np.isfinite(getattr(gm, attr))), attr
    assert np.all(np.isfinite(gm.predict_proba(x)))


@FUZZ
@given(covariance_type=st.sampled_from(["full", "tied", "diag", "spherical"]),
       n_components=st.integers(1, 4), offset=st.sampled_from([0.0, 1e4]),
       spread=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**16),
       query_scale=st.sampled_from([1.0, 1e2, 1e4, 1e8]))
def test_fuzz_fitted_models_answer_any_query(covariance_type, n_components, offset, spread,
                                             seed, query_scale):
    """Any fitted model, any query (near, far, very far): responsibilities finite and
    summing to one (the fuzzing finding: 1.135 where log p(x) ~ −1e6), labels in range,
    log-densities finite or one clear error for points beyond float64."""
    rng = np.random.default_rng(seed)
    x = (offset + spread * make_blobs(rng, n_per=12, k=3, d=2)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", PrecisionWarning)
        try:
            gm = GaussianMixture(n_components, covariance_type=covariance_type,
                                 random_state=seed).fit(x)
        except ValueError as error:
            # No model to query: k-means left a component two points in 2-D, whose
            # covariance plus reg_covar (1e-6) is singular in float32 at a spread of 1e3
            # (offset 1e4, full, K = 4, seed 4). scikit-learn refuses such data the same
            # way (3 of its first 5 seeds); the fit's own error is tested elsewhere.
            assert "ill-defined covariance" in str(error)
            reject()
    q = (offset + spread * query_scale * rng.normal(size=(16, 2))).astype(np.float32)
    proba = gm.predict_proba(q)
    assert np.all(np.isfinite(proba)) and np.all(proba >= 0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    labels = gm.predict(q)
    assert labels.min() >= 0 and labels.max() < n_components
    assert np.all(np.isfinite(gm.score_samples(q)))
