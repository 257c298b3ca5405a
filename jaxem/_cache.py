"""A persistent XLA compilation cache in the user's own cache folder.

Compilation is most of the time of a small fit, and JAX forgets every compiled program when
the process ends. The ``jaxem`` command and :class:`jaxem.GaussianMixture` therefore turn on
JAX's persistent compilation cache, so that a second run on the same shapes loads its
programs instead of compiling them. Where it lives: ``$XDG_CACHE_HOME/jaxem/xla`` (default
``~/.cache/jaxem/xla``), created private to the user (mode 0700) and used only when the
folder belongs to them. It is left alone when the user already chose a cache
(``JAX_COMPILATION_CACHE_DIR`` or ``jax.config.jax_compilation_cache_dir``), and turned off
by setting ``JAXEM_NO_COMPILATION_CACHE=1``.
"""

from __future__ import annotations

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


def compile_totals() -> dict:
    """Seconds this process has spent tracing, lowering and compiling (XLA; a program
    loaded from the persistent cache counts its lookup) and the number of programs built:
    ``{"trace": s, "lower": s, "compile": s, "programs": n}``. Counting starts at the
    first call (the ``jaxem`` command calls it at start-up)."""
    if not _state.get("listening"):
        jax.monitoring.register_event_duration_secs_listener(_listen)
        _state["listening"] = True
    return {"trace": 0.0, "lower": 0.0, "compile": 0.0, "programs": 0, **_totals}
