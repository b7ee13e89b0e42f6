"""``mkl``: eager PyTorch (NCHW) with MKL / OpenMP / oneDNN configured explicitly for the cell.

``prepare`` sets, at the cell's thread count: torch's intra-op pool (which also drives MKL and oneDNN,
both linked into torch and running on its OpenMP pool), every native pool threadpoolctl can see
(libgomp, BLAS libraries loaded by numpy/scipy), and ``torch.backends.mkldnn.enabled = True``. It
records what it set in ``info`` and restores all of it in ``Prepared.close``. It also keeps large
freed blocks in the heap (:func:`cpbench.kernels.forms.configure_malloc`); that one is process-wide and
one-way, which is why harnesses should call it once at start (the layer suite does).
``fuse`` ("auto" default, or a form name / "none") is as for ``channels-last`` but in NCHW.
"""
from __future__ import annotations

import copy

import torch
from threadpoolctl import ThreadpoolController
from torch import nn

from cpbench import hookimpl
from cpbench.plugin.contracts import Prepared
from cpbench.errors import BackendError
from cpbench.kernels.forms import apply_forms, configure_malloc, optimize_cp_blocks, replayed_choices


class MKL:
    name = "mkl"
    description = "eager NCHW, pools set; CP blocks in their fastest exact form"

    def __init__(self, fuse: str = "auto", malloc: bool = True):
        self.fuse = fuse
        self.malloc = malloc

    def prepare(self, model: nn.Module, example_input: torch.Tensor, *, threads: int) -> Prepared:
        return self._prepare(model, example_input, threads, None)

    def prepare_as(self, model: nn.Module, example_input: torch.Tensor, *, threads: int, info: dict) -> Prepared:
        """As ``prepare``, with the forms an earlier ``prepare`` chose (its ``info``) built, not re-timed."""
        return self._prepare(model, example_input, threads, replayed_choices(info))

    def _prepare(self, model, example_input, threads, chosen) -> Prepared:
        if not torch.backends.mkldnn.is_available():
            raise BackendError("torch was built without oneDNN (mkldnn)")
        before_torch = torch.get_num_threads()
        before_mkldnn = torch.backends.mkldnn.enabled
        controller = ThreadpoolController()
        limiter = controller.limit(limits=threads)
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = True
        restored = False

        def close() -> None:
            nonlocal restored
            if restored:
                return
            restored = True
            limiter.restore_original_limits()
            torch.set_num_threads(before_torch)
            torch.backends.mkldnn.enabled = before_mkldnn

        try:
            info = {
                "threads": threads,
                "layout": "contiguous",
                "fuse": self.fuse,
                "set": {
                    "torch_intra_op": threads,
                    "mkldnn_enabled": True,
                    "pools": [{"api": p.internal_api, "lib": p.prefix, "threads": p.num_threads}
                              for p in ThreadpoolController().lib_controllers],
                },
                "previous": {"torch_intra_op": before_torch, "mkldnn_enabled": before_mkldnn},
                "mkl_available": torch.backends.mkl.is_available(),
                # process-wide and not restored (see cpbench.kernels.forms.configure_malloc)
                "malloc": configure_malloc() if self.malloc else None,
            }
            if self.fuse == "auto":
                model, choices = optimize_cp_blocks(model, example_input, layout="contiguous", threads=threads,
                                                    chosen=chosen)
                info["cp_forms"] = [c.as_dict() for c in choices]
            elif self.fuse == "none":
                model = copy.deepcopy(model).eval()
            else:
                model = apply_forms(model, self.fuse, layout="contiguous")
        except BaseException:
            close()
            raise
        model.eval()

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model(x)

        return Prepared(run=run, info=info, close=close,
                        convert_input=lambda x: x.contiguous())


@hookimpl
def cpbench_register_backends(registry):
    registry.add(MKL())
