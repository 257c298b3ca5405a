"""The persistent compilation cache: on by default in the user's own folder, a second
process loads the programs the first compiled, and it stays out of the way when asked; and
the guard that drops compiled programs before the process runs out of memory mappings."""

import concurrent.futures
import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxem
from jaxem import _cache

PROBE = r'''
import sys, jax, numpy as np, jaxem
from jaxem import _cache
_cache.compile_totals()
x = np.random.default_rng(0).normal(size=(int(sys.argv[1]), 2))
g = jaxem.GaussianMixture(2, covariance_type="full", random_state=0).fit(x)
print("BUILT", _cache.compile_totals()["programs"], "DIR", jax.config.jax_compilation_cache_dir)
print("MEANS", g.means_.tobytes().hex(), g.lower_bound_)
'''


def _probe(env_extra, tmp_path, rows=50):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path), **env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE, str(rows)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    built, rest = out.stdout.split("BUILT ")[1].split(" DIR ")
    folder, means = rest.split("MEANS ")
    return int(built), folder.strip(), means.strip()


def test_second_process_loads_what_the_first_compiled(tmp_path):
    """The first process compiles and stores the fit's executable; the next ones (the same
    shapes, or another N in the same padding bucket) build no program at all — no tracing,
    lowering or compiling — and give bit-identical results. Both folders are private."""
    built, folder, means = _probe({}, tmp_path)
    assert folder == str(tmp_path / "jaxem" / "xla") and built >= 1
    store = tmp_path / "jaxem" / "programs"
    assert any(store.iterdir())
    for path in (store, tmp_path / "jaxem" / "xla"):
        assert (path.stat().st_mode & 0o777) == 0o700
    again, _, means_again = _probe({}, tmp_path)
    assert again == 0 and means_again == means
    assert _probe({}, tmp_path, rows=60)[0] == 0  # padded to the same rows: no program


def test_a_damaged_stored_program_is_compiled_again(tmp_path):
    _, _, means = _probe({}, tmp_path)
    store = tmp_path / "jaxem" / "programs"
    for path in store.iterdir():
        path.write_bytes(_cache.STORE_FORMAT + b"not a program")
    built, _, means_again = _probe({}, tmp_path)
    assert built >= 1 and means_again == means
    assert _probe({}, tmp_path)[0] == 0  # and stored again


def test_calls_that_cannot_be_keyed_are_not_stored():
    """A static argument printed with its address (a callback) or a traced argument gives
    no key: such a call runs the plain jitted function."""
    from jaxem import em

    assert _cache._static_key(lambda: None) is None
    assert _cache._static_key(jaxem.GaussianMixtureModel("diag")) is not None
    assert (_cache._static_key(jaxem.GaussianMixtureModel("diag"))
            != _cache._static_key(jaxem.GaussianMixtureModel("diag", chunk_size=64)))

    @dataclasses.dataclass(frozen=True)
    class UsersModel:  # its code is not in jaxem's source hash: never keyed
        k: int = 2

    assert _cache._static_key(UsersModel()) is None
    assert _cache._static_key(("kmeans", 3, None)) is not None
    device = jax.devices()[0]
    assert _cache._leaf_key(np.zeros((3, 2), np.float32), device) == "(3, 2)float32np"
    seen = []
    jax.jit(lambda a: seen.append(_cache._leaf_key(a, device)) or a)(np.ones(2))
    assert seen == [None]
    # and the keys differ with everything the program depends on
    program = em._restarts_programs.default
    args = {"n_init": 2, "x": np.zeros((4, 2), np.float32)}
    key = program._key(args, {"x": args["x"]})
    assert key != program._key({**args, "n_init": 3}, {"x": args["x"]})
    x64 = np.zeros((4, 2), np.float64)
    assert key != program._key({**args, "x": x64}, {"x": x64})
    from helpers import enable_x64

    with enable_x64(not jax.config.jax_enable_x64):  # same arguments, the other mode
        assert key != program._key(args, {"x": args["x"]})


def test_host_key_equals_prng_key():
    """The drivers build keys on the host (no program compiled for them)."""
    from helpers import enable_x64

    from jaxem import em

    for mode in (False, True):
        with enable_x64(mode):
            for seed in (0, 1, 12345, 2**31 - 1, 2**31, 2**32 - 1):
                a, b = em.host_key(seed), jax.random.PRNGKey(seed)
                assert a.dtype == b.dtype and np.array_equal(a, b), seed
            h = em.host_array(1e-3, np.float32)
            assert h.dtype == np.float32 and float(h) == np.float32(1e-3)


