"""cpbench-tntorch: a tensor-train decomposer (``tt``) for cpbench, built on tntorch."""
from .tt import TTBlock, TTDecomposer, tt_kernel

__all__ = ["TTDecomposer", "TTBlock", "tt_kernel"]
__version__ = "0.1.0"
