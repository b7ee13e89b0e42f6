import pytest

from cpbench.errors import MatrixError
from cpbench.run.matrix import cell_key, expand, load_matrix, parse_matrix
from cpbench.plugin.manager import get_plugins

BASE = {"model": ["conv"], "decomposer": ["cp-als"], "rank": [4]}


def test_cartesian_product_and_defaults():
    m = parse_matrix({"matrix": {**BASE, "rank": [2, 4, "speedup:3"], "backend": ["torch-cpu", "mkl"], "batch": [1, 32]}})
    cells = expand(m)
    assert len(cells) == len(m) == 3 * 2 * 2
    assert cells[0].threads == 1 and cells[0].layers == "auto" and cells[0].finetune_epochs == 0
    assert len({c.key for c in cells}) == len(cells)
    assert cells[0].model == {"name": "conv"}


def test_cell_key_is_stable_and_order_free():
    a = {"model": {"name": "conv", "x": 1}, "rank": 3}
    b = {"rank": 3, "model": {"x": 1, "name": "conv"}}
    assert cell_key(a) == cell_key(b)


@pytest.mark.parametrize("doc, text", [
    ({"matrix": {**BASE, "ranks": [1]}}, "unknown matrix key"),
    ({"matrix": {"model": ["conv"], "rank": [1]}}, "'decomposer' is required"),
    ({"matrix": {**BASE, "threads": [0]}}, "integers ≥ 1"),
    ({"matrix": {**BASE, "rank": ["fast"]}}, "allowed"),
    ({"matrix": {**BASE, "batch": []}}, "non-empty list"),
    ({"matrix": {**BASE, "layers": ["conv"]}}, "list of layer names"),
    ({"matrx": BASE}, "unknown table"),
    ({"matrix": {**BASE}, "timing": {"budget": 1}}, "unknown \\[timing\\] key"),
    ({"matrix": {**BASE}, "run": {"finetune_control": "yes"}}, "finetune_control must be true or false"),
    ({"matrix": {**BASE}, "run": {"finetune_contrl": True}}, "unknown \\[run\\] key.*finetune_control"),
])
def test_bad_matrices_fail_with_one_line(doc, text):
    with pytest.raises(MatrixError, match=text) as e:
        parse_matrix(doc)
    assert "\n" not in str(e.value)


def test_unknown_plugin_names_list_the_available_ones():
    with pytest.raises(MatrixError, match="unknown decomposer 'cp-nsl'.*available: .*cp-nls"):
        parse_matrix({"matrix": {**BASE, "decomposer": ["cp-nsl"]}}, registries=get_plugins().registries)


def test_load_matrix_file_errors(tmp_path):
    with pytest.raises(MatrixError, match="not found"):
        load_matrix(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[matrix\nmodel = ")
    with pytest.raises(MatrixError, match="not a TOML matrix file"):
        load_matrix(bad)


def test_shipped_matrices_parse():
    from importlib import resources

    for f in (resources.files("cpbench") / "matrices").iterdir():
        if f.name.endswith(".toml"):
            m = load_matrix(str(f), registries=get_plugins().registries)
            assert len(m) >= 1, f.name


def test_several_blocks_are_a_union_without_duplicates():
    m = parse_matrix({"matrix": [{**BASE, "rank": [2, 4]}, {**BASE, "rank": [4, 8], "batch": [1]}]})
    assert [c.rank for c in m.cells()] == [2, 4, 8]
    with pytest.raises(MatrixError, match="#2.*unknown matrix key"):
        parse_matrix({"matrix": [BASE, {**BASE, "oops": [1]}]})
