"""Streamed exact EM: data that stays on the host, read block by block every iteration.

Because a model's E-step returns statistics that are sums over samples, one EM iteration
over data of any size is: for every block, the E-step at the current parameters, summed
(the model's ``combine_stats``); then the M-step on device. The iteration is the same
:func:`jaxem._loop.em_update` as the in-memory loop's, so the stopping rule, ``failed``
and the history are the same; the results equal the in-memory fit's up to the rounding
of the sums (float64: 1e-10 and better, tested).

Each block is a fixed ``block_rows`` (the last padded with zero-weight rows): one compiled
program for every block. Blocks are read and copied to the device on a background thread
while the device works on the one before (:func:`jaxem.blocks.to_device`), and at most two
blocks' computations are queued, so memory stays at a few blocks whatever N is. The
per-block log-likelihood sums are added on the host in float64.

With several processes (``jax.distributed.initialize``), each process streams its own rows
and the statistics are summed across processes after every pass (an all-gather of the small
statistics over JAX's distributed runtime), so every process takes the same M-step and the
same stopping decision.

A pass that fails part-way with ``RuntimeError`` or ``OSError`` (a process of the run lost,
a file gone) raises it with ``partial_result``: the :class:`~jaxem._loop.FitResult` of the
iterations completed before it (every field with a leading axis for restarts), so the work
done is not lost.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxem import _cache, _loop, _validation, blocks

RESTARTS_AXIS = _loop.RESTARTS_AXIS


def combiner(model) -> Callable:
    """The model's ``combine_stats(a, b, a_scale, b_scale)``, or, for a model without one,
    leaf-wise ``a_scale·a + b_scale·b`` (statistics that are plain sums)."""
    fn = getattr(model, "combine_stats", None)
    if fn is not None:
        return fn

    def combine(a, b, a_scale=1.0, b_scale=1.0):
        return jax.tree_util.tree_map(lambda u, v: a_scale * u + b_scale * v, a, b)

    return combine


def _block_stats(model, params, x, w):
    stats, ll = model.e_step(params, x, w)
    w_sum = jnp.sum(w)
    ll = ll.astype(_loop.ll_dtype(params))
    return stats, jnp.stack([jnp.where(w_sum > 0, ll * w_sum, 0.0), w_sum.astype(ll.dtype)])


@functools.partial(jax.jit, static_argnames=("model", "batched"), donate_argnames=("acc",))
def _accumulate(model, params, acc, x, w, batched):
    """``acc + E-step statistics of one block`` and the block's (Σ w log p, Σ w)."""
    def one(p, a):
        stats, sums = _block_stats(model, p, x, w)
        return combiner(model)(a, stats), sums

    if batched:
        return jax.vmap(one, axis_name=RESTARTS_AXIS)(params, acc)
    return one(params, acc)


def zero_statistics(model, params, x, w):
    """Zeros in the structure and shapes of ``model.e_step(params, x, w)``'s statistics
    (nothing is computed): the start of a sum over blocks or batches."""
    shapes = jax.eval_shape(lambda: model.e_step(params, x, w)[0])
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnames=("model", "batched", "block_rows", "n_features"))
def _zero_stats(model, params, batched, block_rows, n_features):
    d = _loop.ll_dtype(params)
    x, w = jnp.zeros((block_rows, n_features), d), jnp.zeros(block_rows, d)
    one = functools.partial(zero_statistics, model, x=x, w=w)
    return jax.vmap(one)(params) if batched else one(params)


def _all_processes_sum(model, stats, sums):
    """Statistics and (Σ w log p, Σ w) summed over the processes of a distributed run."""
    if jax.process_count() == 1:
        return stats, sums
    from jax.experimental import multihost_utils

    try:
        gathered = multihost_utils.process_allgather(stats)  # leaves gain a (processes,) axis
        sums = np.sum(multihost_utils.process_allgather(np.asarray(sums)), axis=0)
    except Exception as e:  # gloo/NCCL errors come as various runtime types
        raise RuntimeError(
            f"summing the statistics over {jax.process_count()} processes failed: another "
            f"process died or left the run ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]})") from None
    combine = combiner(model)
    total = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), gathered)
    for i in range(1, jax.process_count()):
        total = combine(total, jax.tree_util.tree_map(lambda a, i=i: jnp.asarray(a[i]),
                                                      gathered))
    return total, sums


