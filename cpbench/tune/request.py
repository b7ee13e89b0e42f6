"""What a tune is asked for (:class:`TuneRequest`, checked against the registries with one-line errors)
and which of a network's layers it may replace (:func:`select_layers`)."""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import UsageError
from ..measure.timing import TimingBudget
from .candidates import GRID_POINTS, MAX_SPEEDUP, MIN_SPEEDUP, speedup_grid
from .loop import DEFAULT_DROP_ROUNDS, DEFAULT_ROUNDS
from .sensitivity import SENSITIVITY_MODES

__all__ = ["TuneRequest", "select_layers", "DEFAULT_DECOMPOSERS", "TARGET_AGAINST"]

DEFAULT_DECOMPOSERS = ("cp-nls", "cp-als", "tucker2", "spatial-svd")
#: ``--target-against``: the original network on the tune's backend, or on the fastest backend
TARGET_AGAINST = ("backend", "fastest")


@dataclass(frozen=True)
class TuneRequest:
    """What a tune is asked for; :meth:`check` validates it against the registries (one-line errors)."""

    model: dict
    targets: tuple[float, ...] = (8.0,)
    max_drop: float = 1.0
    backend: str = "mkl"
    threads: int = 1
    batch: int = 1
    decomposers: tuple[str, ...] = DEFAULT_DECOMPOSERS
    layers: Any = "auto"  # "auto" (every conv with a spatial kernel) or names / fnmatch patterns
    finetune_epochs: int = 1
    finetune_samples: int | None = None
    finetune_control: bool = True
    seed: int = 0
    max_rounds: int = DEFAULT_ROUNDS
    min_speedup: float = MIN_SPEEDUP
    max_speedup: float = MAX_SPEEDUP
    grid_points: int = GRID_POINTS
    sensitivity: str = "auto"
    val_samples: int | None = None  # None: the data set's whole validation split
    layer_budget: TimingBudget = TimingBudget(warmup=2, min_rounds=10, max_rounds=200, budget_s=1.0)
    network_budget: TimingBudget = TimingBudget(budget_s=3.0)
    calibrate: bool = True  # scale the layers' savings by the fastest plan's whole-network timing
    drop_rounds: int = DEFAULT_DROP_ROUNDS  # slower plans tried when a fine-tuned plan loses more than max_drop
    # backends whose original network each kept plan is also timed against: the fastest of them is the
    # reference of ``vs_fastest_original`` (:mod:`cpbench.measure.fastest`); () for none
    against: tuple[str, ...] = ()
    # what a target is a speedup against: "backend" (the original network on ``backend``) or "fastest" (the
    # original on whichever of ``against`` and ``backend`` runs it fastest; the tune searches ``backend`` at the
    # target scaled by how much slower ``backend`` runs the original, :func:`cpbench.measure.fastest.fastest_original`)
    target_against: str = "backend"

    def check(self, plugins) -> None:
        for t in self.targets:
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 1:
                raise UsageError(f"target speedup {t!r} is not allowed; allowed: numbers > 1 (e.g. 8 or 8,12,16)")
        if not self.targets:
            raise UsageError("no target speedup given; allowed: numbers > 1 (e.g. --target-speedup 8,12,16)")
        if not isinstance(self.max_drop, (int, float)) or self.max_drop < 0 or not math.isfinite(self.max_drop):
            raise UsageError(f"--max-drop {self.max_drop!r} is not allowed; allowed: accuracy points ≥ 0")
        for name, v, lo in (("threads", self.threads, 1), ("batch", self.batch, 1),
                            ("finetune epochs", self.finetune_epochs, 0), ("max rounds", self.max_rounds, 1),
                            ("drop rounds", self.drop_rounds, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise UsageError(f"{name} {v!r} is not allowed; allowed: integers ≥ {lo}")
        if self.sensitivity not in SENSITIVITY_MODES:
            raise UsageError(f"sensitivity {self.sensitivity!r} is not allowed; allowed: {', '.join(SENSITIVITY_MODES)}")
        if not self.decomposers:
            raise UsageError("no decomposers given; allowed: " + ", ".join(plugins.decomposers.names()))
        plugins.models.get(self.model["name"])
        plugins.backends.get(self.backend)
        for d in self.decomposers:
            plugins.decomposers.get(d)
        for b in self.against:
            plugins.backends.get(b)
        if self.target_against not in TARGET_AGAINST:
            raise UsageError(f"--target-against {self.target_against!r} is not allowed; allowed: {', '.join(TARGET_AGAINST)}")
        if self.target_against == "fastest" and not self.against:
            raise UsageError("--target-against fastest needs backends to compare with; allowed: --against all or A,B "
                             "(not none)")
        speedup_grid(self.min_speedup, self.max_speedup, self.grid_points)


def select_layers(model: nn.Module, layers: Any) -> list[str]:
    """The Conv2d layers a tune may replace: "auto" (every conv whose kernel is larger than 1×1), or
    names and fnmatch patterns (``conv[1-3]``, ``layer*.conv1``); a pattern matching no conv is an error."""
    convs = {n: m for n, m in model.named_modules() if type(m) is nn.Conv2d}
    if layers == "auto":
        return [n for n, m in convs.items() if m.kernel_size != (1, 1)]
    patterns = [layers] if isinstance(layers, str) else list(layers)
    out: list[str] = []
    for p in patterns:
        hit = [n for n in convs if fnmatch.fnmatchcase(n, p)]
        if not hit:
            raise UsageError(f"layer pattern {p!r} matches no Conv2d layer; Conv2d layers: {', '.join(convs) or 'none'}")
        out += [n for n in hit if n not in out]
    return out
