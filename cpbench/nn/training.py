"""Training, evaluation and fine-tuning of (possibly decomposed) classifiers on in-memory tensors.

Pure-ish functions: they take a model, data and a :class:`Recipe` and return metrics; they never
print, never touch the global RNG state seen by the caller (all randomness -- shuffling, dropout --
runs under ``torch.random.fork_rng`` seeded from ``recipe.seed``) and never change the thread count
(the caller sets ``torch.set_num_threads``). The same model, data and recipe give the same weights.

A network with several outputs (a tuple, list or dict of tensors) is trained and evaluated on its
classifier output (:func:`cpbench.nn.outputs.classifier_output`: the first ``(N, classes)`` tensor); the
other outputs get no loss. A network without one cannot be trained on labels (:class:`UsageError`).

Data may be a ``TensorDataset`` of ``(images, labels)`` or a plain ``(images, labels)`` tuple.
Batches are drawn by indexing the tensors with a seeded ``torch.randperm`` per epoch (same effect
as a ``DataLoader(shuffle=True, generator=...)``, without its per-sample overhead).

Recipes (see ``benchmarks/scripts/train_charnet.py``):

* :data:`DEFAULT_RECIPE` -- base training of CharNet on SynthChars: AdamW (beta1 0.9, decoupled
  weight decay 0.01), peak LR 2e-3 on a one-cycle schedule (15% linear warm-up, then cosine decay
  to 0), gradient-norm clipping at 2, batch 128, 3 epochs over 60k images (1,404 steps, 180k
  samples). Measured: 89.4% test accuracy on SynthChars at the default difficulty. CharNet trains
  at ~850-1000 images/s on 2 idle threads, so the recipe takes ~3-3.5 min on an idle machine.
  Why Adam: with the same 20k-image/1-epoch budget AdamW reached 62% test accuracy vs 45% for SGD
  (Nesterov, LR 0.02); SGD at LR 0.05 diverged at the end of warm-up (this maxout net has no
  normalisation layers).
* :data:`FINETUNE_RECIPE` -- fine-tuning after a layer was replaced by its low-rank/CP
  approximation: AdamW with a ~7x smaller peak LR (3e-4), 5% warm-up then cosine decay, 1 epoch, no
  weight decay, gradient-norm clipping at 1. CP layers are products of several thin factors whose
  gradients compound; at the base LR fine-tuning is unstable (Lebedev et al. and practitioners
  report the same), while a small LR recovers most of the lost accuracy within one epoch.
  Measured (base 89.4%; conv2 -> CP-ALS; whole net fine-tuned 1 epoch on the 60k train images;
  test accuracy before -> after):
  rank 64 (rel. error 0.71): 87.7% -> 88.8% (LR 3e-4), 88.9% (1e-4), but 86.1% with the base LR
  2e-3 (the loss jumps first; worse than not fine-tuning at all);
  rank 16 (rel. error 0.87): 64.4% -> 86.5% (LR 3e-4), 84.2% (1e-4).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .gemmforms import gemm_forms

__all__ = [
    "Recipe",
    "DEFAULT_RECIPE",
    "FINETUNE_RECIPE",
    "ProgressFn",
    "train",
    "training_memory_format",
    "finetune",
    "evaluate",
    "recipe_hash",
    "as_tensors",
]

ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Recipe:
    """A training recipe. All fields are plain values so a recipe hashes stably (:func:`recipe_hash`).

    epochs: passes over the training data.
    batch_size: mini-batch size.
    lr: peak learning rate.
    momentum: SGD momentum (for ``optimizer="adam"`` it is beta1).
    weight_decay: L2 penalty (SGD) / decoupled decay (AdamW).
    schedule: ``"onecycle"`` (linear warm-up for ``warmup`` of the steps, then cosine to ~0),
        ``"cosine"`` (cosine from the start, no warm-up), ``"constant"``.
    warmup: warm-up fraction for ``"onecycle"``.
    optimizer: ``"sgd"`` or ``"adam"`` (AdamW).
    nesterov: Nesterov momentum for SGD.
    grad_clip: clip the global gradient norm to this (None = off).
    label_smoothing: cross-entropy label smoothing.
    n_train: how many training samples the recipe is meant for (the benchmark loads this many);
        ``train`` uses the first ``n_train`` samples it is given if it gets more. None = all.
    seed: seeds shuffling and dropout.
    """

    epochs: int = 3
    batch_size: int = 128
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 0.01
    schedule: str = "onecycle"
    warmup: float = 0.15
    optimizer: str = "adam"
    nesterov: bool = True
    grad_clip: float | None = 2.0
    label_smoothing: float = 0.0
    n_train: int | None = 60_000
    seed: int = 0

    def replace(self, **changes: Any) -> "Recipe":
        return replace(self, **changes)


DEFAULT_RECIPE = Recipe()

FINETUNE_RECIPE = Recipe(
    epochs=1,
    batch_size=128,
    lr=3e-4,
    momentum=0.9,
    weight_decay=0.0,
    schedule="onecycle",
    warmup=0.05,
    optimizer="adam",
    grad_clip=1.0,
    n_train=60_000,
)


def recipe_hash(recipe: Recipe, **extra: Any) -> str:
    """Stable 16-hex-digit content hash of the recipe plus any extra key/values (e.g. dataset,
    model params, data seed). Independent of field order and of the Python process."""
    payload = {"recipe": asdict(recipe), "extra": extra}
    text = json.dumps(payload, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def as_tensors(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) from a TensorDataset, a (images, labels) pair or a dict split entry."""
    tensors = getattr(data, "tensors", data)
    if not isinstance(tensors, Sequence) or len(tensors) != 2:
        raise TypeError("data must be a TensorDataset(images, labels) or an (images, labels) pair")
    x, y = tensors
    if len(x) != len(y):
        raise ValueError(f"images and labels differ in length: {len(x)} vs {len(y)}")
    return x, y.long()


