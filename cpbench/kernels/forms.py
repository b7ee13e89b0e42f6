"""How a CP block executes: pick, per block, the fastest exact re-expression on its real input.

A :class:`cpbench.layers.CPBlock` stands for one function; it can be computed several ways whose
results agree to float32 rounding but whose speed on a CPU differs a lot (measured on this project's
machine: a separate kh×1 then 1×kw depthwise pair is memory-bound and often slower than one kh×kw
depthwise layer; in channels_last a 1×1 conv is exactly a GEMM on the ``(N·H·W, C)`` view). The forms:

``cp4``
    1×1, kh×1 depthwise, 1×kw depthwise, 1×1 (the paper's block, as built).
``cp3``
    1×1, one kh×kw depthwise (outer product of the two spatial factors), 1×1.
``cp3-gemm``
    ``cp3`` with both 1×1 layers as matrix products on the channels-last view (one ``mm``/``addmm``
    each, no conv dispatch); ungrouped blocks only.
``cp3-gemm-chunked``
    ``cp3-gemm`` a few images at a time (:func:`chunk_size`) so the R-channel intermediates stay in
    cache, the last GEMM writing into its slice of the output. Opt-in (never won here, see below).
``cp4-gemm``
    ``cp4`` with the 1×1 layers as matrix products; ungrouped blocks only. Opt-in.
``cp4-band``
    every layer a batched matrix product on the NCHW view: the 1×1 layers per group, and each
    depthwise layer as a per-channel banded (Toeplitz) matrix that carries its stride, dilation and
    zero padding — ``Y[c] = Ty[c] · X[c] · Tx[c]ᵀ``. More multiply-adds than the depthwise layers
    (``Hout·H·W + Hout·W·Wout`` against ``(kh + kw)·Hout·W`` per channel) but no conv dispatch and
    GEMM-speed inner loops: at batch 1, where PyTorch's depthwise kernels are dominated by fixed
    costs, it is the fastest form here (see :class:`CPBandBlock`). Zero padding only.
``cp4-fused``
    the whole block as one compiled operator (:mod:`cpbench.kernels.fused`): MKL GEMMs for the 1×1 layers and
    register-blocked depthwise taps, computed in bands of output rows so the R-channel intermediates
    stay in cache. float32 CPU inference, zero padding; built by ``cpbench build-kernel`` and not
    offered where it is not built (the choice records why).

:func:`optimize_cp_blocks` times each candidate against the current best side by side
(:func:`cpbench.timing.time_pair`) on the block alone with its real input shape, layout and thread
count, keeps a candidate only if it is faster *and* matches the block's output to ``1e-5``
relative, and returns a copy of the model with the choices applied. Everything else (capturing the
inputs, building the candidates, checking them) happens outside the timed callables.
"""
from __future__ import annotations

import copy
import ctypes
import ctypes.util
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from . import fused
from ..measure.threads import thread_limits
from ..measure.timing import TimingBudget, time_pair
from ..nn.layers import CPBlock, geometry, out_len

__all__ = [
    "FORMS",
    "DEFAULT_FORMS",
    "QUICK_BUDGET",
    "BlockChoice",
    "CPBandBlock",
    "CPGemmBlock",
    "ConvGemm",
    "conv_gemm_kind",
    "band_matrix",
    "as_layout",
    "build_form",
    "configure_malloc",
    "FORMS_VERSION",
    "chunk_size",
    "optimize_cp_blocks",
    "rel_error",
]

FORMS = ("cp4", "cp3", "cp3-gemm", "cp3-gemm-chunked", "cp4-gemm", "cp4-band", "cp4-fused")
# Tried by default. The chunked and cp4-gemm forms never won a layer-suite block on this machine once
# large blocks stay in the heap (configure_malloc), so they are opt-in via ``forms=``.
DEFAULT_FORMS = ("cp4", "cp3", "cp3-gemm", "cp4-band", "cp4-fused")
QUICK_BUDGET = TimingBudget(warmup=1, min_rounds=4, max_rounds=60, budget_s=0.6, min_round_s=0.002,
                            target_ci_rel=0.03)
MATCH_RTOL = 1e-5


