"""jaxem: Expectation-Maximization in JAX, with the Gaussian mixture as its flagship."""

from jaxem import elbo, gmm, kmeans
from jaxem.em import FitResult, RestartsResult, fit, fit_restarts
from jaxem.estimator import ConvergenceWarning, GaussianMixture
from jaxem.gmm import GaussianMixtureModel, GMMParams, GMMStats

__version__ = "0.1.0"

__all__ = [
    "ConvergenceWarning",
    "FitResult",
    "GMMParams",
    "GMMStats",
    "GaussianMixture",
    "GaussianMixtureModel",
    "RestartsResult",
    "__version__",
    "elbo",
    "fit",
    "fit_restarts",
    "gmm",
    "kmeans",
]
