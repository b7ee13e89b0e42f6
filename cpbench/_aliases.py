"""Module paths from before the package was grouped into rooms, kept importable.

The docs and plugins written against cpbench 0.1 named flat modules (``cpbench.decomposer``,
``cpbench.backend``, ``cpbench.layers``, ...). Each old name listed here resolves to a thin module that
forwards every attribute to the module's new home, so ``from cpbench.decomposer import CPDecomposer``
gets the very same class as ``from cpbench.decomposition import CPDecomposer``. Done with an import
hook rather than one stub file per old path so that the moved files stay pure renames in git.
New code imports the new paths (README "Layout").
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

# old module (under cpbench) -> its new home; only paths the docs or plugin packages once named
OLD_PATHS: dict[str, str] = {
    "backend": "cpbench.plugin.contracts",
    "hookspecs": "cpbench.plugin.hookspecs",
    "pluginmanager": "cpbench.plugin.manager",
    "factorization": "cpbench.decomposition.factorization",
    "decomposer": "cpbench.decomposition.decomposer",
    "solvers": "cpbench.decomposition.solvers",
    "layers": "cpbench.nn.layers",
    "flops": "cpbench.nn.flops",
    "training": "cpbench.nn.training",
    "cache": "cpbench.run.cache",
    "timing": "cpbench.measure.timing",
    "stats": "cpbench.measure.stats",
    "threads": "cpbench.measure.threads",
    "machine": "cpbench.measure.machine",
    "execution": "cpbench.kernels.forms",
    "table": "cpbench.report.tables",
    "compare": "cpbench.report.compare",
}


def _new_name(fullname: str) -> str | None:
    """``cpbench.solvers.cp_nls`` -> ``cpbench.decomposition.solvers.cp_nls``; None if not an old path."""
    prefix, _, rest = fullname.partition(".")
    old, dot, sub = rest.partition(".")
    if prefix != "cpbench" or old not in OLD_PATHS:
        return None
    return OLD_PATHS[old] + dot + sub


class _Forward(types.ModuleType):
    """A module whose attributes are those of ``target`` (looked up on each access, so patches show)."""

    def __init__(self, name: str, target: types.ModuleType):
        super().__init__(name, f"Old path of {target.__name__}; import from there.")
        self.__dict__["_target"] = target
        self.__dict__["__all__"] = list(getattr(target, "__all__", []))
        self.__dict__["__path__"] = []  # submodules (cpbench.solvers.cp_nls) resolve through the finder

    def __getattr__(self, attr: str):
        return getattr(self.__dict__["_target"], attr)

    def __dir__(self):
        return dir(self.__dict__["_target"])


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        return importlib.machinery.ModuleSpec(fullname, self) if _new_name(fullname) else None

    def create_module(self, spec):
        new = _new_name(spec.name)
        assert new is not None  # find_spec returned a spec only for an old path
        return _Forward(spec.name, importlib.import_module(new))

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())  # before the path finder: an old submodule path is an alias too
