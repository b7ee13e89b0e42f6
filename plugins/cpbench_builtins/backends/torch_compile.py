"""``torch-compile``: ``torch.compile`` with the inductor backend on CPU (C++/OpenMP code via gcc).

``prepare`` compiles and runs the model twice on the example input (so no lazy compilation is left
for the timed calls) and reports that wall time apart as ``info["compile_seconds"]``. Inductor's
``freezing`` is on by default: parameters become constants, so convolution weights are pre-packed
for oneDNN once instead of on every call (inference only; runs use ``torch.inference_mode``).
``fuse="auto"`` (default) compiles both the CP4 blocks as built and their fused CP3 form and keeps the
one the compiled code runs faster (short side-by-side timing, ``info["cp_form_timing"]``; both compile
times are in ``compile_seconds``); "cp3" forces the fused form; "none" compiles the model as built.
Any compile failure (no C++ compiler, an unsupported op, ...) raises :class:`BackendError` with one
line saying why; the harness records it as the cell's error.
"""
from __future__ import annotations

import copy
import os
import shutil
import time

import torch
from torch import nn

from cpbench import hookimpl
from cpbench.plugin.contracts import Prepared
from cpbench.errors import BackendError
from cpbench.kernels.forms import QUICK_BUDGET, apply_forms
from cpbench.nn.layers import CPBlock
from cpbench.measure.timing import time_pair


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((ln.strip() for ln in text if ln.strip()), "")
    return f"{type(exc).__name__}: {first}"[:300]


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


class TorchCompile:
    name = "torch-compile"
    description = "torch.compile (inductor) on the CPU"

    def __init__(self, *, mode: str | None = None, freezing: bool = True, channels_last: bool = True,
                 fuse: str = "auto"):
        self.mode = mode
        self.freezing = freezing
        self.channels_last = channels_last
        self.fuse = fuse

    def _compile(self, model: nn.Module, x: torch.Tensor):
        compiled = torch.compile(model, backend="inductor", mode=self.mode,
                                 options={"freezing": self.freezing}, dynamic=False)
        with torch.inference_mode():
            compiled(x)
            compiled(x)
        return compiled

    def prepare(self, model: nn.Module, example_input: torch.Tensor, *, threads: int) -> Prepared:
        cxx = _compiler()
        if cxx is None:
            raise BackendError("torch.compile (inductor, CPU) needs a C++ compiler; none found (set CXX or install g++)")
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        model = copy.deepcopy(model).eval().to(memory_format=fmt)
        x = example_input.contiguous(memory_format=fmt)
        fmt_name = "channels_last" if self.channels_last else "contiguous"
        info: dict = {"threads": threads, "backend": "inductor", "mode": self.mode, "freezing": self.freezing,
                      "cxx": cxx, "layout": fmt_name, "fuse": self.fuse}
        has_cp4 = any(isinstance(m, CPBlock) and m.form == "cp4" for m in model.modules())
        t0 = time.perf_counter()
        try:
            torch._dynamo.reset()  # a new cell: no guards from an earlier model / thread count
            if self.fuse == "cp3" and has_cp4:
                compiled = self._compile(apply_forms(model, "cp3", layout=fmt_name), x)
                info["cp_forms"] = [{"form": "cp3"}]
            else:
                compiled = self._compile(model, x)
            compile_seconds = time.perf_counter() - t0
            if self.fuse == "auto" and has_cp4:
                # Inductor generates different code for the two forms; keep the one it runs faster.
                t1 = time.perf_counter()
                fused = self._compile(apply_forms(model, "cp3", layout=fmt_name), x)
                compile_seconds += time.perf_counter() - t1
                with torch.inference_mode():
                    pt = time_pair(lambda: compiled(x), lambda: fused(x), QUICK_BUDGET)
                info["cp_form_timing"] = {"cp3_vs_cp4_speedup": pt.speedup, "ci": list(pt.speedup_ci)}
                if pt.speedup > 1.0:
                    compiled = fused
                info["cp_forms"] = [{"form": "cp3" if pt.speedup > 1.0 else "cp4"}]
        except Exception as exc:
            raise BackendError(f"torch.compile failed: {_one_line(exc)}") from None
        info["compile_seconds"] = compile_seconds

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return compiled(x)

        return Prepared(run=run, info=info, convert_input=lambda t: t.contiguous(memory_format=fmt))


@hookimpl
def cpbench_register_backends(registry):
    registry.add(TorchCompile())
