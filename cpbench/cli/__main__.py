"""``python -m cpbench.cli``: the same as the ``cpbench`` command."""
import sys

from .commands import main

sys.exit(main())
