"""Block budgets measured on this machine (jaxem.tuning, `jaxem tune-blocks`)."""

import json

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import run

from jaxem import _cache, em, gmm, tuning


@pytest.fixture
def tuning_home(tmp_path, monkeypatch):
    """A private cache folder, tuning on (the suite turns it off), nothing read yet."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(_cache.TUNING_ENV, raising=False)
    monkeypatch.delitem(_cache._state, "tuned", raising=False)
    yield tmp_path
    _cache._state.pop("tuned", None)  # the next test reads its own setting again


@settings(max_examples=200, deadline=None)
@given(times=st.lists(st.floats(1e-4, 1.0), min_size=1, max_size=7),
       default_at=st.integers(0, 6), gain=st.floats(0.0, 0.5))
def test_choose_budget_keeps_the_default_unless_another_is_clearly_faster(times, default_at,
                                                                           gain):
    seconds = {2**(20 + i): t for i, t in enumerate(times)}
    default = 2**(20 + default_at % len(times))
    chosen = tuning.choose_budget(default, seconds, gain)
    assert chosen in seconds
    if chosen != default:
        assert seconds[chosen] == min(times) and seconds[chosen] < (1 - gain) * seconds[default]
    else:
        assert min(times) >= (1 - gain) * seconds[default]


def test_tuned_budgets_are_measured_stored_per_machine_and_used(tuning_home, monkeypatch):
    assert _cache.tuned_block_budgets() == {}
    default = gmm.default_budget_bytes("diag")
    assert gmm.chunk_budget_bytes("diag", 2, 2) == default
    lines = []
    out = tuning.tune_block_budgets(4096, ((2, 2), (4, 3)), ("diag",), factors=(0.5, 2.0),
                                    repeats=1, report=lines.append)
    assert set(out) == {"diag"} and set(out["diag"]) == {"2x2", "4x3"}
    for shape, r in out["diag"].items():
        d, k = map(int, shape.split("x"))
        assert r["default"] == default
        # every budget tried is capped by a GPU's memory (jaxem.gmm.within_device_memory)
        assert set(r["seconds"]) == {gmm.within_device_memory(b)
                                     for b in (default // 2, default, default * 2)}
        assert r["budget"] == tuning.choose_budget(default, r["seconds"])
        for b, rows in r["rows"].items():
            assert rows == gmm.auto_chunk_size(4096, k, d, np.float32, "diag", budget_bytes=b)
    assert len(lines) == 2 and lines[0].startswith("diag, D=2, K=2:")
    # recorded for this machine, used from now on, and by the next process
    chosen = {shape: r["budget"] for shape, r in out["diag"].items()}
    data = json.loads(_cache.tuning_file().read_text())
    assert data[_cache.machine_key()]["budgets"] == {"diag": chosen}
    assert gmm.chunk_budget_bytes("diag", 2, 2) == chosen["2x2"]
    _cache._state.pop("tuned")
    assert _cache.tuned_block_budgets() == {"diag": chosen}
    # another shape takes the nearest one measured (log D, log K); other types the built-in
    _cache.store_block_budgets({"diag": {"8x8": 2**20, "64x64": 2**24}})
    assert gmm.chunk_budget_bytes("diag", 10, 12) == 2**20
    assert gmm.chunk_budget_bytes("diag", 48, 40) == 2**24
    assert gmm.chunk_budget_bytes("diag") == default  # no shape given
    assert gmm.chunk_budget_bytes("full", 8, 8) == gmm.default_budget_bytes("full")
    assert gmm.auto_chunk_size(10**6, 64, 64, np.float32, "diag") == gmm.auto_chunk_size(
        10**6, 64, 64, np.float32, "diag", budget_bytes=2**24)
    # a measured budget changes the block size, so it is part of every stored program's key
    program = em._restarts_programs.default
    args = {"n_init": 2, "x": np.zeros((4, 2), np.float32)}
    key = program._key(args, {"x": args["x"]})
    _cache.store_block_budgets({"diag": {"8x8": 2**21}})
    assert program._key(args, {"x": args["x"]}) != key
    # ignored: under JAXEM_NO_TUNING=1, another machine's entry, a malformed file
    monkeypatch.setenv(_cache.TUNING_ENV, "1")
    _cache._state.pop("tuned")
    assert _cache.tuned_block_budgets() == {}
    monkeypatch.delenv(_cache.TUNING_ENV)
    for text in (json.dumps({"another machine": {"budgets": {"diag": {"8x8": 5}}}}),
                 "{not json", json.dumps({_cache.machine_key(): {"budgets": {
                     "diag": {"8x8": -1, "8x": 5, "full": True}, "full": 3}}})):
        _cache.tuning_file().write_text(text)
        _cache._state.pop("tuned")
        assert _cache.tuned_block_budgets() == {}
        assert gmm.chunk_budget_bytes("diag", 8, 8) == default


def test_tuning_rejects_bad_input(tuning_home):
    for kwargs, match in [({"n_samples": 0}, "n_samples"), ({"repeats": 0}, "repeats"),
                          ({"shapes": ()}, "shapes"), ({"shapes": ((8, 0),)}, "shapes"),
                          ({"shapes": ((8,),)}, "shapes"),
                          ({"covariance_types": ()}, "covariance_types"),
                          ({"covariance_types": ("bogus",)}, "covariance_type"),
                          ({"factors": (0.0,)}, "factors"), ({"factors": ()}, "factors")]:
        with pytest.raises(ValueError, match=match):
            tuning.tune_block_budgets(**{"n_samples": 256, **kwargs})
    assert not _cache.tuning_file().exists()


def test_a_folder_that_cannot_be_made_private_is_refused(tuning_home, monkeypatch):
    blocked = tuning_home / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # no folder can be made under a file
    with pytest.raises(OSError, match="not this user's own"):
        _cache.store_block_budgets({"diag": {"8x8": 2**20}})
    out = run("tune-blocks", "--reset")
    assert out.returncode == 2 and "not this user's own" in out.stderr
    assert _cache.tuned_block_budgets() == {}


def test_tune_blocks_command(tuning_home):
    out = run("tune-blocks", "--n", 2048, "--shapes", "2x2", "--covariance-type", "spherical",
              "--repeats", 1, "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "spherical, D=2, K=2: ms per E-step" in out.stdout
    assert "nothing recorded" in out.stdout
    assert not _cache.tuning_file().exists()
    out = run("tune-blocks", "--n", 2048, "--shapes", "2x2,3x2", "--covariance-type", "tied",
              "--repeats", 1)
    assert out.returncode == 0 and str(_cache.tuning_file()) in out.stdout
    assert set(_cache.tuned_block_budgets()) == {"tied"}
    assert set(_cache.tuned_block_budgets()["tied"]) == {"2x2", "3x2"}
    out = run("tune-blocks", "--reset")
    assert out.returncode == 0 and _cache.tuned_block_budgets() == {}
    assert _cache.machine_key() not in json.loads(_cache.tuning_file().read_text())
    for args, match in [(("--n", 0), "--n 0"), (("--covariance-type", "x"), "--covariance-type"),
                        (("--shapes", "8x"), "--shapes")]:
        out = run("tune-blocks", *args)
        assert out.returncode == 2 and match in out.stderr and out.stderr.count("\n") == 1
    # the command's help names the default shapes
    help_text = " ".join(run("tune-blocks", "--help").stdout.split())
    assert ",".join(f"{d}x{k}" for d, k in tuning.TUNING_SHAPES) in help_text
    jax.clear_caches()
