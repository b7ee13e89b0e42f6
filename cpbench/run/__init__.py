"""Running a matrix: the matrix file, the session over its cells, one cell, the cache and the results file.

Where a change goes: matrix keys and expansion → ``matrix.py``; resume, executors and writing rows →
``session.py``; what one cell does → ``cell.py``; the content-addressed disk cache → ``cache.py``;
``results.jsonl`` → ``results.py``; the progress display → ``progress.py``.
"""
