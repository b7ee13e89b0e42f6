"""Decomposing a conv kernel: the ``Factorization`` value, the decomposer base, rank specs, the solvers.

Where a change goes: a new rank spec → ``ranks.py``; shared decomposer machinery (groups, CP3/CP4
forms, rank and weight checks) → ``decomposer.py``; the CP-NLS and ALS algorithms → ``solvers/``.
A new decomposer is a plugin (``plugins/cpbench_builtins/decomposers/``), not a module here.
"""
from .decomposer import GROUP_MODES, CPDecomposer, build_geometry, check_rank, check_weight, group_kernels, rel_error
from .factorization import Factorization

__all__ = ["Factorization", "CPDecomposer", "GROUP_MODES", "build_geometry", "check_rank", "check_weight",
           "group_kernels", "rel_error"]
