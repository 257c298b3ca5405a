"""Small and medium fits: time per *question*, compilation included, against scikit-learn.

Every row runs jaxem and scikit-learn side by side on this machine and prints the ratio.
Process-level rows start fresh Python processes (import included), once with an empty
compilation cache ("cold") and once more with the cache the first run left ("warm").

    python benchmarks/bench_small.py            # all the quick rows (~2 minutes on 2 cores)
    python benchmarks/bench_small.py --rows demo,batch --n-datasets 200
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SKLEARN_GRID = """
import warnings
import numpy as np
from sklearn.mixture import GaussianMixture
from jaxem.datasets import load_old_faithful
x, _ = load_old_faithful()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for k in range({max_k}):
        for ct in ("full", "tied", "diag", "spherical"):
            GaussianMixture(k + 1, covariance_type=ct, n_init={n_init}, max_iter=500,
                            random_state=0).fit(x).bic(x)
"""

IRIS = """
import time
from sklearn.datasets import load_iris
x = load_iris().data
import {module} as lib
t0 = time.perf_counter()
lib.GaussianMixture(3, random_state=0).fit(x)
t1 = time.perf_counter()
lib.GaussianMixture(3, random_state=0).fit(x[:120])
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""

GRID_SEARCH = """
import time, warnings
from sklearn.datasets import load_wine
from sklearn.model_selection import GridSearchCV
from sklearn.preprocessing import StandardScaler
import {module} as lib
x = StandardScaler().fit_transform(load_wine().data)
t0 = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    GridSearchCV(lib.GaussianMixture(random_state=0),
                 {{"n_components": list(range(1, 7))}}, cv=5).fit(x)
print(time.perf_counter() - t0)
"""


def _env(cache: str) -> dict:
    env = dict(os.environ, XDG_CACHE_HOME=cache)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def _timed(cmd, env) -> tuple[float, str]:
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return time.perf_counter() - t, out.stdout


def _jaxem(*args) -> list[str]:
    return [sys.executable, "-m", "jaxem.cli", *args]


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def row(name, jaxem_s, sklearn_s, note=""):
    print(f"{name:<44} jaxem {jaxem_s:8.2f} s   scikit-learn {sklearn_s:8.2f} s   "
          f"ratio {jaxem_s / sklearn_s:6.2f}x {note}", flush=True)


def bench_demo(n_init: int):
    with tempfile.TemporaryDirectory() as cache:
        env = _env(cache)
        sk, _ = _timed(_py(SKLEARN_GRID.format(max_k=6, n_init=n_init)), env)
        cold, _ = _timed(_jaxem("demo", "--n-init", str(n_init)), env)
        warm, _ = _timed(_jaxem("demo", "--n-init", str(n_init)), env)
    row(f"demo K=1..6 x 4 types, n_init={n_init}, cold", cold, sk, "(process start to exit)")
    row(f"demo K=1..6 x 4 types, n_init={n_init}, warm", warm, sk)


def bench_select():
    from jaxem.datasets import load_old_faithful

    x, names = load_old_faithful()
    with tempfile.TemporaryDirectory() as cache:
        csv = Path(cache) / "faithful.csv"
        import numpy as np

        np.savetxt(csv, x, delimiter=",", header=",".join(names), comments="")
        env = _env(cache)
        sk, _ = _timed(_py(SKLEARN_GRID.format(max_k=5, n_init=1)), env)
        # scikit-learn's settings (its grid above: one restart, tol 1e-3), then the
        # search's own defaults (64 restarts on these 272 rows, tol 1e-6: what finds
        # mclust's optima)
        args = ("select", str(csv), "--k", "1:5", "--covariance-type", "all")
        quick = ("--n-init", "1", "--tol", "1e-3")
        cold, _ = _timed(_jaxem(*args, *quick), env)
        warm, _ = _timed(_jaxem(*args, *quick), env)
        cold_default, _ = _timed(_jaxem(*args), env)
        warm_default, _ = _timed(_jaxem(*args), env)
    row("select faithful K=1..5 x 4 types, cold", cold, sk, "(targets: 5 s cold, 2 s warm)")
    row("select faithful K=1..5 x 4 types, warm", warm, sk)
    row("  the same, search defaults, cold", cold_default, sk, "(64 restarts, tol 1e-6)")
    row("  the same, search defaults, warm", warm_default, sk)


def bench_iris():
    with tempfile.TemporaryDirectory() as cache:
        env = _env(cache)
        _, out = _timed(_py(IRIS.format(module="sklearn.mixture")), env)
        sk_fit, sk_refit = map(float, out.split())
        _, out = _timed(_py(IRIS.format(module="jaxem")), env)
        cold_fit, cold_refit = map(float, out.split())
        _, out = _timed(_py(IRIS.format(module="jaxem")), env)
        warm_fit, _ = map(float, out.split())
    row("GaussianMixture(3).fit(iris), cold", cold_fit, sk_fit, "(after import)")
    row("GaussianMixture(3).fit(iris), warm", warm_fit, sk_fit)
    row("refit on 120 of the rows (same process)", cold_refit, sk_refit)


