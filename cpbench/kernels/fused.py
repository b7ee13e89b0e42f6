"""The fused CP-block kernel (form ``cp4-fused``): one C++ operator for the whole 4-layer block.

Run as four layers, a CP block's R-channel intermediates stream through memory three times and each
layer pays a dispatch; its two depthwise layers, with a few percent of the FLOPs, took a quarter of the
block's time here. The operator (``kernels/cp_fused.cpp``) computes the block on NHWC intermediates in
bands of output rows so each band's intermediates stay in cache: the first 1×1 layer as a GEMM on just
the input rows the band needs, the vertical and horizontal taps in loops vectorised over channels with
the taps in registers, the last 1×1 layer as a GEMM (plus bias) into the band's rows of the output.
With AVX-512 the GEMMs are the kernel's own 14×32 register-blocked micro-kernel over weights packed
once here (:func:`pack_panels`); MKL's sgemm re-packs its operands on every call, which cost a band's
small GEMMs ~30% (measured on AlexNet conv2 at R=100: the banded MKL GEMMs took 1.3× their whole-image
time). Without AVX-512 the GEMMs are MKL's. Images (or row ranges, when there are fewer images than
threads) run in parallel on PyTorch's intra-op pool.

The kernel is compiled on first use with ``torch.utils.cpp_extension.load`` (g++ and ninja; about a
minute) into PyTorch's extension cache, keyed by the source and the CPU, so later processes load it in
milliseconds. Where it cannot be built, :func:`load_kernel` raises :class:`~cpbench.errors.BackendError`
with the compiler's last line, and the optimiser simply does not pick the form.
"""
from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import torch
from torch import nn

from ..errors import BackendError
from ..nn.layers import CPBlock

__all__ = ["CPFusedBlock", "pack_panels", "load_kernel", "kernel_available", "BAND_BYTES", "MIN_PARALLEL_MACS",
           "CACHE_BYTES"]

SOURCE = Path(__file__).with_name("cp_fused.cpp")
# -fopenmp: at::parallel_for is inline (ATen/ParallelOpenMP.h); without it the "parallel" loop runs on
# one thread and every GEMM inside wakes MKL's pool instead. The libgomp it links is the one PyTorch
# ships and has already loaded (same soname), so there is one OpenMP runtime in the process.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
# Bytes of R-channel intermediates (vertical output + horizontal output) per band of output rows.
BAND_BYTES = 256 * 1024
# Below this many multiply-adds a call runs on one thread: waking the pool costs more than it saves
# (measured here at 2 threads: the character network's conv2 block at batch 1, 0.7 M MACs, took
# 0.034 ms on one thread and 0.101 ms split over two with OMP_WAIT_POLICY=PASSIVE).
MIN_PARALLEL_MACS = 8_000_000
# One core's L2 cache here. An output larger than this is written with non-temporal stores, around
# caches it would not stay in anyway: no read-for-ownership of every output line (measured here, one
# thread: VGG-16 conv3_1 at R=64 batch 32, 103 MB out, 45.0 -> 40.5 ms; batch 1, 3.2 MB, 1.18 -> 1.12 ms;
# AlexNet conv2 at R=100 batch 32, 18 MB, 8.70 -> 8.43 ms); smaller outputs stay in cache for the next
# layer. An NHWC input larger than this has the rows of each next band prefetched into L2 while the
# current band's last layer runs (VGG-16 conv3_1 batch 32, R=64: 45.2 -> 38.9 ms; batch 1 unchanged).
CACHE_BYTES = 2 * 1024 * 1024

_KERNEL = None
_FAILED: str | None = None


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_name() -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(_cpu_id().encode())  # -march=native: a build is only valid on the CPU it was made for
    h.update(torch.__version__.encode())
    return f"cpbench_cp_fused_{h.hexdigest()[:12]}"


def load_kernel():
    """The compiled extension module (built on first call; raises BackendError if it cannot be)."""
    global _KERNEL, _FAILED
    if _KERNEL is not None:
        return _KERNEL
    if _FAILED is not None:
        raise BackendError(_FAILED)
    from torch.utils import cpp_extension

    try:
        _KERNEL = cpp_extension.load(name=_build_name(), sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                                     verbose=bool(os.environ.get("CPBENCH_VERBOSE_BUILD")))
    except Exception as exc:  # compiler missing, headers missing, build error: one line, not a crash
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        _FAILED = f"the fused CP kernel could not be built ({type(exc).__name__}: {lines[-1] if lines else exc})"
        raise BackendError(_FAILED) from exc
    return _KERNEL


def loaded_kernel_path() -> str | None:
    """The shared library of the kernel this process has loaded (None if it has not)."""
    return getattr(_KERNEL, "__file__", None)


