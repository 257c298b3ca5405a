"""E-step time against the block size, on this machine: what the automatic choice picks
(`gmm.auto_chunk_size`, marked *) and what the best size is.

    python benchmarks/bench_blocks.py                       # the default cases
    python benchmarks/bench_blocks.py --cases diag:200000:16:16 full:100000:32:16
    python benchmarks/bench_blocks.py --smoke
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxem import gmm

CASES = ["diag:200000:16:16", "diag:1000000:16:16", "full:100000:32:16",
         "full:1000000:32:32", "tied:100000:32:8", "spherical:200000:16:16"]


def _params(rng, k, d, cov):
    c = {"full": np.stack([np.eye(d)] * k), "tied": np.eye(d), "diag": np.ones((k, d)),
         "spherical": np.ones(k)}[cov].astype(np.float32)
    return gmm.make_params(np.full(k, 1 / k, np.float32),
                           rng.normal(size=(k, d)).astype(np.float32), c, cov)


def best_ms(f, *args, repeats=10):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def sweep(cov, n, d, k, sizes, repeats):
    rng = np.random.default_rng(0)
    x = jnp.asarray((rng.normal(size=(n, d)) + rng.integers(0, 4, (n, 1))).astype(np.float32))
    p = _params(rng, k, d, cov)
    auto = gmm.auto_chunk_size(n, k, d, jnp.float32, cov)
    out = {}
    for cs in sorted({auto, *[s for s in sizes if s <= n]}):
        f = jax.jit(lambda p, x, cs=cs: gmm.e_step(p, x, chunk_size=cs))
        out[cs] = best_ms(f, p, x, repeats=repeats)
    best = min(out, key=out.get)
    cells = " | ".join(f"{cs}{'*' if cs == auto else ''}: {ms:.2f}" for cs, ms in out.items())
    print(f"| {cov}, N={n}, D={d}, K={k} | {cells} | best {best}: auto/best "
          f"{out[auto] / out[best]:.2f} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="*", default=CASES, help="cov:N:D:K ...")
    p.add_argument("--sizes", default="4096,8192,16384,32768,65536,131072,262144,524288")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        a.cases, a.sizes, a.repeats = ["diag:3000:4:3", "full:3000:4:3"], "512,1024", 2
    print(f"# {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), ms per E-step "
          "by rows per block (* = automatic)")
    sizes = [int(s) for s in a.sizes.split(",")]
    for case in a.cases:
        cov, n, d, k = case.split(":")
        sweep(cov, int(n), int(d), int(k), sizes, a.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
