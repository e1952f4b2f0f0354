"""Train a Blueberry model: `python train.py --help`. The same CLI as `python -m blueberry`."""

import sys

from blueberry.cli import main

if __name__ == "__main__":
    sys.exit(main())