_MALLOC_STATE: dict | None = None
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def configure_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> dict:
    """Keep freed large blocks in the heap instead of returning them to the OS (glibc ``mallopt``).

    PyTorch's CPU allocator is plain ``malloc``. glibc serves blocks above the mmap threshold (at most
    32 MiB even with its dynamic threshold) by ``mmap`` and gives them back on ``free``, so every call
    that allocates a large activation pays page faults and kernel zeroing for it again: measured here,
    a batch-32 CP block (three large activations) spent up to half its time there (VGG conv3_1, R=128:
    165 → 85 ms CPU time), the single-output original conv 5–15%. This raises both thresholds so the
    memory is reused, like an inference runtime's arena (ONNX Runtime has one) or jemalloc/tcmalloc.

    Process-wide and one-way (glibc has no "restore the dynamic default"), so call it once at process
    start, before any timing, so every backend and both arms of every pair run with the same allocator.
    Idempotent. Returns what was set; ``{"applied": False, ...}`` when not on glibc.
    """
    global _MALLOC_STATE
    if _MALLOC_STATE is not None:
        return dict(_MALLOC_STATE)
    state = {"applied": False, "mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold,
             "process_wide": True}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok1 = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold))
        ok2 = libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold))
        state["applied"] = bool(ok1 and ok2)
    except (OSError, AttributeError) as exc:
        state["error"] = f"{type(exc).__name__}: {exc}"
    _MALLOC_STATE = state
    return dict(state)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is laid out channels-last (and not also contiguous, as a 1×1 or one-channel tensor is)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def rel_error(out, ref) -> float:
    """max |out - ref| / max |ref|, the largest over the output tensors (a network may return a tuple,
    list or dict of them, :mod:`cpbench.nn.outputs`: a small head is held to the same bound as a large
    one); 0 when both are zero."""
    from ..nn.outputs import output_tensors

    outs, refs = output_tensors(out), output_tensors(ref)
    if len(outs) != len(refs):
        return float("inf")
    worst = 0.0
    for o, r in zip(outs, refs):
        o = o.detach().float().to_dense() if o.is_mkldnn else o.detach().float()
        r = r.detach().float().to_dense() if r.is_mkldnn else r.detach().float()
        if o.shape != r.shape:
            return float("inf")
        if not r.numel():
            continue
        scale, diff = r.abs().max().item(), (o - r).abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def as_layout(t_or_m, layout: str):
    """A tensor or module in ``layout``: "channels_last" or "contiguous" (NCHW)."""
    fmt = _memory_format(layout)
    if isinstance(t_or_m, nn.Module):
        return t_or_m.to(memory_format=fmt)
    return t_or_m.contiguous(memory_format=fmt)


def _memory_format(layout: str) -> torch.memory_format:
    if layout in ("channels_last", "nhwc"):
        return torch.channels_last
    if layout in ("contiguous", "nchw", None):
        return torch.contiguous_format
    raise ValueError(f"unknown layout {layout!r}; use 'contiguous' or 'channels_last'")


