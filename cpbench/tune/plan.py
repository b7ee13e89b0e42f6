"""Plan files: what a tune chose, per layer, in TOML that ``cpbench.compress(model, plan)`` applies.

```toml
[plan]
model = "charnet"
target_speedup = 12.0
predicted_speedup = 12.6
speedup = 12.3                 # measured, whole network, against the baseline, interleaved
speedup_ci = [12.0, 12.7]
backend = "mkl"
threads = 1
batch = 1
accuracy_base = 0.892
accuracy_finetuned = 0.887
tune_rounds = 1

[layers.conv2]
method = "cp-nls"              # or "keep": the layer stays as it is
rank = 48
predicted_ms = 0.051           # the layer alone, from the latency table
layer_speedup = 9.6
sensitivity = 12.4             # points lost with only this layer replaced, before fine-tuning
```

Everything but ``layers.*.method`` and ``layers.*.rank`` is a record; ``compress`` reads those two (and
an optional ``options`` table per layer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .candidates import KEEP

__all__ = ["LayerChoice", "Plan", "write_plan", "read_plan"]


@dataclass
class LayerChoice:
    method: str
    rank: Any = None
    options: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)  # predicted_ms, layer_speedup, sensitivity, ...


@dataclass
class Plan:
    layers: dict[str, LayerChoice]
    meta: dict = field(default_factory=dict)  # model, target_speedup, speedups, accuracies, ...

    def compress_plan(self) -> dict[str, dict]:
        """The plan as :func:`cpbench.compress` takes it: the replaced layers only."""
        return {n: {"method": c.method, "rank": c.rank, **c.options}
                for n, c in self.layers.items() if c.method != KEEP}


def _clean(v: Any) -> Any:
    """TOML has no null and no NaN we want to read back: drop them; tuples become lists."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items() if x is not None and not _bad_float(x)}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v if x is not None]
    return v


def _bad_float(x: Any) -> bool:
    return isinstance(x, float) and not math.isfinite(x)


def write_plan(path: str | Path, plan: Plan) -> Path:
    import tomli_w

    doc = {"plan": _clean(plan.meta), "layers": {}}
    for name, c in plan.layers.items():
        entry: dict[str, Any] = {"method": c.method}
        if c.rank is not None:
            entry["rank"] = list(c.rank) if isinstance(c.rank, tuple) else c.rank
        if c.options:
            entry["options"] = c.options
        entry.update(c.record)
        doc["layers"][name] = _clean(entry)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("# written by cpbench tune; cpbench.compress(model, \"%s\") applies it\n" % path.name
                   + tomli_w.dumps(doc))
    tmp.replace(path)
    return path


def read_plan(path: str | Path) -> Plan:
    """Read a plan file; one-line :class:`UsageError` for a missing file or a malformed plan."""
    from ..run.paths import read_toml

    path = Path(path)
    doc = read_toml(path, "plan")
    layers = doc.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise UsageError(f"{path}: no [layers.NAME] tables; a plan names each layer's method and rank")
    out = {}
    for name, entry in layers.items():
        if not isinstance(entry, dict) or "method" not in entry:
            raise UsageError(f"{path}: [layers.{name}] needs a method (a decomposer name or \"keep\")")
        method = entry["method"]
        if method != KEEP and "rank" not in entry:
            raise UsageError(f"{path}: [layers.{name}] uses {method!r} and needs a rank")
        record = {k: v for k, v in entry.items() if k not in ("method", "rank", "options")}
        out[name] = LayerChoice(method, entry.get("rank"), dict(entry.get("options", {})), record)
    return Plan(out, dict(doc.get("plan", {})))
