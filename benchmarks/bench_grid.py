"""The results grid: every covariance type × D × K at one N, jaxem against its peers.

    python benchmarks/bench_grid.py --n 100000
    python benchmarks/bench_grid.py --n 1000000 --peers sklearn64 --iters 2
    python benchmarks/bench_grid.py --smoke          # tiny grid, used by the test suite
    python benchmarks/bench_grid.py --n 200000 --peers sklearn64 --isolate 20

Each cell is timed exactly as ``bench_fit.py`` times it (same data generator, same initial
parameters for every method, fixed iteration count, compile apart, same process). Prints one
Markdown table row per configuration: jaxem float32 seconds per iteration and compile time,
each peer's seconds per iteration, jaxem's effective GFLOP/s and % of this machine's float32
matmul roof, and the speed-up over each peer.

``--isolate SECONDS`` runs each cell in a process of its own after a pause of that many
seconds (the roof measured in each): on a machine whose CPU time is shared (this project's
VM), the later rows of one long process ran up to 1.7× slower than the same rows alone.
``--rounds R`` times each cell R times in turn, jaxem then each peer, and keeps each one's
best: on that VM a slow spell of a few seconds made one side of a cell 2-3× slower (diag
D = 32, K = 8: 2.4 ms an iteration, 5.3 ms in one grid run), so one round can rank a cell
by the VM's weather rather than by the code. With ``--isolate``, each round is a process of
its own: there a whole process sometimes ran a cell 2× slower throughout.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_fit  # noqa: E402  (the timing functions live there)

PEERS = {
    "sklearn64": ("sklearn f64", "sklearn", lambda x, i, c, it, r: bench_fit.time_sklearn(
        x, i, c, it, r, np.float64)),
    "sklearn32": ("sklearn f32", "sklearn", lambda x, i, c, it, r: bench_fit.time_sklearn(
        x, i, c, it, r, np.float32)),
    "gmmx": ("gmmx f32", "gmmx", lambda x, i, c, it, r: bench_fit.time_gmmx(
        x, i, c, it, r, np.float32)),
    "pomegranate": ("pomegranate f32", "pomegranate", lambda x, i, c, it, r:
                    bench_fit.time_pomegranate(x, i, c, it, r, np.float32)),
}


# A child process of --isolate hands its figures back on a line of its own.
CELL_MARK = "#cell "


def _row(ct, d, k, s, times, comp, a, roof) -> None:
    """Prints one Markdown row of the grid."""
    gf = bench_fit.flops_per_iter(a.n, d, k, ct) / s / 1e9
    cells = "".join("– | " if t is None else f"{t:.3g} | " for t in times)
    ups = " / ".join("–" if t is None else f"{t / s:.1f}×" for t in times) or "–"
    print(f"| {ct}, {d}, {k} | {s:.3g} | {cells}{gf:.1f} ({100 * gf / roof:.0f}%) | {ups} "
          f"| {comp:.2f} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", default="8,32,64", help="comma list of D")
    p.add_argument("--k", default="8,32,64", help="comma list of K")
    p.add_argument("--covariance", default="full,tied,diag,spherical")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--peers", default="sklearn64,sklearn32,gmmx",
                   help="comma list from " + ", ".join(PEERS) + " ('' for none)")
    p.add_argument("--smoke", action="store_true", help="tiny grid (test suite)")
    p.add_argument("--rounds", type=int, default=1,
                   help="time each cell this many times in turn, jaxem then the peers; "
                        "keep each one's best")
    p.add_argument("--isolate", type=float, default=None, metavar="SECONDS",
                   help="each cell in a fresh process, after a pause of SECONDS")
    p.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        a.n, a.d, a.k, a.covariance, a.iters = 500, "3", "2,3", "full,diag", 2
    if a.rounds < 1 or a.repeats < 1:
        p.error("--rounds and --repeats must be at least 1")
    ds, ks = [int(v) for v in a.d.split(",")], [int(v) for v in a.k.split(",")]
    cov_types = a.covariance.split(",")
    for ct in cov_types:
        if ct not in ("full", "tied", "diag", "spherical"):
            p.error(f"--covariance: unknown covariance type {ct!r}")
    peers = []
    for name in (s for s in a.peers.split(",") if s):
        if name not in PEERS:
            p.error(f"--peers: unknown peer {name!r}")
        if importlib.util.find_spec(PEERS[name][1]):
            peers.append(name)
        else:
            print(f"(peer {name} not installed: skipped)")

    roof = bench_fit.matmul_roof(512 if a.smoke else 2048)
    labels = [PEERS[s][0] for s in peers]
    if not a.rows_only:
        print(f"machine: {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} "
              f"on {jax.devices()[0].platform}; float32 matmul roof {roof:.1f} GFLOP/s; "
              f"N={a.n}, {a.iters} iterations, best of {a.repeats}"
              + ("" if a.rounds == 1 or a.isolate is not None
                 else f" in each of {a.rounds} rounds, taken in turn")
              + ("" if a.isolate is None else f"; each cell in {a.rounds} process(es) of its "
                 f"own, each after {a.isolate:g} s, the best kept") + "\n")
        print("| covariance, D, K | jaxem f32 s/iter | " + "".join(f"{lab} | " for lab in labels)
              + "GFLOP/s (% roof) | speed-up vs " + " / ".join(labels or ["-"])
              + " | compile s |")
        print("|" + " --- |" * (5 + len(labels)))
    for ct, d, k in itertools.product(cov_types, ds, ks):
        if a.isolate is not None:
            # One process per round: on the shared VM a whole process sometimes ran a cell
            # 2x slower throughout (the same program; diag D = 32, K = 8: 5.2 ms an iteration
            # in 2-3 processes of 10, 2.3 ms in the others), so the rounds must not share one.
            found = []
            for _ in range(a.rounds):
                time.sleep(a.isolate)
                cell = [sys.executable, os.path.abspath(__file__), "--rows-only", "--n",
                        str(a.n), "--covariance", ct, "--d", str(d), "--k", str(k), "--iters",
                        str(a.iters), "--repeats", str(a.repeats), "--peers", ",".join(peers)]
                out = subprocess.run(cell, capture_output=True, text=True, check=True)
                found += [json.loads(line[len(CELL_MARK):]) for line in out.stdout.splitlines()
                          if line.startswith(CELL_MARK)]
            s = min(f["jaxem"] for f in found)
            times = [None if any(f["peers"][i] is None for f in found)
                     else min(f["peers"][i] for f in found) for i in range(len(peers))]
            _row(ct, d, k, s, times, min(f["compile"] for f in found), a, roof)
            continue
        x = bench_fit.make_data(a.n, d, k)
        init = bench_fit.initial_params(x, k, ct)
        comp, run = bench_fit.jaxem_runner(x, init, ct, a.iters, np.float32, None)
        s, times = np.inf, [np.inf] * len(peers)
        for _ in range(a.rounds):
            s = min(s, bench_fit.best_of(a.repeats, lambda _, run=run: run()) / max(a.iters, 1))
            for i, name in enumerate(peers):
                r = PEERS[name][2](x, init, ct, a.iters, a.repeats)
                times[i] = None if r is None or times[i] is None else min(times[i], r[1])
        if a.rows_only:
            print(CELL_MARK + json.dumps({"jaxem": s, "peers": times, "compile": comp}))
        _row(ct, d, k, s, times, comp, a, roof)
    return 0


if __name__ == "__main__":
    sys.exit(main())
