"""``idx``: the IDX files MNIST, Fashion-MNIST, KMNIST and EMNIST are distributed as.

```toml
dataset = {name = "idx", path = "mnist"}
```

``path`` holds ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` and the ``t10k-``
pair (each may end in ``.gz``; EMNIST's ``emnist-<split>-train-images-idx3-ubyte`` names are found
too). Read with numpy from the format's header (LeCun et al.: magic 0x0000, a type byte, the number
of dimensions, big-endian sizes); no pickle. Params: ``path``, ``transpose`` [false] (EMNIST stores
images transposed; true flips them back). Normalised by the training split's mean and std.
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np

from cpbench import hookimpl, resolve_path
from cpbench.errors import UsageError

from ._arrays import ArraySource, as_nchw

__all__ = ["read_idx", "Idx"]

ALLOWED = ("path", "transpose")
# IDX type byte -> numpy dtype (big-endian for multi-byte types)
TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzipped when it ends in .gz) as an array; a malformed file is a one-line error."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UsageError(f"idx: cannot read {path}: {str(exc).splitlines()[0]}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in TYPES:
        raise UsageError(f"idx: {path} is not an IDX file (its header is not 0x00 0x00 <type> <ndim>)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], ">u4")) if ndim else ()
    dtype = np.dtype(TYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise UsageError(f"idx: {path} holds {len(raw) - header} data bytes but its header says {dims} "
                         f"({expected} bytes); the file is truncated or not IDX")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims)


def _find(root: Path, split: str, kind: str) -> Path:
    stem = {"images": "images-idx3-ubyte", "labels": "labels-idx1-ubyte"}[kind]
    prefixes = ("train",) if split == "train" else ("t10k", "test")
    for prefix in prefixes:
        for name in (f"{prefix}-{stem}", f"{prefix}-{stem}.gz"):
            if (root / name).is_file():
                return root / name
        hits = sorted(root.glob(f"*{prefix}-{stem}*"))  # emnist-balanced-train-images-idx3-ubyte.gz
        if len(hits) == 1:
            return hits[0]
    raise UsageError(f"idx {root}: no {prefixes[0]}-{stem}[.gz]; allowed: the four MNIST-style files "
                     "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)")


@lru_cache(maxsize=4)
def _open(root: Path, transpose: bool, stamp: tuple) -> ArraySource:
    what = f"idx {root}"
    if not root.is_dir():
        raise UsageError(f"{what}: no such folder" if not root.exists() else f"{what}: not a folder")
    files = {(s, k): _find(root, s, k) for s in ("train", "test") for k in ("images", "labels")}  # all four first
    arrays = {}
    for split in ("train", "test"):
        x = as_nchw(read_idx(files[split, "images"]), what)
        if transpose:
            x = x.transpose(0, 1, 3, 2)
        arrays[split] = (np.ascontiguousarray(x), read_idx(files[split, "labels"]))
    return ArraySource(what, arrays["train"], arrays["test"])


class Idx:
    name = "idx"
    num_classes = None

    def open(self, **params) -> ArraySource:
        unknown = sorted(set(params) - set(ALLOWED))
        if unknown:
            raise UsageError(f"dataset 'idx' got unknown params {unknown}; allowed: {', '.join(ALLOWED)}")
        if "path" not in params:
            raise UsageError("dataset 'idx' needs path = \"DIR\" (the folder holding the IDX files)")
        root = resolve_path(params["path"]).resolve()
        stamp = tuple((p.name, p.stat().st_mtime_ns) for p in sorted(root.glob("*"))) if root.is_dir() else ()
        return _open(root, bool(params.get("transpose", False)), stamp)

    def load(self, split: str, *, seed: int = 0, size: int | None = None):
        raise UsageError("dataset 'idx' needs a path: dataset = {name = \"idx\", path = \"DIR\"}")


@hookimpl
def cpbench_register_datasets(registry) -> None:
    registry.add(Idx())
