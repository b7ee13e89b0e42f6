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

import torch
from torch import nn

from .layers import CPBlock
from .threads import thread_limits
from .timing import TimingBudget, time_pair

__all__ = [
    "FORMS",
    "DEFAULT_FORMS",
    "QUICK_BUDGET",
    "BlockChoice",
    "CPGemmBlock",
    "as_layout",
    "build_form",
    "configure_malloc",
    "chunk_size",
    "optimize_cp_blocks",
    "rel_error",
]

FORMS = ("cp4", "cp3", "cp3-gemm", "cp3-gemm-chunked", "cp4-gemm")
# Tried by default. The chunked and cp4-gemm forms never won a layer-suite block on this machine once
# large blocks stay in the heap (configure_malloc), so they are opt-in via ``forms=``.
DEFAULT_FORMS = ("cp4", "cp3", "cp3-gemm")
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


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (0 when both are zero)."""
    out = out.detach().float().to_dense() if out.is_mkldnn else out.detach().float()
    ref = ref.detach().float().to_dense() if ref.is_mkldnn else ref.detach().float()
    scale = ref.abs().max().item()
    diff = (out - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


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
    elif form == "cp4-gemm":
        if block.form != "cp4":
            raise ValueError("a CP3 block has no CP4 form")
        out = CPGemmBlock(block, fused=False)
    else:
        raise ValueError(f"unknown CP form {form!r}; known: {', '.join(FORMS)}")
    return out.eval()


def _candidates(block: CPBlock, layout: str, forms: Iterable[str] | None, input_shape=None) -> list[str]:
    wanted = list(forms) if forms is not None else list(DEFAULT_FORMS)
    out = []
    for f in wanted:
        if f.endswith("-gemm") and (block.geo.groups != 1 or _memory_format(layout) != torch.channels_last):
            continue  # the GEMM view is free only in channels_last; grouped blocks keep convs
        if f.startswith("cp4") and block.form != "cp4":
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


def optimize_cp_blocks(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    layout: str = "contiguous",
    threads: int | None = None,
    budget: TimingBudget | None = None,
    forms: Iterable[str] | None = None,
    clock: Callable[[], float] | None = None,
) -> tuple[nn.Module, list[BlockChoice]]:
    """A copy of ``model`` (eval, in ``layout``) with each CPBlock in its fastest exact form.

    Parameters
    ----------
    model : any module; every :class:`~cpbench.layers.CPBlock` in it is considered (the model itself
        may be one).
    example_input : a real input (N, C, H, W); the block inputs are captured from one forward pass.
    layout : "contiguous" (NCHW) or "channels_last"; the copy and the timing use it.
    threads : thread count to time at (pools restored afterwards); None leaves them as they are.
    budget : timing budget per candidate comparison; default :data:`QUICK_BUDGET`.
    forms : the candidates (default :data:`DEFAULT_FORMS`, those of them that apply).

    Returns
    -------
    (model_copy, choices) where ``choices`` lists one :class:`BlockChoice` per CP block.
    A candidate is kept only if its output matches the built block's to ``1e-5`` relative and it is
    faster (point estimate of the paired median ratio > 1).
    """
    budget = budget or QUICK_BUDGET
    kwargs = {} if clock is None else {"clock": clock}
    work = as_layout(copy.deepcopy(model).eval(), layout)
    x = as_layout(example_input, layout)
    names = [n for n, m in work.named_modules() if isinstance(m, CPBlock)]
    if not names:
        return work, []
    inputs = _capture_inputs(work, x, names)
    choices: list[BlockChoice] = []
    with thread_limits(threads), torch.inference_mode():
        for name in names:
            block = work.get_submodule(name) if name else work
            xin = inputs[name]
            ref = block(xin)
            best_form, best = block.form, block
            speed_vs_built = 1.0
            tried: dict = {}
            for form in _candidates(block, layout, forms, tuple(xin.shape)):
                if form == block.form:
                    continue
                try:
                    cand = as_layout(build_form(block, form, tuple(xin.shape)), layout)
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
            if best is not block:
                work = _set_submodule(work, name, best)
            choices.append(BlockChoice(name or "<model>", tuple(xin.shape), best_form, speed_vs_built, tried))
    # The whole copy must still compute the same function.
    with torch.inference_mode():
        err = rel_error(work(x), as_layout(copy.deepcopy(model).eval(), layout)(x))
    if err > MATCH_RTOL * 10:
        raise AssertionError(f"optimized model differs from the original by {err:.2e} (relative)")
    return work, choices


def apply_forms(model: nn.Module, form: str, *, layout: str = "contiguous") -> nn.Module:
    """A copy of ``model`` with every CPBlock rebuilt as ``form`` where it applies (no timing)."""
    work = as_layout(copy.deepcopy(model).eval(), layout)
    for name in [n for n, m in work.named_modules() if isinstance(m, CPBlock)]:
        block = work.get_submodule(name) if name else work
        if form in _candidates(block, layout, [form]):
            work = _set_submodule(work, name, as_layout(build_form(block, form), layout))
    return work


__all__.append("apply_forms")
