"""Latency statistics: medians, percentiles, and a block-bootstrap confidence interval of a speedup.

Pure functions on sequences of per-call latencies; no clock here.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["ArmStats", "arm_stats", "block_length", "speedup_ci", "speedup_across_passes", "NOISY_IQR_RATIO"]

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


def block_length(n: int) -> int:
    """Block length of the moving-block bootstrap for ``n`` paired rounds: ``round(sqrt(n))``.

    Consecutive rounds on a shared machine are not independent (a burst of load lasts many rounds),
    and an i.i.d. bootstrap then gives intervals that a second run misses. Resampling runs of
    consecutive rounds keeps that dependence; ``sqrt(n)`` is the usual order for the block length of
    a variance estimate of a smooth statistic, and 1 for fewer than 3 rounds.
    """
    return max(1, int(round(n ** 0.5))) if n >= 3 else 1


def speedup_ci(
    baseline_ms: Sequence[float],
    compressed_ms: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    block: int | None = None,
) -> tuple[float, tuple[float, float]]:
    """Speedup = median(baseline) / median(compressed), with a paired block-bootstrap percentile CI.

    The two sequences are paired by round (timed interleaved), so rounds are resampled together:
    drift that hits both arms in one round cancels in the ratio. Rounds are resampled in circular
    blocks of ``block`` consecutive rounds (default :func:`block_length`; ``block=1`` is the plain
    i.i.d. bootstrap), so slow load changes within the measurement widen the interval as they should.
    """
    a = np.asarray(baseline_ms, dtype=float)
    b = np.asarray(compressed_ms, dtype=float)
    if a.size != b.size or a.size == 0:
        raise ValueError(f"paired samples needed, got {a.size} and {b.size}")
    point = float(np.median(a) / np.median(b))
    n = a.size
    if n == 1:
        return point, (point, point)
    L = block_length(n) if block is None else max(1, min(int(block), n))
    rng = np.random.default_rng(seed)
    k = -(-n // L)
    starts = rng.integers(0, n, size=(resamples, k))
    idx = ((starts[:, :, None] + np.arange(L)) % n).reshape(resamples, k * L)[:, :n]
    ratios = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(ratios, [alpha, 1 - alpha])
    return point, (float(lo), float(hi))



def speedup_across_passes(ratios: Sequence[float], *, confidence: float = 0.95) -> tuple[float, tuple[float, float]]:
    """Speedup and CI from ``k >= 2`` independent passes over the same pair (each pass: freshly prepared
    models, timed minutes apart), as a t-interval on the log ratios.

    Point: the geometric mean of the passes' speedups (each a ratio of medians). Interval:
    ``exp(mean ± t_{k-1} · sd / sqrt(k))`` of ``log(ratio)``. What differs between passes — the machine's
    load minutes apart, where a freshly prepared model's memory landed, a re-compiled kernel — is what
    also differs between two runs, and a within-pass bootstrap cannot see it; the t quantile pays for
    estimating that spread from a few passes (exact when the log ratios are normal).
    """
    r = np.asarray(ratios, dtype=float)
    if r.size < 2:
        raise ValueError(f"at least 2 passes needed, got {r.size}")
    if not np.all(r > 0):
        raise ValueError("speedups must be positive")
    from scipy.stats import t as student_t

    logs = np.log(r)
    m, sd = float(logs.mean()), float(logs.std(ddof=1))
    half = float(student_t.ppf(1 - (1 - confidence) / 2, r.size - 1)) * sd / np.sqrt(r.size)
    return float(np.exp(m)), (float(np.exp(m - half)), float(np.exp(m + half)))
