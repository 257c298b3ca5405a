"""matplotlib helpers (optional extra ``jaxem[plot]``); files are written with the Agg backend."""

from __future__ import annotations

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'jaxem[plot]'") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _full_covariances(params) -> np.ndarray:
    """(K, D, D) covariances whatever the covariance type."""
    cov = np.asarray(params.covariances)
    k, d = np.asarray(params.means).shape
    if params.covariance_type == "full":
        return cov
    if params.covariance_type == "tied":
        return np.broadcast_to(cov, (k, d, d))
    if params.covariance_type == "diag":
        return np.stack([np.diag(c) for c in cov])
    return cov[:, None, None] * np.eye(d)[None]


def plot_mixture(x, params, ax=None, dims=(0, 1), labels=None, n_std=(1.0, 2.0)):
    """Scatter of the data with each component's covariance ellipses.

    Args:
      x: (N, D) data, D >= 2 (``dims`` picks the two features shown; ellipses are the
        marginal covariances on those features).
      params: fitted :class:`jaxem.gmm.GMMParams`.
      ax: matplotlib axes (a new figure if None).
      dims: the two feature indices to show.
      labels: optional (N,) labels to colour the points by.
      n_std: ellipse radii in standard deviations.

    Returns:
      The axes.
    """
    plt = _pyplot()
    from matplotlib.patches import Ellipse

    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"x must be 2-D with at least 2 features, got shape {x.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 5))
    i, j = dims
    colors = "0.4" if labels is None else [f"C{int(lab) % 10}" for lab in np.asarray(labels)]
    ax.scatter(x[:, i], x[:, j], c=colors, s=8, alpha=0.6)
    means = np.asarray(params.means)
    covs = _full_covariances(params)[:, [i, j]][:, :, [i, j]]
    weights = np.asarray(params.weights)
    for k, (m, c) in enumerate(zip(means[:, [i, j]], covs, strict=True)):
        vals, vecs = np.linalg.eigh(c)
        angle = np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1]))
        for s in n_std:
            w, h = 2 * s * np.sqrt(np.maximum(vals[::-1], 0))
            ax.add_patch(Ellipse(m, w, h, angle=angle, fill=False, lw=1.5, color=f"C{k % 10}",
                                 alpha=0.4 + 0.6 * weights[k] / weights.max()))
        ax.plot(*m, "k+", ms=10)
    ax.set_xlabel(f"feature {i}")
    ax.set_ylabel(f"feature {j}")
    return ax


def save_figure(fig, path) -> None:
    """Save a figure to ``path`` and close it."""
    plt = _pyplot()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
