"""One cell's result: :class:`CellResult`, the only place the keys of a ``results.jsonl`` row are spelled.

Every field is one row key (README "Result fields"), so a field's name *is* the key: :meth:`to_row`
writes them, :meth:`from_row` reads any row back, including rows written by older versions (a key
they lack reads as None; a key this version does not know is kept in :attr:`extra` and written back
unchanged). Tables, plots, reports and ``compare`` read rows through it.

A few keys appear only when they mean something (``model_label`` for a model plugin with a label,
``finetune_cached`` when the cell fine-tuned, ``layer_speedup*`` with per-layer timing, ``traceback``
for an unexpected exception); :data:`OPTIONAL_KEYS` lists them and :meth:`to_row` leaves them out
while they are None. An error row holds the keys of the stages that finished before the error.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CellResult", "AXIS_KEYS", "OPTIONAL_KEYS", "STAGE_KEYS"]

def _key(stage: str) -> Any:
    """A row key written by ``stage`` (None until the stage has run)."""
    return field(default=None, metadata={"stage": stage})


# The cell's axes as ``cpbench compare`` matches rows without a common cell_key.
AXIS_KEYS = ("model", "model_params", "layers", "decomposer", "decomposer_options", "rank_spec", "backend",
             "threads", "batch", "finetune_epochs", "seed")


@dataclass
class CellResult:
    # -- the cell (always present) ------------------------------------------------------------
    cell_key: str | None = _key("cell")
    model: str | None = _key("cell")
    model_params: dict | None = _key("cell")
    layers: Any = _key("cell")  # the layer names (the matrix's "auto" resolved once the base is built)
    decomposer: str | None = _key("cell")
    decomposer_options: dict | None = _key("cell")
    rank_spec: Any = _key("cell")
    rank: Any = _key("cell")  # the rank chosen per layer (None until the layers are decomposed)
    backend: str | None = _key("cell")
    threads: int | None = _key("cell")
    batch: int | None = _key("cell")
    finetune_epochs: int | None = _key("cell")
    seed: int | None = _key("cell")
    axes: dict | None = _key("cell")
    status: str | None = _key("cell")  # "ok" or "error"
    error: str | None = _key("cell")
    host: str | None = _key("cell")
    started_at: float | None = _key("cell")
    wall_seconds: float | None = _key("cell")
    versions: dict | None = _key("cell")
    machine: dict | None = _key("cell")
    traceback: str | None = _key("cell")
    model_label: str | None = _key("cell")
    # where the base network's weights came from: "weights file", "plugin", "trained", "cache", "shipped"
    # or "init" (random initialisation); absent when the cell failed before its base was built
    weights_from: str | None = _key("cell")
    # -- base: which layers, and what was folded (cpbench.nn.selection, cpbench.nn.bnfold) ----
    layer_info: dict | None = _key("base")       # chosen layer -> channels, kernel, stride, input shape, FLOP share
    layers_skipped: dict | None = _key("base")   # conv left as it is -> why
    bn_folded: dict | None = _key("base")        # BatchNorm folded -> the conv it was folded into
    # -- compress: one entry per replaced layer -----------------------------------------------
    rel_error: dict | None = _key("compress")
    decompose_seconds: float | None = _key("compress")
    layer_decompose_seconds: dict | None = _key("compress")
    decomposition_cached: dict | None = _key("compress")
    degeneracy: dict | None = _key("compress")
    decomposer_info: dict | None = _key("compress")
    # -- evaluate and fine-tune (None without a data set) --------------------------------------
    accuracy_base: float | None = _key("evaluate")
    accuracy_decomposed: float | None = _key("evaluate")
    accuracy_finetuned: float | None = _key("evaluate")
    finetune_seconds: float | None = _key("evaluate")
    accuracy_base_finetuned: float | None = _key("evaluate")   # the control arm ([run] finetune_control)
    finetune_cached: bool | None = _key("evaluate")
    # -- fidelity: compressed against base outputs, before and after fine-tuning ----------------
    fidelity: dict | None = _key("fidelity")
    # -- measure: FLOPs -----------------------------------------------------------------------
    baseline_flops: int | None = _key("flops")
    compressed_flops: int | None = _key("flops")
    theoretical_speedup: float | None = _key("flops")
    layer_theoretical_speedup: dict | None = _key("flops")
    params_kept: float | None = _key("flops")          # compressed parameters over original, whole network
    layer_params_kept: dict | None = _key("flops")     # ... per replaced layer
    # -- measure: timing ----------------------------------------------------------------------
    allocator: dict | None = _key("timing")
    baseline_ms: float | None = _key("timing")
    compressed_ms: float | None = _key("timing")
    baseline_p90_ms: float | None = _key("timing")
    compressed_p90_ms: float | None = _key("timing")
    baseline_iqr_ms: float | None = _key("timing")
    compressed_iqr_ms: float | None = _key("timing")
    speedup: float | None = _key("timing")
    speedup_ci: list | None = _key("timing")  # 95% two-level interval over the timing processes
    speedup_half_width: float | None = _key("timing")
    timing_flags: dict | None = _key("timing")  # {"wide", "busy", "disagree"} (cpbench.measure.intervals)
    timing_processes: list | None = _key("timing")  # per fresh process: pid, speedup, medians, own interval...
    timing_mode: str | None = _key("timing")  # "process", or "in-process" (processes = 0)
    timing_pinned: list | None = _key("timing")
    # which timing pass wrote this row, of how many ([timing] passes): a later pass's row supersedes it
    timing_pass: int | None = _key("timing")
    timing_passes: int | None = _key("timing")
    noise: dict | None = _key("timing")  # the machine before and during the timing, with a verdict
    quiet_wait: dict | None = _key("timing")  # --require-quiet: how long the cell waited, quiet or not
    noisy: bool | None = _key("timing")  # rows of older runs (IQR/median above 10% on either arm)
    timing_rounds: int | None = _key("timing")
    calls_per_round: list | None = _key("timing")
    backend_info: dict | None = _key("timing")
    thread_state: dict | None = _key("timing")
    layer_speedup: dict | None = _key("timing")
    layer_speedup_ci: dict | None = _key("timing")
    layer_timing_flags: dict | None = _key("timing")
    layer_process_speedups: dict | None = _key("timing")
    layer_noisy: dict | None = _key("timing")  # rows of older runs
    # -- a tuned plan (``cpbench tune``, rank spec {target_speedup = X}); absent from other rows ------
    layer_decomposer: dict | None = _key("tune")   # the method chosen per tunable layer ("keep": left as is)
    tune_layers: list | None = _key("tune")        # the layers the tune could replace
    predicted_speedup: float | None = _key("tune")  # whole network, from the latency table
    predicted_loss: float | None = _key("tune")    # summed sensitivities of the plan (points)
    tune_rounds: int | None = _key("tune")         # verify rounds (whole network timed) until met or stopped
    tune_met: bool | None = _key("tune")
    tune_stopped: str | None = _key("tune")        # "met", "max-rounds" or "unreachable"
    meets_max_drop: bool | None = _key("tune")
    fidelity_loss: float | None = _key("tune")     # models without labels: the fidelity measure (points)
    tune: dict | None = _key("tune")               # rounds, shares, rest, stage times, candidates
    # -- keys of a row this version does not know (written by another version), kept as they are
    extra: dict = field(default_factory=dict, repr=False)

    def to_row(self) -> dict[str, Any]:
        """The ``results.jsonl`` object of this cell."""
        row = dict(self.extra)
        for name, keys in STAGE_KEYS.items():
            if name in ("cell",) or any(getattr(self, k) is not None for k in keys):
                row.update({k: getattr(self, k) for k in keys})
        return {k: v for k, v in row.items() if not (k in OPTIONAL_KEYS and v is None)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "CellResult":
        """A row as written by any version of cpbench (missing keys read as None)."""
        known = {k: v for k, v in row.items() if k in _FIELDS}
        return cls(**known, extra={k: v for k, v in row.items() if k not in _FIELDS})

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def axis_values(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in AXIS_KEYS}

    def accuracy_after(self) -> float | None:
        """The fine-tuned accuracy, else the decomposed one (a cell that was not fine-tuned)."""
        return self.accuracy_finetuned if self.accuracy_finetuned is not None else self.accuracy_decomposed

    def reference_accuracy(self) -> float | None:
        """The accuracy a drop is measured from: the base network's, or, with a control arm (the base
        fine-tuned by the same recipe, ``[run] finetune_control``), the better of the two."""
        vals = [v for v in (self.accuracy_base, self.accuracy_base_finetuned) if v is not None]
        return max(vals) if vals else None

    def accuracy_drop(self) -> float | None:
        """Percentage points lost: reference accuracy minus the fine-tuned (else decomposed) accuracy."""
        ref, after = self.reference_accuracy(), self.accuracy_after()
        return None if ref is None or after is None else 100 * (ref - after)


_FIELDS = {f.name for f in dataclasses.fields(CellResult)} - {"extra"}

OPTIONAL_KEYS = frozenset({"traceback", "model_label", "weights_from", "finetune_cached", "layer_speedup", "layer_speedup_ci",
                           "layer_noisy", "noisy", "quiet_wait", "layer_timing_flags", "layer_process_speedups",
                           "timing_pinned", "fidelity_loss", "timing_pass", "timing_passes"})

# Which keys each stage of a cell writes: a stage's keys appear in a row once any of them has a value (the
# cell's own keys always), so an error row holds the keys of the stages that finished.
STAGE_KEYS: dict[str, tuple[str, ...]] = {}
for _f in dataclasses.fields(CellResult):
    if _f.name != "extra":
        STAGE_KEYS.setdefault(_f.metadata["stage"], ())
        STAGE_KEYS[_f.metadata["stage"]] += (_f.name,)
