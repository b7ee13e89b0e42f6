"""Fine-tuning speed by memory format: why networks holding decomposed blocks are trained in channels-last.

    python benchmarks/scripts/finetune_formats.py [--threads 2] [--rounds 12] [--steps 3] [--json OUT]

For each network (the character network, ResNet-20, dense and compressed by cp-als, tucker2 and spatial-svd
at ``speedup:S`` per layer; random weights: a training step's time does not depend on their values), one
training step (AdamW, batch 128, the fine-tuning recipe's optimiser) is timed in the contiguous format and
in channels-last, in alternating rounds of ``--steps`` steps each so that load changes hit both alike. The
figure is the contiguous time over the channels-last time (> 1: channels-last is faster), the median over
the rounds with a paired block-bootstrap 95% interval (:func:`cpbench.measure.stats.speedup_ci`), and the
format :func:`cpbench.nn.training.training_memory_format` chooses for the network.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
for p in (_ROOT / "plugins", _ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cpbench.decomposition.ranks import resolve_rank  # noqa: E402
from cpbench.measure.stats import speedup_ci  # noqa: E402
from cpbench.nn.layers import geometry  # noqa: E402
from cpbench.nn.surgery import layer_input_shapes, replace_layers  # noqa: E402
from cpbench.nn.training import training_memory_format  # noqa: E402
from cpbench.plugin.manager import get_plugins  # noqa: E402


def compressed(net: torch.nn.Module, layers: list[str], method: str, spec: str, x: torch.Tensor) -> torch.nn.Module:
    """``net`` with ``layers`` replaced by ``method`` at ``spec``, from random factors of the ranks the spec
    gives (a step's time does not depend on the values; a CP fit of the character network's conv3 at
    these ranks takes minutes)."""
    dec = get_plugins().decomposers.get(method)
    shapes = layer_input_shapes(net, x[:1], layers)
    convs = dict(net.named_modules())
    repl = {}
    for n in layers:
        conv = convs[n]
        rank, _ = resolve_rank(spec, dec, conv.weight.detach(), geometry(conv), tuple(shapes[n][-2:]), layer=n)
        repl[n] = dec.build(conv, dec.random_factorization(tuple(conv.weight.shape), rank, seed=0))
    return replace_layers(net, repl)


def networks(spec: str) -> dict[str, tuple[torch.nn.Module, torch.Tensor, int]]:
    from cpbench_builtins.models.charnet import CharNetModule
    from cpbench_builtins.models.resnet import CifarResNet

    torch.manual_seed(0)
    out = {}
    for name, net, x, classes, layers in (
            ("charnet", CharNetModule(), torch.randn(128, 1, 24, 24), 36, ["conv1", "conv2", "conv3"]),
            ("resnet20", CifarResNet(20, 10, 3, 16), torch.randn(128, 3, 32, 32), 10, None)):
        if layers is None:  # ResNet-20: its 18 3x3 convs after the stem
            layers = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and n != "conv1"]
        out[f"{name} dense"] = (net, x, classes)
        for method in ("cp-als", "tucker2", "spatial-svd"):
            out[f"{name} {method} {spec}"] = (compressed(net, layers, method, spec, x), x, classes)
    return out


def step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def measure(model: torch.nn.Module, x: torch.Tensor, classes: int, rounds: int, steps: int) -> dict:
    model.train()
    y = torch.randint(0, classes, (len(x),), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    formats = {"contiguous": (torch.contiguous_format, x),
               "channels_last": (torch.channels_last, x.contiguous(memory_format=torch.channels_last))}
    times: dict[str, list[float]] = {k: [] for k in formats}
    for r in range(rounds + 1):
        for name in (list(formats) if r % 2 == 0 else list(formats)[::-1]):
            fmt, xx = formats[name]
            model.to(memory_format=fmt)
            s = step_seconds(model, xx, y, opt, steps)
            if r:  # round 0 warms both up
                times[name].append(s)
    model.to(memory_format=torch.contiguous_format)
    ratio, ci = speedup_ci(times["contiguous"], times["channels_last"])
    return {"contiguous_ms": 1e3 * statistics.median(times["contiguous"]),
            "channels_last_ms": 1e3 * statistics.median(times["channels_last"]),
            "ratio": ratio, "ratio_ci": list(ci),
            "chosen": "channels_last" if training_memory_format(model, x[:2]) == torch.channels_last else "contiguous"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--spec", default="speedup:2", help="the rank spec of every replaced layer")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    print(f"{'network':<34} {'contiguous':>11} {'ch-last':>9} {'ratio [95%]':>20}  chosen")
    for name, (net, x, classes) in networks(args.spec).items():
        r = rows[name] = measure(net, x, classes, args.rounds, args.steps)
        print(f"{name:<34} {r['contiguous_ms']:>9.1f}ms {r['channels_last_ms']:>7.1f}ms "
              f"{r['ratio']:>6.2f} [{r['ratio_ci'][0]:.2f}, {r['ratio_ci'][1]:.2f}]  {r['chosen']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "spec": args.spec, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
