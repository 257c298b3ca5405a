"""Block budgets measured on this machine, instead of the constants measured on another.

The E-step streams the samples through blocks whose temporaries fit a budget of bytes
(:func:`jaxem.gmm.chunk_budget_bytes`). The built-in budgets were measured on the project's
2-core CPU (and scaled up for accelerators); the best block on another CPU or GPU depends on
its caches, cores and memory. :func:`tune_block_budgets` (``jaxem tune-blocks``) times the
E-step at budgets around the current one, on this machine, and records the fastest per
covariance type in ``$XDG_CACHE_HOME/jaxem/tuning.json`` (one entry per machine: backend,
device, CPU model and instruction sets, cores, JAX version); every later process on this
machine uses it. ``JAXEM_NO_TUNING=1`` ignores the file; ``jaxem tune-blocks --reset``
forgets this machine's entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxem import _cache, _validation, gmm
from jaxem._linalg import COVARIANCE_TYPES

# Budgets tried: the current default times these factors.
TUNING_FACTORS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# A budget other than the default is taken only if it is at least this much faster: the
# timings of the project's 2-core CPU drift by more than 10% between runs.
TUNING_MIN_GAIN = 0.1


def choose_budget(default: int, seconds: dict[int, float],
                  min_gain: float = TUNING_MIN_GAIN) -> int:
    """The budget to keep from measured ``seconds`` per budget: the fastest, unless it
    beats ``default`` (which must be among them) by less than ``min_gain`` of its time."""
    best = min(seconds, key=seconds.get)
    return best if seconds[best] < (1.0 - min_gain) * seconds[default] else default


# Shapes (D, K) timed by default: the best block differs with the shape as well as the
# covariance type (full on the 2-core CPU: at N = 2e5, D = K = 16 blocks 4x the built-in
# budget ran the E-step 1.5x faster; at N = 1e5, D = K = 32 the built-in one was best).
TUNING_SHAPES = ((8, 8), (8, 32), (16, 16), (32, 8), (32, 32), (64, 16), (64, 64))


def _problem(n: int, d: int, k: int, covariance_type: str, seed: int):
    """float32 blobs, and parameters initialised on them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 3.0
    x = (centres[rng.integers(0, k, n)] + rng.normal(size=(n, d))).astype(np.float32)
    params = gmm.init(jax.random.PRNGKey(seed), x[: min(n, 20_000)], k, covariance_type)
    return jnp.asarray(x), params


def _time_shape(n, d, k, cov_type, factors, repeats, seed):
    """``(default, seconds by budget, rows by budget)`` for one shape and type."""
    x, params = _problem(n, d, k, cov_type, seed)
    default = gmm.default_budget_bytes(cov_type)
    # (On a GPU or TPU each within the share of its memory a fit would allow.)
    budgets = sorted({gmm.within_device_memory(int(default * f)) for f in (*factors, 1.0)})
    default = gmm.within_device_memory(default)
    rows = {b: gmm.auto_chunk_size(n, k, d, np.float32, cov_type, budget_bytes=b)
            for b in budgets}
    compiled = {}
    options = _cache.supported_options(_cache.DEFAULT_COMPILE_OPTIONS)
    for b in budgets:  # budgets giving the same block share one program
        if rows[b] not in compiled:
            step = jax.jit(lambda p, x, c=rows[b]: gmm.e_step(p, x, chunk_size=c),
                           compiler_options=options)  # as a large fit's programs
            compiled[rows[b]] = step.lower(params, x).compile()
            jax.block_until_ready(compiled[rows[b]](params, x))
    best = {r: np.inf for r in compiled}
    for _ in range(repeats):  # the sizes in turn, so that drift hits them alike
        for r, step in compiled.items():
            t = time.perf_counter()
            jax.block_until_ready(step(params, x))
            best[r] = min(best[r], time.perf_counter() - t)
    return default, {b: best[rows[b]] for b in budgets}, rows


