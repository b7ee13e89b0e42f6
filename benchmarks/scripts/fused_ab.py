"""Two sources of the fused CP kernel timed against each other, interleaved in one process.

    git show REV:cpbench/kernels/cp_fused.cpp > /tmp/old.cpp
    python benchmarks/scripts/fused_ab.py /tmp/old.cpp [NEW.cpp] [--layers ...] [--specs 2,3,4,6] [--batches 1,32]

Both sources are compiled here for this CPU (``-march=native``, cpbench's flags, each in its own operator
namespace under ``--build-dir``), so a kernel change is measured on the machine it is for without
installing either. Per cell (a user-suite layer shape at a theoretical layer speedup, random CP factors,
channels-last input, ``--threads``): both outputs are checked to agree, then rounds of the old, the new
and the dense channels-last conv (the order reversed every other round) are timed; printed: the medians,
old/new (median of the rounds' ratios, with the 10th and 90th percentiles), and each build's efficiency
against the dense conv (dense / block / theoretical speedup). The last line is the geometric mean of
old/new over the cells.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
for p in (_ROOT / "plugins", _ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from cpbench.decomposition.ranks import resolve_rank  # noqa: E402
from cpbench.kernels import fused  # noqa: E402
from cpbench.nn.flops import theoretical_speedup  # noqa: E402
from cpbench.nn.layers import CPBlock, geometry  # noqa: E402
from cpbench.plugin.manager import get_plugins  # noqa: E402

#: name: (in channels, out channels, kernel, input size, padding): the user suite's ungrouped shapes
LAYERS = {"64-64-k3@56": (64, 64, 3, 56, 1), "128-128-k3@28": (128, 128, 3, 28, 1),
          "256-256-k3@14": (256, 256, 3, 14, 1), "512-512-k3@7": (512, 512, 3, 7, 1),
          "256-512-k3@13": (256, 512, 3, 13, 1), "64-192-k5@27": (64, 192, 5, 27, 2),
          "128-256-k3@56": (128, 256, 3, 56, 1), "48-128-k9@16": (48, 128, 9, 16, 0)}


def compile_source(source: Path, tag: str, build_dir: Path):
    from torch.utils.cpp_extension import load

    out = build_dir / tag
    out.mkdir(parents=True, exist_ok=True)
    return load(name=f"cp_fused_ab_{tag}", sources=[str(source)], build_directory=str(out),
                extra_cflags=fused.CFLAGS + ["-march=native", f"-DCPBENCH_OP_NAMESPACE=cpbench_ab_{tag}"],
                extra_ldflags=fused.LDFLAGS)


def random_block(s: int, t: int, k: int, pad: int, rank: int) -> tuple[nn.Conv2d, CPBlock]:
    conv = nn.Conv2d(s, t, k, padding=pad)
    g = torch.Generator().manual_seed(0)
    block = CPBlock(geometry(conv), torch.randn(1, t, rank, generator=g) / math.sqrt(rank),
                    torch.randn(1, s, rank, generator=g) / math.sqrt(s), h=torch.randn(1, k, rank, generator=g),
                    w=torch.randn(1, k, rank, generator=g), bias=torch.randn(t, generator=g))
    return conv.eval(), block.eval()


def per_call(f, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path, help="the kernel source to compare against")
    ap.add_argument("new", type=Path, nargs="?", default=fused.SOURCE, help="default: this checkout's")
    ap.add_argument("--layers", help=f"comma-separated (default all: {','.join(LAYERS)})")
    ap.add_argument("--specs", default="2,3,4,6", help="theoretical layer speedups (default 2,3,4,6)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--build-dir", type=Path, default=Path("/tmp/cpbench-fused-ab"))
    args = ap.parse_args(argv)
    unknown = set((args.layers or "").split(",")) - set(LAYERS) - {""}
    if unknown:
        print(f"fused_ab: unknown layer(s) {', '.join(sorted(unknown))}; known: {', '.join(LAYERS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    builds = {"old": compile_source(args.old, "old", args.build_dir), "new": compile_source(args.new, "new", args.build_dir)}
    print(f"old: {args.old} (micro-kernel {fused.simd_of(builds['old'])}); "
          f"new: {args.new} (micro-kernel {fused.simd_of(builds['new'])}); "
          f"{args.threads} thread(s)", flush=True)
    print(f"{'layer':15} {'spec':>4} {'R':>5} {'b':>3} {'dense ms':>9} {'old ms':>8} {'new ms':>8} {'old/new':>8} "
          f"{'[p10, p90]':>13} {'eff old':>7} {'eff new':>7}")
    ratios = []
    cp = get_plugins().decomposers.get("cp-nls")  # ``speedup:X`` resolved as `cpbench run` resolves it
    with torch.inference_mode():
        for name in (args.layers.split(",") if args.layers else LAYERS):
            s, t, k, size, pad = LAYERS[name]
            for spec in args.specs.split(","):
                conv = nn.Conv2d(s, t, k, padding=pad)
                rank, _ = resolve_rank(f"speedup:{spec}", cp, conv.weight, geometry(conv), (size, size), layer=name)
                conv, block = random_block(s, t, k, pad, int(rank))
                theo = theoretical_speedup(conv, block, torch.randn(1, s, size, size))
                call = {tag: fused.kernel_arguments(block, m.panel) for tag, m in builds.items()}
                dense = conv.to(memory_format=torch.channels_last)
                for b in (int(x) for x in args.batches.split(",")):
                    x = torch.randn(b, s, size, size).contiguous(memory_format=torch.channels_last)
                    ref = dense(x)
                    fns = {tag: (lambda m=m, a=call[tag]: m.cp_fused(x, *a)) for tag, m in builds.items()}
                    fns["dense"] = lambda: dense(x)
                    for tag in ("old", "new"):
                        err = float((fns[tag]() - block(x)).norm() / ref.norm())
                        if err > 1e-4:
                            print(f"fused_ab: {tag} disagrees with the block on {name} R={rank} b={b} ({err:.1e})",
                                  file=sys.stderr)
                            return 1
                    n = max(1, int(0.02 / max(per_call(fns["old"], 3), 1e-6)))
                    for f in fns.values():
                        per_call(f, n)
                    times = {tag: [] for tag in fns}
                    for r in range(args.rounds):
                        for tag in (("old", "new", "dense") if r % 2 == 0 else ("dense", "new", "old")):
                            times[tag].append(per_call(fns[tag], n))
                    rat = sorted(o / w for o, w in zip(times["old"], times["new"]))
                    med = {tag: statistics.median(v) for tag, v in times.items()}
                    ratio = statistics.median(rat)
                    ratios.append(ratio)
                    p10, p90 = rat[len(rat) // 10], rat[-len(rat) // 10 - 1]
                    print(f"{name:15} {spec:>4} {rank:5d} {b:3d} {med['dense'] * 1e3:9.3f} {med['old'] * 1e3:8.3f} "
                          f"{med['new'] * 1e3:8.3f} {ratio:8.3f} [{p10:5.2f},{p90:5.2f}] "
                          f"{med['dense'] / med['old'] / theo:7.2f} {med['dense'] / med['new'] / theo:7.2f}", flush=True)
    print(f"old/new over {len(ratios)} cells: geometric mean {math.exp(statistics.mean(map(math.log, ratios))):.3f}, "
          f"min {min(ratios):.3f}, max {max(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
