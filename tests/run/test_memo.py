"""The cached-computation helper: memo first, then each disk cache in order, then compute (stored in both)."""
from __future__ import annotations

import torch

from cpbench.run.cache import Cache
from cpbench.run.memo import Computation


def _tensor_value():
    return Computation("test values", 2, namespace="test",
                       encode=lambda v: ({"t": v}, {"sum": float(v.sum())}), decode=lambda hit: hit[0]["t"])


def test_memo_then_disk_then_compute(tmp_path):
    c = _tensor_value()
    cache = Cache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(3.0)

    first = c.get("k", compute, caches=[cache])
    assert calls == [1] and cache.get("test", "k")[1] == {"sum": 3.0}  # written to disk
    assert c.get("k", compute, caches=[cache]) is first and calls == [1]  # the memo, same object
    c.clear()
    again = c.get("k", compute, caches=[cache])
    assert calls == [1] and torch.equal(again, first) and again is not first  # from disk


def test_the_first_cache_is_written_and_later_ones_only_read(tmp_path):
    c = _tensor_value()
    shipped, mine = Cache(tmp_path / "shipped"), Cache(tmp_path / "mine")
    shipped.put("test", "k", {"t": torch.ones(2)}, {})
    assert torch.equal(c.get("k", lambda: torch.zeros(2), caches=[mine, shipped]), torch.ones(2))
    assert mine.get("test", "k") is None  # a hit in a read-only cache is not copied
    c.clear()
    c.get("other", lambda: torch.zeros(2), caches=[mine, shipped])
    assert mine.get("test", "other") is not None and shipped.get("test", "other") is None


def test_the_memo_keeps_the_most_recently_used():
    c = Computation("lru", 2)
    for k in "abc":
        c.get(k, lambda k=k: k.upper())
    assert len(c) == 2
    c.get("b", lambda: "recomputed")
    c.get("d", lambda: "D")  # evicts c, the least recently used
    assert c.get("b", lambda: "x") == "B" and c.get("c", lambda: "again") == "again"


def test_a_disabled_cache_is_skipped(tmp_path):
    c = _tensor_value()
    off = Cache(tmp_path, enabled=False)
    c.get("k", lambda: torch.ones(1), caches=[off])
    assert not (tmp_path / "test").exists()
