"""Host contention, measured from inside the guest: a reference GEMM timed by every worker process.

On a shared VM the host's other tenants slow our vCPUs without any sign the guest can read. Measured
here (2-core VM, nothing else running in the guest, one core probed second by second for minutes):
episodes of 10-20 s, a few a minute, in which a 128->128 3x3 convolution at batch 8 ran 1.55x slower,
a 256x256 float32 matmul 1.27x slower and a 16 MB sum 1.2x slower, with 0 steal, no other runnable
thread and the clock at 2000 MHz throughout. The two arms of a pair do not slow alike (a dense conv
more than the 1x1 GEMMs of a CP block), so a process timed in an episode measures another speedup;
in one cell of a 12-cell layer matrix the same baseline conv ran at 15 ms in two processes and 35-38 ms
in three.

The canary: each worker times :data:`CANARY_CALLS` calls of a 256x256 matmul, :data:`CANARY_SAMPLES`
times, right before and right after its timed loop, at the cell's thread count; the slower of the two
medians, over the machine's reference, is the process's ``canary_ratio``. The reference is a low
quantile (:data:`REFERENCE_QUANTILE`) of the last :data:`WINDOW` canaries this machine produced at
that thread count, kept in ``<cache>/machine/canary.json`` per machine: low enough that episodes do
not raise it while they take less than most of the time, a window so that a move to another host
re-learns it. A ratio above :data:`CONTENDED_RATIO` marks the process contended: the machine was busy,
though nothing else in the guest shows it.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["CONTENDED_RATIO", "canary_ms", "CanaryReference", "reference", "contention_now", "contention_reason"]

#: The canary's slowdown against the machine's reference above which a process counts as contended.
#: Between episodes the canary's medians scattered within ±3% of each other; in episodes they were
#: 1.17-1.33x the quiet level.
CONTENDED_RATIO = 1.12
CANARY_SIZE = 256
CANARY_CALLS = 10  # ~3 ms a sample at one thread on this machine
CANARY_SAMPLES = 5
WINDOW = 200
REFERENCE_QUANTILE = 0.2


def canary_ms(samples: int = CANARY_SAMPLES) -> float:
    """Median milliseconds of one 256x256 float32 matmul (each sample :data:`CANARY_CALLS` calls)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(CANARY_SIZE, CANARY_SIZE, generator=g), torch.randn(CANARY_SIZE, CANARY_SIZE, generator=g)
    out = torch.empty(CANARY_SIZE, CANARY_SIZE)
    torch.mm(a, b, out=out)
    ts = []
    for _ in range(samples):
        t = time.perf_counter()
        for _ in range(CANARY_CALLS):
            torch.mm(a, b, out=out)
        ts.append((time.perf_counter() - t) * 1e3 / CANARY_CALLS)
    return statistics.median(ts)


class CanaryReference:
    """The machine's quiet canary level per thread count, from a window of past canaries; ``path``:
    where the window persists (None: in memory only)."""

    def __init__(self, path: Path | None = None, key: str = "") -> None:
        self.path, self.key = path, key
        self._window: dict[str, list[float]] | None = None

    def _load(self) -> dict[str, list[float]]:
        if self._window is None:
            self._window = {}
            if self.path is not None and self.path.exists():
                try:
                    self._window = {k: [float(v) for v in vs] for k, vs in json.loads(self.path.read_text()).get(self.key, {}).items()}
                except (OSError, ValueError, AttributeError, TypeError):  # unreadable: start a new window
                    self._window = {}
        return self._window

    def add(self, threads: int, values: Sequence[float]) -> None:
        w = self._load().setdefault(str(threads), [])
        w.extend(float(v) for v in values if v and v > 0)
        del w[:-WINDOW]
        self._save()

    def level(self, threads: int) -> float | None:
        w = sorted(self._load().get(str(threads), []))
        return w[int(REFERENCE_QUANTILE * (len(w) - 1))] if w else None

    def size(self, threads: int) -> int:
        """How many canaries the window holds at ``threads``."""
        return len(self._load().get(str(threads), []))

    def ratio(self, threads: int, value: float | None) -> float | None:
        lvl = self.level(threads)
        return None if value is None or lvl is None else value / lvl

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            doc = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, ValueError):
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        doc[self.key] = self._window
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh)
            os.replace(tmp, self.path)
        except OSError:  # a read-only cache: the window stays in memory
            pass


_REFERENCE: CanaryReference | None = None


def reference() -> CanaryReference:
    """This machine's reference, persisted under the default cache directory."""
    global _REFERENCE
    if _REFERENCE is None:
        from ..run.cache import default_cache_dir
        from .machine import static_machine_info

        m = static_machine_info()
        key = "|".join(str(m.get(k)) for k in ("hostname", "cpu_model", "logical_cores", "torch"))
        _REFERENCE = CanaryReference(default_cache_dir() / "machine" / "canary.json", key)
    return _REFERENCE


def contention_now(threads: int = 1, *, ref: CanaryReference | None = None, samples: int = 3) -> dict:
    """The canary timed now, in this process at ``threads``, against the machine's reference (the median
    of ``samples`` canaries, ~15 ms each): ``{"threads", "canary_ms", "reference_ms", "window",
    "canary_ratio"}``, ratio None while the window is empty. The canaries join the window, as the
    workers' do."""
    ref = ref or reference()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ms = statistics.median(canary_ms() for _ in range(samples))
    finally:
        torch.set_num_threads(before)
    out = {"threads": threads, "canary_ms": ms, "reference_ms": ref.level(threads), "window": ref.size(threads)}
    out["canary_ratio"] = ref.ratio(threads, ms)
    ref.add(threads, [ms])
    return out


def contention_reason(ratio: float | None) -> str | None:
    """The busy reason for a canary ratio above :data:`CONTENDED_RATIO` (None: not contended)."""
    if ratio is None or ratio <= CONTENDED_RATIO:
        return None
    return f"host contention: the reference GEMM ran {ratio:.2f}x its quiet time"
