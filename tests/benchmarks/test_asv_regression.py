"""The asv suite: discovery, deterministic fixtures, and (opt-in) the `asv continuous` regression demo.

The demo (benchmarks/demo_regression.sh) builds three commits in a throwaway repository and takes a
few minutes, so it runs only with ``CPBENCH_ASV_DEMO=1``; the other tests here take seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DISCOVER = """
import json, sys
from asv_runner.discovery import disc_benchmarks
from asv_runner._aux import update_sys_path
root = sys.argv[1]
update_sys_path(root)
print(json.dumps(sorted(b.name for b in disc_benchmarks(root))))
"""


def _discovered() -> list[str]:
    # a subprocess: asv's discovery registers the benchmark package under its own import hook
    out = subprocess.run([sys.executable, "-c", DISCOVER, str(ROOT / "benchmarks")], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_asv_config_pins_cpu_torch_and_the_benchmark_package():
    from asv import util

    conf = util.load_json(str(ROOT / "asv.conf.json"), js_comments=True)
    assert conf["benchmark_dir"] == "benchmarks" and conf["environment_type"] == "virtualenv"
    assert conf["matrix"]["req"]["torch"] == ["2.13.0"]
    assert any("torch==2.13.0" in c for c in conf["install_command"])


def test_discovery_finds_the_suite_and_skips_the_standalone_scripts():
    names = _discovered()
    for expected in ("bench_layers.TrackSpeedup.track_time_ratio", "bench_layers.TrackCPBlock.track_time_ratio",
                     "bench_layers.TimeForward.time_cp_block_forward", "bench_layers.TimeConvForward.time_conv_forward",
                     "bench_decomposers.TrackRelError.track_rel_error",
                     "bench_decomposers.TimeDecompose.time_decompose",
                     "bench_decomposers.PeakmemDecompose.peakmem_decompose"):
        assert expected in names
    # layer_suite imports cpbench.measure.timing.time_pair: asv would take it for a benchmark if it imported the script
    assert all(n.split(".")[0].startswith("bench_") for n in names), names


@pytest.fixture
def suite(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks._fixtures as fixtures
    import benchmarks.bench_layers as layers

    return fixtures, layers


def test_fixtures_are_deterministic(suite):
    fixtures, _ = suite
    a, b = fixtures.make_conv("alexnet-conv2"), fixtures.make_conv("alexnet-conv2")
    assert a.weight.equal(b.weight) and a.bias.equal(b.bias)
    assert fixtures.make_input("charnet-conv2").equal(fixtures.make_input("charnet-conv2"))
    f1 = fixtures.decompose("alexnet-conv2", "spatial-svd", 16)
    f2 = fixtures.decompose("alexnet-conv2", "spatial-svd", 16)
    assert f1.rel_error == f2.rel_error
    # the seeded kernel is low-rank plus noise: far from a random kernel's error, but not exact
    assert 0.05 < f1.rel_error < 0.9


def test_cp_block_ratio_is_a_positive_ratio_and_outputs_match(suite):
    import torch

    fixtures, layers = suite
    conv, block = fixtures.random_cp_block("charnet-conv2", 16)
    x = fixtures.make_input("charnet-conv2")
    assert block(x).shape == conv(x).shape
    bench = layers.TrackCPBlock()
    bench.setup("charnet-conv2", 16)
    ratio = bench.track_time_ratio("charnet-conv2", 16)
    assert isinstance(ratio, float) and ratio > 0
    assert torch.get_num_threads() >= 1


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CPBENCH_ASV_DEMO"), reason="minutes long; set CPBENCH_ASV_DEMO=1")
def test_asv_continuous_catches_a_slowed_cp_block(tmp_path):
    env = dict(os.environ, CPBENCH_DEMO_FAST="1")
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "demo_regression.sh"), str(tmp_path)],
                         capture_output=True, text=True, timeout=1500, env=env)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "OK: asv continuous caught the slowed CP block" in log
