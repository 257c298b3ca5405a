"""The persistent compilation cache: on by default in the user's own folder, a second
process loads the programs the first compiled, and it stays out of the way when asked; and
the guard that drops compiled programs before the process runs out of memory mappings."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxem

PROBE = r'''
import jax, numpy as np, jaxem
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if "cache_hits" in name else None)
jaxem.GaussianMixture(2, random_state=0).fit(np.random.default_rng(0).normal(size=(50, 2)))
print("HITS", len(hits), "DIR", jax.config.jax_compilation_cache_dir)
'''


def _probe(env_extra, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path), **env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    hits, folder = out.stdout.split("HITS ")[1].split(" DIR ")
    return int(hits), folder.strip()


def test_second_process_loads_what_the_first_compiled(tmp_path):
    cache = tmp_path / "jaxem" / "xla"
    hits, folder = _probe({}, tmp_path)
    assert folder == str(cache) and hits == 0
    assert any(cache.iterdir()) and (cache.stat().st_mode & 0o777) == 0o700
    hits, _ = _probe({}, tmp_path)
    assert hits >= 1  # the fit's program came from the cache, not from XLA


def test_cache_can_be_turned_off_and_a_users_own_cache_is_kept(tmp_path):
    _, folder = _probe({"JAXEM_NO_COMPILATION_CACHE": "1"}, tmp_path)
    assert folder == "None" and not (tmp_path / "jaxem").exists()
    own = tmp_path / "mine"
    _, folder = _probe({"JAX_COMPILATION_CACHE_DIR": str(own)}, tmp_path)
    assert folder == str(own) and not (tmp_path / "jaxem").exists()


def test_compiled_programs_are_dropped_before_the_memory_mappings_run_out(monkeypatch):
    """A long session's compiled programs are released when the process's memory mappings
    pass the budget (XLA maps every kernel's pages; at vm.max_map_count LLVM's JIT fails
    and the process dies), and only then."""
    from jaxem import _cache, em

    used = _cache.memory_mappings()
    if used is None:  # pragma: no cover - not Linux
        pytest.skip("no /proc/self/maps on this system: nothing to guard")
    x = np.random.default_rng(0).normal(size=(50, 2))
    jaxem.fit_restarts(jaxem.GaussianMixtureModel("diag"), x, jax.random.PRNGKey(0),
                       n_components=2, n_init=1)
    before = em._restarts_jit._cache_size() + em._restarts_jit_quick._cache_size()
    assert before >= 1
    limit = _cache._maps.setdefault("limit", _cache._map_limit())
    monkeypatch.setitem(_cache._maps, "limit", limit)
    # far below the budget: kept, and the count is looked at only every few compilations
    assert not _cache.release_programs_if_crowded(force_check=True)
    monkeypatch.setattr(_cache, "MAPS_BUDGET", 0.9 * used / limit)
    monkeypatch.setitem(_cache._maps, "compiled", 0)
    assert not _cache.release_programs_if_crowded()  # no compilation since: not looked at
    released = _cache._maps["released"]
    assert _cache.release_programs_if_crowded(force_check=True)
    assert _cache._maps["released"] == released + 1
    assert em._restarts_jit._cache_size() + em._restarts_jit_quick._cache_size() == 0
    # and the drivers call it: after enough compilations, the next fit releases first
    monkeypatch.setitem(_cache._maps, "compiled", _cache.MAPS_CHECK_EVERY)
    jaxem.fit_restarts(jaxem.GaussianMixtureModel("diag"), x, jax.random.PRNGKey(0),
                       n_components=2, n_init=1)
    assert _cache._maps["released"] == released + 2
