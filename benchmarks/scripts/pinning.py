"""Does pinning the timing processes to cores reduce the spread between them?

    python benchmarks/pinning.py [--trials N] [--processes P] [--budget S]

One conv layer against its CP block (benchmarks/_fixtures.py, seeded random factors), eager PyTorch,
one thread. Each trial times the pair in P fresh worker processes unpinned, then P pinned to the least
busy allowed core (``[timing] pin = true``), alternating which goes first. Printed per setting: the
median over trials of the spread between processes (standard deviation of their log speedups) and of
the interval's half-width, with the machine's busy verdicts. ``pin`` stays off by default unless pinned
is clearly tighter here.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

from cpbench.measure.intervals import two_level_interval
from cpbench.plugin.manager import get_plugins
from cpbench.measure.timing import TimingBudget
from cpbench.measure.workers import PairSpec, pair_samples, time_in_processes

try:
    from ._fixtures import LAYER_NAMES, RANKS, make_input, random_cp_block
except ImportError:  # run as a script
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from benchmarks._fixtures import LAYER_NAMES, RANKS, make_input, random_cp_block


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--processes", type=int, default=5)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per trial, split over the processes")
    args = ap.parse_args(argv)
    conv, block = random_cp_block(LAYER_NAMES[0], RANKS[0])
    x = make_input(LAYER_NAMES[0])
    be = get_plugins().backends.get("torch-cpu")
    spec = [PairSpec("pair", conv, block.eval(), x, TimingBudget(budget_s=args.budget, min_rounds=15))]
    out: dict[bool, dict[str, list]] = {False: {"spread": [], "half": [], "busy": []},
                                        True: {"spread": [], "half": [], "busy": []}}
    for trial in range(args.trials):
        for pin in ((False, True) if trial % 2 == 0 else (True, False)):
            runs = time_in_processes(be, spec, threads=1, processes=args.processes, pin=pin)
            iv = two_level_interval(pair_samples(runs, "pair"))
            spread = float(np.std([np.log(p.speedup) for p in iv.processes], ddof=1))
            busy = sum(bool(r.noise.get("busy")) for r in runs)
            out[pin]["spread"].append(spread)
            out[pin]["half"].append(iv.half_width_rel)
            out[pin]["busy"].append(busy)
            print(f"trial {trial} pin={pin!s:5}: speedup {iv.speedup:.3f} [{iv.ci[0]:.3f}, {iv.ci[1]:.3f}], "
                  f"between-process sd {100 * spread:.2f}%, busy processes {busy}/{len(runs)}, "
                  f"cores {[r.cores for r in runs]}", flush=True)
    for pin in (False, True):
        o = out[pin]
        print(f"pin={pin!s:5}: median between-process sd {100 * statistics.median(o['spread']):.2f}%, "
              f"median half-width {100 * statistics.median(o['half']):.2f}%, busy processes "
              f"{sum(o['busy'])}/{args.trials * args.processes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
