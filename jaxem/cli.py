"""The ``jaxem`` command.

    jaxem demo [--plot demo.png] [--max-k 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from jaxem._linalg import COVARIANCE_TYPES


def _bic_table(x, ks, cov_types, n_init, seed):
    from jaxem.estimator import GaussianMixture

    models, bic = {}, np.full((len(ks), len(cov_types)), np.nan)
    for i, k in enumerate(ks):
        for j, ct in enumerate(cov_types):
            gm = GaussianMixture(k, covariance_type=ct, n_init=n_init, random_state=seed,
                                 max_iter=500)
            gm.fit(x)
            models[k, ct] = gm
            bic[i, j] = gm.bic(x)
    return models, bic


def _format_table(ks, cov_types, bic, best) -> str:
    head = "  K " + "".join(f"{ct:>12}" for ct in cov_types)
    rows = [head]
    for i, k in enumerate(ks):
        cells = ""
        for j, ct in enumerate(cov_types):
            mark = "*" if (k, ct) == best else " "
            cells += f"{bic[i, j]:>11.1f}{mark}"
        rows.append(f"{k:>3} {cells}")
    return "\n".join(rows)


def _demo(args) -> int:
    from jaxem.datasets import load_old_faithful

    if args.max_k < 1 or args.n_init < 1:
        raise ValueError("--max-k must be >= 1" if args.max_k < 1 else "--n-init must be >= 1")
    x, names = load_old_faithful()
    ks = list(range(1, args.max_k + 1))
    print(f"Old Faithful: {x.shape[0]} eruptions, features {names}")
    print(f"Fitting K = 1..{args.max_k} x covariance types {COVARIANCE_TYPES}, "
          f"{args.n_init} vmapped restarts each ...")
    t0 = time.perf_counter()
    models, bic = _bic_table(x, ks, COVARIANCE_TYPES, args.n_init, args.seed)
    i, j = np.unravel_index(np.nanargmin(bic), bic.shape)
    best = (ks[i], COVARIANCE_TYPES[j])
    gm = models[best]
    print(f"done in {time.perf_counter() - t0:.1f} s\n")
    print("BIC (lower is better; * = chosen)")
    print(_format_table(ks, COVARIANCE_TYPES, bic, best))
    print(f"\nChosen model: K={best[0]}, covariance_type={best[1]!r}, BIC={bic[i, j]:.1f}")
    print(f"converged={gm.converged_} after {gm.n_iter_} iterations, "
          f"mean log-likelihood {gm.lower_bound_:.5f}")
    for k in range(best[0]):
        m = ", ".join(f"{v:.3f}" for v in gm.means_[k])
        print(f"  component {k}: weight {gm.weights_[k]:.3f}, mean ({m})")
    print("\nPer-iteration mean log-likelihood of the chosen fit:")
    prev = None
    for it, ll in enumerate(gm.lower_bounds_, 1):
        change = "" if prev is None else f"  (change {ll - prev:+.2e})"
        print(f"  iter {it:>3}: {ll:.6f}{change}")
        prev = ll
    if args.plot:
        from jaxem.plot import _pyplot, plot_mixture, save_figure

        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6, 5))
        plot_mixture(x, gm.params_, ax=ax, labels=gm.predict(x))
        ax.set_xlabel(f"{names[0]} (min)")
        ax.set_ylabel(f"{names[1]} (min)")
        ax.set_title(f"Old Faithful: K={best[0]}, {best[1]} covariance (BIC {bic[i, j]:.1f})")
        save_figure(fig, args.plot)
        print(f"\nPlot written to {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxem", description="Expectation-Maximization in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="fit mixtures to the built-in Old Faithful data, choose K and covariance by BIC",
    )
    demo.add_argument("--plot", metavar="PNG", help="write a plot of the chosen fit here")
    demo.add_argument("--max-k", type=int, default=6, help="largest K tried (default 6)")
    demo.add_argument("--n-init", type=int, default=4, help="restarts per fit (default 4)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"jaxem {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
