"""Plots: non-empty PNGs of the expected size; the EM trace obeys the theory it draws."""

import struct

import jax
import matplotlib
import numpy as np
import pytest
from conftest import make_blobs

import jaxem
from jaxem import gmm, plot

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _save(fig, path, dpi=50):
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return png_size(path)


def _not_blank(path) -> bool:
    img = plt.imread(path)
    return img[..., :3].std() > 0.01  # something was drawn on the white canvas


@pytest.fixture(scope="module")
def fitted():
    x = make_blobs(np.random.default_rng(0), n_per=80, k=3, d=4)
    gm = jaxem.GaussianMixture(3, random_state=0).fit(x)
    return x, gm


@pytest.mark.parametrize("dims", [(0, 1), (2, 3), "pca"])
def test_plot_mixture_png(tmp_path, fitted, dims):
    x, gm = fitted
    fig, ax = plt.subplots(figsize=(6, 4))
    plot.plot_mixture(x, gm.params_, ax=ax, dims=dims, labels=gm.predict(x))
    assert len(ax.patches) == 3 * 2  # two ellipses per component
    path = tmp_path / "m.png"
    assert _save(fig, path) == (300, 200) and _not_blank(path)


def test_pca_projection_is_the_projected_gaussian(fitted):
    x, gm = fitted
    x2, means, covs, _ = plot._projection(x, gm.params_, "pca")
    # the projection is orthonormal: means and covariances transform as the data do
    v = np.linalg.lstsq(x - x.mean(0), x2, rcond=None)[0]
    assert np.allclose(v.T @ v, np.eye(2), atol=1e-6)
    assert np.allclose(means, (gm.means_ - x.mean(0)) @ v, atol=1e-4)
    assert np.allclose(covs, np.einsum("da,kde,eb->kab", v, plot._full_covariances(gm.params_),
                                       v), atol=1e-4)
    with pytest.raises(ValueError, match="dims"):
        plot._projection(x, gm.params_, "tsne")


def test_log_likelihood_and_criteria_pngs(tmp_path, fitted):
    x, gm = fitted
    fig, ax = plt.subplots(figsize=(5, 4))
    plot.plot_log_likelihood(gm.lower_bounds_, ax=ax)
    assert len(ax.lines[0].get_xdata()) == gm.n_iter_
    assert _save(fig, tmp_path / "ll.png") == (250, 200) and _not_blank(tmp_path / "ll.png")
    ks, types = [1, 2, 3], ["full", "diag"]
    bic = np.arange(6.0).reshape(3, 2)
    fig, ax = plt.subplots(figsize=(6, 4))
    plot.plot_criteria(ks, {"BIC": bic, "AIC": bic - 1}, types, ax=ax)
    assert len(ax.lines) == 4
    assert _save(fig, tmp_path / "c.png", dpi=100) == (600, 400)


def test_em_trace_is_coordinate_ascent_on_a_lower_bound(tmp_path, x64):
    x = make_blobs(np.random.default_rng(1), n_per=50, k=2, d=2, sep=2.0)
    params = gmm.init(jax.random.PRNGKey(0), x, 2, "full", method="random")
    trace = plot.em_trace(x, params, 15, reg_covar=0.0)
    ll, lb, kl = trace["log_likelihood"], trace["elbo"], trace["kl"]
    assert np.all(np.abs(trace["identity_residual"]) < 1e-10)
    assert np.all(kl >= -1e-12)
    # the M-step raised the bound above the old likelihood (where q was tight) ...
    assert np.all(lb >= ll[:-1] - 1e-10)
    # ... and the likelihood sits above the bound by the KL gap
    assert np.all(ll[1:] >= lb - 1e-12)
    fig, ax = plt.subplots(figsize=(6, 4))
    plot.plot_em_trace(trace, ax=ax)
    assert _save(fig, tmp_path / "t.png") == (300, 200) and _not_blank(tmp_path / "t.png")


def test_save_figure_writes_a_png(tmp_path, fitted):
    x, gm = fitted
    fig, ax = plt.subplots(figsize=(4, 3))
    plot.plot_mixture(x, gm.params_, ax=ax)
    plot.save_figure(fig, tmp_path / "s.png")
    w, h = png_size(tmp_path / "s.png")
    assert 250 <= w <= 450 and 200 <= h <= 350  # 400×300 at 100 dpi, trimmed to the content
    with pytest.raises(ValueError, match="at least 2 features"):
        plot.plot_mixture(x[:, :1], gm.params_)
