"""The `qvera` command as a script (qvera/cli/): inspect, export, convert, merge and load-check
adapter folders, and the other sub-commands. `python scripts/export.py --help` lists them."""

import sys

from qvera.cli import main

if __name__ == "__main__":
    sys.exit(main())
