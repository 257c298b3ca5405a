"""A persistent XLA compilation cache in the user's own cache folder, and a guard that keeps
a long session's compiled programs from exhausting the process's memory mappings.

Compilation is most of the time of a small fit, and JAX forgets every compiled program when
the process ends. The ``jaxem`` command and :class:`jaxem.GaussianMixture` therefore turn on
JAX's persistent compilation cache, so that a second run on the same shapes loads its
programs instead of compiling them. Where it lives: ``$XDG_CACHE_HOME/jaxem/xla`` (default
``~/.cache/jaxem/xla``), created private to the user (mode 0700) and used only when the
folder belongs to them. It is left alone when the user already chose a cache
(``JAX_COMPILATION_CACHE_DIR`` or ``jax.config.jax_compilation_cache_dir``), and turned off
by setting ``JAXEM_NO_COMPILATION_CACHE=1``.

Memory mappings: XLA's CPU backend maps each compiled kernel's code and constants as pages
of their own (measured: about 3 mappings per kernel, 100-600 per fitted model), and Linux
caps a process at ``vm.max_map_count`` mappings (65530 by default). A process that compiles
hundreds of different programs (a research loop over shapes and settings, a test worker)
reached the cap, and then LLVM's JIT failed ("Cannot allocate memory") and the process died
with SIGSEGV while compiling. :func:`release_programs_if_crowded`, called by every driver
before it compiles, drops JAX's compiled programs (``jax.clear_caches``) when the mappings
pass half the cap; they are compiled again (or loaded from the persistent cache) on demand.

Stored executables: JAX's cache is looked up by the lowered program, so a warm call still
traces and lowers it (for an iris fit: 0.3 s of tracing and lowering, and 0.2 s setting up
MLIR the first time in a process, against 0.1 s to load the program). :class:`StoredProgram`
keeps the compiled executable itself (``jax.experimental.serialize_executable``) beside JAX's
cache, keyed by everything that decides the program without tracing it — the function, its
static arguments, the arguments' shapes and dtypes, jaxem's source, the JAX and jaxlib
versions, the device, the CPU's features, ``XLA_FLAGS`` and the JAX settings that change a
program — so a warm call loads and runs it with no tracing or lowering at all. It is on
where the persistent cache is on (same folder rules: ``$XDG_CACHE_HOME/jaxem/programs``,
private to the user) and falls back to an ordinary ``jax.jit`` call whenever a call cannot
be keyed (traced arguments, Python callbacks, several devices) or a stored file cannot be
loaded.

Size: each folder is kept within ``JAXEM_CACHE_MAX_MB`` megabytes (default
:data:`DEFAULT_CACHE_MAX_MB`), the least recently used files removed first
(:func:`trim_folder`): both when a process turns the cache on, and the program store
whenever it stores a program (a stored program loaded counts as used). Every change to
jaxem's source or to JAX's version keys new programs, so without a cap the folders would
only grow.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import pickle
import platform
import sys
import tempfile
import threading
from pathlib import Path

import jax
import numpy as np

from jaxem import _validation

DISABLE_ENV = "JAXEM_NO_COMPILATION_CACHE"
SIZE_ENV = "JAXEM_CACHE_MAX_MB"
# The most each cache folder keeps by default, in megabytes (a stored program of a small fit
# is 0.3-0.5 MB; a session's search over shapes and settings stores tens to hundreds).
DEFAULT_CACHE_MAX_MB = 1024
# Programs that compile faster than this are not worth a file (JAX's default is 1 s, which
# would leave out most of a small fit's programs).
MIN_COMPILE_SECONDS = 0.1

_state: dict = {}


def cache_dir() -> Path:
    """Where the cache lives: ``$XDG_CACHE_HOME/jaxem/xla`` or ``~/.cache/jaxem/xla``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxem" / "xla"


