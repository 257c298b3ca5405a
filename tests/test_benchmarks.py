"""The benchmark script runs (its timings are recorded by hand, never asserted)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_fit_smoke():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_fit.py"), "--smoke", "--n-init", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    for name in ("jaxem float32", "jaxem float64", "jaxem float32 n_init=2", "scikit-learn"):
        assert name in out.stdout
    assert "float32 matmul roof" in out.stdout and "peak RSS" in out.stdout


def test_bench_memory_smoke():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--smoke"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "peak RSS" in out.stdout and "failed=False" in out.stdout


def test_bench_grad_smoke():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_grad.py"), "--smoke"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    for name in ("forward fit", "implicit", "unrolled, checkpoint=True", "envelope"):
        assert name in out.stdout
