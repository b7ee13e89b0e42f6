"""``python -m cpbench``: the same as the ``cpbench`` command."""
import sys

from .cli.commands import main

sys.exit(main())