def test_cache_can_be_turned_off_and_a_users_own_cache_is_kept(tmp_path):
    _, folder, _ = _probe({"JAXEM_NO_COMPILATION_CACHE": "1"}, tmp_path)
    assert folder == "None" and not (tmp_path / "jaxem").exists()
    own = tmp_path / "mine"
    _, folder, _ = _probe({"JAX_COMPILATION_CACHE_DIR": str(own)}, tmp_path)
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
    before = em._restarts_programs.cache_size()
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
    assert em._restarts_programs.cache_size() == 0
    # and the drivers call it: after enough compilations, the next fit releases first
    # (the budget set again below today's count: the release above may have dropped the
    # mappings of programs earlier tests in this process left below the first budget)
    monkeypatch.setattr(_cache, "MAPS_BUDGET", 0.9 * _cache.memory_mappings() / limit)
    monkeypatch.setitem(_cache._maps, "compiled", _cache.MAPS_CHECK_EVERY)
    jaxem.fit_restarts(jaxem.GaussianMixtureModel("diag"), x, jax.random.PRNGKey(0),
                       n_components=2, n_init=1)
    assert _cache._maps["released"] == released + 2


def test_the_store_turns_on_with_the_cache_even_if_a_driver_ran_before(tmp_path):
    """A driver called before the estimator enabled the cache (a plain ``jaxem.fit``) must
    not leave the store off for the rest of the process."""
    code = (
        "import numpy as np, jax, jaxem\n"
        "from jaxem import _cache\n"
        "x = np.random.default_rng(0).normal(size=(40, 2))\n"
        "jaxem.fit_restarts(jaxem.GaussianMixtureModel('diag'), x, jax.random.PRNGKey(0),"
        " n_components=2)\n"
        "assert _cache.program_store() is None\n"
        "jaxem.GaussianMixture(2, random_state=0).fit(x)\n"
        "print('STORE', _cache.program_store())\n")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("STORE ")[1].strip() == str(tmp_path / "jaxem" / "programs")
    assert any((tmp_path / "jaxem" / "programs").iterdir())


BATCH_PROBE = r'''
import jax, numpy as np, jaxem
from jaxem import _cache
x = np.random.default_rng(0).normal(size=(6, 40, 2))
model = jaxem.GaussianMixtureModel("diag")
if __import__("sys").argv[1] == "on":
    print("FOLDER", jaxem.enable_compilation_cache())
key = jax.random.PRNGKey(0)  # (JAX's own small programs, before the count)
_cache.compile_totals()
r = jaxem.fit_batch(model, x, key, n_components=2)
print("BUILT", _cache.compile_totals()["programs"], "STORE", _cache.program_store())
print("MEANS", np.asarray(r.best.params.means).tobytes().hex())
'''


