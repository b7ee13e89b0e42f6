"""Latency statistics: medians, percentiles, and a bootstrap confidence interval of a speedup.

Pure functions on sequences of per-call latencies; no clock here.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["ArmStats", "arm_stats", "speedup_ci", "NOISY_IQR_RATIO"]

NOISY_IQR_RATIO = 0.10  # an arm whose IQR/median exceeds this is flagged noisy


@dataclass(frozen=True)
class ArmStats:
    median_ms: float
    p90_ms: float
    iqr_ms: float
    rounds: int

    @property
    def noisy(self) -> bool:
        return self.median_ms > 0 and self.iqr_ms / self.median_ms > NOISY_IQR_RATIO

    def as_dict(self) -> dict:
        return {**asdict(self), "noisy": self.noisy}


def arm_stats(samples_ms: Sequence[float]) -> ArmStats:
    """Median, 90th percentile and interquartile range of one arm's per-call latencies (ms)."""
    a = np.asarray(samples_ms, dtype=float)
    if a.size == 0:
        raise ValueError("no samples")
    q25, q50, q75, q90 = np.percentile(a, [25, 50, 75, 90])
    return ArmStats(float(q50), float(q90), float(q75 - q25), int(a.size))


def speedup_ci(
    baseline_ms: Sequence[float],
    compressed_ms: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """Speedup = median(baseline) / median(compressed), with a paired bootstrap percentile CI.

    The two sequences are paired by round (timed interleaved), so rounds are resampled together:
    drift that hits both arms in one round cancels in the ratio.
    """
    a = np.asarray(baseline_ms, dtype=float)
    b = np.asarray(compressed_ms, dtype=float)
    if a.size != b.size or a.size == 0:
        raise ValueError(f"paired samples needed, got {a.size} and {b.size}")
    point = float(np.median(a) / np.median(b))
    if a.size == 1:
        return point, (point, point)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(resamples, a.size))
    ratios = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(ratios, [alpha, 1 - alpha])
    return point, (float(lo), float(hi))
