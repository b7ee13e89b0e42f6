"""Loading plugins: entry points in group ``cpbench``, validated, each failure reported by name.

Built-in plugins are the entry points that the ``cpbench`` distribution itself declares; they load
exactly like third-party ones. ``CPBENCH_DISABLE_PLUGIN_AUTOLOAD=1`` skips every other distribution.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from ..errors import PluginError
from .registry import KIND_REQUIREMENTS, Registry

if TYPE_CHECKING:  # the contracts import torch; `import cpbench` stays cheap
    from .contracts import Backend, Dataset, Decomposer, Executor, Model

__all__ = ["hookimpl", "Plugins", "PluginInfo", "get_plugins", "reset_plugins", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "cpbench"
PROJECT = "cpbench"
hookimpl = pluggy.HookimplMarker(PROJECT)

_REGISTER_HOOKS = {
    "decomposer": "cpbench_register_decomposers",
    "backend": "cpbench_register_backends",
    "model": "cpbench_register_models",
    "dataset": "cpbench_register_datasets",
    "executor": "cpbench_register_executors",
}


@dataclass
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    builtin: bool
    error: str | None = None
    provides: dict[str, list[str]] = field(default_factory=dict)


class Plugins:
    """A pluggy manager plus one :class:`Registry` per kind, filled by the registration hooks."""

    def __init__(self, *, autoload: bool = True, extra: dict[str, Any] | None = None):
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.registries: dict[str, Registry[Any]] = {kind: Registry(kind) for kind in KIND_REQUIREMENTS}
        self.info: dict[str, PluginInfo] = {}
        if autoload:
            self._load_entry_points()
        for name, obj in (extra or {}).items():
            self._register(name, obj, PluginInfo(name, None, None, builtin=False))
        self._fill_registries()

    # -- loading -----------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        third_party = os.environ.get("CPBENCH_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            builtin = (dist_name or "").lower() == PROJECT
            if not builtin and not third_party:
                continue
            info = PluginInfo(ep.name, dist_name, dist.version if dist else None, builtin)
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                info.error = f"import failed: {type(exc).__name__}: {exc}"
                self.info[ep.name] = info
                continue
            self._register(ep.name, obj, info)

    def _register(self, name: str, obj: Any, info: PluginInfo) -> None:
        if name in self.info and self.info[name].error is None:
            other = self.info[name]
            info.error = f"plugin name {name!r} already taken by {other.distribution or 'a direct registration'}"
            self.info[f"{name} ({info.distribution})"] = info
            return
        try:
            self.pm.register(obj, name=name)
            self._validate(name, obj)
        except (pluggy.PluginValidationError, PluginError, ValueError) as exc:
            if self.pm.is_registered(obj):
                self.pm.unregister(obj)
            info.error = str(exc)
        self.info[name] = info

    def _validate(self, name: str, obj: Any) -> None:
        # pluggy only validates hooks that match a spec; a misspelled cpbench_* name would be silence.
        known = {n for n in dir(hookspecs) if n.startswith("cpbench_")}
        for attr in dir(obj):
            if attr.startswith("cpbench_") and callable(getattr(obj, attr, None)) and attr not in known:
                raise PluginError(
                    f"plugin {name!r} implements unknown hook {attr!r}; known hooks: {', '.join(sorted(known))}"
                )
        self.pm.check_pending()

    def _fill_registries(self) -> None:
        # Each plugin's registration hook is called through pluggy on its own (a subset caller holding
        # that plugin's implementation and every wrapper): pluggy passes it only the arguments it
        # declares and runs the wrappers around it, a plugin whose hook raises is reported without
        # stopping the others, and what it adds is credited to it.
        for kind, hook_name in _REGISTER_HOOKS.items():
            registry = self.registries[kind]
            impls = getattr(self.pm.hook, hook_name).get_hookimpls()
            plain = [i for i in impls if not (i.hookwrapper or i.wrapper)]
            for impl in plain:
                others = [i.plugin for i in plain if i.plugin is not impl.plugin]
                caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
                before = set(registry.names())
                try:
                    caller(registry=registry.bound(impl.plugin_name))
                except Exception as exc:
                    info = self.info.get(impl.plugin_name)
                    msg = f"{hook_name} failed: {type(exc).__name__}: {exc}"
                    if info is not None:
                        info.error = msg
                    else:
                        raise PluginError(f"plugin {impl.plugin_name!r}: {msg}") from exc
                    continue
                added = sorted(set(registry.names()) - before)
                if impl.plugin_name in self.info and added:
                    self.info[impl.plugin_name].provides.setdefault(kind, []).extend(added)

    def __reduce__(self):
        # A plugin set does not travel: in another process (a Dask worker, a cell's child process) it is
        # that process's own, loaded from the same entry points (executors ship the modules of directly
        # registered plugins by name).
        return (get_plugins, ())

    # -- access ------------------------------------------------------------------------------
    @property
    def decomposers(self) -> Registry[Decomposer]:
        return self.registries["decomposer"]

    @property
    def backends(self) -> Registry[Backend]:
        return self.registries["backend"]

    @property
    def models(self) -> Registry[Model]:
        return self.registries["model"]

    @property
    def datasets(self) -> Registry[Dataset]:
        return self.registries["dataset"]

    @property
    def executors(self) -> Registry[Executor]:
        return self.registries["executor"]

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def failures(self) -> list[PluginInfo]:
        return [i for i in self.info.values() if i.error]

    def versions(self) -> dict[str, str]:
        """``{plugin: "dist version"}`` for every loaded plugin; recorded with each result."""
        return {
            name: f"{i.distribution or '-'} {i.version or ''}".strip()
            for name, i in sorted(self.info.items())
            if not i.error
        }

    def library_versions(self) -> dict[str, str]:
        """What the registered objects report through their optional ``versions()`` (the libraries they run
        on, e.g. ``{"onnxruntime": "1.19.2"}``); an object whose ``versions()`` fails adds nothing."""
        out: dict[str, str] = {}
        for registry in self.registries.values():
            for name in registry.names():
                fn = getattr(registry.get(name), "versions", None)
                if callable(fn):
                    try:
                        out.update({str(k): str(v) for k, v in (fn() or {}).items()})
                    except Exception:  # a version probe must never lose a result row
                        continue
        return out

    def warn_failures(self, stream=None) -> None:
        stream = stream or sys.stderr
        for info in self.failures():
            print(f"cpbench: plugin {info.name!r} not loaded: {info.error}", file=stream)


_PLUGINS: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin set, loaded on first use."""
    global _PLUGINS
    if _PLUGINS is None:
        _PLUGINS = Plugins()
    return _PLUGINS


def reset_plugins(plugins: Plugins | None = None) -> None:
    """Drop (or replace) the process-wide plugin set; the next :func:`get_plugins` reloads."""
    global _PLUGINS
    _PLUGINS = plugins
