"""A tuned plan as one more row of a matrix: the rank spec ``{target_speedup = 8}``.

```toml
[matrix]
model = ["charnet"]
layers = [["conv1", "conv2", "conv3"]]
decomposer = ["cp-nls"]                     # the methods the tune chooses from: this one, or
rank = [{target_speedup = 8}, {target_speedup = 12, decomposers = ["cp-nls", "tucker2"]}, "speedup:8",
        {target_speedup = 5, target_against = "fastest"}]   # 5x against the fastest original of any backend
backend = ["mkl"]
```

The cell runs the tune (:class:`~cpbench.tune.pipeline.Tuner`: latency table, sensitivities, search,
verify) at its own backend, threads, batch, fine-tuning epochs and seed, and its row is the tune's row
with the cell's axes, so it compares with the fixed-rank rows beside it.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from ..errors import RankError

__all__ = ["is_target_spec", "check_target_spec", "run_tuned_cell"]

SPEC_KEYS = ("target_speedup", "decomposers", "max_drop", "target_against")


def is_target_spec(spec: Any) -> bool:
    return isinstance(spec, dict) and "target_speedup" in spec


def check_target_spec(spec: dict, decomposers=None) -> None:
    """One-line :class:`RankError` for a malformed ``{target_speedup = X}`` spec."""
    bad = sorted(set(spec) - set(SPEC_KEYS))
    if bad:
        raise RankError(f"rank {spec}: unknown key(s) {bad}; a tuned rank allows {', '.join(SPEC_KEYS)}")
    t = spec["target_speedup"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 1:
        raise RankError(f"rank {spec}: target_speedup {t!r} is not allowed; allowed: a number > 1")
    names = spec.get("decomposers", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RankError(f"rank {spec}: decomposers must be a list of decomposer names")
    if decomposers is not None:
        for n in names:
            if n not in decomposers:
                raise RankError(f"rank {spec}: unknown decomposer {n!r}; available: {', '.join(decomposers.names())}")
    drop = spec.get("max_drop", 1.0)
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or drop < 0:
        raise RankError(f"rank {spec}: max_drop {drop!r} is not allowed; allowed: accuracy points ≥ 0")
    from .request import TARGET_AGAINST

    if spec.get("target_against", "backend") not in TARGET_AGAINST:
        raise RankError(f"rank {spec}: target_against {spec['target_against']!r} is not allowed; allowed: "
                        f"{', '.join(TARGET_AGAINST)}")


def run_tuned_cell(cell, ctx, plugins, step, started: float) -> dict:
    """The row of a cell whose rank spec is ``{target_speedup = X}``: the tuned plan's, with the cell's axes."""
    from .pipeline import Tuner
    from .reference import against_reference, measure_reference, prepare_for, searched_targets
    from .request import TuneRequest

    spec = cell.rank
    check_target_spec(spec, plugins.decomposers)
    target = float(spec["target_speedup"])
    target_against = spec.get("target_against", "backend")
    decomposers = tuple(spec.get("decomposers") or [cell.decomposer["name"]])
    request = TuneRequest(model=dict(cell.model), targets=(target,), max_drop=float(spec.get("max_drop", 1.0)),
                          backend=cell.backend, threads=cell.threads, batch=cell.batch, decomposers=decomposers,
                          layers=cell.layers, finetune_epochs=cell.finetune_epochs,
                          finetune_samples=ctx.finetune_samples, finetune_control=ctx.finetune_control,
                          seed=cell.seed, network_budget=ctx.budget(),
                          # each candidate alone as a cell times each replaced layer: half the budget
                          layer_budget=replace(ctx.budget(), budget_s=ctx.budget().budget_s / 2),
                          target_against=target_against,
                          against=tuple(plugins.backends.names()) if target_against == "fastest" else ())
    tuner = Tuner(request, ctx=ctx, plugins=plugins, step=step)
    reference = measure_reference(tuner) if target_against == "fastest" else None
    searched = searched_targets((target,), reference)
    prepared = prepare_for(tuner, searched, reference)
    row, plan, _ = tuner.tune_target(prepared, searched[target], started=started, cell=cell)
    if reference is not None:
        row, _ = against_reference(row, plan, target, searched, reference)
    return row