def _block_rows(data: blocks.HostData, block_rows, dtype) -> int:
    if block_rows is None:
        return blocks.default_block_rows(data.n_features, dtype, data.n_rows)
    return _validation.check_int(block_rows, "block_rows", 1)


def pass_statistics(model, data: blocks.HostData, params, block_rows: int, dtype,
                    batched=False, block_progress=None, iteration=0):
    """One pass over ``data``: the E-step statistics at ``params`` summed over every block
    (and every process), and the weighted mean log-likelihood as a float64 NumPy value (one
    per parameter set when ``batched``)."""
    acc = _zero_stats(model, params, batched, block_rows, data.n_features)
    sums = []
    rows = 0
    for block, (xd, wd) in data.device_blocks(block_rows, dtype):
        acc, s = _accumulate(model, params, acc, xd, wd, batched)
        # Bound the queue: the block before this one must be done before another is read.
        if sums:
            sums[-1].block_until_ready()
        sums.append(s)
        rows += block.n_valid
        if block_progress is not None:
            block_progress(iteration, rows, data.n_rows)
    total = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)  # (..., 2)
    acc, total = _all_processes_sum(model, acc, total)
    if np.any(total[..., 1] <= 0):
        raise ValueError("weights: every sample has weight zero")
    return acc, total[..., 0] / total[..., 1]


def e_step(model, data, params, *, weights=None, block_rows: int | None = None):
    """The model's E-step over host data: ``(stats, mean log-likelihood)`` as the in-memory
    ``model.e_step(params, x, weights)`` gives them, summed over blocks.

    Args:
      model: the model (hashable).
      data: a host source (:mod:`jaxem.blocks`): ``.npy`` path, ``np.memmap``, block source,
        or :class:`jaxem.blocks.HostData`.
      params: the parameters.
      weights: optional (N,) weights for a path or memmap.
      block_rows: rows per block (default: about :data:`jaxem.blocks.BLOCK_BYTES`).
    """
    _loop.check_model(model)
    data = blocks.HostData(data, weights)
    dtype = np.dtype(_loop.ll_dtype(params))
    stats, ll = pass_statistics(model, data, params, _block_rows(data, block_rows, dtype), dtype)
    return stats, jnp.asarray(ll, dtype)


@functools.partial(jax.jit, static_argnames=("model", "batched"))
def _update(model, hyper, tol, max_iter, s, stats, ll, batched):
    def one(s, stats, ll):
        active = _loop.running(s, max_iter)
        new = _loop.em_update(model, hyper, tol, s, stats, ll)
        return jax.tree_util.tree_map(lambda n, o: jnp.where(active, n, o), new, s)

    return jax.vmap(one)(s, stats, ll) if batched else one(s, stats, ll)


def _loop_on_host(model, data, state, hyper, tol, max_iter, block_rows, dtype, batched,
                  progress, block_progress, iteration_seconds):
    """Iterate pass → update until every parameter set has stopped; ``state`` is the
    in-memory loop's :class:`FitResult` (with a leading axis when ``batched``)."""
    max_iter_dev = jnp.int32(max_iter)
    while True:
        host = jax.device_get(state._replace(params=None, lower_bounds=None))
        n_iter, active = np.asarray(host.n_iter), np.asarray(_loop.running(host, max_iter))
        if not np.any(active):
            return state
        started = time.perf_counter()
        slow = _SlowIteration(block_progress, iteration_seconds, started)
        try:
            stats, ll = pass_statistics(model, data, state.params, block_rows, dtype,
                                        batched, None if block_progress is None else slow,
                                        int(np.max(n_iter)) + 1)
        except (RuntimeError, OSError) as e:  # a process lost, a file gone: keep the work
            e.partial_result = _loop.trim_history(state, max_iter)
            raise
        old_bound = np.asarray(state.lower_bound)
        state = _update(model, hyper, tol, max_iter_dev, state, stats,
                        jnp.asarray(ll, state.lower_bound.dtype), batched)
        if progress is not None:
            new_iter, bound = (np.atleast_1d(np.asarray(a)) for a in jax.device_get(
                (state.n_iter, state.lower_bound)))
            for r, a in enumerate(np.atleast_1d(active)):
                if a and new_iter[r] > np.atleast_1d(n_iter)[r]:
                    progress(r, int(new_iter[r]), float(bound[r]),
                             float(bound[r] - np.atleast_1d(old_bound)[r]))


