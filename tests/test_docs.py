"""Cheap guards that keep the docs true (after datasette's tests/test_docs.py)."""
import inspect
import re
from pathlib import Path

import pytest

from cpbench.plugin import hookspecs

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
HOOKS = [n for n in dir(hookspecs) if n.startswith("cpbench_")]


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_is_documented_with_its_signature(name):
    params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
    assert f"`{name}({params})`" in README


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_has_a_docstring(name):
    assert (getattr(hookspecs, name).__doc__ or "").strip()


def test_readme_test_command_is_what_ci_runs():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    cmd = re.search(r"\*\*Run the tests\*\*.*?```bash\n(.+?)\n```", README, re.S).group(1)
    assert cmd in ci
