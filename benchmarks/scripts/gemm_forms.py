"""Training and evaluation with and without :mod:`cpbench.nn.gemmforms`, side by side.

    python benchmarks/scripts/gemm_forms.py [--threads 2] [--rounds 7] [--steps 6] [--eval-images 3600]

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--eval-images", type=int, default=3600)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
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
