"""`fit_batch`'s first call against a floor: what *any* batched EM program costs here.

Issue 16 asks a first (cold) `fit_batch` call over 1,000 datasets × 200 points (D = 2,
K = 3, full) to be 10× faster than scikit-learn's loop over them. This script measures how
close the JAX toolchain itself lets a program come on this machine: beside `jaxem.fit_batch`
it times a *bare* batched EM written directly in JAX — greedy k-means++ seeding, Lloyd
iterations, full-covariance EM to scikit-learn's stopping rule — with nothing else: no
failure guards, no last-good parameters, no history, no restarts, no fast-path guards, no
stored programs. It is compiled with jaxem's options for small programs, once as one
program and once as two (initialisation and EM loop) compiled in two threads while the
other is traced and run ("pipelined"). Every variant runs in a fresh process with an empty
cache (first call: tracing, lowering, compiling and running; the imports are not counted,
as scikit-learn's are not), then once more compiled ("again"); and jaxem's first call in a
second process whose cache the first one filled ("warm", `jaxem.enable_compilation_cache`).
All variants report the mean final log-likelihood, so they are seen to do the same job.

    python benchmarks/bench_batch_floor.py                 # 1,000 datasets (~1 minute)
    python benchmarks/bench_batch_floor.py --n-datasets 50 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_SAMPLES, N_COMPONENTS, N_FEATURES = 200, 3, 2
TOL, MAX_ITER, REG_COVAR = 1e-3, 100, 1e-6  # scikit-learn's defaults
KMEANS_TOL, KMEANS_MAX_ITER = 1e-4, 300


def make_data(n_datasets: int):
    """bench_small's batch: B datasets of 200 points around 3 random centres, float32."""
    import numpy as np

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(n_datasets, N_COMPONENTS, N_FEATURES)) * 4
    labels = rng.integers(0, N_COMPONENTS, size=(n_datasets, N_SAMPLES))
    x = centres[np.arange(n_datasets)[:, None], labels] + rng.normal(
        size=(n_datasets, N_SAMPLES, N_FEATURES))
    return x.astype(np.float32)


# --- the bare program ------------------------------------------------------------------

