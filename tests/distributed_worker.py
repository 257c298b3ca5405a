"""One process of the two-process tests in test_distributed.py (run as a script)."""

import os
import sys

import numpy as np


def main():
    port, rank, data, out, mode = sys.argv[1:6]
    rank = int(rank)
    import jax

    jax.config.update("jax_enable_x64", True)
    from jaxem import blocks, distributed, gmm, streamed

    distributed.initialize(f"127.0.0.1:{port}", 2, rank, timeout=60, heartbeat_timeout=10)
    import jaxem

    x = np.load(data)
    rows = distributed.process_rows(len(x))
    model = gmm.GaussianMixtureModel("full")
    p0 = model.init(jax.random.PRNGKey(0), x, 3)  # every process: the same start
    if mode == "die":
        streamed.fit(model, x[rows], p0, tol=-1.0, max_iter=2)
        if rank == 1:
            os._exit(3)
        streamed.fit(model, blocks.HostData(data, rows=rows), p0, tol=-1.0, max_iter=50)
        return
    in_memory = jaxem.fit(model, x[rows], p0, tol=-1.0, max_iter=8)
    on_disk = streamed.fit(model, blocks.HostData(data, rows=rows), p0, tol=-1.0,
                           max_iter=8, block_rows=100)
    restarts = jaxem.fit_restarts(model, blocks.HostData(data, rows=rows),
                                  jax.random.PRNGKey(1), n_components=3, n_init=2,
                                  tol=-1.0, max_iter=5)
    np.savez(f"{out}.{rank}.npz", mem_means=in_memory.params.means,
             mem_cov=in_memory.params.covariances, mem_ll=in_memory.lower_bounds,
             disk_means=on_disk.params.means, disk_cov=on_disk.params.covariances,
             disk_ll=on_disk.lower_bounds, restart_means=restarts.best.params.means,
             restart_ll=restarts.restarts.lower_bound)


if __name__ == "__main__":
    main()
