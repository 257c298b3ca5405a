"""Plots fit for a report: files written, what was fitted in the titles, names on the axes,
ellipses explained, the chosen model marked, no text over other text; and the EM trace
obeys the theory it draws."""

import struct

import jax
import matplotlib
import numpy as np
import pandas as pd
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


def _not_blank(path) -> bool:
    img = plt.imread(path)
    return img[..., :3].std() > 0.01  # something was drawn on the white canvas


def _written(fig, path) -> bool:
    """The figure saved as a non-blank PNG (and closed)."""
    plot.save_figure(fig, path)
    w, h = png_size(path)
    return w > 100 and h > 100 and _not_blank(path)


def _legend_texts(ax_or_fig) -> list[str]:
    legends = ([ax_or_fig.get_legend()] if hasattr(ax_or_fig, "get_legend")
               else ax_or_fig.legends)
    return [t.get_text() for leg in legends if leg is not None for t in leg.get_texts()]


def _boxes_intersect(a, b) -> bool:
    return min(a.x1, b.x1) > max(a.x0, b.x0) and min(a.y1, b.y1) > max(a.y0, b.y0)


NAMES = ["alcohol", "malic acid", "ash", "flavanoids"]


@pytest.fixture(scope="module")
def fitted():
    x = make_blobs(np.random.default_rng(0), n_per=80, k=3, d=4)
    gm = jaxem.GaussianMixture(3, random_state=0).fit(x)
    return x, gm


@pytest.mark.parametrize("dims", [(0, 1), (2, 3), "pca"])
def test_plot_mixture_says_what_was_fitted_on_named_axes(tmp_path, fitted, dims):
    x, gm = fitted
    frame = pd.DataFrame(x, columns=NAMES)
    ax = plot.plot_mixture(frame, gm.params_, dims=dims, labels=gm.predict(x))
    assert len(ax.patches) == 3 * 2  # two ellipses per component
    title = ax.get_title()
    assert "K=3" in title and "full covariance" in title and f"N={len(x)}" in title
    if dims == "pca":
        # each principal axis says the share of the data's variance it explains
        var = np.linalg.eigvalsh(np.cov(x, rowvar=False))[::-1]
        for a, label in enumerate((ax.get_xlabel(), ax.get_ylabel())):
            assert label.startswith(f"principal axis {a + 1}")
            share = float(label.split("(")[1].split("%")[0])
            assert share == pytest.approx(100 * var[a] / var.sum(), abs=0.05)
    else:
        assert (ax.get_xlabel(), ax.get_ylabel()) == (NAMES[dims[0]], NAMES[dims[1]])
    legend = _legend_texts(ax)
    assert any("1σ" in t for t in legend) and any("2σ" in t for t in legend)
    assert "component mean" in legend
    # the legend sits right of the data, not over it
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert not _boxes_intersect(ax.get_legend().get_window_extent(renderer),
                                ax.get_window_extent(renderer))
    assert plot.overlapping_text(fig) == []
    assert _written(fig, tmp_path / "m.png")


def test_plot_mixture_names_ellipse_styles_and_bad_arguments(fitted):
    x, gm = fitted
    ax = plot.plot_mixture(x, gm.params_, dims=(1, 3), feature_names=NAMES, n_std=(1, 2, 3),
                           title="")
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("malic acid", "flavanoids")
    assert ax.get_title() == ""
    styles = {p.get_linestyle() for p in ax.patches}
    assert len(styles) == 3  # one line style per radius, as the legend says
    plt.close(ax.figure)
    ax = plot.plot_mixture(x, gm.params_, dims=(0, 1))
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("feature 0", "feature 1")
    plt.close(ax.figure)
    with pytest.raises(ValueError, match="must be 2-D"):
        plot.plot_mixture(x[:, 0], gm.params_)
    with pytest.raises(ValueError, match="feature_names has 2 names for 4 features"):
        plot.plot_mixture(x, gm.params_, feature_names=["a", "b"])
    with pytest.raises(ValueError, match="n_std"):
        plot.plot_mixture(x, gm.params_, n_std=(-1.0,))


def test_one_feature_is_a_histogram_with_the_mixture_density(tmp_path):
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(-3, 1, 300), rng.normal(2, 0.5, 200)])[:, None]
    gm = jaxem.GaussianMixture(2, random_state=0).fit(x)
    ax = plot.plot_mixture(x, gm.params_, feature_names=["log income"])
    assert ax.get_xlabel() == "log income" and ax.get_ylabel() == "density"
    assert ax.get_title() == "K=2, full covariance, N=500"
    assert plot.fit_title(gm.params_, 500) == ax.get_title()
    mixture, *components = ax.lines
    grid, total = mixture.get_xydata().T
    # the drawn density is the model's: it integrates to ~1 and matches score_samples
    assert np.trapezoid(total, grid) == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(total, np.exp(gm.score_samples(grid[:, None])), rtol=1e-4,
                               atol=1e-7)
    np.testing.assert_allclose(sum(c.get_ydata() for c in components), total, rtol=1e-6)
    assert "component 0 (weight" in " ".join(_legend_texts(ax))
    assert plot.overlapping_text(ax.figure) == []
    assert _written(ax.figure, tmp_path / "one.png")


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


