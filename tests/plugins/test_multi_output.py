"""A residual, concatenating, upsampling network with several outputs — base and compressed by every
decomposer family — runs on every backend, counts its FLOPs, and saves and loads."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from _nets import multihead  # noqa: E402

import cpbench  # noqa: E402
from cpbench.nn.flops import count_flops  # noqa: E402
from cpbench.nn.outputs import output_rel_error  # noqa: E402

BACKENDS = ["torch-cpu", "mkl", "channels-last", "torch-compile", "onnxruntime"]
PLAN = {"layer1.conv1": ("cp-nls", 6), "layer2.conv2": ("cp-als", 8), "down": ("tucker2", [8, 8]),
        "fuse": ("spatial-svd", 8)}


@pytest.fixture(autouse=True)
def _short_form_timing(monkeypatch):
    """The backends time exact forms against each other; what is tested here is that they run, so a
    few short rounds are enough."""
    from cpbench.measure.timing import TimingBudget

    quick = TimingBudget(warmup=0, min_rounds=2, max_rounds=2, budget_s=0.01, min_round_s=0.0)
    import cpbench.kernels.forms as execution
    from cpbench_builtins.backends import onnxruntime, torch_compile

    for mod in (execution, onnxruntime, torch_compile):
        monkeypatch.setattr(mod, "QUICK_BUDGET", quick)


@pytest.fixture(scope="module")
def nets():
    from cpbench.nn.bnfold import fold_batchnorm

    out = {}
    for kind in ("tuple", "dict"):
        base, _ = fold_batchnorm(multihead(kind))
        out[kind] = (base, cpbench.compress(base, PLAN))
    return out


@pytest.mark.parametrize("kind", ["tuple", "dict"])
@pytest.mark.parametrize("name", BACKENDS)
def test_every_backend_runs_a_multi_output_network(plugins, nets, name, kind):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for model in nets[kind]:
        with torch.no_grad():
            ref = model(x)
        p = plugins.backends.get(name).prepare(model, x, threads=1)
        try:
            out = p(p.convert_input(x))
        finally:
            p.close()
        assert type(out) is type(ref)
        if kind == "dict":
            assert list(out) == list(ref)
        assert output_rel_error(out, ref) < 1e-4


def test_flops_and_save_load_of_a_multi_output_network(nets, tmp_path):
    base, small = nets["dict"]
    x = torch.randn(1, 3, 16, 16)
    assert count_flops(small, x) < count_flops(base, x)
    path = cpbench.save(small, tmp_path / "m.safetensors")
    again = cpbench.load(path, base=base)
    with torch.no_grad():
        assert output_rel_error(again(x), small(x)) == 0.0
