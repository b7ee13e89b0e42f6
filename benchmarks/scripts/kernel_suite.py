"""Kernel suite: cp_nls vs the efficient ALS (and optionally TensorLy) on CNN conv kernels.

Usage::

    python benchmarks/scripts/kernel_suite.py [--quick] [--json OUT] [--kernels FILE.safetensors]
                                      [--save-kernels FILE.safetensors] [--tensorly]
                                      [--threads N] [--train-seconds S] [--als-iter N]
                                      [--only NAME,...] [--include-1x1] [--rank200-only]

Kernels: named 4-D tensors from ``--kernels`` (safetensors, e.g. the real character network's
``conv2`` (128, 48, 9, 9) and ``conv3`` (512, 64, 8, 8)); otherwise two tiny CNNs are trained
here for ``--train-seconds`` (default 30 s in total) on synthetic stroke images and their conv
weights are taken:

* ``blob.conv2`` (192, 48, 3, 3), ``blob.conv4`` (96, 96, 3, 3), ``blob.conv5`` (256, 96, 5, 5)
  of a small VGG-like net on 12x12 stroke patterns;
* ``char.conv2`` (128, 48, 9, 9), ``char.conv3`` (512, 64, 8, 8) of a maxout net with the
  layout of Jaderberg et al.'s character classifier (24x24 inputs).

1x1 kernels (matrices) are skipped unless ``--include-1x1``. For each kernel the ranks giving
4x and 8x parameter compression are used (``R = numel // (c * sum(dims))``), pairs run cheapest
first, each printed as it finishes. The reference is :func:`cp_als` from SVD init, 1000
iterations, tol 1e-10 (with ``--tensorly``: checked once against
``tensorly.decomposition.parafac`` from the same init, and TensorLy timed on every pair); the
candidate is :func:`cp_nls` with its defaults. ``--quick``: half the training time, kernels
up to 200k entries, 200 ALS iterations, no rank-200 check. The end prints a table and one
PASS/FAIL line per target: rel_error <= 1.001 x ALS on >= 90 % of pairs; median degeneracy
<= 2 and <= ALS's / 10; median seconds <= ALS's; rank 200 on 256x96x5x5 in < 30 s
(``--rank200-only``: that check alone, e.g. ``--threads 2 --kernels FILE --rank200-only``).
Timings are wall-clock on whatever else the machine runs: use ``--threads`` and a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cpbench.decomposition.solvers import cp_als, cp_nls  # noqa: E402
from cpbench.decomposition.solvers._cp_common import svd_init  # noqa: E402

# --------------------------------------------------------------------------------------------
# synthetic data and tiny CNNs


def _class_strokes(n_classes: int, n_strokes: int, gen: torch.Generator) -> torch.Tensor:
    """Random stroke templates: (n_classes, n_strokes, 4) endpoints in [0.15, 0.85]."""
    return 0.15 + 0.7 * torch.rand((n_classes, n_strokes, 4), generator=gen)


def _render(strokes: torch.Tensor, labels: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Render jittered strokes of the given classes as (B, 1, size, size) images."""
    b = labels.shape[0]
    seg = strokes[labels].clone()  # (B, S, 4)
    shift = (torch.rand((b, 1, 2), generator=gen) - 0.5) * 0.25
    scale = 1.0 + (torch.rand((b, 1, 1), generator=gen) - 0.5) * 0.3
    seg[..., 0:2] = (seg[..., 0:2] - 0.5) * scale + 0.5 + shift
    seg[..., 2:4] = (seg[..., 2:4] - 0.5) * scale + 0.5 + shift
    seg = seg + 0.03 * torch.randn(seg.shape, generator=gen)
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    p = torch.stack([xx, yy], dim=-1).reshape(1, 1, -1, 2)  # (1,1,P,2)
    a = seg[..., None, 0:2]
    d = seg[..., None, 2:4] - a
    tt = (((p - a) * d).sum(-1) / (d * d).sum(-1).clamp_min(1e-6)).clamp(0, 1)
    dist2 = ((p - a - tt[..., None] * d) ** 2).sum(-1)  # (B,S,P)
    width = 0.04 + 0.03 * torch.rand((b, 1, 1), generator=gen)
    img = torch.exp(-dist2 / (2 * width**2)).amax(dim=1)
    img = img + 0.1 * torch.randn(img.shape, generator=gen)
    return img.reshape(b, 1, size, size)


