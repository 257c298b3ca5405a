"""Data beyond memory: streamed exact EM, the initialisation at large N, online EM.

Every case runs in a fresh child process (peak RSS is the child's own ``ru_maxrss``), the
compared runs back to back in one invocation:

    python benchmarks/bench_stream.py memmap    # 5e7 x 16 float32 .npy (3.2 GB), diag K=8
    python benchmarks/bench_stream.py init      # 2e7 x 16 in memory, full K=32: init vs given
    python benchmarks/bench_stream.py disk      # 2e8 x 16 .npy (12.8 GB) streamed, diag K=16
    python benchmarks/bench_stream.py overhead  # 2e7 x 32, full K=32: streamed vs in memory
    python benchmarks/bench_stream.py online    # 1e7 x 8, full K=8: online EM vs batch EM
    python benchmarks/bench_stream.py transfer  # host -> device GB/s of the block reader
    python benchmarks/bench_stream.py all --smoke

Data files are generated once (float32, a mixture of well-separated Gaussians, written
block by block) under ``--dir`` (default: the system's temporary folder) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {  # case: (N, D, K, covariance), and the --smoke sizes
    "memmap": ((50_000_000, 16, 8, "diag"), (40_000, 4, 3, "diag")),
    "init": ((20_000_000, 16, 32, "full"), (40_000, 4, 3, "full")),
    "disk": ((200_000_000, 16, 16, "diag"), (60_000, 4, 3, "diag")),
    "overhead": ((20_000_000, 32, 32, "full"), (40_000, 4, 3, "full")),
    "online": ((10_000_000, 8, 8, "full"), (200_000, 2, 3, "full")),
    "transfer": ((20_000_000, 32, 32, "full"), (40_000, 4, 3, "full")),  # overhead's file
}


def rss_gb() -> float:
    """This process's peak resident memory. From /proc (VmHWM, which starts afresh at exec)
    where there is one: ``ru_maxrss`` carries a forked child's parent's peak across exec,
    and the parent may just have written a large file through a mapping."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:  # pragma: no cover - not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _centres(d, k, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(k, d)) * 4).astype(np.float32)


def write_data(path: Path, n: int, d: int, k: int, block: int = 1_000_000) -> Path:
    """A float32 .npy of n rows from k unit Gaussians, written without holding it whole."""
    if path.exists() and np.load(path, mmap_mode="r").shape == (n, d):
        return path
    centres = _centres(d, k)
    rng = np.random.default_rng(1)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for start in range(0, n, block):
        stop = min(n, start + block)
        labels = rng.integers(0, k, stop - start)
        out[start:stop] = centres[labels] + rng.standard_normal((stop - start, d), np.float32)
    out.flush()
    del out
    return path


def _params(d, k, cov, dtype=np.float32):
    from jaxem import gmm

    c = {"full": np.stack([np.eye(d)] * k), "tied": np.eye(d), "diag": np.ones((k, d)),
         "spherical": np.ones(k)}[cov]
    centres = _centres(d, k) + 0.5  # near, not at, the truth
    return gmm.make_params(np.full(k, 1 / k, dtype), centres.astype(dtype), c.astype(dtype), cov)


