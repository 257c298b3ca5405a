"""``jaxem.GaussianMixture``: scikit-learn's ``GaussianMixture`` interface on jaxem's drivers.

Same constructor arguments, defaults, attributes and methods as
``sklearn.mixture.GaussianMixture``, plus ``fit(X, sample_weight=...)`` and ``params_`` (the
fitted :class:`jaxem.gmm.GMMParams`). The ``n_init`` restarts run vmapped in one compiled
program. scikit-learn is optional: when it is installed the estimator derives from its
``BaseEstimator`` (so ``clone``, ``Pipeline`` and ``GridSearchCV`` work); otherwise a small
stand-in provides ``get_params``/``set_params``.

Computation is float32 unless JAX's x64 mode is on and ``X`` is float64.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxem import _padding, _validation, blocks, em, gmm, io, online, streamed
from jaxem._cache import enable_persistent_cache
from jaxem._padding import pad_rows, padded_size

try:  # scikit-learn is an optional peer.
    from sklearn.base import BaseEstimator as _BaseEstimator
    from sklearn.base import DensityMixin as _DensityMixin
    from sklearn.exceptions import ConvergenceWarning as _SklearnConvergenceWarning
    from sklearn.exceptions import NotFittedError as _SklearnNotFittedError

    _BASES: tuple = (_DensityMixin, _BaseEstimator)
except ImportError:  # pragma: no cover - exercised in environments without scikit-learn
    _SklearnConvergenceWarning = UserWarning

    class _SklearnNotFittedError(ValueError, AttributeError):
        """Stand-in for scikit-learn's ``NotFittedError`` (same bases)."""

    class _BaseEstimator:
        """Minimal ``get_params``/``set_params`` in scikit-learn's convention."""

        @classmethod
        def _get_param_names(cls):
            sig = inspect.signature(cls.__init__)
            return sorted(p for p in sig.parameters if p != "self")

        def get_params(self, deep=True):
            return {name: getattr(self, name) for name in self._get_param_names()}

        def set_params(self, **params):
            valid = self._get_param_names()
            for name, value in params.items():
                if name not in valid:
                    raise ValueError(f"invalid parameter {name!r} for {type(self).__name__}")
                setattr(self, name, value)
            return self

        def __repr__(self):
            args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
            return f"{type(self).__name__}({args})"

    _BASES = (_BaseEstimator,)


class ConvergenceWarning(_SklearnConvergenceWarning):
    """A fit stopped before converging (or stopped on a non-finite value).

    A subclass of scikit-learn's ``ConvergenceWarning`` when scikit-learn is installed, so
    existing warning filters apply.
    """


class NotFittedError(_SklearnNotFittedError):
    """The estimator was used before ``fit``.

    A subclass of scikit-learn's ``NotFittedError`` when scikit-learn is installed (so
    ``except NotFittedError`` written against scikit-learn catches it), and always of
    ``ValueError`` and ``AttributeError``.
    """


# scikit-learn's wording (sklearn.mixture), so that users and their tests meet one message.
ILL_DEFINED_COVARIANCE = (
    "some components have ill-defined empirical covariance (for instance caused by "
    "singleton or collapsed samples). Try to decrease the number of components, increase "
    "reg_covar, or scale the input data."
)


@jax.jit
def _densities(params, x):
    """``(log_joint, log p(x), log responsibilities)`` of every row, in one program (each
    computed eagerly would compile small programs for every new shape). The responsibilities
    relative to each row's largest log-joint (``log_softmax``), not ``lj − log p(x)``: far
    from every component, where |log p(x)| ~ 1e6, float32 resolves it only to 0.5, and a
    row of ``exp(lj − log p(x))`` summed to 1.135."""
    lj = gmm.log_joint(params, x)
    return lj, jax.nn.logsumexp(lj, axis=1), jax.nn.log_softmax(lj, axis=1)


def _feature_names(X) -> np.ndarray | None:
    """Column names of a DataFrame-like X when all are strings (scikit-learn's rule)."""
    columns = getattr(X, "columns", None)
    if columns is None:
        return None
    names = np.asarray(list(columns), dtype=object)
    if len(names) == 0 or not all(isinstance(n, str) for n in names):
        return None
    return names


PrecisionWarning = _validation.PrecisionWarning

