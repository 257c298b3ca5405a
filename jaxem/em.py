"""EM drivers: one jitted ``lax.while_loop`` per fit, restarts as a ``vmap`` of that program.

The drivers know nothing about Gaussians. A *model* is any hashable object with

    e_step(params, x, weights) -> (stats, mean_log_likelihood)
    m_step(stats, **hyper)     -> params
    init(key, x, n_components, *, weights, method, **hyper) -> params   (for fit_restarts)
    default_hyper() -> dict                            (optional: defaults of **hyper)
    with_batch(n, axis_name) -> model                  (optional: sized for n restarts vmapped
                                                        over axis_name; may use collectives on it;
                                                        axis_name is None where nothing may be
                                                        shared: a single restart, which runs
                                                        without a vmap, or fit_batch's members,
                                                        which are different datasets)
    check_hyper(**hyper)                               (optional: eager validation)
    check_params(params, x)                            (optional: eager validation)
    combine_stats(a, b, a_scale, b_scale) -> stats     (optional: a_scale·a + b_scale·b, for
                                                        the streamed and online drivers;
                                                        default: leaf by leaf)
    n_entries(n_components, n_features) -> int         (optional: parameter entries, by which
                                                        the compile rules go; default
                                                        K·(D + 1), see model_entries)
    param_scale(params) -> params-like pytree          (optional: the parameters' units, for
                                                        fit_implicit's adjoint solve;
                                                        default: 1)
    initial_assignments(key, x, n_components, *, weights, method, **hyper) -> assignments
                                                       (optional: init in two stages, what
                                                        the key decides and then
                                                        init(None, …, assignments=a), equal
                                                        to init(key, …); fit_batch on the CPU
                                                        runs the second stage in its loop's
                                                        program)

Stopping rule (scikit-learn's): iteration ``i`` runs an E-step at the current parameters,
records the mean log-likelihood ``ℓ_i`` there, then an M-step; the loop stops once
``|ℓ_i − ℓ_{i−1}| < tol`` or after ``max_iter`` iterations. ``lower_bound`` is the last ``ℓ``,
so the returned parameters are one M-step newer than it, exactly as in scikit-learn.

Numerical trouble never becomes a silent NaN: if an E-step gives a non-finite log-likelihood
or an M-step non-finite parameters, the loop stops, ``failed`` is set and the last finite
parameters are returned.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxem import _cache, _loop, _validation, blocks, streamed
from jaxem._loop import (  # noqa: F401  (re-exported: em.FitResult etc. are the drivers' names)
    RESTARTS_AXIS,
    FitResult,
    Progress,
    RestartsResult,
    all_finite,
    check_model,
    check_settings,
    em_step,
    em_update,
    history_size,
    initial_state,
    ll_dtype,
    relative_change,
    run,
    trim_history,
    with_default_hyper,
)

_DATA = "data"  # the mesh axis the samples are sharded over


def _over_devices(fn, mesh: Mesh | None):
    """``fn(x, weights, *replicated)`` run data-parallel: x and weights sharded over ``mesh``.

    Inside, the model's E-step ``psum``s its statistics over the mesh axis, so every device
    holds identical parameters and takes identical stopping decisions.
    """
    if mesh is None:
        return fn

    def wrapped(x, weights, *rest):
        specs = (P(_DATA, None), P(_DATA), *([P()] * len(rest)))
        # The outputs are replicated because the model's E-step psums its statistics; the
        # checker verifies it (check_vma), so a model that forgets the psum fails at trace
        # time instead of returning one device's answer.
        return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=True)(
            x, weights, *rest
        )

    return wrapped


# A *small* program: rows × parameter entries × parameter sets at most this (the Old
# Faithful search, full: 272 × 66 × 96 ≈ 1.7e6; iris, K = 3, full: 256 × 111). Its run time
# is negligible next to its compile time.
SMALL_PROGRAM_MAX_WORK = 2**22
# Small programs are compiled with LLVM's optimisation off (QUICK_COMPILE_OPTIONS), which
# on the 2-core CPU cuts a search program's compile from 0.77 to 0.48 s and a k-means++
# seeding's from 0.86 to 0.56 s; their run time (1-3 ms) stays negligible. They also use
# XLA:CPU's older LLVM IR emitters instead of its MLIR fusion emitters, which build every
# fusion (~170 of them in an iris fit) as its own module through MLIR: the iris fit's
# program compiles in 0.35-0.37 s instead of 0.97-1.19 s. (Not for the large programs: there
# the older emitters ran full and tied 1.3-1.9x slower per iteration at N = 1e5, and diag and
# spherical no faster over two alternating runs; see benchmarks/README.md.) A GPU takes
# none of them (they are XLA:CPU's; _cache.supported_options). JAXEM_QUICK_COMPILE=0 turns
# both off. (The XLA aborts once blamed on quick compiles were the process running out of
# memory mappings, which a faster compiler reaches sooner: see jaxem/_cache.py.)
QUICK_COMPILE_ENV = "JAXEM_QUICK_COMPILE"
QUICK_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0,
                         "xla_cpu_use_fusion_emitters": False}
# A small program whose EM loop runs long, and one up to twice that size
# (SMALL_COMPILE_MAX_WORK), takes the older emitters too and LLVM's -O1 (its loop runs
# 3-4x slower at -O0): the Old Faithful search (64 restarts, K = 1..5, all types in one
# program: 5.1e6) compiles in 1.66-1.76 s instead of 2.80-2.88 s with the default options
# and runs as fast (warm 1.32-1.56 s against 1.37 s, process start to exit); -O1 rather
# than -O2 compiles a 1,000-dataset fit_batch program in 0.72-0.77 s instead of 1.12 s
# and runs it as fast (0.13-0.14 s), and a large fit's initialisation (below) 0.2 s faster.
SMALL_COMPILE_OPTIONS = {"xla_backend_optimization_level": 1,
                         "xla_cpu_use_fusion_emitters": False}
SMALL_COMPILE_MAX_WORK = 2**23


def model_entries(model, n_components: int, n_features: int) -> int:
    """Parameter entries of a K-component fit over D features, the size the compile rules
    go by: the model's own count (``model.n_entries(K, D)``, optional in the model contract)
    or else a weight and a D-vector per component, the least a mixture holds."""
    if hasattr(model, "n_entries"):
        return int(model.n_entries(n_components, n_features))
    return n_components * (n_features + 1)


# ... and whose EM loop runs at most this much work (the above × max_iter) in all. Code
# compiled without LLVM's optimisation runs a loop 3-4× slower: an Old Faithful search of
# 32 restarts × K = 1..5 × 100 iterations (work 2.3e8) ran 2.2 s at -O0 against 0.5 s at
# -O2, more than the 1.7 s of compilation -O0 saves, and that run is paid on every warm
# call too. A single small fit (iris: 2.8e6) or a GridSearchCV fold (wine: 7.2e7) stays
# below.
SMALL_PROGRAM_MAX_RUN = 2**27


def program_work(n_rows: int, n_entries: int, batch: int = 1) -> int:
    """Rows × parameter entries × parameter sets: the size the compile rules go by."""
    return n_rows * max(n_entries, 1) * batch


def small_program(n_rows: int, n_entries: int, batch: int = 1,
                  max_iter: int | None = None) -> bool:
    """Whether a program over ``n_rows`` samples and ``batch`` parameter sets of
    ``n_entries`` entries each is small (:data:`SMALL_PROGRAM_MAX_WORK`), and, given the
    iterations of its EM loop, whether that loop is short (:data:`SMALL_PROGRAM_MAX_RUN`)."""
    work = program_work(n_rows, n_entries, batch)
    if work > SMALL_PROGRAM_MAX_WORK:
        return False
    return max_iter is None or work * max(max_iter, 1) <= SMALL_PROGRAM_MAX_RUN


def compile_variant(n_rows: int, n_entries: int, batch: int = 1,
                    max_iter: int | None = None) -> str:
    """How to compile a program (a field of :class:`ProgramVariants`): ``"quick"``
    (:data:`QUICK_COMPILE_OPTIONS`) for a small program (:func:`small_program`) whose loop
    is short, ``"small"`` (:data:`SMALL_COMPILE_OPTIONS`) for a small one whose loop runs
    long or one up to :data:`SMALL_COMPILE_MAX_WORK`, else ``"default"`` — always at top
    level only (compiler options belong to a top-level jit), and ``"default"`` under
    ``JAXEM_QUICK_COMPILE=0``."""
    if not _variants_apply():
        return "default"
    if small_program(n_rows, n_entries, batch, max_iter):
        return "quick"
    small = program_work(n_rows, n_entries, batch) <= SMALL_COMPILE_MAX_WORK
    return "small" if small else "default"


def _variants_apply() -> bool:
    """Whether compiler options may be chosen here: at top level (they belong to a top-level
    jit) and not turned off by ``JAXEM_QUICK_COMPILE=0``."""
    off = os.environ.get(QUICK_COMPILE_ENV, "").strip().lower() in ("0", "false", "no", "off")
    return not off and not _validation.under_transformation()


def separate_initialisation(n_rows: int, n_entries: int, batch: int = 1,
                            max_iter: int | None = None) -> bool:
    """Whether a fit compiles its initialisation as a program of its own, with
    :data:`SMALL_COMPILE_OPTIONS`, beside its EM loop's: for a large fit (one
    :func:`compile_variant` compiles with the default options). The initialisation
    (k-means: products, argmins, one M-step; no E-step) runs as fast with the older emitters
    and compiles ~40% faster; the loop keeps the default options that its E-step needs."""
    return _variants_apply() and compile_variant(n_rows, n_entries, batch, max_iter) == "default"


def quick_compile(n_rows: int, n_entries: int, batch: int = 1,
                  max_iter: int | None = None) -> bool:
    """Whether :func:`compile_variant` picks :data:`QUICK_COMPILE_OPTIONS`."""
    return compile_variant(n_rows, n_entries, batch, max_iter) == "quick"


class ProgramVariants(NamedTuple):
    """A driver's program with each set of compiler options, its executables kept across
    processes where the persistent cache is on (:class:`jaxem._cache.StoredProgram`)."""

    default: _cache.StoredProgram
    quick: _cache.StoredProgram
    small: _cache.StoredProgram

    def pick(self, n_rows: int, n_entries: int, batch: int = 1,
             max_iter: int | None = None) -> _cache.StoredProgram:
        """The variant :func:`compile_variant` chooses for these sizes."""
        return getattr(self, compile_variant(n_rows, n_entries, batch, max_iter))

    def cache_size(self) -> int:
        """Programs this process has compiled (or loaded) of every variant. Variants whose
        options are the same (all of them off the CPU, where none is passed) are one jitted
        program, counted once."""
        by_name = {program._name: program for program in self}
        return sum(program._cache_size() for program in by_name.values())


def jit_variants(fn, static_argnames, extra_options: dict | None = None) -> ProgramVariants:
    """``jit(fn)`` with the default (:data:`jaxem._cache.DEFAULT_COMPILE_OPTIONS`), quick
    and small compiler options, each with ``extra_options`` added (all of them XLA:CPU's,
    passed on the CPU only)."""
    extra = extra_options or {}
    return ProgramVariants(*(_cache.StoredProgram(fn, static_argnames, {**options, **extra})
                             for options in (_cache.DEFAULT_COMPILE_OPTIONS,
                                             QUICK_COMPILE_OPTIONS, SMALL_COMPILE_OPTIONS)))


def _fit_program(model, x, weights, params, tol, max_iter, hyper, mesh=None, progress=None,
                 lower_bound=-jnp.inf, n_history=128):
    axis = None if mesh is None else _DATA
    def loop(x, weights, params, tol, max_iter, hyper, lower_bound):
        return run(model, x, weights, params, tol, max_iter, hyper, axis, progress,
                   lower_bound=lower_bound, n_history=n_history)

    return _over_devices(loop, mesh)(x, weights, params, tol, max_iter, hyper, lower_bound)


_fit_jit = _cache.StoredProgram(_fit_program, ("model", "n_history", "mesh", "progress"),
                                _cache.DEFAULT_COMPILE_OPTIONS)


def _init_sample(key, x, weights, n_rows: int | None):
    """``(x, weights)`` an initialisation runs on: the data, or beyond ``n_rows`` rows a
    random sample of ``n_rows`` of them drawn with replacement in proportion to the weights
    (unit weights). See :func:`jaxem.streamed.initial_params` for why a subsample."""
    n = x.shape[0]
    if n_rows is None or n <= n_rows:
        return x, weights
    key = jax.random.fold_in(key, n_rows)  # not any restart's key
    if weights is None:
        idx = jax.random.randint(key, (n_rows,), 0, n)
    else:
        idx = jax.random.choice(key, n, (n_rows,), p=weights / jnp.sum(weights))
    return x[idx], None


def _initial_program(model, x, weights, key, n_init, n_components, init_method, init_kwargs,
                     hyper, init_rows=None):
    """The restarts' initial parameters (leading axis ``n_init``): from the whole (possibly
    sharded: XLA partitions it) data, or its subsample beyond ``init_rows`` rows."""
    xi, wi = _init_sample(key, x, weights, init_rows)
    return _loop.initial_params(model, xi, wi, key, n_init, n_components, init_method,
                                init_kwargs, hyper)


def _restarts_loop(model, x, weights, params0, tol, max_iter, hyper, mesh=None, progress=None,
                   n_history=128) -> RestartsResult:
    """Every restart's EM loop from ``params0``, vmapped, and the best picked on device."""
    n_init = jax.tree_util.tree_leaves(params0)[0].shape[0]
    axis = None if mesh is None else _DATA

    def loop(x, weights, params0, tol, max_iter, hyper):
        return _loop.over_restarts(
            lambda p, r: run(model, x, weights, p, tol, max_iter, hyper, axis, progress, r,
                             n_history=n_history),
            n_init, params0, jnp.arange(n_init))

    return _loop.best_restart(_over_devices(loop, mesh)(x, weights, params0, tol, max_iter,
                                                         hyper))


