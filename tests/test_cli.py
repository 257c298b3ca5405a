"""The ``jaxem`` command: the installed console script as a real subprocess, and
``jaxem.cli.main`` in-process for the many cases that only differ in their arguments (a
subprocess pays JAX's import and every compilation again)."""

import contextlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest


def jaxem_command() -> list[str]:
    exe = Path(sys.executable).parent / "jaxem"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("jaxem")
    if found is None:  # pragma: no cover - the package must be installed for this suite
        pytest.fail("the jaxem console script is not installed (pip install -e .)")
    return [found]


def run_command(*args, timeout=600):
    """The installed console script, in a fresh process."""
    return subprocess.run([*jaxem_command(), *args], capture_output=True, text=True,
                          timeout=timeout)


def run(*args):
    """``jaxem.cli.main`` in this process, with what a subprocess would hand back."""
    from jaxem import cli

    out, err = io.StringIO(), io.StringIO()
    x64 = jax.config.jax_enable_x64
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as e:  # argparse: --help (0) and usage errors (2)
            code = e.code
        finally:
            jax.config.update("jax_enable_x64", x64)  # --float64 must not leak into other tests
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_demo_prints_bic_table_chosen_model_and_writes_plot(tmp_path):
    png = tmp_path / "demo.png"
    out = run_command("demo", "--max-k", "2", "--n-init", "2", "--plot", str(png))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "BIC (lower is better" in text and "Chosen model: K=" in text
    table = text.split("= chosen)")[1].split("Chosen model")[0]
    assert table.count("*") == 1  # exactly one chosen cell in the table
    for ct in ("full", "tied", "diag", "spherical"):
        assert ct in text
    iters = [ln for ln in text.splitlines() if ln.strip().startswith("iter ")]
    assert len(iters) >= 2
    # The printed log-likelihoods never decrease.
    values = [float(ln.split(":")[1].split()[0]) for ln in iters]
    assert all(b >= a - 1e-6 for a, b in zip(values, values[1:], strict=False))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.fixture
def figures(monkeypatch):
    """The figures the command saves, kept open to look at (and still written)."""
    import matplotlib.pyplot as plt

    from jaxem import plot

    kept = []

    def save(fig, path):
        fig.savefig(path, dpi=50)
        kept.append(fig)

    monkeypatch.setattr(plot, "save_figure", save)
    yield kept
    for fig in kept:
        plt.close(fig)


def _texts_fit_for_a_report(fig):
    from jaxem import plot

    assert plot.overlapping_text(fig) == []
    axes = fig.get_axes()
    assert axes and all(ax.get_title() for ax in axes)
    return axes


def test_demo_plot_names_units_title_and_marks_the_choice(tmp_path, figures):
    out = run("demo", "--max-k", "2", "--n-init", "1", "--plot", tmp_path / "d.png")
    assert out.returncode == 0, out.stderr
    (fig,) = figures
    scatter, criteria = _texts_fit_for_a_report(fig)
    assert (scatter.get_xlabel(), scatter.get_ylabel()) == ("eruptions (min)", "waiting (min)")
    assert "Old Faithful: K=" in scatter.get_title() and "N=272" in scatter.get_title()
    assert "(chosen)" in criteria.get_title() and criteria.get_legend() is not None


def test_version():
    from importlib.metadata import version

    out = run_command("--version")
    assert out.returncode == 0
    assert out.stdout.split()[:2] == ["jaxem", version("jaxem")]
    assert f"jax {version('jax')}" in out.stdout


def test_help_and_bad_usage():
    top = run_command("--help")
    assert top.returncode == 0 and "demo" in top.stdout
    bad = run_command("frobnicate")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    error = run_command("fit", "absent.csv")  # a run-time error, through the console script
    assert error.returncode == 2 and "no such data file" in error.stderr
    assert len(error.stderr.strip().splitlines()) == 1


def test_demo_error_is_one_line(tmp_path):
    out = run("demo", "--max-k", "0")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "--max-k must be >= 1" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- fit/select/...

import numpy as np  # noqa: E402

from jaxem.datasets import load_old_faithful  # noqa: E402


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    x, names = load_old_faithful()
    np.savetxt(d / "header.csv", x, delimiter=",", header=",".join(names), comments="",
               fmt="%.3f")
    np.savetxt(d / "plain.csv", x, delimiter=",", fmt="%.3f")
    np.save(d / "x.npy", x)
    np.savez(d / "x.npz", x=x)
    wide = np.column_stack([x, np.random.default_rng(0).normal(size=len(x))])
    np.savetxt(d / "wide.csv", wide, delimiter=",", header="eruptions,waiting,noise",
               comments="", fmt="%.4f")
    return d, x


def _progress(text):
    rows = [ln.split() for ln in text.splitlines() if ln.strip().startswith("restart")]
    return [(int(r[1]), int(r[3]), float(r[5])) for r in rows]


