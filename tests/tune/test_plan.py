"""Plan files: written, read back, applied by cpbench.compress."""
import pytest
import torch
from torch import nn

import cpbench
from cpbench.tune.plan import LayerChoice, Plan, read_plan, write_plan


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _plan():
    return Plan({"a": LayerChoice("keep", record={"sensitivity": 0.0}),
                 "b": LayerChoice("tucker2", (4, 4), record={"predicted_ms": 0.01, "layer_speedup": 2.5,
                                                              "layer_speedup_ci": (2.4, 2.6), "nan": float("nan")})},
                {"model": "two", "target_speedup": 2.0, "speedup_ci": (1.9, 2.1), "accuracy_base": None})


def test_round_trip(tmp_path):
    p = write_plan(tmp_path / "plan-2.toml", _plan())
    back = read_plan(p)
    assert back.layers["b"].method == "tucker2" and back.layers["b"].rank == [4, 4]
    assert back.layers["a"].method == "keep" and back.layers["a"].rank is None
    assert back.layers["b"].record["layer_speedup_ci"] == [2.4, 2.6] and "nan" not in back.layers["b"].record
    assert back.meta["speedup_ci"] == [1.9, 2.1] and "accuracy_base" not in back.meta


def test_compress_applies_a_plan_file(tmp_path):
    p = write_plan(tmp_path / "plan-2.toml", _plan())
    model = Two().eval()
    small = cpbench.compress(model, str(p))
    assert type(small.a) is nn.Conv2d and type(small.b) is not nn.Conv2d
    direct = cpbench.compress(model, {"b": ("tucker2", [4, 4])})
    x = torch.randn(1, 3, 6, 6)
    assert torch.allclose(small(x), direct(x))


@pytest.mark.parametrize("text,match", [
    ("[plan]\nmodel = 'x'\n", "no \\[layers"),
    ("[layers.b]\nrank = 3\n", "needs a method"),
    ("[layers.b]\nmethod = 'cp-nls'\n", "needs a rank"),
    ("[layers.b\n", "not a TOML plan"),
])
def test_bad_plan_files(tmp_path, text, match):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(cpbench.UsageError, match=match):
        read_plan(p)


def test_all_keep_plan_is_refused(tmp_path):
    p = write_plan(tmp_path / "plan.toml", Plan({"a": LayerChoice("keep")}))
    with pytest.raises(cpbench.UsageError, match="nothing to compress"):
        cpbench.compress(Two(), p)


def test_missing_plan_file():
    with pytest.raises(cpbench.UsageError, match="plan file not found"):
        cpbench.compress(Two(), "nope/plan-8.toml")
