"""``python -m cpbench.cli``: the same as the ``cpbench`` command."""
import sys

from .main import main

sys.exit(main())
