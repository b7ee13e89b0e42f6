"""A network's output as cpbench reads it: a tensor, or any nesting of tuples, lists and dicts of them.

Detectors, segmenters and multi-head networks return several tensors. Everything that compares,
exports or trains on outputs goes through these three functions, so each part of cpbench agrees on
what "the output" and "the classifier output" are:

* :func:`output_tensors` — every tensor of the output, in a fixed order (``torch.utils._pytree``
  order: tuple/list positions, dict keys in insertion order).
* :func:`classifier_output` — the tensor a loss and top-1 are computed on: the output itself if it is
  one tensor, else the first 2-D ``(N, classes)`` floating tensor in that order, else None.
* :func:`output_rel_error` — ‖y − y_ref‖ / ‖y_ref‖ over all output tensors together (Frobenius norm of
  the concatenation), so a large head does not hide an error in a small one less than its size says.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["output_tensors", "classifier_output", "output_rel_error", "flatten_output", "unflatten_output"]


def flatten_output(out: Any) -> tuple[list[torch.Tensor], Any]:
    """(tensors, spec): the output's tensors and the structure to rebuild it with :func:`unflatten_output`."""
    leaves, spec = pytree.tree_flatten(out)
    bad = [type(v).__name__ for v in leaves if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"a network output must be tensors in tuples, lists or dicts; found {', '.join(sorted(set(bad)))}")
    return leaves, spec


def unflatten_output(tensors: list[torch.Tensor], spec: Any) -> Any:
    return pytree.tree_unflatten(list(tensors), spec)


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor of ``out`` in a fixed order (a single tensor: ``[out]``)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return flatten_output(out)[0]


def classifier_output(out: Any) -> torch.Tensor | None:
    """The output a classification loss and top-1 read: ``out`` if a tensor, else the first
    ``(N, classes)`` floating tensor with at least two classes, else None."""
    if isinstance(out, torch.Tensor):
        return out
    for t in output_tensors(out):
        if t.dim() == 2 and t.shape[1] >= 2 and t.is_floating_point():
            return t
    return None


def _dense(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.to_dense() if t.is_mkldnn else t


def output_rel_error(out: Any, ref: Any) -> float:
    """‖out − ref‖ / ‖ref‖ over all output tensors (float64 sums); 0 when both are zero."""
    a, b = output_tensors(out), output_tensors(ref)
    if len(a) != len(b):
        raise ValueError(f"outputs differ in structure: {len(a)} tensors against {len(b)}")
    num = den = 0.0
    for x, y in zip(a, b):
        x, y = _dense(x).double(), _dense(y).double()
        if x.shape != y.shape:
            raise ValueError(f"output shapes differ: {tuple(x.shape)} against {tuple(y.shape)}")
        num += float((x - y).pow(2).sum())
        den += float(y.pow(2).sum())
    if den == 0.0:
        return num ** 0.5
    return (num / den) ** 0.5
