"""`python -m src.curate ...`: see :mod:`src.curate.cli`."""
import sys

from .cli import main

sys.exit(main())
