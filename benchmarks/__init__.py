"""cpbench's asv (airspeed velocity) regression suite: the ``bench_*.py`` modules in this package.

asv imports every module here during discovery; only ``bench_*.py`` define asv benchmarks
(names starting with ``time_``, ``track_``, ``peakmem_``). The other scripts in this directory
(kernel_suite.py, layer_suite.py, train_charnet.py) are stand-alone command-line tools whose main
code is guarded by ``if __name__ == "__main__":``. See docs/regression-tracking.md.
"""
