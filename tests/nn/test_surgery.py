"""Whole-model surgery: compress, save/load, ONNX export, and bad input that replaces nothing."""
import copy

import pytest
import torch
from torch import nn

import cpbench
from cpbench.errors import RankError, UsageError, WeightError


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 12, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.block = Inner()
        self.head = nn.Conv2d(12, 4, (1, 3), stride=(1, 2))

    def forward(self, x):
        return self.head(self.block(torch.relu(self.stem(x))))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


def test_compress_nested_leaves_input_untouched_and_keeps_mode_and_dtype(net):
    before = copy.deepcopy(net.state_dict())
    net.eval()
    new = cpbench.compress(net, {"block.conv": ("spatial-svd", 24), "stem": ("tucker2", [8, 3])})
    assert isinstance(net.block.conv, nn.Conv2d)  # original untouched
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not isinstance(new.block.conv, nn.Conv2d)
    assert not new.training and not new.block.conv.training
    x = torch.randn(2, 3, 10, 10)
    # full ranks: same outputs
    assert torch.allclose(new(x), net(x), atol=1e-4, rtol=1e-4)
    new64 = cpbench.compress(net.double(), {"head": ("spatial-svd", 1)})
    assert next(new64.head.parameters()).dtype == torch.float64


def test_compress_with_rank_spec_needs_and_uses_example_input(net):
    with pytest.raises(RankError, match="input size"):
        cpbench.compress(net, {"block.conv": ("spatial-svd", "speedup:2")})
    new = cpbench.compress(net, {"block.conv": ("spatial-svd", "speedup:2")}, example_input=torch.randn(1, 3, 10, 10))
    assert new._cpbench_plan["block.conv"]["rank"] >= 1


@pytest.mark.parametrize("plan, exc, text", [
    ({"nope": ("cp-als", 2)}, UsageError, "does not exist"),
    ({"block": ("cp-als", 2)}, UsageError, "not a Conv2d"),
    ({"block.conv": ("cp-als", 0)}, RankError, "out of range"),
    ({"block.conv": ("cp-als", 10**6)}, RankError, "allowed: 1.."),
    ({"block.conv": ("no-such", 2)}, cpbench.UnknownNameError, "available: "),
])
def test_bad_plans_fail_clearly_and_replace_nothing(net, plan, exc, text):
    full_plan = {"stem": ("spatial-svd", 2), **plan}  # a good layer first: must not be half-applied
    with pytest.raises(exc, match=text):
        cpbench.compress(net, full_plan)
    assert isinstance(net.stem, nn.Conv2d)


def test_nan_weights_name_the_layer(net):
    with torch.no_grad():
        net.block.conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(WeightError, match="block.conv.*NaN"):
        cpbench.compress(net, {"block.conv": ("cp-als", 2)})


def test_save_load_round_trip_identical_outputs(net, tmp_path):
    new = cpbench.compress(net, {"block.conv": ("cp-als", 4), "head": ("spatial-svd", 2)})
    with torch.no_grad():  # as after fine-tuning: weights differ from the factors
        next(new.block.conv.parameters()).add_(0.01)
    path = cpbench.save(new, tmp_path / "m.safetensors")
    loaded = cpbench.load(path, base=Net())
    x = torch.randn(2, 3, 10, 10)
    assert torch.equal(loaded(x), new(x))
    raw = path.read_bytes()
    assert b"pickle" not in raw[:2000]


def test_load_rejects_non_cpbench_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(UsageError, match="not a cpbench model"):
        cpbench.load(tmp_path / "x.safetensors")
    with pytest.raises(UsageError, match="no such file"):
        cpbench.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_export_of_compressed_model(net, tmp_path, dynamo):
    pytest.importorskip("onnx")
    new = cpbench.compress(net, {"block.conv": ("cp-als", 4)}).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(new, (torch.randn(1, 3, 10, 10),), str(path), dynamo=dynamo)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 10, 10)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), new(x), atol=1e-4)