def test_fit_prints_progress_summary_and_saves(data_files, tmp_path):
    d, x = data_files
    model, png = tmp_path / "m.npz", tmp_path / "fit.png"
    out = run("fit", str(d / "header.csv"), "-k", "2", "--n-init", "2", "--out", str(model),
              "--plot", str(png))
    assert out.returncode == 0, out.stderr
    progress = _progress(out.stdout)
    n_iter = int(out.stdout.split("after ")[1].split(" iterations")[0])
    for r in (0, 1):  # every restart reports every iteration, in order, never decreasing
        mine = [(i, ll) for rr, i, ll in progress if rr == r]
        assert [i for i, _ in mine] == list(range(1, len(mine) + 1))
        assert all(b >= a - 1e-5 for (_, a), (_, b) in zip(mine, mine[1:], strict=False))
    best = int(out.stdout.split("best restart ")[1].split(")")[0])
    assert max(i for rr, i, _ in progress if rr == best) == n_iter
    assert "BIC" in out.stdout and "model written to" in out.stdout
    gm = __import__("jaxem").GaussianMixture.load(model)
    assert gm.n_components == 2 and gm.n_iter_ == n_iter
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the file keeps how the model was fitted
    assert (gm.n_init, gm.random_state, gm.max_iter, gm.tol) == (2, 0, 100, 1e-3)


def test_fit_plot_has_the_column_names_and_what_was_fitted(data_files, tmp_path, figures):
    d, x = data_files
    out = run("fit", str(d / "wide.csv"), "-k", "2", "--quiet", "--columns", "waiting,noise",
              "--plot", tmp_path / "f.png")
    assert out.returncode == 0, out.stderr
    (fig,) = figures
    scatter, history = _texts_fit_for_a_report(fig)
    assert (scatter.get_xlabel(), scatter.get_ylabel()) == ("waiting", "noise")
    assert scatter.get_title() == f"wide.csv: K=2, full covariance, N={len(x)}"
    assert history.get_ylabel() == "mean log-likelihood per sample"
    # one column: a histogram with the mixture density, named after the column
    out = run("fit", str(d / "wide.csv"), "-k", "2", "--quiet", "--columns", "waiting",
              "--plot", tmp_path / "g.png")
    assert out.returncode == 0, out.stderr
    density, _ = _texts_fit_for_a_report(figures[1])
    assert (density.get_xlabel(), density.get_ylabel()) == ("waiting", "density")


def test_fit_reads_every_format_to_the_same_fit(data_files):
    d, _ = data_files
    summaries = []
    for name, columns in [("header.csv", None), ("plain.csv", None), ("x.npz", None),
                          ("wide.csv", "eruptions,1")]:
        out = run("fit", str(d / name), "-k", "2", "--quiet",
                  *(["--columns", columns] if columns else []))
        assert out.returncode == 0, out.stderr
        summaries.append(out.stdout.split("converged=")[1])
    assert all(s == summaries[0] for s in summaries)


