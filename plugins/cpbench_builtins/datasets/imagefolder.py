"""``imagefolder``: labelled images in a folder, one sub-folder per class (as torchvision's ImageFolder).

```toml
dataset = {name = "imagefolder", path = "images", size = [32, 32], channels = 3}
```

``path/<class>/<image>`` (PNG, JPEG, BMP, GIF, TIFF, WebP, PPM/PGM, read with Pillow); classes are
the sub-folder names in sorted order, files within a class in sorted order. When ``path`` holds
``train/`` and ``test/`` sub-folders they are the splits (the test classes must be training
classes); otherwise a seeded, stratified split puts ``test_fraction`` [0.2] of each class in the
test split (``seed`` [0]). ``size`` = [H, W] resizes every image (bilinear); without it all images
must already have one size. ``channels`` 1 (grayscale) or 3 (RGB); default 1 when every image is
grayscale, else 3. Normalised per channel by the training split's mean and standard deviation.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from cpbench import hookimpl, resolve_path
from cpbench.errors import UsageError

from ._arrays import ArraySource, stratified_split

__all__ = ["ImageFolder", "read_folder", "EXTENSIONS"]

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ALLOWED = ("path", "size", "channels", "test_fraction", "seed")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _class_files(root: Path) -> dict[str, list[Path]]:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {d.name: sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in EXTENSIONS)
             for d in classes}
    return {c: fs for c, fs in files.items() if fs}


def _read(files: list[Path], channels: int, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    mode = "L" if channels == 1 else "RGB"
    out, first = None, None
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise UsageError(f"imagefolder: cannot read image {f}: {str(exc).splitlines()[0]}") from None
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        if out is None:
            out, first = np.empty((len(files), *a.shape), np.uint8), f
        elif a.shape != out.shape[1:]:
            raise UsageError(f"imagefolder: images of mixed sizes: {first} is {out.shape[3]}×{out.shape[2]}, "
                             f"{f} is {a.shape[2]}×{a.shape[1]}; give size = [H, W] to resize them")
        out[i] = a
    return out


def _gray(files: list[Path]) -> bool:
    from PIL import Image, UnidentifiedImageError

    for f in files:
        try:
            with Image.open(f) as im:  # opening reads the header only
                if im.mode not in GRAY_MODES:
                    return False
        except (UnidentifiedImageError, OSError) as exc:
            raise UsageError(f"imagefolder: cannot read image {f}: {str(exc).splitlines()[0]}") from None
    return True


def _check(params: dict) -> tuple[Path, tuple[int, int] | None, int | None, float, int]:
    unknown = sorted(set(params) - set(ALLOWED))
    if unknown:
        raise UsageError(f"dataset 'imagefolder' got unknown params {unknown}; allowed: {', '.join(ALLOWED)}")
    if "path" not in params:
        raise UsageError("dataset 'imagefolder' needs path = \"DIR\" (one sub-folder of images per class)")
    size = params.get("size")
    if size is not None:
        if isinstance(size, int) and not isinstance(size, bool):
            size = [size, size]
        if not (isinstance(size, (list, tuple)) and len(size) == 2
                and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
            raise UsageError(f"dataset 'imagefolder': size {params['size']!r} is not allowed; allowed: [H, W] of positive integers")
        size = (int(size[0]), int(size[1]))
    channels = params.get("channels")
    if channels not in (None, 1, 3):
        raise UsageError(f"dataset 'imagefolder': channels {channels!r} is not allowed; allowed: 1 or 3")
    frac = params.get("test_fraction", 0.2)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
        raise UsageError(f"dataset 'imagefolder': test_fraction {frac!r} is not allowed; allowed: a number between 0 and 1")
    seed = params.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"dataset 'imagefolder': seed {seed!r} is not allowed; allowed: an integer ≥ 0")
    return resolve_path(params["path"]).resolve(), size, channels, float(frac), seed


def read_folder(path: Path, size=None, channels=None, test_fraction: float = 0.2, seed: int = 0) -> ArraySource:
    """The data set in ``path`` (see the module docstring)."""
    what = f"imagefolder {path}"
    if not path.is_dir():
        raise UsageError(f"{what}: no such folder" if not path.exists() else f"{what}: not a folder")
    split_dirs = {s: path / s for s in ("train", "test")}
    if all(d.is_dir() for d in split_dirs.values()):
        per_split = {s: _class_files(d) for s, d in split_dirs.items()}
        classes = sorted(per_split["train"])
        extra = sorted(set(per_split["test"]) - set(classes))
        if extra:
            raise UsageError(f"{what}: test classes {extra} have no training images; "
                             f"allowed: the training classes {classes}")
    else:
        per_split = {"all": _class_files(path)}
        classes = sorted(per_split["all"])
    if not classes:
        raise UsageError(f"{what}: no images found; allowed: one sub-folder per class holding "
                         f"{', '.join(e.lstrip('.') for e in EXTENSIONS[:4])}... files")
    every = [f for fs in per_split.values() for c in fs.values() for f in c]
    channels = channels or (1 if _gray(every) else 3)

    def arrays(files_by_class: dict[str, list[Path]]) -> tuple[np.ndarray, np.ndarray]:
        files = [f for c in classes for f in files_by_class.get(c, [])]
        labels = np.array([i for i, c in enumerate(classes) for _ in files_by_class.get(c, [])], np.int64)
        return _read(files, channels, size), labels

    if "all" in per_split:
        x, y = arrays(per_split["all"])
        if len(classes) >= 2:
            tr, te = stratified_split(y, test_fraction, seed)
            train, test = (x[tr], y[tr]), (x[te], y[te])
        else:
            train, test = (x, y), (x[:0], y[:0])
    else:
        train, test = arrays(per_split["train"]), arrays(per_split["test"])
    return ArraySource(what, train, test, classes, seed=seed)


@lru_cache(maxsize=4)
def _open(path: Path, size, channels, test_fraction, seed, stamp) -> ArraySource:
    return read_folder(path, size, channels, test_fraction, seed)


def _stamp(path: Path) -> tuple:
    # Re-read the folder when any file in it changed: the newest modification time and the count.
    try:
        stats = [p.stat() for p in path.rglob("*")]
    except OSError:
        return ()
    return (len(stats), max((s.st_mtime_ns for s in stats), default=0))


class ImageFolder:
    """The data-set plugin object (registered as ``imagefolder``); :meth:`open` reads one folder."""

    name = "imagefolder"
    num_classes = None  # depends on the folder: see open()

    def open(self, **params) -> ArraySource:
        path, size, channels, frac, seed = _check(params)
        return _open(path, size, channels, frac, seed, _stamp(path))

    def load(self, split: str, *, seed: int = 0, size: int | None = None):
        raise UsageError("dataset 'imagefolder' needs a path: dataset = {name = \"imagefolder\", path = \"DIR\"}")


@hookimpl
def cpbench_register_datasets(registry) -> None:
    registry.add(ImageFolder())
