"""The example plugin passes the cpbench conformance suite (copy this file along with the package)."""
import sys
from pathlib import Path

import pytest
import torch

try:
    import cpbench_example  # noqa: F401  (installed: pip install -e plugins/cpbench-example)
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cpbench.plugin.manager import Plugins
from cpbench.testing import check_decomposer, decomposer_checks, parametrize_backend_checks
from cpbench_example import plugin
from cpbench_example.plugin import ChannelSVD, TorchJIT

torch.set_num_threads(1)  # tests share the machine's cores


@pytest.mark.parametrize("check", decomposer_checks(ChannelSVD()))
def test_decomposer_conforms(check):
    check()


@parametrize_backend_checks(TorchJIT())  # the same as @pytest.mark.parametrize("check", backend_checks(...))
def test_backend_conforms(check):
    check()


def test_channel_svd_declares_no_groups_and_is_exact():
    results = {r.name: r for r in check_decomposer(ChannelSVD())}
    assert results["geometry-grouped"].status == "skipped" and "supports_groups = False" in results["geometry-grouped"].message
    assert results["exact-at-full-rank"].passed  # it claims exact_at_full_rank, and the suite checked it


def test_hooks_register_both_objects():
    p = Plugins(autoload=False, extra={"example": plugin})
    assert p.decomposers.plugin_of("channel-svd") == "example"
    assert p.backends.plugin_of("torch-jit") == "example"
