"""Synthetic result rows for the report tests (shared by test_report.py and test_report_browser.py)."""
from __future__ import annotations

import json
from pathlib import Path

MATRIX_TOML = """# synthetic matrix
[matrix]
model = ["charnet"]
decomposer = ["cp-nls", "tucker2"]
rank = [8, 16]
backend = ["torch-cpu"]
finetune_epochs = [1]
"""

MACHINE = {"cpu_model": "Test CPU <x86>", "logical_cores": 2, "physical_cores": 2, "hostname": "testhost",
           "python": "3.11.7", "torch": "2.13.0+cpu", "governor": None,
           "threads": {"torch_intra_op": 1, "torch_inter_op": 2, "pools": []}}
VERSIONS = {"cpbench": "0.1.0", "torch": "2.13.0+cpu", "plugins": {"cpbench_builtins": "0.1.0"}}


def ok_row(decomposer: str, rank, i: int, *, noisy: bool = False, model: str = "charnet",
           with_accuracy: bool = True, backend: str = "torch-cpu") -> dict:
    """An ok row; all numbers derive from ``i`` so the tests can recompute them."""
    layers = ["conv2", "conv3"]
    pair = decomposer == "tucker2"
    rk = {n: ([rank, rank // 2] if pair else rank) for n in layers}
    sp = 1.5 + 0.75 * i
    row = {
        "status": "ok", "error": None, "cell_key": f"{model}-{decomposer}-{rank}-{backend}", "host": "testhost",
        "model": model, "model_params": {}, "layers": layers, "decomposer": decomposer, "decomposer_options": {},
        "rank_spec": rank, "rank": rk, "backend": backend, "threads": 1, "batch": 8,
        "finetune_epochs": 1 if with_accuracy else 0, "seed": 0,
        "rel_error": {"conv2": 0.5 / (i + 1), "conv3": 0.6 / (i + 1)},
        "theoretical_speedup": 2.0 + i, "layer_theoretical_speedup": {"conv2": 2.5 + i, "conv3": 3.0 + i},
        "params_kept": 0.5 / (i + 1), "layer_params_kept": {"conv2": 0.4 / (i + 1), "conv3": 0.3 / (i + 1)},
        "baseline_ms": 10.0, "compressed_ms": 10.0 / sp, "speedup": sp, "speedup_ci": [sp - 0.1, sp + 0.2],
        "noisy": noisy,
        "layer_speedup": {"conv2": 1.2 + 0.5 * i, "conv3": 1.4 + 0.5 * i},
        "layer_speedup_ci": {"conv2": [1.1 + 0.5 * i, 1.3 + 0.5 * i], "conv3": [1.3 + 0.5 * i, 1.6 + 0.5 * i]},
        "accuracy_base": 0.95 if with_accuracy else None,
        "accuracy_decomposed": (0.60 + 0.05 * i) if with_accuracy else None,
        "accuracy_finetuned": (0.93 - 0.01 * i) if with_accuracy else None,
        "decompose_seconds": 0.1, "finetune_seconds": 1.0 if with_accuracy else 0.0,
        "machine": MACHINE, "versions": VERSIONS,
    }
    return row


def failed_row() -> dict:
    return {"status": "error", "error": "RankError: rank 999 is out of range <for conv2>", "cell_key": "bad",
            "host": "testhost", "model": "charnet", "model_params": {}, "layers": "auto", "decomposer": "cp-nls",
            "rank_spec": 999, "rank": None, "backend": "torch-cpu", "threads": 1, "batch": 8,
            "finetune_epochs": 1, "seed": 0, "traceback": "Traceback (most recent call last):\n  boom",
            "machine": MACHINE, "versions": VERSIONS}


def synthetic_rows() -> list[dict]:
    """2 decomposers × 2 ranks (one noisy) with accuracy and layer speedups, plus one failed cell."""
    rows = [ok_row("cp-nls", 8, 0), ok_row("cp-nls", 16, 1, noisy=True),
            ok_row("tucker2", 8, 2), ok_row("tucker2", 16, 3)]
    return rows + [failed_row()]


def write_run(run_dir: Path, rows: list[dict], *, matrix: str | None = MATRIX_TOML) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "results.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    if matrix is not None:
        (run_dir / "matrix.toml").write_text(matrix, encoding="utf-8")
    return run_dir
