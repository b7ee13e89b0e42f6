"""Stage 3 of a tune: each candidate's sensitivity, the loss with only its layer replaced (before
fine-tuning), in the units of the tune's mode; cached, and computed only when a search needs it.

Modes (``--sensitivity``; ``auto`` is ``kl`` with a data set, else ``fidelity``):

* ``kl``: 100 x the mean KL divergence of the network's class distribution from the base network's on
  the validation images (:func:`kl_scorer`);
* ``accuracy``: the validation accuracy lost, in points;
* ``fidelity``: top-1 disagreement with the base network on random inputs, in points (no data needed);
* ``error``: 100 x the decomposition's relative reconstruction error (no evaluation at all).

:func:`scorer` builds ``loss(model)`` for a mode. :class:`Sensitivities` keeps one tune's values: on
disk (``<cache>/sensitivity/``, keyed by the mode, the base weights, the validation size, the seed and
the candidate) and in memory. Until a search's plan holds a candidate its value is left unknown at its
lower bound 0 (:func:`~cpbench.tune.search.lazy_plans`); each computed value costs a decomposition.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..run.cache import key_of
from .candidates import Candidate
from .search import Option
from .store import JsonStore

__all__ = ["SENSITIVITY_MODES", "FIDELITY_SAMPLES", "kl_scorer", "scorer", "cand_key", "Sensitivities"]

SENSITIVITY_MODES = ("auto", "kl", "accuracy", "fidelity", "error")
FIDELITY_SAMPLES = 64

Scorer = Callable[[nn.Module], float]


def cand_key(c: Candidate) -> str:
    """``"layer/label"``: a candidate's name within one tune."""
    return f"{c.layer}/{c.label}"


def kl_scorer(base: nn.Module, x: torch.Tensor, batch: int = 256) -> Scorer:
    """100 x the mean KL divergence of a model's class distribution from the base network's on ``x``
    (the validation images; no labels needed), or 100 x the relative output error for outputs that are
    not ``(N, classes)`` logits.

    Why KL and not the accuracy lost: accuracy moves in steps of one image (0.33 points on 300) and
    stays at 0 until a layer's error flips a decision, so on a deep network many candidates score 0
    and the sum over 18 layers says nothing about their compound loss. KL is continuous and, to first
    order, additive over layers. Measured on ResNet-20 (18 layers, 2x target): the plan of least summed
    accuracy loss kept 22.3 % validation accuracy before fine-tuning, the plan of least summed KL 54.7 %
    (base 97.3 %)."""
    import torch.nn.functional as F

    from ..nn.gemmforms import gemm_forms

    def outputs(m: nn.Module) -> torch.Tensor:
        with torch.no_grad(), gemm_forms(m, training=False):
            return torch.cat([m(x[i:i + batch]) for i in range(0, len(x), batch)])

    ref = outputs(base)
    if ref.dim() != 2:
        def rel(m: nn.Module) -> float:
            return 100.0 * float(torch.linalg.vector_norm(outputs(m) - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))
        return rel
    ref_log = F.log_softmax(ref.double(), 1)

    def kl(m: nn.Module) -> float:
        out = F.log_softmax(outputs(m).double(), 1)
        return 100.0 * float(F.kl_div(out, ref_log, log_target=True, reduction="batchmean"))
    return kl


def scorer(mode: str, base: nn.Module, validation: Callable[[], Any], sample_shape: tuple[int, ...], seed: int) -> Scorer:
    """``loss(model)`` in points against ``base`` for ``mode`` (``kl``, ``accuracy`` or ``fidelity``);
    ``validation()`` gives the split the first two evaluate on, ``sample_shape`` one input's shape."""
    from ..nn.training import evaluate

    if mode == "accuracy":
        val = validation()
        with torch.no_grad():
            base_acc = evaluate(base, val)
        return lambda m: 100.0 * (base_acc - evaluate(m, val))
    if mode == "kl":
        return kl_scorer(base, validation().tensors[0])
    x = torch.randn(FIDELITY_SAMPLES, *sample_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = base(x)

    def fidelity(m: nn.Module) -> float:
        with torch.no_grad():
            out = m(x)
        if ref.dim() == 2:  # a classifier: top-1 disagreement with the base network
            return 100.0 * float((out.argmax(1) != ref.argmax(1)).float().mean())
        return 100.0 * float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))

    return fidelity


