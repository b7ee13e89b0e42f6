"""Guards that keep docs/writing-a-plugin.md true: hook signatures, check names, and the walk-through's
code (its plugin must pass the conformance suite; its pyproject and matrix must be valid)."""
import importlib.util
import inspect
import re
import tomllib
from pathlib import Path

import pytest

from cpbench.plugin import hookspecs
from cpbench.run.matrix import expand, parse_matrix
from cpbench.plugin.manager import Plugins, get_plugins
from cpbench.testing import BACKEND_CHECKS, DECOMPOSER_CHECKS, check_decomposer

GUIDE = (Path(__file__).resolve().parents[2] / "docs" / "writing-a-plugin.md").read_text()
HOOKS = [n for n in dir(hookspecs) if n.startswith("cpbench_")]


def _block_after(marker: str, lang: str) -> str:
    i = GUIDE.index(marker)
    return re.search(rf"```{lang}\n(.*?)\n```", GUIDE[i:], re.S).group(1)


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_signature_is_copied_exactly(name):
    sig = inspect.signature(getattr(hookspecs, name))
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    assert f"def {name}({params}) -> None: ..." in GUIDE
    assert f"`{name}({', '.join(sig.parameters)})`" in GUIDE


def test_every_check_is_documented():
    for name in DECOMPOSER_CHECKS + BACKEND_CHECKS:
        short = name.removeprefix("geometry")
        assert f"`{name}`" in GUIDE or f"`{short}`" in GUIDE, name


def test_walk_through_plugin_passes_the_suite_and_registers(tmp_path):
    code = _block_after("`cpbench-inputsvd/src/cpbench_inputsvd/plugin.py`", "python")
    path = tmp_path / "guide_inputsvd_plugin.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("guide_inputsvd_plugin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = {r.name: r.status for r in check_decomposer(module.InputSVD())}
    assert results["geometry-grouped"] == results["geometry-depthwise"] == "skipped"
    assert sum(s == "passed" for s in results.values()) == len(DECOMPOSER_CHECKS) - 2  # "17 passed, 2 skipped"
    alone = Plugins(autoload=False, extra={"inputsvd": module})
    assert alone.decomposers.plugin_of("input-svd") == "inputsvd"

    pyproject = tomllib.loads(_block_after("`cpbench-inputsvd/pyproject.toml`", "toml"))
    assert pyproject["project"]["entry-points"]["cpbench"] == {"inputsvd": "cpbench_inputsvd.plugin"}
    # the built-ins plus the guide's plugin (unless the reader installed the walk-through package)
    plugins = Plugins() if "input-svd" in get_plugins().decomposers else Plugins(extra={"inputsvd": module})
    matrix = parse_matrix(tomllib.loads(_block_after("against the built-ins. `my.toml`", "toml")),
                          registries=plugins.registries)
    cells = expand(matrix)
    assert len(cells) == 4 and {c.decomposer["name"] for c in cells} == {"input-svd", "spatial-svd"}
