"""The ``cpbench`` command line (entry point ``cpbench.cli:main``)."""
from .commands import build_parser, main

__all__ = ["main", "build_parser"]