def test_log_likelihood_plot(tmp_path, fitted):
    x, gm = fitted
    ax = plot.plot_log_likelihood(gm.lower_bounds_ * 1e3)  # large values: no offset text
    assert len(ax.lines[0].get_xdata()) == gm.n_iter_
    assert ax.get_title() == f"EM convergence ({gm.n_iter_} iterations)"
    assert ax.get_ylabel() == "mean log-likelihood per sample"
    ax.figure.canvas.draw()
    assert ax.yaxis.get_offset_text().get_text() == ""
    assert plot.overlapping_text(ax.figure) == []
    assert _written(ax.figure, tmp_path / "ll.png")


@pytest.fixture(scope="module")
def search():
    x = make_blobs(np.random.default_rng(2), n_per=60, k=3, d=2)
    return jaxem.select(x, range(1, 5), ("full", "diag", "spherical"), n_init=2)


def test_criteria_plot_one_panel_per_criterion_minimum_marked(tmp_path, search):
    axes = plot.plot_criteria(search)
    assert len(axes) == 3
    fig = axes[0].figure
    for ax, name in zip(axes, ("bic", "aic", "icl"), strict=True):
        table = search.table(name)
        i, j = np.unravel_index(np.argmin(table), table.shape)
        # the marker of the minimum: the one line of a single point
        marks = [ln for ln in ax.lines if len(ln.get_xdata()) == 1]
        assert len(marks) == 1
        assert (marks[0].get_xdata()[0], marks[0].get_ydata()[0]) == (search.ks[i],
                                                                      table[i, j])
        assert f"minimum K={search.ks[i]}, {search.covariance_types[j]}" in ax.get_title()
        assert len(ax.lines) == len(search.covariance_types) + 1
    assert "(chosen)" in axes[0].get_title() and "(chosen)" not in axes[1].get_title()
    k, ct = search.best
    assert fig.get_suptitle() == f"Model selection: chosen by BIC: K={k}, {ct} covariance"
    legend = _legend_texts(fig)
    assert set(search.covariance_types) <= set(legend) and "minimum" in legend
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.legends[0].get_window_extent(renderer)
    assert not any(_boxes_intersect(box, ax.get_window_extent(renderer)) for ax in axes)
    assert plot.overlapping_text(fig) == []
    assert _written(fig, tmp_path / "c.png")


def test_criteria_plot_from_tables_and_given_axes(search):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), layout="constrained")
    ks, types = [1, 2, 3], ["full", "diag"]
    bic = np.array([[3.0, 4.0], [1.0, 2.0], [5.0, 6.0]])
    out = plot.plot_criteria(ks, {"BIC": bic, "AIC": bic - 1}, types, axes=axes)
    assert list(out) == list(axes)
    assert "minimum K=2, full" in axes[0].get_title()
    assert set(_legend_texts(axes[1])) == {"full", "diag", "minimum"}
    assert plot.overlapping_text(fig) == []
    plt.close(fig)
    with pytest.raises(ValueError, match="shape"):
        plot.plot_criteria(ks, {"BIC": bic[:2]}, types)
    with pytest.raises(ValueError, match="axes: 1 given for 2 criteria"):
        plot.plot_criteria(ks, {"BIC": bic, "AIC": bic}, types, axes=[axes[0]])
    with pytest.raises(TypeError, match="SearchResult"):
        plot.plot_criteria(ks, {"BIC": bic})
    one = plot.plot_criteria(search, criteria=("icl",))
    assert len(one) == 1 and one[0].get_ylabel() == "ICL (lower is better)"
    plt.close(one[0].figure)


def test_overlap_check_finds_text_on_text():
    """The check the plot tests rely on can fail: text drawn over a title and tick labels
    crammed together are found."""
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.set_title("a title")
    ax.text(0.5, 1.02, "over the title", transform=ax.transAxes, ha="center", va="bottom")
    assert {"a title", "over the title"} in [set(p) for p in plot.overlapping_text(fig)]
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(1.2, 1.2))
    ax.set_xticks(np.arange(10), [f"label {i}" for i in range(10)])
    assert {"label 0", "label 1"} in [set(p) for p in plot.overlapping_text(fig)]
    plt.close(fig)


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
    ax = plot.plot_em_trace(trace)
    assert "ELBO" in ax.get_title() and len(_legend_texts(ax)) == 3
    assert plot.overlapping_text(ax.figure) == []
    assert _written(ax.figure, tmp_path / "t.png")


def test_save_figure_writes_a_png(tmp_path, fitted):
    x, gm = fitted
    fig, ax = plt.subplots(figsize=(4, 3))
    plot.plot_mixture(x, gm.params_, ax=ax, legend=False)
    plot.save_figure(fig, tmp_path / "s.png")
    w, h = png_size(tmp_path / "s.png")
    assert 250 <= w <= 450 and 200 <= h <= 350  # 400×300 at 100 dpi, trimmed to the content
    assert not plt.fignum_exists(fig.number)  # closed
