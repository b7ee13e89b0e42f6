"""SynthChars: determinism, disjoint splits, balance, value ranges, both cases, plugin contract."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from cpbench_builtins.datasets import synthchars as sc
from cpbench_builtins.datasets.synthchars import CLASSES, GLYPHS, SynthChars, generate, make_splits


@pytest.fixture(scope="module")
def splits():
    return make_splits(seed=0, n_train=720, n_val=360, n_test=360)


def test_deterministic_for_a_seed():
    a = generate(300, seed=3, split="train")
    b = generate(300, seed=3, split="train")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_no_global_rng_use():
    state = torch.get_rng_state()
    generate(50, seed=0)
    assert torch.equal(state, torch.get_rng_state())


def test_different_seeds_differ():
    a, _ = generate(100, seed=0)
    b, _ = generate(100, seed=1)
    assert not torch.equal(a, b)
    assert (a - b).abs().mean() > 0.1


def test_split_does_not_depend_on_other_split_sizes(splits):
    other = make_splits(seed=0, n_train=36, n_val=360, n_test=36)
    assert torch.equal(other["val"][0], splits["val"][0])


def test_splits_disjoint(splits):
    seen: dict[bytes, str] = {}
    for name, (x, _) in splits.items():
        for img in x:
            key = img.numpy().tobytes()
            assert key not in seen, f"an image of {name} is byte-identical to one in {seen.get(key)}"
            seen[key] = name
    assert len(seen) == 720 + 360 + 360


def test_class_balance(splits):
    for name, (_, y) in splits.items():
        counts = torch.bincount(y, minlength=36)
        assert counts.min() == counts.max() == len(y) // 36, name
    _, y = generate(100, seed=0)  # not a multiple of 36: counts differ by at most one
    counts = torch.bincount(y, minlength=36)
    assert counts.max() - counts.min() <= 1


def test_shapes_dtype_range(splits):
    x, y = splits["train"]
    assert x.shape == (720, 1, 24, 24) and x.dtype == torch.float32
    assert y.shape == (720,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 36
    assert torch.isfinite(x).all()
    mean = x.mean(dim=(1, 2, 3))
    std = x.std(dim=(1, 2, 3))
    assert mean.abs().max() < 1e-4
    assert (std - 1).abs().max() < 1e-3
    assert x.abs().max() < 20


def test_both_cases_in_letter_classes():
    x, y, meta = generate(36 * 20, seed=0, return_meta=True)
    chars = [GLYPHS[i] for i in meta["glyph"].tolist()]
    # every rendered glyph belongs to its label's class, case-insensitively
    assert all(c.upper() == CLASSES[label] for c, label in zip(chars, y.tolist()))
    for cls in range(10, 36):
        cs = {c for c, label in zip(chars, y.tolist()) if label == cls}
        assert cs == {CLASSES[cls], CLASSES[cls].lower()}, (CLASSES[cls], cs)
    assert not meta["lower"][y < 10].any()
    assert int(meta["font"].max()) < len(sc.FONT_FILES)


def test_plugin_object():
    ds = SynthChars()
    assert ds.name == "synthchars" and ds.num_classes == 36 and ds.input_shape == (1, 24, 24)
    d = ds.load("test", seed=0, size=72)
    assert isinstance(d, TensorDataset) and len(d) == 72
    img, label = d[0]
    assert img.shape == (1, 24, 24) and label.dtype == torch.int64
    assert torch.equal(d.tensors[0], generate(72, seed=0, split="test")[0])


def test_bad_split():
    with pytest.raises(ValueError) as err:
        SynthChars().load("validation", size=10)
    for allowed in ("train", "val", "test"):
        assert allowed in str(err.value)


def test_registration_hook():
    added = []

    class Reg:
        def add(self, obj):
            added.append(obj)
            return obj

    sc.cpbench_register_datasets(registry=Reg())
    assert [o.name for o in added] == ["synthchars"]
