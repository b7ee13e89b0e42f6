"""The plugin core: hook specifications, the plugin manager, typed registries and the plugin contracts.

Where a change goes: a new hook → ``hookspecs.py``; how plugins are found and loaded → ``manager.py``;
what each kind of plugin must provide → ``contracts.py`` and ``registry.py``.
"""
from .contracts import Backend, Prepared
from .manager import ENTRY_POINT_GROUP, PluginInfo, Plugins, get_plugins, hookimpl, reset_plugins
from .registry import Registry

__all__ = ["hookimpl", "Plugins", "PluginInfo", "get_plugins", "reset_plugins", "ENTRY_POINT_GROUP",
           "Registry", "Backend", "Prepared"]
