"""A spatial SVD of the character network's conv3 against the dense conv3, with and without the ``rows`` GEMM.

    python benchmarks/scripts/rows_gemm.py [--ranks 96,128,170] [--batches 1,32] [--backend mkl] [--without]

The dense conv3 (64 -> 512, 8x8 on an 8x8 input) against its spatial-SVD block (an 8x1 conv to R channels, then
a 1x8 one), both prepared by the backend and timed as the tune times a layer
(:func:`cpbench.tune.latency.backend_timer`: interleaved, one thread, in this process). ``--without`` takes
:class:`cpbench.kernels.forms.ConvGemm`'s ``rows`` kind away, so the 8x1 layer runs as the backend's conv: run
the script both ways, one after the other, to compare. Prints each block's speedup with its interval and the
FLOP ratio.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
for p in (_ROOT / "plugins", _ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from cpbench.measure.timing import TimingBudget  # noqa: E402
from cpbench.plugin.manager import get_plugins  # noqa: E402
from cpbench.tune.latency import backend_timer  # noqa: E402

BUDGET = TimingBudget(warmup=3, min_rounds=15, max_rounds=400, budget_s=2.0, min_round_s=0.002, target_ci_rel=0.02)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="96,128,170", help="ranks of the spatial SVD")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--backend", default="mkl")
    ap.add_argument("--without", action="store_true", help="without the rows GEMM (the 8x1 layer as a conv)")
    args = ap.parse_args(argv)
    if args.without:
        forms = importlib.import_module("cpbench.kernels.forms")
        kind = forms.conv_gemm_kind
        forms.conv_gemm_kind = lambda conv, shape: None if kind(conv, shape) == "rows" else kind(conv, shape)
    timer = backend_timer(get_plugins().backends.get(args.backend), 1, BUDGET)
    torch.manual_seed(0)
    s, t, k = 64, 512, 8
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randn(batch, s, k, k)
        dense = nn.Conv2d(s, t, k).eval()
        for r in (int(v) for v in args.ranks.split(",")):
            block = nn.Sequential(nn.Conv2d(s, r, (k, 1)), nn.Conv2d(r, t, (1, k))).eval()
            timed = timer(dense, block, x, x)
            lo, hi = timed.speedup_ci
            flops = (s * t * k * k) / (s * r * k + r * t * k)
            print(f"{'without' if args.without else 'with'} rows, batch {batch}, rank {r}: "
                  f"{timed.speedup:.2f}x [{lo:.2f}, {hi:.2f}] (FLOP ratio {flops:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
