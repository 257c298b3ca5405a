"""Safe save/load of fitted Gaussian mixtures: ``.npz``, no pickle, validated on load.

File layout (format version 3; versions 1 and 2, without ``settings`` and ``feature_names``,
are still read): arrays ``format`` (``"jaxem-gmm"``), ``format_version``,
``covariance_type``, ``weights`` (K,), ``means`` (K, D), ``covariances`` and
``precisions_cholesky`` (the shape of the covariance type), optional scalars ``converged``,
``n_iter``, ``lower_bound``, optional ``feature_names`` (D,) strings, and optional
``settings``: the estimator's constructor parameters (``n_init``, ``random_state``, ...) as
one JSON object of numbers, strings, booleans and nulls. Members are checked from the zip
directory and their ``.npy`` headers before any data are read. Strings are stored as NumPy
unicode arrays, so :func:`load` reads with ``allow_pickle=False``. Writes go to a temporary
file in the same folder renamed into place: a crash never leaves a half-written model under
the final name.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from jaxem import gmm
from jaxem._linalg import COVARIANCE_TYPES, covariance_shape

FORMAT = "jaxem-gmm"
FORMAT_VERSION = 3  # 2 added the optional feature_names, 3 the optional settings
_READABLE_VERSIONS = (1, 2, 3)
_ARRAYS = ("weights", "means", "covariances", "precisions_cholesky")


class ModelFileError(ValueError):
    """A model file that cannot be trusted: corrupt, truncated, tampered or of another kind."""


def save(path, model, *, settings: dict | None = None, converged=None, n_iter=None,
         lower_bound=None, feature_names=None) -> Path:
    """Write a fitted model: :class:`jaxem.gmm.GMMParams` or a fitted
    :class:`jaxem.GaussianMixture` (whose constructor parameters, ``converged_``,
    ``n_iter_``, ``lower_bound_`` and ``feature_names_in_`` are kept too).

    Args:
      path: the file (``.npz`` is appended when missing, as NumPy does).
      model: the parameters or a fitted estimator.
      settings, converged, n_iter, lower_bound, feature_names: for parameters, what to
        store beside them (an estimator supplies its own): ``settings`` is a dict of
        constructor parameters (str keys; numbers, strings, booleans or None), restored by
        :meth:`jaxem.GaussianMixture.load`.

    Returns:
      The path written.
    """
    if hasattr(model, "params_"):
        settings = model._saved_settings()
        converged, n_iter, lower_bound = model.converged_, model.n_iter_, model.lower_bound_
        feature_names = getattr(model, "feature_names_in_", None)
        model = model.params_
    elif type(model).__name__ in ("GaussianMixture", "GaussianMixtureIC"):
        raise ValueError(f"the {type(model).__name__} is not fitted yet; call fit before save")
    if not isinstance(model, gmm.GMMParams):
        raise TypeError("model must be jaxem.gmm.GMMParams or a fitted jaxem.GaussianMixture, "
                        f"got {type(model).__name__}")
    info = {}
    if converged is not None:
        info["converged"] = np.bool_(converged)
    if n_iter is not None:
        info["n_iter"] = np.int64(n_iter)
    if lower_bound is not None:
        info["lower_bound"] = np.float64(lower_bound)
    if feature_names is not None:
        info["feature_names"] = np.asarray([str(n) for n in feature_names])
    if settings is not None:
        info["settings"] = np.array(_settings_json(settings))
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    arrays = {name: np.asarray(getattr(model, name)) for name in _ARRAYS}
    arrays.update(format=np.array(FORMAT), format_version=np.array(FORMAT_VERSION),
                  covariance_type=np.array(model.covariance_type), **info)
    _check(arrays, str(path))  # never write what load would refuse
    if not path.parent.is_dir():  # said of the user's path, before a temporary file exists
        raise FileNotFoundError(f"cannot write {path}: no such folder {path.parent}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the model from others
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path) -> gmm.GMMParams:
    """Read and validate a model file; the parameters (see :func:`read` for the rest)."""
    return read(path)[0]


def read(path) -> tuple[gmm.GMMParams, dict]:
    """Read and validate a model file.

    Returns:
      ``(params, info)``: the :class:`jaxem.gmm.GMMParams` and a dict of the optional scalars
      present (``converged``, ``n_iter``, ``lower_bound``).

    Raises:
      FileNotFoundError: no such file.
      ModelFileError: (a ``ValueError``) the file is not a valid jaxem model: not an npz,
        truncated, of another format or version, missing or extra arrays, inconsistent
        shapes, weights not summing to one, non-finite values, precisions not positive
        definite, or precisions that do not match the covariances.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        arrays = _read_members(path)
    except ModelFileError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a damaged file provokes is reported
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ModelFileError(
            f"{path}: not a readable .npz model file ({type(e).__name__}: {reason})") from None
    _check(arrays, str(path))
    params = gmm.GMMParams(*(arrays[name] for name in _ARRAYS),
                           covariance_type=str(arrays["covariance_type"]))
    info = {}
    if "converged" in arrays:
        info["converged"] = bool(arrays["converged"])
    if "n_iter" in arrays:
        info["n_iter"] = int(arrays["n_iter"])
    if "lower_bound" in arrays:
        info["lower_bound"] = float(arrays["lower_bound"])
    if "feature_names" in arrays:
        info["feature_names"] = [str(n) for n in arrays["feature_names"]]
    if "settings" in arrays:
        info["settings"] = _parse_settings(str(arrays["settings"]), str(path))
    return params, info


