"""The kernel suite's kernels: trained conv kernels of four networks, and synthetic low-rank ones.

Trained here (cached, so a second run reads them back):

* ``charnet.conv2`` (128, 48, 9, 9) and ``charnet.conv3`` (512, 64, 8, 8): the shipped character
  network (trained by ``cpbench train charnet`` with the default recipe);
* ``alexnet.conv2..conv5``: an AlexNet-style stack (5x5 then 3x3 convs, 64-192-384-256-256
  channels) on synthchars, trained for ``steps`` Adam steps;
* ``vgg.conv1_2..conv4_2``: a VGG-style stack of 3x3 convs (64-64, 128-128, 256-256, 512-512).
* ``resnet20.layer{1,2,3}.1.conv1``: the shipped ResNet-20 (16, 32, 64 channels) on synthchars' one channel.

Training is short on purpose (a few hundred steps): the point is kernels with the structure
training gives (smooth spatial profiles, correlated channels, a decaying spectrum), not accurate
networks; the test accuracy reached is stored with the kernels and printed.

Synthetic: ``lowrank.*`` exactly rank R (well-conditioned random factors) and ``nearlow.*`` the
same plus 1 % Gaussian noise (relative to the norm), decomposed at that R.

Usage: ``python benchmarks/scripts/suite_kernels.py [--steps N]`` trains (or reads) and lists them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cpbench.run.cache import default_cache_dir  # noqa: E402

__all__ = ["trained_kernels", "synthetic_kernels", "AlexNetStyle", "VGGStyle", "CHARNET_WEIGHTS"]

CHARNET_WEIGHTS = next(
    (Path(__file__).resolve().parents[2] / "plugins/cpbench_builtins/models/weights/models").glob("*/*.safetensors")
)


class AlexNetStyle(nn.Module):
    """AlexNet's conv stack scaled to 24x24 inputs: 5x5 64->192, then 3x3 192->384->256->256."""

    def __init__(self, n_classes: int = 36):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 5, padding=2)
        self.conv2 = nn.Conv2d(64, 192, 5, padding=2)
        self.conv3 = nn.Conv2d(192, 384, 3, padding=1)
        self.conv4 = nn.Conv2d(384, 256, 3, padding=1)
        self.conv5 = nn.Conv2d(256, 256, 3, padding=1)
        self.fc = nn.Linear(256 * 9, n_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 12x12
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 6x6
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = F.max_pool2d(F.relu(self.conv5(x)), 2)  # 3x3
        return self.fc(x.flatten(1))


class VGGStyle(nn.Module):
    """VGG-BN's pairs of 3x3 convs (64, 128, 256, 512 channels) on 24x24 inputs (without the batch
    norms, 300 steps left the loss at ln 36: the kernels stayed at their random initialisation)."""

    widths = (64, 128, 256, 512)

    def __init__(self, n_classes: int = 36):
        super().__init__()
        cin = 1
        for i, w in enumerate(self.widths, start=1):
            setattr(self, f"conv{i}_1", nn.Conv2d(cin, w, 3, padding=1))
            setattr(self, f"bn{i}_1", nn.BatchNorm2d(w))
            setattr(self, f"conv{i}_2", nn.Conv2d(w, w, 3, padding=1))
            setattr(self, f"bn{i}_2", nn.BatchNorm2d(w))
            cin = w
        self.fc = nn.Linear(512 * 9, n_classes)

    def forward(self, x):
        for i in range(1, len(self.widths) + 1):
            x = F.relu(getattr(self, f"bn{i}_1")(getattr(self, f"conv{i}_1")(x)))
            x = F.relu(getattr(self, f"bn{i}_2")(getattr(self, f"conv{i}_2")(x)))
            if i < len(self.widths):
                x = F.max_pool2d(x, 2)  # 24 -> 12 -> 6 -> 3
        return self.fc(x.flatten(1))


def _resnet20(n_classes: int = 36) -> nn.Module:
    """The shipped ResNet-20 (the "your network" model ``resnet``), on synthchars' one channel."""
    from cpbench_builtins.models.resnet import CifarResNet

    return CifarResNet(20, n_classes, in_channels=1)


KEEP = {
    "alexnet": ("conv2", "conv3", "conv4", "conv5"),
    "vgg": ("conv1_2", "conv2_1", "conv2_2", "conv3_2", "conv4_1", "conv4_2"),
    # one 3x3 conv of each stage (16, 32, 64 channels)
    "resnet20": ("layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1"),
}
NETS = {"alexnet": AlexNetStyle, "vgg": VGGStyle, "resnet20": _resnet20}


def _train(name: str, steps: int, seed: int, log) -> tuple[dict[str, torch.Tensor], float]:
    from cpbench.nn.training import evaluate
    from cpbench_builtins.datasets.synthchars import SynthChars

    data = SynthChars()
    train = data.load("train", seed=seed, size=steps * 64)
    test = data.load("test", seed=seed, size=2000)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = NETS[name]()
    x, y = train.tensors
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    start = time.perf_counter()
    net.train()
    for step in range(steps):
        xb, yb = x[step * 64:(step + 1) * 64], y[step * 64:(step + 1) * 64]
        loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            log(f"{name}: step {step}/{steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    net.eval()
    acc = evaluate(net, test)
    return {f"{name}.{k}": net.get_submodule(k).weight.detach().clone().contiguous() for k in KEEP[name]}, acc


def trained_kernels(steps: int = 300, seed: int = 0, log=print,
                    nets: tuple[str, ...] = ("charnet", "alexnet", "vgg", "resnet20")) -> dict[str, torch.Tensor]:
    """The trained kernels of ``nets`` by name (``net.layer``), trained once and cached."""
    from safetensors.torch import load_file, save_file

    out = {f"charnet.{k}": v for k, v in load_file(str(CHARNET_WEIGHTS)).items()
           if k in ("conv2.weight", "conv3.weight")}
    out = {k.removesuffix(".weight"): v for k, v in out.items()} if "charnet" in nets else {}
    for name in (n for n in NETS if n in nets):
        key = hashlib.sha256(json.dumps([name, KEEP[name], steps, seed, 1 if name == "alexnet" else 2]).encode()).hexdigest()[:16]
        path = default_cache_dir() / "kernel-suite" / f"{name}-{key}.safetensors"
        if not path.exists():
            kernels, acc = _train(name, steps, seed, log)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(kernels, str(path), metadata={"test_accuracy": f"{acc:.4f}", "steps": str(steps)})
            log(f"{name}: trained {steps} steps, test accuracy {acc:.3f}; cached in {path}")
        out.update(load_file(str(path)))
    return out


def _well_conditioned(shape, rank, gen) -> list[torch.Tensor]:
    fs = []
    for s in shape:
        m = torch.randn((s, rank), generator=gen, dtype=torch.float64)
        if s >= rank:  # orthonormal columns with a spread of scales: a unique, stable CP
            m = torch.linalg.qr(m).Q * torch.linspace(1.0, 2.0, rank, dtype=torch.float64)
        fs.append(m)
    return fs


def synthetic_kernels(seed: int = 0) -> dict[str, tuple[torch.Tensor, int]]:
    """``{name: (kernel, rank)}``: exactly rank-R kernels and the same with 1 % noise."""
    from cpbench.decomposition.solvers import reconstruct

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for shape, rank in (((64, 32, 3, 3), 16), ((128, 64, 3, 3), 48), ((192, 64, 5, 5), 64)):
        t = reconstruct(_well_conditioned(shape, rank, gen))
        tag = "x".join(map(str, shape)) + f"-R{rank}"
        out[f"lowrank.{tag}"] = (t, rank)
        noise = torch.randn(shape, generator=gen, dtype=torch.float64)
        out[f"nearlow.{tag}"] = (t + 0.01 * noise * (t.norm() / noise.norm()), rank)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name, w in trained_kernels(args.steps, log=lambda s: print(s, file=sys.stderr, flush=True)).items():
        print(f"{name:16s} {tuple(w.shape)} {w.numel():>9d} entries")
    for name, (w, r) in synthetic_kernels().items():
        print(f"{name:24s} {tuple(w.shape)} R={r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
