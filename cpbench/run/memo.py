"""One helper for every expensive value a cell reuses: in-process LRU first, then the disk cache, then compute.

Cells that differ only in backend, threads or batch share their base network, decompositions,
evaluations and fine-tuned networks; a later process (``--resume``, a Dask worker) finds the
tensors on disk (:class:`cpbench.run.cache.Cache`, content-addressed). :class:`Computation` does
both lookups in that order and stores what it computed in both.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import torch

from .cache import Cache

__all__ = ["Computation", "Stored", "clear_all"]

T = TypeVar("T")

# what a value is on disk: named tensors and a JSON-able dict
Stored = tuple[dict[str, torch.Tensor], dict[str, Any]]

_ALL: list["Computation"] = []


class Computation(Generic[T]):
    """Values of one kind by key: ``get(key, compute)`` returns the memoised, the cached or a new value.

    ``namespace`` names the disk cache's folder for values that are stored on disk (None: memo only);
    ``encode`` turns a value into :data:`Stored`, ``decode`` a :data:`Stored` back into a value.
    """

    def __init__(self, name: str, size: int, *, namespace: str | None = None,
                 encode: Callable[[T], Stored] | None = None, decode: Callable[[Stored], T] | None = None):
        self.name, self.size, self.namespace = name, size, namespace
        self.encode, self.decode = encode, decode
        self._memo: OrderedDict[str, T] = OrderedDict()
        _ALL.append(self)

    def get(self, key: str, compute: Callable[[], T], *, caches: Sequence[Cache] = (),
            decode: Callable[[Stored], T] | None = None) -> T:
        """The value for ``key``: from the memo, else the first of ``caches`` that has it, else ``compute()``
        (then written to ``caches[0]``). ``decode`` overrides the one given at construction (a value that
        needs the caller's object, e.g. weights loaded into a freshly built model)."""
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        value = self._load(key, caches, decode or self.decode)
        if value is None:
            value = compute()
            if caches and self.namespace is not None and self.encode is not None:
                tensors, meta = self.encode(value)
                caches[0].put(self.namespace, key, tensors, meta)
        self._remember(key, value)
        return value

    def _load(self, key: str, caches: Sequence[Cache], decode) -> T | None:
        if self.namespace is None or decode is None:
            return None
        for cache in caches:
            hit = cache.get(self.namespace, key)
            if hit is not None:
                return decode(hit)
        return None

    def _remember(self, key: str, value: T) -> None:
        self._memo[key] = value
        while len(self._memo) > self.size:
            self._memo.popitem(last=False)

    def clear(self) -> None:
        self._memo.clear()

    def __len__(self) -> int:
        return len(self._memo)


def clear_all() -> None:
    """Forget every memoised value in this process (the disk cache is left alone)."""
    for c in _ALL:
        c.clear()