def _restarts_program(model, x, weights, key, tol, max_iter, n_init, n_components,
                      init_method, init_kwargs, hyper, mesh=None, progress=None,
                      n_history=128, init_rows=None):
    params0 = _initial_program(model, x, weights, key, n_init, n_components, init_method,
                               init_kwargs, hyper, init_rows)
    return _restarts_loop(model, x, weights, params0, tol, max_iter, hyper, mesh, progress,
                          n_history)


_restarts_programs = jit_variants(
    _restarts_program,
    ("model", "n_history", "n_init", "n_components", "init_method", "mesh", "progress",
     "init_rows"))
# A large fit's two halves as programs of their own (see fit_restarts).
_initial_programs = jit_variants(
    _initial_program, ("model", "n_init", "n_components", "init_method", "init_rows"))
_restarts_loop_programs = jit_variants(
    _restarts_loop, ("model", "mesh", "progress", "n_history"))


def _mesh_for(model, x, devices) -> Mesh | None:
    """The 1-D data mesh to shard over, or None for a single-device fit.

    ``devices=None`` uses every local device when there are several and the model's E-step
    can reduce across devices (accepts ``axis_name``); in a run of several processes
    (``jax.distributed.initialize``), every device of every process: each process passes
    its own rows, and the fit is the one over all of them.
    """
    can_shard = "axis_name" in inspect.signature(model.e_step).parameters
    if devices is None:
        if jax.process_count() > 1 and not _validation.is_traced(x):
            if not can_shard:
                raise TypeError(f"{type(model).__name__}.e_step takes no axis_name, so it "
                                "cannot sum statistics across processes")
            return Mesh(np.asarray(jax.devices()), (_DATA,))
        if _validation.is_traced(x) or not can_shard or jax.local_device_count() < 2:
            return None
        devices = jax.local_devices()
    devices = list(devices)
    if len(devices) < 2:
        return None
    if not can_shard:
        raise TypeError(
            f"{type(model).__name__}.e_step takes no axis_name, so it cannot be run "
            "data-parallel over devices"
        )
    if _validation.is_traced(x):
        raise ValueError("devices cannot be given when fit is called inside a transformation")
    return Mesh(np.asarray(devices), (_DATA,))