def tune_block_budgets(
    n_samples: int = 200_000,
    shapes: Sequence[tuple[int, int]] = TUNING_SHAPES,
    covariance_types: Sequence[str] = COVARIANCE_TYPES,
    factors: Sequence[float] = TUNING_FACTORS,
    repeats: int = 5,
    store: bool = True,
    seed: int = 0,
    report: Callable[[str], None] | None = None,
) -> dict[str, dict[str, dict]]:
    """Time the E-step at block budgets around the current one and keep the fastest, per
    covariance type and shape.

    For each covariance type and ``(n_features, n_components)`` of ``shapes``, on float32
    blobs of ``n_samples`` rows: every budget ``default × factor`` (see
    :func:`jaxem.gmm.default_budget_bytes`) gives a block size
    (:func:`jaxem.gmm.auto_chunk_size`); each block size's E-step is compiled, then timed
    ``repeats`` times, the sizes taken in turn each round, best time kept;
    :func:`choose_budget` picks the budget. A fit of another shape takes the budget of the
    nearest shape measured (in log D, log K; :func:`jaxem.gmm.chunk_budget_bytes`).

    Args:
      n_samples: rows timed (default 2e5).
      shapes: ``(D, K)`` pairs timed (default :data:`TUNING_SHAPES`).
      covariance_types: which types to tune.
      factors: multiples of the default budget to try (1 is always tried).
      repeats: timed runs per block size.
      store: record the chosen budgets for this machine (with those of types not tuned now)
        and use them from now on in this process.
      seed: seeds the data and the parameters.
      report: called with a line of text per type and shape (e.g. ``print``).

    Returns:
      ``{covariance type: {"DxK": {"budget": bytes chosen, "default": bytes, "seconds":
      {bytes: best seconds}, "rows": {bytes: block rows}}}}``.
    """
    _validation.check_int(n_samples, "n_samples", 1)
    _validation.check_int(repeats, "repeats", 1)
    types = tuple(covariance_types)
    if not types:
        raise ValueError("covariance_types is empty")
    for t in types:
        _validation.check_covariance_type(t)
    shapes = tuple(shapes)
    if not shapes:
        raise ValueError("shapes is empty")
    for shape in shapes:
        if (not isinstance(shape, tuple | list) or len(shape) != 2
                or not all(isinstance(v, int | np.integer) and v >= 1 for v in shape)):
            raise ValueError(f"shapes must be (n_features, n_components) pairs of positive "
                             f"integers, got {shape!r}")
    factors = tuple(factors)
    if not factors or not all(isinstance(f, int | float) and np.isfinite(f) and f > 0
                              for f in factors):
        raise ValueError(f"factors must be positive numbers, got {factors!r}")
    results: dict[str, dict[str, dict]] = {}
    for cov_type in types:
        results[cov_type] = {}
        for d, k in shapes:
            default, seconds, rows = _time_shape(n_samples, int(d), int(k), cov_type,
                                                 factors, repeats, seed)
            chosen = choose_budget(default, seconds)
            results[cov_type][f"{d}x{k}"] = {"budget": chosen, "default": default,
                                             "seconds": seconds, "rows": rows}
            if report is not None:
                timings = ", ".join(f"{rows[b]}: {seconds[b] * 1e3:.2f}"
                                    for b in sorted(seconds))
                report(f"{cov_type}, D={d}, K={k}: ms per E-step by block rows {{{timings}}}; "
                       f"keeps {rows[chosen]} rows ({chosen / 2**20:g} MiB; built-in "
                       f"{rows[default]} rows, {default / 2**20:g} MiB)")
    if store:
        budgets = {**_cache.tuned_block_budgets(),
                   **{t: {shape: r["budget"] for shape, r in by_shape.items()}
                      for t, by_shape in results.items()}}
        _cache.store_block_budgets(budgets, {"n_samples": n_samples})
    return results
