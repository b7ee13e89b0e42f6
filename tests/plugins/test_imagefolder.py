"""``imagefolder``: a folder of class sub-folders read with Pillow, split, normalised."""
import numpy as np
import pytest
import torch
from PIL import Image

from cpbench.errors import UsageError
from cpbench.run.paths import spec_dir
from cpbench.testing.sampledata import write_image_folder
from cpbench_builtins.datasets.imagefolder import ImageFolder


def _open(**params):
    return ImageFolder().open(**params)


def test_reads_classes_in_sorted_order_with_a_stratified_split(tmp_path):
    write_image_folder(tmp_path / "d", classes=3, per_class=10, size=(12, 10))
    ds = _open(path=str(tmp_path / "d"), test_fraction=0.2)
    assert ds.classes == ["c0", "c1", "c2"] and ds.num_classes == 3
    assert ds.input_shape == (3, 12, 10)
    xtr, ytr = ds.load("train").tensors
    xte, yte = ds.load("test").tensors
    assert xtr.dtype == torch.float32 and xtr.shape[1:] == (3, 12, 10)
    assert torch.bincount(ytr).tolist() == [8, 8, 8] and torch.bincount(yte).tolist() == [2, 2, 2]
    # normalised by the training split: zero mean, unit std per channel there, not in the test split
    assert xtr.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (xtr.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2
    # the first images of a split are a mix of classes, and the order is the same every time
    assert len(set(ytr[:6].tolist())) > 1
    again = ImageFolder().open(path=str(tmp_path / "d"), test_fraction=0.2, seed=0)
    assert torch.equal(again.load("train").tensors[0], xtr)
    other = _open(path=str(tmp_path / "d"), test_fraction=0.2, seed=1)
    assert not torch.equal(other.load("test").tensors[0], xte)


def test_train_and_test_subfolders_are_the_splits(tmp_path):
    write_image_folder(tmp_path / "d", classes=2, per_class=6, test_per_class=3, splits=True, size=(8, 8))
    ds = _open(path=str(tmp_path / "d"))
    assert len(ds.load("train").tensors[1]) == 12 and len(ds.load("test").tensors[1]) == 6
    assert len(ds.load("train", size=4).tensors[1]) == 4


def test_size_resizes_and_channels_default_to_the_files(tmp_path):
    write_image_folder(tmp_path / "g", classes=2, per_class=4, size=(20, 20), channels=1, fmt="bmp")
    gray = _open(path=str(tmp_path / "g"), size=[8, 6])
    assert gray.input_shape == (1, 8, 6)
    assert _open(path=str(tmp_path / "g"), channels=3).input_shape == (3, 20, 20)


def test_relative_path_starts_at_the_matrix_files_directory(tmp_path):
    write_image_folder(tmp_path / "d", classes=2, per_class=3, size=(8, 8))
    with spec_dir(tmp_path):
        assert _open(path="d").num_classes == 2


def _one_line(exc):
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(UsageError) as e:
        _open(path=str(tmp_path / "missing"))
    assert "no such folder" in _one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError) as e:
        _open(path=str(tmp_path / "empty"))
    assert "no images found" in _one_line(e)
    write_image_folder(tmp_path / "one", classes=1, per_class=4, size=(8, 8))
    with pytest.raises(UsageError) as e:
        _open(path=str(tmp_path / "one"))
    assert "only one class" in _one_line(e)


def test_unreadable_and_mixed_size_images_name_the_file(tmp_path):
    write_image_folder(tmp_path / "d", classes=2, per_class=3, size=(8, 8))
    (tmp_path / "d" / "c1" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UsageError) as e:
        _open(path=str(tmp_path / "d"))
    assert "broken.png" in _one_line(e)
    (tmp_path / "d" / "c1" / "broken.png").unlink()
    Image.fromarray(np.zeros((9, 5, 3), np.uint8)).save(tmp_path / "d" / "c1" / "odd.png")
    with pytest.raises(UsageError) as e:
        _open(path=str(tmp_path / "d"))
    assert "mixed sizes" in _one_line(e) and "odd.png" in str(e.value) and "size = [H, W]" in str(e.value)
    assert _open(path=str(tmp_path / "d"), size=[8, 8]).input_shape == (3, 8, 8)


@pytest.mark.parametrize("params, words", [
    ({"size": [0, 3]}, "size"), ({"channels": 2}, "channels"), ({"test_fraction": 1.5}, "test_fraction"),
    ({"colour": 1}, "unknown params"),
])
def test_bad_params_are_one_line_errors(tmp_path, params, words):
    write_image_folder(tmp_path / "d", classes=2, per_class=3, size=(8, 8))
    with pytest.raises(UsageError) as e:
        _open(path=str(tmp_path / "d"), **params)
    assert words in _one_line(e)


def test_test_classes_must_be_training_classes(tmp_path):
    write_image_folder(tmp_path / "d", classes=2, per_class=3, splits=True, size=(8, 8))
    (tmp_path / "d" / "test" / "extra").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "d" / "test" / "extra" / "a.png")
    with pytest.raises(UsageError, match="no training images"):
        _open(path=str(tmp_path / "d"))
