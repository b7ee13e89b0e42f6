"""A user's own network and data: cpbench.benchmark on a module object, and every bad input of a
model or data spec as one line, exit 2, with the results already recorded kept."""
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import cpbench
from cpbench.cli import main
from cpbench.testing.sampledata import write_image_folder

FAST = {"budget_s": 0.05, "min_rounds": 3}


class TwoConv(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def test_benchmark_runs_the_cells_on_a_module_object(tmp_path, fresh_state):
    net = TwoConv()
    rows = cpbench.benchmark(net, torch.randn(2, 3, 8, 8), decomposers=["cp-als", "tucker2"], ranks=[3],
                             layers=["conv2"], timing=FAST, run={"per_layer_timing": False}, out=tmp_path / "run")
    assert [r["status"] for r in rows] == ["ok", "ok"], [r["error"] for r in rows]
    assert {r["decomposer"] for r in rows} == {"cp-als", "tucker2"}
    assert rows[0]["model_label"] == "TwoConv" and rows[0]["batch"] == 2 and rows[0]["accuracy_base"] is None
    assert rows[0]["weights_from"] == "plugin"  # the module's weights, never trained
    assert len((tmp_path / "run" / "results.jsonl").read_text().splitlines()) == 2
    assert isinstance(net.conv2, nn.Conv2d)  # the caller's module is left as it was


def test_benchmark_with_tensors_evaluates_and_fine_tunes_without_files(fresh_state):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, 8, 8, generator=g), torch.arange(24) % 3
    rows = cpbench.benchmark(TwoConv(), torch.randn(1, 3, 8, 8), ranks=[2], layers=["conv2"], timing=FAST,
                             dataset={"train": (x, y), "test": (x[:9], y[:9])}, finetune_epochs=[1],
                             run={"per_layer_timing": False})
    row = rows[0]
    assert row["status"] == "ok", row["error"]
    assert row["accuracy_base"] is not None and row["accuracy_finetuned"] is not None


def _matrix(tmp_path, model: str) -> str:
    path = tmp_path / "m.toml"
    path.write_text(f"""
[matrix]
model = [{model}]
layers = [["conv2"]]
decomposer = ["cp-als"]
rank = [2]
[timing]
budget_s = 0.05
min_rounds = 3
[run]
per_layer_timing = false
""")
    return str(path)


NETS = '''
import torch
from torch import nn

class TwoConv(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))

def explode():
    raise RuntimeError("out of memory while building")
'''


@pytest.fixture
def user_dir(tmp_path):
    (tmp_path / "nets.py").write_text(NETS)
    (tmp_path / "broken.py").write_text("import does_not_exist_anywhere\n")
    (tmp_path / "notonnx.onnx").write_bytes(b"\x08\x07garbage")
    (tmp_path / "empty").mkdir()
    write_image_folder(tmp_path / "imgs", classes=3, per_class=4, size=(8, 8))
    save_file({"conv1.weight": torch.zeros(4, 3, 3, 3)}, str(tmp_path / "other.safetensors"))
    from onnx import TensorProto, helper
    import onnx

    node = helper.make_node("RoiAlign", ["x"], ["y"], name="roi")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph), str(tmp_path / "roi.onnx"))
    return tmp_path


GOOD = '{name = "python", target = "nets.py:TwoConv", input_shape = [3, 8, 8]}'
BAD_INPUTS = {
    "target does not import": ('{name = "python", target = "broken.py:Net", input_shape = [3, 8, 8]}',
                               "ModuleNotFoundError: No module named 'does_not_exist_anywhere'"),
    "callable raises": ('{name = "python", target = "nets.py:explode", input_shape = [3, 8, 8]}',
                        "raised RuntimeError: out of memory while building"),
    "file is not ONNX": ('{name = "onnx", path = "notonnx.onnx"}', "is not an ONNX file"),
    "unsupported ONNX op": ('{name = "onnx", path = "roi.onnx"}', "ONNX op 'RoiAlign' (node 'roi') cannot be converted"),
    "weights for another architecture": (
        '{name = "python", target = "nets.py:TwoConv", input_shape = [3, 8, 8], weights = "other.safetensors"}',
        "do not fit the model: missing keys conv1.bias, conv2.weight, conv2.bias"),
    "data folder missing": ('{name = "python", target = "nets.py:TwoConv", dataset = {name = "imagefolder", path = "nope"}}',
                            "no such folder"),
    "data folder empty": ('{name = "python", target = "nets.py:TwoConv", dataset = {name = "imagefolder", path = "empty"}}',
                          "no images found"),
    "input_shape does not fit": ('{name = "python", target = "nets.py:TwoConv", input_shape = [1, 8, 8]}',
                                 "input_shape [1, 8, 8] does not fit the network at conv1 (Conv2d, input (1, 1, 8, 8))"),
    "no input shape at all": ('{name = "python", target = "nets.py:TwoConv"}', "needs input_shape = [C, H, W]"),
}


def test_a_good_spec_runs(user_dir, capsys, fresh_state):
    assert main(["run", "--matrix", _matrix(user_dir, GOOD), "--out", str(user_dir / "out")]) == 0


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_keeps_what_was_recorded(user_dir, capsys, fresh_state, case):
    spec, words = BAD_INPUTS[case]
    out = user_dir / "out"
    out.mkdir()
    recorded = json.dumps({"cell_key": "earlier", "status": "ok"}) + "\n"
    (out / "results.jsonl").write_text(recorded)
    capsys.readouterr()
    code = main(["run", "--matrix", _matrix(user_dir, spec), "--out", str(out), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and words in err[0] and "Traceback" not in err[0], err
    assert (out / "results.jsonl").read_text() == recorded


def test_the_readme_walkthrough_is_valid_toml_and_python():
    import re
    import tomllib
    from pathlib import Path

    from cpbench.run.matrix import parse_matrix

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Your own network"):readme.index("## Matrix files")]
    blocks = dict(reversed(re.findall(r"```(\w+)\n(.*?)```", section, re.S)))  # the first of each kind
    matrix = parse_matrix(tomllib.loads(blocks["toml"]))
    assert matrix.cells()[0].model["target"] == "mynet.py:MyNet" and matrix.train["epochs"] == 5
    compile(blocks["python"], "README", "exec")
