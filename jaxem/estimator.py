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

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxem import _validation, elbo, em, gmm, io
from jaxem._linalg import precisions_from_cholesky

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


_log_joint = jax.jit(gmm.log_joint)
_sample = jax.jit(gmm.sample, static_argnames="n_samples")


def _seed(random_state) -> int:
    if random_state is None:
        return int(np.random.default_rng().integers(2**31 - 1))
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(2**31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(2**31 - 1))
    return _validation.check_int(random_state, "random_state", 0)


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

    def _dtype(self, X) -> np.dtype:
        x64 = jax.config.jax_enable_x64 and np.asarray(X).dtype == np.float64
        return np.dtype(np.float64 if x64 else np.float32)

    def _check_X(self, X, min_samples=1, reset=False):
        X = _validation.check_data(X, "X", min_samples=min_samples)
        if reset:
            return np.asarray(X, self._dtype(X))
        self._check_is_fitted()
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )
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
    def fit(self, X, y=None, sample_weight=None, *, progress=None):
        """Estimate the parameters with EM; ``n_init`` restarts run vmapped.

        Args:
          X: (N, D) data.
          y: ignored (scikit-learn API).
          sample_weight: optional (N,) non-negative weights.
          progress: optional ``progress(restart, iteration, log_likelihood, change)`` called
            after every iteration from inside the compiled loop (see :func:`jaxem.fit`).

        Returns:
          self.
        """
        self._check_parameters()
        X = self._check_X(X, min_samples=self.n_components, reset=True)
        _validation.check_sample_weight(sample_weight, X.shape[0])
        init_kwargs = self._check_inits(X.shape[1])
        model = gmm.GaussianMixtureModel(self.covariance_type, self.chunk_size)
        dtype = X.dtype
        weights = None if sample_weight is None else np.asarray(sample_weight, dtype)

        if self._continues_warm_start(X.shape[1]):
            # scikit-learn's warm start: one run continued across calls, so the first
            # iteration's change is measured from the previous call's lower bound.
            result = em.fit(
                model, X, self.params_, weights=weights, tol=self.tol, max_iter=self.max_iter,
                progress=progress, reg_covar=self.reg_covar,
                lower_bound=self.lower_bound_ if np.isfinite(self.lower_bound_) else -np.inf,
            )
            self.fit_result_ = em.RestartsResult(
                result, jnp.asarray(0), jax.tree_util.tree_map(lambda a: a[None], result)
            )
        else:
            # With every initial parameter given, all restarts would be identical.
            n_init = 1 if len(init_kwargs) == 3 else self.n_init
            key = jax.random.PRNGKey(_seed(self.random_state))
            self.fit_result_ = em.fit_restarts(
                model, X, key, n_components=self.n_components, n_init=n_init,
                init_method=self.init_params, weights=weights, tol=self.tol,
                max_iter=self.max_iter, init_kwargs=init_kwargs, progress=progress,
                reg_covar=self.reg_covar,
            )
        self._set_fitted(self.fit_result_.best, X.shape[1])
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

    def _set_fitted(self, best: em.FitResult, n_features: int):
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
                stacklevel=3,
            )
        elif not self.converged_ and self.max_iter > 0:
            warnings.warn(
                "Best performing initialization did not converge. Try different init "
                "parameters, or increase max_iter, tol, or check for degenerate data.",
                ConvergenceWarning,
                stacklevel=3,
            )

    def _store_params(self, params: gmm.GMMParams):
        self.params_ = params
        self.weights_ = np.asarray(params.weights)
        self.means_ = np.asarray(params.means)
        self.covariances_ = np.asarray(params.covariances)
        self.precisions_cholesky_ = np.asarray(params.precisions_cholesky)
        self.precisions_ = np.asarray(
            precisions_from_cholesky(params.precisions_cholesky, params.covariance_type)
        )
        self.n_features_in_ = self.means_.shape[1]

    # ----------------------------------------------------------------- persistence
    def save(self, path):
        """Write the fitted model to ``path`` (``.npz``; see :func:`jaxem.io.save`)."""
        self._check_is_fitted()
        return io.save(path, self)

    @classmethod
    def load(cls, path) -> GaussianMixture:
        """A fitted estimator from a file written by :meth:`save` or :func:`jaxem.save`.

        The file is validated (see :func:`jaxem.io.read`); the estimator predicts exactly
        what the saved one did. ``lower_bounds_`` (the history) is not stored.
        """
        params, info = io.read(path)
        gm = cls(params.n_components, covariance_type=params.covariance_type)
        gm._store_params(jax.tree_util.tree_map(jnp.asarray, params))
        gm.converged_ = info.get("converged", True)
        gm.n_iter_ = info.get("n_iter", 0)
        gm.lower_bound_ = info.get("lower_bound", float("nan"))
        gm.lower_bounds_ = np.asarray([], params.means.dtype)
        return gm

    def fit_predict(self, X, y=None, sample_weight=None):
        """Fit, then return the (N,) component labels of ``X``."""
        return self.fit(X, y, sample_weight=sample_weight).predict(X)

    # ----------------------------------------------------------------- inference
    def _log_joint(self, X) -> jax.Array:
        X = self._check_X(X)  # raises NotFittedError before params_ is touched
        return _log_joint(self.params_, X)

    def score_samples(self, X):
        """(N,) log densities ``log p(x_n)``."""
        return np.asarray(jax.nn.logsumexp(self._log_joint(X), axis=1))

    def score(self, X, y=None, sample_weight=None):
        """Mean (optionally weighted) log-likelihood per sample."""
        s = self.score_samples(X)
        if sample_weight is None:
            return float(np.mean(s))
        _validation.check_sample_weight(sample_weight, s.shape[0])
        return float(np.average(s, weights=np.asarray(sample_weight, float)))

    def predict(self, X):
        """(N,) index of the most probable component for each sample."""
        return np.asarray(jnp.argmax(self._log_joint(X), axis=1))

    def predict_proba(self, X):
        """(N, K) responsibilities ``p(z_n = k | x_n)``."""
        return np.asarray(jnp.exp(elbo.posterior(self._log_joint(X))))

    def sample(self, n_samples=1):
        """Draw ``n_samples`` samples; returns ``(X, y)`` sorted by component, as scikit-learn."""
        self._check_is_fitted()
        _validation.check_int(n_samples, "n_samples", 0)
        if n_samples < 1:
            raise ValueError(f"Invalid value for 'n_samples': {n_samples} . The sampling "
                             "requires at least one sample.")
        key = jax.random.PRNGKey(_seed(self.random_state))
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
