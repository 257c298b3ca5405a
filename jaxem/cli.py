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

from jaxem import search
from jaxem._linalg import COVARIANCE_TYPES


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------- data files


def _split_columns(spec: str | None, flag: str = "--columns") -> list[str] | None:
    if spec is None:
        return None
    cols = [c.strip() for c in spec.split(",") if c.strip()]
    if not cols:
        raise ValueError(f"{flag} is empty")
    return cols


def _column_indices(spec: list[str], names: list[str] | None, width: int, path,
                    flag: str) -> list[int]:
    """Indices named by a list of column indices, header names and ranges ``a:b`` (Python's
    slice: ``b`` excluded, either end may be left out, negative counts from the end)."""
    idx = []
    for c in spec:
        if ":" in c:
            parts = c.split(":")
            if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() or not p.strip()
                                          for p in parts):
                raise ValueError(f"{flag}: {c!r} is not a range a:b of column indices")
            lo, hi = (int(p) if p.strip() else None for p in parts)
            chosen = list(range(width))[lo:hi]
            if not chosen:
                raise ValueError(f"{flag}: the range {c!r} selects no column of {path} "
                                 f"({width} columns)")
            idx.extend(chosen)
        elif c.lstrip("-").isdigit():
            i = int(c)
            if not -width <= i < width:
                raise ValueError(f"{flag}: column {i} out of range for {path} ({width} columns)")
            idx.append(i % width)
        elif names is not None and c in names:
            idx.append(names.index(c))
        else:
            known = f"; header: {', '.join(names)}" if names else " (the file has no header)"
            raise ValueError(f"{flag}: no column named {c!r} in {path}{known}")
    return idx


def _pick_columns(x: np.ndarray, names: list[str] | None, cols: list[str] | None, path,
                  drop: list[str] | None = None):
    """Columns kept (``--columns``) less those dropped (``--drop``), and their names."""
    width = x.shape[1]
    keep = list(range(width)) if cols is None else _column_indices(cols, names, width, path,
                                                                   "--columns")
    if drop is not None:
        gone = set(_column_indices(drop, names, width, path, "--drop"))
        keep = [i for i in keep if i not in gone]
        if not keep:
            raise ValueError(f"--drop leaves no column of {path}")
    kept_names = None if names is None else [names[i] for i in keep]
    return x[:, keep], kept_names


def _read_csv(path: Path) -> tuple[np.ndarray, list[str] | None]:
    try:  # utf-8-sig: a byte-order mark is dropped, not taken for part of the first field
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the "
                         "file as UTF-8") from None
    lines = [ln.strip() for ln in text.splitlines()]
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


def _check_npy_header(f, path, stored_bytes: int | None = None) -> None:
    """Refuse, from its header alone, an ``.npy`` array that could not be loaded: more data
    declared than the file holds, or than this machine's memory."""
    from jaxem._validation import check_allocation
    from jaxem.io import read_npy_header

    shape, _, dtype = read_npy_header(f)
    n_bytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if stored_bytes is not None and n_bytes > stored_bytes:
        raise ValueError(f"{path}: the array header declares shape {shape} ({n_bytes} bytes) "
                         f"but the file holds {stored_bytes} bytes (truncated or damaged)")
    check_allocation(2 * n_bytes, f"loading {path} (shape {shape}, {dtype})")


def _load_npz(path: Path):
    import zipfile

    with zipfile.ZipFile(path) as zf:
        members = [n.removesuffix(".npy") for n in zf.namelist()]
        keys = [k for k in ("x", "X") if k in members] or members
        if len(keys) != 1:
            raise ValueError(f"{path} holds arrays {members}: name the data 'x'")
        info = zf.getinfo(keys[0] + ".npy")
        with zf.open(info) as f:
            _check_npy_header(f, path, info.file_size)
    with np.load(path, allow_pickle=False) as npz:
        return npz[keys[0]]


