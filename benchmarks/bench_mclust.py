"""Does a model search find optima as good as R's mclust? Cell by cell, K × covariance type.

mclust (hierarchical agglomerative initialisation, EM to a relative tolerance of 1e-5)
is the reference for Gaussian-mixture model search. Its BIC tables for three real data
sets are stored in ``benchmarks/mclust_bic.csv`` (mclust 6.0.0 from Debian's
``r-cran-mclust``, R 4.2.2; mclust's BIC is 2 log L − p log n, higher better, stored here
negated to scikit-learn's sign). Model names: VVV = full, EEE = tied, VVI = diag,
VII = spherical. This script runs :func:`jaxem.select` over the same grid and prints every
cell whose BIC is worse than mclust's by more than 0.5.

    python benchmarks/bench_mclust.py                      # the search's defaults
    python benchmarks/bench_mclust.py --n-init 4 --tol 1e-3  # other settings
    python benchmarks/bench_mclust.py --refresh            # rerun mclust (needs Rscript)
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "benchmarks" / "mclust_bic.csv"
MODELS = {"VVV": "full", "EEE": "tied", "VVI": "diag", "VII": "spherical"}
TYPES = ("full", "tied", "diag", "spherical")
KS = range(1, 10)  # mclust's default G = 1:9

R_SCRIPT = """
suppressMessages(library(mclust))
args <- commandArgs(TRUE)
x <- as.matrix(read.csv(args[1], header=FALSE))
b <- mclustBIC(x, G=1:9, modelNames=c("VVV","EEE","VVI","VII"), verbose=FALSE)
write.csv(-unclass(b)[,,drop=FALSE], args[2])
"""


def datasets(names) -> dict:
    """Old Faithful (272 × 2), iris (150 × 4), standardised wine (178 × 13)."""
    from jaxem.datasets import load_old_faithful

    out = {}
    for name in names:
        if name == "faithful":
            out[name] = load_old_faithful()[0]
        else:
            from sklearn import datasets as sk

            x = (sk.load_iris() if name == "iris" else sk.load_wine()).data
            out[name] = x if name == "iris" else (x - x.mean(0)) / x.std(0)
    return out


def refresh(names) -> None:
    """Run mclust on every data set and rewrite the reference table."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "bic.R"
        script.write_text(R_SCRIPT)
        for name, x in datasets(names).items():
            data, table = Path(tmp) / f"{name}.csv", Path(tmp) / f"{name}-bic.csv"
            np.savetxt(data, x, delimiter=",", fmt="%.17g")
            subprocess.run(["Rscript", str(script), str(data), str(table)], check=True)
            with open(table) as f:
                reader = csv.reader(f)
                models = next(reader)[1:]
                for line in reader:
                    for model, value in zip(models, line[1:], strict=True):
                        rows.append((name, int(line[0]), MODELS[model], value))
    with open(REFERENCE, "w", newline="") as f:
        f.write("# mclust 6.0.0 (R 4.2.2) BIC, negated to scikit-learn's sign (lower is "
                "better); NA: mclust found no fit\n")
        writer = csv.writer(f)
        writer.writerow(("dataset", "k", "covariance_type", "bic"))
        writer.writerows(rows)


def reference() -> dict:
    table = {}
    with open(REFERENCE) as f:
        for row in csv.DictReader(line for line in f if not line.startswith("#")):
            value = np.nan if row["bic"] == "NA" else float(row["bic"])
            table[row["dataset"], int(row["k"]), row["covariance_type"]] = value
    return table


def compare(name, x, ref, ks, settings) -> tuple[int, int, list]:
    """(cells compared, cells worse than mclust by > 0.5, their descriptions)."""
    import jaxem

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = jaxem.select(x, ks, TYPES, **settings)
    compared, worse = 0, []
    for i, k in enumerate(result.ks):
        for j, cov in enumerate(TYPES):
            theirs = ref.get((name, k, cov), np.nan)
            if not np.isfinite(theirs):
                continue
            compared += 1
            gap = result.bic[i, j] - theirs
            if gap > 0.5:
                worse.append(f"{cov} K={k}: {gap:+.1f}")
    return compared, len(worse), worse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="faithful,iris,wine")
    parser.add_argument("--max-k", type=int, default=9)
    parser.add_argument("--n-init", type=int, help="default: the search's")
    parser.add_argument("--tol", type=float, help="default: the search's")
    parser.add_argument("--screen", help="ITERATIONS,KEPT or 'off' (default: the search's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refresh", action="store_true",
                        help="rerun mclust through Rscript and rewrite the reference table")
    args = parser.parse_args(argv)
    names = args.datasets.split(",")
    if args.refresh:
        refresh(names)
    ref = reference()
    settings = {k: v for k, v in (("n_init", args.n_init), ("tol", args.tol)) if v is not None}
    if args.screen:
        settings["screen"] = (None if args.screen == "off"
                              else tuple(int(v) for v in args.screen.split(",")))
    if args.seed:
        settings["seed"] = args.seed
    print(f"jaxem.select, K = 1..{args.max_k} x 4 types, settings: {settings or 'defaults'}")
    total = total_worse = 0
    for name, x in datasets(names).items():
        started = time.perf_counter()
        compared, n_worse, worse = compare(name, x, ref, range(1, args.max_k + 1), settings)
        total, total_worse = total + compared, total_worse + n_worse
        print(f"{name:<9} {x.shape[0]:>4} x {x.shape[1]:<3} {time.perf_counter() - started:6.1f} s"
              f"  worse than mclust (> 0.5): {n_worse}/{compared}  {'; '.join(worse)}",
              flush=True)
    print(f"all       worse than mclust (> 0.5): {total_worse}/{total} cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
