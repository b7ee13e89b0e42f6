"""Model specs: an inline data set, given weights (never retrained), training by recipe, input shapes."""
import json

import pytest
import torch
from safetensors.torch import save_file

from cpbench.errors import MatrixError, UsageError
from cpbench.run.inputs import build_network, check_input_shape, load_weights
from cpbench.run.matrix import load_matrix, parse_matrix
from cpbench.run.session import run_matrix
from cpbench.run.cell import RunContext
from cpbench.testing.sampledata import write_image_folder
from cpbench_builtins.models.resnet import CifarResNet

SMALL = {"name": "resnet", "depth": 8, "width": 4}


@pytest.fixture
def folder(tmp_path):
    return write_image_folder(tmp_path / "imgs", classes=3, per_class=12, size=(8, 8))


def _ctx(tmp_path, **kw):
    return RunContext(cache_dir=str(tmp_path / "cache"), train={"epochs": 1, "batch_size": 8}, **kw)


def test_inline_dataset_fills_classes_and_channels_and_trains_once(tmp_path, folder, plugins, fresh_state):
    spec = {**SMALL, "dataset": {"name": "imagefolder", "path": str(folder), "channels": 1}}
    net = build_network(spec, _ctx(tmp_path), plugins)
    assert net.weights_from == "trained"
    assert net.input_shape == (1, 8, 8) and net.data.num_classes == 3
    assert net.module.conv1.in_channels == 1 and net.module.fc.out_features == 3
    again = build_network(spec, _ctx(tmp_path), plugins)
    assert again.weights_from == "cache"
    assert all(torch.equal(a, b) for a, b in zip(net.module.state_dict().values(), again.module.state_dict().values()))
    longer = build_network(spec, RunContext(cache_dir=str(tmp_path / "cache"), train={"epochs": 2, "batch_size": 8}),
                           plugins)
    assert longer.weights_from == "trained"  # another recipe is another cache entry


def test_given_weights_are_loaded_and_never_trained(tmp_path, folder, plugins, fresh_state):
    ref = CifarResNet(depth=8, width=4, num_classes=3)
    torch.nn.init.normal_(ref.fc.weight)
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"epoch": 3, "state_dict": ref.state_dict()}, tmp_path / "ckpt.pt")
    for weights in ("w.safetensors", "ckpt.pt"):
        spec = {**SMALL, "num_classes": 3, "weights": str(tmp_path / weights),
                "dataset": {"name": "imagefolder", "path": str(folder)}}
        net = build_network(spec, _ctx(tmp_path), plugins)
        assert net.weights_from == "weights file"
        assert torch.equal(net.module.fc.weight, ref.fc.weight)


def test_weights_for_another_architecture_name_the_first_keys(tmp_path):
    save_file(CifarResNet(depth=8, width=8).state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(UsageError) as e:
        load_weights(CifarResNet(depth=8, width=4), tmp_path / "w.safetensors")
    assert "\n" not in str(e.value) and "shape mismatch conv1.weight (8, 3, 3, 3)" in str(e.value)
    save_file(CifarResNet(depth=14, width=4).state_dict(), str(tmp_path / "deeper.safetensors"))
    with pytest.raises(UsageError, match=r"unexpected keys layer1\.1\.bn1\.bias"):
        load_weights(CifarResNet(depth=8, width=4), tmp_path / "deeper.safetensors")
    with pytest.raises(UsageError, match="weights file not found"):
        load_weights(CifarResNet(depth=8), tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UsageError, match="cannot read"):
        load_weights(CifarResNet(depth=8), tmp_path / "junk.pt")


def test_an_input_shape_the_network_cannot_take_names_the_layer():
    with pytest.raises(UsageError) as e:
        check_input_shape(CifarResNet(depth=8, in_channels=3), (1, 32, 32))
    msg = str(e.value)
    assert "\n" not in msg and "input_shape [1, 32, 32] does not fit the network at conv1 (Conv2d, input (1, 1, 32, 32))" in msg


def test_train_table_is_checked_when_the_matrix_is_read():
    base = {"matrix": {"model": ["resnet"], "decomposer": ["cp-als"], "rank": [4]}}
    assert parse_matrix({**base, "train": {"epochs": 2, "lr": 0.01}}).train == {"epochs": 2, "lr": 0.01}
    for bad, words in (({"epoch": 2}, r"unknown \[train\] key"), ({"optimizer": "lbfgs"}, "allowed: adam, sgd"),
                       ({"epochs": 0}, "positive integer")):
        with pytest.raises(MatrixError, match=words):
            parse_matrix({**base, "train": bad})


def test_matrix_with_an_image_folder_beside_it_runs_end_to_end(tmp_path, fresh_state):
    write_image_folder(tmp_path / "imgs", classes=3, per_class=10, size=(8, 8))
    (tmp_path / "m.toml").write_text("""
[matrix]
model = [{name = "resnet", depth = 8, width = 4, dataset = {name = "imagefolder", path = "imgs"}}]
layers = [["layer1.0.conv2"]]
decomposer = ["cp-als"]
rank = [2]
finetune_epochs = [1]
[train]
epochs = 1
batch_size = 8
[timing]
budget_s = 0.05
min_rounds = 3
[run]
per_layer_timing = false
""")
    matrix = load_matrix(tmp_path / "m.toml")
    summary = run_matrix(matrix, tmp_path / "out", ctx=RunContext.from_matrix(matrix, cache_dir=str(tmp_path / "c")))
    row = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[0])
    assert summary.ok == 1, row.get("error")
    assert row["weights_from"] == "trained" and row["model_label"] == "ResNet-8"
    assert 0 <= row["accuracy_base"] <= 1 and row["accuracy_finetuned"] is not None
