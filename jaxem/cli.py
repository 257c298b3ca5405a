"""The ``jaxem`` command.

    jaxem fit DATA -k 3 [--covariance-type full] [--n-init 4] [--out model.npz] [--plot fit.png]
    jaxem select DATA --k 1:10 --covariance-type all [--criterion bic] [--out] [--plot]
    jaxem predict MODEL DATA [--proba] [--out labels.csv]
    jaxem sample MODEL -n 1000 [--seed 0] [--out samples.npy]
    jaxem demo [--plot demo.png] [--max-k 6] [--seed 0]

DATA is ``.npy``, ``.npz`` (the array ``x``/``X`` or the only one) or CSV (``.csv``/``.txt``,
comma-separated, with or without a header line); ``--columns`` picks columns by index or by
header name. Every error prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from jaxem._linalg import COVARIANCE_TYPES


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------- data files


def _split_columns(spec: str | None) -> list[str] | None:
    if spec is None:
        return None
    cols = [c.strip() for c in spec.split(",") if c.strip()]
    if not cols:
        raise ValueError("--columns is empty")
    return cols


def _pick_columns(x: np.ndarray, names: list[str] | None, cols: list[str] | None, path):
    if cols is None:
        return x
    idx = []
    for c in cols:
        if c.lstrip("-").isdigit():
            i = int(c)
            if not -x.shape[1] <= i < x.shape[1]:
                raise ValueError(f"--columns: column {i} out of range for {path} "
                                 f"({x.shape[1]} columns)")
            idx.append(i)
        elif names is not None and c in names:
            idx.append(names.index(c))
        else:
            known = f"; header: {', '.join(names)}" if names else " (the file has no header)"
            raise ValueError(f"--columns: no column named {c!r} in {path}{known}")
    return x[:, idx]


def _read_csv(path: Path) -> tuple[np.ndarray, list[str] | None]:
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"{path} has no data rows")

    def numeric(fields):
        try:
            [float(f) for f in fields]
            return True
        except ValueError:
            return False

    first = [f.strip() for f in lines[0].split(",")]
    names = None if numeric(first) else first
    rows = lines[1:] if names is not None else lines
    if not rows:
        raise ValueError(f"{path} has a header but no data rows")
    width = len(first)
    data = []
    for number, line in enumerate(rows, 2 if names is not None else 1):
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != width:
            raise ValueError(f"{path}, data line {number}: {len(fields)} fields, expected {width}")
        try:
            data.append([float(f) for f in fields])
        except ValueError:
            raise ValueError(f"{path}, data line {number}: not a number in {line!r}") from None
    return np.asarray(data), names


def load_data(path, columns: str | None = None) -> np.ndarray:
    """(N, D) float array from ``.npy``, ``.npz`` or CSV, checked for NaN/inf."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    suffix = path.suffix.lower()
    names = None
    try:
        if suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                keys = [k for k in ("x", "X") if k in npz.files] or npz.files
                if len(keys) != 1:
                    raise ValueError(f"{path} holds arrays {npz.files}: name the data 'x'")
                x = npz[keys[0]]
        elif suffix in (".csv", ".txt"):
            x, names = _read_csv(path)
        else:
            raise ValueError(f"{path}: unknown data format {suffix!r} (use .npy, .npz or .csv)")
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise ValueError(f"{path}: data must be numeric, got dtype {x.dtype}")
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{path}: data must be 2-D (samples × features), got shape {x.shape}")
    x = _pick_columns(x, names, _split_columns(columns), path)
    bad = int(np.sum(~np.isfinite(x)))
    if bad:
        raise ValueError(f"{path}: the data contain {bad} NaN or infinite value(s)")
    return x.astype(np.float64)


def write_array(a: np.ndarray, out, fmt: str = "%.10g") -> None:
    """Write to ``.npy``, or CSV (``.csv``/``.txt``); ``out=None`` prints CSV to stdout."""
    a = np.asarray(a)
    if out is None:
        np.savetxt(sys.stdout, a, delimiter=",", fmt=fmt)
        return
    out = Path(out)
    if out.suffix == ".npy":
        np.save(out, a)
    elif out.suffix in (".csv", ".txt"):
        np.savetxt(out, a, delimiter=",", fmt=fmt)
    else:
        raise ValueError(f"--out {out}: use a .npy or .csv file name")


