"""Content-addressed cache of tensors on disk (safetensors), shared by processes and workers.

An entry's key is a hash of everything that determines it (e.g. the weight tensor, decomposer name
and version, rank, options, seed). Writes are atomic (temporary file, then rename), so concurrent
writers never expose half a file. Each file stores the SHA-256 of its tensors in its metadata; an
entry that is truncated or fails the check is reported once, deleted and recomputed by the caller.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["Cache", "default_cache_dir", "tensor_digest", "key_of"]


def default_cache_dir() -> Path:
    env = os.environ.get("CPBENCH_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cpbench"


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of dtype, shape and values: the same for any memory layout of the same tensor."""
    # reshape(-1) as well: a tensor can count as contiguous with any stride on a size-1 last axis
    # (a kh×1 kernel transposed from 1×kh), and viewing its bytes needs stride 1 there
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    # flattened: a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def key_of(*parts: Any) -> str:
    """Stable hash of JSON-able parts and tensors."""
    h = hashlib.sha256()
    for p in parts:
        h.update(tensor_digest(p).encode() if isinstance(p, torch.Tensor) else
                 json.dumps(p, sort_keys=True, default=repr).encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]


def _digest_all(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensor_digest(tensors[k]).encode())
    return h.hexdigest()


class Cache:
    """``get(namespace, key) -> (tensors, meta) | None`` and ``put(namespace, key, tensors, meta)``."""

    def __init__(self, root: str | Path | None = None, *, enabled: bool = True, stream=None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.hits = self.misses = self.corrupt = 0
        self._reported: set[Path] = set()

    def path(self, namespace: str, key: str) -> Path:
        return self.root / namespace / key[:2] / f"{key}.safetensors"

    def get(self, namespace: str, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        if not self.enabled:
            return None
        from safetensors import safe_open

        p = self.path(namespace, key)
        if not p.is_file():
            self.misses += 1
            return None
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("sha256") != _digest_all(tensors):
                raise ValueError("hash mismatch")
        except Exception as exc:
            self.corrupt += 1
            if p not in self._reported:
                self._reported.add(p)
                print(f"cpbench: cache entry {p} is corrupt ({type(exc).__name__}: {exc}); recomputing",
                      file=self.stream)
            try:
                p.unlink()
            except OSError:
                pass
            return None
        self.hits += 1
        return tensors, json.loads(meta.get("meta", "{}"))

    def put(self, namespace: str, key: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Path | None:
        if not self.enabled:
            return None
        from safetensors.torch import save_file

        p = self.path(namespace, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        metadata = {"sha256": _digest_all(tensors), "meta": json.dumps(meta or {}, default=repr)}
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return p