def _shard_data(x, weights, mesh: Mesh):
    """Pad N to a multiple of the device count (zero-weight rows) and shard along N.

    With several processes, ``x`` is this process's rows: each process pads its rows to the
    largest process's count (rounded to its local devices) and the global array is their
    concatenation (``jax.make_array_from_process_local_data``)."""
    x = np.asarray(x)
    n = x.shape[0]
    w = np.ones(n, x.dtype) if weights is None else np.asarray(weights, x.dtype)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counts = np.asarray(multihost_utils.process_allgather(np.asarray([n], np.int64)))
        local = jax.local_device_count()
        rows = int(-(-int(counts.max()) // local) * local)
        if rows > n:
            x = np.concatenate([x, np.repeat(x[-1:], rows - n, axis=0)])
            w = np.concatenate([w, np.zeros(rows - n, x.dtype)])
        total = rows * jax.process_count()
        x = jax.make_array_from_process_local_data(NamedSharding(mesh, P(_DATA, None)), x,
                                                   (total, x.shape[1]))
        w = jax.make_array_from_process_local_data(NamedSharding(mesh, P(_DATA)), w, (total,))
        return x, w
    pad = (-n) % mesh.size
    if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        w = np.concatenate([w, np.zeros(pad, x.dtype)])
    x = jax.device_put(x, NamedSharding(mesh, P(_DATA, None)))
    w = jax.device_put(w, NamedSharding(mesh, P(_DATA)))
    return x, w


def _check_common(model, x, weights, tol, max_iter, hyper):
    check_model(model)
    x = _validation.check_data(x, "x")
    if not _validation.is_traced(x):
        _validation.check_sample_weight(weights, np.shape(x)[0], "weights")
    check_settings(model, tol, max_iter, hyper)
    return x


class DriverInputs(NamedTuple):
    """A driver's arguments, validated and converted to one floating dtype."""

    x: jax.Array  # (N, D), sharded over the mesh when there is one
    weights: jax.Array | None  # (N,)
    tol: jax.Array  # ()
    hyper: dict  # name -> () array; the model's defaults filled in
    mesh: Mesh | None


def prepare(model, x, params, *, weights=None, tol=1e-3, max_iter=0, hyper=None,
            devices=False, ones=False) -> DriverInputs:
    """Eager validation and conversion shared by every driver (fit, fit_restarts, the
    differentiable fits), run in Python before anything is traced.

    Args:
      model: the model; its default hyperparameters fill in those not given (so passing or
        omitting one gives one compilation) and its ``check_hyper``/``check_params`` run.
      x: (N, D) data.
      params: initial parameters, whose floating dtype the data take; ``None`` (restarts):
        the data's own floating dtype.
      weights: optional (N,) sample weights; ``ones=True`` makes them explicit.
      tol, max_iter: the loop's tolerance and cap (checked).
      hyper: M-step hyperparameters.
      devices: ``False``: never shard; else :func:`fit`'s ``devices`` argument.
    """
    hyper = with_default_hyper(model, hyper or {})
    x = _check_common(model, x, weights, tol, max_iter, hyper)
    if not _validation.is_traced(x):
        _cache.release_programs_if_crowded()  # before this driver compiles more
    if params is not None:
        if not _validation.is_traced(params) and not all(
            np.all(np.isfinite(np.asarray(a))) for a in jax.tree_util.tree_leaves(params)
        ):
            raise ValueError("params contain NaN or infinite values")
        if hasattr(model, "check_params"):
            model.check_params(params, x)
    dtype = floating_dtype(x) if params is None else ll_dtype(params)
    mesh = None if devices is False else _mesh_for(model, x, devices)
    if mesh is not None:
        x, weights = _shard_data(np.asarray(x, dtype), weights, mesh)
    x = _as_float(x, dtype)
    if weights is None and ones:
        weights = jnp.ones(x.shape[:1], dtype)
    weights = None if weights is None else _as_float(weights, dtype)
    hyper = {k: host_array(v, dtype) for k, v in hyper.items()}
    return DriverInputs(x, weights, host_array(tol, dtype), hyper, mesh)


def host_array(value, dtype) -> jax.Array:
    """``jnp.asarray(value, dtype)`` for a small host value (a tolerance, a
    hyperparameter, an iteration cap), made with NumPy and put on the device: an eager
    ``jnp.asarray`` or ``jnp.int32`` compiles a conversion program, and lowering the first
    program of a process costs ~0.15 s, all of a warm small fit's budget
    (:class:`jaxem._cache.StoredProgram`). Traced values go through ``jnp.asarray``. A
    finite value beyond a floating dtype's range becomes its largest finite value, not inf
    (a float32 fit with ``tol=3.4029e38`` stops as with any huge tolerance)."""
    if _validation.is_traced(value):
        return jnp.asarray(value, dtype)
    dtype = jax.dtypes.canonicalize_dtype(dtype)
    value = np.asarray(value)
    if np.issubdtype(dtype, np.floating) and np.all(np.isfinite(value)):
        big = np.finfo(dtype).max
        value = np.clip(value, -big, big)
    return jax.device_put(value.astype(dtype))


# For these seeds the default generator's key is the seed's two 32-bit halves
# (threefry's seeding), which host_key builds without compiling anything.
_HOST_KEY_SEEDS = 2**32


def host_key(seed: int) -> jax.Array:
    """``jax.random.PRNGKey(seed)`` built on the host (tested equal) for the default
    threefry generator and ``0 <= seed < 2**32``; else ``jax.random.PRNGKey`` itself."""
    if jax.config.jax_default_prng_impl != "threefry2x32" or not 0 <= seed < _HOST_KEY_SEEDS:
        return jax.random.PRNGKey(seed)
    return jax.device_put(np.array([0, seed], np.uint32))


def floating_dtype(x):
    kind = x.dtype if isinstance(x, jax.Array) else np.asarray(x).dtype
    dtype = kind if jnp.issubdtype(kind, jnp.floating) else jnp.result_type(float)
    return jax.dtypes.canonicalize_dtype(dtype)


def _as_float(x, dtype=None):
    """A floating JAX array. Host arrays go through ``device_put``: one copy of the data,
    where ``jnp.asarray`` makes two."""
    dtype = floating_dtype(x) if dtype is None else jax.dtypes.canonicalize_dtype(dtype)
    if isinstance(x, jax.Array):
        return x.astype(dtype)
    return jax.device_put(np.asarray(x, dtype))


def _no_devices_for_streams(devices):
    if devices is not None:
        raise ValueError("devices cannot be given with host data (a path, memmap or block "
                         "source): a streamed fit runs on the default device; several "
                         "processes join through jax.distributed (see jaxem.streamed)")


def fit(
    model,
    x: jax.typing.ArrayLike,
    params,
    *,
    weights: jax.typing.ArrayLike | None = None,
    tol: jax.typing.ArrayLike = 1e-3,
    max_iter: int = 100,
    devices=None,
    progress: Callable[[int, int, float, float], None] | None = None,
    lower_bound: jax.typing.ArrayLike = -np.inf,
    **hyper,
) -> FitResult:
    """Run EM from ``params`` until convergence, as one compiled program.

    Args:
      model: the model (hashable, static), e.g. ``jaxem.gmm.GaussianMixtureModel("full")``.
      x: (N, D) data; or data that stays on the host — a ``.npy`` path, a ``np.memmap``,
        a block source (:mod:`jaxem.blocks`) — streamed block by block every iteration
        (:func:`jaxem.streamed.fit`; ``progress`` is then called on the host).
      params: initial parameters (the model's pytree).
      weights: optional (N,) non-negative per-sample weights.
      tol: stop when the mean log-likelihood changes by less than this (traced: changing it
        does not recompile). A negative ``tol`` runs exactly ``max_iter`` iterations.
      max_iter: iteration cap (traced: the history buffer has :func:`history_size`
        entries, so nearby values share one program; the result's history is cut to
        ``max_iter``).
      devices: devices to shard the samples over (data parallelism). ``None``: all local
        devices when there are several, else a plain single-device fit.
      progress: optional ``progress(restart, iteration, log_likelihood, change)`` called on
        the host after every iteration, from inside the compiled loop
        (``jax.debug.callback``; a hashable callable, e.g. a module-level function, so that
        the program is reused). Costs one host round trip per iteration.
      lower_bound: the mean log-likelihood of the fit that this call continues (a warm
        start, as scikit-learn's ``warm_start``): the first iteration's change is measured
        from it, so convergence is seen across calls. ``-inf`` (default): a fresh fit.
      **hyper: hyperparameters of the model's M-step, e.g. ``reg_covar`` (traced).

    Returns:
      :class:`FitResult`.
    """
    if blocks.is_host_data(x):
        _no_devices_for_streams(devices)
        return streamed.fit(model, x, params, weights=weights, tol=tol, max_iter=max_iter,
                            progress=progress, lower_bound=lower_bound, **hyper)
    _validation.check_real(lower_bound, "lower_bound", allow_negative_infinity=True)
    inp = prepare(model, x, params, weights=weights, tol=tol, max_iter=max_iter, hyper=hyper,
                  devices=devices)
    # Always the optimised program: a fit vmapped inside the caller's jit (which cannot take
    # compiler options) then rounds exactly as the same fit called on its own.
    result = _fit_jit(model, inp.x, inp.weights, params, inp.tol, host_array(max_iter, np.int32),
                      inp.hyper, mesh=inp.mesh,
                      progress=None if progress is None else Progress(progress),
                      lower_bound=jnp.asarray(lower_bound, inp.tol.dtype),
                      n_history=history_size(max_iter))
    return trim_history(result, max_iter)


def fit_restarts(
    model,
    x: jax.typing.ArrayLike,
    key: jax.Array,
    *,
    n_components: int,
    n_init: int = 1,
    init_method: str = "kmeans",
    weights: jax.typing.ArrayLike | None = None,
    tol: jax.typing.ArrayLike = 1e-3,
    max_iter: int = 100,
    init_kwargs: dict | None = None,
    devices=None,
    progress: Callable[[int, int, float, float], None] | None = None,
    init_rows: int | None = None,
    **hyper,
) -> RestartsResult:
    """``n_init`` independent initialisations and fits, vmapped in one compiled program.

    Each restart initialises with ``model.init`` from its own key (split from ``key``) and
    runs :func:`fit`'s loop; a restart that has stopped stays frozen while the others go on.
    The best (highest final lower bound) is selected on device.

    Args:
      model: the model (hashable, static).
      x: (N, D) data, or host data as in :func:`fit` (:func:`jaxem.streamed.fit_restarts`:
        initialised from a subsample of ``init_rows`` rows, one pass).
      key: PRNG key.
      n_components: K (static).
      n_init: number of restarts (static).
      init_method: initialisation passed to ``model.init`` (static), e.g. ``"kmeans"``.
      weights: optional (N,) per-sample weights.
      tol: convergence tolerance (traced).
      max_iter: iteration cap (traced, as in :func:`fit`).
      init_kwargs: extra traced arrays for ``model.init`` (e.g. ``means_init``).
      devices: as in :func:`fit`.
      progress: as in :func:`fit`; ``restart`` tells the restarts apart.
      init_rows: data with more rows are initialised on a random subsample of this many
        (drawn in proportion to the weights); default :func:`jaxem.blocks.init_rows`
        (2^18 rows for narrow data). k-means over all of a large N costs many passes,
        each as dear as an EM iteration; on the subsample it costs next to nothing.
      **hyper: M-step hyperparameters (traced), also passed to ``model.init``.

    Returns:
      :class:`RestartsResult` with the best fit, its index, and every restart's result.
    """
    _validation.check_int(n_components, "n_components", 1)
    _validation.check_int(n_init, "n_init", 1)
    if blocks.is_host_data(x):
        _no_devices_for_streams(devices)
        return streamed.fit_restarts(
            model, x, key, n_components=n_components, n_init=n_init, init_method=init_method,
            weights=weights, tol=tol, max_iter=max_iter, init_kwargs=init_kwargs,
            init_rows=init_rows, progress=progress, **hyper)
    _validation.check_data(x, "x", min_samples=n_components)
    if hasattr(model, "with_batch"):
        model = model.with_batch(n_init, _loop.restarts_axis(n_init))
    inp = prepare(model, x, None, weights=weights, tol=tol, max_iter=max_iter, hyper=hyper,
                  devices=devices)
    dtype = inp.x.dtype
    init_kwargs = {k: host_array(v, dtype) for k, v in (init_kwargs or {}).items()}
    n, d = np.shape(inp.x)
    entries = model_entries(model, n_components, d)
    init_rows = (blocks.init_rows(d, dtype) if init_rows is None
                 else _validation.check_int(init_rows, "init_rows", n_components))
    init_rows = init_rows if n > init_rows else None
    max_iter_arg, n_history = host_array(max_iter, np.int32), history_size(max_iter)
    progress = None if progress is None else Progress(progress)
    if inp.mesh is None and separate_initialisation(n, entries, n_init, max_iter):
        # Measured (N = 1e6, D = K = 8, full; initialised on 2^18 rows): the initialisation
        # compiles in 0.80 s instead of 1.34 s and runs in 0.49 s instead of 0.54 s; the
        # whole fit compiled in 1.88-2.10 s instead of 2.27 s.
        params0 = _initial_programs.small(model, inp.x, inp.weights, key, n_init, n_components,
                                          init_method, init_kwargs, inp.hyper, init_rows)
        result = _restarts_loop_programs.default(model, inp.x, inp.weights, params0, inp.tol,
                                                 max_iter_arg, inp.hyper, progress=progress,
                                                 n_history=n_history)
    else:
        program = _restarts_programs.pick(n, entries, n_init, max_iter)
        result = program(model, inp.x, inp.weights, key, inp.tol, max_iter_arg, n_init,
                         n_components, init_method, init_kwargs, inp.hyper, mesh=inp.mesh,
                         progress=progress, n_history=n_history, init_rows=init_rows)
    return trim_history(result, max_iter)


def _batch_members(x, weights, n_init, n_shards, shard):
    """The (dataset, restart) pairs a batch program fits: the data of each (every dataset
    once per restart) and each pair's restart index. With ``n_shards`` (static) > 1, ``x``
    holds the datasets padded with copies of the last to a multiple of ``n_shards``, and the
    program fits the ``shard``-th (traced) of ``n_shards`` equal shards of them."""
    if n_shards > 1:
        size = x.shape[0] // n_shards
        x, weights = (jax.lax.dynamic_slice_in_dim(a, shard * size, size) for a in (x, weights))

    def members(a):  # (B, ...) → (B·n_init, ...)
        return a if n_init == 1 else jnp.repeat(a, n_init, axis=0)

    return members(x), members(weights), jnp.tile(jnp.arange(n_init), x.shape[0])


def _batch_keys(key, n_init, n_datasets, n_padded, n_shards, shard):
    """Each (dataset, restart) pair's key, for the pairs of :func:`_batch_members`:
    :func:`fit_restarts`' restart keys of the dataset's own key, ``split(key, n_datasets)``.
    Split inside the program: eagerly, the split would be a program of its own, compiled even
    when the fit's program is a stored one."""
    keys = jax.vmap(lambda k: _loop.restart_keys(k, n_init))(jax.random.split(key, n_datasets))
    if n_shards > 1:
        size = n_padded // n_shards
        keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], n_padded - n_datasets, axis=0)])
        keys = jax.lax.dynamic_slice_in_dim(keys, shard * size, size)
    return keys.reshape(-1, *keys.shape[2:])