class _SlowIteration:
    """Block progress, reported only once an iteration has run ``seconds``."""

    def __init__(self, fn, seconds, started):
        self.fn, self.seconds, self.started = fn, seconds, started

    def __call__(self, iteration, rows, n_rows):
        if time.perf_counter() - self.started >= self.seconds:
            self.fn(iteration, rows, n_rows)


def _prepare(model, data, weights, tol, max_iter, hyper, block_rows, dtype=None):
    _loop.check_model(model)
    data = blocks.HostData(data, weights)
    hyper = _loop.with_default_hyper(model, hyper)
    _loop.check_settings(model, tol, max_iter, hyper)
    dtype = data.compute_dtype() if dtype is None else np.dtype(dtype)
    _cache.release_programs_if_crowded()
    hyper = {k: jnp.asarray(v, dtype) for k, v in hyper.items()}
    return data, hyper, _block_rows(data, block_rows, dtype), dtype


def fit(model, data, params, *, weights=None, tol=1e-3, max_iter: int = 100,
        progress: Callable[[int, int, float, float], None] | None = None,
        block_progress: Callable[[int, int, int | None], None] | None = None,
        block_progress_after: float = 5.0, lower_bound=-np.inf,
        block_rows: int | None = None, **hyper) -> _loop.FitResult:
    """:func:`jaxem.fit` over host data: every iteration streams the blocks through the
    device (see the module docstring). Same arguments and result, plus:

    Args:
      data: a host source (:mod:`jaxem.blocks`).
      block_rows: rows per block (default: about :data:`jaxem.blocks.BLOCK_BYTES`).
      progress: ``progress(restart, iteration, log_likelihood, change)`` after every
        iteration (called on the host; any callable).
      block_progress: ``block_progress(iteration, rows_done, n_rows)`` after each block,
        once an iteration has run ``block_progress_after`` seconds (``n_rows`` is None for
        a block source).
    """
    _validation.check_real(lower_bound, "lower_bound", allow_negative_infinity=True)
    if not all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree_util.tree_leaves(params)):
        raise ValueError("params contain NaN or infinite values")
    data, hyper, block_rows, dtype = _prepare(model, data, weights, tol, max_iter, hyper,
                                              block_rows, np.dtype(_loop.ll_dtype(params)))
    if hasattr(model, "check_params"):  # with no rows of the data's width
        model.check_params(params, np.empty((0, data.n_features), dtype))
    state = _loop.initial_state(params, _loop.history_size(max_iter), lower_bound)
    state = _loop_on_host(model, data, state, hyper, jnp.asarray(tol, dtype), max_iter,
                          block_rows, dtype, False, progress, block_progress,
                          block_progress_after)
    return _loop.trim_history(state, max_iter)


@functools.partial(jax.jit, static_argnames=("model", "n_init", "n_components", "method"))
def _initial_params(model, x, w, key, n_init, n_components, method, init_kwargs, hyper):
    return _loop.initial_params(model, x, w, key, n_init, n_components, method, init_kwargs,
                                hyper)


