"""``npz``: images and labels in a numpy ``.npz`` file.

```toml
dataset = {name = "npz", path = "data.npz", x = "images", y = "labels"}
```

Images N×H×W or N×C×H×W (uint8, scaled to [0, 1], or float), integer labels 0..K-1. When the file
holds ``x_test``/``y_test`` (``<x>_test``, ``<y>_test``) those are the test split; otherwise a
seeded, stratified split puts ``test_fraction`` [0.2] of each class in it (``seed`` [0]). Read with
``allow_pickle=False``: an object array is refused, never unpickled. Normalised by the training
split's mean and std.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from cpbench import hookimpl, resolve_path
from cpbench.errors import UsageError

from ._arrays import ArraySource, as_nchw, stratified_split

__all__ = ["Npz"]

ALLOWED = ("path", "x", "y", "test_fraction", "seed")


def _images(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype != np.uint8 and not np.issubdtype(a.dtype, np.floating):
        raise UsageError(f"{what}: images are {a.dtype}; allowed: uint8 or float")
    return as_nchw(a, what)


@lru_cache(maxsize=4)
def _open(path: Path, xkey: str, ykey: str, frac: float, seed: int, stamp) -> ArraySource:
    what = f"npz {path}"
    if not path.is_file():
        raise UsageError(f"{what}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            for k in (xkey, ykey):
                if k not in keys:
                    raise UsageError(f"{what}: no array {k!r}; the file holds {', '.join(keys) or 'nothing'} "
                                     "(set x = \"...\", y = \"...\")")
            arrays = {k: f[k] for k in keys}
    except UsageError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise UsageError(f"{what}: cannot read: {str(exc).splitlines()[0]}") from None
    x, y = _images(arrays[xkey], what), arrays[ykey]
    if len(x) != len(y):
        raise UsageError(f"{what}: {len(x)} images but {len(y)} labels; allowed: one label per image")
    if f"{xkey}_test" in arrays and f"{ykey}_test" in arrays:
        train, test = (x, y), (_images(arrays[f"{xkey}_test"], what), arrays[f"{ykey}_test"])
    else:
        from ._arrays import check_labels

        yl = check_labels(y, what)
        tr, te = stratified_split(yl, frac, seed)
        train, test = (x[tr], yl[tr]), (x[te], yl[te])
    return ArraySource(what, train, test, seed=seed)


class Npz:
    name = "npz"
    num_classes = None

    def open(self, **params) -> ArraySource:
        unknown = sorted(set(params) - set(ALLOWED))
        if unknown:
            raise UsageError(f"dataset 'npz' got unknown params {unknown}; allowed: {', '.join(ALLOWED)}")
        if "path" not in params:
            raise UsageError("dataset 'npz' needs path = \"FILE.npz\"")
        frac = params.get("test_fraction", 0.2)
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
            raise UsageError(f"dataset 'npz': test_fraction {frac!r} is not allowed; allowed: a number between 0 and 1")
        path = resolve_path(params["path"]).resolve()
        stamp = path.stat().st_mtime_ns if path.is_file() else None
        return _open(path, str(params.get("x", "x")), str(params.get("y", "y")), float(frac),
                     int(params.get("seed", 0)), stamp)

    def load(self, split: str, *, seed: int = 0, size: int | None = None):
        raise UsageError("dataset 'npz' needs a path: dataset = {name = \"npz\", path = \"FILE.npz\"}")


@hookimpl
def cpbench_register_datasets(registry) -> None:
    registry.add(Npz())
