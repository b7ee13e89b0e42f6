"""The result of decomposing one kernel: :class:`Factorization`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Factorization"]


@dataclass
class Factorization:
    """A decomposed kernel.

    Attributes
    ----------
    factors : dict[str, torch.Tensor]
        Named factor tensors. Their meaning belongs to the decomposer that made them; the built-in
        CP decomposers use ``out (T, R)``, ``in (S, R)``, ``h (kh, R)``, ``w (kw, R)`` per group.
    rel_error : float
        ``||W - W_hat|| / ||W||`` of the reconstruction against the original kernel.
    info : dict
        Diagnostics (iterations, converged, seconds, degeneracy, rank, ...). JSON-serialisable values.
    """

    factors: dict[str, torch.Tensor]
    rel_error: float
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.factors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in self.factors.items()
        ):
            raise TypeError("Factorization.factors must be a dict of str -> torch.Tensor")
        self.rel_error = float(self.rel_error)
