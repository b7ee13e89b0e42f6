"""Reading results back: the HTML/Markdown/CSV report, its plots, the terminal tables, run comparison.

Where a change goes: a new plot → ``plots.py`` (data extraction and drawing) and ``html.py`` (where it
appears); a column of the summary tables → ``tables.py``; regression gating → ``compare.py``.
"""
from .compare import compare_runs
from .html import DEFAULT_FORMATS, FORMATS, Plot, build_plots, load_rows, pareto_plots, write_report

__all__ = ["write_report", "FORMATS", "DEFAULT_FORMATS", "Plot", "build_plots", "load_rows", "pareto_plots",
           "compare_runs"]
