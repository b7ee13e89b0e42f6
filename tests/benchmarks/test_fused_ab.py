"""The fused kernel's A/B script refuses what it cannot time before compiling anything."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "scripts"))
import fused_ab  # noqa: E402


def test_an_unknown_layer_is_one_line_before_any_build(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fused_ab, "compile_source", lambda *a: (_ for _ in ()).throw(AssertionError("compiled")))
    assert fused_ab.main([str(tmp_path / "old.cpp"), "--layers", "64-64-k3@56,no-such-layer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-layer" in err[0] and "64-64-k3@56" in err[0]


def test_every_layer_is_a_user_suite_shape():
    suite = (Path(fused_ab._ROOT) / "benchmarks" / "matrices" / "user_suite.toml").read_text()
    for s, t, k, size, _pad in fused_ab.LAYERS.values():
        assert f"in_channels = {s}, out_channels = {t}, kernel_size = {k}, input_size = {size}" in suite
