"""jaxem: Expectation-Maximization in JAX, with the Gaussian mixture as its flagship."""

from jaxem import (
    blocks,
    differentiable,
    distributed,
    elbo,
    gmm,
    io,
    kmeans,
    online,
    search,
    sgd,
    streamed,
    tuning,
)
from jaxem._cache import enable_compilation_cache
from jaxem._validation import PrecisionWarning
from jaxem.differentiable import (
    GradientWarning,
    envelope_log_likelihood,
    fit_implicit,
    fit_unrolled,
)
from jaxem.em import FitResult, RestartsResult, fit, fit_batch, fit_restarts
from jaxem.gmm import GaussianMixtureModel, GMMParams, GMMStats
from jaxem.io import ModelFileError, load, save
from jaxem.search import SearchResult, select
from jaxem.sgd import SGDResult, fit_sgd

__version__ = "0.1.0"

# The scikit-learn estimators are imported on first use: their bases come from scikit-learn,
# whose import (about 0.7 s) the functional API and the command line's search do not need.
_LAZY = {
    "ConvergenceWarning": "jaxem.estimator",
    "GaussianMixture": "jaxem.estimator",
    "estimator": "jaxem.estimator",
    "GaussianMixtureIC": "jaxem.gaussian_mixture_ic",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        value = module if name == "estimator" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxem' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "ConvergenceWarning",
    "FitResult",
    "GMMParams",
    "GMMStats",
    "GaussianMixture",
    "GaussianMixtureIC",
    "GaussianMixtureModel",
    "GradientWarning",
    "ModelFileError",
    "PrecisionWarning",
    "RestartsResult",
    "SGDResult",
    "SearchResult",
    "__version__",
    "blocks",
    "differentiable",
    "distributed",
    "elbo",
    "enable_compilation_cache",
    "envelope_log_likelihood",
    "fit",
    "fit_batch",
    "fit_implicit",
    "fit_restarts",
    "fit_sgd",
    "fit_unrolled",
    "gmm",
    "io",
    "kmeans",
    "load",
    "online",
    "save",
    "search",
    "select",
    "sgd",
    "streamed",
    "tuning",
]