def _lr_factor(schedule: str, warmup: float, total: int) -> Callable[[int], float]:
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))
    if schedule == "onecycle":
        w = max(1, int(round(warmup * total)))

        def f(step: int) -> float:
            if step < w:
                return (step + 1) / w
            p = (step - w) / max(total - w, 1)
            return 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))

        return f
    raise ValueError(f"unknown schedule {schedule!r}; use 'onecycle', 'cosine' or 'constant'")


def _optimizer(params: list[nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                               weight_decay=recipe.weight_decay,
                               nesterov=recipe.nesterov and recipe.momentum > 0)
    if recipe.optimizer == "adam":
        return torch.optim.AdamW(params, lr=recipe.lr, betas=(recipe.momentum, 0.999),
                                 weight_decay=recipe.weight_decay)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; use 'sgd' or 'adam'")


def training_memory_format(model: nn.Module, sample: torch.Tensor) -> torch.memory_format:
    """``channels_last`` for a network holding a depthwise convolution (a CP block's) or a BatchNorm, else
    ``contiguous_format``.

    Why: oneDNN's backward of depthwise convolutions and of BatchNorm runs far faster in channels-last on a
    CPU. Measured here, 2 threads, batch 128, each network timed in both formats in alternating rounds
    (``benchmarks/scripts/finetune_formats.py``; contiguous time over channels-last, > 1: channels-last
    faster; two runs): CharNet compressed by cp-als 2.28x and 2.04x, ResNet-20 by cp-als 1.85x and 1.84x,
    by tucker2 1.54x and 1.53x, by spatial-svd 1.36x and 1.34x, ResNet-20 dense 1.22x and 1.15x; without either layer
    kind channels-last was slower: CharNet dense 0.94x and 0.85x, by tucker2 0.96x and 0.90x, by spatial-svd
    0.96x and 0.97x. A network whose forward breaks on channels-last
    input (a ``.view`` over spatial dimensions, say) keeps the contiguous format: it is tried once on
    ``sample`` first. The format changes only the order of floating-point sums, not what is computed; the
    trained model is handed back contiguous. The choice is a rule, not a timing, so that the same model,
    data and recipe give the same weights on every run.
    """
    def favoured(m: nn.Module) -> bool:
        return isinstance(m, nn.BatchNorm2d) or (isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels)

    if sample.dim() != 4 or not any(favoured(m) for m in model.modules()):
        return torch.contiguous_format
    was_training = model.training
    try:
        model.eval().to(memory_format=torch.channels_last)
        with torch.no_grad():
            model(sample.contiguous(memory_format=torch.channels_last))
        return torch.channels_last
    except RuntimeError:
        return torch.contiguous_format
    finally:
        model.train(was_training).to(memory_format=torch.contiguous_format)


def _in_format(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return x.contiguous(memory_format=fmt) if x.dim() == 4 else x


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from ..errors import UsageError
    from .outputs import classifier_output

    out = classifier_output(model(x))
    if out is None or out.dim() != 2:
        raise UsageError("training and accuracy need a classifier output (N, classes); this network "
                         "returns none (give it no data set: timing, FLOPs and fidelity only)")
    return out


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, batch_size: int = 1024) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``data`` (eval mode; training mode restored)."""
    x, y = as_tensors(data)
    if len(x) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with gemm_forms(model, training=False):
            for i in range(0, len(x), batch_size):
                out = _logits(model, x[i : i + batch_size])
                correct += int((out.argmax(1) == y[i : i + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / len(x)


def train(
    model: nn.Module,
    train_data: Any,
    recipe: Recipe = DEFAULT_RECIPE,
    *,
    val_data: Any = None,
    progress: ProgressFn | None = None,
    trainable: Iterable[str] | None = None,
) -> dict:
    """Train ``model`` in place with ``recipe``; return the history.

    ``trainable``: names of sub-modules (``model.named_modules()``) whose parameters are trained;
    None = all parameters. ``progress(done_steps, total_steps, description)`` is called after every
    step. Training stops early, with ``history["diverged"] = True``, if the loss becomes non-finite.

    History keys: ``loss`` (mean train loss per epoch), ``val_acc`` (per epoch, if ``val_data``),
    ``epoch_seconds``, ``seconds`` (total wall time), ``steps``, ``samples``, ``diverged``,
    ``final_loss`` (mean loss over the last 10% of steps).
    """
    x, y = as_tensors(train_data)
    if recipe.n_train is not None and len(x) > recipe.n_train:
        x, y = x[: recipe.n_train], y[: recipe.n_train]
    n = len(x)
    if n == 0:
        raise ValueError("empty training data")
    bs = int(recipe.batch_size)
    steps_per_epoch = max(1, n // bs)  # drop the ragged last batch: fixed step count
    total = steps_per_epoch * int(recipe.epochs)

    if trainable is None:
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        mods = dict(model.named_modules())
        missing = [m for m in trainable if m not in mods]
        if missing:
            raise KeyError(f"no sub-module(s) named {missing}; have {sorted(k for k in mods if k)}")
        seen: set[int] = set()
        params = []
        for m in trainable:
            for p in mods[m].parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    fmt = training_memory_format(model, x[:2])
    model.to(memory_format=fmt)  # in place: the parameters stay the same objects
    opt = _optimizer(params, recipe)
    factor = _lr_factor(recipe.schedule, recipe.warmup, total)
    base_lrs = [g["lr"] for g in opt.param_groups]

    history: dict[str, Any] = {"loss": [], "val_acc": [], "epoch_seconds": [], "seconds": 0.0,
                               "steps": 0, "samples": 0, "diverged": False, "final_loss": None}
    step_losses: list[float] = []
    g = torch.Generator().manual_seed(int(recipe.seed))
    t0 = time.perf_counter()
    was_training = model.training
    with torch.random.fork_rng(devices=[]), gemm_forms(model, training=True, memory_format=fmt):
        torch.manual_seed(int(recipe.seed) + 1)  # dropout etc.; caller's RNG state is restored
        model.train()
        try:
            for epoch in range(int(recipe.epochs)):
                te = time.perf_counter()
                perm = torch.randperm(n, generator=g)
                ep_loss = 0.0
                for b in range(steps_per_epoch):
                    step = epoch * steps_per_epoch + b
                    f = factor(step)
                    for grp, lr0 in zip(opt.param_groups, base_lrs):
                        grp["lr"] = lr0 * f
                    idx = perm[b * bs : (b + 1) * bs]
                    out = _logits(model, _in_format(x[idx], fmt))
                    loss = F.cross_entropy(out, y[idx], label_smoothing=recipe.label_smoothing)
                    lv = float(loss.detach())
                    if not math.isfinite(lv):
                        history["diverged"] = True
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if recipe.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
                    opt.step()
                    ep_loss += lv
                    step_losses.append(lv)
                    history["steps"] += 1
                    history["samples"] += len(idx)
                    if progress is not None:
                        progress(step + 1, total, f"epoch {epoch + 1}/{recipe.epochs} loss {lv:.3f}")
                done = b + 1 if not history["diverged"] else b
                history["loss"].append(ep_loss / max(done, 1))
                if val_data is not None and not history["diverged"]:
                    history["val_acc"].append(evaluate(model, val_data))
                history["epoch_seconds"].append(time.perf_counter() - te)
                if history["diverged"]:
                    break
        finally:
            model.train(was_training)
            model.to(memory_format=torch.contiguous_format)
    history["seconds"] = time.perf_counter() - t0
    if step_losses:
        k = max(1, len(step_losses) // 10)
        history["final_loss"] = sum(step_losses[-k:]) / k
    return history


def finetune(
    model: nn.Module,
    train_data: Any,
    recipe: Recipe = FINETUNE_RECIPE,
    *,
    val_data: Any = None,
    progress: ProgressFn | None = None,
    trainable: Iterable[str] | None = None,
) -> dict:
    """Fine-tune an (approximated) model: :func:`train` with :data:`FINETUNE_RECIPE` by default.

    By default every parameter is trained (as in Lebedev et al.); pass ``trainable=["conv2"]`` to
    train only the replaced layer(s).
    """
    return train(model, train_data, recipe, val_data=val_data, progress=progress, trainable=trainable)