def bench_grid_search():
    with tempfile.TemporaryDirectory() as cache:
        env = _env(cache)
        _, out = _timed(_py(GRID_SEARCH.format(module="sklearn.mixture")), env)
        sk = float(out)
        _, out = _timed(_py(GRID_SEARCH.format(module="jaxem")), env)
        cold = float(out)
    row("GridSearchCV K=1..6, 5 folds, wine, cold", cold, sk, "(target 3 s)")


BATCH = """
import sys, time
if sys.argv[3] == "scipy":
    import scipy.linalg  # as scikit-learn's import does (jaxem needs it for LAPACK)
import numpy as np, jax, jaxem
n = int(sys.argv[1])
rng = np.random.default_rng(0)
centres = rng.normal(size=(n, 3, 2)) * 4
labels = rng.integers(0, 3, size=(n, 200))
x = centres[np.arange(n)[:, None], labels] + rng.normal(size=(n, 200, 2))
x = x.astype(np.float32)
np.save(sys.argv[2], x)
model = jaxem.GaussianMixtureModel("full")
key = jax.random.PRNGKey(0)
jaxem.enable_compilation_cache()
t0 = time.perf_counter()
jax.block_until_ready(jaxem.fit_batch(model, x, key, n_components=3))
t1 = time.perf_counter()
jax.block_until_ready(jaxem.fit_batch(model, x, jax.random.PRNGKey(1), n_components=3))
print(t1 - t0, time.perf_counter() - t1)
"""


def bench_batch(n_datasets: int, n_sklearn: int):
    """``fit_batch`` in a fresh process with an empty cache (its first call and a second,
    compiled), then in others with the cache that left (first call): the call alone, the
    key made before it, against scikit-learn's loop over the same datasets (its import
    not timed). jaxem registers LAPACK's kernels (importing SciPy's linear algebra, ~0.085
    s) before it first runs a program that calls them: the warm rows run with SciPy
    imported first, as scikit-learn's own import does, and without."""
    import warnings

    import numpy as np
    from sklearn.mixture import GaussianMixture

    with tempfile.TemporaryDirectory() as cache:
        env = _env(cache)
        data = str(Path(cache) / "x.npy")
        cmd = _py(BATCH) + [str(n_datasets), data]
        first, again = map(float, _timed(cmd + ["scipy"], env)[1].split())
        warm, _ = map(float, _timed(cmd + ["scipy"], env)[1].split())
        bare, _ = map(float, _timed(cmd + ["bare"], env)[1].split())
        x = np.load(data)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(n_sklearn):
            GaussianMixture(3, random_state=0).fit(x[i])
    sk = (time.perf_counter() - t) * n_datasets / n_sklearn
    name = f"{n_datasets} datasets x 200 pts, K=3 full"
    row(f"{name}, cold", first, sk,
        f"({sk / first:.1f}x faster; first call, compile included; target 10x)")
    row(f"{name}, warm", warm, sk,
        f"({sk / warm:.0f}x; first call of a new process, cache filled; target 50x)")
    row("  the same, SciPy imported in the call", bare, sk, f"({sk / bare:.0f}x)")
    row(f"{name}, compiled", again, sk, f"({sk / again:.0f}x; second call in the process)")


def bench_search(n: int, d: int, k_max: int, n_init: int):
    """A search over K = 1..k_max, full, on N × D synthetic data: jaxem.select (one
    program) against scikit-learn's loop over K, end to end."""
    import warnings

    import numpy as np
    from sklearn.mixture import GaussianMixture

    import jaxem

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, d)) * 3
    x = (centres[rng.integers(0, 8, n)] + rng.normal(size=(n, d))).astype(np.float32)
    t = time.perf_counter()
    # scikit-learn's settings (tol 1e-3), for the same grid: the search's own default
    # (tol 1e-6, what criteria need) runs every fit much longer.
    result = jaxem.select(x, range(1, k_max + 1), "full", n_init=n_init, tol=1e-3)
    ours = time.perf_counter() - t
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bic = [GaussianMixture(k, n_init=n_init, random_state=0).fit(x).bic(x)
               for k in range(1, k_max + 1)]
    sk = time.perf_counter() - t
    row(f"search N={n}, D={d}, K=1..{k_max}, full, n_init={n_init}", ours, sk,
        f"(best K: jaxem {result.best[0]}, scikit-learn {int(np.argmin(bic)) + 1}; "
        f"max iterations {int(result.n_iter.max())})")


ROWS = {"demo": None, "select": bench_select, "iris": bench_iris,
        "gridsearch": bench_grid_search, "batch": None, "search": None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="demo,select,iris,gridsearch,batch",
                        help="comma list of " + ", ".join(ROWS) + " (default: all but search)")
    parser.add_argument("--n-datasets", type=int, default=1000)
    parser.add_argument("--search", default="100000,16,16,4",
                        help="N,D,K_max,n_init of the 'search' row (default 100000,16,16,4)")
    parser.add_argument("--n-sklearn", type=int, default=200,
                        help="datasets scikit-learn fits (its time is scaled to all)")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",")]
    for r in rows:
        if r not in ROWS:
            parser.error(f"unknown row {r!r}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    for r in rows:
        if r == "demo":
            bench_demo(4)
            bench_demo(16)
        elif r == "search":
            bench_search(*(int(float(v)) for v in args.search.split(",")))
        elif r == "batch":
            bench_batch(args.n_datasets, min(args.n_sklearn, args.n_datasets))
        else:
            ROWS[r]()


if __name__ == "__main__":
    main()
