"""``jaxem.GaussianMixtureIC``: a Gaussian mixture that chooses K and the covariance type.

scikit-learn has no estimator that picks the number of components (its users have asked:
scikit-learn issues #19338 and #4580); its docs loop over K and compare ``bic``. This one
runs that loop as :func:`jaxem.select` — one compiled program per covariance type, or one
for all of them on small data — and then
behaves as the chosen :class:`jaxem.GaussianMixture` (``predict``, ``score``, ``sample``,
``save``, ...), with the whole criteria table kept as ``criteria_``. Named after
scikit-learn's ``LassoLarsIC``, which chooses its regularisation by an information criterion.
"""

from __future__ import annotations

import numpy as np

from jaxem import _validation, em, search
from jaxem._cache import enable_persistent_cache
from jaxem.estimator import GaussianMixture, _seed


def _print_type(done) -> None:
    """``verbose``: a line per covariance type as its program finishes."""
    best = int(np.argmin(np.where(np.isfinite(done.bic), done.bic, np.inf)))
    print(f"[{done.index + 1}/{done.n_types}] {done.covariance_type}: K={list(done.ks)} in "
          f"{done.seconds:.1f} s; lowest BIC {done.bic[best]:.1f} at K={done.ks[best]}",
          flush=True)


class GaussianMixtureIC(GaussianMixture):
    """Gaussian mixture whose K and covariance type are chosen by BIC, AIC or ICL.

    Args:
      n_components: the numbers of components to try (an int or a sequence; default 1..6).
      covariance_type: a type, a sequence of types, or ``"all"`` (default).
      criterion: ``"bic"`` (default), ``"aic"`` or ``"icl"`` (lower is better).
      init_params: ``"k-means++"`` (default), another method or a tuple of methods; see
        :func:`jaxem.select`'s ``init_method``.
      tol, reg_covar, max_iter, n_init, random_state, chunk_size: as
        :class:`jaxem.GaussianMixture`'s, for every candidate, except the defaults of
        ``tol`` (1e-6) and ``n_init`` (None: 64 restarts up to 1,024 rows, halved as the
        rows double, at least 4; :func:`jaxem.search.default_n_init`), which
        are :func:`jaxem.select`'s: chosen to find mclust's optima (README "Model search").
      verbose: ``>= 1`` prints a line per covariance type as its program finishes (its
        lowest BIC), then the criterion's table and the choice.
      screen: ``(iterations, kept)`` or ``None``: see :func:`jaxem.select`.

    Attributes (after ``fit``), besides those of :class:`jaxem.GaussianMixture` for the
    chosen model:
      n_components_: the chosen K.
      covariance_type_: the chosen covariance type.
      criteria_: dict with ``"n_components"`` (the ks), ``"covariance_type"`` (the types) and
        (len(ks), len(types)) tables ``"bic"``, ``"aic"``, ``"icl"``, ``"log_likelihood"``,
        ``"n_parameters"``, ``"converged"``, ``"n_iter"``.
      search_: the :class:`jaxem.search.SearchResult` (every cell's parameters too).
    """

    def __init__(
        self,
        n_components=(1, 2, 3, 4, 5, 6),
        *,
        covariance_type="all",
        criterion="bic",
        tol=search.SEARCH_TOL,
        reg_covar=1e-6,
        max_iter=100,
        n_init=None,
        init_params="k-means++",
        random_state=None,
        verbose=0,
        chunk_size=None,
        screen=search.SEARCH_SCREEN,
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.criterion = criterion
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.random_state = random_state
        self.verbose = verbose
        self.chunk_size = chunk_size
        self.screen = screen

    def _check_parameters(self):
        search.check_ks(self.n_components)
        search.check_covariance_types(self.covariance_type)
        if self.criterion not in search.CRITERIA:
            raise ValueError(f"criterion must be one of {search.CRITERIA}, got "
                             f"{self.criterion!r}")
        _validation.check_real(self.tol, "tol")
        _validation.check_real(self.reg_covar, "reg_covar", minimum=0.0)
        _validation.check_int(self.max_iter, "max_iter", 0)
        if self.n_init is not None:
            _validation.check_int(self.n_init, "n_init", 1)
        for method in ((self.init_params,) if isinstance(self.init_params, str)
                       else self.init_params):
            _validation.check_init_method(method)
        _validation.check_int(self.verbose, "verbose", 0)
        if self.chunk_size is not None:
            _validation.check_int(self.chunk_size, "chunk_size", 1)

    # The warm start and the fixed initial parameters of GaussianMixture do not apply here.
    warm_start = False
    verbose_interval = 10
    weights_init = means_init = precisions_init = None

    def fit(self, X, y=None, sample_weight=None):
        """Fit every candidate (:func:`jaxem.select`) and keep the best by ``criterion``.

        Args:
          X: (N, D) data.
          y: ignored (scikit-learn API).
          sample_weight: optional (N,) non-negative weights.

        Returns:
          self, fitted as the chosen mixture.
        """
        self._check_parameters()
        enable_persistent_cache()
        ks = search.check_ks(self.n_components)
        X = self._check_X(X, min_samples=ks[-1], reset=True)
        _validation.check_sample_weight(sample_weight, X.shape[0])
        result = search.select(
            X, ks, self.covariance_type, criterion=self.criterion, n_init=self.n_init,
            init_method=self.init_params, weights=sample_weight, tol=self.tol,
            max_iter=self.max_iter, reg_covar=self.reg_covar, seed=_seed(self.random_state),
            chunk_size=self.chunk_size, progress=_print_type if self.verbose else None,
            screen=self.screen,
        )
        self.search_ = result
        self.criteria_ = {
            "n_components": np.asarray(result.ks), "covariance_type": list(
                result.covariance_types),
            **{name: np.array(getattr(result, name)) for name in
               ("bic", "aic", "icl", "log_likelihood", "n_parameters", "converged", "n_iter")},
        }
        k, cov_type = result.best
        self.n_components_, self.covariance_type_ = k, cov_type
        i, j = result.ks.index(k), result.covariance_types.index(cov_type)
        history = result.lower_bounds[k, cov_type]
        best = em.FitResult(
            params=result.params[k, cov_type],
            lower_bound=history[-1] if len(history) else -np.inf,
            lower_bounds=history, n_iter=result.n_iter[i, j],
            converged=result.converged[i, j], failed=result.failed[i, j],
        )
        if self.verbose:
            print(f"{result.criterion.upper()} (lower is better), rows K {list(result.ks)}, "
                  f"columns {list(result.covariance_types)}:\n{result.table()}")
            print(f"chosen: K={k}, covariance_type={cov_type!r}")
        self._set_fitted(best, X.shape[1])
        return self

    def _saved_settings(self) -> dict:
        """The settings of the chosen model as a :class:`jaxem.GaussianMixture`'s (what
        :meth:`load` builds): the chosen K and type, this search's other parameters (the
        first init method when several were searched)."""
        settings = super()._saved_settings()
        settings.pop("criterion", None)
        methods = self.init_params
        settings["init_params"] = methods if isinstance(methods, str) else methods[0]
        settings.update(n_components=int(self.n_components_),
                        covariance_type=self.covariance_type_)
        return settings

    @classmethod
    def load(cls, path) -> GaussianMixture:
        """The saved mixture as a :class:`jaxem.GaussianMixture` (the file holds the chosen
        model, not the search)."""
        return GaussianMixture.load(path)
