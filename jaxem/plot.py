"""matplotlib helpers (optional extra ``jaxem[plot]``); files are written with the Agg backend."""

from __future__ import annotations

import numpy as np

from jaxem._linalg import full_covariance_matrices


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
    k, d = np.shape(params.means)
    return np.asarray(full_covariance_matrices(params.covariances, params.covariance_type, k, d))


def _projection(x, params, dims):
    """2-D coordinates of data, means and covariances: two features, or the top two
    principal axes of the data (``dims="pca"``; the default when D > 2)."""
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
        _, vecs = np.linalg.eigh(np.cov(x - center, rowvar=False))
        v = vecs[:, ::-1][:, :2]  # (D, 2) top principal axes
        labels = ("principal axis 1", "principal axis 2")
        return ((x - center) @ v, (means - center) @ v,
                np.einsum("da,kde,eb->kab", v, covs, v), labels)
    i, j = dims
    return (x[:, [i, j]], means[:, [i, j]], covs[:, [i, j]][:, :, [i, j]],
            (f"feature {i}", f"feature {j}"))


def plot_mixture(x, params, ax=None, dims=None, labels=None, n_std=(1.0, 2.0)):
    """Scatter of the data with each component's covariance ellipses.

    Args:
      x: (N, D) data, D >= 2.
      params: fitted :class:`jaxem.gmm.GMMParams`.
      ax: matplotlib axes (a new figure if None).
      dims: two feature indices, or ``"pca"`` to project data, means and covariances onto
        the data's top two principal axes (a Gaussian projects to a Gaussian with covariance
        Vᵀ Σ V). Default: the two features when D = 2, else ``"pca"``.
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
    x2, means, covs, names = _projection(x, params, dims)
    colors = "0.4" if labels is None else [f"C{int(lab) % 10}" for lab in np.asarray(labels)]
    ax.scatter(x2[:, 0], x2[:, 1], c=colors, s=8, alpha=0.6)
    weights = np.asarray(params.weights)
    for k, (m, c) in enumerate(zip(means, covs, strict=True)):
        vals, vecs = np.linalg.eigh(c)
        angle = np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1]))
        for s in n_std:
            w, h = 2 * s * np.sqrt(np.maximum(vals[::-1], 0))
            ax.add_patch(Ellipse(m, w, h, angle=angle, fill=False, lw=1.5, color=f"C{k % 10}",
                                 alpha=0.4 + 0.6 * weights[k] / weights.max()))
        ax.plot(*m, "k+", ms=10)
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    return ax


def plot_log_likelihood(lower_bounds, ax=None):
    """Mean log-likelihood per EM iteration (e.g. ``GaussianMixture.lower_bounds_``)."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    lb = np.asarray(lower_bounds, float)
    lb = lb[np.isfinite(lb)]
    ax.plot(np.arange(1, len(lb) + 1), lb, "o-", ms=3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("EM iteration")
    ax.set_ylabel("mean log-likelihood")
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


def plot_em_trace(trace: dict, ax=None):
    """ℓ(θ_t) per iteration with the ELBO the M-step maximised and the KL gap between them
    (from :func:`em_trace`): EM as coordinate ascent on a lower bound."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    ll, lb, kl = trace["log_likelihood"], trace["elbo"], trace["kl"]
    t = np.arange(len(ll))
    ax.plot(t, ll, "o-", ms=3, label="log-likelihood ℓ(θ_t)")
    ax.plot(t[1:], lb, "s--", ms=3, label="ELBO(q_{t-1}, θ_t)")
    ax.fill_between(t[1:], lb, lb + kl, alpha=0.3, label="KL(q_{t-1} ‖ p(z|x,θ_t))")
    ax.set_xlabel("EM iteration t")
    ax.set_ylabel("per sample")
    ax.legend(fontsize=8)
    return ax


def plot_criteria(ks, criteria: dict, cov_types, ax=None):
    """Information criteria against K, one line per covariance type and criterion.

    Args:
      ks: the K values.
      criteria: ``{"BIC": array (len(ks), len(cov_types)), "AIC": ...}``.
      cov_types: the covariance types (columns of the arrays).
    """
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    styles = ["-", "--", ":", "-."]
    for c, (name, values) in enumerate(criteria.items()):
        values = np.asarray(values, float)
        for j, ct in enumerate(cov_types):
            ax.plot(ks, values[:, j], styles[c % 4], marker="o", ms=3, color=f"C{j % 10}",
                    label=f"{name} {ct}")
    ax.set_xticks(list(ks))
    ax.set_xlabel("number of components K")
    ax.set_ylabel("criterion (lower is better)")
    ax.legend(fontsize=7, ncol=2)
    return ax


def save_figure(fig, path) -> None:
    """Save a figure to ``path`` and close it."""
    plt = _pyplot()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