def enable_persistent_cache() -> Path | None:
    """Turn the persistent cache on (once per process); the folder used, or None.

    None when it is off (:data:`DISABLE_ENV`), when the user chose a cache of their own, or
    when the folder cannot be made private to this user.
    """
    if "path" in _state:
        return _state["path"]
    _state["path"] = None
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return None
    path = cache_dir()
    if not _private_dir(path):
        return None  # never a folder that is not the user's own
    limit = cache_max_bytes()  # a bad setting fails here, before anything is stored
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    _state["path"], _state["limit"] = path, limit
    store = path.parent / "programs"
    _state["store"] = store if _private_dir(store) else None
    for folder in (path, _state["store"]):
        if folder is not None:
            trim_folder(folder, limit)
    if _state["store"] is not None:
        _start_lapack()
    return path


def enable_compilation_cache() -> Path | None:
    """Keep compiled programs across processes for the functional API too.

    The ``jaxem`` command and the scikit-learn estimators turn the persistent cache on by
    themselves; ``jaxem.fit``, ``fit_restarts``, ``fit_batch`` and ``select`` leave JAX's
    configuration alone unless asked, by calling this once (before the first fit). Then a
    later process with the same shapes loads their executables instead of tracing and
    compiling them (a 1,000-dataset ``fit_batch``: 0.06 s to load against ~1.1 s). The
    same rules as the estimator's: ``$XDG_CACHE_HOME/jaxem`` (default ``~/.cache/jaxem``),
    private to the user, capped at ``JAXEM_CACHE_MAX_MB``; a cache of your own
    (``JAX_COMPILATION_CACHE_DIR``) is left as it is, and ``JAXEM_NO_COMPILATION_CACHE=1``
    keeps it off.

    Returns:
      The folder of JAX's cache (``.../jaxem/xla``; the executables go beside it, in
      ``.../jaxem/programs``), or None where it stays off.
    """
    return enable_persistent_cache()


def cache_max_bytes() -> int:
    """The most bytes each cache folder keeps: ``JAXEM_CACHE_MAX_MB`` megabytes (a positive
    number), default :data:`DEFAULT_CACHE_MAX_MB`."""
    text = os.environ.get(SIZE_ENV, "").strip()
    if not text:
        return DEFAULT_CACHE_MAX_MB * 2**20
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = float("nan")
    if not (np.isfinite(megabytes) and megabytes > 0):
        raise ValueError(f"{SIZE_ENV} must be a positive number of megabytes, got {text!r}")
    return int(megabytes * 2**20)


def trim_folder(folder: Path, max_bytes: int) -> int:
    """Removes the least recently used files of ``folder`` (by modification time, which a
    load of a stored program renews) until the rest take at most ``max_bytes``; the bytes
    removed. Files being written (hidden temporaries, locks) and sub-folders are left alone;
    a file another process removed first is skipped."""
    files = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                files.append((info.st_mtime_ns, info.st_size, entry.path))
    except OSError:
        return 0
    total = sum(size for _, size, _ in files)
    removed = 0
    for _, size, path in sorted(files):
        if total <= max_bytes:
            break
        try:
            os.unlink(path)
        except OSError:
            continue
        total -= size
        removed += size
    return removed


def _private_dir(path: Path) -> bool:
    """Make ``path`` (mode 0700); whether it exists and belongs to this user."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return not hasattr(os, "getuid") or path.stat().st_uid == os.getuid()
    except OSError:
        return False


def program_store() -> Path | None:
    """The folder of stored executables (``…/jaxem/programs``), or None when they are
    off: set by :func:`enable_persistent_cache` when it turns JAX's cache on."""
    return _state.get("store")


# A stored program: this line, then a pickle of the serialised executable (payload, input
# and output trees) and whether it calls library kernels (custom calls: LAPACK's, which a
# process registers before it runs such a program; see _lapack_ready).
STORE_FORMAT = b"jaxem-program-2\n"
# The JAX settings that change what a function lowers to (the rest are debugging, logging
# and cache options).
_CONFIG_KEYS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                "jax_threefry_partitionable", "jax_numpy_rank_promotion",
                "jax_numpy_dtype_promotion", "jax_platforms", "jax_use_shardy_partitioner")


