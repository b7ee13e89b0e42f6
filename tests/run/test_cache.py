"""The on-disk cache: a second run recomputes nothing cached (decompositions, trained networks); a
corrupt entry is reported once and recomputed; concurrent writers never leave a bad entry."""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from cpbench import hookimpl
from cpbench.run.cache import Cache, key_of
from cpbench.run.matrix import parse_matrix
from cpbench.run.session import run_matrix
from cpbench.plugin.manager import Plugins, get_plugins, reset_plugins
from cpbench.run.results import read_results
from cpbench.run.cell import RunContext, base_model, clear_memo

CONV = {"name": "conv", "in_channels": 8, "out_channels": 8, "kernel_size": 3, "input_size": 8, "padding": 1}
# about caching, not timing: timed in the harness (processes = 0)
TIMING = {"budget_s": 0.2, "min_rounds": 5, "warmup": 1, "processes": 0}


pytestmark = pytest.mark.usefixtures("fresh_state")  # tests/conftest.py


def matrix(decomposers=("cp-als", "spatial-svd"), ranks=(2,)):
    return parse_matrix({"run": {"per_layer_timing": False}, "timing": TIMING,
                         "matrix": {"model": [CONV], "decomposer": list(decomposers), "rank": list(ranks)}},
                        registries=get_plugins().registries)


def ctx(cache_dir):
    return RunContext(cache_dir=str(cache_dir), timing=TIMING, per_layer_timing=False)


def entries(root: Path, namespace: str) -> list[Path]:
    return sorted((root / namespace).rglob("*.safetensors"))


def test_second_run_recomputes_nothing(tmp_path, monkeypatch):
    m = matrix()
    first = run_matrix(m, tmp_path / "a", ctx=ctx(tmp_path / "cache"))
    assert first.ok == 2
    files = entries(tmp_path / "cache", "factorizations")
    assert len(files) == 2
    stamps = [f.stat().st_mtime_ns for f in files]
    clear_memo()  # a new process: nothing in memory

    def boom(*a, **k):
        raise AssertionError("decomposed again although cached")

    monkeypatch.setattr("cpbench.run.stages.decompose_layer", boom)
    second = run_matrix(m, tmp_path / "b", ctx=ctx(tmp_path / "cache"))
    assert second.ok == 2
    a = {r["cell_key"]: r for r in read_results(tmp_path / "a")}
    for r in read_results(tmp_path / "b"):
        assert r["decomposition_cached"] == {"conv": True}
        assert r["decompose_seconds"] == 0.0
        assert r["rel_error"] == a[r["cell_key"]]["rel_error"]
        assert a[r["cell_key"]]["decomposition_cached"] == {"conv": False}
    assert [f.stat().st_mtime_ns for f in entries(tmp_path / "cache", "factorizations")] == stamps


class _TinyChars(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 36)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


class _TinyCharsPlugin:
    name = "tinychars"
    dataset = "synthchars"

    def __init__(self):
        from cpbench.nn.training import Recipe

        self.train_recipe = Recipe(epochs=1, batch_size=32, n_train=64)

    def build(self):
        return _TinyChars()

    def input_shape(self):
        return (1, 24, 24)


class _TinyCharsRegistration:
    @hookimpl
    def cpbench_register_models(self, registry):
        registry.add(_TinyCharsPlugin())