def load_data(path, columns: str | None = None, drop: str | None = None,
              with_names: bool = False):
    """(N, D) float array from ``.npy``, ``.npz`` or CSV, checked for NaN/inf; with
    ``with_names`` also the kept columns' header names (None without a header)."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    suffix = path.suffix.lower()
    names = None
    try:
        if suffix == ".npy":
            with open(path, "rb") as f:
                _check_npy_header(f, path, path.stat().st_size - 10)
            x = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            x = _load_npz(path)
        elif suffix in (".csv", ".txt"):
            x, names = _read_csv(path)
        else:
            raise ValueError(f"{path}: unknown data format {suffix!r} (use .npy, .npz or .csv)")
    except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError,
            RuntimeError, KeyError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"cannot read {path}: {message}") from None
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise ValueError(f"{path}: data must be numeric, got dtype {x.dtype}")
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{path}: data must be 2-D (samples × features), got shape {x.shape}")
    x, names = _pick_columns(x, names, _split_columns(columns),
                             path, _split_columns(drop, "--drop"))
    bad = int(np.sum(~np.isfinite(x)))
    if bad:
        raise ValueError(f"{path}: the data contain {bad} NaN or infinite value(s)")
    x = x.astype(np.float64)
    return (x, names) if with_names else x


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


def _parse_screen(spec: str | None) -> tuple[int, int] | None:
    """``--screen``: ``ITERATIONS,KEPT`` or ``off`` (None: the search's default)."""
    if spec is None:
        return search.SEARCH_SCREEN
    if spec.strip().lower() == "off":
        return None
    parts = spec.split(",")
    try:
        screen = tuple(int(v) for v in parts)
    except ValueError:
        screen = ()
    if len(screen) != 2 or min(screen) < 1:
        raise ValueError(f"--screen must be ITERATIONS,KEPT (two positive integers) or off, "
                         f"got {spec!r}")
    return screen


def _parse_k_range(spec: str, n_samples: int | None = None) -> list[int] | None:
    """The K of ``--k`` (``a:b`` inclusive, or ``a,b,c``), checked against ``n_samples``
    before the list is made (a range to 10⁹ is refused, not allocated). Without
    ``n_samples`` only the syntax is checked and nothing is returned."""
    try:
        if ":" in spec:
            lo, hi = (int(v) for v in spec.split(":"))
            values = None
        else:
            values = [int(v) for v in spec.split(",")]
            lo, hi = min(values), max(values)
    except ValueError:
        raise ValueError(f"--k {spec!r}: expected a range like 1:10 or a list like 2,4,8") from None
    if lo < 1:
        raise ValueError(f"--k {spec!r}: every K must be >= 1, got {lo}")
    if values is None and lo > hi:
        raise ValueError(f"--k {spec!r}: the range is empty ({lo} > {hi}); write it low:high")
    if n_samples is not None and hi > n_samples:
        raise ValueError(f"--k {spec!r}: K={hi} is larger than the number of samples "
                         f"({n_samples})")
    if n_samples is None:
        return None
    return list(range(lo, hi + 1)) if values is None else values


def _parse_cov_types(spec: str) -> list[str]:
    types = list(COVARIANCE_TYPES) if spec == "all" else [c.strip() for c in spec.split(",")]
    for t in types:
        if t not in COVARIANCE_TYPES:
            raise ValueError(f"--covariance-type {t!r}: choose from "
                             f"{', '.join(COVARIANCE_TYPES)} or all")
    return types


def _search(x, ks, cov_types, n_init, seed, max_iter=100, tol=1e-3, reg_covar=1e-6,
            criterion="bic", progress=None, screen=search.SEARCH_SCREEN):
    """Every (K, type) by :func:`jaxem.select` (a program per type, or one for all on
    small data): the
    :class:`jaxem.search.SearchResult`. The functional search, not the estimator: the
    command then never imports scikit-learn (0.7 s of a short run)."""
    from jaxem.search import select

    if max(ks) > x.shape[0]:
        raise ValueError(f"K={max(ks)} is larger than the number of samples ({x.shape[0]})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported per cell by the caller, not as a stack
        return select(x, ks, cov_types, criterion=criterion, n_init=n_init, seed=seed,
                      max_iter=max_iter, tol=tol, reg_covar=reg_covar, progress=progress,
                      screen=screen)


def _print_models(done) -> None:
    """A line per model of a covariance type whose program has run (``select``'s hook)."""
    lines = [f"  [{done.index + 1}/{done.n_types}] {done.covariance_type}: {len(done.ks)} "
             f"model(s) in {done.seconds:.1f} s"]
    for i, k in enumerate(done.ks):
        state = ("failed (non-finite value)" if done.failed[i] else
                 f"converged in {done.n_iter[i]} iterations" if done.converged[i] else
                 f"not converged after {done.n_iter[i]} iterations")
        lines.append(f"      K={k:<3} {done.covariance_type:<9} BIC {done.bic[i]:12.1f}  "
                     f"AIC {done.aic[i]:12.1f}  ICL {done.icl[i]:12.1f}  {state}")
    print("\n".join(lines), flush=True)


def _print_type(done) -> None:
    """A line per covariance type whose program has run (the demo's short progress)."""
    print(f"  [{done.index + 1}/{done.n_types}] {done.covariance_type}: {len(done.ks)} "
          f"models in {done.seconds:.1f} s", flush=True)


def _chosen(result):
    """(K, type, row, column, params) of the search's chosen model."""
    k, cov_type = result.best
    return (k, cov_type, result.ks.index(k), result.covariance_types.index(cov_type),
            result.params[k, cov_type])


def _labels(params, x) -> np.ndarray:
    from jaxem import gmm

    return np.asarray(np.argmax(gmm.log_joint(params, np.asarray(x, params.means.dtype)), 1))


def _compile_totals() -> dict:
    from jaxem._cache import compile_totals

    return compile_totals()


def _compile_line(start: dict) -> str:
    """What compilation cost since ``start`` (a :func:`compile_totals` snapshot)."""
    from jaxem._cache import compile_totals

    now = compile_totals()
    d = {k: now[k] - start[k] for k in now}
    return (f"compilation: {d['compile']:.2f} s in {d['programs']} program(s) (XLA), "
            f"tracing {d['trace']:.2f} s, lowering {d['lower']:.2f} s")


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
    _check_seed(args.seed)
    _check_output(args.plot, "--plot")
    x, names = load_old_faithful()
    if args.max_k > x.shape[0]:
        raise ValueError(f"--max-k {args.max_k} is larger than the number of samples "
                         f"({x.shape[0]})")
    ks = list(range(1, args.max_k + 1))
    print(f"Old Faithful: {x.shape[0]} eruptions, features {names}")
    print(f"Fitting K = 1..{args.max_k} x covariance types {COVARIANCE_TYPES}, "
          f"{args.n_init} vmapped restarts each ...")
    t0 = time.perf_counter()
    compiled = _compile_totals()
    result = _search(x, ks, COVARIANCE_TYPES, args.n_init, args.seed, max_iter=500,
                     progress=_print_type)
    bic = result.bic
    k, cov_type, i, j, params = _chosen(result)
    print(f"done in {time.perf_counter() - t0:.1f} s (all K and restarts in one compiled "
          "program; on data this small, all covariance types too)")
    if args.verbose:
        print(_compile_line(compiled))
    print()
    print("BIC (lower is better; * = chosen)")
    print(_format_table(ks, COVARIANCE_TYPES, bic, (k, cov_type)))
    history = result.lower_bounds[k, cov_type]
    print(f"\nChosen model: K={k}, covariance_type={cov_type!r}, BIC={bic[i, j]:.1f}")
    print(f"converged={bool(result.converged[i, j])} after {result.n_iter[i, j]} iterations, "
          f"mean log-likelihood {result.log_likelihood[i, j]:.5f}")
    for c in range(k):
        m = ", ".join(f"{v:.3f}" for v in np.asarray(params.means)[c])
        print(f"  component {c}: weight {float(params.weights[c]):.3f}, mean ({m})")
    print("\nPer-iteration mean log-likelihood of the chosen fit:")
    prev = None
    for it, ll in enumerate(history, 1):
        change = "" if prev is None else f"  (change {ll - prev:+.2e})"
        print(f"  iter {it:>3}: {ll:.6f}{change}")
        prev = ll
    if args.plot:
        from jaxem.plot import _pyplot, fit_title, plot_criteria, plot_mixture, save_figure

        plt = _pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
        plot_mixture(x, params, ax=axes[0], labels=_labels(params, x),
                     feature_names=[f"{n} (min)" for n in names],
                     title=f"Old Faithful: {fit_title(params, x.shape[0])}")
        plot_criteria(result, criteria=("bic",), axes=[axes[1]])
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


def _summary_lines(converged, n_iter, mean_ll, bic, aic, params) -> str:
    lines = [f"converged={converged} after {n_iter} iterations; mean log-likelihood "
             f"{mean_ll:.6f}; BIC {bic:.2f}; AIC {aic:.2f}", "  comp  weight  mean"]
    means, weights = np.asarray(params.means), np.asarray(params.weights)
    for c in range(means.shape[0]):
        mean = ", ".join(f"{v:.4g}" for v in means[c][:8])
        more = ", ..." if means.shape[1] > 8 else ""
        lines.append(f"  {c:>4}  {weights[c]:.4f}  ({mean}{more})")
    return "\n".join(lines)


def _summary(gm, x) -> str:
    return _summary_lines(gm.converged_, gm.n_iter_, gm.lower_bound_, gm.bic(x), gm.aic(x),
                          gm.params_)


def _check_output(path, flag: str, suffixes: tuple[str, ...] | None = None) -> None:
    """Before any work: the folder of an output file exists and is writable, and the name
    has a suffix that will be written."""
    if path is None:
        return
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ValueError(f"{flag} {path}: use a file name ending in {' or '.join(suffixes)}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: no such folder {folder}")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path}: the folder {folder} is not writable")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder")