def _environment_key() -> str:
    """What every stored program depends on besides its own arguments: jaxem's source,
    JAX/jaxlib, Python, the device and the CPU it compiles for, XLA_FLAGS (read once per
    process), the block budgets tuned for this machine (they set block sizes at trace time),
    and the JAX settings that change a program (read at every call: float64 mode can be
    switched on and off within a process)."""
    settings = [f"{name}={getattr(jax.config, name, None)!r}" for name in _CONFIG_KEYS]
    tuned = f"blocks={sorted(tuned_block_budgets().items())}"
    return _process_environment() + "\n" + "\n".join(settings) + "\n" + tuned


def _process_environment() -> str:
    if "environment" not in _state:
        digest = hashlib.sha256()
        package = Path(__file__).parent
        for source in sorted(package.glob("*.py")):
            digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
        device = jax.devices()[0]
        parts = [digest.hexdigest(), jax.__version__, jax.lib.__version__, sys.version,
                 platform.machine(), device.platform, device.device_kind,
                 getattr(device.client, "platform_version", ""), str(jax.device_count()),
                 os.environ.get("XLA_FLAGS", ""), _cpu_features()]
        _state["environment"] = "\n".join(parts)
    return _state["environment"]


def _cpu_features() -> str:
    """The CPU's model and instruction-set flags: XLA:CPU compiles for the host CPU, so a
    cache folder shared by two machines must not hand one the other's code."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


# Block budgets measured on this machine (jaxem.tuning, `jaxem tune-blocks`): a JSON file
# beside the cache folder, one entry per machine, read once per process.
TUNING_ENV = "JAXEM_NO_TUNING"


def tuning_file() -> Path:
    """Where measured block budgets live: ``$XDG_CACHE_HOME/jaxem/tuning.json``."""
    return cache_dir().parent / "tuning.json"


def machine_key() -> str:
    """What a measured block budget holds for: the backend and device kind, the CPU's model
    and instruction sets, the number of cores, and the JAX version."""
    device = jax.devices()[0]
    cpu = hashlib.sha256(_cpu_features().encode()).hexdigest()[:16]
    return "|".join([device.platform, device.device_kind, cpu, str(os.cpu_count()),
                     jax.__version__])


def _read_tuning(path: Path) -> dict:
    """The tuning file's entries, or {} when it is missing, unreadable, malformed or not the
    user's own (a file someone else could write must not steer this process)."""
    try:
        if hasattr(os, "getuid") and path.stat().st_uid != os.getuid():
            return {}
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _valid_budgets(budgets) -> dict[str, dict[str, int]]:
    """The well-formed part of a record: ``{type: {"DxK": positive int bytes}}``."""
    out: dict[str, dict[str, int]] = {}
    for cov_type, by_shape in (budgets.items() if isinstance(budgets, dict) else ()):
        if not isinstance(by_shape, dict):
            continue
        good = {}
        for shape, value in by_shape.items():
            parts = str(shape).split("x")
            if (len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts)
                    and isinstance(value, int) and not isinstance(value, bool) and value > 0):
                good[str(shape)] = value
        if good:
            out[str(cov_type)] = good
    return out


def tuned_block_budgets() -> dict[str, dict[str, int]]:
    """This machine's measured E-step block budgets in bytes, by covariance type and shape
    ``"DxK"`` ({} if none were measured, or under ``JAXEM_NO_TUNING=1``); read once per
    process."""
    if "tuned" not in _state:
        tuned = {}
        if os.environ.get(TUNING_ENV, "").strip() in ("", "0"):
            entry = _read_tuning(tuning_file()).get(machine_key(), {})
            tuned = _valid_budgets(entry.get("budgets") if isinstance(entry, dict) else None)
        _state["tuned"] = tuned
    return _state["tuned"]


