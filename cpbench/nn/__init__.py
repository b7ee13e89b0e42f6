"""Networks and layers: the replacement blocks, model surgery, FLOP counts, training and fine-tuning.

Where a change goes: a new replacement block or conv geometry → ``layers.py``; finding, decomposing and
replacing layers in a model (``compress``/``save``/``load``) → ``surgery.py``; FLOP/MAC counts →
``flops.py``; training recipes → ``training.py``; which convs a cell decomposes (``layers = "auto"``,
globs, FLOP shares, unreachable ranks) → ``selection.py``; BatchNorm folding → ``bnfold.py``; what a
network's output is (tuples, dicts, the classifier output) → ``outputs.py``.
"""
from .layers import ConvGeometry, CPBlock, SpatialSVDBlock, Tucker2Block, geometry

__all__ = ["ConvGeometry", "CPBlock", "SpatialSVDBlock", "Tucker2Block", "geometry"]
