"""Chat in the terminal, or answer prompts and exit: `qvera chat` as a script, with the same flags and
messages (qvera/cli/chat.py). `python scripts/chat.py --help` lists the flags."""

import sys

from qvera.cli.chat import main

if __name__ == "__main__":
    sys.exit(main())
