"""Eager input checks, run in Python before anything is traced or compiled.

Every check raises ``ValueError``/``TypeError`` naming the argument and what was wrong. They
are skipped (return the input unchanged) when handed JAX tracers, so the pure functions that
call them stay usable under ``jit``/``vmap``/``grad``.
"""

from __future__ import annotations

import numbers
import os
import warnings

import jax
import numpy as np

from jaxem._linalg import COVARIANCE_TYPES, covariance_shape

INIT_METHODS = ("kmeans", "k-means++", "random", "random_from_data")
MOMENTS = ("auto", "product", "centred")


def is_traced(*arrays) -> bool:
    """True if any argument is a JAX tracer (we are inside jit/vmap/grad)."""
    return any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(arrays))


def under_transformation() -> bool:
    """True inside any JAX trace (jit, vmap, grad, ...), even when every argument at hand is
    concrete (closed over by the caller's function)."""
    try:
        from jax._src import core
    except ImportError:  # pragma: no cover - a JAX without it: assume a trace
        return True
    return not getattr(core, "trace_state_clean", lambda: False)()


def check_covariance_type(covariance_type) -> str:
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(
            f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}"
        )
    return covariance_type


def check_init_method(method) -> str:
    if method not in INIT_METHODS:
        raise ValueError(f"init_params must be one of {INIT_METHODS}, got {method!r}")
    return method


def check_moments(moments) -> str:
    if moments not in MOMENTS:
        raise ValueError(f"moments must be one of {MOMENTS}, got {moments!r}")
    return moments


