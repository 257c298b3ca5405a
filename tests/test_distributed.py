"""Fits over two processes on 127.0.0.1 (jax.distributed, gloo): the same as one process."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import make_blobs

import jaxem
from jaxem import distributed, gmm

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(commands, timeout=240):
    """Start both processes, wait for both (bounded), always reap them; (rc, output) each."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent) + os.pathsep + str(HERE),
           "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                              text=True) for c in commands]
    deadline = time.monotonic() + timeout
    try:
        outs = []
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append((p.returncode, out))
        return outs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_two_processes_fit_like_one(tmp_path, rng):
    x = make_blobs(rng, n_per=300, k=3, d=3)
    data = tmp_path / "x.npy"
    np.save(data, x)
    port = _free_port()
    out = tmp_path / "result"
    results = _run_pair([[sys.executable, str(WORKER), str(port), str(r), str(data), str(out),
                          "fit"] for r in (0, 1)])
    for rc, text in results:
        assert rc == 0, text[-3000:]
    a, b = (np.load(f"{out}.{r}.npz") for r in (0, 1))
    with jax.enable_x64(True):
        model = gmm.GaussianMixtureModel("full")
        p0 = model.init(jax.random.PRNGKey(0), x, 3)
        one = jaxem.fit(model, x, p0, tol=-1.0, max_iter=8)
    for r in (a, b):  # every process holds the one-process fit of all the rows
        for kind in ("mem", "disk"):
            np.testing.assert_allclose(r[f"{kind}_means"], one.params.means, rtol=0, atol=1e-10)
            np.testing.assert_allclose(r[f"{kind}_cov"], one.params.covariances, rtol=0,
                                       atol=1e-10)
            np.testing.assert_allclose(r[f"{kind}_ll"], one.lower_bounds, rtol=0, atol=1e-10)
    # Restarts initialised from a subsample drawn across the processes: the same everywhere.
    np.testing.assert_array_equal(a["restart_means"], b["restart_means"])
    np.testing.assert_array_equal(a["restart_ll"], b["restart_ll"])


def test_the_command_on_two_processes_writes_one_model(tmp_path, rng):
    x = make_blobs(rng, n_per=400, k=2, d=2).astype(np.float32)
    data = tmp_path / "x.npy"
    np.save(data, x)
    port = _free_port()
    model_file = tmp_path / "m.npz"
    base = [sys.executable, "-m", "jaxem.cli", "fit", str(data), "-k", "2", "--quiet",
            "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    results = _run_pair([base + ["--process-id", "0", "--out", str(model_file)],
                         base + ["--process-id", "1"]])
    for rc, text in results:
        assert rc == 0, text[-3000:]
    assert "model written to" in results[0][1] and "converged=" in results[0][1]
    assert "converged=" not in results[1][1]  # process 0 alone reports
    two = jaxem.GaussianMixture.load(model_file)
    one = jaxem.GaussianMixture(2, random_state=0).fit(str(data))
    np.testing.assert_allclose(np.sort(two.means_, 0), np.sort(one.means_, 0), atol=1e-4)


def test_a_dead_process_stops_the_other_and_nothing_hangs(tmp_path, rng):
    x = make_blobs(rng, n_per=200, k=3, d=3)
    data = tmp_path / "x.npy"
    np.save(data, x)
    port = _free_port()
    t0 = time.monotonic()
    results = _run_pair([[sys.executable, str(WORKER), str(port), str(r), str(data),
                          str(tmp_path / "r"), "die"] for r in (0, 1)], timeout=120)
    assert results[1][0] == 3
    rc, text = results[0]
    assert rc != 0 and "another process died or left the run" in text, text[-2000:]
    assert time.monotonic() - t0 < 120


def test_an_unreachable_coordinator_is_a_clear_error_not_a_hang():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="could not reach the coordinator"):
        distributed.initialize(f"127.0.0.1:{_free_port()}", 2, 1, timeout=2)
    assert time.monotonic() - t0 < 30
    with pytest.raises(ValueError, match="HOST:PORT"):
        distributed.initialize("localhost", 2, 1)
    with pytest.raises(ValueError, match="process_id must be below"):
        distributed.initialize("127.0.0.1:1234", 2, 2)


def test_process_rows_split_every_row_once():
    for n in (1, 7, 100, 101):
        for count in (1, 2, 3, 8):
            parts = [distributed.process_rows(n, i, count) for i in range(count)]
            covered = np.concatenate([np.arange(n)[p] for p in parts])
            np.testing.assert_array_equal(covered, np.arange(n))
