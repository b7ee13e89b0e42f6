"""OpenMP settings for the timing scripts, applied from their command line before torch loads.

Imports nothing heavy: libgomp reads OMP_WAIT_POLICY and GOMP_SPINCOUNT once, when it loads with
torch, so a script calls :func:`early_wait_policy` before importing torch or cpbench (``import cpbench``
sets its own PASSIVE default otherwise).
"""
from __future__ import annotations

import os

# OpenMP's wait policy is read once, when libgomp loads with torch, so it is set (or not) before that
# import, and cpbench's own default (PASSIVE, set on import) is kept out of the way. Default here: leave
# libgomp's default (spin briefly, then sleep). On a quiet machine that is right for both arms; PASSIVE
# (workers always sleep) adds a wake-up to every parallel region, tens of microseconds on this VM, and a
# CP block run as several ops pays it several times where the dense conv pays it once (measured at 2
# threads, batch 1: the character network's conv2 CP3 block 0.44 ms with PASSIVE against 0.11 ms on one
# thread; AlexNet conv2's dense conv was barely affected). Under load from other processes, spinning
# workers fight them (measured earlier: a 2-thread batch-1 AlexNet conv2 took 44 ms with spinning, 4.8 ms
# with PASSIVE): there, pass --omp-wait-policy PASSIVE. Both arms always run with the same policy.
#
# How long idle workers spin is read at the same moment (GOMP_SPINCOUNT). libgomp's default, 300,000
# spins, keeps a worker busy for milliseconds after every parallel region, and when the two arms of a pair
# run on different thread pools (ONNX Runtime's against PyTorch's OpenMP one) the spinning OpenMP worker
# takes a core from the ONNX Runtime arm that runs next: measured at 2 threads, ONNX Runtime's VGG-16
# conv3_1 at batch 1 took 8.9 ms interleaved with the fused CP block, 5.6-5.8 ms with short spinning, and
# the character network's conv2 at batch 32 9.9 ms against 6.3-6.5 ms (an ONNX Runtime baseline then
# flattered every compressed arm by up to 50%). 10,000 spins keep workers awake between the regions of
# one call (the fused block was as fast as with the default) and idle them within a fraction of a
# millisecond; at 1,000 the fused block paid wake-ups (AlexNet conv2 at batch 1: 0.17 -> 0.24 ms).
# --gomp-spincount default leaves libgomp's.
GOMP_SPINCOUNT = "10000"


def early_arg(argv: list[str], flag: str, default: str) -> str:
    for i, a in enumerate(argv):
        if a.startswith(flag):
            return a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else default)
    return default


def early_wait_policy(argv: list[str]) -> str | None:
    policy = early_arg(argv, "--omp-wait-policy", "default")
    spin = early_arg(argv, "--gomp-spincount", GOMP_SPINCOUNT)
    if spin.lower() != "default":
        os.environ["GOMP_SPINCOUNT"] = spin
    else:
        os.environ.pop("GOMP_SPINCOUNT", None)
    if policy.lower() != "default":
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    else:
        os.environ.pop("OMP_WAIT_POLICY", None)
        import torch  # noqa: F401  (libgomp reads its policy now, before cpbench's setdefault)
    return os.environ.get("OMP_WAIT_POLICY", "default")
