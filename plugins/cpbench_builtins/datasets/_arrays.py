"""What the file-reading data sets share: labelled image arrays held once, split, normalised.

A reader (``imagefolder``, ``idx``, ``npz``) turns its files into uint8 or float arrays of shape
(N, C, H, W) with int64 labels; :class:`ArraySource` checks them, makes the split when the files do
not hold one (seeded, stratified), works out per-channel mean and standard deviation from the
training split only (so nothing about the test images leaks into the network's input) and hands out
normalised float32 ``TensorDataset``s. Each split is held in one fixed, seeded order with the
classes interleaved, so the first ``size`` samples of a split are a fair sample of it.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from cpbench.errors import UsageError

__all__ = ["ArraySource", "stratified_split", "check_labels", "as_nchw"]

SPLITS = ("train", "test")


def as_nchw(x: np.ndarray, what: str) -> np.ndarray:
    """(N, H, W) → (N, 1, H, W); (N, C, H, W) as it is; anything else is a one-line error."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        return x
    raise UsageError(f"{what}: images have shape {tuple(x.shape)}; allowed: N×H×W or N×C×H×W")


def check_labels(y: np.ndarray, what: str, num_classes: int | None = None) -> np.ndarray:
    """Integer labels in [0, num_classes); at least two classes. Returns int64 labels."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise UsageError(f"{what}: labels have shape {tuple(y.shape)}; allowed: one label per image (N,)")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise UsageError(f"{what}: labels must be integers 0..K-1, got {y.dtype} values such as {y[np.mod(y, 1) != 0][0]!r}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise UsageError(f"{what}: label {int(y.min())} is out of range; allowed: 0..K-1")
    if num_classes is not None and y.size and y.max() >= num_classes:
        raise UsageError(f"{what}: label {int(y.max())} is out of range; allowed: 0..{num_classes - 1} "
                         f"(the training split's classes)")
    return y


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): in every class ``round(test_fraction * n)`` images go to test (at least
    one where the class has two or more), chosen by a seeded permutation."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(test_fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


class ArraySource:
    """A data set from arrays: ``num_classes``, ``classes``, ``input_shape``, ``load(split, size=)``.

    ``train`` and ``test`` are ``(x, y)`` with x (N, C, H, W) uint8 (scaled to [0, 1]) or float.
    """

    def __init__(self, what: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                 classes: list[str] | None = None, *, seed: int = 0):
        self.what = what
        xtr, ytr = train
        xte, yte = test
        ytr = check_labels(ytr, f"{what} (train)")
        if len(xtr) != len(ytr) or len(xte) != len(yte):
            raise UsageError(f"{what}: {len(xtr)} training images but {len(ytr)} labels, "
                             f"{len(xte)} test images but {len(yte)} labels; allowed: one label per image")
        if len(xtr) == 0:
            raise UsageError(f"{what}: the training split is empty")
        present = np.unique(ytr)
        if len(present) < 2:
            raise UsageError(f"{what}: only one class ({classes[present[0]] if classes else int(present[0])!r}); "
                             "a classifier needs at least two")
        if len(xte) == 0:
            raise UsageError(f"{what}: the test split is empty; add images or raise test_fraction")
        num_classes = len(classes) if classes else int(ytr.max()) + 1
        yte = check_labels(yte, f"{what} (test)", num_classes)
        if xtr.shape[1:] != xte.shape[1:]:
            raise UsageError(f"{what}: training images are {tuple(xtr.shape[1:])} but test images are "
                             f"{tuple(xte.shape[1:])}; allowed: one C×H×W for both")
        self.num_classes = num_classes
        self.classes = list(classes) if classes else [str(i) for i in range(num_classes)]
        self.input_shape = tuple(int(s) for s in xtr.shape[1:])
        self._x = {"train": xtr, "test": xte}
        self._y = {"train": ytr, "test": yte}
        self._order = {s: np.random.default_rng([seed, i]).permutation(len(self._y[s])) for i, s in enumerate(SPLITS)}
        scale = 255.0 if xtr.dtype == np.uint8 else 1.0
        xf = xtr.astype(np.float64) / scale
        self.mean = xf.mean(axis=(0, 2, 3))
        self.std = np.maximum(xf.std(axis=(0, 2, 3)), 1e-6)  # a constant channel must not divide by 0
        self._scale = scale
        self._memo: dict = {}

    def load(self, split: str, *, seed: int = 0, size: int | None = None) -> TensorDataset:
        if split not in SPLITS:
            raise UsageError(f"{self.what}: no split {split!r}; allowed: {', '.join(SPLITS)}")
        key = (split, size)
        if key not in self._memo:
            order = self._order[split][: size if size is not None else None]
            x = torch.from_numpy(self._x[split][order].astype(np.float32) / np.float32(self._scale))
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
            self._memo[key] = TensorDataset(((x - mean) / std).contiguous(), torch.from_numpy(self._y[split][order]))
        return self._memo[key]

    def __repr__(self) -> str:
        return f"{self.what}: {len(self._y['train'])} train / {len(self._y['test'])} test, {self.num_classes} classes"

