"""cpbench's asv (airspeed velocity) regression suite: the ``bench_*.py`` modules of this package.

See docs/regression-tracking.md. ``_fixtures.py`` holds the fixed layers, seeded kernels and bounded
decomposer settings the benchmarks share.

The other scripts in this directory (kernel_suite.py, layer_suite.py, train_charnet.py, ...) are
stand-alone command-line tools, not asv benchmarks. asv imports every module of the benchmark package
during discovery and takes any module-level function named ``time_*``/``track_*``/... for a benchmark
(``layer_suite`` imports ``cpbench.timing.time_pair``, which asv would try to run). So when this
package is imported by asv's runner (recognised by ``asv_runner.discovery`` being loaded), those
scripts are registered as empty placeholder modules and asv never executes them. Imported any other
way nothing changes: run them as before, ``python benchmarks/layer_suite.py ...``.
"""
import sys as _sys

if "asv_runner.discovery" in _sys.modules:  # imported by asv's discovery/runner, not by a user
    import os as _os
    import types as _types

    for _file in sorted(_os.listdir(_os.path.dirname(__file__))):
        _stem, _ext = _os.path.splitext(_file)
        if _ext == ".py" and not _stem.startswith(("bench_", "_")):
            _name = f"{__name__}.{_stem}"
            _stub = _types.ModuleType(_name, f"placeholder: {_file} is a script, not an asv benchmark module")
            _sys.modules.setdefault(_name, _stub)
