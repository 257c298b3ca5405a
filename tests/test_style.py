"""The code passes the linter configured in pyproject.toml (ruff: E, F, I, UP, B)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    ruff = Path(sys.executable).parent / "ruff"
    ruff = str(ruff) if ruff.exists() else shutil.which("ruff")
    assert ruff, "ruff is part of the dev extras"
    out = subprocess.run([ruff, "check", "jaxem", "tests", "benchmarks"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


PACKAGE_SOURCES = sorted((ROOT / "jaxem").glob("*.py"))
MODULES = sorted(p.stem for p in PACKAGE_SOURCES)


def test_no_matrix_is_inverted():
    # The README's promise: densities through precision Cholesky factors, covariances from
    # them by triangular solves; no general inverse anywhere in the package.
    pattern = re.compile(r"linalg\.(inv|pinv)\(")
    offenders = [f"{p.name}:{i}" for p in PACKAGE_SOURCES
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders


def test_modules_use_no_private_names_of_each_other():
    # What one module needs of another is that module's public surface; a private name
    # reached across modules is a second home for the same logic in waiting.
    pattern = re.compile(r"\b(" + "|".join(m for m in MODULES if not m.startswith("_"))
                         + r")\._[a-z]")
    offenders = [f"{p.name}:{i}: {line.strip()}" for p in PACKAGE_SOURCES
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders
