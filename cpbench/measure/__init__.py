"""Measuring: paired interleaved timing, its statistics, thread pools and the machine probe.

Where a change goes: how arms are timed → ``timing.py``; medians, intervals, the bootstrap →
``stats.py``; thread pools → ``threads.py``; what is recorded about the machine → ``machine.py``;
fresh timing processes → ``workers.py``; the speedup's interval over them and its flags →
``intervals.py``; how busy the machine is → ``noise.py``; the measure stage's pairs and row fields →
``cell_timing.py``; how closely a compressed network reproduces
its base network's outputs → ``fidelity.py``.
"""
from .stats import ArmStats, speedup_across_passes, speedup_ci
from .threads import thread_limits, thread_state
from .timing import PairedTiming, TimingBudget, time_one, time_pair

__all__ = ["ArmStats", "speedup_across_passes", "speedup_ci", "thread_limits", "thread_state",
           "PairedTiming", "TimingBudget", "time_one", "time_pair"]