def store_block_budgets(budgets: dict[str, dict[str, int]],
                        details: dict | None = None) -> Path:
    """Record ``budgets`` (bytes by covariance type and shape ``"DxK"``; an empty dict
    forgets this machine's) for this machine in :func:`tuning_file`, and use them from now
    on in this process. Returns the file; raises ``OSError`` when its folder cannot be made
    private to this user."""
    path = tuning_file()
    if not _private_dir(path.parent):
        raise OSError(f"cannot write {path}: its folder is not this user's own")
    data = _read_tuning(path)
    key = machine_key()
    budgets = _valid_budgets(budgets)
    if budgets:
        data[key] = {"budgets": budgets, **(details or {})}
    else:
        data.pop(key, None)
    tmp = tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp")
    with tmp:
        json.dump(data, tmp, indent=1, sort_keys=True)
    os.replace(tmp.name, path)
    _state["tuned"] = budgets
    return path


def _static_key(value) -> str | None:
    """A stable text for a static argument, or None when it has none: plain values
    (None, numbers, strings, tuples of them) and jaxem's own dataclasses (the models,
    whose code is in the source hash of :func:`_environment_key`). Anything else (a
    callback, a mesh, a model class of the user's, whose code could change under the same
    name) makes the call unkeyed."""
    if value is None or isinstance(value, bool | int | float | str):
        return repr(value)
    if isinstance(value, tuple | list):
        parts = [_static_key(v) for v in value]
        return None if None in parts else f"{type(value).__name__}({','.join(parts)})"
    cls = type(value)
    if dataclasses.is_dataclass(value) and cls.__module__.split(".")[0] == "jaxem":
        parts = [_static_key(getattr(value, f.name)) for f in dataclasses.fields(value)]
        return None if None in parts else f"{cls.__module__}.{cls.__qualname__}{parts}"
    return None


def _leaf_key(leaf, device) -> str | None:
    """Shape, dtype and weak type of an argument leaf; None for a traced value or an array
    placed on another device (those calls are not stored)."""
    if isinstance(leaf, jax.core.Tracer):
        return None
    if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct):  # a shape: as the array it stands for
        if leaf.sharding is not None and leaf.sharding.device_set != {device}:
            return None
        return f"{leaf.shape}{leaf.dtype}{'w' if leaf.weak_type else ''}"
    if isinstance(leaf, np.ndarray | np.generic):
        return f"{leaf.shape}{leaf.dtype}np"
    if isinstance(leaf, bool | int | float | complex):
        return type(leaf).__name__
    return None


# XLA:CPU hands dots (and the elementwise work around them) to its YNNPACK library by
# default; its kernels are slow for the small dimensions of a mixture (D, K ≤ 64): per EM
# iteration at N = 1e5, float32, same process, YNNPACK fusions on / off: full D = K = 8
# 5.5 / 3.2 ms, full 32 × 8 40 / 37, full 64 × 64 570 / 502, tied 32 × 8 12.6 / 9.9,
# diag 8 × 8 3.7 / 2.5, spherical 8 × 8 2.3 / 1.8; at N = 1e6 full 8 × 8 50 / 30 ms, diag
# 16 × 16 44 / 39, tied 16 × 16 66 / 54 (full 8 × 32 and 32 × 32 at 1e6: within 5%, either
# way). Off in the programs whose run time matters (the default-option programs and
# every `fit`); the small programs keep it, as LLVM then has fewer kernels to compile
# (a 1,000-dataset fit_batch program: 0.58 against 0.70 s; it runs 0.02 s faster without).
#
# The same programs take LLVM's -O1 instead of -O2: their run time is in matrix products
# (library calls) and the fusion emitters' loops, which -O1 leaves as fast, while most
# compile up to ~40% faster (measured on the 2-core Intel VM, a fresh process each, -O2 /
# -O1: compile 1.13 / 0.97 s and 34.0 / 33.4 ms an iteration for full 16 × 16 at N = 1e5,
# diag 64 × 8 at 2e5 0.95 / 0.83 s and 28.3 / 28.0 ms, full 64 × 64 at 1e5 1.58 / 1.38 s
# and 637 / 637 ms; a model search's seeding 1.37 / 0.81 s, 0.68 / 0.65 s to run; full
# 8 × 8 at 1e6 no faster to compile; 14 cells in benchmarks/README.md, tenth session).
#
# Like every option jaxem sets, these are XLA:CPU's: off the CPU none is passed
# (:func:`supported_options`).
DEFAULT_COMPILE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "",
                           "xla_backend_optimization_level": 1}


