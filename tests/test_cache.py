"""The persistent compilation cache: on by default in the user's own folder, a second
process loads the programs the first compiled, and it stays out of the way when asked."""

import os
import subprocess
import sys

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
