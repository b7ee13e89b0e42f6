"""A cell on a network as people deploy them: BatchNorm folded in both arms, layers = "auto" with notes,
several outputs, fidelity before and after fine-tuning, unreachable ranks as per-layer outcomes."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).parents[1]))
from _nets import multihead  # noqa: E402

from cpbench import hookimpl  # noqa: E402
from cpbench.run.matrix import parse_matrix  # noqa: E402
from cpbench.run.cell import RunContext, run_cell  # noqa: E402
from cpbench.nn.training import Recipe  # noqa: E402


class MultiHeadPlugin:
    name = "multihead"
    dataset = None

    def build(self, outputs="tuple"):
        return multihead(outputs)

    def input_shape(self, **params):
        return (3, 16, 16)


class LabelledMultiHead(MultiHeadPlugin):
    name = "multihead-labelled"
    dataset = "blobs"
    train_recipe = Recipe(epochs=2, batch_size=32, lr=3e-3, n_train=None)
    finetune_recipe = Recipe(epochs=1, batch_size=32, lr=3e-4, n_train=None, weight_decay=0.0)


class Blobs:
    """Five classes of 3×16×16 images, separable by their mean colour."""

    name = "blobs"
    version = "1"

    def load(self, split, *, seed=0, size=None):
        n = size or 128
        g = torch.Generator().manual_seed({"train": 1, "test": 2}.get(split, 3))
        y = torch.randint(0, 5, (n,), generator=g)
        colour = torch.randn(5, 3, 1, 1, generator=torch.Generator().manual_seed(0))
        x = colour[y] + 0.5 * torch.randn(n, 3, 16, 16, generator=g)
        return TensorDataset(x, y)


@hookimpl
def cpbench_register_models(registry):
    registry.add(MultiHeadPlugin())
    registry.add(LabelledMultiHead())


@hookimpl
def cpbench_register_datasets(registry):
    registry.add(Blobs())


@pytest.fixture
def nets_plugins(fresh_state):
    from cpbench.plugin.manager import Plugins, reset_plugins

    reset_plugins(Plugins(extra={"test-nets": sys.modules[__name__]}))
    yield


TIMING = {"budget_s": 0.05, "min_rounds": 3, "max_rounds": 6, "warmup": 1, "processes": 0}  # timed in the harness


def _cell(tmp_path, **axes):
    doc = {"matrix": {"model": ["multihead"], "decomposer": ["cp-als"], "rank": ["speedup:2"], **axes},
           "timing": TIMING}
    m = parse_matrix(doc)
    ctx = RunContext.from_matrix(m, cache_dir=str(tmp_path / "cache"), per_layer_timing=False,
                                 dataset_size={"train": 160, "test": 64})
    (cell,) = m.cells()
    return cell, ctx


def test_auto_cell_on_a_multi_output_network_without_data(nets_plugins, tmp_path):
    cell, ctx = _cell(tmp_path)
    row = run_cell(cell, ctx)
    assert row["status"] == "ok", row.get("error")
    assert row["layers"] == ["layer1.conv1", "layer1.conv2", "down", "layer2.conv1", "layer2.conv2", "fuse"]
    assert set(row["layers_skipped"]) == {"stem.0", "head"}
    assert row["layer_info"]["fuse"]["input_shape"] == [48, 16, 16]
    assert row["bn_folded"]["layer1.bn2"] == "layer1.conv2" and len(row["bn_folded"]) == 5
    fid = row["fidelity"]
    assert 0 < fid["rel_error"] < 1 and 0 <= fid["top1_agreement"] <= 1 and fid["samples"] == 64
    assert fid["rel_error_finetuned"] is None  # no data set: nothing to fine-tune on
    assert row["accuracy_base"] is None and row["theoretical_speedup"] > 1


def test_fold_bn_off_keeps_the_batchnorms(nets_plugins, tmp_path):
    cell, ctx = _cell(tmp_path, layers=[["layer2.conv1"]])
    ctx = RunContext(**{**ctx.__dict__, "fold_bn": False})
    row = run_cell(cell, ctx)
    assert row["status"] == "ok", row.get("error")
    assert row["bn_folded"] == {} and row["layers"] == ["layer2.conv1"]


def test_unreachable_rank_on_one_layer_leaves_it_and_the_cell_runs(nets_plugins, tmp_path):
    cell, ctx = _cell(tmp_path, layers=[["layer1.conv1", "head"]], rank=["speedup:3"])
    row = run_cell(cell, ctx)
    assert row["status"] == "ok", row.get("error")
    assert row["layers"] == ["layer1.conv1"] and "speedup:3" in row["layers_skipped"]["head"]
    only, ctx = _cell(tmp_path, layers=[["head"]], rank=["speedup:3"])
    row = run_cell(only, ctx)
    assert row["status"] == "error" and row["error"].startswith("no layer to decompose: head:")
    assert "decompose_seconds" not in row and row["layers_skipped"]["head"]  # refused before any decomposing


@pytest.mark.parametrize("outputs", ["tuple", "dict"])
def test_finetuning_a_multi_output_network_on_its_classifier_output(nets_plugins, tmp_path, outputs):
    doc = {"matrix": {"model": [{"name": "multihead-labelled", "outputs": outputs}], "decomposer": ["tucker2"],
                      "rank": [[4, 4]], "layers": [["layer2.*"]], "finetune_epochs": [1],
                      "backend": ["onnxruntime"]},
           "timing": TIMING}
    m = parse_matrix(doc)
    ctx = RunContext.from_matrix(m, cache_dir=str(tmp_path / "cache"), per_layer_timing=False,
                                 dataset_size={"train": 160, "test": 64})
    (cell,) = m.cells()
    row = run_cell(cell, ctx)
    assert row["status"] == "ok", row.get("error")
    assert row["layers"] == ["layer2.conv1", "layer2.conv2"]
    assert row["accuracy_base"] > 0.5 and row["accuracy_finetuned"] is not None
    fid = row["fidelity"]
    assert fid["rel_error_finetuned"] is not None and fid["rel_error_finetuned"] != fid["rel_error"]
    assert fid["top1_agreement_finetuned"] is not None and row["speedup"] > 0
