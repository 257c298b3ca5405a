"""Compile time of a first fit against the number of samples (it must not grow with N).

Each N runs in a fresh process with the persistent cache off, so every compilation is cold;
the script prints the seconds XLA spent compiling (JAX's own timing events), the number of
programs, and the wall time of ``GaussianMixture(K).fit`` with ``max_iter=1``.

    python benchmarks/bench_compile.py --ns 1e4,1e5,1e6 --d 8 --k 8
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

PROBE = """
import time, numpy as np
from jaxem._cache import compile_totals
import jaxem
compile_totals()
x = np.random.default_rng(0).normal(size=({n}, {d})).astype(np.float32)
t = time.perf_counter()
jaxem.GaussianMixture({k}, covariance_type="{cov}", max_iter=1, random_state=0).fit(x)
wall = time.perf_counter() - t
c = compile_totals()
print(c["compile"], c["programs"], c["trace"] + c["lower"], wall)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="1e4,1e5,1e6")
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--covariance", default="full")
    args = parser.parse_args()
    env = dict(os.environ, JAXEM_NO_COMPILATION_CACHE="1")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    print(f"first fit, D={args.d}, K={args.k}, {args.covariance}, cold (cache off), "
          f"{os.cpu_count()} cores")
    for n in (int(float(v)) for v in args.ns.split(",")):
        code = PROBE.format(n=n, d=args.d, k=args.k, cov=args.covariance)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, check=True).stdout.split()
        compile_s, programs, trace_s, wall = float(out[0]), int(out[1]), float(out[2]), float(
            out[3])
        print(f"N={n:>9}: XLA compile {compile_s:6.2f} s in {programs:2d} programs, "
              f"trace+lower {trace_s:5.2f} s, fit (1 iteration) {wall:6.2f} s", flush=True)


if __name__ == "__main__":
    main()
