"""Fits over several processes and hosts, on JAX's own distributed runtime.

Launch one process per host (or several per host), each with the same coordinator address,
the number of processes and its own index, and call :func:`initialize` first. Then the
ordinary drivers fit over the rows of *all* processes, each process passing only its own:

- in memory: :func:`jaxem.fit` / :func:`jaxem.fit_restarts` build one global array over
  every process's devices (``jax.make_array_from_process_local_data``) and the model's
  E-step ``psum``s its statistics over the data axis, which spans the processes;
- streamed: :mod:`jaxem.streamed` sums each pass's statistics across processes;

so every process ends with the same parameters, equal to a one-process fit of all the rows
(float64: 1e-10, tested with two processes on one machine). :func:`process_rows` gives each
process its share of a file every process can read, e.g. on a shared file system.

On CPUs the collectives run over gloo (TCP). A coordinator that cannot be reached raises
``RuntimeError`` after ``timeout`` seconds. When a process dies, the others' next
collective fails at once (a streamed pass raises ``RuntimeError`` naming the cause), and
JAX's runtime, which notices the silent process within ``heartbeat_timeout`` seconds, then
ends them with a non-zero exit: never a hang.
"""

from __future__ import annotations

import socket
import sys
import time

import jax

from jaxem import _validation


def initialize(coordinator: str, num_processes: int, process_id: int, *, timeout: int = 60,
               heartbeat_timeout: int = 60) -> None:
    """Join a run of ``num_processes`` processes (``jax.distributed.initialize``).

    Args:
      coordinator: ``HOST:PORT`` of process 0, which serves the coordination service on it.
      num_processes: how many processes take part.
      process_id: this process's index, 0 … num_processes − 1.
      timeout: seconds to wait for every process to join before raising.
      heartbeat_timeout: seconds after which a silent (dead) process stops the run.
    """
    host, sep, port = str(coordinator).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator must be HOST:PORT, got {coordinator!r}")
    _validation.check_int(num_processes, "num_processes", 1)
    _validation.check_int(process_id, "process_id", 0)
    if process_id >= num_processes:
        raise ValueError(f"process_id must be below num_processes={num_processes}, got "
                         f"{process_id}")
    _validation.check_int(timeout, "timeout", 1)
    _validation.check_int(heartbeat_timeout, "heartbeat_timeout", 1)
    if process_id == 0:
        print(f"jaxem: process 0 of {num_processes} serves the coordinator at {coordinator}; "
              f"waiting up to {timeout} s for the others", file=sys.stderr, flush=True)
    else:
        # JAX's client aborts the whole process when the coordinator does not answer;
        # find out first, and raise.
        _wait_for(host, int(port), timeout, process_id, num_processes)
    # CPU collectives across processes need an implementation; gloo ships with jaxlib.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    except Exception as e:  # the runtime's own error types vary across versions
        raise RuntimeError(
            f"process {process_id} of {num_processes} could not join the run at "
            f"{coordinator} within {timeout} s ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}); is process 0 running and the port open?"
        ) from None


def _wait_for(host: str, port: int, timeout: float, process_id: int, num_processes: int):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"process {process_id} of {num_processes} could not reach the coordinator "
                    f"at {host}:{port} within {timeout} s ({e}); is process 0 running, and is "
                    "the port open to this host?") from None
            time.sleep(0.2)


def process_rows(n_rows: int, process_id: int | None = None,
                 num_processes: int | None = None) -> slice:
    """This process's contiguous share of ``n_rows`` rows: the rows split as evenly as
    possible, in process order."""
    process_id = jax.process_index() if process_id is None else process_id
    num_processes = jax.process_count() if num_processes is None else num_processes
    start = n_rows * process_id // num_processes
    stop = n_rows * (process_id + 1) // num_processes
    return slice(start, stop)
