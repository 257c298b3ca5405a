"""Cost of a gradient through a fit, relative to the forward fit, in the same process.

    python benchmarks/bench_grad.py --n 100000 --d 16 --k 16 --covariance full
    python benchmarks/bench_grad.py --smoke            # tiny size, used by the test suite

The loss reads every fitted parameter and the fitted log-likelihood; gradients are taken with
respect to the data and ``reg_covar``. Rows:

- forward: ``jaxem.fit`` from k-means to ``--tol`` (it takes ``n_iter`` iterations), no
  gradient;
- implicit: value and gradient through ``jaxem.fit_implicit`` (the same forward fit, then
  one adjoint solve by GMRES);
- unrolled: value and gradient through ``jaxem.fit_unrolled(n_steps=n_iter)``, with and
  without ``checkpoint``;
- envelope: value and gradient of ``envelope_log_likelihood`` at the forward fit's params.

Time is the best of ``--repeats`` steady-state runs (compile measured apart). Memory is XLA's
own account of the compiled program (``memory_analysis``): temporaries (``temp``) beyond the
arguments and outputs. It is what grows with the number of unrolled steps.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxem
from jaxem import gmm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_fit  # noqa: E402  (the data generator and the timing loop live there)


def measure(fn, args, repeats):
    """(compile s, best run s, temp bytes) of ``jax.jit(fn)(*args)``."""
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")
    jax.block_until_ready(compiled(*args))
    best = bench_fit.best_of(repeats, lambda _: jax.block_until_ready(compiled(*args)))
    return compile_s, best, temp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=16)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--covariance", default="full", choices=["full", "tied", "diag", "spherical"])
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--max-iter", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny size for the test suite")
    a = p.parse_args(argv)
    if a.smoke:
        a.n, a.d, a.k, a.repeats = 2000, 3, 3, 1

    x = jnp.asarray(bench_fit.make_data(a.n, a.d, a.k).astype(np.float32))
    model = gmm.GaussianMixtureModel(a.covariance)
    p0 = gmm.init(jax.random.PRNGKey(a.seed), x, a.k, a.covariance, method="kmeans")
    proj = jax.tree_util.tree_map(lambda t: jnp.ones_like(t) / t.size, p0)
    reg = jnp.asarray(1e-3, jnp.float32)

    def loss(res):
        leaves = zip(jax.tree_util.tree_leaves(res.params), jax.tree_util.tree_leaves(proj),
                     strict=True)
        return sum(jnp.vdot(u, v) for u, v in leaves) + res.lower_bound

    def forward(x, reg):
        return loss(jaxem.fit(model, x, p0, tol=a.tol, max_iter=a.max_iter, reg_covar=reg))

    def implicit(x, reg):
        return loss(jaxem.fit_implicit(model, x, p0, tol=a.tol, max_iter=a.max_iter,
                                       reg_covar=reg))

    fit = jaxem.fit(model, x, p0, tol=a.tol, max_iter=a.max_iter, reg_covar=reg)
    fitted, n_iter = fit.params, int(fit.n_iter)

    def unrolled(checkpoint):
        return lambda x, reg: loss(jaxem.fit_unrolled(model, x, p0, n_steps=n_iter,
                                                      checkpoint=checkpoint, reg_covar=reg))

    def envelope(x, reg):
        return jaxem.envelope_log_likelihood(model, fitted, x)

    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1))  # noqa: E731
    rows = [
        ("forward fit (no gradient)", forward),
        ("implicit: fit + adjoint solve", grad(implicit)),
        ("unrolled", grad(unrolled(False))),
        ("unrolled, checkpoint=True", grad(unrolled(True))),
        ("envelope (at fitted params)", grad(envelope)),
    ]
    print(f"jaxem {jaxem.__version__}, jax {jax.__version__}, {jax.devices()[0].platform}, "
          f"{platform.machine()}, {jax.local_device_count()} device(s)")
    print(f"N={a.n} D={a.d} K={a.k} covariance={a.covariance} float32; the fit takes {n_iter} "
          f"EM iterations to tol={a.tol} (converged={bool(fit.converged)}); "
          f"data {x.nbytes / 2**20:.1f} MiB")
    print(f"{'method':32s} {'compile s':>10s} {'run s':>9s} {'x forward':>10s} {'temp MiB':>10s}")
    base = None
    for name, fn in rows:
        compile_s, run_s, temp = measure(fn, (x, reg), a.repeats)
        base = run_s if base is None else base
        print(f"{name:32s} {compile_s:10.2f} {run_s:9.3f} {run_s / base:10.2f} "
              f"{temp / 2**20:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
