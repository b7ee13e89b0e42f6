"""The fused CP-block kernel (form ``cp4-fused``): one C++ operator for the whole 4-layer block.

Run as four layers, a CP block's R-channel intermediates stream through memory three times and each
layer pays a dispatch; its two depthwise layers, with a few percent of the FLOPs, took a quarter of the
block's time here. The operator (``kernels/cp_fused.cpp``) computes the block on NHWC intermediates in
bands of output rows so each band's intermediates stay in cache: the first 1×1 layer as a GEMM on just
the input rows the band needs, the vertical and horizontal taps in loops vectorised over channels with
the taps in registers, the last 1×1 layer as a GEMM (plus bias) into the band's rows of the output.
With AVX-512 the GEMMs are the kernel's own 14×32 register-blocked micro-kernel over weights packed
once here (:func:`pack_panels`), with AVX2 and FMA a 6×16 one over the same panels; MKL's sgemm
re-packs its operands on every call, which cost a band's small GEMMs ~30% (measured on AlexNet conv2 at
R=100: the banded MKL GEMMs took 1.3× their whole-image time; the AVX2 path's gain is in docs/speed.md).
A build with neither (``--march x86-64-v2``) uses MKL's GEMMs and plain taps loops. Images (or row
ranges, when there are fewer images than threads) run in parallel on PyTorch's intra-op pool.

The kernel is built by an explicit step, ``cpbench build-kernel`` (:func:`build_kernel`: g++ and ninja
through ``torch.utils.cpp_extension``, about a minute), into a directory named by its build key (every
build input: the source, the flags, the CPU, the compiler and its version, torch, Python). Nothing else
compiles it: :func:`load_kernel` and :func:`kernel_available` only load a build made for this key, so a
backend's ``prepare`` or a test run never waits for a compiler. Where it is not built (or cannot be),
the ``cp4-fused`` form is simply not offered and the optimiser picks among the other forms; the reason
is recorded with the choices. The loaded operator is ``torch.ops.cpbench.cp_fused``, with a fake
implementation (:func:`_fake_cp_fused`), so ``torch.compile`` and ``torch.export`` carry it.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from ..errors import BackendError
from ..nn.layers import CPBlock, out_len

__all__ = ["CPFusedBlock", "Kernel", "KernelBuild", "pack_panels", "block_tensors", "geometry_arguments",
           "kernel_arguments", "simd_of", "loaded_build_key", "build_kernel", "load_kernel", "kernel_available",
           "kernel_status", "build_inputs", "build_key", "kernel_dir", "BAND_BYTES", "MIN_PARALLEL_MACS",
           "CACHE_BYTES"]

SOURCE = Path(__file__).with_name("cp_fused.cpp")
# -fopenmp: at::parallel_for is inline (ATen/ParallelOpenMP.h); without it the "parallel" loop runs on
# one thread and every GEMM inside wakes MKL's pool instead. The libgomp it links is the one PyTorch
# ships and has already loaded (same soname), so there is one OpenMP runtime in the process.
CFLAGS = ["-O3", "-ffp-contract=fast", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
# The build for this CPU; another target (e.g. "x86-64-v3": AVX2, no AVX-512) is built beside it on
# request and registers its operator under its own namespace.
NATIVE = "native"
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


@dataclass(frozen=True)
class Kernel:
    """A loaded build: the Python-callable function (eager calls), the torch operator (traced calls)
    the micro-kernel's panel width (0: this build has none) and its vector extension (``"avx512"``,
    ``"avx2"``, or ``"none"``: plain loops and MKL's GEMMs)."""

    march: str
    key: str
    path: Path
    module: ModuleType = field(repr=False)
    op: object = field(repr=False)
    panel: int
    simd: str = "none"


@dataclass(frozen=True)
class KernelBuild:
    """What :func:`build_kernel` did: the loaded kernel, whether it was already built, how long it took."""

    kernel: Kernel
    cached: bool
    seconds: float
    inputs: dict