def check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(value, name: str, minimum: float | None = None,
               allow_negative_infinity: bool = False) -> float:
    if is_traced(value):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real | np.ndarray | jax.Array):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got an array of shape {np.shape(value)}")
    v = float(np.asarray(value))
    if not (np.isfinite(v) or (allow_negative_infinity and v == -np.inf)):
        raise ValueError(f"{name} must be finite, got {v}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return value


def _is_sparse(x) -> bool:
    # scipy.sparse matrices and arrays, without importing scipy (an optional peer).
    return type(x).__module__.startswith("scipy.sparse") and hasattr(x, "toarray")


def check_data(x, name: str = "x", min_samples: int = 1):
    """2-D, real, numeric, finite, with at least ``min_samples`` rows and one column.

    Returns the data as an array: NumPy object arrays of numbers are converted to float64
    (as scikit-learn's ``check_array`` does); JAX arrays and tracers come back unchanged.
    Messages carry scikit-learn's wording where it has one, so code and tests written
    against scikit-learn recognise them.
    """
    if is_traced(x):
        return x
    if _is_sparse(x):
        raise TypeError(
            f"{name} is a sparse {type(x).__name__}: sparse input is not supported; pass a "
            f"dense array (e.g. {name}.toarray())"
        )
    arr = x if isinstance(x, jax.Array) else np.asarray(x)
    if arr.dtype == object:
        try:
            arr = np.asarray(arr, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a numeric array: {e}") from None
    if np.iscomplexobj(arr):
        raise ValueError(f"Complex data not supported: {name} has dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        hint = ""
        if arr.ndim == 1:
            hint = (f" Reshape your data either using {name}.reshape(-1, 1) if it has a "
                    f"single feature or {name}.reshape(1, -1) if it contains a single sample.")
        raise ValueError(
            f"{name} must be 2-D (n_samples, n_features), got an array of shape "
            f"{arr.shape}.{hint}"
        )
    if arr.shape[1] < 1:
        raise ValueError(
            f"{name} has 0 feature(s) (shape={arr.shape}) while a minimum of 1 is required."
        )
    if arr.shape[0] < 1:
        raise ValueError(
            f"{name} has 0 sample(s) (shape={arr.shape}) while a minimum of 1 is required."
        )
    if arr.shape[0] < min_samples:
        raise ValueError(
            f"{name} has {arr.shape[0]} samples but at least {min_samples} are needed "
            f"(Expected n_samples >= n_components but got n_components = {min_samples}, "
            f"n_samples = {arr.shape[0]})"
        )
    if not all_finite(arr):
        bad = int(np.sum(~np.isfinite(np.asarray(arr))))
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s)")
    return arr


_jit_all_finite = jax.jit(lambda a: jax.numpy.all(jax.numpy.isfinite(a)))


def all_finite(x, block_rows: int = 1 << 18) -> bool:
    """Whether every entry is finite, without an N×D temporary (blocks on the host, one
    fused reduction for arrays already on a device)."""
    if isinstance(x, jax.Array):
        # A concrete array closed over inside someone's jit is still checked eagerly.
        with jax.ensure_compile_time_eval():
            return bool(_jit_all_finite(x))
    arr = np.asarray(x)
    return all(np.isfinite(arr[i:i + block_rows]).all() for i in range(0, len(arr), block_rows))


def physical_memory() -> int:
    """Bytes of memory of this machine (a conservative 16 GiB where the OS will not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX systems
        return 16 * 2**30


def check_allocation(n_bytes: int, what: str, hint: str = "") -> None:
    """Refuse, before allocating, an array that could not fit: an allocation that fails
    inside XLA aborts the process instead of raising."""
    limit = physical_memory() // 2
    if n_bytes > limit:
        raise ValueError(
            f"{what} would need {n_bytes / 2**30:.3g} GiB, more than half of this machine's "
            f"memory ({physical_memory() / 2**30:.3g} GiB){'; ' + hint if hint else ''}"
        )


def check_sample_weight(weights, n_samples: int, name: str = "sample_weight"):
    if weights is None or is_traced(weights):
        return weights
    w = np.asarray(weights)
    if not np.issubdtype(w.dtype, np.number) or np.iscomplexobj(w):
        raise TypeError(f"{name} must be a real numeric array, got dtype {w.dtype}")
    if w.shape != (n_samples,):
        raise ValueError(f"{name} must have shape ({n_samples},), got {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if np.any(w < 0):
        raise ValueError(f"{name} must be non-negative, got minimum {w.min()}")
    if not np.sum(w) > 0:
        raise ValueError(f"{name} are all zero: at least one weight must be positive")
    return weights


# The wording of the three checks below is scikit-learn's (sklearn.mixture), so that users
# and their tests meet the same messages for the same mistakes.
def check_weights_init(weights, n_components: int, name: str = "weights_init"):
    w = np.asarray(weights, dtype=float)
    if w.shape != (n_components,):
        raise ValueError(
            f"The parameter '{name}' should have the shape of ({n_components},), but got "
            f"{w.shape}"
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0) or np.any(w > 1):
        raise ValueError(
            f"The parameter '{name}' should be in the range [0, 1], but got max value "
            f"{w.max():.5f}, min value {w.min():.5f}"
        )
    if not np.allclose(w.sum(), 1.0, rtol=0, atol=1e-6):
        raise ValueError(
            f"The parameter '{name}' should be normalized, but got sum({name}) = {w.sum():.5f}"
        )
    return weights


def check_means_init(means, n_components: int, n_features: int, name: str = "means_init"):
    m = np.asarray(means, dtype=float)
    if m.shape != (n_components, n_features):
        raise ValueError(
            f"The parameter '{name}' should have the shape of ({n_components}, {n_features}), "
            f"but got {m.shape}"
        )
    if not np.all(np.isfinite(m)):
        raise ValueError(f"The parameter '{name}' contains NaN or infinite values")
    return means


def check_spd(matrices, covariance_type: str, n_components: int, n_features: int, name: str):
    """Shape for the covariance type, finite, symmetric and positive definite (or positive)."""
    a = np.asarray(matrices, dtype=float)
    expected = covariance_shape(covariance_type, n_components, n_features)
    if a.shape != expected:
        raise ValueError(
            f"The parameter '{name}' should have the shape of {expected}, but got {a.shape} "
            f"(covariance_type={covariance_type!r})"
        )
    if not np.all(np.isfinite(a)):
        raise ValueError(f"The parameter '{name}' contains NaN or infinite values")
    what = "precision" if "precision" in name else "covariance"
    if covariance_type in ("diag", "spherical"):
        if np.any(a <= 0):
            raise ValueError(
                f"'{covariance_type} {what}' should be positive ({name} has minimum {a.min()})"
            )
        return matrices
    stack = a[None] if covariance_type == "tied" else a
    for k, m in enumerate(stack):
        symmetric = np.allclose(m, m.T, rtol=1e-6, atol=1e-8 * max(1.0, np.abs(m).max()))
        if not symmetric or np.linalg.eigvalsh(m).min() <= 0:
            where = name if covariance_type == "tied" else f"{name}[{k}]"
            raise ValueError(
                f"'{covariance_type} {what}' should be symmetric, positive-definite "
                f"({where} is not)"
            )
    return matrices


class PrecisionWarning(UserWarning):
    """float64 data fitted in float32 lose digits that matter (an offset that dwarfs the
    spread): enable JAX's x64 mode to fit in float64."""


FLOAT32_SQRT_MAX = float(np.sqrt(np.float64(np.finfo(np.float32).max)))  # ~1.8e19
X64_HINT = ("fit in float64: jax.config.update('jax_enable_x64', True) with float64 X "
            "(the command: --float64)")


def check_float32_fits(X, name: str = "X") -> None:
    """Before casting data to float32: refuse values beyond its range, and warn when the
    data sit so far from the origin, relative to their spread, that float32 keeps too few
    of the digits that separate the samples."""
    x = np.asarray(X)
    if x.dtype.itemsize <= 4 and x.dtype.kind == "f":
        return
    biggest = float(np.max(np.abs(x)))
    if biggest > float(np.finfo(np.float32).max):
        raise ValueError(f"{name} has values up to {biggest:.3g}, beyond the float32 range "
                         f"(±{np.finfo(np.float32).max:.3g}): rescale the data, or {X64_HINT}")
    spread = np.std(x, axis=0)
    offset = np.abs(np.mean(x, axis=0))
    reach = float(np.max(np.abs(x - np.mean(x, axis=0))))
    if reach > FLOAT32_SQRT_MAX / 1e3:
        raise ValueError(f"{name} spreads {reach:.3g} from its mean: squared distances "
                         f"overflow float32 (3.4e38). Rescale the data, or {X64_HINT}")
    lost = np.finfo(np.float32).eps * offset / np.where(spread > 0, spread, np.inf)
    if np.max(lost) > 1e-4:
        j = int(np.argmax(lost))
        warnings.warn(
            f"{name} is float64 but is fitted in float32, and feature {j} sits at "
            f"{offset[j]:.3g} with a spread of {spread[j]:.3g}: float32 resolves it only to "
            f"{np.max(lost):.1e} of its spread. To keep the digits, {X64_HINT}",
            PrecisionWarning, stacklevel=4)
