"""The compressed network against the fastest original network of any backend (cpbench.measure.fastest)."""
import torch
from torch import nn

from cpbench.measure.fastest import against_fastest, fastest_original
from cpbench.measure.timing import TimingBudget
from cpbench.plugin.contracts import Prepared

TINY = TimingBudget(warmup=1, min_rounds=6, max_rounds=30, budget_s=0.15, min_round_s=0.0005)


class Repeating:
    """A backend that runs the network ``times`` times per call: a slow or fast way to run the same network."""

    def __init__(self, name: str, times: int):
        self.name, self.times = name, times

    def prepare(self, model, x, *, threads):
        def run(inp):
            with torch.no_grad():
                for _ in range(self.times):
                    out = model(inp)
            return out
        return Prepared(run=run, info={"times": self.times})


class Broken:
    name = "broken"

    def prepare(self, model, x, *, threads):
        raise RuntimeError("cannot export this network\nsecond line")


def _nets():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    compressed = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 32, 1))
    return original, compressed, torch.randn(1, 8, 16, 16)


def test_the_reference_is_the_backend_that_runs_the_original_fastest():
    original, compressed, x = _nets()
    own = Repeating("own", 1)
    slow, fast = Repeating("slow", 6), Repeating("fast", 1)
    got = against_fastest(own, [slow, Broken(), fast], original, compressed, x, TINY, threads=1, processes=0,
                          select_budget=TINY)
    assert got["backend"] == "fast"
    sel = got["selection"]
    # the slow backend runs the original six times per call: the compressed network's lead over it is far larger
    assert sel["slow"]["speedup"] > 3 * sel["fast"]["speedup"]
    assert sel["broken"] == {"error": "RuntimeError: cannot export this network"}  # one line, and skipped
    lo, hi = got["speedup_ci"]
    assert lo <= got["speedup"] <= hi
    assert got["speedup"] < sel["slow"]["speedup"] / 2
    assert got["baseline_ms"] > 0 and got["compressed_ms"] > 0


def test_no_backend_that_runs_the_original_is_an_error_not_a_number():
    original, compressed, x = _nets()
    got = against_fastest(Repeating("own", 1), [Broken()], original, compressed, x, TINY, threads=1, processes=0,
                          select_budget=TINY)
    assert "speedup" not in got and "no backend" in got["error"] and "broken" in got["selection"]


def test_fastest_original_is_the_ratio_of_the_fastest_original_to_the_backends():
    """The reference of ``--target-against fastest``: a backend that runs the original 4x per call against
    one that runs it once is about 1/4 as fast; the ratio's interval holds it."""
    original, _, x = _nets()
    got = fastest_original(Repeating("own", 4), [Broken(), Repeating("fast", 1)], original, x, TINY, threads=1,
                           processes=0, select_budget=TINY)
    assert got["backend"] == "fast"
    lo, hi = got["ratio_ci"]
    assert lo <= got["ratio"] <= hi and 0.15 < got["ratio"] < 0.45
    assert got["fastest_ms"] < got["backend_ms"]
    assert got["selection"]["broken"] == {"error": "RuntimeError: cannot export this network"}


def test_fastest_original_on_the_fastest_backend_is_a_ratio_of_one_with_nothing_more_timed():
    original, _, x = _nets()
    got = fastest_original(Repeating("own", 1), [Repeating("slow", 5)], original, x, TINY, threads=1, processes=0,
                           select_budget=TINY)
    assert got["backend"] == "own" and got["ratio"] == 1.0 and got["ratio_ci"] == [1.0, 1.0]
    assert "processes" not in got and got["selection"]["slow"]["speedup"] > 3
