"""`cpbench reproduce resnet20` writes its image folder and a copy of the shipped matrix, and that
matrix selects the 18 3×3 convs after the stem of ResNet-20."""
import torch

from cpbench.cli import commands
from cpbench.nn.selection import select_layers
from cpbench.plugin.manager import get_plugins
from cpbench.run.matrix import load_matrix


def test_resnet20_matrix_and_data_are_written_once(tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "RESNET20_DATA", {"classes": 3, "per_class": 2, "test_per_class": 1,
                                                    "size": (32, 32), "seed": 0})
    path = commands._resnet20_matrix(tmp_path)
    images = sorted((tmp_path / "data" / "gratings").rglob("*.png"))
    assert len(images) == 3 * 3 and (tmp_path / "data" / "gratings" / "test" / "c2").is_dir()
    stamp = images[0].stat().st_mtime_ns
    commands._resnet20_matrix(tmp_path)  # a second run keeps the data it has
    assert images[0].stat().st_mtime_ns == stamp
    plugins = get_plugins()
    m = load_matrix(path, registries=plugins.registries)
    cells = m.cells()
    assert len(cells) == 4 * 2 * 3 * 2
    layers = cells[0].layers
    model = plugins.models.get("resnet").build(depth=20)
    s = select_layers(model.eval(), torch.randn(1, 3, 32, 32), layers,
                      decomposer=plugins.decomposers.get("cp-nls"), rank="speedup:3")
    assert len(s.layers) == 18 and "conv1" not in s.layers and s.layers[0] == "layer1.0.conv1"
