"""Named registries of plugin-provided objects (decomposers, backends, models, datasets, executors).

``Registry[T]`` is typed by the contract of its kind (:mod:`cpbench.plugin.contracts`): the registration
hooks receive ``Registry[Decomposer]``, ``Registry[Backend]``, ... and ``get`` returns that type.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..errors import PluginError, UnknownNameError

__all__ = ["Registry", "Entry", "KIND_REQUIREMENTS", "description_of"]

T = TypeVar("T")

# What each kind of object must provide; checked at registration so a broken plugin fails early.
KIND_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "decomposer": ("name", "decompose", "build"),
    "backend": ("name", "prepare"),
    "model": ("name", "build", "input_shape"),
    "dataset": ("name", "load"),
    "executor": ("name", "execute"),
}


def description_of(obj: Any) -> str:
    """One line saying what a registered object is: its ``description`` attribute (optional in every
    contract), else the first line of its class's docstring, else of its module's (without a leading
    "``name``:" as the built-ins' module docstrings start)."""
    import re
    import sys

    text = getattr(obj, "description", None)
    if isinstance(text, str) and text.strip():
        return text.strip().splitlines()[0]
    for doc in (type(obj).__doc__, getattr(sys.modules.get(type(obj).__module__), "__doc__", None)):
        if doc and doc.strip():
            line = doc.strip().splitlines()[0]
            return re.sub(r"^``[^`]+``:\s*", "", line)
    return ""


@dataclass(frozen=True)
class Entry(Generic[T]):
    obj: T
    plugin: str  # name of the plugin (entry point) that added it


class Registry(Generic[T]):
    """Objects of one kind by name. Plugins call :meth:`add`; the core calls :meth:`get`."""

    def __init__(self, kind: str):
        if kind not in KIND_REQUIREMENTS:
            raise ValueError(f"unknown registry kind {kind!r}")
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._current_plugin = "<direct>"

    def bound(self, plugin: str) -> "Registry[T]":
        """The same registry, crediting additions to ``plugin`` (used by the plugin loader)."""
        self._current_plugin = plugin
        return self

    def add(self, obj: T) -> T:
        """Register ``obj`` under ``obj.name``. Refuses a duplicate name, naming both plugins."""
        missing = [a for a in KIND_REQUIREMENTS[self.kind] if not hasattr(obj, a)]
        if missing:
            raise PluginError(
                f"plugin {self._current_plugin!r} added a {self.kind} without {', '.join(missing)}"
            )
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {self._current_plugin!r} added a {self.kind} with no valid name")
        if name in self._entries:
            raise PluginError(
                f"{self.kind} name {name!r} is registered twice: by plugin "
                f"{self._entries[name].plugin!r} and by plugin {self._current_plugin!r}"
            )
        self._entries[name] = Entry(obj, self._current_plugin)
        return obj

    def get(self, name: str) -> T:
        try:
            return self._entries[name].obj
        except (KeyError, TypeError):
            raise UnknownNameError(self.kind, name, self._entries) from None

    def plugin_of(self, name: str) -> str:
        self.get(name)
        return self._entries[name].plugin

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
