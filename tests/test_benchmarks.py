"""The benchmark script runs (its timings are recorded by hand, never asserted)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    """``benchmarks/<script> args`` in a fresh process; it must exit cleanly."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out


def test_bench_fit_smoke():
    out = _run("bench_fit.py", "--smoke", "--n-init", "2")
    for name in ("jaxem float32", "jaxem float64", "jaxem float32 n_init=2", "scikit-learn"):
        assert name in out.stdout
    assert "float32 matmul roof" in out.stdout and "peak RSS" in out.stdout


def test_bench_memory_smoke():
    out = _run("bench_memory.py", "--smoke")
    assert "peak RSS" in out.stdout and "failed=False" in out.stdout


def test_bench_grad_smoke():
    out = _run("bench_grad.py", "--smoke")
    for name in ("forward fit", "implicit", "unrolled, checkpoint=True", "envelope"):
        assert name in out.stdout


def test_bench_grid_smoke():
    out = _run("bench_grid.py", "--smoke", "--peers", "sklearn64")
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| covariance, D, K | jaxem f32 s/iter | sklearn f64 |")
    # full and diag × D=3 × K∈{2,3}, one cell each per column of the header
    assert [r.split("|")[1].strip() for r in rows[1:]] == [
        "full, 3, 2", "full, 3, 3", "diag, 3, 2", "diag, 3, 3"]
    assert all(r.count("|") == rows[0].count("|") for r in rows)


def test_bench_grid_isolated_cells():
    # --isolate: the same rows, each the best of processes of their own (two here, each
    # after a pause of 0 s).
    out = _run("bench_grid.py", "--smoke", "--peers", "sklearn64", "--isolate", "0",
               "--rounds", "2")
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert "each cell in 2 process(es) of its own" in out.stdout
    assert [r.split("|")[1].strip() for r in rows[1:]] == [
        "full, 3, 2", "full, 3, 3", "diag, 3, 2", "diag, 3, 3"]
    assert all(r.count("|") == rows[0].count("|") for r in rows)


def test_bench_sgd_smoke():
    out = _run("bench_sgd.py", "--smoke")
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | iterations to target |")
    assert [r.split("|")[1].strip() for r in rows[2:]] == ["EM", "adam lr=0.03"]
    assert rows[2].split("|")[2].strip().isdigit()  # EM reaches its own target


def test_bench_small_smoke():
    out = _run("bench_small.py", "--rows", "batch", "--n-datasets", "4", "--n-sklearn", "2")
    # cold, warm (new process, cache filled), warm with SciPy's import, compiled
    rows = [line for line in out.stdout.splitlines() if "ratio" in line]
    assert len(rows) == 4 and "4 datasets x 200 pts, K=3 full, cold" in rows[0]
    assert "warm" in rows[1] and "SciPy" in rows[2] and "compiled" in rows[3]


def test_bench_compile_smoke():
    out = _run("bench_compile.py", "--ns", "300", "--d", "2", "--k", "2")
    assert "N=      300: XLA compile" in out.stdout


def test_stress_compile_smoke():
    out = _run("stress_compile.py", "--seconds", "2")
    assert out.stdout.splitlines()[-1].startswith("done: ") and "peak mappings" in out.stdout


def test_bench_stream_smoke(tmp_path):
    out = _run("bench_stream.py", "all", "--smoke", "--dir", str(tmp_path))
    for line in ("### memmap", "### init", "### disk", "### overhead", "### online",
                 "### transfer", "peak RSS", "ratio", "GB/s"):
        assert line in out.stdout, line


def test_bench_blocks_smoke():
    out = _run("bench_blocks.py", "--smoke")
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["diag, N=3000, D=4, K=3",
                                                       "full, N=3000, D=4, K=3"]
    assert all("*" in r and "auto/best" in r for r in rows)


def test_bench_mclust_compares_every_stored_cell():
    """The comparison with mclust's stored BIC table runs, and counts what it compares:
    Old Faithful, K = 1..2 × 4 types = 8 cells, none worse by more than 0.5 (K ≤ 2 has one
    optimum, which any search finds)."""
    out = _run("bench_mclust.py", "--datasets", "faithful", "--max-k", "2", "--n-init", "2")
    assert "worse than mclust (> 0.5): 0/8 cells" in out.stdout


def test_best_of_warms_up_before_it_times():
    # Untimed calls for `warmup` seconds come first (the VM's first calls after a peer ran
    # were 2x slower); the result is the fastest timed call.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_fit
    finally:
        sys.path.pop(0)
    import time

    calls = []

    def timed(_):
        calls.append(1)
        time.sleep(0.02 if len(calls) <= 3 else 0.001)

    best = bench_fit.best_of(2, timed, warmup=0.05)
    assert len(calls) >= 4 and best < 0.01  # the slow first calls were not timed
    calls.clear()
    assert bench_fit.best_of(2, timed, warmup=0) >= 0.02 and len(calls) == 2


def test_bench_batch_floor_smoke():
    # Every variant (jaxem, the bare program, scikit-learn) fits the same batch: their mean
    # final log-likelihoods agree, so the floor it reports is a floor for the same job.
    out = _run("bench_batch_floor.py", "--n-datasets", "20", "--repeats", "1")
    lines = out.stdout.splitlines()
    names = ("scikit-learn loop", "jaxem first call", "bare first call",
             "bare-pipelined first call", "jaxem first call, warm")
    ll = {}
    for name in names:
        (line,) = [row for row in lines if row.startswith(name + " ")]
        ll[name] = float(line.split("mean ll")[1].split()[0])
    assert max(ll.values()) - min(ll.values()) < 0.05, ll
    assert any(line.startswith("10x scikit-learn needs a first call of at most") for line in lines)
