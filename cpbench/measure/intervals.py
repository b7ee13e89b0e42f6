"""The speedup of a pair timed in several fresh processes: a two-level bootstrap interval and flags.

Level 1 is the process: a fresh process lands its tensors at other addresses, starts its own thread
pools, is scheduled anew, and on a shared VM meets other neighbours. That varies more between
processes than between the rounds of one process, and a second run of the same command is a new set
of processes, so an interval that is to hold from one run to the next has to be spread over them.
Level 2 is the run of rounds inside a process, resampled in blocks (:func:`cpbench.measure.stats.block_length`)
because load comes in bursts.

:func:`two_level_interval` draws, per resample, ``P`` processes with replacement and within each drawn
process blocks of its rounds; the statistic is the geometric mean of the drawn processes' ratios of
medians. With few processes that percentile interval is too narrow: the bootstrap's variance is
``(P-1)/P`` of the sample's and its tails are normal where the mean of ``P`` log ratios has
Student-t tails. Its deviations from the point are therefore scaled by
``t_{P-1} / z * sqrt(P / (P-1))``, which makes the interval the classical t-interval on the processes'
log ratios when rounds are noiseless, and never narrower than the within-process noise allows.

Flags (each documented with its threshold in README "How timing works"):

* ``wide``: the interval's half-width exceeds :data:`WIDE_REL` of the speedup.
* ``disagree``: some process's own 95% interval (its rounds alone) does not touch the cell's
  interval: that process measured something the others did not (a burst of load, a bad placement).
* ``busy`` comes from the noise probe (:mod:`cpbench.measure.noise`), not from the timings.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .stats import block_length

__all__ = ["WIDE_REL", "ProcessSpeedup", "Interval", "two_level_interval", "row_flags", "flag_labels"]

#: Half-width of the speedup's interval, relative to the speedup, above which a cell is flagged wide.
WIDE_REL = 0.05


@dataclass(frozen=True)
class ProcessSpeedup:
    """One worker process's result: medians of its rounds and its own (block-bootstrap) interval."""

    speedup: float
    ci: tuple[float, float]
    baseline_ms: float
    compressed_ms: float
    rounds: int

    def as_dict(self) -> dict:
        return {"speedup": self.speedup, "ci": list(self.ci), "baseline_ms": self.baseline_ms,
                "compressed_ms": self.compressed_ms, "rounds": self.rounds}


@dataclass(frozen=True)
class Interval:
    speedup: float
    ci: tuple[float, float]
    processes: list[ProcessSpeedup] = field(default_factory=list)
    disagreeing: list[int] = field(default_factory=list)  # indices of processes outside the interval

    @property
    def half_width_rel(self) -> float:
        return (self.ci[1] - self.ci[0]) / 2 / self.speedup if self.speedup > 0 else float("inf")

    @property
    def wide(self) -> bool:
        return self.half_width_rel > WIDE_REL

    @property
    def disagree(self) -> bool:
        return bool(self.disagreeing)


def _block_indices(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    L = block_length(n)
    k = -(-n // L)
    starts = rng.integers(0, n, size=(resamples, k))
    return ((starts[:, :, None] + np.arange(L)) % n).reshape(resamples, k * L)[:, :n]


def _small_sample_scale(p: int, confidence: float) -> float:
    from scipy.stats import norm, t as student_t

    q = 1 - (1 - confidence) / 2
    return float(student_t.ppf(q, p - 1) / norm.ppf(q) * np.sqrt(p / (p - 1)))


def two_level_interval(
    processes: Sequence[tuple[Sequence[float], Sequence[float]]],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Speedup and interval from paired (baseline_ms, compressed_ms) rounds of each process.

    ``processes``: one ``(baseline rounds, compressed rounds)`` pair per fresh process, paired by round.
    Point: geometric mean over processes of median(baseline)/median(compressed). With one process the
    interval is that process's own block-bootstrap interval (it then covers nothing between processes).
    """
    if not processes:
        raise ValueError("no processes")
    rng = np.random.default_rng(seed)
    alpha = (1 - confidence) / 2
    logs = []          # per process: block-bootstrap log ratios, shape (resamples,)
    per: list[ProcessSpeedup] = []
    for a_s, b_s in processes:
        a, b = np.asarray(a_s, float), np.asarray(b_s, float)
        if a.size != b.size or a.size == 0:
            raise ValueError(f"paired samples needed, got {a.size} and {b.size}")
        point = float(np.median(a) / np.median(b))
        if a.size < 2:
            lr = np.full(resamples, np.log(point))
        else:
            idx = _block_indices(rng, a.size, resamples)
            lr = np.log(np.median(a[idx], axis=1) / np.median(b[idx], axis=1))
        logs.append(lr)
        lo, hi = np.exp(np.quantile(lr, [alpha, 1 - alpha]))
        per.append(ProcessSpeedup(point, (float(min(lo, point)), float(max(hi, point))),
                                  float(np.median(a)), float(np.median(b)), int(a.size)))
    p = len(per)
    log_point = float(np.mean([np.log(q.speedup) for q in per]))
    W = np.stack(logs, axis=1)  # (resamples, P)
    if p == 1:
        dev = W[:, 0] - log_point
        scale = 1.0
    else:
        pick = rng.integers(0, p, size=(resamples, p))
        stat = np.take_along_axis(W, pick, axis=1).mean(axis=1)
        dev = stat - log_point
        scale = _small_sample_scale(p, confidence)
    dlo, dhi = np.quantile(dev, [alpha, 1 - alpha])
    lo, hi = float(np.exp(log_point + scale * min(dlo, 0.0))), float(np.exp(log_point + scale * max(dhi, 0.0)))
    point = float(np.exp(log_point))
    disagreeing = [i for i, q in enumerate(per) if p > 1 and (q.ci[1] < lo or q.ci[0] > hi)]
    return Interval(point, (lo, hi), per, disagreeing)


def _getter(row):
    """A field of a result row: a row dict or a :class:`cpbench.run.record.CellResult`."""
    return row.get if isinstance(row, dict) else lambda k: getattr(row, k, None)


def row_flags(row) -> dict[str, bool]:
    """A result row's timing flags (a row dict or a :class:`cpbench.run.record.CellResult`): ``wide``,
    ``busy``, ``disagree`` for rows with ``timing_flags``; an older row has only its ``noisy`` (either
    arm's IQR above 10% of its median), kept as it was."""
    get = _getter(row)
    flags = get("timing_flags")
    if isinstance(flags, dict):
        return {k: bool(v) for k, v in flags.items()}
    if get("noisy") is not None:
        return {"noisy": bool(get("noisy"))}
    return {}


def flag_labels(row) -> list[str]:
    """The names of the flags that are set, in a fixed order (empty: nothing to warn about); ``partial``
    for a row whose cell's timing passes did not all run (an interrupted run: it holds the processes of
    its passes so far, one alone after pass 1, and its interval covers nothing between processes then)."""
    f = row_flags(row)
    labels = [k for k in ("busy", "disagree", "wide", "noisy") if f.get(k)]
    get = _getter(row)
    done, of = get("timing_pass"), get("timing_passes")
    if isinstance(done, int) and isinstance(of, int) and done < of:
        labels.append("partial")
    return labels
