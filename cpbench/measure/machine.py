"""What machine a measurement ran on: CPU, cores, thread pools, library versions, governor.

The static part (CPU model, core counts, versions, hostname) is probed once per process; the thread
settings are read fresh on every call because the harness changes them between cells.
"""
from __future__ import annotations

import functools
import os
import platform
import re
import socket

import torch

from .threads import thread_state

__all__ = ["machine_info", "static_machine_info"]

_GOVERNOR = "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"
# Environment variables that change how the native thread pools and the allocator behave.
_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "KMP_AFFINITY",
        "MKL_NUM_THREADS", "OMP_PROC_BIND", "LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "CPBENCH_OMP_WAIT_POLICY")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _cpu_model() -> str | None:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _physical_cores() -> int | None:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except Exception:  # psutil missing or unable to read: fall back to /proc/cpuinfo
        pass
    text = _read("/proc/cpuinfo") or ""
    pairs = set()
    phys = core = None
    for line in text.splitlines() + [""]:
        if line.startswith("physical id"):
            phys = line.split(":", 1)[1].strip()
        elif line.startswith("core id"):
            core = line.split(":", 1)[1].strip()
        elif not line.strip():
            if core is not None:
                pairs.add((phys, core))
            phys = core = None
    return len(pairs) or None


def _config_version(config: str, pattern: str) -> str | None:
    m = re.search(pattern, config)
    return m.group(1).strip() if m else None


@functools.lru_cache(maxsize=1)
def static_machine_info() -> dict:
    """The parts that cannot change while the process runs (computed once, then cached)."""
    config = torch.__config__.show()
    mkldnn_version = None
    try:
        v = torch._C._get_mkldnn_version()  # (major, minor, patch) in recent torch
        mkldnn_version = ".".join(str(p) for p in v)
    except Exception:
        mkldnn_version = _config_version(config, r"(?:oneDNN|MKL-DNN)\s*v?([0-9][^\s(]*)")
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "mkl_available": torch.backends.mkl.is_available(),
        "mkl_version": _config_version(config, r"Intel\(R\) (?:oneAPI )?Math Kernel Library Version ([^\n]*?)(?: for|\n)"),
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "onednn_version": mkldnn_version,
        "openmp": _config_version(config, r"OpenMP\s+([0-9]+)"),
        "cpu_capability": _config_version(config, r"CPU capability usage:\s*(\S+)"),
    }


def machine_info() -> dict:
    """Static machine facts plus the current thread settings and CPU frequency governor.

    Keys: cpu_model, logical_cores, physical_cores, hostname, python, platform, torch, mkl_available,
    mkl_version, mkldnn_available, onednn_version, openmp, cpu_capability, governor (None when the
    sysfs file is not readable, e.g. in most VMs), threads (:func:`cpbench.threads.thread_state`),
    env (thread-pool / allocator environment variables that are set), load_average (1, 5, 15 min).
    """
    info = dict(static_machine_info())
    info["governor"] = _read(_GOVERNOR)
    info["env"] = {k: os.environ[k] for k in _ENV if k in os.environ}
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        info["load_average"] = None
    info["threads"] = thread_state()
    return info