def supported_options(options: dict | None) -> dict | None:
    """``options`` less those this XLA does not know: an experimental option may be renamed
    or retired in a later jaxlib, and compiling with an unknown option fails. Each option
    outside :data:`_ESTABLISHED_OPTIONS` is tried once per process, on a trivial program
    (~10 ms, only when a program that uses it is first built).

    None off the CPU: every option jaxem sets is an XLA:CPU choice measured there. A GPU
    compile refuses the ``xla_cpu_*`` ones ("No such compile option", seen on an H100 with
    jaxlib 0.11.2), and the others would change what they were not measured for there
    (the optimisation level of its kernels, its reductions' tree form)."""
    if not options or jax.default_backend() != "cpu":
        return None
    kept = {name: value for name, value in options.items()
            if name in _ESTABLISHED_OPTIONS or _option_known(name, value)}
    return kept or None


# Options every jaxlib this package supports (>= 0.10) knows: not worth a probe compile.
_ESTABLISHED_OPTIONS = frozenset({"xla_backend_optimization_level",
                                  "xla_cpu_use_fusion_emitters", "xla_disable_hlo_passes"})


@functools.cache
def _option_known(name: str, value) -> bool:
    try:
        jax.jit(lambda v: v + 1, compiler_options={name: value}).lower(np.float32(0)).compile()
    except Exception:  # noqa: BLE001 - XLA's "No such compile option" (or a bad value)
        return False
    return True


_fresh_lock = threading.Lock()
_recompile_lock = threading.Lock()
_fresh_depth = 0
_fresh_previous = None


@contextlib.contextmanager
def fresh_compiles():
    """Compiles inside are done afresh, not taken from JAX's persistent cache: XLA:CPU cannot
    serialise again an executable it has loaded from there (the copy runs, then fails to
    find its kernels: "Function … not found"), and the store keeps what it compiles. JAX's
    setting is global, so compiles in several threads share one window: it is turned off
    by the first to enter and back on by the last to leave."""
    global _fresh_depth, _fresh_previous
    with _fresh_lock:
        if _fresh_depth == 0:
            _fresh_previous = jax.config.jax_enable_compilation_cache
            jax.config.update("jax_enable_compilation_cache", False)
        _fresh_depth += 1
    try:
        yield
    finally:
        with _fresh_lock:
            _fresh_depth -= 1
            if _fresh_depth == 0:
                jax.config.update("jax_enable_compilation_cache", _fresh_previous)