def _check_seed(seed: int) -> int:
    if not 0 <= seed < 2**32:
        raise ValueError(f"--seed {seed}: must be between 0 and 2**32 - 1")
    return seed


def _check_fit_options(args) -> None:
    """Every option of fit/select checked before data are read or anything compiled."""
    _check_seed(args.seed)
    for flag, value, low in (("--n-init", args.n_init, 1), ("--max-iter", args.max_iter, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} {value}: must be >= {low}")
    if not np.isfinite(args.tol):
        raise ValueError(f"--tol {args.tol}: must be finite")
    if not (np.isfinite(args.reg_covar) and args.reg_covar >= 0):
        raise ValueError(f"--reg-covar {args.reg_covar}: must be finite and >= 0")
    _check_output(args.out, "--out", (".npz",))
    _check_output(args.plot, "--plot")


def parse_size(text: str, flag: str = "--memory-budget") -> int:
    """Bytes from ``"512M"``, ``"4G"``, ``"1.5GB"``, ``"2e9"``."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give a size such as 512M, 4G or 2e9") from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{flag} {text!r}: must be a positive size")
    return int(value)


def default_memory_budget() -> int:
    """A quarter of this machine's physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 * 2**30


class _BlockEcho:
    """Per-block progress of a long streamed iteration, at most every 2 s."""

    def __init__(self):
        self.last = 0.0

    def __call__(self, iteration, rows, n_rows):
        now = time.perf_counter()
        if now - self.last < 2.0:
            return
        self.last = now
        share = f" ({100 * rows / n_rows:.0f}%)" if n_rows else ""
        with _PRINT_LOCK:
            print(f"    iter {iteration:>4}: {rows:,} rows{share}", flush=True)


def _join_run(args):
    """``--coordinator``: join the distributed run; returns (process index, count)."""
    if args.coordinator is None:
        if args.num_processes != 1 or args.process_id != 0:
            raise ValueError("--num-processes and --process-id need --coordinator HOST:PORT")
        return 0, 1
    from jaxem import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           timeout=args.join_timeout)
    return args.process_id, args.num_processes


