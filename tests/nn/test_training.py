"""cpbench.nn.training: a tiny train cycle learns, is reproducible, fine-tuning runs, hashing is stable."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from cpbench.nn.training import (
    DEFAULT_RECIPE,
    FINETUNE_RECIPE,
    Recipe,
    evaluate,
    finetune,
    recipe_hash,
    train,
)
from cpbench_builtins.datasets.synthchars import generate
from cpbench_builtins.models.charnet import CharNet


def small_net(seed: int = 0) -> nn.Module:
    """A small CNN (much cheaper than CharNet) to exercise the training loop quickly."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 3 * 3, 36),
    )


@pytest.fixture(scope="module")
def data():
    x, y = generate(1200, seed=0, split="train", difficulty=0.3)
    xt, yt = generate(360, seed=0, split="test", difficulty=0.3)
    return (x, y), (xt, yt)


TINY = Recipe(epochs=2, batch_size=32, lr=0.05, optimizer="sgd", weight_decay=5e-4, grad_clip=None,
              n_train=None, seed=0)


def test_tiny_train_learns_and_reports(data):
    (train_data, test_data) = data
    model = small_net()
    before = evaluate(model, test_data)
    calls = []
    hist = train(model, train_data, TINY, val_data=test_data,
                 progress=lambda done, total, desc: calls.append((done, total, desc)))
    after = evaluate(model, test_data)
    assert after > 0.15 and after > before + 0.1, (before, after)
    assert len(hist["loss"]) == 2 and hist["loss"][1] < hist["loss"][0]
    assert len(hist["val_acc"]) == 2 and 0 <= hist["val_acc"][-1] <= 1
    assert hist["seconds"] > 0 and hist["steps"] == 2 * (1200 // 32) and not hist["diverged"]
    assert calls[-1][0] == calls[-1][1] == hist["steps"] and isinstance(calls[-1][2], str)


def test_reproducible_and_rng_untouched(data):
    train_data, _ = data
    recipe = TINY.replace(epochs=1, n_train=640)
    state = torch.get_rng_state()
    a, b = small_net(), small_net()
    torch.set_rng_state(state)
    train(a, train_data, recipe)
    train(b, train_data, recipe)
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k
    c = small_net()
    train(c, train_data, recipe.replace(seed=1))
    assert not torch.equal(a[0].weight, c[0].weight)


def test_evaluate_restores_mode(data):
    _, test_data = data
    model = small_net().train()
    acc = evaluate(model, test_data, batch_size=100)
    assert 0.0 <= acc <= 1.0 and model.training


def test_finetune_charnet_runs_and_trainable(data):
    train_data, _ = data
    model = CharNet().build(seed=0)
    conv1 = model.conv1.weight.detach().clone()
    conv2 = model.conv2.weight.detach().clone()
    hist = finetune(model, train_data, FINETUNE_RECIPE.replace(n_train=256), trainable=["conv2"])
    assert hist["steps"] == 2 and len(hist["loss"]) == 1 and math.isfinite(hist["loss"][0])
    assert torch.equal(model.conv1.weight, conv1)
    assert not torch.equal(model.conv2.weight, conv2)
    with pytest.raises(KeyError):
        finetune(model, train_data, FINETUNE_RECIPE.replace(n_train=256), trainable=["nope"])


def test_divergence_is_reported(data):
    train_data, _ = data
    hist = train(small_net(), train_data, TINY.replace(lr=1e12, epochs=1, n_train=640, momentum=0.0,
                                                       schedule="constant"))
    assert hist["diverged"] and hist["steps"] < 640 // 32


def test_recipes_and_hash():
    assert FINETUNE_RECIPE.lr < DEFAULT_RECIPE.lr / 5
    h = recipe_hash(DEFAULT_RECIPE, dataset="synthchars")
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    assert h == recipe_hash(Recipe(), dataset="synthchars")
    assert h != recipe_hash(DEFAULT_RECIPE, dataset="other")
    assert h != recipe_hash(DEFAULT_RECIPE.replace(lr=0.01), dataset="synthchars")
    assert recipe_hash(DEFAULT_RECIPE, a=1, b=2) == recipe_hash(DEFAULT_RECIPE, b=2, a=1)
    with pytest.raises(ValueError):
        train(small_net(), (torch.zeros(4, 1, 24, 24), torch.zeros(4, dtype=torch.long)),
              TINY.replace(schedule="bogus"))


class _SpatialView(nn.Module):
    """A model whose forward breaks on channels-last input: ``.view`` over C, H and W."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block, self.fc = block, nn.Linear(8 * 20 * 20, 36)

    def forward(self, x):
        y = self.block(x)
        return self.fc(y.view(y.shape[0], -1))


def _cp_net() -> nn.Module:
    from cpbench.nn.surgery import compress

    return compress(small_net(), {"0": ("cp-als", 4), "3": ("cp-als", 6)})


def test_training_memory_format_follows_depthwise_convs_and_batchnorm(data):
    from cpbench.nn.surgery import compress
    from cpbench.nn.training import training_memory_format

    (x, _), _ = data
    assert training_memory_format(small_net(), x[:2]) == torch.contiguous_format  # neither: unchanged
    tucker = compress(small_net(), {"3": ("tucker2", [8, 4])})  # 1x1 and kxk convs, no depthwise
    assert training_memory_format(tucker, x[:2]) == torch.contiguous_format
    with_bn = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(8, 36))
    assert training_memory_format(with_bn, x[:2]) == torch.channels_last
    net = _cp_net()  # a CP block's depthwise convs
    assert training_memory_format(net, x[:2]) == torch.channels_last
    assert all(p.is_contiguous() for p in net.parameters())  # the probe hands the model back as it was
    viewing = _SpatialView(compress(nn.Sequential(nn.Conv2d(1, 8, 5)), {"0": ("cp-als", 3)}))
    assert training_memory_format(viewing, x[:2]) == torch.contiguous_format  # its forward needs contiguous
    train(viewing, (x[:64], data[0][1][:64]), TINY.replace(epochs=1))  # and it trains


def test_channels_last_training_computes_what_contiguous_does(data, monkeypatch):
    """The format changes the order of sums only: one epoch from the same start lands on the same weights."""
    import cpbench.nn.training as training

    (x, y), _ = data
    recipe = TINY.replace(epochs=1, n_train=256)
    nets = [_cp_net(), _cp_net()]
    train(nets[0], (x, y), recipe)
    monkeypatch.setattr(training, "training_memory_format", lambda model, sample: torch.contiguous_format)
    train(nets[1], (x, y), recipe)
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        assert a.is_contiguous() and b.is_contiguous(), name
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name