def _staged_init(model) -> bool:
    """Whether ``model`` initialises in two stages (``initial_assignments``, optional in the
    model contract)."""
    return hasattr(model, "initial_assignments")


def _batch_init(model, x, weights, key, n_init, n_components, init_method, hyper,
                n_datasets, n_shards=1, shard=0, sequential=True):
    """The start of every (dataset, restart) pair of a batch (stacked), as
    :func:`fit_restarts` initialises each dataset's restarts (same keys): the initial
    parameters, or for a model that initialises in two stages (:func:`_staged_init`) what
    the key decides (:func:`_batch_loop` then makes the parameters of it).

    The second stage is left to the loop's program: the first runs once per fit and so
    takes quicker compiler options than the loop (see :func:`fit_batch`), and the second
    (one M-step from k-means' labels) is cheap to compile but slow to run without LLVM's
    optimisation. 1,000 × 200, D = 2, K = 3, full, 2 cores, fresh processes side by side:
    first call 0.76-0.78 → 0.74-0.77 s, in a new process with the cache filled 0.15-0.18 →
    0.14-0.16 s, compiled 0.08-0.10 → 0.075-0.08 s."""
    xs, ws, _ = _batch_members(x, weights, n_init, n_shards, shard)
    keys = _batch_keys(key, n_init, n_datasets, x.shape[0], n_shards, shard)

    def one(xb, wb, kb):
        if _staged_init(model):
            return model.initial_assignments(kb, xb, n_components, weights=wb,
                                             method=init_method, **hyper)
        return model.init(kb, xb, n_components, weights=wb, method=init_method, **hyper)

    pairs = (xs, ws, keys)
    return jax.lax.map(lambda a: one(*a), pairs) if sequential else jax.vmap(one)(*pairs)