def _streams(args, path: Path, share: float) -> bool:
    """Whether ``jaxem fit`` streams the data: ``--stream``, a run of several processes
    (``share`` < 1), or a ``.npy`` larger than the memory budget."""
    if path.suffix.lower() != ".npy":
        if args.stream:
            raise ValueError(f"--stream: only .npy files are streamed, not {path.suffix!r}")
        return False
    budget = (default_memory_budget() if args.memory_budget is None
              else parse_size(args.memory_budget))
    return args.stream or share < 1 or path.stat().st_size * share > budget


def _fit_streamed(args, gm, rank, n_processes) -> int:
    """``jaxem fit`` on a ``.npy`` read block by block (this process's rows only)."""
    import jax

    from jaxem import blocks, gmm, streamed
    from jaxem.distributed import process_rows

    if args.columns or args.drop:
        raise ValueError("--columns/--drop: a streamed file is read whole; write the columns "
                         "to fit into a .npy of their own")
    if args.plot:
        _check_output(args.plot, "--plot")
    whole = blocks.HostData(args.data)
    n = whole.n_rows
    if args.n_components > n:
        raise ValueError(f"-k {args.n_components} is larger than the number of samples ({n})")
    data = blocks.HostData(args.data, rows=process_rows(n, rank, n_processes))
    lead = rank == 0
    if lead:
        where = f"; process rows {data.n_rows:,} of {n:,}" if n_processes > 1 else ""
        print(f"{args.data}: {n} samples x {whole.n_features} features, streamed from disk "
              f"in blocks{where}; fitting K={args.n_components} {args.covariance_type} with "
              f"{args.n_init} restart(s)", flush=True)
    t0 = time.perf_counter()
    compiled = _compile_totals()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm.fit(data, progress=_echo_progress if lead and not args.quiet else None,
               block_progress=_BlockEcho() if lead and not args.quiet else None)
    model = gmm.GaussianMixtureModel(gm.covariance_type)
    _, ll = streamed.e_step(model, data, gm.params_)  # all processes take part
    if not lead:
        return 0
    print(f"done in {time.perf_counter() - t0:.2f} s (best restart "
          f"{int(gm.fit_result_.best_index)})")
    if args.verbose:
        print(_compile_line(compiled))
    p = gmm.n_parameters(gm.params_)
    print(_summary_lines(gm.converged_, gm.n_iter_, float(ll), -2 * n * float(ll)
                         + p * np.log(n), -2 * n * float(ll) + 2 * p, gm.params_))
    for w in caught:
        print(f"jaxem fit: warning: {w.message}", file=sys.stderr)
    if args.out:
        print(f"model written to {gm.save(args.out)}")
    if args.plot:  # drawn on a random sample of the rows
        sample, _ = blocks.subsample(data, 5000, args.seed, np.float64)
        _plot_fit(gm, sample, args.plot, args.data)
        print(f"plot written to {args.plot} (a sample of {len(sample)} rows)")
    jax.effects_barrier()
    return 0


