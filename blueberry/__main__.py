"""`python -m blueberry ...`: the same command line as train.py."""

import sys

from .cli import main

sys.exit(main())