# A step down of the log-likelihood larger than this fraction of its size (and than tol) is
# more than the rounding of a mean over samples: EM itself never decreases it.
DROP_RTOL = 1e-5


def log_likelihood_drop(history: np.ndarray, tol) -> tuple[float, int] | None:
    """``(size, iteration)`` of the largest decrease of a fit's log-likelihood history
    (iterations counted from 1) where it exceeds both ``tol`` and :data:`DROP_RTOL` of the
    history's largest magnitude; None where there is none."""
    history = np.asarray(history, np.float64)
    history = history[np.isfinite(history)]
    if history.size < 2:
        return None
    steps = np.diff(history)
    i = int(np.argmin(steps))
    bound = max(float(tol), DROP_RTOL * float(np.max(np.abs(history))))
    return (float(-steps[i]), i + 2) if -steps[i] > bound else None


def _precision_of(params_or_dtype):
    """A context in which JAX computes in the precision of ``params`` (or of a dtype): x64
    mode for float64, so that a model fitted in float64 keeps its precision end to end
    (predict, score, sample, a loaded file) whatever the global setting."""
    dtype = getattr(getattr(params_or_dtype, "means", None), "dtype", params_or_dtype)
    if np.dtype(dtype) == np.float64:
        return jax.enable_x64(True)
    return contextlib.nullcontext()
_sample = jax.jit(gmm.sample, static_argnames="n_samples")


# Component slots of a small fit: K rounded up to a multiple of this.
COMPONENT_SLOTS = 8


def _is_small(slots: int, n_rows: int, n_features: int, n_init: int = 1) -> bool:
    entries = gmm.mixture_entries(slots, n_features)
    return not _validation.under_transformation() and em.small_program(n_rows, entries, n_init)


