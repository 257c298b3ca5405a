"""jaxem: Expectation-Maximization in JAX, with the Gaussian mixture as its flagship."""

from jaxem import differentiable, elbo, gmm, io, kmeans, search, sgd
from jaxem.differentiable import (
    GradientWarning,
    envelope_log_likelihood,
    fit_implicit,
    fit_unrolled,
)
from jaxem.em import FitResult, RestartsResult, fit, fit_batch, fit_restarts
from jaxem.estimator import ConvergenceWarning, GaussianMixture, PrecisionWarning
from jaxem.gaussian_mixture_ic import GaussianMixtureIC
from jaxem.gmm import GaussianMixtureModel, GMMParams, GMMStats
from jaxem.io import ModelFileError, load, save
from jaxem.search import SearchResult, select
from jaxem.sgd import SGDResult, fit_sgd

__version__ = "0.1.0"

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
    "differentiable",
    "elbo",
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
    "save",
    "search",
    "select",
    "sgd",
]
