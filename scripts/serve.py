"""Serve adapters behind an OpenAI-compatible API: `qvera serve` as a script, with the same flags and
messages (qvera/cli/serve.py). `python scripts/serve.py --help` lists the flags."""

import sys

from qvera.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
