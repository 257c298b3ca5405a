"""matplotlib helpers (optional extra ``jaxem[plot]``); files are written with the Agg backend
unless the caller chose another (pyplot already imported, or ``MPLBACKEND`` set)."""

from __future__ import annotations

import os
import sys

import numpy as np

from jaxem._linalg import full_covariance_matrices


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'jaxem[plot]'") from e
    # Files are written with Agg, unless a backend was chosen already: pyplot imported by
    # the caller, or MPLBACKEND set (Jupyter's inline backend, whose figures show in cells).
    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _full_covariances(params) -> np.ndarray:
    """(K, D, D) covariances whatever the covariance type."""
    k, d = np.shape(params.means)
    return np.asarray(full_covariance_matrices(params.covariances, params.covariance_type, k, d))


def _feature_names(x, feature_names, d: int) -> list[str]:
    """Names for the D columns: those given, else a DataFrame's columns, else "feature j"."""
    if feature_names is None:
        feature_names = getattr(x, "columns", None)
    if feature_names is None:
        return [f"feature {j}" for j in range(d)]
    names = [str(n) for n in feature_names]
    if len(names) != d:
        raise ValueError(f"feature_names has {len(names)} names for {d} features")
    return names


def _projection(x, params, dims, feature_names=None):
    """2-D coordinates of data, means and covariances, and the two axis labels: two
    features, or the top two principal axes of the data (``dims="pca"``; the default when
    D > 2), labelled with the share of the data's variance each explains."""
    names = _feature_names(x, feature_names, np.shape(x)[1])
    x = np.asarray(x, float)
    means = np.asarray(params.means, float)
    covs = np.asarray(_full_covariances(params), float)
    d = x.shape[1]
    if dims is None:
        dims = (0, 1) if d == 2 else "pca"
    if isinstance(dims, str):
        if dims != "pca":
            raise ValueError(f"dims must be two feature indices or 'pca', got {dims!r}")
        center = x.mean(axis=0)
        vals, vecs = np.linalg.eigh(np.cov(x - center, rowvar=False))
        v = vecs[:, ::-1][:, :2]  # (D, 2) top principal axes
        share = 100 * vals[::-1][:2] / max(float(np.sum(vals)), np.finfo(float).tiny)
        labels = tuple(f"principal axis {a + 1} ({share[a]:.1f}% of variance)"
                       for a in range(2))
        return ((x - center) @ v, (means - center) @ v,
                np.einsum("da,kde,eb->kab", v, covs, v), labels)
    i, j = dims
    return (x[:, [i, j]], means[:, [i, j]], covs[:, [i, j]][:, :, [i, j]],
            (names[i], names[j]))


_ELLIPSE_STYLES = ("-", "--", ":", "-.")


def fit_title(params, n_samples: int) -> str:
    """What was fitted, as the plots' titles say it: ``"K=3, full covariance, N=178"``."""
    return f"K={np.shape(params.weights)[0]}, {params.covariance_type} covariance, N={n_samples}"


def _legend_outside(ax, handles=None, title=None):
    """The axes' legend to the right of its frame (never over the data)."""
    kw = {} if handles is None else {"handles": handles}
    return ax.legend(**kw, title=title, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                     borderaxespad=0.0, fontsize="small", title_fontsize="small")