def _bare_parts():
    """``(init, loop)``: one dataset's k-means initialisation → (weights, means, precision
    factors), and its EM loop from those → (mean log-likelihood, iterations)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    k, d = N_COMPONENTS, N_FEATURES
    eye = jnp.eye(d, dtype=jnp.float32)

    def sq_dist(x, c):  # (N, K), feature by feature (D is small)
        return sum((x[:, j, None] - c[None, :, j]) ** 2 for j in range(d))

    def m_step(x, wr):
        nk = jnp.sum(wr, axis=0) + 10 * jnp.finfo(jnp.float32).eps
        means = (wr.T @ x) / nk[:, None]
        xc = x[None] - means[:, None]  # (K, N, D)
        cov = jnp.einsum("nk,knd,kne->kde", wr, xc, xc) / nk[:, None, None] + REG_COVAR * eye
        chol = jnp.linalg.cholesky(cov)
        prec = jax.scipy.linalg.solve_triangular(chol, jnp.broadcast_to(eye, cov.shape),
                                                 lower=True)
        return nk / jnp.sum(nk), means, prec  # Σ = L Lᵀ, prec = L⁻¹: |prec (x − μ)|² is Mahalanobis

    def init(key, x, w):
        trials = 2 + int(np.log(k))
        u = jax.random.uniform(key, (k, trials))

        def seed(i, carry):  # greedy k-means++: the best of `trials` candidates
            centres, closest = carry
            mass = w * jnp.where(i > 0, closest, 1.0)
            cdf = jnp.cumsum(mass)
            cand = jnp.minimum(jnp.searchsorted(cdf, u[i] * cdf[-1], side="right"),
                               x.shape[0] - 1)
            new = jnp.minimum(closest[:, None], sq_dist(x, x[cand]))
            best = jnp.argmin(jnp.where(i > 0, jnp.sum(w[:, None] * new, axis=0),
                                        jnp.arange(trials)))
            return centres.at[i].set(x[cand[best]]), new[:, best]

        centres, _ = jax.lax.fori_loop(
            0, k, seed, (jnp.zeros((k, d), x.dtype), jnp.full(x.shape[:1], jnp.inf, x.dtype)))
        mean = jnp.sum(w[:, None] * x, axis=0) / jnp.sum(w)
        threshold = KMEANS_TOL * jnp.mean(jnp.sum(w[:, None] * (x - mean) ** 2, axis=0)
                                          / jnp.sum(w))

        def lloyd(state):
            c, _, it = state
            wr = jax.nn.one_hot(jnp.argmin(sq_dist(x, c), axis=1), k, dtype=x.dtype) * w[:, None]
            counts = jnp.sum(wr, axis=0)
            new = jnp.where(counts[:, None] > 0, (wr.T @ x) / jnp.maximum(counts, 1e-30)[:, None],
                            c)
            return new, jnp.sum((new - c) ** 2), it + 1

        centres, _, _ = jax.lax.while_loop(
            lambda s: (s[2] < KMEANS_MAX_ITER) & (s[1] > threshold), lloyd,
            (centres, jnp.asarray(jnp.inf, x.dtype), 0))
        labels = jnp.argmin(sq_dist(x, centres), axis=1)
        return m_step(x, jax.nn.one_hot(labels, k, dtype=x.dtype) * w[:, None])

    def loop(params, x, w):
        def e_step(params):
            weights, means, prec = params
            y = jnp.einsum("kde,kne->knd", prec, x[None] - means[:, None])
            log_det = jnp.sum(jnp.log(jnp.diagonal(prec, axis1=1, axis2=2)), axis=1)
            lj = (-0.5 * (jnp.sum(y * y, axis=2) + d * np.log(2 * np.pi))
                  + (log_det + jnp.log(weights))[:, None])  # (K, N)
            ll = jax.nn.logsumexp(lj, axis=0)
            return jnp.exp(lj - ll).T * w[:, None], jnp.sum(w * ll) / jnp.sum(w)

        def body(state):
            params, ll, _, it = state
            wr, new_ll = e_step(params)
            return m_step(x, wr), new_ll, ll, it + 1

        out = jax.lax.while_loop(
            lambda s: (s[3] < MAX_ITER) & ~(jnp.abs(s[1] - s[2]) < TOL), body,
            (params, jnp.asarray(-jnp.inf, x.dtype), jnp.asarray(jnp.nan, x.dtype), 0))
        return out[1], out[3]

    return init, loop


def _bare(x, w, key, mode: str):
    """The bare program's first call and a second one: seconds, and the result. ``mode``:
    ``"vmap"`` (one program, the datasets vmapped), ``"pipelined"`` (two vmapped programs
    compiled in threads) or ``"sequential"`` (one program, the datasets one after another
    in a ``lax.map``, as ``fit_batch`` runs them on the CPU)."""
    import concurrent.futures

    import jax

    from jaxem.em import SMALL_COMPILE_OPTIONS

    init, loop = _bare_parts()
    n_datasets = x.shape[0]

    def batched_init(key, x, w):  # the datasets' keys split inside the program, as jaxem's
        return jax.vmap(init)(jax.random.split(key, n_datasets), x, w)

    batched_loop = jax.vmap(loop)

    def both(key, x, w):
        if mode == "sequential":
            return jax.lax.map(lambda a: loop(init(*a), *a[1:]),
                               (jax.random.split(key, n_datasets), x, w))
        return batched_loop(batched_init(key, x, w), x, w)

    parts = {}
    t0 = time.perf_counter()
    if mode != "pipelined":
        lowered = jax.jit(both).trace(key, x, w).lower()
        parts["trace+lower"] = time.perf_counter() - t0
        t = time.perf_counter()
        compiled = lowered.compile(SMALL_COMPILE_OPTIONS)
        parts["compile"] = time.perf_counter() - t
        t = time.perf_counter()
        out = jax.block_until_ready(compiled(key, x, w))
        parts["run"] = time.perf_counter() - t
        first = time.perf_counter() - t0
        t = time.perf_counter()
        jax.block_until_ready(compiled(key, x, w))
        return first, time.perf_counter() - t, out, parts
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        lowered_init = jax.jit(batched_init).trace(key, x, w).lower()
        init_ready = pool.submit(lowered_init.compile, SMALL_COMPILE_OPTIONS)
        k, d = N_COMPONENTS, N_FEATURES
        shapes = tuple(jax.ShapeDtypeStruct(s, x.dtype) for s in
                       ((n_datasets, k), (n_datasets, k, d), (n_datasets, k, d, d)))
        lowered_loop = jax.jit(batched_loop).trace(shapes, x, w).lower()
        loop_ready = pool.submit(lowered_loop.compile, SMALL_COMPILE_OPTIONS)
        compiled_init = init_ready.result()
        params = compiled_init(key, x, w)
        compiled_loop = loop_ready.result()
        out = jax.block_until_ready(compiled_loop(params, x, w))
    first = time.perf_counter() - t0
    t = time.perf_counter()
    jax.block_until_ready(compiled_loop(compiled_init(key, x, w), x, w))
    return first, time.perf_counter() - t, out, parts


def child(variant: str, n_datasets: int) -> dict:
    """One variant in this (fresh) process."""
    import numpy as np

    x = make_data(n_datasets)
    if variant == "sklearn":
        import warnings

        from sklearn.mixture import GaussianMixture

        lls, t = [], time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for xb in x:
                lls.append(GaussianMixture(N_COMPONENTS, random_state=0).fit(xb).lower_bound_)
        return {"first": time.perf_counter() - t, "ll": float(np.mean(lls))}

    # scipy: jaxlib's LAPACK set-up imports it on the first call that lowers a
    # factorisation; in bench_small.py scikit-learn's import has done so before jaxem's.
    import jax
    import scipy.linalg  # noqa: F401

    import jaxem

    key = jax.random.PRNGKey(0)
    if variant in ("jaxem", "jaxem-warm"):
        if variant == "jaxem-warm":
            jaxem.enable_compilation_cache()
        model = jaxem.GaussianMixtureModel("full")
        t = time.perf_counter()
        result = jax.block_until_ready(jaxem.fit_batch(model, x, key,
                                                       n_components=N_COMPONENTS))
        first = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(jaxem.fit_batch(model, x, key, n_components=N_COMPONENTS))
        return {"first": first, "again": time.perf_counter() - t,
                "ll": float(np.mean(result.best.lower_bound)),
                "max_iter": int(np.max(result.best.n_iter))}
    x_dev, w_dev = jax.device_put(x), jax.device_put(np.ones(x.shape[:2], x.dtype))
    mode = {"bare": "vmap", "bare-pipelined": "pipelined", "bare-sequential": "sequential"}
    first, again, (ll, n_iter), parts = _bare(x_dev, w_dev, key, mode[variant])
    return {"first": first, "again": again, "ll": float(np.mean(ll)),
            "max_iter": int(np.max(n_iter)), **parts}


VARIANTS = ("sklearn", "jaxem", "bare", "bare-pipelined", "bare-sequential", "jaxem-warm")
LABELS = {"jaxem": "jaxem first call", "bare": "bare first call",
          "bare-pipelined": "bare-pipelined first call",
          "bare-sequential": "bare-sequential first call",
          "jaxem-warm": "jaxem first call, warm"}


def run_child(variant: str, n_datasets: int) -> dict:
    """The variant in a fresh process with an empty cache; ``jaxem-warm``: in a second
    process, after a first one filled the cache (``jaxem.enable_compilation_cache``)."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, XDG_CACHE_HOME=cache)
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        for _ in range(2 if variant == "jaxem-warm" else 1):
            out = subprocess.run([sys.executable, __file__, "--child", variant,
                                  "--n-datasets", str(n_datasets)],
                                 capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-datasets", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2,
                        help="fresh processes per variant (each row shows their range)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n_datasets)))
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; {args.n_datasets} datasets "
          f"x {N_SAMPLES} points, D = {N_FEATURES}, K = {N_COMPONENTS}, full; first call in a "
          "fresh process, cold cache")
    results = {v: [run_child(v, args.n_datasets) for _ in range(args.repeats)] for v in VARIANTS}
    sk = min(r["first"] for r in results["sklearn"])
    print(f"{'scikit-learn loop':<26} {sk:6.2f} s (best of {args.repeats})   mean ll "
          f"{results['sklearn'][0]['ll']:.4f}")
    for v in VARIANTS[1:]:
        runs = results[v]
        lo, hi = min(r["first"] for r in runs), max(r["first"] for r in runs)
        parts = ", ".join(f"{p} {runs[0][p]:.2f}" for p in ("trace+lower", "compile", "run")
                          if p in runs[0])
        print(f"{LABELS[v]:<26} {lo:6.2f}-{hi:.2f} s   {sk / hi:5.1f}-{sk / lo:.1f}x "
              f"scikit-learn   again {min(r['again'] for r in runs):.2f} s   mean ll "
              f"{runs[0]['ll']:.4f}   max iterations {runs[0]['max_iter']}"
              + (f"   ({parts} s)" if parts else ""))
    print(f"10x scikit-learn needs a first call of at most {sk / 10:.2f} s (cold); 50x, "
          f"{sk / 50:.3f} s (warm)")


if __name__ == "__main__":
    main()