def test_the_functional_api_keeps_programs_across_processes_when_asked(tmp_path):
    """``jaxem.enable_compilation_cache()`` gives ``fit_batch`` (any driver) the
    estimator's cache: the next process builds nothing and gets bit-identical results.
    Without the call the functional API leaves JAX's configuration alone."""
    def probe(switch):
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        env["XDG_CACHE_HOME"] = str(tmp_path)
        out = subprocess.run([sys.executable, "-c", BATCH_PROBE, switch], capture_output=True,
                             text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr
        built, rest = out.stdout.split("BUILT ")[1].split(" STORE ")
        store, means = rest.split("MEANS ")
        return out.stdout, int(built), store.strip(), means.strip()

    text, built, store, means = probe("off")
    assert built >= 1 and store == "None" and not (tmp_path / "jaxem").exists()
    text, built, store, means_on = probe("on")
    assert f"FOLDER {tmp_path / 'jaxem' / 'xla'}" in text and built >= 1
    assert store == str(tmp_path / "jaxem" / "programs") and any(Path(store).iterdir())
    _, again, _, means_again = probe("on")
    # The same bits with the cache off, on and loaded: every path passes the arguments
    # by name, so the program (and its inputs' order) is the same.
    assert again == 0 and means_again == means_on == means


def test_compiler_options_this_xla_does_not_know_are_dropped(monkeypatch):
    """An option XLA refuses ("No such compile option") would fail every compile: it is
    dropped, the others kept, and a program built with it still runs, on any backend. Off
    the CPU no option is passed: they are all XLA:CPU's (a GPU compile refused
    xla_cpu_use_fusion_emitters on an H100)."""
    known = {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False}
    unknown = {"xla_jaxem_no_such_option": True}
    program = _cache.StoredProgram(lambda a: a * 2, (), {**unknown, **known,
                                                         **_cache.DEFAULT_COMPILE_OPTIONS})
    assert float(program(np.float32(3.0))) == 6.0
    assert _cache.supported_options(None) is None
    if jax.default_backend() == "cpu":
        assert _cache.supported_options({**known, **unknown}) == known
        assert _cache.supported_options(unknown) is None
    monkeypatch.setattr(_cache.jax, "default_backend", lambda: "gpu")
    assert _cache.supported_options(known) is None


def test_a_program_passes_its_options_on_the_cpu_only_and_is_keyed_by_them(monkeypatch):
    """Every option jaxem sets is XLA:CPU's: a program passes them on the CPU, none on
    another backend (a GPU faked here), settles them when first used, and keys its stored
    executables by what it passes."""
    options = {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False}
    on_cpu = _cache.StoredProgram(lambda a: a * 2, (), options)
    with monkeypatch.context() as patch:
        patch.setattr(_cache.jax, "default_backend", lambda: "cpu")
        assert on_cpu._options == options
    monkeypatch.setattr(_cache.jax, "default_backend", lambda: "gpu")
    elsewhere = _cache.StoredProgram(lambda a: a * 2, (), options)
    assert elsewhere._options is None
    assert on_cpu._options == options  # settled when first used
    assert elsewhere._name != on_cpu._name


def test_programs_whose_run_time_matters_compile_without_ynnpack_fusions():
    """The default-option programs and every fit hand no work to XLA:CPU's YNNPACK fusions
    (slow for a mixture's small dimensions; see _cache.DEFAULT_COMPILE_OPTIONS)."""
    from jaxem import em, gmm

    x = np.random.default_rng(0).normal(size=(512, 8)).astype(np.float32)
    model = gmm.GaussianMixtureModel("full")
    params = gmm.init(jax.random.PRNGKey(0), x, 8, "full")
    hyper = {"reg_covar": np.float32(1e-6)}
    args = (model, x, None, params, np.float32(1e-3), np.int32(5), hyper)
    fit = em._fit_jit.lower(*args, n_history=128).compile().as_text()
    plain = jax.jit(em._fit_program, static_argnames=("model", "n_history")).lower(
        *args, n_history=128).compile().as_text()
    if jax.default_backend() == "cpu" and jax.__version__.startswith("0.10."):
        assert "__ynn_fusion" in plain  # this XLA would use them (so the check can fail)
    restarts = em._restarts_programs.default.lower(
        model, x, None, jax.random.PRNGKey(0), np.float32(1e-3), np.int32(5), 2, 8, "kmeans",
        {}, hyper, n_history=128).compile().as_text()
    for text in (fit, restarts):
        assert "__ynn_fusion" not in text


@settings(max_examples=60, deadline=None)
@given(files=st.lists(st.tuples(st.integers(0, 5000), st.integers(1, 10**6)), max_size=12,
                      unique_by=lambda f: f[1]),
       cap=st.integers(0, 30000))
def test_a_folder_is_trimmed_to_its_cap_least_recently_used_first(tmp_path_factory, files,
                                                                  cap):
    """Over the cap, the oldest files go until the rest fit, and no more; under it, none.
    Hidden files (temporaries being written) and sub-folders are never touched."""
    folder = tmp_path_factory.mktemp("store")
    for i, (size, age) in enumerate(files):
        path = folder / f"p{i}"
        path.write_bytes(b"x" * size)
        os.utime(path, ns=(10**18 - age * 10**9, 10**18 - age * 10**9))
    (folder / ".tmp-writing").write_bytes(b"x" * 9999)
    (folder / "sub").mkdir()
    total = sum(size for size, _ in files)
    removed = _cache.trim_folder(folder, cap)
    kept = {p.name for p in folder.iterdir()} - {".tmp-writing", "sub"}
    newest_first = [f"p{i}" for i in sorted(range(len(files)), key=lambda i: files[i][1])]
    assert kept == set(newest_first[:len(kept)])  # the most recent ones stay
    kept_bytes = sum(files[int(name[1:])][0] for name in kept)
    assert removed == total - kept_bytes
    if total <= cap:
        assert removed == 0
    else:
        assert kept_bytes <= cap
        dropped_last = newest_first[len(kept):][:1]  # keeping one more would not fit
        assert all(kept_bytes + files[int(n[1:])][0] > cap for n in dropped_last)
    assert (folder / ".tmp-writing").exists() and (folder / "sub").is_dir()


def test_the_cache_size_setting_is_checked(monkeypatch):
    monkeypatch.delenv(_cache.SIZE_ENV, raising=False)
    assert _cache.cache_max_bytes() == _cache.DEFAULT_CACHE_MAX_MB * 2**20
    monkeypatch.setenv(_cache.SIZE_ENV, "0.5")
    assert _cache.cache_max_bytes() == 2**19
    for bad in ("0", "-3", "lots", "nan", "inf"):
        monkeypatch.setenv(_cache.SIZE_ENV, bad)
        with pytest.raises(ValueError, match=_cache.SIZE_ENV):
            _cache.cache_max_bytes()


def test_storing_a_program_trims_the_store_and_loading_one_renews_it(tmp_path, monkeypatch):
    """A program stored past the cap pushes out the least recently used files; a program
    loaded from the store counts as just used."""
    store = tmp_path / "programs"
    store.mkdir()
    monkeypatch.setitem(_cache._state, "store", store)
    stale = store / ("0" * 64)
    stale.write_bytes(b"x" * 2**20)
    os.utime(stale, (1, 1))
    monkeypatch.setitem(_cache._state, "limit", 2**20)  # the stale file and a program do not fit
    program = _cache.StoredProgram(lambda a: a * 3, ())
    assert float(program(np.float32(2.0))) == 6.0
    stored = [p for p in store.iterdir() if p != stale]
    assert len(stored) == 1 and not stale.exists()
    os.utime(stored[0], (1, 1))
    again = _cache.StoredProgram(lambda a: a * 3, ())  # a new process's copy: loads it
    assert float(again(np.float32(2.0))) == 6.0 and again._loaded
    assert stored[0].stat().st_mtime > 1e9



def test_a_stored_program_missing_its_kernels_is_compiled_again_and_not_stored(tmp_path,
                                                                                monkeypatch):
    """Seen by fuzzing: XLA:CPU can serialise an executable without kernels it shares with
    programs compiled earlier in the storing process; in the next process the loaded copy
    fails to run ("Function … not found", reported on its outputs when they are read). The
    call then compiles afresh and answers, the file is dropped, and this process does not
    store that program again (it would store the same incomplete copy). Any other runtime
    error still raises."""
    store = tmp_path / "programs"
    store.mkdir()
    monkeypatch.setitem(_cache._state, "store", store)
    monkeypatch.setattr(_cache, "_unstorable", set())
    program = _cache.StoredProgram(lambda a: a * 3, ())
    assert float(program(np.float32(2.0))) == 6.0
    (stored,) = store.iterdir()

    class Pending:  # XLA reports a failed dispatch on the outputs, when they are read
        def __init__(self, message):
            self.message = message

        def block_until_ready(self):
            raise jax.errors.JaxRuntimeError(self.message)

    class Broken:
        def __init__(self, message):
            self.message = message

        def __call__(self, *args, **kwargs):
            return Pending(self.message)

    missing = "INTERNAL: Error dispatching computation: Function iota.33_kernel not found"
    loads = []

    def load(self, store, key, message=missing):
        loads.append(key)
        return Broken(message)

    monkeypatch.setattr(_cache.StoredProgram, "_load", load)
    saves = []
    monkeypatch.setattr(_cache.StoredProgram, "_save", lambda *a: saves.append(a))
    again = _cache.StoredProgram(lambda a: a * 3, ())  # the next process's copy
    assert float(again(np.float32(2.0))) == 6.0
    assert not stored.exists() and len(_cache._unstorable) == 1 and not saves
    assert float(again(np.float32(5.0))) == 15.0 and len(loads) == 1  # kept compiled
    third = _cache.StoredProgram(lambda a: a * 3, ())
    assert float(third(np.float32(1.0))) == 3.0 and len(loads) == 1 and not saves
    monkeypatch.setattr(_cache.StoredProgram, "_load", lambda self, store, key: load(
        self, store, key, message="INTERNAL: something else went wrong"))
    fourth = _cache.StoredProgram(lambda a: a * 3, ())
    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        fourth(np.ones(2, np.float32))  # another shape: another key, loaded from the store


def test_turning_the_cache_on_trims_its_folders(tmp_path):
    """A process that turns the cache on first trims both folders to the cap (here 1 MB),
    the oldest files first."""
    xla = tmp_path / "jaxem" / "xla"
    xla.mkdir(parents=True, mode=0o700)
    for i in range(4):
        path = xla / f"old{i}-cache"
        path.write_bytes(b"x" * 400_000)
        os.utime(path, (1000 + i, 1000 + i))
    _probe({_cache.SIZE_ENV: "1"}, tmp_path)
    left = sorted(p.name for p in xla.iterdir() if p.name.startswith("old"))
    assert left == ["old2-cache", "old3-cache"]
    programs = tmp_path / "jaxem" / "programs"  # trimmed whenever it stores one
    assert 0 < sum(p.stat().st_size for p in programs.iterdir()) <= 2**20


def test_a_prepared_program_compiles_in_the_pool_and_is_kept(tmp_path, monkeypatch):
    """``StoredProgram.prepare`` (fit_batch's two programs, compiled side by side): traced in
    the calling thread, compiled in the pool, its function takes the dynamic arguments by
    name and answers as a call does; an argument given as a shape is keyed as the array it
    stands for (a later call with the array compiles nothing); the next process's copy
    loads it from the store, ready at once, and a loaded copy whose first run fails is
    compiled again."""
    store = tmp_path / "programs"
    store.mkdir()
    monkeypatch.setitem(_cache._state, "store", store)
    monkeypatch.setattr(_cache, "_unstorable", set())
    compiled_in = []

    class Pool:  # runs each job in a thread of its own, and notes which
        def submit(self, job):
            done = concurrent.futures.Future()

            def work():
                compiled_in.append(threading.current_thread())
                done.set_result(job())

            thread = threading.Thread(target=work)
            thread.start()
            thread.join()
            return done

    def f(a, b, scale):
        return a * scale + jnp.sum(b)

    a, b = jnp.arange(3.0, dtype=jnp.float32), jnp.ones(2, jnp.float32)
    program = _cache.StoredProgram(f, ("scale",))
    ready, info = program.prepare(Pool(), jax.ShapeDtypeStruct((3,), jnp.float32), b, 2.0)
    assert info.shape == (3,) and info.dtype == jnp.float32
    assert len(compiled_in) == 1 and compiled_in[0] is not threading.current_thread()
    np.testing.assert_array_equal(ready.result()(a=a, b=b), np.array([2.0, 4.0, 6.0]))
    (stored,) = store.iterdir()
    np.testing.assert_array_equal(program(a, b, 2.0), np.array([2.0, 4.0, 6.0]))
    assert len(program._loaded) == 1  # the array's call found the program prepared
    again = _cache.StoredProgram(f, ("scale",))  # the next process's copy
    ready, info = again.prepare(Pool(), a, b, 2.0)
    assert ready.done() and len(compiled_in) == 1 and info.shape == (3,)
    np.testing.assert_array_equal(ready.result()(a=a, b=b), np.array([2.0, 4.0, 6.0]))

    class Broken:  # a stored copy missing its kernels: fails when its outputs are read
        out_info = info

        def __call__(self, **kwargs):
            class Pending:
                def block_until_ready(self):
                    raise jax.errors.JaxRuntimeError("Function iota.3_kernel not found")
            return Pending()

    monkeypatch.setattr(_cache.StoredProgram, "_load", lambda self, store, key: Broken())
    third = _cache.StoredProgram(f, ("scale",))
    ready, _ = third.prepare(Pool(), a, b, 2.0)
    np.testing.assert_array_equal(ready.result()(a=a, b=b), np.array([2.0, 4.0, 6.0]))
    np.testing.assert_array_equal(ready.result()(a=b[:1].repeat(3), b=b), np.full(3, 4.0))
    assert not stored.exists() and len(_cache._unstorable) == 1