def _fit(args) -> int:
    from jaxem.estimator import GaussianMixture

    _enable_float64(args)
    _parse_cov_types(args.covariance_type)
    if args.covariance_type == "all" or "," in args.covariance_type:
        raise ValueError("--covariance-type: fit takes one type (jaxem select compares them)")
    if args.n_components < 1:
        raise ValueError(f"-k {args.n_components}: must be >= 1")
    _check_fit_options(args)
    if args.memory_budget is not None:
        parse_size(args.memory_budget)
    path = Path(args.data)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    rank, n_processes = _join_run(args)
    if _streams(args, path, 1 / n_processes):
        gm = GaussianMixture(args.n_components, covariance_type=args.covariance_type,
                             n_init=args.n_init, max_iter=args.max_iter, tol=args.tol,
                             reg_covar=args.reg_covar, random_state=args.seed)
        return _fit_streamed(args, gm, rank, n_processes)
    if n_processes > 1:
        raise ValueError("--coordinator: a run of several processes streams a .npy file "
                         "(each process its share of the rows); convert the data to .npy")
    x, names = load_data(args.data, args.columns, args.drop, with_names=True)
    if args.n_components > x.shape[0]:
        raise ValueError(f"-k {args.n_components} is larger than the number of samples "
                         f"({x.shape[0]})")
    gm = GaussianMixture(args.n_components, covariance_type=args.covariance_type,
                         n_init=args.n_init, max_iter=args.max_iter, tol=args.tol,
                         reg_covar=args.reg_covar, random_state=args.seed)
    print(f"{args.data}: {x.shape[0]} samples x {x.shape[1]} features; fitting K="
          f"{args.n_components} {args.covariance_type} with {args.n_init} vmapped restart(s)")
    t0 = time.perf_counter()
    compiled = _compile_totals()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # float64 data: the estimator fits them in float32 unless --float64 turned x64 on,
        # and checks on the way that float32 can hold them.
        x = _named(x, names)
        gm.fit(x, progress=None if args.quiet else _echo_progress)
        import jax

        jax.effects_barrier()
    print(f"done in {time.perf_counter() - t0:.2f} s (best restart "
          f"{int(gm.fit_result_.best_index)})")
    if args.verbose:
        print(_compile_line(compiled))
    print(_summary(gm, x))
    for w in caught:
        print(f"jaxem fit: warning: {w.message}", file=sys.stderr)
    if args.out:
        print(f"model written to {gm.save(args.out)}")
    if args.plot:
        _plot_fit(gm, x, args.plot, args.data)
        print(f"plot written to {args.plot}")
    return 0


