"""The fused kernel's build step: explicit, keyed by every build input, never a side effect, and a clear
fallback where there is no build (these tests need no compiler and no built kernel)."""
from __future__ import annotations

import pytest
import torch

from cpbench.cli import main
from cpbench.errors import BackendError
from cpbench.kernels import fused
from cpbench.kernels.forms import optimize_cp_blocks
from cpbench.measure.timing import TimingBudget

TINY = TimingBudget(warmup=1, min_rounds=3, max_rounds=6, budget_s=0.05, min_round_s=0.0005)


@pytest.fixture
def no_build(monkeypatch, tmp_path):
    """An empty kernel directory, nothing loaded, and a compiler that fails the test if it runs."""
    from torch.utils import cpp_extension

    def compiler_ran(**kwargs):
        raise AssertionError("the kernel was compiled as a side effect")

    monkeypatch.setenv("CPBENCH_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(fused, "_LOADED", {})
    monkeypatch.setattr(cpp_extension, "load", compiler_ran)
    return tmp_path


def test_loading_never_compiles_and_says_how_to_build(no_build):
    assert not fused.kernel_available()
    reason = fused.kernel_status()
    assert "not built for this machine" in reason and "cpbench build-kernel" in reason and "\n" not in reason
    with pytest.raises(BackendError, match="cpbench build-kernel"):
        fused.load_kernel()


def test_without_a_build_the_optimiser_records_why_and_keeps_the_function(no_build, make_net, example):
    net = make_net()
    work, choices = optimize_cp_blocks(net, example, threads=1, budget=TINY)
    assert "cpbench build-kernel" in choices[0].tried["cp4-fused"]["error"]
    assert choices[0].form != "cp4-fused"
    with torch.inference_mode():
        torch.testing.assert_close(work(example), net(example), rtol=1e-4, atol=1e-5)


def test_a_failed_build_is_one_line(no_build, monkeypatch, capsys):
    from torch.utils import cpp_extension

    def broken(**kwargs):
        raise RuntimeError("Error building extension 'x'\nsomething\nninja: build stopped: subcommand failed.")

    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.raises(BackendError, match=r"could not be built \(RuntimeError: ninja: build stopped") as err:
        fused.build_kernel()
    assert "\n" not in str(err.value)
    assert main(["build-kernel"]) == 1
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 2 and "could not be built" in err_lines[0] and "cp4-fused" in err_lines[1]


def test_no_compiler_is_named(no_build, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(BackendError, match="no C\\+\\+ compiler 'no-such-compiler-here'"):
        fused.build_kernel()


def test_the_build_key_holds_every_input(monkeypatch):
    inputs = fused.build_inputs()
    assert inputs["compiler"]["version"]  # the compiler's own version line
    assert {"source_sha256", "cflags", "ldflags", "march", "cpu", "torch", "cxx11_abi", "python"} <= set(inputs)
    key = fused.build_key()
    for name, value in [("_cpu_id", lambda: "flags: other cpu"), ("CFLAGS", fused.CFLAGS + ["-O2"]),
                        ("_compiler", lambda cxx: {"cxx": cxx, "path": "/usr/bin/c++", "version": "g++ 99.1"})]:
        with monkeypatch.context() as m:
            m.setattr(fused, name, value)
            assert fused.build_key() != key, name
    assert fused.build_key("x86-64-v3") != key
    assert fused.build_inputs("x86-64-v3")["cpu"] is None  # a portable build does not depend on the CPU


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next(no_build, monkeypatch):
    # torch's builder waits forever on a ``lock`` file a killed build left in the folder; cpbench's build
    # holds its own OS lock, so a ``lock`` file it finds is stale and is removed before building
    from torch.utils import cpp_extension

    key, name, path = fused._library(fused.NATIVE)
    path.parent.mkdir(parents=True)
    (path.parent / "lock").touch()
    seen = []

    def compile_(**kwargs):
        seen.append((path.parent / "lock").exists())
        raise RuntimeError("stop here: the compiler was reached")

    monkeypatch.setattr(cpp_extension, "load", compile_)
    with pytest.raises(BackendError, match="the compiler was reached"):
        fused.build_kernel()
    assert seen == [False]