def _parse_k_range(spec: str) -> list[int]:
    try:
        if ":" in spec:
            lo, hi = (int(v) for v in spec.split(":"))
            ks = list(range(lo, hi + 1))
        else:
            ks = [int(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(f"--k {spec!r}: expected a range like 1:10 or a list like 2,4,8") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"--k {spec!r}: every K must be >= 1")
    return ks


def _parse_cov_types(spec: str) -> list[str]:
    types = list(COVARIANCE_TYPES) if spec == "all" else [c.strip() for c in spec.split(",")]
    for t in types:
        if t not in COVARIANCE_TYPES:
            raise ValueError(f"--covariance-type {t!r}: choose from "
                             f"{', '.join(COVARIANCE_TYPES)} or all")
    return types


def _criteria_table(x, ks, cov_types, n_init, seed, max_iter=500, tol=1e-3, reg_covar=1e-6):
    """Fit every (K, type); BIC and AIC arrays of shape (len(ks), len(cov_types))."""
    from jaxem.estimator import GaussianMixture

    models = {}
    bic = np.full((len(ks), len(cov_types)), np.nan)
    aic = np.full_like(bic, np.nan)
    for i, k in enumerate(ks):
        if k > x.shape[0]:
            raise ValueError(f"K={k} is larger than the number of samples ({x.shape[0]})")
        for j, ct in enumerate(cov_types):
            gm = GaussianMixture(k, covariance_type=ct, n_init=n_init, random_state=seed,
                                 max_iter=max_iter, tol=tol, reg_covar=reg_covar)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # reported per cell below, not as a stack
                gm.fit(x)
            models[k, ct] = gm
            bic[i, j], aic[i, j] = gm.bic(x), gm.aic(x)
    return models, bic, aic


def _bic_table(x, ks, cov_types, n_init, seed):
    models, bic, _ = _criteria_table(x, ks, cov_types, n_init, seed)
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


_PRINT_LOCK = threading.Lock()


def _echo_progress(restart, iteration, log_likelihood, change):
    """Progress line printed from inside the compiled EM loop (a runtime thread)."""
    delta = f"{change:+.3e}" if np.isfinite(change) else "-"
    line = (f"  restart {restart:>2}  iter {iteration:>4}  log-likelihood "
            f"{log_likelihood:12.6f}  change {delta}\n")
    with _PRINT_LOCK:
        try:
            sys.stdout.write(line)
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):  # the reader went away (e.g. `| head`)
            pass


def _quiet_progress(restart, iteration, log_likelihood, change):
    """A no-op hook: the same callback path as printing, for measuring its overhead."""


def _enable_float64(args):
    if getattr(args, "float64", False):
        import jax

        jax.config.update("jax_enable_x64", True)


def _summary(gm, x) -> str:
    lines = [f"converged={gm.converged_} after {gm.n_iter_} iterations; mean log-likelihood "
             f"{gm.lower_bound_:.6f}; BIC {gm.bic(x):.2f}; AIC {gm.aic(x):.2f}",
             "  comp  weight  mean"]
    for k in range(gm.n_components):
        mean = ", ".join(f"{v:.4g}" for v in gm.means_[k][:8])
        more = ", ..." if gm.means_.shape[1] > 8 else ""
        lines.append(f"  {k:>4}  {gm.weights_[k]:.4f}  ({mean}{more})")
    return "\n".join(lines)


