"""Every built-in backend computes what eager PyTorch computes, and leaves the thread pools as it found them."""
from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_info

from cpbench.errors import BackendError
from cpbench.kernels.forms import rel_error

BACKENDS = ["torch-cpu", "mkl", "channels-last", "torch-compile", "onnxruntime"]


def _pools():
    return sorted((p.get("prefix"), p.get("num_threads")) for p in threadpool_info())


def test_plugins_load(plugins):
    for name in BACKENDS:
        assert name in plugins.backends, plugins.failures()


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_matches_torch_cpu(plugins, cp_net, example, name):
    ref_backend = plugins.backends.get("torch-cpu")
    ref = ref_backend.prepare(cp_net, example, threads=1)(example)
    backend = plugins.backends.get(name)
    p = backend.prepare(cp_net, example, threads=1)
    try:
        x = p.convert_input(example)
        out = p(x)
        out = p(x)  # a second call: no state left from the first
        assert tuple(out.shape) == tuple(ref.shape)
        assert rel_error(out, ref) < 1e-4
        assert isinstance(p.info, dict)
    finally:
        p.close()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_threads_restored(plugins, cp_net, example, name, threads):
    torch_before, pools_before = torch.get_num_threads(), _pools()
    interop_before = torch.get_num_interop_threads()
    mkldnn_before = torch.backends.mkldnn.enabled
    p = plugins.backends.get(name).prepare(cp_net, example, threads=threads)
    p(p.convert_input(example))
    p.close()
    assert torch.get_num_threads() == torch_before
    assert torch.get_num_interop_threads() == interop_before
    assert _pools() == pools_before
    assert torch.backends.mkldnn.enabled == mkldnn_before


def test_mkl_records_what_it_set(plugins, cp_net, example):
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    p = plugins.backends.get("mkl").prepare(cp_net, example, threads=other)
    try:
        assert torch.get_num_threads() == other  # set for the timed calls
        assert p.info["set"]["torch_intra_op"] == other
        assert p.info["previous"]["torch_intra_op"] == before
        assert all(pool["threads"] == other for pool in p.info["set"]["pools"])
    finally:
        p.close()
    assert torch.get_num_threads() == before


def test_torch_compile_failure_is_backend_error(plugins, cp_net, example, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("inductor exploded\nsecond line of a long traceback")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(BackendError) as ei:
        plugins.backends.get("torch-compile").prepare(cp_net, example, threads=1)
    msg = str(ei.value)
    assert "inductor exploded" in msg and "\n" not in msg


def test_torch_compile_reports_compile_seconds(plugins, cp_net, example):
    p = plugins.backends.get("torch-compile").prepare(cp_net, example, threads=1)
    assert p.info["compile_seconds"] > 0


def test_torch_compile_without_compiler(plugins, cp_net, example, monkeypatch):
    from cpbench_builtins.backends import torch_compile

    monkeypatch.setattr(torch_compile, "_compiler", lambda: None)
    with pytest.raises(BackendError, match="C\\+\\+ compiler"):
        plugins.backends.get("torch-compile").prepare(cp_net, example, threads=1)


def test_onnxruntime_detects_mismatch(plugins, cp_net, example, monkeypatch):
    from cpbench_builtins.backends import onnxruntime as ort_backend

    real = ort_backend._runner

    def wrong_runner(*args):
        run = real(*args)
        return lambda t: run(t) * 1.001  # 1e-3 relative: ten times the tolerance

    monkeypatch.setattr(ort_backend, "_runner", wrong_runner)
    with pytest.raises(BackendError, match="differs from PyTorch"):
        plugins.backends.get("onnxruntime").prepare(cp_net, example, threads=1)


def test_onnxruntime_plain_run_path(plugins, cp_net, example):
    # an input of another shape goes through sess.run (fixed-batch export is fine for that)
    p = plugins.backends.get("onnxruntime").prepare(cp_net, example, threads=1)
    ref = plugins.backends.get("torch-cpu").prepare(cp_net, example, threads=1)(example)
    nc = example.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # not contiguous
    assert rel_error(p(nc), ref) < 1e-4


class _Constant(torch.nn.Module):
    """Its output does not depend on its input: the exported graph has no input left."""

    def __init__(self):
        super().__init__()
        self.register_buffer("out", torch.arange(6.0).reshape(1, 6))

    def forward(self, x):
        return self.out * 2.0


def test_onnxruntime_runs_a_graph_whose_output_ignores_the_input(plugins, example):
    p = plugins.backends.get("onnxruntime").prepare(_Constant(), example, threads=1)
    assert torch.equal(p(p.convert_input(example)), torch.arange(6.0).reshape(1, 6) * 2.0)


def test_onnxruntime_session_settings(plugins, cp_net, example):
    p = plugins.backends.get("onnxruntime").prepare(cp_net, example, threads=2)
    assert p.info["intra_op_num_threads"] == 2 and p.info["inter_op_num_threads"] == 1
    assert p.info["rel_error_vs_torch"] < 1e-4
    out = p(p.convert_input(example))
    assert isinstance(out, torch.Tensor)


def test_channels_last_converts_input_outside_run(plugins, cp_net, example):
    p = plugins.backends.get("channels-last").prepare(cp_net, example, threads=1)
    x = p.convert_input(example)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert p.info["layout"] == "channels_last"
