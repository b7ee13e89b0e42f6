"""A cell on the character network, tiny: train → decompose → evaluate → fine-tune → time; then cached."""
import pytest

from cpbench.run.matrix import parse_matrix
from cpbench.run.cell import RunContext, clear_memo, run_cell

DOC = {
    "matrix": {"model": ["charnet"], "layers": [["conv2"]], "decomposer": ["spatial-svd"], "rank": [8],
               "finetune_epochs": [1]},
    "timing": {"budget_s": 0.2, "min_rounds": 5, "warmup": 1},
}


@pytest.mark.slow
def test_charnet_cell_end_to_end_and_cached(tmp_path):
    m = parse_matrix(DOC)
    ctx = RunContext(cache_dir=str(tmp_path / "cache"), timing=m.timing, per_layer_timing=True,
                     dataset_size={"train": 400, "val": 100, "test": 200})
    (cell,) = m.cells()
    clear_memo()
    row = run_cell(cell, ctx)
    assert row["status"] == "ok", row.get("error")
    assert 0 <= row["accuracy_base"] <= 1 and row["accuracy_decomposed"] is not None
    assert row["accuracy_finetuned"] is not None and row["finetune_seconds"] > 0
    assert row["finetune_cached"] is False and row["decomposition_cached"] == {"conv2": False}
    assert row["theoretical_speedup"] > 1 and row["layer_theoretical_speedup"]["conv2"] > row["theoretical_speedup"]
    clear_memo()  # a new process: everything expensive comes from the disk cache
    again = run_cell(cell, ctx)
    assert again["finetune_cached"] is True and again["decomposition_cached"] == {"conv2": True}
    assert again["accuracy_finetuned"] == row["accuracy_finetuned"]
    assert again["rel_error"] == row["rel_error"]
    assert row["accuracy_base_finetuned"] is None  # no control arm unless asked


@pytest.mark.slow
def test_finetune_control_arm(tmp_path):
    """[run] finetune_control: the base network fine-tuned by the same recipe, once, cached like the rest."""
    from cpbench.report.tables import accuracy_drop

    m = parse_matrix({**DOC, "run": {"finetune_control": True}})
    ctx = RunContext.from_matrix(m, cache_dir=str(tmp_path / "cache"),
                                 dataset_size={"train": 400, "val": 100, "test": 200})
    assert ctx.finetune_control is True
    (cell,) = m.cells()
    clear_memo()
    row = run_cell(cell, ctx)
    assert row["status"] == "ok", row.get("error")
    ctl = row["accuracy_base_finetuned"]
    assert ctl is not None and 0 <= ctl <= 1
    ref = max(row["accuracy_base"], ctl)
    assert accuracy_drop(row) == pytest.approx(100 * (ref - row["accuracy_finetuned"]))
    clear_memo()
    assert run_cell(cell, ctx)["accuracy_base_finetuned"] == ctl  # from the disk cache


def test_shipped_charnet_weights_load_with_an_empty_cache(tmp_path):
    """A fresh machine skips base training: the package ships the default recipe's weights."""
    from cpbench.run.cell import base_model

    clear_memo()
    model = base_model({"name": "charnet"}, RunContext(cache_dir=str(tmp_path / "empty")))
    assert not (tmp_path / "empty" / "models").exists()  # nothing trained
    from cpbench.plugin.manager import get_plugins
    from cpbench.nn.training import evaluate

    test = get_plugins().datasets.get("synthchars").load("test", size=600)
    assert evaluate(model, test) > 0.8  # a trained network, not a fresh initialisation (~3%)
    clear_memo()