class Sensitivities:
    """One tune's sensitivities: read from the store, else computed by ``measure(candidate)`` (the
    loss with only that candidate's layer replaced) and stored; "leave it" is 0.

    ``context`` keys the store's values beside the candidate (mode, base weights, validation size, seed);
    ``version(method)`` is the decomposer's version, so a changed solver is scored anew."""

    def __init__(self, mode: str, *, measure: Callable[[Candidate], float], version: Callable[[str], str],
                 context: Any, store: JsonStore, step: Callable[[str], None] = lambda s: None):
        self.mode, self.measure, self.version, self.context, self.store, self.step = mode, measure, version, context, store, step
        self.known: dict[str, float] = {}  # computed or read in this tune, by cand_key
        self.seconds = 0.0  # spent computing those a search needed (resolve)

    @property
    def lazy(self) -> bool:
        """Values computed only when a search needs them, 0 their lower bound until then: every mode but
        ``accuracy``, whose loss can be negative (a replaced layer that happens to gain accuracy on the
        split), has losses ≥ 0. ``accuracy`` computes every value up front."""
        return self.mode != "accuracy"

    def values(self, cands: Iterable[Candidate], *, compute: bool = True) -> dict[str, float]:
        """``{cand_key: loss}`` of ``cands``; ``compute = False``: only those already known or stored."""
        out: dict[str, float] = {}
        for c in cands:
            name = cand_key(c)
            if c.is_keep:
                out[name] = 0.0
                continue
            key = key_of(self.context, c.layer, c.method, self.version(c.method), c.rank)
            hit = self.known.get(name)
            hit = self.store.get(key) if hit is None else hit
            if hit is None and not compute:
                continue
            if hit is None:
                self.step(f"sensitivity of {c.layer} {c.label} ({self.mode})")
                hit = self.measure(c)
                self.store.put(key, hit)
            self.known[name] = out[name] = float(hit)
        return out

    def options(self, cands: list[Candidate], costs: list[float]) -> list[Option]:
        """The search's options of ``cands`` at ``costs``: those not yet known left unknown at 0 when
        :attr:`lazy`, else every value computed."""
        losses = self.values(cands, compute=not self.lazy)
        return [Option(c, cost, losses.get(cand_key(c), 0.0), known=cand_key(c) in losses) for c, cost in zip(cands, costs)]

    def resolve(self, pending: dict[str, list[Option]]) -> dict[str, list[Option]]:
        """``pending``'s options with their values computed (:func:`~cpbench.tune.search.lazy_plans`'s ``resolve``)."""
        t0 = time.perf_counter()
        losses = self.values(o.candidate for opts in pending.values() for o in opts)
        self.seconds += time.perf_counter() - t0
        return {n: [replace(o, loss=losses[cand_key(o.candidate)], known=True) for o in opts] for n, opts in pending.items()}

    def refresh(self, options: dict[str, list[Option]]) -> None:
        """Options still unknown whose value this tune has computed since (another search, on another
        calibration's copy of the options), made known in place."""
        for opts in options.values():
            for i, o in enumerate(opts):
                if not o.known and cand_key(o.candidate) in self.known:
                    opts[i] = replace(o, loss=self.known[cand_key(o.candidate)], known=True)

    def record(self, options: dict[str, list[Option]]) -> dict:
        """What a row says of them (``tune.sensitivities``)."""
        return {"lazy": self.lazy, "known": len(self.known),
                "candidates": sum(not o.candidate.is_keep for opts in options.values() for o in opts)}