def _plot_fit(gm, x, path, source=None):
    from jaxem.plot import _pyplot, fit_title, plot_log_likelihood, plot_mixture, save_figure

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained",
                             width_ratios=[1.25, 1.0])
    where = f"{Path(source).name}: " if source else ""
    plot_mixture(x, gm.params_, ax=axes[0], labels=gm.predict(x),
                 title=where + fit_title(gm.params_, np.shape(x)[0]))
    plot_log_likelihood(gm.lower_bounds_, ax=axes[1])
    save_figure(fig, path)


class _NamedColumns(np.ndarray):
    """An array with the header's column names as ``columns``, as a DataFrame has: the
    estimator keeps them as ``feature_names_in_`` (and the model file carries them)."""

    columns = None

    def __array_finalize__(self, obj):
        self.columns = getattr(obj, "columns", None)


def _named(x: np.ndarray, names: list[str] | None) -> np.ndarray:
    if names is None:
        return x
    out = x.view(_NamedColumns)
    out.columns = list(names)
    return out


def _select(args) -> int:
    _enable_float64(args)
    _parse_k_range(args.k)  # its syntax, before the data are read
    screen = _parse_screen(args.screen)
    cov_types = _parse_cov_types(args.covariance_type)
    _check_fit_options(args)
    x, names = load_data(args.data, args.columns, args.drop, with_names=True)
    ks = _parse_k_range(args.k, x.shape[0])
    if args.n_init is None:
        args.n_init = search.default_n_init(x.shape[0])
    print(f"{args.data}: {x.shape[0]} samples x {x.shape[1]} features; K in {ks}, "
          f"covariance types {cov_types}, {args.n_init} vmapped restart(s) each")
    print("one compiled program per covariance type (one for all on small data); a line "
          "per model as each type finishes:", flush=True)
    t0 = time.perf_counter()
    compiled = _compile_totals()
    result = _search(x, ks, cov_types, args.n_init, args.seed, args.max_iter, args.tol,
                     args.reg_covar, args.criterion, progress=_print_models,
                     screen=screen)
    k, cov_type, i, j, params = _chosen(result)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    if args.verbose:
        print(_compile_line(compiled))
    print()
    for name in ("bic", "aic", "icl"):
        mark = (k, cov_type) if name == args.criterion else None
        print(f"{name.upper()} (lower is better{'; * = chosen' if mark else ''})")
        print(_format_table(ks, cov_types, result.table(name), mark) + "\n")
    print(f"Chosen by {args.criterion.upper()}: K={k}, covariance_type={cov_type!r}")
    print(_summary_lines(bool(result.converged[i, j]), int(result.n_iter[i, j]),
                         float(result.log_likelihood[i, j]), float(result.bic[i, j]),
                         float(result.aic[i, j]), params))
    not_converged = [f"K={kk} {ct}" for a, kk in enumerate(ks)
                     for b, ct in enumerate(cov_types) if not result.converged[a, b]]
    if not_converged:
        print(f"jaxem select: warning: did not converge within --max-iter: "
              f"{', '.join(not_converged)}", file=sys.stderr)
    if args.out:
        from jaxem import io

        history = result.lower_bounds[k, cov_type]
        settings = {"n_components": k, "covariance_type": cov_type, "n_init": args.n_init,
                    "max_iter": args.max_iter, "tol": args.tol, "reg_covar": args.reg_covar,
                    "random_state": args.seed, "init_params": "k-means++"}
        path = io.save(args.out, params, settings=settings,
                       converged=bool(result.converged[i, j]), n_iter=int(result.n_iter[i, j]),
                       lower_bound=float(history[-1]) if len(history) else None,
                       feature_names=names)
        print(f"model written to {path}")
    if args.plot:
        from jaxem.plot import plot_criteria, save_figure

        fig = plot_criteria(result)[0].figure
        save_figure(fig, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _load_model(path):
    from jaxem.estimator import GaussianMixture

    return GaussianMixture.load(path)


def _match_columns(x, names, gm, path):
    """Columns of the data in the model's order: by header name when both the model and the
    file have names (a reordered file gives the same labels; a missing name is refused),
    else by position."""
    fitted = getattr(gm, "feature_names_in_", None)
    if fitted is None or names is None:
        if x.shape[1] != gm.n_features_in_:
            raise ValueError(f"{path} has {x.shape[1]} features but the model was fitted on "
                             f"{gm.n_features_in_}")
        return x
    fitted = [str(n) for n in fitted]
    missing = [n for n in fitted if n not in names]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {missing} the model was fitted on "
                         f"(model: {', '.join(fitted)}; file: {', '.join(names)})")
    return x[:, [names.index(n) for n in fitted]]