def _seed_of(key) -> int:
    """An integer seed for NumPy from a JAX PRNG key (either kind)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = np.asarray(key).astype(np.uint64).ravel()
    return int(functools.reduce(lambda a, b: (a << 32) | int(b), words.tolist(), 0))


def _subsample_all_processes(data, m, seed, dtype):
    """:func:`jaxem.blocks.subsample`; with several processes, each samples its own rows
    (⌈m / P⌉ of them, its own seed) and every process gets all the samples, in process
    order: the same initialisation everywhere."""
    count = jax.process_count()
    if count == 1:
        return blocks.subsample(data, m, seed, dtype)
    from jax.experimental import multihost_utils

    share = -(-m // count)
    x, w = blocks.subsample(data, share, seed + jax.process_index(), dtype)
    pad = share - len(x)  # a process with fewer rows pads with zero-weight rows
    x = np.concatenate([x, np.zeros((pad, data.n_features), dtype)])
    w = np.concatenate([w, np.zeros(pad, dtype)])
    xs, ws = (np.asarray(a) for a in multihost_utils.process_allgather((x, w)))
    return xs.reshape(-1, data.n_features), ws.reshape(-1)


def initial_params(model, data, key, *, n_components: int, n_init: int = 1,
                   init_method: str = "kmeans", weights=None, init_rows: int | None = None,
                   init_kwargs: dict | None = None, dtype=None, **hyper):
    """``n_init`` initial parameter sets (leading axis) from a random subsample of
    ``init_rows`` rows of host data (:func:`jaxem.blocks.subsample`: one pass; default
    :func:`jaxem.blocks.init_rows`).

    Why a subsample: k-means (or k-means++) on all N rows costs many passes over the data,
    each as dear as an EM iteration (measured: 15× the EM itself at N = 2e7, K = 32), and
    over a stream each pass is another read of the file. Its centres on a uniform subsample
    of m ≫ K rows differ from the full-data ones by sampling error of order σ·√(K/m), which
    the first EM iterations over all the data wash out; so initialisation costs one pass
    and O(m·K·D) work, whatever N is.
    """
    _loop.check_model(model)
    _validation.check_int(n_components, "n_components", 1)
    _validation.check_int(n_init, "n_init", 1)
    data = blocks.HostData(data, weights)
    dtype = data.compute_dtype() if dtype is None else np.dtype(dtype)
    init_rows = (blocks.init_rows(data.n_features, dtype) if init_rows is None
                 else _validation.check_int(init_rows, "init_rows", 1))
    x, w = _subsample_all_processes(data, max(init_rows, n_components), _seed_of(key), dtype)
    if np.sum(w > 0) < n_components:
        raise ValueError(f"x has {int(np.sum(w > 0))} sample(s) of positive weight, fewer "
                         f"than n_components={n_components}")
    if hasattr(model, "with_batch"):
        model = model.with_batch(n_init, RESTARTS_AXIS)
    hyper = _loop.with_default_hyper(model, hyper, dtype)
    init_kwargs = {k: jnp.asarray(v, dtype) for k, v in (init_kwargs or {}).items()}
    return _initial_params(model, jnp.asarray(x), jnp.asarray(w), key, n_init, n_components,
                           init_method, init_kwargs, hyper)


def fit_restarts(model, data, key, *, n_components: int, n_init: int = 1,
                 init_method: str = "kmeans", weights=None, tol=1e-3, max_iter: int = 100,
                 init_kwargs: dict | None = None, init_rows: int | None = None,
                 progress=None, block_progress=None, block_progress_after: float = 5.0,
                 block_rows: int | None = None, **hyper) -> _loop.RestartsResult:
    """:func:`jaxem.fit_restarts` over host data: ``n_init`` initialisations from a
    subsample (:func:`initial_params`), then all restarts streamed together, each block's
    E-step vmapped over them (one read of the data per iteration for all restarts); a
    restart that has stopped stays frozen. Arguments as :func:`fit` and
    :func:`jaxem.fit_restarts`, plus ``init_rows``."""
    data, hyper_arrays, block_rows, dtype = _prepare(model, data, weights, tol, max_iter,
                                                     hyper, block_rows)
    params0 = initial_params(model, data, key, n_components=n_components, n_init=n_init,
                             init_method=init_method, init_rows=init_rows,
                             init_kwargs=init_kwargs, dtype=dtype, **hyper)
    if hasattr(model, "with_batch"):
        model = model.with_batch(n_init, RESTARTS_AXIS)
    state = jax.vmap(lambda p: _loop.initial_state(p, _loop.history_size(max_iter)))(params0)
    state = _loop_on_host(model, data, state, hyper_arrays, jnp.asarray(tol, dtype), max_iter,
                          block_rows, dtype, True, progress, block_progress,
                          block_progress_after)
    score = np.where(np.isfinite(np.asarray(state.lower_bound)),
                     np.asarray(state.lower_bound), -np.inf)
    best_index = int(np.argmax(score))
    best = jax.tree_util.tree_map(lambda a: a[best_index], state)
    result = _loop.RestartsResult(best, jnp.int32(best_index), state)
    return _loop.trim_history(result, max_iter)
