"""Reading results back: the HTML/Markdown/CSV report, its plots, the terminal tables, run comparison.

Where a change goes: a new plot → ``plots.py`` (its data), ``drawing.py`` (its figure) and
``figures.py`` (its caption and place in the report); the report's HTML → ``html.py``, its Markdown →
``markdown.py``; a column of the summary tables → ``tables.py``; the end-of-run table fitted to the
terminal → ``columns.py``; the verdict (best cell per decomposer within an accuracy budget) →
``verdict.py``; regression gating → ``compare.py``.
"""
from .compare import compare_runs
from .figures import Plot, build_plots, pareto_plots
from .html import DEFAULT_FORMATS, FORMATS, load_rows, write_report

__all__ = ["write_report", "FORMATS", "DEFAULT_FORMATS", "Plot", "build_plots", "load_rows", "pareto_plots",
           "compare_runs"]
