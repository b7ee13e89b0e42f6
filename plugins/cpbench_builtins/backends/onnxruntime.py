"""``onnxruntime``: the model exported to ONNX and run by an ONNX Runtime CPU ``InferenceSession``.

Export uses ``torch.onnx.export(dynamo=False)`` (TorchScript exporter; fast and reliable for plain conv
nets) to bytes in memory, with a fixed batch; if that fails the dynamo exporter is tried. The session
runs with ``intra_op_num_threads = threads``, ``inter_op_num_threads = 1``, sequential execution and
all graph optimisations. ``prepare`` checks the session's output against eager PyTorch on the example
input and raises :class:`BackendError` if it differs by more than ``1e-4`` relative (max abs error over
max abs reference). ``run`` takes a torch tensor, feeds numpy (zero-copy), returns a torch tensor.
``fuse`` ("cp3" default, chosen by measurement; or "none"/"cp4"/"auto") sets the CP block form exported.
"""
from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import torch
from torch import nn

from cpbench import hookimpl
from cpbench.backend import Prepared
from cpbench.errors import BackendError
from cpbench.execution import apply_forms, optimize_cp_blocks, rel_error

RTOL = 1e-4


def _export(model: nn.Module, x: torch.Tensor) -> bytes:
    errors = []
    for dynamo in (False, True):
        buf = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), buf, input_names=["input"], output_names=["output"],
                                  opset_version=17, dynamo=dynamo)
            return buf.getvalue()
        except Exception as exc:
            errors.append(f"dynamo={dynamo}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    raise BackendError("torch.onnx.export failed: " + "; ".join(errors))


def _make_session(onnx_bytes: bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No busy-waiting between runs: spinning ORT threads steal the cores from whatever runs next
    # (the other arm of a paired timing, or another engineer's job on this shared machine).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(onnx_bytes, sess_options=so, providers=["CPUExecutionProvider"])


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, fuse: str = "cp3"):
        self.fuse = fuse

    def prepare(self, model: nn.Module, example_input: torch.Tensor, *, threads: int) -> Prepared:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError(f"onnxruntime is not installed: {exc}") from None
        model = copy.deepcopy(model).eval()
        info: dict = {"threads": threads, "fuse": self.fuse, "onnxruntime": ort.__version__,
                      "intra_op_num_threads": threads, "inter_op_num_threads": 1,
                      "graph_optimization_level": "ORT_ENABLE_ALL", "allow_spinning": False}
        if self.fuse == "auto":
            model, choices = optimize_cp_blocks(model, example_input, layout="contiguous", threads=threads,
                                                forms=("cp4", "cp3"))
            info["cp_forms"] = [c.as_dict() for c in choices]
        elif self.fuse != "none":
            model = apply_forms(model, self.fuse, layout="contiguous")
        x = example_input.contiguous()
        with torch.inference_mode():
            ref = model(x)
        onnx_bytes = _export(model, x)
        try:
            sess = _make_session(onnx_bytes, threads)
        except Exception as exc:
            raise BackendError(f"onnxruntime could not load the exported model: {type(exc).__name__}: {exc}") from None
        in_name = sess.get_inputs()[0].name
        out_name = sess.get_outputs()[0].name
        info["onnx_bytes"] = len(onnx_bytes)

        def run(t: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(sess.run([out_name], {in_name: t.numpy()})[0])

        got = run(x)
        if tuple(got.shape) != tuple(ref.shape):
            raise BackendError(f"onnxruntime output shape {tuple(got.shape)} != PyTorch {tuple(ref.shape)}")
        err = rel_error(got, ref)
        info["rel_error_vs_torch"] = err
        if not np.isfinite(err) or err > RTOL:
            raise BackendError(f"onnxruntime output differs from PyTorch by {err:.3g} relative (> {RTOL:g})")
        return Prepared(run=run, info=info, convert_input=lambda t: t.detach().contiguous())


@hookimpl
def cpbench_register_backends(registry):
    registry.add(OnnxRuntime())
