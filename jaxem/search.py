"""Model search: every (K, restart) of a covariance type in one compiled program.

A mixture with ``K_max`` slots can run K live components with the rest dead (weight 0; see
:class:`jaxem.gmm.GMMParams`), so the whole grid ``K ∈ ks`` × ``n_init`` restarts is one
``vmap`` of the EM loop over (number of live components, key) pairs: one compilation per
covariance type, whatever the ks — and for a small search one for all types, the type
given as data (:class:`jaxem.gmm.AnyCovarianceModel`). The criteria are computed on device
from each K's best restart:

    BIC = −2 log L + p log n         AIC = −2 log L + 2p
    ICL = BIC − 2 Σₙ wₙ log rₙ,ĉₙ     (ĉₙ the hard assignment; Biernacki, Celeux & Govaert 2000)

with ``log L`` the (weighted) log-likelihood at the final parameters, ``p`` the number of
free parameters of the live components and ``n`` the (weighted) number of samples; lower is
better for all three, as in scikit-learn. The search is generic over the model contract: a
model whose ``init`` takes ``n_live`` and whose ``n_parameters`` counts live components
(given the hyperparameters, as the model whose covariance type is one of them needs).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxem import _validation, em
from jaxem._linalg import COVARIANCE_TYPES
from jaxem._padding import pad_rows
from jaxem._rowsum import blockwise_sum
from jaxem.gmm import (
    HARD_INIT_METHODS,
    AnyCovarianceModel,
    GaussianMixtureModel,
    initial_labels,
    mixture_entries,
    typed_params,
)
from jaxem.kmeans import kmeans_plusplus, nearest_center, seeding_trials

CRITERIA = ("bic", "aic", "icl")

# The search's defaults, chosen by evidence (benchmarks/bench_mclust.py, README "Model
# search"): on Old Faithful, iris and standardised wine, K = 1..9 × 4 types (105 cells
# mclust fits), the cells worse than R's mclust by more than 0.5 in BIC were 41 with
# scikit-learn's one restart and tol = 1e-3, 11 with 16 restarts, 2 with 16 restarts and
# tol = 1e-5, 1 with 16 to 48 restarts and tol = 1e-6 (wine, tied, K = 7: 0.7 off), none
# with 64. A criterion compares total log-likelihoods to within ~1, i.e. mean
# log-likelihoods to ~1/N: the estimator's tol = 1e-3 stops slow fits far from their
# optimum. Restarts cost run time in proportion to the rows (N = 2,000, D = 4, K = 1..9 × 4
# types: 16 s with 32 restarts, 36 s with 64), so their number falls as the rows grow:
# SEARCH_RESTART_ROWS // rows, a power of two between the two bounds.
SEARCH_TOL = 1e-6
# Screening (select's ``screen``): every restart 10 iterations, the best 16 per cell to the
# end. Over seeds 0, 1, 2 of the mclust benchmark it misses no cell (nor does running all 64
# restarts to the end); keeping 8 missed one cell at two seeds (wine tied K = 7 +0.7, Old
# Faithful diag K = 9 +6.0). Old Faithful K = 1..5 × 4 types, 64 restarts: warm 1.9-2.0 ->
# 1.3 s, cold unchanged (4.7-5.1 vs 4.8 s: the second loop's compile against the run saved).
SEARCH_SCREEN = (10, 16)
SEARCH_RESTART_ROWS = 2**16
MAX_SEARCH_N_INIT, MIN_SEARCH_N_INIT = 64, 4


# Up to this many rows × mixture entries (gmm.mixture_entries: full layout) × members, the
# covariance types share one program (gmm.AnyCovarianceModel). Its E-step costs what full's
# does for every type; at this size 100 iterations of one type take ~1 s here, about what
# compiling a program per type costs. (Old Faithful, K = 1..5, 64 restarts: 5.1e6.)
SHARED_SEARCH_MAX_WORK = 2**23


def default_n_init(n_rows: int) -> int:
    """Restarts per (K, type) when none are given: 64 up to 1,024 rows (what it takes to
    match mclust's optima on small real data), then halved as the rows double
    (:data:`SEARCH_RESTART_ROWS` ÷ rows, a power of two: 32 at 2,000 rows, 8 at 8,000),
    at least 4 (from 16,384 rows on). Powers of two, since the count is a compile key."""
    fits = max(SEARCH_RESTART_ROWS // max(n_rows, 1), 1)
    return max(MIN_SEARCH_N_INIT, min(MAX_SEARCH_N_INIT, 1 << (fits.bit_length() - 1)))


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Result of :func:`select`. Tables are (len(ks), len(covariance_types)), rows K."""

    ks: tuple  # the numbers of components tried
    covariance_types: tuple  # the covariance types tried
    criterion: str  # "bic", "aic" or "icl": the one ``best`` minimises
    bic: np.ndarray  # (n_ks, n_types)
    aic: np.ndarray
    icl: np.ndarray
    log_likelihood: np.ndarray  # mean log-likelihood per sample at the final parameters
    n_parameters: np.ndarray  # free parameters
    converged: np.ndarray  # bool: the best restart of the cell converged
    failed: np.ndarray  # bool: a non-finite value stopped it (last finite params kept)
    n_iter: np.ndarray  # EM iterations of the best restart
    lower_bounds: dict  # (K, type) -> per-iteration mean log-likelihood of the best restart
    params: dict  # (K, type) -> GMMParams with K components (the best restart's)
    best: tuple  # (K, type) with the lowest value of ``criterion``

    def table(self, criterion: str | None = None) -> np.ndarray:
        """The (n_ks, n_types) table of ``criterion`` (default: the one searched on)."""
        return getattr(self, _check_criterion(criterion or self.criterion))


class TypeFitted(NamedTuple):
    """What :func:`select` reports to its ``progress`` hook when one covariance type's
    program has run: a row per K (arrays of length ``len(ks)``)."""

    covariance_type: str
    index: int  # position in the search's covariance types
    n_types: int
    seconds: float  # this type's program, its compilation included
    ks: tuple
    bic: np.ndarray
    aic: np.ndarray
    icl: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray
    failed: np.ndarray


def _check_criterion(criterion) -> str:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    return criterion


def check_ks(ks, n_samples: int | None = None) -> tuple:
    """The numbers of components as a sorted tuple of distinct ints >= 1 (and <= N)."""
    if isinstance(ks, int | np.integer):
        ks = [ks]
    try:
        ks = list(ks)
    except TypeError:
        raise TypeError(f"ks must be an int or a sequence of ints, got {ks!r}") from None
    if not ks:
        raise ValueError("ks is empty: give at least one number of components")
    for k in ks:
        _validation.check_int(k, "ks", 1)
    ks = tuple(sorted({int(k) for k in ks}))
    if n_samples is not None and ks[-1] > n_samples:
        raise ValueError(f"ks: K={ks[-1]} is larger than the number of samples ({n_samples})")
    return ks


def check_covariance_types(types) -> tuple:
    types = COVARIANCE_TYPES if types == "all" else (types,) if isinstance(types, str) else types
    types = tuple(types)
    if not types:
        raise ValueError("covariance_types is empty")
    for t in types:
        _validation.check_covariance_type(t)
    return tuple(dict.fromkeys(types))


def _method_keys(key, m: int, n_init: int):
    """The restart keys of the m-th init method (the first: GaussianMixture's)."""
    return jax.random.split(key if m == 0 else jax.random.fold_in(key, m), n_init)


def _trial_groups(ks: tuple, k_max: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means++ with the same number of candidates per centre draws, for every K, a prefix
    of the same centre sequence (:func:`jaxem.kmeans.seeding_trials`): one run per group of
    equal trial counts serves all its ks. Returns ``(group_live, group_of)``: (G,) the
    largest K of each group (1 for a group no K falls in) and (len(ks),) each K's group;
    G, the number of distinct counts for K = 1…k_max, depends on ``k_max`` only."""
    counts = sorted({seeding_trials(k) for k in range(1, k_max + 1)})
    group_live = np.ones(len(counts), np.int32)
    group_of = np.array([counts.index(seeding_trials(k)) for k in ks], np.int32)
    for k, g in zip(ks, group_of, strict=True):
        group_live[g] = max(group_live[g], k)
    return group_live, group_of


def _seeding_program(x, weights, key, n_live, group_live, group_of, k_max, n_init, methods):
    """Initial assignments of every (K, restart) for each hard method: (n_ks·n_init, N)
    int32 each. They do not depend on the covariance type, so the types' programs take them
    as data and none of them compiles the seeding. k-means++ runs once per trial-count group
    and restart (:func:`_trial_groups`), not once per K: 12 runs instead of 64 for
    K = 1…16 × 4 restarts."""
    n_ks = n_live.shape[0]
    members_live = jnp.repeat(n_live, n_init)
    out = []
    for m, method in enumerate(methods):
        keys = _method_keys(key, m, n_init)
        if method == "k-means++":
            centers = jax.vmap(lambda live, keys=keys: jax.vmap(
                lambda k: kmeans_plusplus(k, x, k_max, weights, live))(keys))(group_live)
            mine = centers[jnp.repeat(group_of, n_init), jnp.tile(jnp.arange(n_init), n_ks)]
            out.append(jax.vmap(lambda c, live: nearest_center(x, c, live).astype(jnp.int32))(
                mine, members_live))
            continue
        out.append(jax.vmap(lambda k, live, method=method: initial_labels(
            k, x, weights, k_max, method, live))(jnp.tile(keys, (n_ks, 1)), members_live))
    return tuple(out)


_seeding_programs = em.jit_variants(_seeding_program, ("k_max", "n_init", "methods"))

# The search's final evaluation (each member's log-likelihood and ICL term at its last
# parameters) takes the rows in blocks of this many. N = 1e5, D = 16, K = 1..16, full,
# 64 members: the evaluation ~0.7 s instead of 2.1 s for each member's (N, K) log-joint
# (whose block-stacked output XLA copied whole at every block); the search's work besides
# EM 3.57 / 3.20 / 3.31 s with blocks of 512 / 1,024 / 2,048 rows, 5.2 s before
# (benchmarks/README.md, tenth session).
EVALUATION_ROWS = 1024


def _search_program(model, x, weights, key, n_live, tol, max_iter, hyper, k_max, n_init,
                    init_method, n_history, labels=None, screen_iter=None, screen_keep=None):
    """Every (K, method, restart) of ``n_live`` (n_ks,) × ``init_method`` (a tuple) ×
    ``n_init`` in one vmap of the EM loop; per K the best restart, its final
    log-likelihood, ICL term and parameter count.

    With ``screen_keep`` (static) below the runs per K, every run first goes
    ``screen_iter`` iterations, and only the ``screen_keep`` with the highest bound per K go
    on to ``max_iter``, each exactly as if it had never stopped (:func:`jaxem.em.run`'s
    ``state``)."""
    n_ks = n_live.shape[0]
    starts = []
    for m, method in enumerate(init_method):  # each method's inits vmapped on their own
        keys = jnp.tile(_method_keys(key, m, n_init), (n_ks, 1))
        lab = None if labels is None else labels[m]
        starts.append(jax.vmap(lambda k, live, lab, method=method: model.init(
            k, x, k_max, weights=weights, method=method, n_live=live, labels=lab, **hyper))(
                keys, jnp.repeat(n_live, n_init), lab))
    # Member order (K, method, restart): the inits of K lie together.
    n_runs = len(init_method) * n_init
    params0 = jax.tree_util.tree_map(
        lambda *a: jnp.stack([b.reshape(n_ks, n_init, *b.shape[1:]) for b in a], axis=1)
        .reshape(n_ks * n_runs, *a[0].shape[1:]), *starts)
    def loop(cap, params=None, state=None):
        return jax.vmap(lambda p, s: em.run(model, x, weights, p, tol, cap, hyper,
                                            n_history=n_history, state=s),
                        axis_name=em.RESTARTS_AXIS)(params, state)

    if screen_keep is None or screen_keep >= n_runs:
        runs = loop(max_iter, params0)
        kept = jnp.broadcast_to(jnp.arange(n_runs), (n_ks, n_runs))
    else:
        # Screening (short runs first; Biernacki, Celeux & Govaert 2003): the vmapped loop
        # runs as long as its slowest member, so a wide batch of short runs and a narrow
        # one of long runs cost far less than every run to the end.
        first = loop(jnp.minimum(screen_iter, max_iter), params0)
        score = jnp.where(jnp.isfinite(first.lower_bound), first.lower_bound, -jnp.inf)
        _, kept = jax.lax.top_k(score.reshape(n_ks, n_runs), screen_keep)  # (n_ks, keep)
        rows = (kept + n_runs * jnp.arange(n_ks)[:, None]).reshape(-1)
        runs = loop(max_iter, state=jax.tree_util.tree_map(lambda a: a[rows], first))
        n_runs = screen_keep

    def evaluate(params):  # one member at a time, in blocks of rows: no (N, K) array
        def block(xs, ws):
            lj = model.log_joint(params, xs)
            top = jnp.max(lj, axis=1)
            top = jnp.where(jnp.isfinite(top), top, 0.0)
            # log Σ_k exp(lj − max): log p(x_n) = max + rel, and the hard assignment's log r
            # is −rel, exact where max − log p(x_n) rounds to |log p(x_n)|'s resolution.
            rel = jnp.log(jnp.sum(jnp.exp(lj - top[:, None]), axis=1))
            log_norm = top + rel  # log p(x_n)
            hard = -rel  # log r at the hard assignment
            return (jnp.sum(ws * jnp.where(ws > 0, log_norm, 0.0)),
                    jnp.sum(ws * jnp.where(ws > 0, hard, 0.0)))
        w = jnp.ones(x.shape[0], x.dtype) if weights is None else weights
        return (*blockwise_sum(block, x, w, EVALUATION_ROWS),
                model.n_parameters(params, **hyper))

    # Every member's log-likelihood at its final parameters, which the criteria are made
    # of. The best restart is chosen by it, not by the loop's last bound (taken one M-step
    # earlier): in float32 a restart whose last M-step degenerates (a component on one or
    # two points) can have the highest bound and far worse final parameters (measured:
    # Old Faithful, diag, K = 6, bound -4.014, final -4.115).
    log_lik, log_r_hard, n_params = jax.lax.map(evaluate, runs.params)
    runs, log_lik, log_r_hard, n_params = jax.tree_util.tree_map(
        lambda a: a.reshape(n_ks, n_runs, *a.shape[1:]), (runs, log_lik, log_r_hard, n_params))
    score = jnp.where(jnp.isfinite(log_lik), log_lik, -jnp.inf)
    best_index = jnp.argmax(score, axis=1)
    pick = lambda a: jax.vmap(lambda r, i: r[i])(a, best_index)  # noqa: E731
    best = jax.tree_util.tree_map(pick, runs)
    return best, pick(kept), pick(log_lik), pick(log_r_hard), pick(n_params)


_search_programs = em.jit_variants(
    _search_program, ("model", "k_max", "n_init", "init_method", "n_history", "screen_keep"))


def select(
    x,
    ks=range(1, 7),
    covariance_types=COVARIANCE_TYPES,
    *,
    criterion: str = "bic",
    n_init: int | None = None,
    init_method: str | tuple = "k-means++",
    weights=None,
    tol: float = SEARCH_TOL,
    max_iter: int = 100,
    reg_covar: float = 1e-6,
    seed: int = 0,
    chunk_size: int | None = None,
    progress: Callable[[TypeFitted], None] | None = None,
    screen: tuple[int, int] | None = SEARCH_SCREEN,
) -> SearchResult:
    """Fit every K in ``ks`` and covariance type, ``n_init`` restarts each; score by BIC,
    AIC and ICL.

    One compiled program per covariance type runs all K and restarts at once (a ``vmap`` of
    the EM loop over (K, restart) pairs in a ``max(ks)``-slot mixture); a small search
    (``em.small_program``) runs every type through one program, the type as data
    (:class:`jaxem.gmm.AnyCovarianceModel`: compiling is most of a small search's time).
    The rows are padded
    to a few sizes (:mod:`jaxem._padding`), so N, ``max_iter``, ``tol`` and the seed are not
    compile keys; the ks are only through their count and ``max(ks)`` (the slots), besides
    ``n_init``, the data's width and (unless shared) the covariance type. With one
    ``init_method`` and no screening (``n_init`` at most the screen's kept runs, or
    ``screen=None``), each cell equals ``GaussianMixture(K, n_init=n_init,
    random_state=seed)`` fitted on its own (same keys, same initialisation).

    Args:
      x: (N, D) data.
      ks: numbers of components to try (an int or a sequence).
      covariance_types: a type, a sequence of them, or ``"all"``.
      criterion: ``"bic"``, ``"aic"`` or ``"icl"``: what ``best`` minimises.
      n_init: restarts per (K, type); the best by final log-likelihood is kept. Default
        :func:`default_n_init`: 64 up to 1,024 rows, halved as the rows double, at least 4.
      init_method: ``k-means++`` (default: seeds without Lloyd iterations, so restarts
        start apart; measured to find better optima than ``kmeans`` in most cells of real
        data, see the README), ``kmeans``, ``random`` or ``random_from_data``, or a tuple
        of them: then every (K, type) runs ``n_init`` restarts of *each* and keeps the best.
        The first method's keys are those of :class:`jaxem.GaussianMixture`.
      weights: optional (N,) sample weights (then n = Σ w in the criteria).
      tol, max_iter, reg_covar: as :class:`jaxem.GaussianMixture`'s, but ``tol`` defaults
        to 1e-6 (:data:`SEARCH_TOL`): criteria need converged log-likelihoods.
      seed: random seed (the same keys for every K and type).
      chunk_size: optional E-step block size.
      progress: optional callable, given a :class:`TypeFitted` after each covariance
        type's program (e.g. to print a line per model while a long search runs).
      screen: ``(iterations, kept)``: when a cell has more restarts than ``kept``, every
        restart runs ``iterations`` EM iterations first and only the ``kept`` with the
        highest log-likelihood go on to ``max_iter`` — each exactly as it would have
        (short runs first, Biernacki, Celeux & Govaert 2003). The vmapped loop runs as long
        as its slowest member, so this costs a fraction of running every restart to the
        end. Default :data:`SEARCH_SCREEN`; ``None``: every restart to the end.

    Returns:
      :class:`SearchResult`; cells that failed (a non-finite value) keep their last finite
      parameters and say so in ``failed``.
    """
    _check_criterion(criterion)
    types = check_covariance_types(covariance_types)
    x = _validation.check_data(x, "x")
    ks = check_ks(ks, np.shape(x)[0])
    n_init = default_n_init(np.shape(x)[0]) if n_init is None else n_init
    _validation.check_int(n_init, "n_init", 1)
    methods = (init_method,) if isinstance(init_method, str) else tuple(init_method)
    if not methods:
        raise ValueError("init_method is empty")
    for method in methods:
        _validation.check_init_method(method)
    _validation.check_int(max_iter, "max_iter", 0)
    _validation.check_real(tol, "tol", allow_negative_infinity=True)
    _validation.check_real(reg_covar, "reg_covar", minimum=0.0)
    _validation.check_int(seed, "seed", 0)
    if seed >= 2**32:
        raise ValueError(f"seed must be below 2**32, got {seed}")
    _validation.check_sample_weight(weights, np.shape(x)[0], "weights")
    if screen is not None:
        if not isinstance(screen, tuple | list) or len(screen) != 2:
            raise TypeError(f"screen must be None or (iterations, kept runs), got {screen!r}")
        _validation.check_int(screen[0], "screen's iterations", 1)
        _validation.check_int(screen[1], "screen's kept runs", 1)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable, got {type(progress).__name__}")
    x = np.asarray(x)
    dtype = em.floating_dtype(x)
    if dtype == np.float32:
        _validation.check_float32_fits(x, "x")
    x = np.asarray(x, dtype)
    n = x.shape[0]
    w_sum = float(n if weights is None else np.sum(weights))
    xp, wp = pad_rows(x, weights)
    k_max = ks[-1]
    n_live = em.host_array(ks, np.int32)
    key = em.host_key(seed)
    shape = (len(ks), len(types))
    tables = {name: np.full(shape, np.nan) for name in
              ("bic", "aic", "icl", "log_likelihood", "n_parameters", "n_iter")}
    converged, failed = np.zeros(shape, bool), np.zeros(shape, bool)
    lower_bounds, params = {}, {}
    members = len(ks) * n_init * len(methods)
    # Screening only where it drops runs (else every run goes to the end, one loop).
    screen_keep = screen[1] if screen and screen[1] < n_init * len(methods) else None
    # Small programs compile quickly (em.compile_variant: -O0 unless their EM loop runs
    # long; the seeding has no EM loop).
    entries = mixture_entries(k_max, x.shape[1])
    # A small search runs every type through one program, the covariance type as data
    # (gmm.AnyCovarianceModel): compiling a program per type was most of its time (Old
    # Faithful, K = 1..5 × 4 types: 4 programs 4.3 s of a 6.5 s cold search). Larger ones
    # compile a program per type, each running its own type's cheaper E-step.
    shared = (len(types) > 1
              and em.program_work(xp.shape[0], entries, members) <= SHARED_SEARCH_MAX_WORK)
    # Hard seedings (k-means, k-means++, random_from_data) once for every type.
    if all(m in HARD_INIT_METHODS for m in methods):
        seeding = _seeding_programs.pick(xp.shape[0], entries, members)  # no EM loop
        group_live, group_of = _trial_groups(ks, k_max)
        labels = seeding(jax.device_put(xp), jax.device_put(wp), key, n_live, group_live, group_of,
                         k_max, n_init, methods)
    else:
        labels = None
    # One type after the other (measured: running the types' programs from a thread pool
    # saves nothing on the CPU, where XLA already compiles each with several threads).
    def collect(j, cov_type, model, outputs, started):
        best, _, log_lik, log_r_hard, n_params = outputs
        log_lik, log_r_hard = np.asarray(log_lik, float), np.asarray(log_r_hard, float)
        n_params = np.asarray(n_params, float)
        tables["log_likelihood"][:, j] = log_lik / w_sum
        tables["n_parameters"][:, j] = n_params
        tables["bic"][:, j] = -2 * log_lik + n_params * np.log(w_sum)
        tables["aic"][:, j] = -2 * log_lik + 2 * n_params
        tables["icl"][:, j] = tables["bic"][:, j] - 2 * log_r_hard
        n_iter = np.asarray(best.n_iter)
        tables["n_iter"][:, j] = n_iter
        converged[:, j] = np.asarray(best.converged)
        failed[:, j] = np.asarray(best.failed)
        history = np.asarray(best.lower_bounds)
        cells = jax.device_get(best.params)  # sliced on the host: no program per cell
        for i, k in enumerate(ks):
            lower_bounds[k, cov_type] = history[i, :n_iter[i]]
            one = model.first_components(jax.tree_util.tree_map(lambda a, i=i: a[i], cells), k)
            params[k, cov_type] = typed_params(one, cov_type) if shared else one
        if progress is not None:
            progress(TypeFitted(cov_type, j, len(types), time.perf_counter() - started, ks,
                                *(tables[name][:, j].copy() for name in ("bic", "aic", "icl")),
                                n_iter.astype(int), converged[:, j].copy(),
                                failed[:, j].copy()))

    # Pipelined: a type's program is dispatched (JAX runs it asynchronously), then the
    # previous type's results are collected, so one type runs while the next compiles
    # (Old Faithful, K = 1..5 × 4 types, 32 restarts, cold: 7.0 → 6.0 s in process).
    pending = None
    for j, cov_type in enumerate(types):
        started = time.perf_counter()
        if shared:
            model = AnyCovarianceModel(chunk_size=chunk_size)
            hyper = {"reg_covar": reg_covar, "structure": COVARIANCE_TYPES.index(cov_type)}
        else:
            model = GaussianMixtureModel(cov_type, chunk_size)
            hyper = {"reg_covar": reg_covar}
        model = model.with_batch(members, em.RESTARTS_AXIS)
        inp = em.prepare(model, xp, None, weights=wp, tol=tol, max_iter=max_iter, hyper=hyper)
        program = _search_programs.pick(xp.shape[0], entries, members, max_iter)
        outputs = program(
            model, inp.x, inp.weights, key, n_live, inp.tol, em.host_array(max_iter, np.int32),
            inp.hyper, k_max, n_init, methods, em.history_size(max_iter), labels,
            em.host_array(screen[0] if screen else 0, np.int32), screen_keep)
        if pending is not None:
            collect(*pending)
        pending = (j, cov_type, model, outputs, started)
    collect(*pending)
    score = tables[criterion]
    i, j = np.unravel_index(np.argmin(np.where(np.isfinite(score), score, np.inf)), shape)
    return SearchResult(
        ks=ks, covariance_types=types, criterion=criterion, bic=tables["bic"],
        aic=tables["aic"], icl=tables["icl"], log_likelihood=tables["log_likelihood"],
        n_parameters=tables["n_parameters"].astype(int), converged=converged, failed=failed,
        n_iter=tables["n_iter"].astype(int), lower_bounds=lower_bounds, params=params,
        best=(ks[i], types[j]),
    )