class StoredProgram:
    """``jax.jit(fn, static_argnames, compiler_options)`` whose executables are kept on
    disk (:func:`program_store`) and in this process: a call whose key is known runs the
    stored executable, skipping tracing, lowering and compiling; otherwise the jitted
    function runs (and its executable is stored for next time). Attributes other than the
    call (``lower``, ``_cache_size``) are the jitted function's. Of ``compiler_options``
    the program passes those this backend's XLA knows (:func:`supported_options`: none off
    the CPU), settled when it is first used, and its stored executables are keyed by them."""

    def __init__(self, fn, static_argnames, compiler_options=None):
        self._fn = fn
        self._options_given = compiler_options
        self._signature = inspect.signature(fn)
        self._static = tuple(static_argnames)
        self._loaded: dict = {}

    @functools.cached_property
    def _options(self) -> dict | None:
        """The options passed to XLA: those given that this backend's XLA knows."""
        return supported_options(self._options_given)

    @functools.cached_property
    def _name(self) -> str:
        options = sorted((self._options or {}).items())
        return f"{self._fn.__module__}.{self._fn.__qualname__}:{options}"

    @functools.cached_property
    def jitted(self):
        """``jax.jit`` of the function, with :attr:`_options`."""
        return jax.jit(self._fn, static_argnames=self._static, compiler_options=self._options)

    @functools.cached_property
    def nested(self):
        """``jax.jit`` of the function without compiler options: inside another trace,
        where options are the enclosing top-level program's to set."""
        return jax.jit(self._fn, static_argnames=self._static)

    def __getattr__(self, name):
        return getattr(self.jitted, name)

    def __call__(self, *args, **kwargs):
        if _validation.under_transformation():
            return self.nested(*args, **kwargs)
        # Every path passes the arguments by name, as a stored program was lowered: the
        # order of a program's inputs changes how XLA fuses it, and so its float rounding
        # (by position, a fit_batch with the cache off differed from the same fit with it
        # on in the last bits).
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        store = program_store()
        if store is None:
            return self.jitted(**bound.arguments)
        dynamic = {k: v for k, v in bound.arguments.items() if k not in self._static}
        key = self._key(bound.arguments, dynamic)
        if key is None:
            return self.jitted(**bound.arguments)
        compiled = self._loaded.get(key)
        if compiled is not None:
            return compiled(**dynamic)
        compiled = None if key in _unstorable else self._load(store, key)
        if compiled is None:
            return self._keep(key, self._compile(bound.arguments), store)(**dynamic)
        self._keep(key, compiled)
        return self._first_run(key, bound.arguments, dynamic)

    def prepare(self, pool, *args, **kwargs):
        """This call's program, ready to run: a future of a function of the dynamic
        arguments (by name, as the program is lowered), and the shapes of its outputs.

        A program not known yet (in this process or the store) is traced and lowered here,
        in the calling thread, and compiled in ``pool`` (a ``concurrent.futures``
        executor), so that this thread can trace the next program meanwhile: on two cores
        ``fit_batch`` compiles its initialisation and its EM loop side by side. Dynamic
        arguments may be ``jax.ShapeDtypeStruct`` (e.g. another prepared program's
        outputs); the returned function may be called from several threads at once."""
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        dynamic = {k: v for k, v in bound.arguments.items() if k not in self._static}
        key = self._key(bound.arguments, dynamic)
        ready = concurrent.futures.Future()
        if key is None:  # not keyed (see _key): lowered here, compiled in the pool, not kept
            # Here, not in the pool's threads: JAX's settings may be this thread's own (a
            # `jax.enable_x64()` block), and a fit_batch of an unkeyed model traced in its
            # shards' threads ran in float32 (JAX keeps the lowering and its executable).
            lowered = self.jitted.lower(**bound.arguments)
            return pool.submit(lowered.compile), lowered.out_info
        compiled = self._loaded.get(key)
        store = program_store()
        if compiled is None and store is not None and key not in _unstorable:
            compiled = self._load(store, key)
            if compiled is not None:
                self._keep(key, compiled)
                checked = []

                def first_run(**given):  # runs are checked until one has passed
                    if checked:
                        return self._loaded[key](**given)
                    out = self._first_run(key, bound.arguments, given)
                    checked.append(True)
                    return out

                ready.set_result(first_run)
                return ready, compiled.out_info
        if compiled is not None:
            ready.set_result(compiled)
            return ready, compiled.out_info
        lowered = self.jitted.lower(**bound.arguments)

        def compile_and_keep():
            with fresh_compiles():
                compiled = lowered.compile()
            return self._keep(key, compiled, store)

        return pool.submit(compile_and_keep), lowered.out_info

    def _first_run(self, key: str, arguments: dict, dynamic: dict):
        """The first run of a program loaded from the store, which waits for its result:
        XLA reports a failed dispatch on the outputs, later, where the caller first reads
        them."""
        loaded = self._loaded[key]
        try:
            return jax.block_until_ready(loaded(**dynamic))
        except jax.errors.JaxRuntimeError as error:
            # A stored executable that lacks some of its kernels ("Function … not found"):
            # XLA:CPU can serialise an executable without kernels it shares with others
            # compiled earlier in the process that stored it (seen by fuzzing: a long
            # session's stored programs failed in the next process). Dropped, compiled
            # afresh, and not stored again from this process.
            if "not found" not in str(error):
                raise
            with _recompile_lock:  # once, where several threads ran it
                if self._loaded.get(key) is loaded:
                    _unstorable.add(key)
                    store = program_store()
                    if store is not None:
                        (store / key).unlink(missing_ok=True)
                    self._loaded[key] = self._compile(arguments)
            return self._loaded[key](**dynamic)

    def _keep(self, key: str, compiled, store: Path | None = None):
        """``compiled``, held in this process under ``key`` and, given the ``store``, saved
        there too (unless ``key`` is one this process must not store)."""
        self._loaded[key] = compiled
        _loaded_programs.add(self)
        if store is not None and key not in _unstorable:
            self._save(store, key, compiled)
        return compiled

    def _compile(self, arguments: dict):
        with fresh_compiles():
            return self.jitted.lower(**arguments).compile()

    def _key(self, arguments: dict, dynamic: dict) -> str | None:
        parts = [self._name]
        for name in self._static:
            text = _static_key(arguments.get(name))
            if text is None:
                return None
            parts.append(f"{name}={text}")
        leaves, tree = jax.tree_util.tree_flatten(dynamic)
        parts.append(str(tree))
        device = jax.devices()[0]
        for leaf in leaves:
            text = _leaf_key(leaf, device)
            if text is None:
                return None
            parts.append(text)
        parts.append(_environment_key())
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def _load(self, store: Path, key: str):
        from jax.experimental import serialize_executable

        path = store / key
        try:
            if hasattr(os, "getuid") and path.stat().st_uid != os.getuid():
                return None  # only the user's own files are unpickled
            data = path.read_bytes()
            if not data.startswith(STORE_FORMAT):
                return None
            payload, in_tree, out_tree, calls = pickle.loads(data[len(STORE_FORMAT):])
            if calls and not _lapack_ready():
                return None
            compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
        except Exception:  # noqa: BLE001 - none yet, or a stale or damaged file: compile
            return None
        try:
            os.utime(path)  # used now: the last to go when the store is trimmed
        except OSError:
            pass
        return compiled

    def _save(self, store: Path, key: str, compiled) -> None:
        from jax.experimental import serialize_executable

        try:
            calls = 'custom_call_target="' in compiled.as_text()
            data = STORE_FORMAT + pickle.dumps((*serialize_executable.serialize(compiled),
                                                calls))
        except Exception:  # noqa: BLE001 - not serialisable (e.g. closed-over constants)
            return
        try:
            fd, tmp = tempfile.mkstemp(dir=store, prefix=".tmp-")
        except OSError:
            return
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, store / key)  # readers never see a partial file
        except OSError:  # a full disk: just not stored
            Path(tmp).unlink(missing_ok=True)
            return
        trim_folder(store, _state.get("limit", DEFAULT_CACHE_MAX_MB * 2**20))

    def forget(self) -> None:
        """Drop the executables this process holds (they stay on disk)."""
        self._loaded.clear()