class CPGemmBlock(nn.Module):
    """A CP block whose two 1×1 layers run as matrix products on the channels-last view.

    For an NCHW-shaped tensor stored channels_last, ``x.permute(0, 2, 3, 1)`` is a contiguous
    ``(N, H, W, C)`` tensor, so the 1×1 conv S→R is ``x_nhwc @ Ks`` (one GEMM, no copy) and the
    result permuted back is again a channels-last NCHW tensor that the depthwise layer(s) take as is.
    Ungrouped blocks only (``geo.groups == 1``). Exact re-expression of ``block``.
    """

    def __init__(self, block: CPBlock, *, fused: bool, chunk: int | None = None):
        super().__init__()
        self.chunk = chunk
        if block.geo.groups != 1:
            raise ValueError("CPGemmBlock needs an ungrouped CP block")
        src = block.fused() if fused and block.form == "cp4" else block
        first, *mids, last = list(src)
        # (S, R) and (R, T): right-hand GEMM operands, contiguous once here, not per call
        self.register_buffer("w_in", first.weight.detach()[:, :, 0, 0].t().contiguous())
        self.register_buffer("w_out", last.weight.detach()[:, :, 0, 0].t().contiguous())
        self.register_buffer("bias", None if last.bias is None else last.bias.detach().clone())
        self.mids = nn.ModuleList(copy.deepcopy(m) for m in mids)
        self.form = "cp3-gemm" if len(mids) == 1 else "cp4-gemm"
        self.geo = block.geo
        self.rank = block.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunk is not None and x.shape[0] > self.chunk:
            return self._forward_chunked(x, self.chunk)
        y = torch.matmul(x.permute(0, 2, 3, 1), self.w_in).permute(0, 3, 1, 2)
        for m in self.mids:
            y = m(y)
        z = y.permute(0, 2, 3, 1)
        z = torch.matmul(z, self.w_out) if self.bias is None else torch.addmm(
            self.bias, z.reshape(-1, z.shape[-1]), self.w_out).reshape(*z.shape[:-1], -1)
        return z.permute(0, 3, 1, 2)

    def _forward_chunked(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        # A few images at a time: the R-channel intermediates stay in L2 between the three layers
        # instead of streaming through DRAM; the last GEMM writes straight into its slice of the output.
        n = x.shape[0]
        xh = x.permute(0, 2, 3, 1)
        t = self.w_out.shape[1]
        out = None
        for i in range(0, n, chunk):
            y = torch.matmul(xh[i:i + chunk], self.w_in).permute(0, 3, 1, 2)
            for m in self.mids:
                y = m(y)
            z = y.permute(0, 2, 3, 1)
            if out is None:
                out = z.new_empty((n, z.shape[1], z.shape[2], t))
            o = out[i:i + chunk].view(-1, t)
            z2 = z.reshape(-1, z.shape[-1])
            if self.bias is None:
                torch.mm(z2, self.w_out, out=o)
            else:
                torch.addmm(self.bias, z2, self.w_out, out=o)
        return out.permute(0, 3, 1, 2)


def band_matrix(taps: torch.Tensor, size: int, *, stride: int, dilation: int,
                pad: tuple[int, int]) -> torch.Tensor:
    """Per-channel banded matrices of a 1-D depthwise correlation: ``(C, out, size)``.

    ``taps`` is ``(C, k)``; row ``o`` of channel ``c`` holds ``taps[c, j]`` at column
    ``o·stride − pad_before + j·dilation`` (columns outside ``[0, size)`` are the zero padding and
    are dropped), so ``band @ x`` equals ``conv1d(x, taps, stride, dilation, padding)`` per channel.
    """
    c, k = taps.shape
    n_out = out_len(size, k, stride, dilation, *pad)
    if n_out < 1:
        raise ValueError(f"input size {size} is smaller than the kernel's reach")
    band = taps.new_zeros((c, n_out, size))
    for o in range(n_out):
        for j in range(k):
            i = o * stride - pad[0] + j * dilation
            if 0 <= i < size:
                band[:, o, i] += taps[:, j]
    return band


class CPBandBlock(nn.Module):
    """A CP4 block as four batched matrix products on the NCHW view (form ``cp4-band``).

    ``x (N, S, H, W)`` → ``W_in (G, R, S/G) @ x (N, G, S/G, H·W)`` → per channel ``Ty (GR, Hout, H) @ y``
    → ``@ Txᵀ (GR, W, Wout)`` → ``W_out (G, T/G, R) @ y (N, G, R, Hout·Wout)`` + bias. The banded
    matrices are built for an input size on first use and cached per size. Zero padding only (other
    padding modes read outside the input); exact re-expression of ``block`` otherwise, any stride,
    dilation and groups. Returns a contiguous (NCHW) tensor whatever the input's layout.
    """

    form = "cp4-band"

    def __init__(self, block: CPBlock):
        super().__init__()
        if block.form != "cp4":
            raise ValueError("the banded form needs a CP4 block (separable spatial factors)")
        if block.geo.padding_mode != "zeros":
            raise ValueError(f"the banded form needs zero padding, not {block.geo.padding_mode!r}")
        first, vert, hor, last = block
        geo, g, r = block.geo, block.geo.groups, block.rank
        self.geo, self.rank = geo, r
        self.register_buffer("w_in", first.weight.detach().reshape(g, r, -1).contiguous())
        self.register_buffer("w_out", last.weight.detach().reshape(g, -1, r).contiguous())
        self.register_buffer("bias", None if last.bias is None else last.bias.detach().reshape(g, -1, 1).clone())
        self.register_buffer("taps_h", vert.weight.detach().reshape(g * r, geo.kh).clone())
        self.register_buffer("taps_w", hor.weight.detach().reshape(g * r, geo.kw).clone())
        self._bands: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def bands(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Ty, Txᵀ)`` for an ``h×w`` input, built once per size."""
        key = (h, w, self.taps_h.dtype, self.taps_h.device)  # a later .double()/.to() builds anew
        if key not in self._bands:
            geo = self.geo
            ty = band_matrix(self.taps_h, h, stride=geo.stride[0], dilation=geo.dilation[0],
                             pad=geo.axis_padding(0))
            tx = band_matrix(self.taps_w, w, stride=geo.stride[1], dilation=geo.dilation[1],
                             pad=geo.axis_padding(1))
            self._bands[key] = (ty.contiguous(), tx.transpose(1, 2).contiguous())
        return self._bands[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, h, w = x.shape
        g = self.geo.groups
        ty, txt = self.bands(h, w)
        y = torch.matmul(self.w_in, x.contiguous().view(n, g, s // g, h * w))
        y = torch.matmul(ty, y.view(n, -1, h, w))
        y = torch.matmul(y, txt)
        ho, wo = y.shape[-2:]
        z = torch.matmul(self.w_out, y.view(n, g, self.rank, ho * wo))
        if self.bias is not None:
            z = z.add_(self.bias)
        return z.view(n, -1, ho, wo)


# Working set (R-channel input + output of the depthwise layer) a chunk of images may occupy.
CHUNK_BYTES = 1 << 20


def chunk_size(block: CPBlock, input_shape) -> int:
    """Images per chunk so the depthwise layer's input and output fit in about :data:`CHUNK_BYTES`."""
    n, _, h, w = input_shape
    gr = block.geo.groups * block.rank
    per_image = 2 * h * w * gr * 4
    return max(1, min(n, CHUNK_BYTES // max(per_image, 1)))


def build_form(block: CPBlock, form: str, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """``block`` re-expressed as ``form`` (one of :data:`FORMS`), eval mode, same device/dtype."""
    if form == "cp4":
        if block.form != "cp4":
            raise ValueError("a CP3 block has no CP4 form")
        out = block
    elif form == "cp3":
        out = block.fused()
    elif form == "cp3-gemm":
        out = CPGemmBlock(block, fused=True)
    elif form == "cp3-gemm-chunked":
        if input_shape is None:
            raise ValueError("the chunked form needs the input shape")
        out = CPGemmBlock(block, fused=True, chunk=chunk_size(block, input_shape))
    elif form == "cp4-band":
        out = CPBandBlock(block)
    elif form == "cp4-fused":
        out = fused.CPFusedBlock(block)
    elif form == "cp4-gemm":
        if block.form != "cp4":
            raise ValueError("a CP3 block has no CP4 form")
        out = CPGemmBlock(block, fused=False)
    else:
        raise ValueError(f"unknown CP form {form!r}; known: {', '.join(FORMS)}")
    return out.eval()


def _candidates(block: CPBlock, layout: str, forms: Iterable[str] | None, input_shape=None,
                skipped: dict[str, str] | None = None) -> list[str]:
    """The forms of ``forms`` (default :data:`DEFAULT_FORMS`) that apply to ``block`` here. A form that
    would apply but cannot run on this machine (the fused kernel not built) goes into ``skipped`` with
    the reason, so the choice records why it was not tried."""
    wanted = list(forms) if forms is not None else list(DEFAULT_FORMS)
    out = []
    for f in wanted:
        if f.endswith("-gemm") and (block.geo.groups != 1 or _memory_format(layout) != torch.channels_last):
            continue  # the GEMM view is free only in channels_last; grouped blocks keep convs
        if f.startswith("cp4") and block.form != "cp4":
            continue
        if f in ("cp4-band", "cp4-fused") and block.geo.padding_mode != "zeros":
            continue
        if f == "cp4-fused":
            p = block[0].weight
            if p.dtype != torch.float32 or p.device.type != "cpu":
                continue
            reason = fused.kernel_status()
            if reason is not None:
                if skipped is not None:
                    skipped[f] = reason
                continue
        if f.endswith("-chunked") and (input_shape is None or chunk_size(block, input_shape) >= input_shape[0]):
            continue  # one chunk is the unchunked form
        out.append(f)
    return out


@dataclass
class BlockChoice:
    """What :func:`optimize_cp_blocks` decided for one block (JSON-able via :meth:`as_dict`)."""

    name: str
    input_shape: tuple[int, ...]
    form: str
    speedup_vs_built: float  # built form's median / chosen form's median (1.0 if unchanged)
    tried: dict  # form -> {"speedup_vs_best": x, "ci": [lo, hi], "rel_error": e} or {"error": ...}

    def as_dict(self) -> dict:
        return asdict(self)


def _capture_inputs(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}
    handles = []
    modules = dict(model.named_modules())
    for name in names:
        def hook(mod, args, _name=name):
            captured[_name] = args[0].detach().clone(memory_format=torch.preserve_format)
        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return captured


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if name == "":
        return new
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    return model


class ConvGemm(nn.Module):
    """A plain ``nn.Conv2d`` that is one matrix product (form ``conv-gemm``), exact.

    Four cases, all ``groups == 1``: a kernel that covers its whole unpadded input (the output is
    1×1: ``addmm(bias, x.flatten(1), Wᵀ)``; the character network's conv3, 8×8 on 8×8, is one); a
    1×1 stride-1 unpadded kernel (``W @ x`` per image on the NCHW view, or ``x @ Wᵀ`` on the
    channels-last view); a ``kh×1`` kernel that covers the input's whole height (``rows``: one
    ``(N·W, S·H) @ Wᵀ``; the first layer of a spatial SVD of a kernel that
    covers its input, e.g. the character network's conv3 as 8×1 then 1×8, where oneDNN runs a general
    conv); and a layer with at most :data:`IM2COL_MAX_IN` input channels — a network's
    first layer — as ``W @ unfold(x)`` (im2col: the patches are small, and a direct conv kernel
    vectorised over input channels has almost nothing to vectorise; the character network's conv1,
    9×9 on one channel, is one).
    PyTorch's CPU conv takes a general path for the first (measured here at batch 1: 1.46 ms as a conv,
    0.32 ms as the GEMM it is). Applied to plain convs in *both* arms of a comparison, so an optimising
    backend does not flatter the compressed network with a slow baseline.
    """

    form = "conv-gemm"

    def __init__(self, conv: nn.Conv2d, input_shape: tuple[int, ...]):
        super().__init__()
        self.kind = conv_gemm_kind(conv, input_shape)
        if self.kind is None:
            raise ValueError("this conv is not a single matrix product")
        w = conv.weight.detach().reshape(conv.weight.shape[0], -1)  # (T, S·kh·kw)
        # Wᵀ contiguous, not a transposed view: addmm on the view measured 1.61 ms against 1.14 ms at
        # batch 32 for charnet's conv3. W itself is kept only where it is used (pointwise on NCHW, im2col).
        self.register_buffer("wt", w.t().contiguous() if self.kind in ("cover", "pointwise", "rows") else None)
        self.register_buffer("w", w.clone() if self.kind in ("pointwise", "im2col") else None)
        self.unfold = None
        if self.kind == "im2col":
            self.geo = geometry(conv)
            self.unfold = dict(kernel_size=conv.kernel_size, dilation=conv.dilation, stride=conv.stride,
                               padding=self.geo.symmetric_padding())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def _patches(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """``unfold(x)`` as one strided copy: ``(N, S·kh·kw, Hout·Wout)``, (S, kh, kw) major to minor,
        with ``Hout, Wout``.

        A strided view of the (zero-padded) NCHW input copied once by ``reshape``: 5.5 µs against
        35 µs for ``F.unfold`` on the character network's 1×24×24 input, 0.19 ms against 0.92 ms at
        batch 32 (measured here).
        """
        u = self.unfold
        (ph, pw), (dh, dw), (kh, kw), (sh, sw) = u["padding"], u["dilation"], u["kernel_size"], u["stride"]
        xp = x.contiguous()
        if ph or pw:
            xp = nn.functional.pad(xp, (pw, pw, ph, ph))
        n, c, h, w = x.shape
        ho, wo = self.geo.out_hw((h, w))
        s_n, s_c, s_h, s_w = xp.stride()
        view = xp.as_strided((n, c, kh, kw, ho, wo), (s_n, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw))
        return view.reshape(n, c * kh * kw, ho * wo), ho, wo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, h, w = x.shape
        if self.kind == "im2col":
            cols, ho, wo = self._patches(x)
            if n == 1 and self.bias is not None:
                # one addmm, the bias in the GEMM, against matmul (a batched product of one) and add_: the
                # character network's conv1 at batch 1, one thread, timed as an interleaved pair (time_pair),
                # two runs: 1.23x [1.18, 1.28] (94.3 -> 76.6 us) and 1.20x [1.18, 1.23] (84.6 -> 70.5 us)
                y = torch.addmm(self.bias[:, None], self.w, cols[0])
            else:
                y = torch.matmul(self.w, cols)
                if self.bias is not None:
                    y = y.add_(self.bias[:, None])
            y = y.view(n, -1, ho, wo)
            channels_last = is_channels_last(x)
            return y.contiguous(memory_format=torch.channels_last) if channels_last else y
        if self.kind == "rows":
            # one GEMM (N·W, S·H) @ (S·H, T): the columns of every image as the rows of one matrix (a
            # transposed view at batch 1, one copy above). Not W @ x per image, (T, S·H) @ (S·H, W): with
            # W = 8 columns that skinny product ran no faster than oneDNN's conv (charnet's conv3 as an
            # 8x1 layer of rank 96, one thread: conv 344 us, W @ x 331 us, this 35 us; at batch 32 W @ x
            # was 5x slower than the conv, this within 5% of it at rank 96 and 1.2x faster at 170; measured
            # interleaved on a loaded host. The backend times it against the conv and keeps the faster)
            channels_last = is_channels_last(x)
            rows = x.contiguous().view(n, s * h, w).transpose(1, 2).reshape(n * w, s * h)
            y = rows @ self.wt if self.bias is None else torch.addmm(self.bias, rows, self.wt)
            y = y.view(n, w, -1).permute(0, 2, 1).unsqueeze(2)  # (N, T, 1, W) in channels-last strides
            return y if channels_last else y.contiguous()
        if self.kind == "cover":
            flat = x.reshape(n, -1)
            y = flat @ self.wt if self.bias is None else torch.addmm(self.bias, flat, self.wt)
            return y.view(n, -1, 1, 1)
        if is_channels_last(x):
            y = torch.matmul(x.permute(0, 2, 3, 1), self.wt)
            if self.bias is not None:
                y = y.add_(self.bias)
            return y.permute(0, 3, 1, 2)
        y = torch.matmul(self.w, x.contiguous().view(n, s, h * w))
        if self.bias is not None:
            y = y.add_(self.bias[:, None])
        return y.view(n, -1, h, w)


# Input channels up to which a plain conv is offered as im2col + GEMM (a network's first layer).
IM2COL_MAX_IN = 4


def conv_gemm_kind(conv: nn.Module, input_shape: tuple[int, ...]) -> str | None:
    """"cover", "pointwise", "rows", "im2col" or None: whether (and how) ``conv`` on ``input_shape`` is one GEMM."""
    if type(conv) is not nn.Conv2d or conv.groups != 1 or conv.padding_mode != "zeros":
        return None
    pad = geometry(conv).symmetric_padding()
    h, w = input_shape[-2:]
    kh, kw = conv.kernel_size
    if pad == (0, 0) and (kh, kw) == (h, w):
        return "cover"
    if pad == (0, 0) and (kh, kw) == (1, 1) and conv.stride == (1, 1):
        return "pointwise"
    if pad == (0, 0) and kh == h and kw == 1 and conv.stride[1] == 1 and conv.dilation[0] == 1:
        return "rows"
    if pad is not None and conv.in_channels <= IM2COL_MAX_IN:
        return "im2col"
    return None


def _plain_convs(model: nn.Module) -> list[str]:
    """Names of the ``nn.Conv2d`` modules that are not part of a CP block (those are rebuilt whole)."""
    blocks = [n for n, m in model.named_modules() if isinstance(m, CPBlock)]
    out = []
    for name, m in model.named_modules():
        if type(m) is nn.Conv2d and not any(b == "" or name.startswith(b + ".") for b in blocks):
            out.append(name)
    return out


# -- the choices, remembered per machine -------------------------------------------------------
# A backend's choice of form is a short timed comparison; made again in every cell and every run, it
# can flip between two forms within a few percent of each other, and each run then times a different
# program (a between-run difference no interval covers), and it cost ~5 s per cell of the default
# matrix. Like FFTW's wisdom, the choice is therefore kept per machine, layout, threads, block
# structure (its modules without their weights) and input shape; a remembered form is still checked
# for exactness on the real weights before use. `cpbench run --no-cache` chooses afresh.
_CHOICES_VERSION = 1
_CHOICE_STORE: Any = None
#: Bumped when an execution form is added or changed, so timings kept elsewhere (the tune's latency
#: table) are not reused across it. 2: ConvGemm's ``rows`` kind.
FORMS_VERSION = 2


def use_choice_store(store: Any) -> None:
    """Remember form choices in ``store`` (``get(key)``/``put(key, value)``, e.g. a
    :class:`cpbench.tune.store.JsonStore` in the cache; None: choose afresh every time)."""
    global _CHOICE_STORE
    _CHOICE_STORE = store


def _choice_key(module: nn.Module, shape: tuple, layout: str, threads: int | None, built: str,
                forms: list[str]) -> str:
    from ..measure.machine import static_machine_info
    from ..run.cache import key_of

    m = static_machine_info()
    machine = {k: m.get(k) for k in ("hostname", "cpu_model", "logical_cores", "torch", "cpu_capability")}
    # A new build of the fused kernel (another source, compiler or torch) may be faster or slower than the
    # one a remembered choice was timed against: its build key is part of the choice's.
    kernel = fused.loaded_build_key() if "cp4-fused" in forms else None
    return key_of("form-choice", _CHOICES_VERSION, machine, repr(module), list(shape), layout, threads, built,
                  sorted(forms), torch.get_num_threads() if threads is None else threads, kernel)


__all__.append("use_choice_store")


def optimize_cp_blocks(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    layout: str = "contiguous",
    threads: int | None = None,
    budget: TimingBudget | None = None,
    forms: Iterable[str] | None = None,
    clock: Callable[[], float] | None = None,
    convs: bool = True,
    chosen: dict[str, str] | None = None,
) -> tuple[nn.Module, list[BlockChoice]]:
    """A copy of ``model`` (eval, in ``layout``) with each CPBlock — and each plain conv that is one
    matrix product — in its fastest exact form.

    Parameters
    ----------
    model : any module; every :class:`~cpbench.layers.CPBlock` in it is considered (the model itself
        may be one).
    example_input : a real input (N, C, H, W); the block inputs are captured from one forward pass.
    layout : "contiguous" (NCHW) or "channels_last"; the copy and the timing use it.
    threads : thread count to time at (pools restored afterwards); None leaves them as they are.
    budget : timing budget per candidate comparison; default :data:`QUICK_BUDGET`.
    forms : the CP-block candidates (default :data:`DEFAULT_FORMS`, those of them that apply).
    convs : also consider :class:`ConvGemm` for plain ``nn.Conv2d`` layers outside CP blocks (default
        True): a backend gives the baseline network the same treatment as the compressed one.
    chosen : replay earlier choices instead of timing: ``{name: form}`` as in the ``choices`` of an
        earlier call (see :func:`replayed_choices`). A worker process timing the same pair builds
        exactly the forms the parent chose, so the processes measure one prepared model, not each its
        own pick from a short and noisy comparison.

    Returns
    -------
    (model_copy, choices) where ``choices`` lists one :class:`BlockChoice` per CP block, then one per
    plain conv that had a candidate. A candidate is kept only if its output matches the built
    module's to ``1e-5`` relative and it is faster (point estimate of the paired median ratio > 1).
    """
    budget = budget or QUICK_BUDGET
    kwargs = {} if clock is None else {"clock": clock}
    work = as_layout(copy.deepcopy(model).eval(), layout)
    x = as_layout(example_input, layout)
    names = [n for n, m in work.named_modules() if isinstance(m, CPBlock)]
    conv_names = _plain_convs(work) if convs else []
    if not names and not conv_names:
        return work, []
    inputs = _capture_inputs(work, x, names + conv_names)
    choices: list[BlockChoice] = []

    def choose(name: str, module: nn.Module, built: str, cands: list[tuple[str, Callable[[], nn.Module]]],
               skipped: dict[str, str] | None = None):
        xin = inputs[name]
        if chosen is not None:
            form = chosen.get(name or "<model>", built)
            make = dict(cands).get(form)
            pick = module if make is None else as_layout(make(), layout)
            choices.append(BlockChoice(name or "<model>", tuple(xin.shape), form if make else built, 1.0,
                                       {"replayed": True}))
            return pick
        ref = module(xin)
        store = _CHOICE_STORE
        key = _choice_key(module, tuple(xin.shape), layout, threads, built, [f for f, _ in cands]) if store is not None else None
        hit = store.get(key) if store is not None else None
        if hit is not None:
            form = hit["form"]
            make = dict(cands).get(form)
            try:
                pick = module if make is None else as_layout(make(), layout)
                ok = make is None or rel_error(pick(xin), ref) <= MATCH_RTOL
            except Exception:  # noqa: BLE001 - a remembered form that cannot run here is chosen afresh
                ok = False
            if ok:
                choices.append(BlockChoice(name or "<model>", tuple(xin.shape), form, float(hit["speed_vs_built"]),
                                           {**hit["tried"], "remembered": True}))
                return pick
        best_form, best = built, module
        speed_vs_built = 1.0
        tried: dict = {form: {"error": reason} for form, reason in (skipped or {}).items()}
        for form, make in cands:
            try:
                cand = as_layout(make(), layout)
                err = rel_error(cand(xin), ref)
            except Exception as exc:  # a form that cannot run here is simply not chosen
                tried[form] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            if err > MATCH_RTOL:
                tried[form] = {"rel_error": err, "error": "output mismatch"}
                continue
            cur, b = best, cand
            pt = time_pair(lambda: cur(xin), lambda: b(xin), budget, **kwargs)
            tried[form] = {"speedup_vs_best": pt.speedup, "ci": list(pt.speedup_ci), "rel_error": err,
                           "vs": best_form}
            if pt.speedup > 1.0:
                best_form, best = form, cand
                speed_vs_built *= pt.speedup
        choices.append(BlockChoice(name or "<model>", tuple(xin.shape), best_form, speed_vs_built, tried))
        if store is not None:
            store.put(key, {"form": best_form, "speed_vs_built": speed_vs_built, "tried": jsonable_tried(tried)})
        return best

    with thread_limits(threads), torch.inference_mode():
        for name in names:
            block = work.get_submodule(name) if name else work
            shape = tuple(inputs[name].shape)
            skipped: dict[str, str] = {}
            cands = [(f, lambda f=f: build_form(block, f, shape))
                     for f in _candidates(block, layout, forms, shape, skipped) if f != block.form]
            best = choose(name, block, block.form, cands, skipped)
            if best is not block:
                work = _set_submodule(work, name, best)
        for name in conv_names:
            conv = work.get_submodule(name) if name else work
            shape = tuple(inputs[name].shape)
            if conv_gemm_kind(conv, shape) is None:
                continue
            best = choose(name, conv, "conv", [("conv-gemm", lambda c=conv, s=shape: ConvGemm(c, s))])
            if best is not conv:
                work = _set_submodule(work, name, best)
    # The whole copy must still compute the same function.
    with torch.inference_mode():
        err = rel_error(work(x), as_layout(copy.deepcopy(model).eval(), layout)(x))
    if err > MATCH_RTOL * 10:
        raise AssertionError(f"optimized model differs from the original by {err:.2e} (relative)")
    return work, choices


def jsonable_tried(tried: dict) -> dict:
    """What the choice measured, as JSON (tuples and tensors are not)."""
    import json

    return json.loads(json.dumps(tried, default=repr))


def replayed_choices(info: dict) -> dict[str, str] | None:
    """``{name: form}`` from a backend's ``info["cp_forms"]`` (None when it made no choices)."""
    forms = info.get("cp_forms")
    if forms is None:
        return None
    return {c["name"]: c["form"] for c in forms}


__all__.append("replayed_choices")


def apply_forms(model: nn.Module, form: str, *, layout: str = "contiguous") -> nn.Module:
    """A copy of ``model`` with every CPBlock rebuilt as ``form`` where it applies (no timing)."""
    work = as_layout(copy.deepcopy(model).eval(), layout)
    for name in [n for n, m in work.named_modules() if isinstance(m, CPBlock)]:
        block = work.get_submodule(name) if name else work
        if form in _candidates(block, layout, [form]):
            work = _set_submodule(work, name, as_layout(build_form(block, form), layout))
    return work


__all__.append("apply_forms")