def plot_mixture(x, params, ax=None, dims=None, labels=None, n_std=(1.0, 2.0), *,
                 feature_names=None, title=None, legend=True):
    """Scatter of the data with each component's covariance ellipses; for one feature, a
    histogram with the mixture's density and each weighted component's.

    Args:
      x: (N, D) data (a DataFrame's column names label the axes).
      params: fitted :class:`jaxem.gmm.GMMParams`.
      ax: matplotlib axes (a new figure if None).
      dims: two feature indices, or ``"pca"`` to project data, means and covariances onto
        the data's top two principal axes (a Gaussian projects to a Gaussian with covariance
        Vᵀ Σ V; each axis says the share of variance it explains). Default: the two
        features when D = 2, else ``"pca"``.
      labels: optional (N,) labels to colour the points by.
      n_std: ellipse radii in standard deviations (Mahalanobis distance): the ellipse
        {y : (y − μ)ᵀ Σ⁻¹ (y − μ) = s²} of the (projected) component, one line style each.
      feature_names: optional D names for the axes (default: the DataFrame's columns, else
        "feature j").
      title: the axes title; default says what was fitted (K, covariance type, N); ``""``
        for none.
      legend: whether to draw the legend (ellipse radii, means) right of the axes.

    Returns:
      The axes.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Ellipse

    if np.ndim(x) != 2 or np.shape(x)[1] < 1:
        raise ValueError(f"x must be 2-D (n_samples, n_features), got shape {np.shape(x)}")
    if np.shape(x)[1] == 1:
        return _plot_one_feature(x, params, ax, feature_names, title, legend)
    n_std = tuple(float(s) for s in np.atleast_1d(n_std))
    if not n_std or len(n_std) > len(_ELLIPSE_STYLES) or min(n_std) <= 0:
        raise ValueError(f"n_std must be 1 to {len(_ELLIPSE_STYLES)} positive radii, "
                         f"got {n_std}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 5), layout="constrained")
    x2, means, covs, names = _projection(x, params, dims, feature_names)
    colors = "0.4" if labels is None else [f"C{int(lab) % 10}" for lab in np.asarray(labels)]
    ax.scatter(x2[:, 0], x2[:, 1], c=colors, s=8, alpha=0.6)
    weights = np.asarray(params.weights)
    for k, (m, c) in enumerate(zip(means, covs, strict=True)):
        vals, vecs = np.linalg.eigh(c)
        angle = np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1]))
        for s, style in zip(n_std, _ELLIPSE_STYLES, strict=False):
            w, h = 2 * s * np.sqrt(np.maximum(vals[::-1], 0))
            ax.add_patch(Ellipse(m, w, h, angle=angle, fill=False, lw=1.5, ls=style,
                                 color=f"C{k % 10}",
                                 alpha=0.4 + 0.6 * weights[k] / weights.max()))
        ax.plot(*m, "k+", ms=10)
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    if title is None:
        view = ", principal axes" if "principal" in names[0] else ""
        title = fit_title(params, np.shape(x)[0]) + view
    if title:
        ax.set_title(title)
    if legend:
        handles = [Line2D([], [], color="0.3", ls=style, lw=1.5,
                          label=f"{s:g}σ ellipse (Mahalanobis {s:g})")
                   for s, style in zip(n_std, _ELLIPSE_STYLES, strict=False)]
        handles.append(Line2D([], [], color="k", marker="+", ls="", ms=10,
                              label="component mean"))
        _legend_outside(ax, handles)
    return ax


def _plot_one_feature(x, params, ax, feature_names, title, legend):
    """One feature: a density histogram, the mixture density and w_k N(x | μ_k, σ_k²)."""
    plt = _pyplot()
    name = _feature_names(x, feature_names, 1)[0]
    x = np.asarray(x, float)[:, 0]
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    weights = np.asarray(params.weights, float)
    means = np.asarray(params.means, float)[:, 0]
    sd = np.sqrt(_full_covariances(params).astype(float)[:, 0, 0])
    span = max(float(np.ptp(x)), float(sd.max()), 1e-12)
    grid = np.linspace(x.min() - 0.1 * span, x.max() + 0.1 * span, 400)
    dens = weights[:, None] * np.exp(-0.5 * ((grid[None] - means[:, None]) / sd[:, None]) ** 2
                                     ) / (sd[:, None] * np.sqrt(2 * np.pi))
    ax.hist(x, bins="auto", density=True, color="0.8", label="data (density histogram)")
    ax.plot(grid, dens.sum(axis=0), "k-", lw=2, label="mixture density")
    for k in range(len(weights)):
        ax.plot(grid, dens[k], "--", color=f"C{k % 10}", lw=1.5,
                label=f"component {k} (weight {weights[k]:.2f})")
    ax.set_xlabel(name)
    ax.set_ylabel("density")
    if title is None:
        title = fit_title(params, len(x))
    if title:
        ax.set_title(title)
    if legend:
        _legend_outside(ax)
    return ax


def plot_log_likelihood(lower_bounds, ax=None, *, title=None):
    """Mean log-likelihood per EM iteration (e.g. ``GaussianMixture.lower_bounds_``).

    ``title``: default "EM convergence (n iterations)"; ``""`` for none.
    """
    plt = _pyplot()
    from matplotlib.ticker import ScalarFormatter

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    lb = np.asarray(lower_bounds, float)
    lb = lb[np.isfinite(lb)]
    ax.plot(np.arange(1, len(lb) + 1), lb, "o-", ms=3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    # Plain tick values (no "+1.2345e3" offset text to read against the axis label).
    formatter = ScalarFormatter(useOffset=False)
    ax.yaxis.set_major_formatter(formatter)
    ax.set_xlabel("EM iteration")
    ax.set_ylabel("mean log-likelihood per sample")
    if title is None:
        title = f"EM convergence ({len(lb)} iteration{'s' * (len(lb) != 1)})"
    if title:
        ax.set_title(title)
    return ax


def em_trace(x, params, n_iter: int, reg_covar: float = 1e-6) -> dict:
    """The coordinate-ascent picture of EM, per iteration t (mean per sample):

    ``log_likelihood[t]`` = ℓ(θ_t); ``elbo[t]`` = ELBO(q_t, θ_{t+1}) with q_t = p(z|x, θ_t)
    (the bound the M-step maximised); ``kl[t]`` = KL(q_t ‖ p(z|x, θ_{t+1})), so that
    ℓ(θ_{t+1}) = elbo[t] + kl[t]; ``identity_residual`` is what is left of that identity.
    """
    from jaxem import elbo, gmm

    n = np.asarray(x).shape[0]
    lls, elbos, kls = [], [], []
    lj = gmm.log_joint(params, x)
    for _ in range(n_iter):
        q = elbo.posterior(lj)
        lls.append(float(elbo.log_marginal(lj)) / n)
        stats, _ = gmm.e_step(params, x)
        params = gmm.m_step(stats, reg_covar)
        lj = gmm.log_joint(params, x)
        elbos.append(float(elbo.elbo(lj, q)) / n)
        kls.append(float(elbo.kl_to_posterior(lj, q)) / n)
    lls.append(float(elbo.log_marginal(lj)) / n)
    out = {"log_likelihood": np.array(lls), "elbo": np.array(elbos), "kl": np.array(kls)}
    # log p(x) = ELBO(q) + KL(q ‖ p(z|x)) for any q: ~0 up to rounding.
    out["identity_residual"] = out["log_likelihood"][1:] - (out["elbo"] + out["kl"])
    return out


def plot_em_trace(trace: dict, ax=None, *, title=None):
    """ℓ(θ_t) per iteration with the ELBO the M-step maximised and the KL gap between them
    (from :func:`em_trace`): EM as coordinate ascent on a lower bound. ``title``: default
    "EM as coordinate ascent: ℓ = ELBO + KL"; ``""`` for none."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4), layout="constrained")
    ll, lb, kl = trace["log_likelihood"], trace["elbo"], trace["kl"]
    t = np.arange(len(ll))
    ax.plot(t, ll, "o-", ms=3, label="log-likelihood ℓ(θ_t)")
    ax.plot(t[1:], lb, "s--", ms=3, label="ELBO(q_{t-1}, θ_t)")
    ax.fill_between(t[1:], lb, lb + kl, alpha=0.3, label="KL(q_{t-1} ‖ p(z|x,θ_t))")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("EM iteration t")
    ax.set_ylabel("mean per sample")
    if title is None:
        title = "EM as coordinate ascent: ℓ = ELBO + KL"
    if title:
        ax.set_title(title)
    _legend_outside(ax)
    return ax


