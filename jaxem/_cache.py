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
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import jax

DISABLE_ENV = "JAXEM_NO_COMPILATION_CACHE"
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
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if hasattr(os, "getuid") and path.stat().st_uid != os.getuid():
            return None  # never a folder that is not the user's own
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    _state["path"] = path
    return path


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
