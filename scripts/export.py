"""Adapter files from the command line: export, convert, merge, inspect, load-check.

Same as the `qvera` console command; see `python scripts/export.py --help`.
"""

import sys

from qvera.cli import main

if __name__ == "__main__":
    sys.exit(main())