def _fit(args) -> int:
    from jaxem.estimator import GaussianMixture

    _enable_float64(args)
    _parse_cov_types(args.covariance_type)
    if args.covariance_type == "all" or "," in args.covariance_type:
        raise ValueError("--covariance-type: fit takes one type (jaxem select compares them)")
    x = load_data(args.data, args.columns)
    if args.n_components > x.shape[0]:
        raise ValueError(f"-k {args.n_components} is larger than the number of samples "
                         f"({x.shape[0]})")
    gm = GaussianMixture(args.n_components, covariance_type=args.covariance_type,
                         n_init=args.n_init, max_iter=args.max_iter, tol=args.tol,
                         reg_covar=args.reg_covar, random_state=args.seed)
    print(f"{args.data}: {x.shape[0]} samples x {x.shape[1]} features; fitting K="
          f"{args.n_components} {args.covariance_type} with {args.n_init} vmapped restart(s)")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm.fit(x.astype(np.float64 if args.float64 else np.float32),
               progress=None if args.quiet else _echo_progress)
        import jax

        jax.effects_barrier()
    print(f"done in {time.perf_counter() - t0:.2f} s (best restart "
          f"{int(gm.fit_result_.best_index)})")
    print(_summary(gm, x))
    for w in caught:
        print(f"jaxem fit: warning: {w.message}", file=sys.stderr)
    if args.out:
        print(f"model written to {gm.save(args.out)}")
    if args.plot:
        _plot_fit(gm, x, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _plot_fit(gm, x, path):
    from jaxem.plot import _pyplot, plot_log_likelihood, plot_mixture, save_figure

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    plot_mixture(x, gm.params_, ax=axes[0], labels=gm.predict(x))
    plot_log_likelihood(gm.lower_bounds_, ax=axes[1])
    save_figure(fig, path)


def _select(args) -> int:
    _enable_float64(args)
    x = load_data(args.data, args.columns)
    ks = _parse_k_range(args.k)
    cov_types = _parse_cov_types(args.covariance_type)
    if max(ks) > x.shape[0]:
        raise ValueError(f"--k {args.k}: K={max(ks)} is larger than the number of samples "
                         f"({x.shape[0]})")
    print(f"{args.data}: {x.shape[0]} samples x {x.shape[1]} features; K in {ks}, "
          f"covariance types {cov_types}, {args.n_init} vmapped restart(s) each")
    t0 = time.perf_counter()
    models, bic, aic = _criteria_table(
        x.astype(np.float64 if args.float64 else np.float32), ks, cov_types, args.n_init,
        args.seed, args.max_iter, args.tol, args.reg_covar)
    score = bic if args.criterion == "bic" else aic
    i, j = np.unravel_index(np.nanargmin(score), score.shape)
    best = (ks[i], cov_types[j])
    print(f"done in {time.perf_counter() - t0:.1f} s\n")
    for name, table in (("BIC", bic), ("AIC", aic)):
        mark = best if name.lower() == args.criterion else None
        print(f"{name} (lower is better{'; * = chosen' if mark else ''})")
        print(_format_table(ks, cov_types, table, mark) + "\n")
    gm = models[best]
    print(f"Chosen by {args.criterion.upper()}: K={best[0]}, covariance_type={best[1]!r}")
    print(_summary(gm, x))
    not_converged = [f"K={k} {ct}" for (k, ct), m in models.items() if not m.converged_]
    if not_converged:
        print(f"jaxem select: warning: did not converge within --max-iter: "
              f"{', '.join(not_converged)}", file=sys.stderr)
    if args.out:
        print(f"model written to {gm.save(args.out)}")
    if args.plot:
        from jaxem.plot import _pyplot, plot_criteria, save_figure

        fig, ax = _pyplot().subplots(figsize=(6, 4))
        plot_criteria(ks, {"BIC": bic, "AIC": aic}, cov_types, ax=ax)
        save_figure(fig, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _load_model(path):
    from jaxem.estimator import GaussianMixture

    return GaussianMixture.load(path)


def _predict(args) -> int:
    gm = _load_model(args.model)
    x = load_data(args.data, args.columns)
    if x.shape[1] != gm.n_features_in_:
        raise ValueError(f"{args.data} has {x.shape[1]} features but the model was fitted on "
                         f"{gm.n_features_in_}")
    x = x.astype(gm.means_.dtype)
    if args.proba:
        write_array(gm.predict_proba(x), args.out, fmt="%.8g")
    else:
        write_array(gm.predict(x)[:, None], args.out, fmt="%d")
    if args.out:
        print(f"{'probabilities' if args.proba else 'labels'} of {x.shape[0]} samples "
              f"written to {args.out}")
    return 0


def _sample(args) -> int:
    if args.n_samples < 1:
        raise ValueError(f"-n {args.n_samples}: the number of samples must be >= 1")
    gm = _load_model(args.model)
    gm.random_state = args.seed
    x, labels = gm.sample(args.n_samples)
    out = np.column_stack([x, labels]) if args.labels else x
    write_array(out, args.out)
    if args.out:
        print(f"{args.n_samples} samples written to {args.out}")
    return 0


def _add_fit_options(p, k_default=None):
    p.add_argument("--covariance-type", default="full",
                   help="full, tied, diag, spherical" + (" or all, or a comma list"
                                                         if k_default else "")
                   + " (default full)")
    p.add_argument("--n-init", type=int, default=1, help="vmapped restarts (default 1)")
    p.add_argument("--max-iter", type=int, default=100, help="EM iteration cap (default 100)")
    p.add_argument("--tol", type=float, default=1e-3,
                   help="stop when the mean log-likelihood changes less (default 1e-3)")
    p.add_argument("--reg-covar", type=float, default=1e-6,
                   help="added to covariance diagonals (default 1e-6)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--float64", action="store_true", help="compute in float64")
    p.add_argument("--columns", help="comma list of column indices or header names")
    p.add_argument("--out", metavar="MODEL.npz", help="save the (chosen) model here")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxem", description="Expectation-Maximization in JAX: Gaussian "
                     "mixtures from the command line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = sub.add_parser("fit", help="fit a Gaussian mixture to a data file",
                         description="Fit a Gaussian mixture by EM, printing the "
                         "log-likelihood of every iteration from inside the compiled loop.")
    fit.add_argument("data", help="data file: .npy, .npz or .csv")
    fit.add_argument("-k", "--n-components", type=int, default=1,
                     help="number of components (default 1)")
    _add_fit_options(fit)
    fit.add_argument("--plot", metavar="PNG", help="write the fit and its convergence here")
    fit.add_argument("--quiet", action="store_true", help="no per-iteration progress")
    fit.set_defaults(func=_fit)

    select = sub.add_parser("select", help="choose K and covariance type by BIC or AIC",
                            description="Fit every K and covariance type (restarts vmapped) "
                            "and tabulate BIC and AIC.")
    select.add_argument("data", help="data file: .npy, .npz or .csv")
    select.add_argument("--k", default="1:10", help="range a:b or list a,b,c (default 1:10)")
    select.add_argument("--criterion", choices=["bic", "aic"], default="bic",
                        help="what chooses the model (default bic)")
    _add_fit_options(select, k_default=True)
    select.add_argument("--plot", metavar="PNG", help="write the BIC/AIC curves here")
    select.set_defaults(func=_select)

    predict = sub.add_parser("predict", help="labels or probabilities from a saved model",
                             description="Component labels (or --proba responsibilities) "
                             "of the samples in DATA under a saved model.")
    predict.add_argument("model", help="model file written by jaxem fit/select --out")
    predict.add_argument("data", help="data file: .npy, .npz or .csv")
    predict.add_argument("--proba", action="store_true", help="write (N, K) probabilities")
    predict.add_argument("--columns", help="comma list of column indices or header names")
    predict.add_argument("--out", help=".npy or .csv file (default: CSV on stdout)")
    predict.set_defaults(func=_predict)

    sample = sub.add_parser("sample", help="draw samples from a saved model",
                            description="Draw samples from a saved mixture.")
    sample.add_argument("model", help="model file written by jaxem fit/select --out")
    sample.add_argument("-n", "--n-samples", type=int, default=1, help="how many (default 1)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sample.add_argument("--labels", action="store_true",
                        help="append each sample's component as a last column")
    sample.add_argument("--out", help=".npy or .csv file (default: CSV on stdout)")
    sample.set_defaults(func=_sample)

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
    except BrokenPipeError:  # the reader of stdout went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, TypeError, OSError, ImportError, KeyError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"jaxem {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxem {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback: one line, and a non-zero status
        message = " ".join(str(e).split())[:300]
        print(f"jaxem {args.command}: internal error: {type(e).__name__}: {message}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
