"""Peak resident memory of a jaxem fit at large N (the data plus O(chunk·K·D + K·D²)).

    python benchmarks/bench_memory.py --n 20000000 --d 16 --k 32 --covariance full
    python benchmarks/bench_memory.py --smoke

The float32 data are generated block by block straight into one array (never a float64 copy),
so the peak resident set is the caller's NumPy data, the one device copy jaxem makes of it
(on the CPU backend both live in host memory), and what the fit adds on top.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import jax
import numpy as np

import jaxem
from jaxem import gmm


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def make_data(n, d, k, seed=0, block=1_000_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = (rng.normal(size=(k, d)) * 3).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        labels = rng.integers(0, k, size=stop - start)
        x[start:stop] = centers[labels] + rng.standard_normal((stop - start, d), np.float32)
    return x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000_000)
    p.add_argument("--d", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--covariance", default="full", choices=["full", "tied", "diag", "spherical"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        a.n, a.d, a.k, a.iters = 20_000, 4, 3, 2
    x = make_data(a.n, a.d, a.k)
    data_gb = x.nbytes / 1e9
    print(f"N={a.n} D={a.d} K={a.k} {a.covariance} float32: data {data_gb:.2f} GB, "
          f"RSS after generating it {rss_gb():.2f} GB")
    rng = np.random.default_rng(1)
    means = x[rng.choice(a.n, a.k, replace=False)]
    cov = {"full": np.stack([np.eye(a.d)] * a.k), "tied": np.eye(a.d),
           "diag": np.ones((a.k, a.d)), "spherical": np.ones(a.k)}[a.covariance]
    params = gmm.make_params(np.full(a.k, 1 / a.k, np.float32), means, cov.astype(np.float32),
                             a.covariance)
    t = time.perf_counter()
    # A NumPy array, as users pass it: jaxem makes the one device copy it needs.
    res = jaxem.fit(gmm.GaussianMixtureModel(a.covariance), x, params, tol=-1.0,
                    max_iter=a.iters)
    jax.block_until_ready(res)
    elapsed = time.perf_counter() - t
    print(f"{a.iters} iterations in {elapsed:.1f} s (with compile); lower bound "
          f"{float(res.lower_bound):.4f}; failed={bool(res.failed)}")
    print(f"peak RSS {rss_gb():.2f} GB = data {data_gb:.2f} GB + {rss_gb() - data_gb:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
