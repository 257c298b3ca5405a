"""EM against gradient ascent (optax) on the same log-likelihood, from the same start.

    python benchmarks/bench_sgd.py --n 100000 --d 8 --k 8 --covariance full
    python benchmarks/bench_sgd.py --smoke            # tiny size, used by the test suite

Both climb ``ℓ(θ)``, the mean log-likelihood, from the same start (means on K random
samples, unit covariances, equal weights), on the full data (no mini-batches: every step
sees what an EM iteration sees). EM runs ``--em-iters`` iterations (``tol=-1``); each
optax optimizer runs ``--steps`` steps of :func:`jaxem.fit_sgd`. The target is EM's last
ℓ less ``--gap`` (relative). The table gives, for each method, the iterations or steps to
reach it, the seconds per iteration (compile excluded: the first call less the best of
``--repeats``), the seconds to the target, and EM's speed-up in time. A method that never
reaches the target within its budget is marked "not reached" with its best ℓ. EM runs
with ``reg_covar=0`` here so that both maximise the same function.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fit import best_of, initial_params, make_data  # noqa: E402

import jaxem  # noqa: E402
from jaxem import gmm  # noqa: E402


def first_reaching(history, target) -> int | None:
    """1-based index of the first entry >= target, or None."""
    hits = np.flatnonzero(np.asarray(history) >= target)
    return int(hits[0]) + 1 if hits.size else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--covariance", default="full", choices=["full", "tied", "diag", "spherical"])
    ap.add_argument("--em-iters", type=int, default=300)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-3, 1e-2, 3e-2, 1e-1])
    ap.add_argument("--gap", type=float, default=1e-4,
                    help="target: EM's final log-likelihood minus this much (relative)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.d, args.k, args.em_iters, args.steps = 2000, 3, 3, 50, 200
        args.lr, args.repeats = [3e-2], 1

    x = make_data(args.n, args.d, args.k, args.seed)
    x = x.astype(np.float32)
    model = gmm.GaussianMixtureModel(args.covariance)
    # Means on K random samples, unit covariances, equal weights (bench_fit's start): a
    # start both methods have to climb from, unlike k-means on separated blobs.
    weights, means, cov = initial_params(x, args.k, args.covariance, args.seed + 1)
    p0 = gmm.make_params(weights.astype(np.float32), means.astype(np.float32),
                         cov.astype(np.float32), args.covariance)
    print(f"jaxem {jaxem.__version__}, jax {jax.__version__}, {jax.devices()[0].platform}, "
          f"{platform.machine()}; N={args.n} D={args.d} K={args.k} {args.covariance}, float32")

    def em_fit(iters):
        return jaxem.fit(model, x, p0, tol=-1.0, max_iter=iters, reg_covar=0.0)

    t = time.perf_counter()
    em_result = jax.block_until_ready(em_fit(args.em_iters))
    em_first = time.perf_counter() - t
    em_time = best_of(args.repeats, lambda _: jax.block_until_ready(em_fit(args.em_iters)))
    em_compile = em_first - em_time
    history = np.asarray(em_result.lower_bounds)
    final = float(history[-1])
    target = final - args.gap * abs(final)
    rows = [("EM", first_reaching(history, target), em_time / args.em_iters, final,
             em_compile)]
    for lr in args.lr:
        opt = optax.adam(lr)

        def sgd(opt=opt):
            return jaxem.fit_sgd(model, x, p0, optimizer=opt, n_steps=args.steps)

        t = time.perf_counter()
        result = jax.block_until_ready(sgd())
        first = time.perf_counter() - t
        seconds = best_of(args.repeats, lambda _, sgd=sgd: jax.block_until_ready(sgd()))
        compile_s = first - seconds
        lls = np.asarray(result.log_likelihoods)
        rows.append((f"adam lr={lr:g}", first_reaching(lls, target), seconds / args.steps,
                     float(np.nanmax(lls)), compile_s))

    em_to_target = rows[0][1] * rows[0][2]
    print(f"target: EM's log-likelihood after {args.em_iters} iterations, {final:.6f}, "
          f"less {args.gap:g} relative = {target:.6f}")
    print("| method | iterations to target | s/iteration | s to target | best ℓ | compile s "
          "| EM faster by |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, reached, per_iter, best, compile_s in rows:
        if reached is None:
            to_target, ratio, reached_s = "not reached", "–", f"> {args.steps}"
        else:
            seconds = reached * per_iter
            to_target, ratio, reached_s = f"{seconds:.3f}", f"{seconds / em_to_target:.1f}×", \
                str(reached)
        print(f"| {name} | {reached_s} | {per_iter:.2e} | {to_target} | {best:.6f} | "
              f"{compile_s:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
