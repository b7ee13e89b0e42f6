"""Every mistake in a matrix is one line and exit 2 before any work; warnings for a probable mistake."""
from __future__ import annotations

import textwrap

import pytest

from cpbench.cli import main
from cpbench.errors import MatrixError
from cpbench.run.matrix import parse_matrix
from cpbench.run.validate import CELL_CHECKS, accepted_options, validate_matrix

CONV = '{name = "conv", in_channels = 8, out_channels = 16, kernel_size = 3, input_size = 8, padding = 1}'


def _matrix(plugins, **axes):
    import tomllib

    base = {"model": f"[{CONV}]", "decomposer": '["cp-als"]', "rank": "[4]"}
    base.update(axes)
    doc = "[matrix]\n" + "\n".join(f"{k} = {v}" for k, v in base.items())
    return parse_matrix(tomllib.loads(doc), registries=plugins.registries, source="m.toml")


@pytest.mark.parametrize("axes, message", [
    # ranks against each layer's maximum: a 16x8x3x3 kernel takes CP ranks 1..72 (16*8*3*3 / 16)
    ({"rank": "[1000000]"}, "rank 1000000 of 'cp-als' for layer 'conv' is out of range; allowed: 1..72"),
    ({"decomposer": '["tucker2"]', "rank": "[[32, 4]]"}, "r_out 32 > 16; allowed: r_out 1..16, r_in 1..8"),
    ({"rank": "[[4, 2]]"}, "a pair [r_out, r_in] is for Tucker-2; 'cp-als' takes an integer 1..72"),
    ({"rank": '[{conv = 2000}]'}, "rank 2000 of 'cp-als' for layer 'conv' is out of range"),
    ({"rank": '[{conv2 = 4}]'}, "rank table {'conv2': 4} must name exactly the layers ['conv']"),
    ({"rank": '["vbmf"]'}, 'rank "vbmf" gives a rank pair [r_out, r_in]'),
    # layer names against the model
    ({"layers": '[["conv", "fc9"]]'}, "layer 'fc9' does not exist; Conv2d layers: conv"),
    # decomposer options: names and values, as the decomposer itself says
    ({"decomposer": '[{name = "cp-als", bogus = 1}]'}, "cp-als got unknown options ['bogus']"),
    ({"decomposer": '[{name = "cp-als", impl = "numpy"}]'}, "cp-als impl 'numpy' is not allowed; allowed: torch, tensorly"),
    ({"decomposer": '[{name = "cp-nls", max_iters = 3}]'}, "decomposer 'cp-nls' has no option(s) max_iters; allowed:"),
    ({"decomposer": '[{name = "spatial-svd", form = "cp3"}]'}, "spatial-svd got unknown options ['form']"),
    # model parameters
    ({"model": '[{name = "conv", in_channels = 8}]'}, "model 'conv'"),
])
def test_mistakes_are_found_before_any_work(plugins, axes, message):
    # a rank the one layer cannot take leaves no layer to decompose (cpbench.nn.selection): refused here
    with pytest.raises(MatrixError) as e:
        validate_matrix(_matrix(plugins, **axes), plugins=plugins)
    text = str(e.value)
    assert message in text and text.startswith("m.toml: cell (model conv") and "\n" not in text


def test_a_valid_matrix_passes_and_shipped_matrices_are_valid(plugins):
    assert validate_matrix(_matrix(plugins, rank='[4, "speedup:2", "params:0.5", "error:0.3"]'), plugins=plugins) == []
    from cpbench.cli.commands import _matrix_path
    from cpbench.run.matrix import load_matrix

    for name in ("default", "lebedev2015", "lebedev2015-alexnet", "smoke"):
        assert validate_matrix(load_matrix(_matrix_path(name), registries=plugins.registries), plugins=plugins) == []


def test_finetuning_a_model_without_data_is_a_warning(plugins):
    warnings = validate_matrix(_matrix(plugins, finetune_epochs="[0, 1]"), plugins=plugins)
    assert warnings == ["finetune_epochs = 1 asked for model 'conv', which has no data set: its cells are neither "
                        "fine-tuned nor scored for accuracy"]


def test_checks_are_extensible(plugins):
    def no_rank_4(view):
        if 4 in view.ranks.values():
            from cpbench.errors import RankError

            raise RankError("four is unlucky")

    m = _matrix(plugins)
    with pytest.raises(MatrixError, match="four is unlucky"):
        validate_matrix(m, plugins=plugins, checks=[*CELL_CHECKS, no_rank_4])


def test_accepted_options_from_the_signature():
    class Plain:
        name = "plain"

        def decompose(self, weight, rank, *, seed=0, groups=1, alpha=0.5):
            ...

    class Open(Plain):
        def decompose(self, weight, rank, **anything):
            ...

    assert accepted_options(Plain()) == {"groups", "alpha"}
    assert accepted_options(Open()) is None


def test_cli_rank_too_large_is_exit_2_before_any_cell(tmp_path, capsys):
    m = tmp_path / "m.toml"
    m.write_text(textwrap.dedent(f"""
        [matrix]
        model = [{CONV}]
        decomposer = ["cp-als"]
        rank = [4, 1000000]
    """))
    out = tmp_path / "out"
    assert main(["run", "--matrix", str(m), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rank 1000000" in err[0] and "allowed: 1..72" in err[0]
    assert not out.exists()


def test_cli_prints_the_finetune_warning(tmp_path, capsys):
    m = tmp_path / "m.toml"
    m.write_text(f"[matrix]\nmodel = [{CONV}]\ndecomposer = [\"cp-als\"]\nrank = [4]\nfinetune_epochs = [1]\n")
    assert main(["run", "--matrix", str(m), "--list"]) == 0
    assert "warning: finetune_epochs = 1 asked for model 'conv', which has no data set" in capsys.readouterr().err


def test_list_is_a_dry_run_that_shows_what_resume_would_do(tmp_path, capsys):
    import json

    m = tmp_path / "m.toml"
    m.write_text(f"[matrix]\nmodel = [{CONV}]\ndecomposer = [\"cp-als\", \"spatial-svd\"]\nrank = [4, 2]\n")
    out = tmp_path / "out"
    assert main(["run", "--matrix", str(m), "--list", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 cells" in text and text.count("cp-als") == 2 and not out.exists()
    from cpbench.run.matrix import load_matrix

    cells = load_matrix(m).cells()
    out.mkdir()
    (out / "results.jsonl").write_text(json.dumps({"cell_key": cells[0].key, "status": "ok"}) + "\n"
                                       + json.dumps({"cell_key": cells[1].key, "status": "error"}) + "\n")
    assert main(["run", "--matrix", str(m), "--list", "--out", str(out), "--columns", "theo"]) == 0
    rows = [l.split() for l in capsys.readouterr().out.splitlines() if l.strip()[:1].isdigit()]
    assert [r[-1] for r in rows] == ["done", "failed", "–", "–"]