def _batch_loop(model, x, weights, start, tol, max_iter, n_init, hyper, n_history,
                n_components, init_method, n_shards=1, shard=0, sequential=True):
    """Every (dataset, restart) pair's EM loop from its ``start`` (stacked, as
    :func:`_batch_init` gives it: initial parameters, or a staged initialisation's
    assignments), then each dataset's best restart."""
    xs, ws, restarts = _batch_members(x, weights, n_init, n_shards, shard)

    def one(xb, wb, sb, restart):
        params = (model.init(None, xb, n_components, weights=wb, method=init_method,
                             assignments=sb, **hyper) if _staged_init(model) else sb)
        return run(model, xb, wb, params, tol, max_iter, hyper, None, None, restart,
                   n_history=n_history)

    pairs = (xs, ws, start, restarts)
    runs = jax.lax.map(lambda a: one(*a), pairs) if sequential else jax.vmap(one)(*pairs)
    runs = jax.tree_util.tree_map(lambda a: a.reshape(-1, n_init, *a.shape[1:]), runs)
    return jax.vmap(_loop.best_restart)(runs)


def _batch_program(model, x, weights, key, tol, max_iter, n_init, n_components, init_method,
                   hyper, n_history, sequential=False):
    """Every (dataset, restart) pair's fit, then each dataset's best, in one program: the
    fits :func:`_restarts_program` would run per dataset (same keys, same initialisations).

    ``sequential`` (static): the pairs one after another inside the program (a
    ``lax.map``), each fit stopping as soon as it converges, and traced once, unbatched.
    Otherwise one ``vmap`` over all of them (one level, not a ``vmap`` of the restarts'
    ``vmap``: each level traces the whole fit again), whose loops iterate every member until
    the slowest stops — :func:`fit_batch`'s program on an accelerator, where one step of all
    members costs about what one member's does. (On the CPU, :func:`fit_batch` runs the same
    two stages one after another as two programs: :func:`_batch_init`, :func:`_batch_loop`.)
    The members share nothing but, under the ``vmap``, the fast paths' decisions (which
    keep every member exact): each is centred on its own mixture, where
    :func:`fit_restarts`' restarts share one centre (the same fits, to float rounding)."""
    n_datasets = x.shape[0]
    start = _batch_init(model, x, weights, key, n_init, n_components, init_method, hyper,
                        n_datasets, sequential=sequential)
    return _batch_loop(model, x, weights, start, tol, max_iter, n_init, hyper, n_history,
                       n_components, init_method, sequential=sequential)


