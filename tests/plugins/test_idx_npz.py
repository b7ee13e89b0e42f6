"""``idx`` (MNIST-family files, gzipped or not, no pickle) and ``npz`` data sets."""
import gzip

import numpy as np
import pytest
import torch

from cpbench.errors import UsageError
from cpbench.testing.sampledata import write_idx, write_npz
from cpbench_builtins.datasets.idx import Idx, read_idx
from cpbench_builtins.datasets.npz import Npz


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reads_the_four_mnist_files(tmp_path, gz):
    write_idx(tmp_path, classes=3, n_train=30, n_test=9, size=(12, 12), gz=gz)
    ds = Idx().open(path=str(tmp_path))
    assert ds.input_shape == (1, 12, 12) and ds.num_classes == 3
    x, y = ds.load("train").tensors
    assert x.shape == (30, 1, 12, 12) and torch.bincount(y).tolist() == [10, 10, 10]
    assert abs(float(x.mean())) < 1e-4  # normalised by the training split
    assert len(ds.load("test").tensors[1]) == 9


def test_idx_header_gives_dims_and_a_truncated_file_is_an_error(tmp_path):
    write_idx(tmp_path, n_train=8, n_test=4, size=(5, 7), gz=False)
    assert read_idx(tmp_path / "train-images-idx3-ubyte").shape == (8, 5, 7)
    data = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data[:-3])
    with pytest.raises(UsageError, match="truncated or not IDX"):
        read_idx(tmp_path / "train-images-idx3-ubyte")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x80\x02junk")
    with pytest.raises(UsageError, match="is not an IDX file"):
        read_idx(tmp_path / "train-labels-idx1-ubyte")
    (tmp_path / "t.gz").write_bytes(b"not gzip")
    with pytest.raises(UsageError, match="cannot read"):
        read_idx(tmp_path / "t.gz")


def test_idx_missing_files_and_folders_are_one_line_errors(tmp_path):
    with pytest.raises(UsageError, match="no such folder"):
        Idx().open(path=str(tmp_path / "missing"))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(UsageError) as e:
        Idx().open(path=str(tmp_path))
    assert "no train-labels-idx1-ubyte" in str(e.value) and "\n" not in str(e.value)


def test_idx_labels_out_of_the_training_range_are_an_error(tmp_path):
    write_idx(tmp_path, classes=3, n_train=12, n_test=4, gz=False)
    labels = read_idx(tmp_path / "t10k-labels-idx1-ubyte").copy()
    labels[0] = 7
    from cpbench.testing.sampledata import _idx_bytes

    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    with pytest.raises(UsageError, match=r"label 7 is out of range; allowed: 0\.\.2"):
        Idx().open(path=str(tmp_path))


@pytest.mark.parametrize("channels, shape", [(None, (1, 16, 16)), (3, (3, 16, 16))])
def test_npz_takes_nhw_or_nchw_and_splits_stratified(tmp_path, channels, shape):
    write_npz(tmp_path / "d.npz", classes=4, n=40, channels=channels, x="images", y="labels")
    ds = Npz().open(path=str(tmp_path / "d.npz"), x="images", y="labels", test_fraction=0.3)
    assert ds.input_shape == shape and ds.num_classes == 4
    assert torch.bincount(ds.load("test").tensors[1]).tolist() == [3, 3, 3, 3]  # round(0.3 * 10) per class


def test_npz_explicit_test_arrays_are_the_test_split(tmp_path):
    x = np.random.default_rng(0).random((10, 1, 4, 4)).astype(np.float32)
    y = np.arange(10) % 2
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x[:3], y_test=y[:3])
    ds = Npz().open(path=str(tmp_path / "d.npz"))
    assert len(ds.load("train").tensors[1]) == 10 and len(ds.load("test").tensors[1]) == 3


@pytest.mark.parametrize("arrays, words", [
    ({"x": np.zeros((6, 4, 4), np.uint8), "y": np.zeros(6, np.int64)}, "only one class"),
    ({"x": np.zeros((6, 4, 4), np.uint8), "y": np.array([0, 1, 0, 1, -1, 0])}, "label -1 is out of range"),
    ({"x": np.zeros((6, 4, 4), np.uint8), "y": np.array([0, 1] * 2)}, "6 images but 4 labels"),
    ({"x": np.zeros((6, 4), np.uint8), "y": np.array([0, 1] * 3)}, "allowed: N×H×W or N×C×H×W"),
    ({"images": np.zeros((6, 4, 4), np.uint8), "y": np.array([0, 1] * 3)}, "no array 'x'; the file holds images, y"),
    ({"x": np.array([object()] * 6), "y": np.array([0, 1] * 3)}, "cannot read"),
])
def test_npz_bad_contents_are_one_line_errors(tmp_path, arrays, words):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(UsageError) as e:
        Npz().open(path=str(tmp_path / "d.npz"))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_npz_missing_file(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        Npz().open(path=str(tmp_path / "none.npz"))