def test_select_table_choice_plot_and_model(data_files, tmp_path):
    d, x = data_files
    png, model = tmp_path / "sel.png", tmp_path / "best.npz"
    out = run("select", str(d / "x.npy"), "--k", "1:2", "--covariance-type", "full,diag",
              "--plot", str(png), "--out", str(model), "--verbose")
    assert out.returncode == 0, out.stderr
    bic_block = out.stdout.split("BIC (lower is better; * = chosen)")[1].split("AIC")[0]
    assert "AIC (lower is better)" in out.stdout and "ICL (lower is better)" in out.stdout
    seconds = re.search(r"compilation: ([0-9.]+) s in (\d+) program", out.stdout)
    assert seconds and float(seconds.group(1)) >= 0 and int(seconds.group(2)) >= 0
    rows = [ln.split() for ln in bic_block.strip().splitlines()[1:]]
    values = np.array([[float(v.rstrip("*")) for v in r[1:]] for r in rows])
    i, j = np.unravel_index(np.argmin(values), values.shape)
    assert rows[i][1 + j].endswith("*") and bic_block.count("*") == 1
    cov_types = ["full", "diag"]
    assert f"K={i + 1}, covariance_type='{cov_types[j]}'" in out.stdout
    gm = __import__("jaxem").GaussianMixture.load(model)
    assert (gm.n_components, gm.covariance_type) == (i + 1, cov_types[j])
    assert gm.bic(x.astype(np.float32)) == pytest.approx(values[i, j], abs=0.1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # a line per model as each covariance type's program finishes, before the tables
    progress = out.stdout.split("BIC (lower is better")[0]
    lines = [ln.split() for ln in progress.splitlines() if ln.strip().startswith("K=")]
    assert [(ln[0], ln[1]) for ln in lines] == [("K=1", "full"), ("K=2", "full"),
                                                ("K=1", "diag"), ("K=2", "diag")]
    for ln in lines:  # the BIC printed as it came equals the table's
        k, ct = int(ln[0][2:]), ln[1]
        assert float(ln[3]) == pytest.approx(values[k - 1, cov_types.index(ct)], abs=0.05)
    assert "[1/2] full: 2 model(s) in" in progress and "[2/2] diag" in progress
    # the saved model keeps the search's settings for its K and type
    # (the search's defaults for small data: 64 restarts, tol 1e-6)
    assert (gm.n_init, gm.random_state, gm.max_iter, gm.init_params) == (64, 0, 100, "k-means++")
    assert gm.tol == 1e-6
    assert not hasattr(gm, "feature_names_in_")  # a .npy file has no column names


def test_select_plot_one_panel_per_criterion(data_files, tmp_path, figures):
    d, _ = data_files
    out = run("select", str(d / "header.csv"), "--k", "1:3", "--covariance-type", "tied,diag",
              "--plot", tmp_path / "s.png", "--criterion", "aic", "--out", tmp_path / "m.npz")
    assert out.returncode == 0, out.stderr
    gm = __import__("jaxem").GaussianMixture.load(tmp_path / "m.npz")
    assert list(gm.feature_names_in_) == ["eruptions", "waiting"]
    (fig,) = figures
    axes = _texts_fit_for_a_report(fig)
    assert [ax.get_ylabel().split()[0] for ax in axes] == ["BIC", "AIC", "ICL"]
    assert "(chosen)" in axes[1].get_title() and "chosen by AIC" in fig.get_suptitle()


def test_predict_and_sample_from_a_saved_model(data_files, tmp_path):
    import jaxem

    d, x = data_files
    model = tmp_path / "m.npz"
    assert run("fit", str(d / "x.npy"), "-k", "3", "--quiet", "--out", str(model)).returncode == 0
    gm = jaxem.GaussianMixture.load(model)
    labels = run("predict", str(model), str(d / "header.csv"))
    assert labels.returncode == 0, labels.stderr
    printed = np.array([int(v) for v in labels.stdout.split()])
    np.testing.assert_array_equal(printed, gm.predict(x.astype(np.float32)))
    proba = tmp_path / "p.npy"
    out = run("predict", str(model), str(d / "x.npy"), "--proba", "--out", str(proba))
    assert out.returncode == 0, out.stderr
    p = np.load(proba)
    assert p.shape == (len(x), 3) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    samples = tmp_path / "s.csv"
    out = run("sample", str(model), "-n", "500", "--labels", "--out", str(samples))
    assert out.returncode == 0, out.stderr
    s = np.loadtxt(samples, delimiter=",")
    assert s.shape == (500, 3) and set(np.unique(s[:, 2])) <= {0.0, 1.0, 2.0}
    # the samples come from the model: their mean is near the mixture mean
    mixture_mean = gm.weights_ @ gm.means_
    assert np.allclose(s[:, :2].mean(axis=0), mixture_mean, rtol=0.05)
    again = run("sample", str(model), "-n", "5", "--seed", "3").stdout
    assert again == run("sample", str(model), "-n", "5", "--seed", "3").stdout


def test_every_subcommand_has_help():
    for cmd in ("fit", "select", "predict", "sample", "demo", "tune-blocks"):
        out = run(cmd, "--help")
        assert out.returncode == 0 and "usage: jaxem " + cmd in out.stdout


def test_errors_are_one_line_and_non_zero(data_files, tmp_path):
    d, _ = data_files
    (tmp_path / "nan.csv").write_text("1,2\n3,nan\n4,5\n")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,x\n")
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    cases = [
        (["fit", str(tmp_path / "absent.csv")], "no such data file"),
        (["fit", str(tmp_path / "nan.csv")], "NaN or infinite"),
        (["fit", str(tmp_path / "bad.csv")], "not a number"),
        (["fit", str(tmp_path / "ragged.csv")], "fields, expected 2"),
        (["fit", str(d / "x.npy"), "-k", "1000"], "larger than the number of samples"),
        (["fit", str(d / "x.npy"), "--covariance-type", "weird"], "--covariance-type 'weird'"),
        (["fit", str(d / "x.npy"), "--bogus"], "unrecognized arguments: --bogus"),
        (["fit", str(d / "x.npy"), "-k", "two"], "invalid int value"),
        (["fit", str(d / "header.csv"), "--columns", "nope"], "no column named 'nope'"),
        (["select", str(d / "x.npy"), "--k", "0:3"], "every K must be >= 1"),
        (["select", str(d / "absent.npy"), "--screen", "10,0"], "--screen must be"),
        (["select", str(d / "x.npy"), "--screen", "ten"], "--screen must be"),
        (["predict", str(tmp_path / "junk.npz"), str(d / "x.npy")], "not a readable"),
        (["predict", str(tmp_path / "absent.npz"), str(d / "x.npy")], "no model file"),
        (["sample", str(tmp_path / "junk.npz"), "-n", "0"], "must be >= 1"),
    ]
    for args, message in cases:
        out = run(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr and message in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)
