"""Help that teaches: the matrix format and rank specs in run --help, methods in decompose --help,
one line per plugin in cpbench plugins."""
from __future__ import annotations

import json

import pytest

from cpbench.cli import main


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_run_help_shows_the_matrix_and_rank_syntax(capsys):
    text = _help(capsys, "run")
    for axis in ("model", "layers", "decomposer", "rank", "backend", "threads", "batch", "finetune_epochs", "seed"):
        assert f"  {axis} = " in text
    for spec in ('"speedup:4"', '"params:0.25"', '"error:0.2"', '"vbmf"', "[r_out, r_in]"):
        assert spec in text
    assert "cpbench run --matrix my.toml --list" in text and "README.md" in text
    assert "--max-drop" in text and "--columns" in text and "--keep-errors" in text


def test_decompose_help_lists_methods_and_rank_specs(capsys, plugins):
    text = _help(capsys, "decompose")
    for name in plugins.decomposers.names():
        assert f"\n  {name} " in text
    assert "the paper's CP by non-linear least squares" in text and '"speedup:4"' in text


def test_plugins_one_line_each(capsys, plugins):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for kind, reg in plugins.registries.items():
        for name in reg.names():
            line = next(l for l in out.splitlines() if f" {name} " in f" {l} " and l.startswith(kind))
            assert len(line.split(name, 1)[1].strip()) > 10, line  # a description follows the name
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["descriptions"]["decomposer"]["cp-nls"].startswith("the paper's CP")


def test_description_falls_back_to_the_docstring():
    from cpbench.plugin.registry import description_of

    class Documented:
        """First line.

        More."""

    class Declared(Documented):
        description = "declared"

    assert description_of(Documented()) == "First line."
    assert description_of(Declared()) == "declared"
