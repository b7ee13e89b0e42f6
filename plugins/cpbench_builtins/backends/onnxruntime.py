"""``onnxruntime``: the model exported to ONNX and run by an ONNX Runtime CPU ``InferenceSession``.

Export uses ``torch.onnx.export(dynamo=False)`` (TorchScript exporter; fast and reliable for plain conv
nets) to bytes in memory, with a fixed batch; if that fails the dynamo exporter is tried. The session
runs with ``intra_op_num_threads = threads``, ``inter_op_num_threads = 1``, sequential execution and
all graph optimisations. ``prepare`` checks the session's output against eager PyTorch on the example
input and raises :class:`BackendError` if it differs by more than ``1e-4`` relative (max abs error over
max abs reference). ``run`` takes a torch tensor, feeds numpy (zero-copy), returns a torch tensor.
A network that returns a tuple, list or dict of tensors is exported with one ONNX output per tensor
(:mod:`cpbench.nn.outputs` order) and ``run`` rebuilds the same structure.
``fuse`` sets the CP block form exported: "auto" (default) exports both the CP4 and the fused CP3 form and
keeps the one ONNX Runtime runs faster (timed side by side on the example input, recorded in
``info["cp_form_timing"]``); "cp3" forces the fused form; "none" exports the model as built.
"""
from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import torch
from torch import nn

from cpbench import hookimpl
from cpbench.plugin.contracts import Prepared
from cpbench.errors import BackendError
from cpbench.kernels.forms import QUICK_BUDGET, apply_forms, rel_error
from cpbench.nn.layers import CPBlock
from cpbench.nn.outputs import flatten_output, unflatten_output
from cpbench.measure.timing import time_pair

RTOL = 1e-4


