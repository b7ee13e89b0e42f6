"""Compress a whole network to a measured speedup target (``cpbench tune``).

Pure parts — :mod:`.request` (what is asked), :mod:`.candidates`, :mod:`.prepared` (the tables and the
speedup they predict), :mod:`.search`, :mod:`.loop`, :mod:`.plan` — and the parts with I/O injected —
:mod:`.latency` (the timer, the cache file), :mod:`.sensitivity` (the scorer) — are wired by
:mod:`.pipeline`; :mod:`.run` drives several targets and writes the results, plan files and the report.
"""
from .candidates import KEEP, Candidate
from .plan import LayerChoice, Plan, read_plan, write_plan
from .search import Option, Selection, TargetUnreachable

__all__ = ["KEEP", "Candidate", "Option", "Selection", "TargetUnreachable", "Plan", "LayerChoice",
           "read_plan", "write_plan"]
