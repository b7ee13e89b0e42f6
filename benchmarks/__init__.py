"""cpbench's asv (airspeed velocity) regression suite: the ``bench_*.py`` modules of this package.

See docs/regression-tracking.md. ``_fixtures.py`` holds the fixed layers, seeded kernels and bounded
decomposer settings the benchmarks share (the tests use them too). The stand-alone benchmark scripts
(``layer_suite.py``, ``kernel_suite.py``, ``train_charnet.py``) live in ``benchmarks/scripts/``, a plain
folder that asv's discovery does not import.

The suite imports cpbench only through names that older commits have too (``cpbench.layers``,
``cpbench.timing``, ...), so ``asv continuous`` can compare a commit from before the package's
reorganisation with one after it.
"""
