"""Fine-tune VeRA vectors on a 4-bit base: `qvera train` as a script, with the same flags and
messages (qvera/cli/train.py). `python scripts/sft.py --help` lists the flags."""

import sys

from qvera.cli.train import main, parse

__all__ = ["main", "parse"]  # parse: the recipe a command line gives, without training

if __name__ == "__main__":
    sys.exit(main())
