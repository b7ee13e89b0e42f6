"""Small labelled image sets written to disk in the formats the data-set plugins read.

For tests, the README's walk-through and shipped experiments: nothing is downloaded. Class ``k`` of
``K`` is a grating at angle ``k·180°/K`` with a random phase, frequency, contrast and colour, plus
pixel noise: a conv net learns it in an epoch or two, a linear model on pixels does not (the
phase is random), and decomposing the convs measurably costs accuracy.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["gratings", "write_image_folder", "write_idx", "write_npz"]


def gratings(n: int, *, classes: int = 4, size: tuple[int, int] = (32, 32), channels: int = 3,
             seed: int = 0, noise: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (n, C, H, W) uint8 and labels (n,) int64, classes balanced and interleaved."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    h, w = size
    yy, xx = np.meshgrid(np.arange(h) - h / 2, np.arange(w) - w / 2, indexing="ij")
    angle = np.pi * y / classes + rng.normal(0, 0.08, n)
    freq = rng.uniform(0.25, 0.6, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    proj = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy
    g = np.sin(freq[:, None, None] * proj + phase[:, None, None])  # (n, h, w) in [-1, 1]
    contrast = rng.uniform(0.4, 1.0, n)[:, None, None, None]
    colour = rng.uniform(0.3, 1.0, (n, channels, 1, 1))
    img = 0.5 + 0.5 * contrast * colour * g[:, None] + noise * rng.standard_normal((n, channels, h, w))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), y.astype(np.int64)


def write_image_folder(root: str | Path, *, classes: int = 4, per_class: int = 20, size: tuple[int, int] = (32, 32),
                       channels: int = 3, seed: int = 0, splits: bool = False, test_per_class: int = 5,
                       fmt: str = "png") -> Path:
    """Write ``root/<class>/<i>.png`` (or ``root/train|test/<class>/...`` with ``splits``); returns root.

    Class folders are named ``c0``, ``c1``, ...; ``fmt`` is any format Pillow writes (png, jpeg, bmp).
    """
    from PIL import Image

    root = Path(root)
    parts = {"train": per_class, "test": test_per_class} if splits else {"": per_class}
    for i, (part, count) in enumerate(parts.items()):
        x, y = gratings(count * classes, classes=classes, size=size, channels=channels, seed=seed + 1000 * i)
        for j, (img, label) in enumerate(zip(x, y)):
            folder = root / part / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            a = img[0] if channels == 1 else img.transpose(1, 2, 0)
            Image.fromarray(a, "L" if channels == 1 else "RGB").save(folder / f"{j:05d}.{fmt}")
    return root


def _idx_bytes(a: np.ndarray) -> bytes:
    # IDX (LeCun's MNIST format): two zero bytes, a type code (0x08 = unsigned byte), the number of
    # dimensions, each dimension as a big-endian uint32, then the data
    return struct.pack(">HBB", 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def write_idx(root: str | Path, *, classes: int = 4, n_train: int = 80, n_test: int = 20, size=(28, 28),
              seed: int = 0, gz: bool = True) -> Path:
    """Write the four MNIST-style files (``train-images-idx3-ubyte[.gz]``, ...) into ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        x, y = gratings(n, classes=classes, size=size, channels=1, seed=s)
        for kind, arr in (("images-idx3", x[:, 0]), ("labels-idx1", y)):
            name = f"{prefix}-{kind}-ubyte" + (".gz" if gz else "")
            data = _idx_bytes(arr)
            (root / name).write_bytes(gzip.compress(data) if gz else data)
    return root


def write_npz(path: str | Path, *, classes: int = 4, n: int = 100, size=(16, 16), channels: int | None = 1,
              seed: int = 0, x: str = "x", y: str = "y", **extra: np.ndarray) -> Path:
    """Write one ``.npz`` with images under key ``x`` (N×H×W when ``channels`` is None) and labels ``y``."""
    images, labels = gratings(n, classes=classes, size=size, channels=channels or 1, seed=seed)
    path = Path(path)
    arrays: dict[str, Any] = {x: images[:, 0] if channels is None else images, y: labels, **extra}
    np.savez(path, **arrays)
    return path
