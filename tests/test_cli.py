"""The installed ``jaxem`` command, run as a real subprocess."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def jaxem_command() -> list[str]:
    exe = Path(sys.executable).parent / "jaxem"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("jaxem")
    if found is None:  # pragma: no cover - the package must be installed for this suite
        pytest.fail("the jaxem console script is not installed (pip install -e .)")
    return [found]


def run(*args, timeout=600):
    return subprocess.run([*jaxem_command(), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_demo_prints_bic_table_chosen_model_and_writes_plot(tmp_path):
    png = tmp_path / "demo.png"
    out = run("demo", "--max-k", "3", "--n-init", "2", "--plot", str(png))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "BIC (lower is better" in text and "Chosen model: K=" in text
    table = text.split("= chosen)")[1].split("Chosen model")[0]
    assert table.count("*") == 1  # exactly one chosen cell in the table
    for ct in ("full", "tied", "diag", "spherical"):
        assert ct in text
    iters = [ln for ln in text.splitlines() if ln.strip().startswith("iter ")]
    assert len(iters) >= 2
    # The printed log-likelihoods never decrease.
    values = [float(ln.split(":")[1].split()[0]) for ln in iters]
    assert all(b >= a - 1e-6 for a, b in zip(values, values[1:], strict=False))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_help_and_bad_usage():
    assert run("--help").returncode == 0
    assert "demo" in run("--help").stdout
    assert run("demo", "--help").returncode == 0
    bad = run("frobnicate")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def test_demo_error_is_one_line(tmp_path):
    out = run("demo", "--max-k", "0")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "--max-k must be >= 1" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
