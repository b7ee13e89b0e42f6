"""``python`` (module:callable or file.py:callable) and ``onnx`` (graphs exported by torch.onnx.export)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cpbench.errors import UsageError
from cpbench.run.paths import spec_dir
from cpbench_builtins.models.onnx_file import OnnxModel
from cpbench_builtins.models.onnx_import import convert, load_model
from cpbench_builtins.models.python import PythonModel

NET_PY = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))

def broken(**kw):
    raise ValueError("no such width")
'''


def test_python_target_from_a_file_relative_to_the_matrix(tmp_path):
    (tmp_path / "nets.py").write_text(NET_PY)
    with spec_dir(tmp_path):
        m = PythonModel().build(target="nets.py:Net", params={"width": 4})
    assert m.conv.out_channels == 4 and PythonModel().input_shape(target="nets.py:Net") is None


def test_python_target_from_an_importable_module():
    m = PythonModel().build(target="cpbench_builtins.models.resnet:CifarResNet", params={"depth": 8})
    assert sum(isinstance(c, nn.Conv2d) for c in m.modules()) == 7


@pytest.mark.parametrize("target, words", [
    ("nets.py:Missing", "has no 'Missing'; it defines Net, broken"),
    ("nets.py:broken", "raised ValueError: no such width"),
    ("nowhere.py:Net", "no such file"),
    ("no_such_package_xyz.mod:Net", "cannot import no_such_package_xyz.mod: ModuleNotFoundError: No module named 'no_such_package_xyz'"),
    ("syntax.py:Net", "importing"),
    ("nets.py", "allowed: \"package.module:callable\""),
    ("json:dumps", "raised TypeError"),
    ("math:pi", "not a callable"),
])
def test_python_bad_targets_are_one_line_errors(tmp_path, target, words):
    (tmp_path / "nets.py").write_text(NET_PY)
    (tmp_path / "syntax.py").write_text("def f(:\n")
    with spec_dir(tmp_path), pytest.raises(UsageError) as e:
        PythonModel().build(target=target)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_python_callable_that_returns_no_module(tmp_path):
    (tmp_path / "f.py").write_text("def make():\n    return 3\n")
    with spec_dir(tmp_path), pytest.raises(UsageError, match="returned a int, not a torch.nn.Module"):
        PythonModel().build(target="f.py:make")


class Deployed(nn.Module):
    """What deployed CNNs hold: BatchNorm, SiLU, hardswish, depthwise conv, concat, upsampling, a
    residual add, pooling, a classifier and several outputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv2 = nn.Conv2d(32, 16, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        a = F.silu(self.bn1(self.conv1(x)))
        b = F.hardswish(self.dw(a))
        c = F.relu6(self.conv2(torch.cat([a, b], 1)))
        c = F.relu(self.conv3(c)) + c
        up = F.interpolate(self.head(c), scale_factor=2, mode="nearest")
        pooled = F.adaptive_avg_pool2d(F.max_pool2d(c, 2), 1).flatten(1)
        return self.fc(pooled).softmax(-1), torch.sigmoid(up)


def _export(model, path, dynamo, batch=1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = {} if dynamo else {"dynamic_axes": {"x": {0: "N"}}}
        torch.onnx.export(model.eval(), (torch.randn(batch, 3, 16, 16),), str(path), dynamo=dynamo,
                          input_names=["x"], **kw)
    return path


@pytest.fixture(scope="module")
def deployed():
    torch.manual_seed(0)
    m = Deployed().eval()
    m.bn1.running_mean.normal_()
    m.bn1.running_var.uniform_(0.5, 2.0)
    return m


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_converts_to_real_convs_with_the_same_outputs(tmp_path, deployed, dynamo):
    net = convert(load_model(_export(deployed, tmp_path / "m.onnx", dynamo)))
    convs = {n: c for n, c in net.named_modules() if isinstance(c, nn.Conv2d)}
    assert set(convs) == {"conv1", "dw", "conv2", "conv3", "head"}  # named as in the original network
    assert convs["dw"].groups == 16 and all(c.weight.is_contiguous() for c in convs.values())
    x = torch.randn(4, 3, 16, 16)  # batch 4 on a graph exported at batch 1
    with torch.no_grad():
        for ref, out in zip(deployed(x), net(x)):
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_onnx_resnet_keeps_dotted_names_and_surgery_can_replace_a_conv(tmp_path):
    from cpbench.nn.surgery import replace_layers
    from cpbench_builtins.models.resnet import CifarResNet

    ref = CifarResNet(depth=8, width=4).eval()
    net = convert(load_model(_export(ref, tmp_path / "r.onnx", dynamo=False)))
    assert "layer2.0.conv1" in dict(net.named_modules())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-5)
    conv = net.get_submodule("layer1.0.conv2")
    swapped = replace_layers(net, {"layer1.0.conv2": nn.Sequential(conv)})
    torch.testing.assert_close(swapped(x), ref(x), rtol=1e-4, atol=1e-5)


def test_onnx_plugin_reads_the_input_shape_from_the_graph(tmp_path, deployed):
    _export(deployed, tmp_path / "m.onnx", dynamo=False)
    with spec_dir(tmp_path):
        assert OnnxModel().input_shape(path="m.onnx") == (3, 16, 16)
        assert OnnxModel().trained(path="m.onnx")


def test_onnx_symbolic_spatial_size_needs_input_shape(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(nn.Conv2d(3, 4, 3).eval(), (torch.randn(1, 3, 8, 8),), str(tmp_path / "s.onnx"),
                          dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}})
    with pytest.raises(UsageError, match=r"symbolic sizes; give input_shape = \[C, H, W\]"):
        OnnxModel().input_shape(path=str(tmp_path / "s.onnx"))


def test_onnx_bad_files_and_ops_are_one_line_errors(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage, not protobuf" * 10)
    with pytest.raises(UsageError) as e:
        OnnxModel().build(path=str(tmp_path / "junk.onnx"))
    assert "is not an ONNX file" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="no such file"):
        OnnxModel().build(path=str(tmp_path / "none.onnx"))
    node = helper.make_node("NonMaxSuppression", ["x"], ["y"], name="nms_1")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 3])])
    onnx.save(helper.make_model(graph), str(tmp_path / "nms.onnx"))
    with pytest.raises(UsageError) as e:
        OnnxModel().build(path=str(tmp_path / "nms.onnx"))
    assert "ONNX op 'NonMaxSuppression' (node 'nms_1') cannot be converted" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("backend", ["torch-cpu", "mkl", "onnxruntime"])
def test_a_converted_onnx_network_runs_on_the_backends(tmp_path, plugins, backend):
    from cpbench_builtins.models.resnet import CifarResNet

    ref = CifarResNet(depth=8, width=4).eval()
    net = convert(load_model(_export(ref, tmp_path / "r.onnx", dynamo=False)))
    x = torch.randn(3, 3, 16, 16)
    prepared = plugins.backends.get(backend).prepare(net, x, threads=1)
    try:
        out = prepared(prepared.convert_input(x))
    finally:
        prepared.close()
    out = out.to_dense() if out.is_mkldnn else out
    torch.testing.assert_close(out, ref(x), rtol=1e-3, atol=1e-4)
