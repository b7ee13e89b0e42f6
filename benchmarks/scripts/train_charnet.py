"""Train the base CharNet on SynthChars with the default recipe; print test accuracy and wall time.

    PYTHONPATH=plugins:. python benchmarks/scripts/train_charnet.py            # default recipe, 2 threads
    PYTHONPATH=plugins:. python benchmarks/scripts/train_charnet.py --epochs 1 --n-train 10000   # quick

Options override single recipe fields; ``--save PATH`` writes the weights (safetensors).
``--lowrank-conv2 R`` additionally replaces conv2 by a rank-R spatial-SVD approximation
(9x1 conv with R outputs, then 1x9 conv), reports the accuracy drop and fine-tunes with
``FINETUNE_RECIPE`` (a quick check of the fine-tuning recipe; not the CP decomposers).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

_ROOT = Path(__file__).resolve().parents[2]
for p in (_ROOT / "plugins", _ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from cpbench.nn.training import DEFAULT_RECIPE, FINETUNE_RECIPE, evaluate, finetune, recipe_hash, train  # noqa: E402
from cpbench_builtins.datasets.synthchars import DEFAULT_DIFFICULTY, DEFAULT_SIZES, make_splits  # noqa: E402
from cpbench_builtins.models.charnet import CharNet  # noqa: E402


def spatial_svd(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """Rank-``rank`` separable approximation of a conv (Jaderberg et al. scheme 2 via SVD):
    W[o, i, y, x] ~ sum_r V[r, i, y] * H[o, r, x]."""
    w = conv.weight.detach()
    o, i, kh, kw = w.shape
    m = w.permute(1, 2, 0, 3).reshape(i * kh, o * kw)  # (i, y) x (o, x)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r = min(rank, len(s))
    v_fac = (u[:, :r] * s[:r].sqrt()).T.reshape(r, i, kh, 1)
    h_fac = (vh[:r] * s[:r].sqrt().unsqueeze(1)).reshape(r, o, kw).permute(1, 0, 2).reshape(o, r, 1, kw)
    first = nn.Conv2d(i, r, (kh, 1), bias=False)
    second = nn.Conv2d(r, o, (1, kw), bias=conv.bias is not None)
    first.weight.data.copy_(v_fac)
    second.weight.data.copy_(h_fac)
    if conv.bias is not None:
        second.bias.data.copy_(conv.bias.detach())
    return nn.Sequential(first, second)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="data seed (the recipe seed is --recipe-seed)")
    ap.add_argument("--difficulty", type=float, default=DEFAULT_DIFFICULTY)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=DEFAULT_SIZES["test"])
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--optimizer", choices=["sgd", "adam"], default=None)
    ap.add_argument("--weight-decay", type=float, default=None)
    ap.add_argument("--schedule", default=None)
    ap.add_argument("--grad-clip", type=float, default=None)
    ap.add_argument("--warmup", type=float, default=None)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--recipe-seed", type=int, default=None)
    ap.add_argument("--save", type=Path, default=None)
    ap.add_argument("--lowrank-conv2", type=int, default=None, metavar="R")
    ap.add_argument("--ft-lr", type=float, default=None)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    changes = {k: v for k, v in {
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
        "optimizer": args.optimizer, "weight_decay": args.weight_decay, "schedule": args.schedule,
        "n_train": args.n_train, "seed": args.recipe_seed, "grad_clip": args.grad_clip,
        "warmup": args.warmup,
    }.items() if v is not None}
    recipe = DEFAULT_RECIPE.replace(**changes)
    n_train = recipe.n_train or DEFAULT_SIZES["train"]

    t0 = time.perf_counter()
    data = make_splits(seed=args.seed, n_train=n_train, n_val=DEFAULT_SIZES["val"], n_test=args.n_test,
                       difficulty=args.difficulty)
    t_data = time.perf_counter() - t0
    print(f"data: {n_train} train / {len(data['val'][1])} val / {len(data['test'][1])} test "
          f"in {t_data:.1f}s (difficulty {args.difficulty})", flush=True)
    print(f"recipe: {recipe}  hash {recipe_hash(recipe, dataset='synthchars', data_seed=args.seed)}",
          flush=True)

    model = CharNet().build(seed=recipe.seed, dropout=args.dropout)
    last = [0.0]

    def progress(done: int, total: int, desc: str) -> None:
        now = time.perf_counter()
        if now - last[0] > 15 or done == total:
            last[0] = now
            print(f"  [{done}/{total}] {desc}", flush=True)

    hist = train(model, data["train"], recipe, val_data=data["val"], progress=progress)
    acc = evaluate(model, data["test"])
    print(f"epochs: loss {[round(v, 3) for v in hist['loss']]} val {[round(v, 4) for v in hist['val_acc']]}")
    print(f"RESULT base test accuracy {acc:.4f}  train wall time {hist['seconds']:.1f}s "
          f"({hist['samples'] / hist['seconds']:.0f} samples/s, {args.threads} threads)", flush=True)
    if args.save:
        from safetensors.torch import save_file

        args.save.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.save))

    if args.lowrank_conv2:
        ft = FINETUNE_RECIPE.replace(n_train=n_train, **({"lr": args.ft_lr} if args.ft_lr else {}))
        model.conv2 = spatial_svd(model.conv2, args.lowrank_conv2)
        acc0 = evaluate(model, data["test"])
        print(f"conv2 -> rank-{args.lowrank_conv2} spatial SVD: test accuracy {acc0:.4f} before fine-tuning",
              flush=True)
        h = finetune(model, data["train"], ft, val_data=data["val"], progress=progress)
        acc1 = evaluate(model, data["test"])
        print(f"RESULT after fine-tuning ({ft.epochs} epoch, lr {ft.lr}): test accuracy {acc1:.4f} "
              f"(val per epoch {[round(v, 4) for v in h['val_acc']]}, diverged={h['diverged']}, "
              f"{h['seconds']:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