_batch_programs = jit_variants(
    _batch_program,
    ("model", "n_init", "n_components", "init_method", "n_history", "sequential"))
# The CPU's two stages. For datasets of at most SHORT_SUM_ROWS rows XLA does not rewrite
# their sums as trees (pairwise partial sums: a reduce-window and a reduce to compile for
# each sum over more than 32 rows): summed in turn, float32 rounds a sum by at most
# 1024·eps ≈ 6e-5 of its terms' magnitude (typically √1024·eps ≈ 2e-6), and the programs
# compile 20-40 kernels fewer (1,000 datasets × 200 points, D = 2, K = 3, full, as one
# program: compile 0.63 -> 0.58 s on 2 cores, median of four fresh processes).
SHORT_SUM_ROWS = 1024
_SHORT_SUMS = {"xla_disable_hlo_passes": "tree_reduction_rewriter"}
_INIT_STATIC = ("model", "n_init", "n_components", "init_method", "n_datasets", "n_shards",
                "sequential")
_LOOP_STATIC = ("model", "n_init", "n_history", "n_components", "init_method", "n_shards",
                "sequential")
_batch_init_programs = {short: jit_variants(_batch_init, _INIT_STATIC, _SHORT_SUMS if short
                                            else None) for short in (False, True)}
_batch_loop_programs = {short: jit_variants(_batch_loop, _LOOP_STATIC, _SHORT_SUMS if short
                                            else None) for short in (False, True)}


