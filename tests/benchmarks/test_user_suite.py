"""The user suite's cells and verdicts (no timing): ranks resolved as `cpbench run` resolves them, the
matrix file valid for `cpbench run`, the worst-quarter and slowdown targets."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "scripts"))
import user_suite  # noqa: E402

from cpbench.nn.layers import geometry  # noqa: E402
from cpbench.run.matrix import expand, load_matrix  # noqa: E402
from cpbench.plugin.manager import Plugins  # noqa: E402


@pytest.fixture(scope="module")
def suite():
    return user_suite.suite_from_matrix(user_suite.MATRIX, Plugins())


def test_the_suite_holds_every_layer_at_every_speedup(suite):
    layers, specs, axes = suite
    names = {lay.name for lay in layers}
    assert {"64-192-k5@27", "96-256-k5@27-g2", "128-256-k3@56", "48-128-k9@16", "64-64-k3@56", "128-128-k3@28",
            "256-256-k3@14", "512-512-k3@7", "256-512-k3@13"} == names
    assert all(len(lay.ranks) == 4 for lay in layers)
    assert sorted(set(specs.values())) == ["speedup:2", "speedup:3", "speedup:4", "speedup:6"]
    assert axes["batch"] == [1, 32] and axes["threads"] == [1, 2]
    assert len(layers) * 4 * 2 * 2 == 144


def test_ranks_are_the_largest_meeting_each_speedup(suite):
    from cpbench.nn.flops import conv_macs, cp_block_macs

    layers, specs, _ = suite
    for lay in layers:
        conv = nn.Conv2d(lay.in_ch, lay.out_ch, lay.k, padding=lay.pad, groups=lay.groups)
        geo, hw = geometry(conv), (lay.size, lay.size)
        for rank in lay.ranks:
            target = float(specs[(lay.name, rank)].split(":")[1])
            assert conv_macs(geo, hw) / cp_block_macs(geo, rank, hw) >= target
            assert conv_macs(geo, hw) / cp_block_macs(geo, rank + 1, hw) < target


def test_the_matrix_file_runs_with_cpbench_run():
    p = Plugins()
    cells = expand(load_matrix(user_suite.MATRIX, registries={"backend": p.backends, "decomposer": p.decomposers,
                                                                "model": p.models}))
    assert len(cells) == 144 * 5  # every cell on each of the five backends


def _cell(eff, theo=3.0, speedup=None):
    return {"layer": "l", "rank": int(eff * 100), "batch": 1, "threads": 1, "status": "ok", "theo": theo,
            "efficiency": eff, "speedup": speedup if speedup is not None else eff * theo, "spec": "speedup:3",
            "best_baseline": "mkl", "best_compressed": "mkl", "compressed_form": ["cp4-fused"]}


def test_worst_quarter_and_slowdowns():
    cells = [_cell(e) for e in (0.5, 0.6, 0.9, 1.0, 1.1)] + [_cell(0.6, theo=1.6, speedup=0.96)]
    s = user_suite.summarize(cells)
    assert s["median_efficiency"] == pytest.approx(0.75)
    assert s["worst_quarter_efficiency"] == pytest.approx(0.6)  # 25th percentile of 6 values
    assert s["slower_than_baseline"] == [("l", 60, 1, 1)]
    out = io.StringIO()
    user_suite.print_summary(s, out=out)
    text = out.getvalue()
    assert "[FAIL] median efficiency 0.750" in text and "[FAIL] worst quarter" in text
    assert "[FAIL] cells with theo >= 1.5 slower than baseline: 1" in text