_CRITERION_NAMES = {"bic": "BIC", "aic": "AIC", "icl": "ICL"}


def plot_criteria(result, criteria=None, cov_types=None, *, chosen=None, axes=None,
                  title=None):
    """Information criteria against K: one panel per criterion, one line per covariance
    type, each panel's minimum marked, the legend right of the panels.

    Args:
      result: a :class:`jaxem.search.SearchResult` (from :func:`jaxem.select` or
        ``GaussianMixtureIC.search_``), or the K values when the tables are given.
      criteria: with a result, the names to draw (default ``("bic", "aic", "icl")``);
        otherwise a dict ``{"BIC": (len(ks), len(cov_types)) array, ...}``.
      cov_types: the covariance types (columns), when ``result`` is the K values.
      chosen: (K, type) to mark as the chosen model (default: a result's ``best``); every
        panel also marks its own minimum.
      axes: one matplotlib axes per criterion (default: a new figure, with the legend and a
        title for the whole; given axes get the legend right of the last one).
      title: the new figure's title (default: what was searched and chosen); ``""`` for
        none.

    Returns:
      The list of axes, one per criterion.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D

    if hasattr(result, "ks") and hasattr(result, "table"):
        names = ("bic", "aic", "icl") if criteria is None else tuple(criteria)
        tables = {_CRITERION_NAMES.get(n, n): result.table(n) for n in names}
        ks, cov_types = list(result.ks), list(result.covariance_types)
        chosen = result.best if chosen is None else chosen
        searched = _CRITERION_NAMES[result.criterion]
    else:
        if not isinstance(criteria, dict) or cov_types is None:
            raise TypeError("plot_criteria takes a SearchResult, or ks with a dict of "
                            "criteria tables and the covariance types")
        ks, cov_types, tables, searched = list(result), list(cov_types), criteria, None
    tables = {name: np.asarray(v, float) for name, v in tables.items()}
    for name, v in tables.items():
        if v.shape != (len(ks), len(cov_types)):
            raise ValueError(f"criterion {name!r} has shape {v.shape}, expected "
                             f"{(len(ks), len(cov_types))} (K × covariance type)")
    if axes is None:
        fig = plt.figure(figsize=(3.6 * len(tables) + 1.6, 3.8), layout="constrained")
        axes = list(np.atleast_1d(fig.subplots(1, len(tables), sharex=True)))
        own = True
    else:
        axes = list(np.atleast_1d(axes))
        fig, own = axes[0].figure, False
    if len(axes) != len(tables):
        raise ValueError(f"axes: {len(axes)} given for {len(tables)} criteria")
    for ax, (name, values) in zip(axes, tables.items(), strict=True):
        for j, ct in enumerate(cov_types):
            ax.plot(ks, values[:, j], "-o", ms=3, color=f"C{j % 10}", label=ct)
        finite = np.where(np.isfinite(values), values, np.inf)
        i, j = np.unravel_index(np.argmin(finite), finite.shape)
        ax.plot(ks[i], values[i, j], "o", ms=11, mfc="none", mec="k", mew=1.5)
        ax.set_xticks(ks)
        ax.set_xlabel("number of components K")
        ax.set_ylabel(f"{name} (lower is better)")
        is_chosen = searched == name and chosen is not None
        ax.set_title(f"{name}: minimum K={ks[i]}, {cov_types[j]}"
                     + (" (chosen)" if is_chosen else ""), fontsize="medium")
    handles = [Line2D([], [], color=f"C{j % 10}", marker="o", ms=3, label=ct)
               for j, ct in enumerate(cov_types)]
    handles.append(Line2D([], [], ls="", marker="o", ms=9, mfc="none", mec="k", mew=1.5,
                          label="minimum"))
    if own:
        fig.legend(handles=handles, title="covariance", loc="outside right upper",
                   fontsize="small", title_fontsize="small")
        if title is None and chosen is not None:
            by = f" by {searched}" if searched else ""
            title = f"Model selection: chosen{by}: K={chosen[0]}, {chosen[1]} covariance"
        if title:
            fig.suptitle(title)
    else:
        _legend_outside(axes[-1], handles, title="covariance")
    return axes


def _drawn_texts(fig):
    """(name, window box) of every text drawn on ``fig``: titles, labels, drawn tick labels,
    annotations; each legend as one box."""
    from matplotlib.legend import Legend
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    legends = fig.findobj(Legend)
    in_legend = {id(t) for leg in legends for t in leg.findobj(Text)}
    tick_labels = {}
    for ax in fig.findobj(lambda a: hasattr(a, "xaxis") and hasattr(a, "yaxis")):
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            slack = 1e-9 * max(abs(low), abs(high), 1.0)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                drawn = low - slack <= tick.get_loc() <= high + slack
                for label in (tick.label1, tick.label2):
                    tick_labels[id(label)] = drawn
    boxes = []
    for t in fig.findobj(Text):
        if (id(t) in in_legend or not t.get_visible() or not t.get_text().strip()
                or not tick_labels.get(id(t), True)):
            continue
        boxes.append((t.get_text(), t.get_window_extent(renderer)))
    boxes += [(f"legend {i}", leg.get_window_extent(renderer))
              for i, leg in enumerate(legends) if leg.get_visible()]
    return boxes


def overlapping_text(fig, margin: float = 1.0) -> list[tuple[str, str]]:
    """Pairs of texts on ``fig`` whose boxes overlap by more than ``margin`` pixels (titles,
    axis and tick labels, annotations, legends): empty for a figure fit to print. Draws
    the figure first."""
    fig.canvas.draw()
    boxes = _drawn_texts(fig)
    pairs = []
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            (na, ba), (nb, bb) = boxes[a], boxes[b]
            dx = min(ba.x1, bb.x1) - max(ba.x0, bb.x0)
            dy = min(ba.y1, bb.y1) - max(ba.y0, bb.y0)
            if dx > margin and dy > margin:
                pairs.append((na, nb))
    return pairs


def save_figure(fig, path) -> None:
    """Save a figure to ``path`` and close it."""
    plt = _pyplot()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
