"""Many different programs in one process: random fits, searches and batches for a while,
printing the process's memory mappings as it goes (Linux).

    python benchmarks/stress_compile.py --seconds 480 --seed 1

Before jaxem/_cache.py's guard, two such processes died after ~7 minutes (SIGSEGV in LLVM,
"Cannot allocate memory") when the mappings reached vm.max_map_count; see
benchmarks/README.md. It ends with the number of runs, programs compiled, the peak number
of mappings and how often the guard released JAX's compiled programs.
"""

from __future__ import annotations

import argparse
import faulthandler
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    faulthandler.enable()

    import warnings

    import jax
    import numpy as np

    import jaxem
    from jaxem import _cache

    warnings.simplefilter("ignore")
    _cache.enable_persistent_cache()
    _cache.compile_totals()
    rng = np.random.default_rng(args.seed)
    types = ["full", "tied", "diag", "spherical"]
    inits = ["kmeans", "k-means++", "random", "random_from_data"]
    start, runs, peak, last = time.time(), 0, 0, 0.0
    while time.time() - start < args.seconds:
        n, d, k = int(rng.integers(20, 3000)), int(rng.integers(1, 6)), int(rng.integers(1, 6))
        x = rng.normal(size=(n, d))
        cov = types[int(rng.integers(4))]
        kind = int(rng.integers(3))
        if kind == 0:
            jaxem.select(x, range(1, k + 1), cov, n_init=int(rng.integers(1, 4)),
                         max_iter=int(rng.integers(1, 50)))
        elif kind == 1:
            jaxem.GaussianMixture(k, covariance_type=cov, n_init=int(rng.integers(1, 4)),
                                  init_params=inits[int(rng.integers(4))]).fit(x).predict(x)
        else:
            xb = rng.normal(size=(int(rng.integers(2, 6)), min(n, 300), d))
            jaxem.fit_batch(jaxem.GaussianMixtureModel(cov), xb, jax.random.PRNGKey(0),
                            n_components=k, max_iter=20)
        runs += 1
        maps = _cache.memory_mappings() or 0
        peak = max(peak, maps)
        if time.time() - last > 15:
            last = time.time()
            print(f"{time.time() - start:6.0f} s  runs {runs:4d}  mappings {maps:6d}", flush=True)
    totals = _cache.compile_totals()
    print(f"done: {runs} runs, {totals['programs']} programs compiled, peak mappings {peak}, "
          f"released {_cache._maps['released']} time(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