def batch_sequentially() -> bool:
    """Whether :func:`fit_batch` runs its fits one after another (on the CPU) rather than
    as one ``vmap`` (on an accelerator). On the CPU a ``vmap`` of small fits pays for every
    member at every iteration until the slowest stops, and batching makes the program
    larger; measured on 2 cores, a fresh process each (first call / compiled call, s):
    1,000 datasets × 200 points, D = 2, K = 3, full: ``vmap`` 1.10 / 0.143, one after
    another 0.88 / 0.091; 500 × 200, D = 8, K = 5, full: 1.86 / 0.157 against 1.63 / 0.067;
    1,000 × 100, D = 4, K = 3, diag: 1.70 / 0.109 against 1.42 / 0.066; 100 × 5,000, D = 4,
    K = 4, tied: 2.13 / 0.229 against 1.79 / 0.183."""
    return jax.default_backend() == "cpu"


def batch_shards(n_datasets: int) -> int:
    """Into how many shards :func:`fit_batch` splits a batch it runs one fit after another
    (:func:`batch_sequentially`): one per CPU core this process may use (at most one per
    dataset), each shard the same compiled program, run by its own thread. A program runs
    its fits on one core; measured on 2 cores, 1,000 datasets × 200 points, D = 2, K = 3,
    full: 0.112 s for the batch as one run, 0.055 s as two shards run at once."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, n_datasets))


def fit_batch(
    model,
    x: jax.typing.ArrayLike,
    key: jax.Array,
    *,
    n_components: int,
    n_init: int = 1,
    init_method: str = "kmeans",
    weights: jax.typing.ArrayLike | None = None,
    tol: jax.typing.ArrayLike = 1e-3,
    max_iter: int = 100,
    **hyper,
) -> RestartsResult:
    """One mixture per dataset of a batch (B, N, D), all fitted in one compiled program.

    Many small fits at once — one per image, bag or bootstrap resample — each the fit
    :func:`fit_restarts` would give that dataset; each dataset gets its own key (split from
    ``key``) and stops on its own. On the CPU the fits run one after another, the batch
    split into one shard per core (:func:`batch_shards`), each run by a thread of its own;
    the initialisation and the EM loop are two programs, compiled side by side. On an
    accelerator they run as one ``vmap`` in one program (a finished fit stays frozen while
    others go on), whose E-step fast paths decide once for the whole batch, so every
    iteration runs one sweep, not both (see :func:`batch_sequentially`). Datasets of
    different sizes are padded to a common N and told apart by ``weights``: zero-weight rows
    are exact padding.
    Nothing else is shared between datasets (each is centred on its own mixture, so
    datasets far apart keep float32's accuracy).

    Args:
      model: the model (hashable, static).
      x: (B, N, D) data.
      key: PRNG key.
      n_components: K (static).
      n_init: restarts per dataset (static).
      init_method: as in :func:`fit_restarts`.
      weights: optional (B, N) non-negative weights (0 marks padding rows); every dataset
        needs at least ``n_components`` rows of positive weight.
      tol, max_iter, **hyper: as in :func:`fit`.

    Returns:
      :class:`RestartsResult` whose fields have a leading (B,) axis.
    """
    _validation.check_int(n_components, "n_components", 1)
    _validation.check_int(n_init, "n_init", 1)
    _validation.check_int(max_iter, "max_iter", 0)
    if np.ndim(x) != 3:
        raise ValueError(f"x must be 3-D (n_datasets, n_samples, n_features), got shape "
                         f"{np.shape(x)}")
    b, n, d = np.shape(x)
    if b < 1 or n < 1 or d < 1:
        raise ValueError(f"x must have at least one dataset, sample and feature, got shape "
                         f"{np.shape(x)}")
    dtype = floating_dtype(x)
    xs = np.asarray(x, dtype)
    if not np.all(np.isfinite(xs)):
        raise ValueError("x contains NaN or infinite values")
    if weights is None:
        w = np.ones((b, n), dtype)
    else:
        w = np.asarray(weights, dtype)
        if w.shape != (b, n):
            raise ValueError(f"weights must have shape {(b, n)}, got {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("weights must be finite and non-negative")
    counts = np.sum(w > 0, axis=1)
    if np.any(counts < n_components):
        i = int(np.argmin(counts))
        raise ValueError(f"dataset {i} has {int(counts[i])} sample(s) of positive weight, "
                         f"fewer than n_components={n_components}")
    hyper = with_default_hyper(model, hyper)
    for name, value in hyper.items():
        _validation.check_real(value, name)
    if hasattr(model, "check_hyper"):
        model.check_hyper(**hyper)
    _validation.check_real(tol, "tol", allow_negative_infinity=True)
    sequential = batch_sequentially()
    if hasattr(model, "with_batch"):
        # Sized for the members run together, but naming no axis: a vmap runs over
        # (dataset, restart) pairs, so anything shared over it (a collective, the restarts'
        # common centre) would mix datasets. Float32 datasets at ±3e4 once shared a centre
        # near 0 and lost their fit (a log-likelihood of +8.3 where the separate fit has
        # -3.5).
        model = model.with_batch(1 if sequential else n_init, None)
    entries = model_entries(model, n_components, d)
    n_shards = batch_shards(b) if sequential else 1
    if n_shards > 1:  # padded with copies of the last dataset, whose fits are dropped
        pad = -b % n_shards
        xs = np.concatenate([xs, np.repeat(xs[-1:], pad, axis=0)])
        w = np.concatenate([w, np.repeat(w[-1:], pad, axis=0)])
    x_dev, w_dev = jax.device_put(xs), jax.device_put(w)
    tol, max_iter_arg = host_array(tol, dtype), host_array(max_iter, np.int32)
    hyper = {k: host_array(v, dtype) for k, v in hyper.items()}
    n_history = history_size(max_iter)
    if not sequential:
        program = _batch_programs.pick(n, entries, n_init * b, max_iter)
        return trim_history(program(model, x_dev, w_dev, key, tol, max_iter_arg, n_init,
                                    n_components, init_method, hyper, n_history, False),
                            max_iter)
    # The CPU: the initialisation and the EM loop as two programs, the second traced while
    # the first compiles, each run shard by shard (batch_shards), a thread per shard. The
    # initialisation (k-means, run once per fit) takes the next quicker options than the
    # loop: -O0 for a small batch, where it runs 0.13 s longer than at -O1 (1,000 × 200,
    # D = 2, K = 3, full; 0.07 s over two shards) and compiles 0.2 s faster; the older
    # emitters for a larger one (see separate_initialisation). Measured on 2 cores, a fresh
    # process each, first call / compiled call (s), one -O1 program on one thread → these:
    # 1,000 × 200, D = 2, K = 3, full 1.06 / 0.10 → 0.71 / 0.12; 500 × 200, D = 8, K = 5,
    # full 1.78 / 0.075 → 1.32 / 0.044; 1,000 × 100, D = 4, K = 3, diag 1.65 / 0.085 → 1.09 /
    # 0.033; 100 × 5,000, D = 4, K = 4, tied 2.04 / 0.20 → 1.45 / 0.105.
    short = n <= SHORT_SUM_ROWS
    variant = compile_variant(n, entries, n_init * b, max_iter)
    init_variant = {"default": "small", "small": "quick"}.get(variant, variant)
    init_program = getattr(_batch_init_programs[short], init_variant)
    loop_program = getattr(_batch_loop_programs[short], variant)
    shards = [host_array(shard, np.int32) for shard in range(n_shards)]
    with concurrent.futures.ThreadPoolExecutor(n_shards + 2) as pool:
        init_ready, start_info = init_program.prepare(
            pool, model, x_dev, w_dev, key, n_init, n_components, init_method, hyper, b,
            n_shards, shards[0], True)
        loop_prepared = concurrent.futures.Future()

        def fit_shard(shard):  # one thread's dispatches run in turn: a thread per shard
            start = init_ready.result()(x=x_dev, weights=w_dev, key=key, hyper=hyper,
                                        shard=shard)
            return loop_prepared.result().result()(
                x=x_dev, weights=w_dev, start=start, tol=tol, max_iter=max_iter_arg,
                hyper=hyper, shard=shard)

        # The shards start their initialisation as soon as its program is ready, while this
        # thread traces (or loads) the loop's.
        jobs = [pool.submit(fit_shard, shard) for shard in shards]
        try:
            loop_ready, _ = loop_program.prepare(
                pool, model, x_dev, w_dev, start_info, tol, max_iter_arg, n_init, hyper,
                n_history, n_components, init_method, n_shards, shards[0], True)
        except BaseException as error:
            loop_prepared.set_exception(error)
            raise
        loop_prepared.set_result(loop_ready)
        results = [job.result() for job in jobs]
    if n_shards == 1:
        return trim_history(results[0], max_iter)
    result = jax.tree_util.tree_map(
        lambda *parts: jax.device_put(np.concatenate([np.asarray(p) for p in parts])[:b]),
        *results)
    return trim_history(result, max_iter)