def _predict(args) -> int:
    _check_output(args.out, "--out", (".npy", ".csv", ".txt"))
    gm = _load_model(args.model)
    x, names = load_data(args.data, args.columns, args.drop, with_names=True)
    # Columns now in the model's order (by name, or by position for a file without a
    # header): they carry the model's names, so the estimator's own check agrees.
    fitted = getattr(gm, "feature_names_in_", None)
    x = _named(_match_columns(x, names, gm, args.data),
               None if fitted is None else [str(n) for n in fitted])
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
    _check_seed(args.seed)
    _check_output(args.out, "--out", (".npy", ".csv", ".txt"))
    gm = _load_model(args.model)
    gm.random_state = args.seed
    x, labels = gm.sample(args.n_samples)
    out = np.column_stack([x, labels]) if args.labels else x
    write_array(out, args.out)
    if args.out:
        print(f"{args.n_samples} samples written to {args.out}")
    return 0


def _parse_shapes(spec: str) -> list[tuple[int, int]]:
    """``--shapes 8x8,32x16``: (D, K) pairs."""
    shapes = []
    for part in spec.split(","):
        d, _, k = part.strip().partition("x")
        if not (d.isdigit() and k.isdigit() and int(d) >= 1 and int(k) >= 1):
            raise ValueError(f"--shapes {spec!r}: give DxK pairs of positive integers, "
                             "e.g. 8x8,32x16")
        shapes.append((int(d), int(k)))
    return shapes


def _tune_blocks(args) -> int:
    import jax

    from jaxem import _cache, tuning

    if args.reset:
        print(f"forgot this machine's block budgets in {_cache.store_block_budgets({})}")
        return 0
    for name in ("n", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)}: must be >= 1")
    shapes = tuning.TUNING_SHAPES if args.shapes is None else _parse_shapes(args.shapes)
    types = _parse_cov_types(args.covariance_type)
    factors = ", ".join(f"x{f:g}" for f in tuning.TUNING_FACTORS)
    print(f"timing the E-step at N={args.n} (float32) on {jax.devices()[0].device_kind} for "
          f"{len(shapes)} shape(s) x {len(types)} type(s), block budgets {factors} the "
          "built-in one:", flush=True)
    tuning.tune_block_budgets(args.n, shapes, types, repeats=args.repeats,
                              store=not args.dry_run,
                              report=lambda line: print("  " + line, flush=True))
    if args.dry_run:
        print("(--dry-run: nothing recorded)")
    else:
        print(f"recorded for this machine in {_cache.tuning_file()}; "
              f"{_cache.TUNING_ENV}=1 ignores it, --reset forgets it")
    return 0


def _add_fit_options(p, k_default=None):
    p.add_argument("--covariance-type", default="full",
                   help="full, tied, diag, spherical" + (" or all, or a comma list"
                                                         if k_default else "")
                   + " (default full)")
    if k_default:  # a search: jaxem.select's defaults (chosen to find mclust's optima)
        p.add_argument("--n-init", type=int, default=None,
                       help=f"vmapped restarts per model (default "
                            f"{search.MAX_SEARCH_N_INIT} up to 1,024 rows, halved as the rows "
                            f"double, at least {search.MIN_SEARCH_N_INIT})")
    else:
        p.add_argument("--n-init", type=int, default=1, help="vmapped restarts (default 1)")
    p.add_argument("--max-iter", type=int, default=100, help="EM iteration cap (default 100)")
    if k_default:
        p.add_argument("--screen", metavar="ITERATIONS,KEPT",
                       help="run every restart this many iterations, then only the best KEPT "
                            "per model to the end; 'off': every restart to the end (default "
                            f"{','.join(map(str, search.SEARCH_SCREEN))})")
    tol = search.SEARCH_TOL if k_default else 1e-3
    p.add_argument("--tol", type=float, default=tol,
                   help=f"stop when the mean log-likelihood changes less (default {tol:g})")
    p.add_argument("--reg-covar", type=float, default=1e-6,
                   help="added to covariance diagonals (default 1e-6)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--float64", action="store_true", help="compute in float64")
    p.add_argument("--verbose", action="store_true",
                   help="also print the time spent compiling")
    _add_column_options(p)
    p.add_argument("--out", metavar="MODEL.npz", help="save the (chosen) model here")


