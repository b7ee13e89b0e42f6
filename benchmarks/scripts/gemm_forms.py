"""Training and evaluation with and without :mod:`cpbench.nn.gemmforms`, side by side.

    python benchmarks/scripts/gemm_forms.py [--threads 2] [--rounds 7] [--steps 6] [--eval-images 3600]
    python benchmarks/scripts/gemm_forms.py --shapes     # the per-shape table of the module's docstring

``--shapes``: each conv shape of the module's table alone, in NCHW and channels-last, oneDNN's conv against the
GEMM form ``gemm_forms`` gives it (none: said so): a training step (forward and the weights' backward, and the
input's where it has more than one channel) and, for the full-cover form, an evaluation forward; median of 6
after 2 warm-up calls; the figure is oneDNN's time over the GEMM form's (> 1: the GEMM form faster).

The dense character network (random weights: a step's time does not depend on their values): one
:func:`cpbench.nn.training.train` epoch of ``--steps`` steps at batch 128 (the fine-tuning recipe), and one
:func:`cpbench.nn.training.evaluate` of ``--eval-images`` images (the tune's validation split is 3,600), each
timed with the GEMM forms and with them switched off, in alternating rounds so that load changes hit both
alike (the first round is warm-up). The figure is the time without over the time with (> 1: the forms are
faster), the median over the rounds with a paired block-bootstrap 95% interval
(:func:`cpbench.measure.stats.speedup_ci`).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import replace
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
for p in (_ROOT / "plugins", _ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

import cpbench.nn.training as training  # noqa: E402
from cpbench.measure.stats import speedup_ci  # noqa: E402
from cpbench_builtins.models.charnet import CharNetModule  # noqa: E402


def _off(*args, **kwargs):
    return contextlib.nullcontext([])


#: (batch, in, out, kernel, input size, stride, padding): the module docstring's shapes
SHAPES = [(128, 64, 512, 8, 8, 1, 0), (32, 512, 1024, 7, 7, 1, 0), (128, 256, 10, 4, 4, 1, 0), (128, 32, 64, 5, 5, 1, 0),
          (128, 1, 96, 9, 24, 1, 0), (128, 1, 64, 7, 28, 1, 3), (128, 1, 48, 7, 32, 1, 0), (128, 1, 20, 5, 28, 1, 0),
          (128, 1, 32, 3, 28, 1, 1), (128, 3, 16, 3, 32, 1, 1), (32, 3, 64, 11, 227, 4, 2)]


def _median_ms(f, n: int = 6) -> float:
    for _ in range(2):
        f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2] * 1e3


def shapes() -> None:
    from cpbench.nn.gemmforms import MIN_TAPS, gemm_forms

    for n, cin, cout, k, hw, stride, pad in SHAPES:
        for fmt, name in ((torch.contiguous_format, "NCHW"), (torch.channels_last, "channels-last")):
            conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad).to(memory_format=fmt)
            x = torch.randn(n, cin, hw, hw).contiguous(memory_format=fmt).requires_grad_(cin > 1)

            def step() -> None:
                conv(x).sum().backward()

            def infer() -> None:
                with torch.no_grad():
                    conv(x)

            cover = hw == k and pad == 0
            one = cin == 1 and k * k >= MIN_TAPS and fmt == torch.contiguous_format
            if not (cover or one):
                print(f"  {cin}->{cout} {k}x{k} on {hw}x{hw} (batch {n}), {name}: no form (oneDNN's conv)")
                continue
            plain_train = _median_ms(step)
            with gemm_forms(conv, training=True, memory_format=fmt):
                train = plain_train / _median_ms(step)
            line = f"  {cin}->{cout} {k}x{k} on {hw}x{hw} (batch {n}), {name}: {'full cover' if cover else 'one channel'}: " \
                   f"training {train:.2f}x"
            if cover:  # the only form evaluation uses
                plain_eval = _median_ms(infer)
                with gemm_forms(conv, training=False):
                    line += f", evaluation {plain_eval / _median_ms(infer):.2f}x"
            print(line)

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--eval-images", type=int, default=3600)
    ap.add_argument("--shapes", action="store_true", help="the per-shape table instead of the character network")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.shapes:
        shapes()
        return 0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128 * args.steps, 1, 24, 24, generator=gen)
    y = torch.randint(0, 36, (len(x),), generator=gen)
    xe = torch.randn(args.eval_images, 1, 24, 24, generator=gen)
    ye = torch.randint(0, 36, (len(xe),), generator=gen)
    recipe = replace(training.FINETUNE_RECIPE, epochs=1)
    net = CharNetModule()
    forms = training.gemm_forms
    times: dict[str, dict[str, list[float]]] = {"train step": {"on": [], "off": []}, "evaluate": {"on": [], "off": []}}
    try:
        for r in range(args.rounds + 1):
            for arm in (("on", "off") if r % 2 else ("off", "on")):
                training.gemm_forms = forms if arm == "on" else _off  # type: ignore[assignment]
                h = training.train(net, (x, y), recipe)
                t0 = time.perf_counter()
                training.evaluate(net, (xe, ye))
                te = time.perf_counter() - t0
                if r:  # round 0 warms both arms up
                    times["train step"][arm].append(h["seconds"] / h["steps"] * 1e3)
                    times["evaluate"][arm].append(te * 1e3)
    finally:
        training.gemm_forms = forms
    print(f"character network, dense, {args.threads} thread(s), {args.rounds} alternating rounds")
    for what, t in times.items():
        s, (lo, hi) = speedup_ci(t["off"], t["on"])
        on, off = sorted(t["on"])[len(t["on"]) // 2], sorted(t["off"])[len(t["off"]) // 2]
        print(f"  {what}: {off:.1f} ms without, {on:.1f} ms with: {s:.2f}x [{lo:.2f}, {hi:.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
