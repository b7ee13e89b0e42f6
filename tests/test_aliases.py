"""Old flat module paths (before the rooms) still import, and give the very same objects."""
from __future__ import annotations

import importlib

import pytest

from cpbench._aliases import OLD_PATHS


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_an_old_path_forwards_to_its_new_home(old):
    alias = importlib.import_module(f"cpbench.{old}")
    new = importlib.import_module(OLD_PATHS[old])
    for name in getattr(new, "__all__", ()):
        assert getattr(alias, name) is getattr(new, name), name


def test_documented_old_imports_work_and_submodules_are_not_loaded_twice():
    import sys

    from cpbench.backend import Prepared
    from cpbench.decomposer import CPDecomposer
    from cpbench.solvers._cp_common import svd_init

    import cpbench
    from cpbench.decomposition.solvers._cp_common import svd_init as new_svd_init

    assert CPDecomposer is cpbench.CPDecomposer and Prepared is cpbench.Prepared
    assert svd_init is new_svd_init
    assert sys.modules["cpbench.decomposition.solvers._cp_common"].__name__ == "cpbench.decomposition.solvers._cp_common"
