"""The module the ``cpbench`` entry point names: the hooks that register the plugin's objects."""
from __future__ import annotations

from cpbench import hookimpl

from .tt import TTDecomposer


@hookimpl
def cpbench_register_decomposers(registry):
    registry.add(TTDecomposer())