_loaded_programs: set = set()
# Keys whose stored executable could not run in this process (see StoredProgram.__call__).
_unstorable: set = set()


_lapack_lock = threading.Lock()


def _lapack_ready() -> bool:
    """Register jaxlib's LAPACK kernels, as lowering a linear-algebra op does: a program
    loaded without any lowering in the process would otherwise call an unregistered
    kernel (and crash). ``jax.export`` does the same before it runs a loaded program. Only
    programs that call library kernels wait for it (the store records which do)."""
    with _lapack_lock:  # once, whichever thread comes first; the others wait for it
        if "lapack" not in _state:
            try:
                from jax._src.lax import linalg

                linalg.initialize_lapack()
                _state["lapack"] = True
            except Exception:  # noqa: BLE001 - a JAX without it: never load such programs
                _state["lapack"] = False
    return _state["lapack"]


def _start_lapack() -> None:
    """Register LAPACK's kernels in a thread of their own, once: it imports SciPy's linear
    algebra (~0.085 s on 2 cores), which a process loading stored programs would otherwise
    wait for before its first one (a 1,000-dataset fit_batch in a new process: its
    initialisation calls no LAPACK kernel, and by the time its loop loads, LAPACK is
    ready)."""
    if "lapack" in _state or "lapack_thread" in _state:
        return
    _state["lapack_thread"] = threading.Thread(target=_lapack_ready, name="jaxem-lapack",
                                               daemon=True)
    _state["lapack_thread"].start()