def storable_setting(value) -> bool:
    """A setting a model file can hold: None, a bool, a finite number or a string."""
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, bool | int | str)


def _plain(value):
    """A NumPy scalar as the Python scalar it holds; anything else as it is."""
    return value.item() if isinstance(value, np.generic) else value


def storable_settings(settings: dict) -> dict:
    """The part of ``settings`` (e.g. an estimator's ``get_params()``) a model file can
    hold (:func:`storable_setting`; NumPy scalars as Python ones): arrays and other objects
    are left out."""
    plain = {name: _plain(value) for name, value in settings.items()}
    return {name: value for name, value in plain.items() if storable_setting(value)}


def _settings_json(settings: dict) -> str:
    if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
        raise TypeError(f"settings must be a dict with str keys, got {settings!r}")
    for name, value in settings.items():
        if not storable_setting(_plain(value)):
            raise TypeError(f"settings[{name!r}] = {value!r}: a model file holds None, "
                            "booleans, finite numbers and strings only")
    return json.dumps(storable_settings(settings), sort_keys=True)


def _parse_settings(text: str, where: str) -> dict:
    try:
        settings = json.loads(text)
    except ValueError as e:
        raise ModelFileError(f"{where}: settings are not valid JSON ({e})") from None
    if not isinstance(settings, dict) or not all(
            isinstance(k, str) and storable_setting(v) for k, v in settings.items()):
        raise ModelFileError(f"{where}: settings must be a JSON object of numbers, strings, "
                             "booleans and nulls")
    return settings


_ALLOWED = (*_ARRAYS, "format", "format_version", "covariance_type", "converged", "n_iter",
            "lower_bound", "feature_names", "settings")
# Largest array a model file may declare: K·D² float64 for K = D = 4096 is 2^36 bytes; a
# member declaring more is refused from its header, before anything is decompressed.
_MAX_MEMBER_BYTES = 2**36