class BlobNet(nn.Module):
    def __init__(self, n_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 48, 3, padding=1)
        self.conv2 = nn.Conv2d(48, 192, 3, padding=1)
        self.conv3 = nn.Conv2d(192, 96, 1)
        self.conv4 = nn.Conv2d(96, 96, 3, padding=1)
        self.conv5 = nn.Conv2d(96, 256, 5, padding=2)
        self.fc = nn.Linear(256, n_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 6x6
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = F.max_pool2d(F.relu(self.conv4(x)), 2)  # 3x3
        x = F.relu(self.conv5(x))
        return self.fc(x.mean(dim=(2, 3)))


class CharNet(nn.Module):
    """Maxout layout of Jaderberg et al.'s 24x24 character classifier."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 96, 9)  # 16x16, maxout 2 -> 48
        self.conv2 = nn.Conv2d(48, 128, 9)  # 8x8, maxout 2 -> 64
        self.conv3 = nn.Conv2d(64, 512, 8)  # 1x1, maxout 4 -> 128
        self.conv4 = nn.Conv2d(128, n_classes, 1)

    @staticmethod
    def _maxout(x, k):
        b, c, h, w = x.shape
        return x.reshape(b, c // k, k, h, w).amax(dim=2)

    def forward(self, x):
        x = self._maxout(self.conv1(x), 2)
        x = self._maxout(self.conv2(x), 2)
        x = self._maxout(self.conv3(x), 4)
        return self.conv4(x).flatten(1)


def train_kernels(seconds: float = 30.0, seed: int = 0, verbose: bool = True) -> dict[str, torch.Tensor]:
    """Train BlobNet and CharNet on synthetic strokes for ``seconds`` in total; return kernels."""
    torch.manual_seed(seed)  # module init uses the global RNG; this script owns its process
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, net, size, n_classes, share in (
        ("blob", BlobNet(10), 12, 10, 0.5),
        ("char", CharNet(36), 24, 36, 0.5),
    ):
        strokes = _class_strokes(n_classes, 3, gen)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        t_end = time.perf_counter() + seconds * share
        steps, acc = 0, float("nan")
        while time.perf_counter() < t_end:
            labels = torch.randint(0, n_classes, (32,), generator=gen)
            x = _render(strokes, labels, size, gen)
            logits = net(x)
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            acc = 0.9 * acc + 0.1 * float((logits.argmax(1) == labels).float().mean()) if steps > 1 else float((logits.argmax(1) == labels).float().mean())
        if verbose:
            print(f"trained {name}: {steps} steps, running train accuracy {acc:.2f}", file=sys.stderr)
        for lname in ("conv2", "conv3", "conv4", "conv5"):
            layer = getattr(net, lname, None)
            if layer is None:
                continue
            w = layer.weight.detach().clone()
            out[f"{name}.{lname}"] = w
    return out


# --------------------------------------------------------------------------------------------


def ranks_for(shape, factors=(4, 8)) -> list[tuple[int, int]]:
    numel = math.prod(shape)
    s = sum(shape)
    return [(c, max(1, numel // (c * s))) for c in factors]


def _table(rows, columns, title):
    try:
        from rich.console import Console
        from rich.table import Table

        tab = Table(title=title)
        for c in columns:
            tab.add_column(c, justify="right")
        for r in rows:
            tab.add_row(*[str(x) for x in r])
        Console(width=max(160, Console().width)).print(tab)
    except Exception:  # plain fallback
        widths = [max(len(c), *(len(str(r[i])) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
        for r in rows:
            print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small kernels only, shorter ALS")
    ap.add_argument("--json", metavar="OUT", help="write rows and summary as JSON")
    ap.add_argument("--kernels", metavar="FILE", help="safetensors file of named 4-D kernels")
    ap.add_argument("--save-kernels", metavar="FILE", help="save the trained kernels (safetensors)")
    ap.add_argument("--tensorly", action="store_true", help="also time tensorly parafac (slow)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-seconds", type=float, default=30.0)
    ap.add_argument("--als-iter", type=int, default=None, help="ALS iterations (default 1000, 200 with --quick)")
    ap.add_argument("--only", default=None, help="comma-separated kernel names to run")
    ap.add_argument("--include-1x1", action="store_true", help="keep 1x1 kernels (skipped by default)")
    ap.add_argument("--rank200-only", action="store_true", help="run only the rank-200 timing check")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    als_iter = args.als_iter or (200 if args.quick else 1000)

    if args.kernels:
        from safetensors.torch import load_file

        kernels = {k: v for k, v in load_file(args.kernels).items() if v.dim() == 4}
    else:
        kernels = train_kernels(args.train_seconds * (0.5 if args.quick else 1.0))
        if args.save_kernels:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in kernels.items()}, args.save_kernels)
    if not args.include_1x1:
        # a 1x1 "kernel" is a matrix: its best low-rank approximation is the truncated SVD
        kernels = {k: v for k, v in kernels.items() if v.shape[2] * v.shape[3] > 1}
    if args.only:
        keep = set(args.only.split(","))
        kernels = {k: v for k, v in kernels.items() if k in keep}
    if args.quick:
        kernels = {k: v for k, v in kernels.items() if v.numel() <= 200_000}

    rows, recs = [], []
    tl_checked = None
    # the rank-200 timing target first (cheap), then the kernel-rank pairs, cheapest first
    big = None
    if not args.quick:
        w256 = next((v for v in kernels.values() if tuple(v.shape) == (256, 96, 5, 5)), None)
        if w256 is not None:
            r200 = cp_nls(w256.double(), 200)
            big = {"shape": list(w256.shape), "rank": 200, "seconds": r200.info["seconds"],
                   "rel_error": r200.info["rel_error"], "degeneracy": r200.info["degeneracy"],
                   "iterations": r200.info["iterations"]}
            print(f"rank 200 on 256x96x5x5: {json.dumps(big)}", flush=True)
    pairs = [(name, w, comp, rank) for name, w in kernels.items() for comp, rank in ranks_for(tuple(w.shape))]
    if args.rank200_only:
        pairs = []
    pairs.sort(key=lambda p: p[1].numel() * p[3])
    for name, w, comp, rank in pairs:
        w = w.double()
        als = cp_als(w, rank, max_iter=als_iter, tol=1e-10)
        nls = cp_nls(w, rank)
        rec = {
            "kernel": name, "shape": list(w.shape), "compression": comp, "rank": rank,
            "als_rel_error": als.info["rel_error"], "als_degeneracy": als.info["degeneracy"],
            "als_seconds": als.info["seconds"], "als_iterations": als.info["iterations"],
            "nls_rel_error": nls.info["rel_error"], "nls_degeneracy": nls.info["degeneracy"],
            "nls_seconds": nls.info["seconds"], "nls_iterations": nls.info["iterations"],
            "nls_cg": nls.info["cg_iterations_total"], "nls_stop": nls.info["stop_reason"],
        }
        rec["error_ratio"] = rec["nls_rel_error"] / rec["als_rel_error"]
        if args.tensorly:
            import numpy as np
            import tensorly as tl
            from tensorly.decomposition import parafac

            t0 = time.perf_counter()
            cpt = parafac(w.numpy(), rank, init="svd", n_iter_max=als_iter, tol=1e-10)
            rec["tensorly_seconds"] = time.perf_counter() - t0
            rec["tensorly_rel_error"] = float(np.linalg.norm(w.numpy() - tl.cp_to_tensor(cpt)) / np.linalg.norm(w.numpy()))
            if tl_checked is None:
                # same start on both sides (SVD init incl. its random padding columns)
                init = svd_init(w, rank, torch.Generator().manual_seed(0))
                cpt = parafac(w.numpy(), rank, init=tl.cp_tensor.CPTensor((None, [f.numpy() for f in init])),
                              n_iter_max=als_iter, tol=1e-10)
                e_tl = float(np.linalg.norm(w.numpy() - tl.cp_to_tensor(cpt)) / np.linalg.norm(w.numpy()))
                ref = cp_als(w, rank, init=init, max_iter=als_iter, tol=1e-10)
                tl_checked = (name, rank, ref.info["rel_error"], e_tl)
        recs.append(rec)
        print(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()), flush=True)

    cols = ["kernel", "shape", "R", "ALS err", "ALS degen", "ALS s", "TL s", "NLS err", "NLS degen", "NLS s", "err ratio"]
    for r in recs:
        rows.append([
            r["kernel"], "x".join(map(str, r["shape"])), r["rank"],
            f"{r['als_rel_error']:.5f}", f"{r['als_degeneracy']:.3g}", f"{r['als_seconds']:.2f}",
            f"{r['tensorly_seconds']:.1f}" if "tensorly_seconds" in r else "-",
            f"{r['nls_rel_error']:.5f}", f"{r['nls_degeneracy']:.3g}", f"{r['nls_seconds']:.2f}",
            f"{r['error_ratio']:.5f}",
        ])
    if not args.rank200_only:
        _table(rows, cols, f"cp_nls vs cp_als ({als_iter} it, tol 1e-10), {args.threads} threads")

    summary = []
    if recs:
        ok_err = [r["error_ratio"] <= 1.001 for r in recs]
        frac = sum(ok_err) / len(recs)
        summary.append(("rel_error <= 1.001 x ALS on >= 90% of pairs", frac >= 0.9, f"{sum(ok_err)}/{len(recs)} = {frac:.0%}"))
        md_n = statistics.median(r["nls_degeneracy"] for r in recs)
        md_a = statistics.median(r["als_degeneracy"] for r in recs)
        summary.append(("median NLS degeneracy <= 2", md_n <= 2, f"{md_n:.3g}"))
        summary.append(("median NLS degeneracy <= ALS/10", md_n <= md_a / 10, f"NLS {md_n:.3g} vs ALS {md_a:.3g} (ratio {md_n / md_a:.3g})"))
        mt_n = statistics.median(r["nls_seconds"] for r in recs)
        mt_a = statistics.median(r["als_seconds"] for r in recs)
        summary.append(("median NLS seconds <= ALS's", mt_n <= mt_a, f"NLS {mt_n:.2f} s vs ALS {mt_a:.2f} s"))
        if args.tensorly:
            sp = [r["tensorly_seconds"] / r["als_seconds"] for r in recs]
            summary.append(("(info) TensorLy / cp_als time", True, f"median {statistics.median(sp):.1f}x, range {min(sp):.1f}-{max(sp):.1f}x"))
    if tl_checked is not None:
        n_, r_, e1, e2 = tl_checked
        summary.append(("cp_als == TensorLy parafac (same init, %s R=%d)" % (n_, r_), abs(e1 - e2) <= 1e-6 * e2,
                        f"rel_error {e1:.8f} vs {e2:.8f}"))
    if big is not None:
        summary.append(("rank 200 on 256x96x5x5 in < 30 s", big["seconds"] < 30, f"{big['seconds']:.1f} s (err {big['rel_error']:.4f}, degen {big['degeneracy']:.3g})"))
    print()
    for name, ok, txt in summary:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {txt}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": recs, "rank200": big,
                                               "summary": [{"target": a, "pass": b, "value": c} for a, b, c in summary],
                                               "als_iter": als_iter, "threads": args.threads}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