def _child(case: str, role: str, path: str, n: int, d: int, k: int, cov: str, iters: int):
    """The measured work of one case/role, in this (fresh) process; prints one JSON line."""
    import jax

    import jaxem
    from jaxem import blocks, gmm, online, streamed

    model = gmm.GaussianMixtureModel(cov)
    out = {}
    t = time.perf_counter()
    if role == "estimator-memmap":
        gm = jaxem.GaussianMixture(k, covariance_type=cov, max_iter=iters, tol=-1.0,
                                   random_state=0)
        gm.fit(np.load(path, mmap_mode="r"))
        out["lower_bound"] = gm.lower_bound_
    elif role in ("estimator-memory", "given-params-memory"):
        x = np.load(path)  # the caller's array
        out["data_gb"] = x.nbytes / 1e9
        t = time.perf_counter()
        if role == "estimator-memory":
            gm = jaxem.GaussianMixture(k, covariance_type=cov, max_iter=iters, tol=-1.0,
                                       random_state=0).fit(x)
            out["lower_bound"] = gm.lower_bound_
        else:
            r = jaxem.fit(model, x, _params(d, k, cov), tol=-1.0, max_iter=iters)
            jax.block_until_ready(r)
            out["lower_bound"] = float(r.lower_bound)
    elif role in ("streamed-disk", "streamed-cached", "in-memory"):
        stamps = []

        def tick(restart, iteration, ll, change):
            stamps.append(time.perf_counter())

        if role == "in-memory":
            x = np.load(path)
            t = time.perf_counter()
            r = jaxem.fit(model, x, _params(d, k, cov), tol=-1.0, max_iter=iters,
                          progress=tick)
            jax.block_until_ready(r)
            jax.effects_barrier()
        else:
            if role == "streamed-cached":  # the file in the page cache: read it once
                for _ in blocks.HostData(path)._chunks(2**20):
                    pass
                t = time.perf_counter()
            r = streamed.fit(model, path, _params(d, k, cov), tol=-1.0, max_iter=iters,
                             progress=tick)
        per_iter = np.diff([t, *stamps])
        out["first_iter_s"] = float(per_iter[0])
        out["iter_s"] = float(np.min(per_iter[1:])) if len(per_iter) > 1 else float(per_iter[0])
        out["lower_bound"] = float(r.lower_bound)
    elif role in ("online", "batch"):
        x = np.load(path)
        p0 = jax.tree_util.tree_map(lambda a: a[0], streamed.initial_params(
            model, x, jax.random.PRNGKey(0), n_components=k))
        jax.block_until_ready(p0)
        if role == "batch":
            t = time.perf_counter()
            r = jaxem.fit(model, x, p0, tol=1e-6, max_iter=1000)
            jax.block_until_ready(r)
            out.update(lower_bound=float(r.lower_bound), n_iter=int(r.n_iter))
        else:
            target = float(sys.argv[-1])
            batch_rows, checks = 8192, 8
            steps = -(-n // batch_rows)
            state = online.start(model, p0)
            xd = x  # batches are sliced on the host, as a stream would deliver them
            spent, reached, t_eval = 0.0, None, 0.0
            for step in range(4 * steps):
                i = (step % steps) * batch_rows
                t0 = time.perf_counter()
                state = online.update(model, state, xd[i:i + batch_rows], kappa=0.6)
                if (step + 1) % (steps // checks) == 0:
                    jax.block_until_ready(state)
                    spent += time.perf_counter() - t0
                    e0 = time.perf_counter()
                    _, ll = model.e_step(state.params, x)
                    t_eval += time.perf_counter() - e0
                    if float(ll) >= target - 1e-3:
                        reached = (step + 1) / steps
                        out["lower_bound"] = float(ll)
                        break
                else:
                    spent += time.perf_counter() - t0
            out.update(passes=reached, eval_s=t_eval, seconds=spent)  # evaluations excluded
    elif role == "transfer":
        data = blocks.HostData(path)
        rows = blocks.default_block_rows(d, np.float32, n)
        for _ in blocks.HostData(path)._chunks(2**20):  # page cache warm
            pass
        t = time.perf_counter()
        moved = 0
        for b, (xd, _wd) in data.device_blocks(rows, np.float32):
            xd.block_until_ready()
            moved += b.x.nbytes
        out["gb_per_s"] = moved / 1e9 / (time.perf_counter() - t)
        big = np.ones((rows, d), np.float32)
        t0 = time.perf_counter()
        for _ in range(20):
            jax.device_put(big).block_until_ready()
        out["device_put_gb_per_s"] = 20 * big.nbytes / 1e9 / (time.perf_counter() - t0)
        out["device"] = str(jax.devices()[0])
    out.setdefault("seconds", time.perf_counter() - t)
    out["peak_rss_gb"] = rss_gb()
    print("RESULT " + json.dumps(out), flush=True)


def _spawn(case, role, path, n, d, k, cov, iters, extra=()):
    cmd = [sys.executable, __file__, "--child", case, role, str(path), str(n), str(d), str(k),
           cov, str(iters), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{case}/{role} failed:\n{p.stderr[-3000:]}")
    line = [s for s in p.stdout.splitlines() if s.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def run_case(case: str, folder: Path, smoke: bool) -> list[str]:
    (n, d, k, cov) = SIZES[case][1 if smoke else 0]
    path = write_data(folder / f"jaxem-bench-{n}x{d}-k{k}.npy", n, d, k)
    gb = n * d * 4 / 1e9
    lines = [f"### {case}: N={n:,} D={d} K={k} {cov}, float32 file {gb:.2f} GB"]
    if case == "memmap":
        r = _spawn(case, "estimator-memmap", path, n, d, k, cov, 3)
        lines.append(f"GaussianMixture(max_iter=3).fit(np.load(path, mmap_mode='r')): "
                     f"{r['seconds']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB")
    elif case == "init":
        a = _spawn(case, "estimator-memory", path, n, d, k, cov, 3)
        b = _spawn(case, "given-params-memory", path, n, d, k, cov, 3)
        lines.append(f"estimator, default init, 3 iterations: {a['seconds']:.1f} s, peak RSS "
                     f"{a['peak_rss_gb']:.2f} GB (data {a['data_gb']:.2f} GB)")
        lines.append(f"jaxem.fit from given params, 3 iterations: {b['seconds']:.1f} s, peak "
                     f"RSS {b['peak_rss_gb']:.2f} GB")
        lines.append(f"ratio {a['seconds'] / b['seconds']:.2f}x (target <= 2); estimator RSS "
                     f"= data + {a['peak_rss_gb'] - a['data_gb']:.2f} GB (target <= 2)")
    elif case == "disk":
        r = _spawn(case, "streamed-disk", path, n, d, k, cov, 2)
        lines.append(f"streamed from disk: first iteration {r['first_iter_s']:.1f} s, next "
                     f"{r['iter_s']:.1f} s ({gb / r['iter_s']:.2f} GB/s), peak RSS "
                     f"{r['peak_rss_gb']:.2f} GB")
    elif case == "overhead":
        a = _spawn(case, "in-memory", path, n, d, k, cov, 3)
        b = _spawn(case, "streamed-cached", path, n, d, k, cov, 3)
        lines.append(f"in memory: {a['iter_s']:.2f} s/iteration, peak RSS "
                     f"{a['peak_rss_gb']:.2f} GB")
        lines.append(f"streamed (page cache): {b['iter_s']:.2f} s/iteration, peak RSS "
                     f"{b['peak_rss_gb']:.2f} GB; ratio {b['iter_s'] / a['iter_s']:.2f}x "
                     "(target <= 1.3)")
    elif case == "online":
        a = _spawn(case, "batch", path, n, d, k, cov, 0)
        b = _spawn(case, "online", path, n, d, k, cov, 0, (str(a["lower_bound"]),))
        lines.append(f"batch EM to convergence (tol 1e-6): {a['seconds']:.1f} s, "
                     f"{a['n_iter']} iterations, mean log-likelihood {a['lower_bound']:.5f}")
        reach = ("never (4 passes)" if b["passes"] is None else
                 f"{b['passes']:.2f} passes, {b['seconds']:.1f} s")
        lines.append(f"online EM (8192-row batches, kappa 0.6) to within 1e-3: {reach}")
    elif case == "transfer":
        r = _spawn(case, "transfer", path, n, d, k, cov, 0)
        lines.append(f"{r['device']}: block reader host -> device {r['gb_per_s']:.2f} GB/s; "
                     f"plain device_put of one block {r['device_put_gb_per_s']:.2f} GB/s")
    return lines


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        case, role, path, n, d, k, cov, iters = sys.argv[2:10]
        _child(case, role, path, int(n), int(d), int(k), cov, int(iters))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("case", choices=[*SIZES, "all"])
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where data files go")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a test of the script)")
    a = p.parse_args(argv)
    folder = Path(a.dir)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"# bench_stream.py on {os.cpu_count()} CPUs")
    for case in (SIZES if a.case == "all" else [a.case]):
        for line in run_case(case, folder, a.smoke):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