def _add_column_options(p):
    p.add_argument("--columns", help="comma list of column indices, header names and ranges "
                   "a:b (Python's slice: b excluded; e.g. 0:13)")
    p.add_argument("--drop", help="comma list of columns to leave out (indices, names or "
                   "ranges), e.g. a class label: --drop target")


def _version_line() -> str:
    from importlib.metadata import version

    from jaxem import __version__

    return f"jaxem {__version__} (jax {version('jax')}, jaxlib {version('jaxlib')})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxem", description="Expectation-Maximization in JAX: Gaussian "
                     "mixtures from the command line")
    parser.add_argument("--version", action="version", version=_version_line(),
                        help="print the versions of jaxem, JAX and jaxlib, and exit")
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
    fit.add_argument("--stream", action="store_true",
                     help="read a .npy block by block every iteration instead of loading it")
    fit.add_argument("--memory-budget", metavar="SIZE",
                     help="stream a .npy larger than this (e.g. 8G; default a quarter of "
                     "the machine's memory)")
    fit.add_argument("--coordinator", metavar="HOST:PORT",
                     help="join a run of several processes (jax.distributed): process 0's "
                     "address; each process fits its share of the .npy's rows")
    fit.add_argument("--num-processes", type=int, default=1,
                     help="processes in the run (default 1)")
    fit.add_argument("--process-id", type=int, default=0,
                     help="this process's index, 0 .. N-1; process 0 prints and writes "
                     "the model (default 0)")
    fit.add_argument("--join-timeout", type=int, default=60,
                     help="seconds to wait for every process to join (default 60)")
    fit.set_defaults(func=_fit)

    select = sub.add_parser("select", help="choose K and covariance type by BIC, AIC or ICL",
                            description="Fit every K and covariance type (all K and restarts "
                            "of a type in one compiled program) and tabulate BIC, AIC and ICL.")
    select.add_argument("data", help="data file: .npy, .npz or .csv")
    select.add_argument("--k", default="1:10", help="range a:b or list a,b,c (default 1:10)")
    select.add_argument("--criterion", choices=["bic", "aic", "icl"], default="bic",
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
    _add_column_options(predict)
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
    demo.add_argument("--n-init", type=int, default=16, help="restarts per fit (default 16)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--verbose", action="store_true",
                      help="also print the time spent compiling")
    demo.set_defaults(func=_demo)

    tune = sub.add_parser(
        "tune-blocks", help="measure the E-step's best block size on this machine",
        description="Time the E-step at block budgets around the built-in ones and record "
        "the fastest per covariance type for this machine (backend, device, CPU, cores); "
        "later fits on this machine use them.")
    tune.add_argument("--n", type=int, default=200_000, help="samples timed (default 2e5)")
    tune.add_argument("--shapes", metavar="DxK,...",
                      help="features x components timed (default "
                      "8x8,8x32,16x16,32x8,32x32,64x16,64x64); a fit takes the nearest")
    tune.add_argument("--covariance-type", default="all",
                      help="full, tied, diag, spherical, a comma list, or all (default)")
    tune.add_argument("--repeats", type=int, default=5,
                      help="timed runs per block size (default 5)")
    tune.add_argument("--dry-run", action="store_true", help="measure, record nothing")
    tune.add_argument("--reset", action="store_true",
                      help="forget this machine's recorded budgets and exit")
    tune.set_defaults(func=_tune_blocks)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxem._cache import compile_totals, enable_persistent_cache

    enable_persistent_cache()  # before the first compilation; see jaxem/_cache.py
    compile_totals()  # start counting compile time (printed with --verbose)
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