class _Flat(nn.Module):
    """The model with its output flattened to a tuple of tensors: ONNX outputs are a flat list."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(flatten_output(self.model(x))[0])


def _export(model: nn.Module, x: torch.Tensor, n_outputs: int) -> bytes:
    errors = []
    names = ["output"] if n_outputs == 1 else [f"output{i}" for i in range(n_outputs)]
    for dynamo in (False, True):
        buf = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(_Flat(model), (x,), buf, input_names=["input"], output_names=names,
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


def _session_for(model: nn.Module, x: torch.Tensor, threads: int, n_outputs: int):
    onnx_bytes = _export(model, x, n_outputs)
    try:
        return _make_session(onnx_bytes, threads), onnx_bytes
    except Exception as exc:
        raise BackendError(f"onnxruntime could not load the exported model: {type(exc).__name__}: {exc}") from None


def _has_cp(model: nn.Module) -> bool:
    return any(isinstance(m, CPBlock) for m in model.modules())


def _has_cp4(model: nn.Module) -> bool:
    return any(isinstance(m, CPBlock) and m.form == "cp4" for m in model.modules())


def _runner(sess, in_shape: tuple, ref):
    """``run(t)``: input bound zero-copy from the torch tensor, each output written by ORT straight into
    a fresh torch tensor (I/O binding), so no extra copy of a large activation is made per call; the
    outputs are returned in the structure the PyTorch model returns (``ref``'s)."""
    float_t = np.float32
    inputs = sess.get_inputs()
    # a graph whose outputs do not depend on its input has none left after export: bind only the outputs
    in_name = inputs[0].name if inputs else None
    out_names = [o.name for o in sess.get_outputs()]
    ref_tensors, spec = flatten_output(ref)
    out_shapes = [tuple(t.shape) for t in ref_tensors]
    if len(out_names) != len(out_shapes):
        raise BackendError(f"the exported graph has {len(out_names)} outputs, the model {len(out_shapes)}")
    io = sess.io_binding()  # reused; every buffer is re-bound on every call

    def run(t: torch.Tensor):
        if in_name is not None and (tuple(t.shape) != in_shape or t.dtype != torch.float32 or not t.is_contiguous()):
            outs = [torch.from_numpy(a) for a in sess.run(out_names, {in_name: t.contiguous().numpy()})]
            return unflatten_output(outs, spec)
        outs = [torch.empty(shape, dtype=torch.float32) for shape in out_shapes]
        if in_name is not None:
            io.bind_input(in_name, "cpu", 0, float_t, in_shape, t.data_ptr())
        for name, shape, out in zip(out_names, out_shapes, outs):
            io.bind_output(name, "cpu", 0, float_t, shape, out.data_ptr())
        sess.run_with_iobinding(io)
        return unflatten_output(outs, spec)

    return run


class OnnxRuntime:
    name = "onnxruntime"
    description = "exported to ONNX, run by ONNX Runtime on the CPU"

    def __init__(self, fuse: str = "auto"):
        self.fuse = fuse

    def versions(self) -> dict[str, str]:
        """The ONNX Runtime this backend runs on, recorded in every result row (``versions``)."""
        try:
            import onnxruntime as ort
        except ImportError:
            return {}
        return {"onnxruntime": ort.__version__}

    def prepare(self, model: nn.Module, example_input: torch.Tensor, *, threads: int) -> Prepared:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError(f"onnxruntime is not installed: {exc}") from None
        model = copy.deepcopy(model).eval()
        info: dict = {"threads": threads, "fuse": self.fuse, "onnxruntime": ort.__version__,
                      "intra_op_num_threads": threads, "inter_op_num_threads": 1,
                      "graph_optimization_level": "ORT_ENABLE_ALL", "allow_spinning": False}
        if self.fuse not in ("auto", "none"):
            model = apply_forms(model, self.fuse, layout="contiguous")
        x = example_input.contiguous()
        with torch.inference_mode():
            ref = model(x)
        try:
            n_out = len(flatten_output(ref)[0])
        except TypeError as exc:
            raise BackendError(f"onnxruntime: {exc}") from None
        if self.fuse == "auto" and _has_cp4(model):
            # Choose the form by timing it in ONNX Runtime itself (its kernels, not torch's, decide).
            fused = apply_forms(model, "cp3", layout="contiguous")
            sess_a, bytes_a = _session_for(model, x, threads, n_out)
            sess_b, bytes_b = _session_for(fused, x, threads, n_out)
            ra = _runner(sess_a, tuple(x.shape), ref)
            rb = _runner(sess_b, tuple(x.shape), ref)
            pt = time_pair(lambda: ra(x), lambda: rb(x), QUICK_BUDGET)
            info["cp_form_timing"] = {"cp3_vs_cp4_speedup": pt.speedup, "ci": list(pt.speedup_ci)}
            if pt.speedup > 1.0:
                sess, onnx_bytes, form = sess_b, bytes_b, "cp3"
            else:
                sess, onnx_bytes, form = sess_a, bytes_a, "cp4"
            info["cp_forms"] = [{"form": form}]
        else:
            sess, onnx_bytes = _session_for(model, x, threads, n_out)
            if self.fuse != "none":
                info["cp_forms"] = [{"form": self.fuse}] if _has_cp(model) else []
        info["onnx_bytes"] = len(onnx_bytes)
        info["outputs"] = n_out

        run = _runner(sess, tuple(x.shape), ref)
        got = run(x)
        got_shapes = [tuple(t.shape) for t in flatten_output(got)[0]]
        ref_shapes = [tuple(t.shape) for t in flatten_output(ref)[0]]
        if got_shapes != ref_shapes:
            raise BackendError(f"onnxruntime output shapes {got_shapes} != PyTorch {ref_shapes}")
        err = rel_error(got, ref)
        info["rel_error_vs_torch"] = err
        if not np.isfinite(err) or err > RTOL:
            raise BackendError(f"onnxruntime output differs from PyTorch by {err:.3g} relative (> {RTOL:g})")
        return Prepared(run=run, info=info, convert_input=lambda t: t.detach().contiguous())


@hookimpl
def cpbench_register_backends(registry):
    registry.add(OnnxRuntime())