_LOADED: dict[str, Kernel] = {}
_BUILD_LOCK = ".cpbench-build.lock"  # see build_kernel
_FAKES: set[str] = set()


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _compiler(cxx: str) -> dict:
    """The C++ compiler torch.utils.cpp_extension will run (``$CXX`` or ``c++``) and its version line."""
    path = shutil.which(cxx)
    version = None
    if path:
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
            version = (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else None
        except (OSError, subprocess.SubprocessError):
            version = None
    return {"cxx": cxx, "path": path, "version": version}


def _tag(march: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in march)


def _namespace(march: str) -> str:
    return "cpbench" if march == NATIVE else f"cpbench_{_tag(march)}"


def _flags(march: str) -> list[str]:
    return CFLAGS + [f"-march={march}", f"-DCPBENCH_OP_NAMESPACE={_namespace(march)}"]


def build_inputs(march: str = NATIVE) -> dict:
    """Everything the build depends on; :func:`build_key` hashes it. A ``native`` build is valid only
    on the CPU it was made for, hence the CPU's flags."""
    return {
        "source_sha256": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
        "cflags": _flags(march), "ldflags": list(LDFLAGS), "march": march,
        "cpu": _cpu_id() if march == NATIVE else None,
        "compiler": _compiler(os.environ.get("CXX", "c++")),
        "torch": torch.__version__, "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "python": f"{sys.implementation.cache_tag}-{platform.machine()}",
    }


def build_key(march: str = NATIVE) -> str:
    canon = json.dumps(build_inputs(march), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def kernel_dir() -> Path:
    """Where builds live: ``$CPBENCH_KERNEL_DIR``, else ``~/.cache/cpbench/kernels``; one folder per key."""
    root = os.environ.get("CPBENCH_KERNEL_DIR")
    return Path(root) if root else Path.home() / ".cache" / "cpbench" / "kernels"


def _name(march: str, key: str) -> str:
    return f"cpbench_cp_fused_{_tag(march)}_{key}"


def _library(march: str) -> tuple[str, str, Path]:
    key = build_key(march)
    name = _name(march, key)
    return key, name, kernel_dir() / name / f"{name}.so"


def _register(march: str, key: str, path: Path, module: ModuleType) -> Kernel:
    ns = module.op_namespace
    op = getattr(torch.ops, ns).cp_fused
    if ns not in _FAKES:  # once per process and namespace (torch.library refuses a second)
        torch.library.register_fake(f"{ns}::cp_fused")(_fake_cp_fused)
        _FAKES.add(ns)
    kernel = _LOADED[march] = Kernel(march, key, path, module, op, int(module.panel), simd_of(module))
    return kernel


def load_kernel(march: str = NATIVE) -> Kernel:
    """The built kernel for this machine (loaded once per process). Raises
    :class:`~cpbench.errors.BackendError` (one line) if there is no build for the current build key:
    this never compiles (that is :func:`build_kernel`, ``cpbench build-kernel``)."""
    if march in _LOADED:
        return _LOADED[march]
    key, name, path = _library(march)
    if not path.is_file():
        raise BackendError(f"the fused CP kernel is not built for this machine (build key {key}): run "
                           f"`cpbench build-kernel`{'' if march == NATIVE else f' --march {march}'}")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise BackendError(f"the fused CP kernel at {path} does not load ({type(exc).__name__}: {exc}); "
                           f"rebuild it with `cpbench build-kernel`") from exc
    return _register(march, key, path, module)


def simd_of(module: ModuleType) -> str:
    """A build's vector extension; builds of sources older than the AVX2 path say only their panel width."""
    return str(getattr(module, "simd", "avx512" if module.panel else "none"))


def loaded_build_key(march: str = NATIVE) -> str | None:
    """The build key of the kernel this process runs (loaded once), or None where it is not built: what a
    cached timing made with the kernel is keyed by, so a new build is timed anew."""
    try:
        return load_kernel(march).key
    except BackendError:
        return None


def build_kernel(march: str = NATIVE, *, verbose: bool = False) -> KernelBuild:
    """Build the kernel for this machine (or load the build already made for the same key) and load it.

    Raises :class:`~cpbench.errors.BackendError` with the compiler's last line if it cannot be built
    (no compiler, no headers, a build error)."""
    t0 = time.perf_counter()
    try:
        return KernelBuild(load_kernel(march), True, time.perf_counter() - t0, build_inputs(march))
    except BackendError:
        pass
    from torch.utils import cpp_extension

    inputs = build_inputs(march)
    key, name, path = _library(march)
    if inputs["compiler"]["path"] is None:
        raise BackendError(f"the fused CP kernel cannot be built: no C++ compiler {inputs['compiler']['cxx']!r} "
                           "on PATH (set CXX, or install g++)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # torch's extension builder guards a build folder with a plain ``lock`` file that a killed build
    # leaves behind, and every later build then waits on it forever, silently. cpbench's builds of one
    # key take an OS lock instead (released when its holder dies, however it dies): whoever holds it is
    # the only builder, so a ``lock`` file found then is stale and goes.
    import fcntl  # POSIX, like the build itself (g++, ninja); imported here so that loading never needs it

    with open(path.parent / _BUILD_LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another cpbench build of this key: wait for it, then load its build
        try:
            return KernelBuild(load_kernel(march), True, time.perf_counter() - t0, inputs)
        except BackendError:
            pass
        (path.parent / "lock").unlink(missing_ok=True)
        try:
            module = cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=_flags(march),
                                        extra_ldflags=LDFLAGS, build_directory=str(path.parent),
                                        verbose=verbose or bool(os.environ.get("CPBENCH_VERBOSE_BUILD")))
        except Exception as exc:  # compiler missing, headers missing, build error: one line, not a crash
            lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
            raise BackendError(f"the fused CP kernel could not be built ({type(exc).__name__}: "
                               f"{lines[-1] if lines else exc})") from exc
    return KernelBuild(_register(march, key, path, module), False, time.perf_counter() - t0, inputs)


def loaded_marches() -> list[str]:
    """The builds this process has loaded (a timing worker loads the same ones before unpickling models
    that call the operator; loading never compiles, so a worker pays no build)."""
    return list(_LOADED)


def kernel_available(march: str = NATIVE) -> bool:
    """True if the kernel is built for this machine and loads (never compiles)."""
    return kernel_status(march) is None


def kernel_status(march: str = NATIVE) -> str | None:
    """None if the kernel loads here, else the one-line reason it does not."""
    try:
        load_kernel(march)
    except BackendError as exc:
        return str(exc)
    return None


def _fake_cp_fused(x, w_in, taps_v, taps_h, w_out, bias, w_in_packed, w_out_packed, sh, sw, dh, dw, pt, pb, pl, pr,
                   band_bytes, min_parallel_macs, cache_bytes):
    """The operator's output without computing it (shape, dtype, memory format), for tracing."""
    ho = out_len(x.shape[2], taps_v.shape[0], sh, dh, pt, pb)
    wo = out_len(x.shape[3], taps_h.shape[0], sw, dw, pl, pr)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.new_empty((x.shape[0], w_out.shape[0] * w_out.shape[2], ho, wo)).contiguous(memory_format=fmt)


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


def block_tensors(block: CPBlock) -> dict[str, torch.Tensor | None]:
    """A CP4 block's weights as the kernel reads them: ``w_in`` (G, Sg, R), ``taps_v`` (kh, G*R),
    ``taps_h`` (kw, G*R), ``w_out`` (G, R, Tg), ``bias`` (T) or None; in the kernel's argument order."""
    first, vert, hor, last = block
    geo, g, r = block.geo, block.geo.groups, block.rank
    return {"w_in": first.weight.detach().reshape(g, r, -1).transpose(1, 2).contiguous(),
            "taps_v": vert.weight.detach().reshape(g * r, geo.kh).t().contiguous(),
            "taps_h": hor.weight.detach().reshape(g * r, geo.kw).t().contiguous(),
            "w_out": last.weight.detach().reshape(g, -1, r).transpose(1, 2).contiguous(),
            "bias": None if last.bias is None else last.bias.detach().clone()}


def geometry_arguments(block: CPBlock, band_bytes: int = BAND_BYTES, min_parallel_macs: int = MIN_PARALLEL_MACS,
                       cache_bytes: int = CACHE_BYTES) -> tuple[int, ...]:
    """The kernel's arguments after the packed weights: stride, dilation, zero padding, and the tuning."""
    geo = block.geo
    return (geo.stride[0], geo.stride[1], geo.dilation[0], geo.dilation[1], *geo.axis_padding(0),
            *geo.axis_padding(1), int(band_bytes), int(min_parallel_macs), int(cache_bytes))


def kernel_arguments(block: CPBlock, panel: int, **tuning: int) -> tuple:
    """Every argument of ``cp_fused`` after the input, for a build whose micro-kernel reads ``panel``-wide
    panels (:attr:`Kernel.panel`): for timing one build against another (benchmarks/scripts/fused_ab.py)."""
    t = block_tensors(block)
    return (*t.values(), pack_panels(t["w_in"], panel), pack_panels(t["w_out"], panel),
            *geometry_arguments(block, **tuning))


def _repack_after_load(module: "CPFusedBlock", _keys) -> None:
    """A module-level hook (a lambda would keep the block from pickling into a timing worker)."""
    module._repack()


class CPFusedBlock(nn.Module):
    """A CP4 block run by the fused kernel (form ``cp4-fused``); inference only, float32 on CPU.

    Exact re-expression of ``block`` (zero padding, any stride, dilation and groups). The output has the
    input's memory format, and neither layout is copied: NCHW data enters and leaves through the two
    GEMMs as transposed operands (measured at batch 1 on the character network's conv2: 41 µs with an
    explicit transpose in and out, 23 µs for channels-last data). Eager calls go straight to the
    kernel's function; under ``torch.compile`` / ``torch.export`` the block is the operator
    ``torch.ops.cpbench.cp_fused`` (``march`` other than native: that build's namespace).
    """

    form = "cp4-fused"

    def __init__(self, block: CPBlock, band_bytes: int = BAND_BYTES, min_parallel_macs: int = MIN_PARALLEL_MACS,
                 cache_bytes: int = CACHE_BYTES, march: str = NATIVE):
        super().__init__()
        if block.form != "cp4":
            raise ValueError("the fused form needs a CP4 block (separable spatial factors)")
        if block.geo.padding_mode != "zeros":
            raise ValueError(f"the fused form needs zero padding, not {block.geo.padding_mode!r}")
        geo = block.geo
        self.geo, self.rank, self.band_bytes, self.march = geo, block.rank, int(band_bytes), march
        self.min_parallel_macs, self.cache_bytes = int(min_parallel_macs), int(cache_bytes)
        # the kernel's geometry arguments, fixed by the block (zero padding never depends on the input size)
        self._geo_args = geometry_arguments(block, self.band_bytes, self.min_parallel_macs, self.cache_bytes)
        self._kept: tuple | None = None
        for name, tensor in block_tensors(block).items():
            self.register_buffer(name, tensor)
        load_kernel(march)  # fail here, one line, rather than at the first call; not kept (modules deep-copy)
        # The 1x1 weights again, in the micro-kernel's panels: derived, so not in the state dict, and
        # re-derived whenever one is loaded.
        self.register_buffer("w_in_packed", None, persistent=False)
        self.register_buffer("w_out_packed", None, persistent=False)
        self._repack()
        self.register_load_state_dict_post_hook(_repack_after_load)

    def _repack(self) -> None:
        self._kept = None
        panel = load_kernel(self.march).panel
        self.w_in_packed = pack_panels(self.w_in, panel)
        self.w_out_packed = pack_panels(self.w_out, panel)

    def _args(self) -> tuple:
        return (self.w_in, self.taps_v, self.taps_h, self.w_out, self.bias, self.w_in_packed, self.w_out_packed,
                *self._geo_args)

    def _call_args(self) -> tuple:
        """Every kernel argument after the input, kept in a plain tuple until the buffers change: at
        batch 1 a small block runs in ~10 µs, and reading the 7 buffers through ``nn.Module.__getattr__``
        on every call took ~4 µs more."""
        if self._kept is None:
            self._kept = self._args()
        return self._kept

    def _apply(self, fn, recurse=True):
        # .to(), .float(), .to(memory_format=...): new tensors, so the kept arguments go, and the packed
        # weights are derived again (channels_last would otherwise restride the 4-d panels).
        out = super()._apply(fn, recurse)
        self._repack()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = _LOADED.get(self.march) or load_kernel(self.march)
        if torch.compiler.is_compiling():  # traced: the operator, with its fake implementation
            return kernel.op(x, *self._args())
        # The layout (NCHW or channels-last, kept in the output), dtype, device and autograd are checked in
        # C++: at batch 1 the Python-side checks took ~1.5 µs of a ~12 µs call.
        try:
            return kernel.module.cp_fused(x, *self._call_args())
        except RuntimeError as exc:
            if (x.requires_grad and torch.is_grad_enabled()) or x.dtype != torch.float32 or x.device.type != "cpu":
                raise BackendError(f"the fused CP kernel runs float32 CPU inference only, not {x.dtype} on "
                                   f"{x.device.type}{' with gradients' if x.requires_grad else ''}") from exc
            raise
