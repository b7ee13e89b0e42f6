"""The kernel layer: exact execution forms of a CP block and the fused operator with its C++ source.

``forms.py`` re-expresses a CP block (GEMMs on the channels-last view, banded matrices, the fused
operator) and picks the fastest exact form per block; ``fused.py`` builds and calls ``cp_fused.cpp``.
"""
