"""Score a base or an adapter on held-out data: `qvera eval` as a script, with the same flags and
messages (qvera/cli/evaluate.py). `python scripts/eval.py --help` lists the flags."""

import sys

from qvera.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
