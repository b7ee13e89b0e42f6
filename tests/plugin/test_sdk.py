"""The typed plugin SDK: hooks called through pluggy, typed registries, contracts as Protocols, and
plugins that use only cpbench's public names."""
from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from cpbench.plugin import contracts, hookspecs
from cpbench.plugin.manager import Plugins, hookimpl

REPO = Path(__file__).resolve().parents[2]


class _Dec:
    def __init__(self, name):
        self.name = name

    def decompose(self, weight, rank, *, seed=0, **options):
        raise NotImplementedError

    def build(self, conv, factorization):
        raise NotImplementedError


def test_an_implementation_may_take_fewer_arguments_than_the_hook():
    calls = []

    class NoArgs:
        @hookimpl
        def cpbench_register_decomposers(self):  # the guide allows it: pluggy passes what is declared
            calls.append("called")

    p = Plugins(autoload=False, extra={"noargs": NoArgs()})
    assert calls == ["called"] and p.info["noargs"].error is None


def test_wrappers_run_around_each_plugins_registration():
    seen = []

    class Wrapper:
        @hookimpl(wrapper=True)
        def cpbench_register_decomposers(self, registry):
            before = set(registry.names())
            result = yield
            seen.append(sorted(set(registry.names()) - before))
            return result

    class OldStyle:
        @hookimpl(hookwrapper=True)
        def cpbench_register_decomposers(self):
            seen.append("old-style before")
            yield
            seen.append("old-style after")

    class Adds:
        @hookimpl
        def cpbench_register_decomposers(self, registry):
            registry.add(_Dec("wrapped-one"))

    p = Plugins(autoload=False, extra={"wrapper": Wrapper(), "old": OldStyle(), "adds": Adds()})
    assert ["wrapped-one"] in seen and "old-style before" in seen and "old-style after" in seen
    assert p.decomposers.plugin_of("wrapped-one") == "adds"  # credited to the plugin that added it


def test_a_failing_hook_is_reported_and_the_other_plugins_still_register():
    class Broken:
        @hookimpl
        def cpbench_register_decomposers(self, registry):
            raise RuntimeError("kaput")

    class Fine:
        @hookimpl
        def cpbench_register_decomposers(self, registry):
            registry.add(_Dec("still-here"))

    p = Plugins(autoload=False, extra={"broken": Broken(), "fine": Fine()})
    assert "kaput" in p.info["broken"].error and "still-here" in p.decomposers


def test_every_registration_hook_takes_the_typed_registry_of_its_kind():
    kinds = {"decomposers": "Decomposer", "backends": "Backend", "models": "Model", "datasets": "Dataset",
             "executors": "Executor"}
    for kind, protocol in kinds.items():
        sig = inspect.signature(getattr(hookspecs, f"cpbench_register_{kind}"))
        assert str(sig.parameters["registry"].annotation) == f"Registry[{protocol}]"
        assert hasattr(contracts, protocol)


def test_the_builtins_satisfy_their_protocols(plugins):
    for kind, protocol in (("decomposer", contracts.Decomposer), ("backend", contracts.Backend),
                           ("model", contracts.Model), ("dataset", contracts.Dataset),
                           ("executor", contracts.Executor)):
        for name in plugins.registries[kind].names():
            assert isinstance(plugins.registries[kind].get(name), protocol), (kind, name)


def test_the_executor_contract_names_the_step_argument(plugins):
    assert "step" in inspect.signature(contracts.Executor.execute).parameters
    for name in plugins.executors.names():
        assert "step" in inspect.signature(plugins.executors.get(name).execute).parameters, name


def _cpbench_imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cpbench":
            yield node.module, [a.name for a in node.names]


@pytest.mark.parametrize("path", sorted((REPO / "plugins").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_plugins_import_only_public_names(path):
    for module, names in _cpbench_imports(path):
        assert not any(part.startswith("_") for part in module.split(".")), f"{path}: private module {module}"
        mod = importlib.import_module(module)
        public = set(getattr(mod, "__all__", ()))
        for name in names:
            assert name in public, f"{path}: {module}.{name} is not in {module}.__all__"