def read_npy_header(f) -> tuple[tuple, bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` stream ``f``, read from its header
    alone, leaving ``f`` at the start of the data (so a caller can judge the size first)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _read_members(path: Path) -> dict:
    """The arrays of an ``.npz``, each member checked from the zip directory and its
    ``.npy`` header (name, dtype, declared size) before any data are read or decompressed:
    a small file cannot make the reader allocate much."""
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not a readable .npz model file (not a zip archive)")
    arrays = {}
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        unexpected = sorted(n for n in names if n.removesuffix(".npy") not in _ALLOWED
                            or not n.endswith(".npy"))
        if unexpected:
            raise ModelFileError(f"{path}: unexpected array(s) "
                                 f"{[n.removesuffix('.npy') for n in unexpected]}")
        if len(set(names)) != len(names):
            raise ModelFileError(f"{path}: an array is stored twice")
        for info in infos:
            name = info.filename.removesuffix(".npy")
            with zf.open(info) as f:
                shape, fortran, dtype = read_npy_header(f)
                if dtype.hasobject or dtype.kind not in "fiubU":
                    raise ModelFileError(f"{path}: {name} has dtype {dtype}, which a model "
                                         "file never holds")
                n_bytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                if n_bytes > _MAX_MEMBER_BYTES:
                    raise ModelFileError(f"{path}: {name} declares shape {shape} "
                                         f"({n_bytes / 2**30:.3g} GiB), too large for a model")
                count = int(np.prod(shape))
                data = f.read(n_bytes)
                if len(data) != n_bytes:
                    raise ModelFileError(f"{path}: {name} is truncated")
                arr = np.frombuffer(data, dtype=dtype, count=count)
                order = "F" if fortran else "C"
                arrays[name] = arr.reshape(shape, order=order).copy()
    return arrays


def _check(arrays: dict, where: str) -> None:
    def bad(msg):
        raise ModelFileError(f"{where}: {msg}")

    if "format" not in arrays or arrays["format"].shape != () or str(arrays["format"]) != FORMAT:
        bad(f"not a jaxem model file (no format marker {FORMAT!r})")
    version = arrays.get("format_version")
    if version is None or version.shape != () or not np.issubdtype(version.dtype, np.integer):
        bad("missing or malformed format_version")
    if int(version) not in _READABLE_VERSIONS:
        bad(f"format version {int(version)} is not supported (this jaxem reads "
            f"{', '.join(map(str, _READABLE_VERSIONS))})")
    allowed = set(_ALLOWED)
    missing = [n for n in (*_ARRAYS, "covariance_type") if n not in arrays]
    if missing:
        bad(f"missing array(s) {missing}")
    extra = sorted(set(arrays) - allowed)
    if extra:
        bad(f"unexpected array(s) {extra}")
    cov_type = str(arrays["covariance_type"])
    if arrays["covariance_type"].shape != () or cov_type not in COVARIANCE_TYPES:
        bad(f"unknown covariance_type {cov_type!r}")
    for name in _ARRAYS:
        a = arrays[name]
        if a.dtype not in (np.float32, np.float64):
            bad(f"{name} has dtype {a.dtype}, expected float32 or float64")
        if not np.all(np.isfinite(a)):
            bad(f"{name} contains NaN or infinite values")
    w, means = arrays["weights"], arrays["means"]
    if (w.ndim != 1 or w.shape[0] < 1 or means.ndim != 2 or means.shape[0] != w.shape[0]
            or means.shape[1] < 1):
        bad(f"weights {w.shape} and means {means.shape} do not describe K >= 1 components "
            "in D >= 1 features")
    k, d = means.shape
    expected = covariance_shape(cov_type, k, d)
    for name in ("covariances", "precisions_cholesky"):
        if arrays[name].shape != expected:
            bad(f"{name} has shape {arrays[name].shape}, expected {expected} for "
                f"{cov_type!r} with K={k}, D={d}")
    tol = 1e-4 if w.dtype == np.float32 else 1e-10
    if np.any(w < 0) or abs(float(np.sum(w, dtype=np.float64)) - 1.0) > tol:
        bad(f"weights must be non-negative and sum to 1 (sum {float(np.sum(w)):.8g})")
    _check_precisions(arrays["covariances"], arrays["precisions_cholesky"], cov_type, d, bad)
    for name, kind in (("converged", np.bool_), ("n_iter", np.integer),
                       ("lower_bound", np.floating)):
        if name in arrays and (arrays[name].shape != ()
                               or not np.issubdtype(arrays[name].dtype, kind)):
            bad(f"{name} must be a scalar of kind {kind.__name__}")
    if "feature_names" in arrays:
        names = arrays["feature_names"]
        if names.dtype.kind != "U" or names.shape != (d,) or len(set(names.tolist())) != d:
            bad(f"feature_names must be {d} distinct strings, got {names.dtype} {names.shape}")
    if "settings" in arrays and (arrays["settings"].dtype.kind != "U"
                                 or arrays["settings"].shape != ()):
        bad("settings must be one string")


def _check_precisions(cov, prec_chol, cov_type, d, bad) -> None:
    """Precisions positive definite, and Pᵀ Σ P = I (they belong to these covariances)."""
    cov64, p64 = np.asarray(cov, np.float64), np.asarray(prec_chol, np.float64)
    if cov_type in ("diag", "spherical"):
        if np.any(cov64 <= 0) or np.any(p64 <= 0):
            bad("covariances and precisions must be positive")
        product = cov64 * p64**2
    else:
        mats_c = cov64.reshape(-1, d, d)
        mats_p = p64.reshape(-1, d, d)
        if not np.allclose(mats_p, np.triu(mats_p)) or np.any(
                np.diagonal(mats_p, axis1=1, axis2=2) <= 0):
            bad("precisions_cholesky must be upper triangular with a positive diagonal "
                "(positive-definite precisions)")
        try:
            np.linalg.cholesky(mats_c)
        except np.linalg.LinAlgError:
            bad("covariances are not positive definite")
        # Pᵀ Σ P = I  ⟺  P Pᵀ = Σ⁻¹. Unlike P Pᵀ Σ, this product is invariant under a
        # rescaling of the features, so its rounding grows with the conditioning of the
        # correlations, not with the features' scales: diag(1e8, 1e-8) is perfectly
        # conditioned here, and a tampered entry cannot hide in a tolerance scaled by 1e16.
        product = np.einsum("kji,kjl,klm->kim", mats_p, mats_c, mats_p)
    eps = float(np.finfo(cov.dtype).eps)
    if cov_type in ("diag", "spherical"):
        err, cond = np.abs(product - 1.0), 1.0
    else:
        err = np.abs(product - np.eye(d)).max(axis=(1, 2))
        scale = 1.0 / np.sqrt(np.diagonal(mats_c, axis1=1, axis2=2))
        cond = np.linalg.cond(scale[:, :, None] * mats_c * scale[:, None, :])
    if np.any(err > 100 * d * eps * cond + 1e3 * eps):
        bad("precisions_cholesky does not match covariances (Pᵀ Σ P ≠ I)")