def _slots(n_components: int, n_rows: int, n_features: int, n_init: int = 1) -> int:
    """Slots for K components: a multiple of :data:`COMPONENT_SLOTS` where the program is
    small (:func:`jaxem.em.small_program`: the dead slots' work is negligible next to the
    compile time they save), else K itself."""
    slots = -(-n_components // COMPONENT_SLOTS) * COMPONENT_SLOTS
    return slots if _is_small(slots, n_rows, n_features, n_init) else n_components


def _seed(random_state) -> int:
    if random_state is None:
        return int(np.random.default_rng().integers(2**31 - 1))
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(2**31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(2**31 - 1))
    seed = _validation.check_int(random_state, "random_state", 0)
    if seed >= 2**32:  # scikit-learn's (NumPy's) range for an integer seed
        raise ValueError(f"random_state must be between 0 and 2**32 - 1, got {seed}")
    return seed


class GaussianMixture(*_BASES):
    """Gaussian mixture fitted by EM, with scikit-learn's interface.

    Args:
      n_components: number of mixture components K.
      covariance_type: ``full``, ``tied``, ``diag`` or ``spherical``.
      tol: convergence threshold on the change of the mean log-likelihood (a negative value
        runs exactly ``max_iter`` iterations; scikit-learn accepts only ``tol >= 0``).
      reg_covar: non-negative regularisation added to the covariance diagonals.
      max_iter: maximum EM iterations per initialisation (0: initialise only).
      n_init: number of initialisations, run vmapped; the best is kept.
      init_params: ``kmeans``, ``k-means++``, ``random`` or ``random_from_data``.
      weights_init: optional (K,) initial weights.
      means_init: optional (K, D) initial means.
      precisions_init: optional initial precisions in the shape of ``covariance_type``.
      random_state: int, ``numpy`` RandomState/Generator, or None.
      warm_start: start each ``fit`` from the previous solution (with ``n_init=1``).
      verbose: print the per-iteration log-likelihood after each fit when > 0.
      verbose_interval: iterations between printed lines.
      chunk_size: optional E-step block size bounding memory to O(chunk_size·K·D).
      partial_fit_mode: what :meth:`partial_fit` does with a batch: ``"online"``
        (stochastic online EM: the parameters move after every batch) or ``"exact"``
        (statistics accumulate at fixed parameters; :meth:`finish_pass` runs the M-step,
        one exact EM iteration over every batch since the last one).
      online_kappa: online EM's step-size decay κ ∈ (0.5, 1]: batch t weighs
        ρ_t = (t + online_t0)^(−κ).
      online_t0: online EM's step-size offset t₀ ≥ 0.
      online_average_from: None, or the batch from which online EM reports parameters of
        the averaged statistics (Polyak–Ruppert).
    """

    def __init__(
        self,
        n_components=1,
        *,
        covariance_type="full",
        tol=1e-3,
        reg_covar=1e-6,
        max_iter=100,
        n_init=1,
        init_params="kmeans",
        weights_init=None,
        means_init=None,
        precisions_init=None,
        random_state=None,
        warm_start=False,
        verbose=0,
        verbose_interval=10,
        chunk_size=None,
        partial_fit_mode="online",
        online_kappa=0.6,
        online_t0=0.0,
        online_average_from=None,
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.chunk_size = chunk_size
        self.partial_fit_mode = partial_fit_mode
        self.online_kappa = online_kappa
        self.online_t0 = online_t0
        self.online_average_from = online_average_from

    # ----------------------------------------------------------------- validation
    def _check_parameters(self):
        _validation.check_int(self.n_components, "n_components", 1)
        _validation.check_covariance_type(self.covariance_type)
        _validation.check_real(self.tol, "tol")
        _validation.check_real(self.reg_covar, "reg_covar", minimum=0.0)
        _validation.check_int(self.max_iter, "max_iter", 0)
        _validation.check_int(self.n_init, "n_init", 1)
        _validation.check_init_method(self.init_params)
        _validation.check_int(self.verbose, "verbose", 0)
        _validation.check_int(self.verbose_interval, "verbose_interval", 1)
        if self.chunk_size is not None:
            _validation.check_int(self.chunk_size, "chunk_size", 1)
        if self.partial_fit_mode not in ("online", "exact"):
            raise ValueError(f"partial_fit_mode must be 'online' or 'exact', got "
                             f"{self.partial_fit_mode!r}")
        online.check_schedule(self.online_kappa, self.online_t0, self.online_average_from)

    def _dtype(self, X) -> np.dtype:
        x64 = jax.config.jax_enable_x64 and np.asarray(X).dtype == np.float64
        return np.dtype(np.float64 if x64 else np.float32)

    def _check_feature_names(self, X, reset: bool) -> None:
        """scikit-learn's contract for column names (``feature_names_in_``): kept from a
        DataFrame at ``fit``, and a later X whose names differ is refused, never silently
        taken column by column."""
        names = _feature_names(X)
        if reset:
            if names is None:
                self.__dict__.pop("feature_names_in_", None)
            else:
                self.feature_names_in_ = names
            return
        fitted = getattr(self, "feature_names_in_", None)
        if names is None and fitted is None:
            return
        if names is None:
            warnings.warn(f"X does not have valid feature names, but {type(self).__name__} "
                          "was fitted with feature names", UserWarning, stacklevel=4)
        elif fitted is None:
            warnings.warn(f"X has feature names, but {type(self).__name__} was fitted "
                          "without feature names", UserWarning, stacklevel=4)
        elif len(names) != len(fitted) or np.any(names != fitted):
            unseen = [n for n in names if n not in set(fitted)]
            missing = [n for n in fitted if n not in set(names)]
            detail = (f"; unseen at fit time: {unseen}" if unseen else "") + (
                f"; seen at fit time, missing now: {missing}" if missing else "")
            order = "" if unseen or missing else (
                "; the same names in another order: pass the columns as at fit time "
                f"({list(fitted)})")
            raise ValueError("The feature names should match those that were passed during "
                             f"fit{detail}{order}")

    def _check_X(self, X, min_samples=1, reset=False):
        if reset or hasattr(self, "params_"):
            self._check_feature_names(X, reset)
        X = _validation.check_data(X, "X", min_samples=min_samples)
        if reset:
            dtype = self._dtype(X)
            if dtype == np.float32:
                _validation.check_float32_fits(X, "X")
            return np.asarray(X, dtype)
        self._check_is_fitted()
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )
        with np.errstate(over="ignore"):  # beyond float32: evaluated in float64 (_densities)
            return np.asarray(X, self.params_.means.dtype)

    def _check_is_fitted(self):
        if not hasattr(self, "params_"):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with "
                "appropriate arguments before using this estimator."
            )

    def _check_inits(self, n_features: int) -> dict:
        k = self.n_components
        given = {}
        if self.weights_init is not None:
            _validation.check_weights_init(self.weights_init, k)
            given["weights_init"] = self.weights_init
        if self.means_init is not None:
            _validation.check_means_init(self.means_init, k, n_features)
            given["means_init"] = self.means_init
        if self.precisions_init is not None:
            _validation.check_spd(
                self.precisions_init, self.covariance_type, k, n_features, "precisions_init"
            )
            given["precisions_init"] = self.precisions_init
        return given

    # ----------------------------------------------------------------- fitting
    def fit(self, X, y=None, sample_weight=None, *, progress=None, block_progress=None):
        """Estimate the parameters with EM; ``n_init`` restarts run vmapped.

        Args:
          X: (N, D) data; or data that stays on the host — a ``.npy`` path, a
            ``np.memmap`` (e.g. ``np.load(path, mmap_mode="r")``), a block source
            (:mod:`jaxem.blocks`) — then initialised from a random subsample and streamed
            block by block every iteration, never copied whole (:mod:`jaxem.streamed`).
          y: ignored (scikit-learn API).
          sample_weight: optional (N,) non-negative weights.
          progress: optional ``progress(restart, iteration, log_likelihood, change)`` called
            after every iteration from inside the compiled loop (see :func:`jaxem.fit`).
          block_progress: host data only: ``block_progress(iteration, rows_done, n_rows)``
            after each block of an iteration that has run 5 s (see
            :func:`jaxem.streamed.fit`).

        Returns:
          self.
        """
        self._check_parameters()
        enable_persistent_cache()  # programs kept across processes; see jaxem/_cache.py
        for name in ("_batches", "_online", "_accumulated"):  # partial_fit starts again
            self.__dict__.pop(name, None)
        if blocks.is_host_data(X):
            return self._fit_host(X, sample_weight, progress, block_progress)
        X = self._check_X(X, min_samples=self.n_components, reset=True)
        self._check_reg_covar(X.dtype)
        _validation.check_sample_weight(sample_weight, X.shape[0])
        init_kwargs = self._check_inits(X.shape[1])
        model = gmm.GaussianMixtureModel(self.covariance_type, self.chunk_size)
        dtype = X.dtype
        weights = None if sample_weight is None else np.asarray(sample_weight, dtype)
        # Rows padded (weight 0) to a few sizes: a refit on a similar N reuses the program.
        # (Beyond 2^20 rows nothing is padded, and unit weights are left implicit: an
        # N-sized array of ones, and the initialisation's draw by weight, cost memory.)
        n_given = X.shape[0]
        X, weights = pad_rows(X, weights)
        if sample_weight is None and X.shape[0] == n_given > _padding.MAX_PADDED_ROWS:
            weights = None

        if self._continues_warm_start(X.shape[1]):
            # scikit-learn's warm start: one run continued across calls, so the first
            # iteration's change is measured from the previous call's lower bound.
            self._continue(lambda lower: em.fit(
                model, X, self.params_, weights=weights, tol=self.tol, max_iter=self.max_iter,
                progress=progress, reg_covar=self.reg_covar, lower_bound=lower))
        else:
            # With every initial parameter given, all restarts would be identical.
            n_init = 1 if len(init_kwargs) == 3 else self.n_init
            key = em.host_key(_seed(self.random_state))
            # A small fit runs its K components in a program of _slots(K) (dead slots), so
            # that K = 1..8 share one program (a search over K, GridSearchCV).
            slots = self.n_components if init_kwargs else _slots(
                self.n_components, X.shape[0], X.shape[1], n_init)
            if not init_kwargs and _is_small(slots, X.shape[0], X.shape[1], n_init):
                init_kwargs = {"n_live": self.n_components}
            self.fit_result_ = em.fit_restarts(
                model, X, key, n_components=slots, n_init=n_init,
                init_method=self.init_params, weights=weights, tol=self.tol,
                max_iter=self.max_iter, init_kwargs=init_kwargs, progress=progress,
                reg_covar=self.reg_covar,
            )
        best = self.fit_result_.best
        if best.params.n_components > self.n_components:
            best = best._replace(params=model.first_components(
                jax.device_get(best.params), self.n_components))
        if self.max_iter == 0 and not bool(best.failed):
            # No E-step ran: the bound of the initial parameters, not -inf.
            _, ll = model.e_step(best.params, X, weights)
            best = best._replace(lower_bound=ll)
        self._set_fitted(best, X.shape[1])
        return self

    def _continue(self, run):
        """scikit-learn's warm start: ``run(lower_bound)`` continues the previous fit, its
        first change measured from the previous call's lower bound; the result is kept as
        a one-restart ``fit_result_``."""
        best = run(self.lower_bound_ if np.isfinite(self.lower_bound_) else -np.inf)
        self.fit_result_ = em.RestartsResult(
            best, jnp.asarray(0), jax.tree_util.tree_map(lambda a: a[None], best))

    def _check_reg_covar(self, dtype):
        if dtype == np.float32 and self.reg_covar > _validation.FLOAT32_SQRT_MAX / 1e3:
            raise ValueError(f"reg_covar={self.reg_covar:g} overflows float32 arithmetic (its "
                             "square is beyond 3.4e38): rescale the data, or "
                             f"{_validation.X64_HINT}")

    def _fit_host(self, X, sample_weight, progress, block_progress=None):
        """``fit`` on data that stays on the host (a ``.npy`` path, a ``np.memmap``, a block
        source): initialised from a subsample, every iteration streamed block by block
        (:mod:`jaxem.streamed`); no copy of the data is made."""
        data = blocks.HostData(X, sample_weight)
        dtype = data.compute_dtype()
        self._check_reg_covar(dtype)
        if data.n_rows is not None and data.n_rows < self.n_components:
            raise ValueError(f"Expected n_samples >= n_components but got n_components = "
                             f"{self.n_components}, n_samples = {data.n_rows}")
        d = data.n_features
        self.__dict__.pop("feature_names_in_", None)
        init_kwargs = self._check_inits(d)
        model = gmm.GaussianMixtureModel(self.covariance_type, self.chunk_size)
        common = dict(tol=self.tol, max_iter=self.max_iter, progress=progress,
                      block_progress=block_progress, reg_covar=self.reg_covar)
        if self._continues_warm_start(d):
            self._continue(lambda lower: streamed.fit(model, data, self.params_,
                                                      lower_bound=lower, **common))
        else:
            n_init = 1 if len(init_kwargs) == 3 else self.n_init
            self.fit_result_ = streamed.fit_restarts(
                model, data, em.host_key(_seed(self.random_state)),
                n_components=self.n_components, n_init=n_init, init_method=self.init_params,
                init_kwargs=init_kwargs, **common)
        best = self.fit_result_.best
        if self.max_iter == 0 and not bool(best.failed):
            _, ll = streamed.e_step(model, data, best.params)
            best = best._replace(lower_bound=ll)
        self._set_fitted(best, d, stacklevel=4)
        return self

    # ----------------------------------------------------------------- batches
    def partial_fit(self, X, y=None, sample_weight=None):
        """Learn from one batch (scikit-learn's ``partial_fit`` convention).

        The first call initialises from this batch (``init_params``, ``n_init`` restarts
        scored on it, or the given ``*_init``); ``n_components`` and ``covariance_type``
        are then fixed until :meth:`fit`. ``partial_fit_mode="online"``: one step of
        stochastic online EM (:mod:`jaxem.online`), the parameters move after every batch.
        ``"exact"``: the batch's statistics at the current parameters are added up;
        :meth:`finish_pass` turns them into new parameters.

        Args:
          X: (n, D) batch.
          y: ignored.
          sample_weight: optional (n,) non-negative weights.

        Returns:
          self.
        """
        self._check_parameters()
        enable_persistent_cache()
        first = not hasattr(self, "_batches")
        if not first and (self.params_.n_components != self.n_components
                          or self.params_.covariance_type != self.covariance_type):
            raise ValueError(
                f"partial_fit continues a {self.params_.n_components}-component "
                f"{self.params_.covariance_type!r} model; n_components and "
                "covariance_type cannot change between calls (call fit to start again)")
        X = self._check_X(X, min_samples=self.n_components if first else 1, reset=first)
        _validation.check_sample_weight(sample_weight, X.shape[0])
        model = gmm.GaussianMixtureModel(self.covariance_type, self.chunk_size)
        if first:
            self._check_reg_covar(X.dtype)
            init_kwargs = self._check_inits(X.shape[1])
            n_init = 1 if len(init_kwargs) == 3 else self.n_init
            start = em.fit_restarts(
                model, X, em.host_key(_seed(self.random_state)),
                n_components=self.n_components, n_init=n_init, init_method=self.init_params,
                weights=sample_weight, max_iter=0, init_kwargs=init_kwargs,
                reg_covar=self.reg_covar)
            params = jax.tree_util.tree_map(lambda a: a[0], start.restarts.params)
            if n_init > 1:  # the restart whose initial parameters score best on the batch
                scores = [float(model.e_step(jax.tree_util.tree_map(
                    lambda a, i=i: a[i], start.restarts.params), X, sample_weight)[1])
                    for i in range(n_init)]
                params = jax.tree_util.tree_map(lambda a: a[int(np.argmax(scores))],
                                                start.restarts.params)
            self._online = online.start(model, params)
            self._accumulated = None
            self._batches = []
            self._store_params(params)
        if self.partial_fit_mode == "online":
            self._online = online.update(
                model, self._online, X, sample_weight, kappa=self.online_kappa,
                t0=self.online_t0, average_from=self.online_average_from,
                reg_covar=self.reg_covar)
            ll = float(self._online.log_likelihood)
            self._store_params(online.current_params(model, self._online,
                                                     reg_covar=self.reg_covar))
        else:
            self._accumulated = online.accumulate(model, self.params_, X, sample_weight,
                                                  self._accumulated)
            ll = float(self._accumulated.ll_sum / self._accumulated.weight)
        self._batches.append(ll)
        self.n_iter_ = len(self._batches)
        self.lower_bound_ = ll
        self.lower_bounds_ = np.asarray(self._batches)
        self.converged_ = False
        return self

    def finish_pass(self):
        """Exact mode: the M-step from the statistics accumulated by :meth:`partial_fit`
        since the last call (one batch EM iteration over all those batches); the next
        batches are taken at the new parameters. ``lower_bound_`` becomes the mean
        log-likelihood of the pass at the old parameters.

        Returns:
          self.
        """
        if getattr(self, "_accumulated", None) is None:
            raise ValueError("finish_pass needs partial_fit_mode='exact' and at least one "
                             "partial_fit call since the last finish_pass")
        model = gmm.GaussianMixtureModel(self.covariance_type, self.chunk_size)
        params, ll = online.m_step(model, self._accumulated, reg_covar=self.reg_covar)
        self._accumulated = None
        if not all(np.all(np.isfinite(np.asarray(a)))
                   for a in jax.tree_util.tree_leaves(params)):
            warnings.warn("the M-step gave non-finite parameters; the previous ones are "
                          "kept: " + ILL_DEFINED_COVARIANCE, ConvergenceWarning, stacklevel=2)
            return self
        self._store_params(params)
        self.lower_bound_ = float(ll)
        return self

    def _continues_warm_start(self, n_features: int) -> bool:
        """Whether this ``fit`` continues the previous one (``warm_start``).

        A change of the data's width is the caller's mistake and raises; a fit whose
        ``n_components`` or ``covariance_type`` was changed since (``set_params``) starts
        cold, never mixing the old parameters' shapes with the new settings.
        """
        if not (self.warm_start and hasattr(self, "params_")):
            return False
        if n_features != self.n_features_in_:
            raise ValueError(
                f"X has {n_features} features, but warm_start=True continues a fit with "
                f"{self.n_features_in_} features; fit on data of the same width or set "
                "warm_start=False"
            )
        return (self.params_.n_components == self.n_components
                and self.params_.covariance_type == self.covariance_type)

    def _set_fitted(self, best: em.FitResult, n_features: int, stacklevel: int = 3):
        n_iter = int(best.n_iter)
        failed = bool(best.failed)
        if failed and not all(np.all(np.isfinite(np.asarray(a)))
                              for a in jax.tree_util.tree_leaves(best.params)):
            raise ValueError(
                "Fitting the mixture model failed because the initial parameters already "
                "have an ill-defined covariance: " + ILL_DEFINED_COVARIANCE
            )
        self._store_params(best.params)
        self.converged_ = bool(best.converged)
        self.n_iter_ = n_iter
        self.lower_bound_ = float(best.lower_bound)
        self.lower_bounds_ = np.asarray(best.lower_bounds)[:n_iter]
        if self.verbose:
            for i in range(0, n_iter, self.verbose_interval):
                print(f"  Iteration {i + 1}\t log-likelihood {self.lower_bounds_[i]:.6f}")
            print(f"Fit {'converged' if self.converged_ else 'did not converge'} "
                  f"after {n_iter} iterations: lower bound {self.lower_bound_:.6f}")
        if failed:
            warnings.warn(
                f"EM stopped at iteration {n_iter + 1} on a non-finite value and kept the "
                "last finite parameters: " + ILL_DEFINED_COVARIANCE,
                ConvergenceWarning,
                stacklevel=stacklevel,
            )
        elif self.max_iter == 0:
            warnings.warn(
                "max_iter=0: no EM iteration ran; the parameters are the initialisation and "
                "lower_bound_ is their mean log-likelihood.",
                ConvergenceWarning,
                stacklevel=stacklevel,
            )
        elif not self.converged_:
            warnings.warn(
                "Best performing initialization did not converge. Try different init "
                "parameters, or increase max_iter, tol, or check for degenerate data.",
                ConvergenceWarning,
                stacklevel=stacklevel,
            )
        drop = log_likelihood_drop(self.lower_bounds_, self.tol)
        if drop is not None:
            size, iteration = drop
            warnings.warn(
                f"the log-likelihood decreased by {size:.2g} at iteration {iteration}, which "
                "EM never does in exact arithmetic: rounding dominates this fit (in float32, "
                "e.g. a component collapsed onto a sample of data far from the origin), and "
                f"its stopping rule cannot be trusted. Centre the data, or {_validation.X64_HINT}",
                PrecisionWarning,
                stacklevel=stacklevel,
            )

    def _store_params(self, params: gmm.GMMParams):
        self.params_ = params
        self.weights_ = np.asarray(params.weights)
        self.means_ = np.asarray(params.means)
        self.covariances_ = np.asarray(params.covariances)
        self.precisions_cholesky_ = np.asarray(params.precisions_cholesky)
        # On the host: an eager JAX product would compile a small program for every K.
        pc = self.precisions_cholesky_
        self.precisions_ = (pc**2 if params.covariance_type in ("diag", "spherical")
                            else pc @ np.swapaxes(pc, -1, -2))
        self.n_features_in_ = self.means_.shape[1]

    # ----------------------------------------------------------------- persistence
    def save(self, path):
        """Write the fitted model to ``path`` (``.npz``; see :func:`jaxem.io.save`), with
        the constructor parameters it was fitted with."""
        self._check_is_fitted()
        return io.save(path, self)

    def _saved_settings(self) -> dict:
        """The constructor parameters a model file keeps: those that are None, booleans,
        finite numbers or strings (not arrays nor ``RandomState`` objects)."""
        return io.storable_settings(self.get_params(deep=False))

    @classmethod
    def load(cls, path) -> GaussianMixture:
        """A fitted estimator from a file written by :meth:`save` or :func:`jaxem.save`.

        The file is validated (see :func:`jaxem.io.read`); the estimator predicts exactly
        what the saved one did, and has the constructor parameters it was fitted with
        (``get_params()``, so ``clone`` and a refit repeat the fit; parameters that are
        arrays or ``RandomState`` objects are not stored and come back as their defaults).
        ``lower_bounds_`` (the history) is not stored.
        """
        params, info = io.read(path)
        settings = {name: value for name, value in info.get("settings", {}).items()
                    if name in cls._get_param_names()}
        settings.update(n_components=params.n_components,
                        covariance_type=params.covariance_type)
        gm = cls(**settings)
        gm._store_params(params)  # NumPy arrays: float64 stays float64 without x64 mode
        gm.converged_ = info.get("converged", True)
        gm.n_iter_ = info.get("n_iter", 0)
        gm.lower_bound_ = info.get("lower_bound", float("nan"))
        gm.lower_bounds_ = np.asarray([], params.means.dtype)
        if info.get("feature_names") is not None:
            gm.feature_names_in_ = np.asarray(info["feature_names"], dtype=object)
        return gm

    def fit_predict(self, X, y=None, sample_weight=None):
        """Fit, then return the (N,) component labels of ``X``."""
        return self.fit(X, y, sample_weight=sample_weight).predict(X)

    # ----------------------------------------------------------------- inference
    def _densities(self, X) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(log_joint (N, K), log p(x) (N,), log responsibilities (N, K))`` in the
        model's precision; rows that overflow it (points so far from every component that
        the squared distance exceeds float32) are evaluated again in float64, so that they
        get the nearest component's responsibility, not NaN."""
        raw = X
        X = self._check_X(X)  # raises NotFittedError before params_ is touched
        n, k = X.shape[0], self.params_.n_components
        n_rows = padded_size(n)
        # Rows padded, and a small model's components padded with dead slots as in fit: a
        # new N or K is not a new program. Dead slots have log-joint −inf: they add nothing
        # to log p(x).
        params = gmm.pad_components(self.params_, _slots(k, n_rows, X.shape[1]))
        with _precision_of(self.params_):
            lj, log_px, log_r = (np.asarray(a) for a in
                                 _densities(params, pad_rows(X, None, n_rows)[0]))
        lj, log_px, log_r = lj[:n, :k], log_px[:n], log_r[:n, :k]
        bad = ~np.all(np.isfinite(lj), axis=1)
        if bad.any():
            with _precision_of(np.float64):
                params64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64),
                                                  self.params_)
                lj, log_px, log_r = (a.astype(np.float64) for a in (lj, log_px, log_r))
                x64 = np.asarray(_validation.check_data(raw, "X"), np.float64)  # rare path
                lj[bad], log_px[bad], log_r[bad] = (np.asarray(a) for a in
                                                    _densities(params64, x64[bad]))
            still = ~np.all(np.isfinite(lj), axis=1)
            if still.any():
                raise ValueError(
                    f"X has {int(still.sum())} sample(s) (first at row "
                    f"{int(np.flatnonzero(still)[0])}) too far from every component for "
                    "their log-density to be represented even in float64"
                )
        return lj, log_px, log_r

    def score_samples(self, X):
        """(N,) log densities ``log p(x_n)``."""
        return self._densities(X)[1]

    def score(self, X, y=None, sample_weight=None):
        """Mean (optionally weighted) log-likelihood per sample."""
        s = self.score_samples(X)
        if sample_weight is None:
            return float(np.mean(s))
        _validation.check_sample_weight(sample_weight, s.shape[0])
        return float(np.average(s, weights=np.asarray(sample_weight, float)))

    def predict(self, X):
        """(N,) index of the most probable component for each sample."""
        return np.argmax(self._densities(X)[0], axis=1)

    def predict_proba(self, X):
        """(N, K) responsibilities ``p(z_n = k | x_n)``."""
        return np.exp(self._densities(X)[2])

    def sample(self, n_samples=1):
        """Draw ``n_samples`` samples; returns ``(X, y)`` sorted by component, as scikit-learn."""
        self._check_is_fitted()
        _validation.check_int(n_samples, "n_samples", 0)
        if n_samples < 1:
            raise ValueError(f"Invalid value for 'n_samples': {n_samples} . The sampling "
                             "requires at least one sample.")
        d, itemsize = self.n_features_in_, self.params_.means.dtype.itemsize
        if n_samples > np.iinfo(np.int32).max:
            raise ValueError(f"n_samples={n_samples} is more than one call can draw "
                             f"({np.iinfo(np.int32).max}); draw in batches")
        # The samples, their noise and labels, and the copy handed back to NumPy.
        _validation.check_allocation(3 * n_samples * (d + 1) * itemsize,
                                     f"sample(n_samples={n_samples}) with {d} features",
                                     "draw in batches")
        with _precision_of(self.params_):
            key = em.host_key(_seed(self.random_state))
            x, labels = _sample(key, self.params_, n_samples=n_samples)
            return np.asarray(x), np.asarray(labels)

    def _n_parameters(self) -> int:
        return gmm.n_parameters(self.params_)

    def bic(self, X):
        """Bayesian information criterion on ``X`` (lower is better)."""
        n = np.asarray(X).shape[0]
        return -2 * self.score(X) * n + self._n_parameters() * np.log(n)

    def aic(self, X):
        """Akaike information criterion on ``X`` (lower is better)."""
        n = np.asarray(X).shape[0]
        return -2 * self.score(X) * n + 2 * self._n_parameters()
