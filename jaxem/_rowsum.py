"""Sums over blocks of rows inside compiled code.

A computation over all N samples whose result is a sum (the E-step's statistics, the
initial moments, a search's final log-likelihoods) runs as a ``fori_loop`` over blocks of
rows, so its temporaries are a block's, not the whole data's, and no (N, ...) array is
built. Zero-weight rows add exactly nothing, which is what makes the last, overlapping
block (and padded data) exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def blockwise_sum(fn, x, w: jax.Array, chunk: int, axis_name: str | None = None):
    """``Σ_blocks fn(x_block, w_block)`` over blocks of ``chunk`` rows (a pytree of sums).

    ``x`` is an (N, ...) array or a pytree of them (e.g. the data and per-row labels).
    Blocks are dynamic slices of ``x`` itself (no padded copy of the data). The last block is
    clamped to end at row N, so it overlaps its predecessor; the overlapping rows get weight
    zero there. ``w`` is (N,) or (N, K): zero-weight rows must contribute exactly zero.
    """
    n = w.shape[0]
    if chunk >= n:
        return fn(x, w)
    n_chunks = -(-n // chunk)

    def body(j, acc):
        start = j * chunk
        first = jnp.minimum(start, n - chunk)
        xs = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, first, chunk), x)
        ws = jax.lax.dynamic_slice_in_dim(w, first, chunk)
        fresh = (first + jnp.arange(chunk) >= start).reshape((chunk,) + (1,) * (w.ndim - 1))
        return jax.tree_util.tree_map(jnp.add, acc, fn(xs, jnp.where(fresh, ws, 0.0)))

    shapes = jax.eval_shape(fn, jax.tree_util.tree_map(lambda a: a[:chunk], x), w[:chunk])
    acc0 = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    if axis_name is not None:
        # Inside shard_map the sum varies over the devices until it is psum'd: say so, so
        # that the loop type-checks with check_vma on.
        acc0 = jax.lax.pcast(acc0, axis_name, to="varying")
    return jax.lax.fori_loop(0, n_chunks, body, acc0)