def forget_loaded_programs() -> None:
    """Drop every :class:`StoredProgram`'s executables held in this process."""
    for program in list(_loaded_programs):
        program.forget()
    _loaded_programs.clear()


# JAX's own timing events for the three stages of building a program.
_COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}
_totals: dict = {}


def _listen(event: str, duration: float, **kwargs) -> None:
    stage = _COMPILE_EVENTS.get(event)
    if stage is not None:
        _totals[stage] = _totals.get(stage, 0.0) + duration
        if stage == "compile":
            _totals["programs"] = _totals.get("programs", 0) + 1
            _maps["compiled"] += 1
            if duration >= TRIM_AFTER_COMPILE_SECS:
                _return_freed_memory()


# A compile this long frees hundreds of MB of LLVM's memory, which glibc keeps in the
# process; handed back to the system before the program runs (the event fires between
# the compile and the first execution), it no longer adds to the peak: an estimator fit at
# N = 2e7, D = 16, K = 32 peaked at data + 2.08 GB with a cold cache, + 1.88 GB with this.
TRIM_AFTER_COMPILE_SECS = 1.0


def _return_freed_memory() -> None:
    if _state.get("malloc_trim", True) is None:
        return
    try:
        trim = _state.get("malloc_trim") or ctypes.CDLL("libc.so.6").malloc_trim
        _state["malloc_trim"] = trim
        trim(0)
    except (OSError, AttributeError):  # not glibc
        _state["malloc_trim"] = None


# Programs compiled since the mappings were last counted; the count costs ~0.1 ms per
# thousand mappings, so it is taken only after this many compilations.
MAPS_CHECK_EVERY = 16
MAPS_BUDGET = 0.5  # the share of vm.max_map_count at which compiled programs are dropped
_maps = {"compiled": 0, "released": 0}


def _map_limit() -> int | None:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None  # not Linux: no such cap to guard


def memory_mappings() -> int | None:
    """The number of memory mappings of this process (Linux), else None."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def release_programs_if_crowded(force_check: bool = False) -> bool:
    """Drop JAX's compiled programs (``jax.clear_caches``) when this process's memory
    mappings exceed :data:`MAPS_BUDGET` of ``vm.max_map_count``; whether it did. Looks only
    after :data:`MAPS_CHECK_EVERY` compilations (or ``force_check``)."""
    _start_listening()
    if not force_check and _maps["compiled"] < MAPS_CHECK_EVERY:
        return False
    _maps["compiled"] = 0
    limit = _maps.setdefault("limit", _map_limit())
    used = memory_mappings()
    if limit is None or used is None or used < MAPS_BUDGET * limit:
        return False
    jax.clear_caches()
    forget_loaded_programs()
    _maps["released"] += 1
    return True


def _start_listening() -> None:
    if not _state.get("listening"):
        jax.monitoring.register_event_duration_secs_listener(_listen)
        _state["listening"] = True


def compile_totals() -> dict:
    """Seconds this process has spent tracing, lowering and compiling (XLA; a program
    loaded from the persistent cache counts its lookup) and the number of programs built:
    ``{"trace": s, "lower": s, "compile": s, "programs": n}``. Counting starts at the
    first call (the ``jaxem`` command calls it at start-up; so does every driver)."""
    _start_listening()
    return {"trace": 0.0, "lower": 0.0, "compile": 0.0, "programs": 0, **_totals}