def test_trained_base_network_is_cached(tmp_path, monkeypatch):
    reset_plugins(Plugins(extra={"tinychars-test": _TinyCharsRegistration()}))
    from cpbench.nn import training

    calls = []
    real_train = training.train
    monkeypatch.setattr(training, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    c = RunContext(cache_dir=str(tmp_path / "cache"), dataset_size={"train": 64, "test": 64})
    trained = base_model({"name": "tinychars"}, c)
    assert calls == [1]
    assert len(entries(tmp_path / "cache", "models")) == 1
    clear_memo()
    again = base_model({"name": "tinychars"}, c)
    assert calls == [1]  # loaded, not trained
    for (k, v), (k2, v2) in zip(trained.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    fresh = _TinyChars()
    assert not torch.equal(fresh.conv.weight, again.conv.weight) or not torch.equal(fresh.head.weight, again.head.weight)


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _flip_data(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's bytes
    p.write_bytes(bytes(data))


def _flip_header(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[10] ^= 0xFF  # inside the JSON header
    p.write_bytes(bytes(data))


def _empty(p: Path) -> None:
    p.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate, _flip_data, _flip_header, _empty])
def test_cache_get_detects_damage(tmp_path, damage):
    import io

    stream = io.StringIO()
    cache = Cache(tmp_path, stream=stream)
    t = {"a": torch.arange(12, dtype=torch.float64).reshape(3, 4), "b": torch.ones(5)}
    p = cache.put("ns", "k" * 32, t, {"x": 1})
    assert cache.get("ns", "k" * 32)[1] == {"x": 1}
    damage(p)
    assert cache.get("ns", "k" * 32) is None
    assert cache.get("ns", "k" * 32) is None  # deleted: now a plain miss
    assert stream.getvalue().count("is corrupt") == 1
    assert (cache.corrupt, cache.hits) == (1, 1)
    assert not p.exists()


@pytest.mark.parametrize("damage", [_truncate, _flip_data])
def test_corrupt_decomposition_is_reported_once_and_recomputed(tmp_path, capsys, damage):
    m = matrix(decomposers=("cp-als",))
    run_matrix(m, tmp_path / "a", ctx=ctx(tmp_path / "cache"))
    (entry,) = entries(tmp_path / "cache", "factorizations")
    damage(entry)
    clear_memo()
    capsys.readouterr()
    run_matrix(m, tmp_path / "b", ctx=ctx(tmp_path / "cache"))
    err = capsys.readouterr().err
    assert err.count("is corrupt") == 1 and str(entry) in err
    (a,), (b,) = read_results(tmp_path / "a"), read_results(tmp_path / "b")
    assert b["status"] == "ok" and b["decomposition_cached"] == {"conv": False}
    assert b["rel_error"] == a["rel_error"]
    assert Cache(tmp_path / "cache").get("factorizations", entry.stem) is not None  # rewritten, valid
    clear_memo()
    run_matrix(m, tmp_path / "c", ctx=ctx(tmp_path / "cache"))
    assert read_results(tmp_path / "c")[0]["decomposition_cached"] == {"conv": True}
    assert "is corrupt" not in capsys.readouterr().err


def _tensors(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {"w": torch.randn(64, 64, generator=g), "v": torch.randn(300, generator=g)}


def _writer(root, me, n_rounds, barrier, out):
    torch.set_num_threads(1)
    cache = Cache(root, stream=open(os.devnull, "w"))
    barrier.wait()
    bad = 0
    for r in range(n_rounds):
        cache.put("ns", key_of("shared"), _tensors(0), {"writer": me})  # everyone writes the same key
        cache.put("ns", key_of("own", me, r), _tensors(1000 * me + r), {"writer": me, "round": r})
        if cache.get("ns", key_of("shared")) is None:  # reads while others replace it
            bad += 1
        if cache.get("ns", key_of("own", (me + 1) % 4, r)) is None and cache.corrupt:
            bad += 1
    out.put((me, bad, cache.corrupt))


def test_concurrent_writers_leave_only_valid_entries(tmp_path):
    ctx_mp = mp.get_context("fork")
    n, rounds = 4, 15
    barrier, out = ctx_mp.Barrier(n), ctx_mp.Queue()
    procs = [ctx_mp.Process(target=_writer, args=(tmp_path, i, rounds, barrier, out)) for i in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert all(bad == 0 and corrupt == 0 for _, bad, corrupt in results), results
    cache = Cache(tmp_path)
    shared = cache.get("ns", key_of("shared"))
    assert shared is not None and torch.equal(shared[0]["w"], _tensors(0)["w"])
    for me in range(n):
        for r in range(rounds):
            got = cache.get("ns", key_of("own", me, r))
            assert got is not None and got[1] == {"writer": me, "round": r}
            assert torch.equal(got[0]["v"], _tensors(1000 * me + r)["v"])
    assert cache.corrupt == 0
    assert not list(tmp_path.rglob(".tmp-*"))  # no temporary file left behind
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1 + n * rounds
