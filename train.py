"""Train a Blueberry model: `python train.py --help`. The same CLI as `python -m blueberry`."""

from blueberry.cli import entry

if __name__ == "__main__":
    entry()