def adopt_kernel(path: str) -> None:
    """Load the kernel from a library another process already built (a timing worker takes the
    harness's): ``load_kernel`` would run ninja again, and since the build directory is keyed by the
    source's content, not its path, a checkout elsewhere with the same source rewrites the build rules
    and every such call recompiles (minutes on a busy machine)."""
    global _KERNEL
    if _KERNEL is None:
        import importlib.util

        spec = importlib.util.spec_from_file_location(_build_name(), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _KERNEL = module


def kernel_available() -> bool:
    """True if the kernel is (or can be) built here."""
    try:
        load_kernel()
    except BackendError:
        return False
    return True


def pack_panels(w: torch.Tensor, panel: int) -> torch.Tensor:
    """(G, K, N) weights as the kernel's micro-kernel reads them: (G, ceil(N/panel), K, panel), each panel
    of ``panel`` columns contiguous per k, zero past column N. ``panel`` 0 (a build without the
    micro-kernel): an empty tensor."""
    if panel <= 0:
        return w.new_empty(0)
    g, k, n = w.shape
    count = -(-n // panel)
    padded = w.new_zeros(g, k, count * panel)
    padded[..., :n] = w
    return padded.reshape(g, k, count, panel).permute(0, 2, 1, 3).contiguous()


def _repack_after_load(module: "CPFusedBlock", _keys) -> None:
    """A module-level hook (a lambda would keep the block from pickling into a timing worker)."""
    module._repack()


class CPFusedBlock(nn.Module):
    """A CP4 block run by the fused kernel (form ``cp4-fused``); inference only, float32 on CPU.

    Exact re-expression of ``block`` (zero padding, any stride, dilation and groups). The output has the
    input's memory format, and neither layout is copied: NCHW data enters and leaves through the two
    GEMMs as transposed operands (measured at batch 1 on the character network's conv2: 41 µs with an
    explicit transpose in and out, 23 µs for channels-last data).
    """

    form = "cp4-fused"

    def __init__(self, block: CPBlock, band_bytes: int = BAND_BYTES, min_parallel_macs: int = MIN_PARALLEL_MACS,
                 cache_bytes: int = CACHE_BYTES):
        super().__init__()
        if block.form != "cp4":
            raise ValueError("the fused form needs a CP4 block (separable spatial factors)")
        if block.geo.padding_mode != "zeros":
            raise ValueError(f"the fused form needs zero padding, not {block.geo.padding_mode!r}")
        from .forms import _axis_padding

        self._pad = _axis_padding
        first, vert, hor, last = block
        geo, g, r = block.geo, block.geo.groups, block.rank
        self.geo, self.rank, self.band_bytes = geo, r, int(band_bytes)
        self.min_parallel_macs, self.cache_bytes = int(min_parallel_macs), int(cache_bytes)
        self._calls: dict[tuple[int, int], tuple] = {}
        self.register_buffer("w_in", first.weight.detach().reshape(g, r, -1).transpose(1, 2).contiguous())
        self.register_buffer("w_out", last.weight.detach().reshape(g, -1, r).transpose(1, 2).contiguous())
        self.register_buffer("bias", None if last.bias is None else last.bias.detach().clone())
        self.register_buffer("taps_v", vert.weight.detach().reshape(g * r, geo.kh).t().contiguous())
        self.register_buffer("taps_h", hor.weight.detach().reshape(g * r, geo.kw).t().contiguous())
        load_kernel()  # fail here, one line, rather than at the first call; not kept (modules deep-copy)
        # The 1x1 weights again, in the micro-kernel's panels: derived, so not in the state dict, and
        # re-derived whenever one is loaded.
        self.register_buffer("w_in_packed", None, persistent=False)
        self.register_buffer("w_out_packed", None, persistent=False)
        self._repack()
        self.register_load_state_dict_post_hook(_repack_after_load)

    def _repack(self) -> None:
        self._calls.clear()
        panel = load_kernel().panel
        self.w_in_packed = pack_panels(self.w_in, panel)
        self.w_out_packed = pack_panels(self.w_out, panel)

    def _call_args(self, shape: torch.Size) -> tuple:
        """Every kernel argument after the input for an input of this shape, worked out once per shape and
        kept in a plain dict: at batch 1 a small block runs in ~10 µs, and reading the 7 buffers through
        ``nn.Module.__getattr__`` on every call took ~4 µs more."""
        args = self._calls.get(shape)
        if args is None:
            geo, h, w = self.geo, shape[-2], shape[-1]
            args = self._calls[shape] = (
                self.w_in, self.taps_v, self.taps_h, self.w_out, self.bias, self.w_in_packed, self.w_out_packed,
                geo.stride[0], geo.stride[1], geo.dilation[0], geo.dilation[1], *self._pad(geo, 0, h),
                *self._pad(geo, 1, w), self.band_bytes, self.min_parallel_macs, self.cache_bytes)
        return args

    def _apply(self, fn, recurse=True):
        # .to(), .float(), .to(memory_format=...): new tensors, so the kept arguments go, and the packed
        # weights are derived again (channels_last would otherwise restride the 4-d panels).
        out = super()._apply(fn, recurse)
        self._repack()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The layout (NCHW or channels-last, kept in the output), dtype, device and autograd are checked in
        # C++: at batch 1 the Python-side checks took ~1.5 µs of a ~12 µs call.
        try:
            return (_KERNEL or load_kernel()).cp_fused(x, *self._call_args(x.shape))
        except RuntimeError as exc:
            if (x.requires_grad and torch.is_grad_enabled()) or x.dtype != torch.float32 or x.device.type != "cpu":
                raise BackendError(f"the fused CP kernel runs float32 CPU inference only, not {x.dtype} on "
                                   f"{x.device.type}{' with gradients' if x.requires_grad else ''}") from exc
            raise
