"""The `qvera` command: one sub-command per task, each declared once in this package.

    qvera train --config configs/demo.yaml
    qvera chat --adapter runs/demo/adapter
    qvera serve --adapters adapters/
    qvera export runs/demo/adapter out/lora --to lora

Each sub-command's flags are generated from dataclasses (`command.py`); scripts/sft.py,
chat.py, serve.py, eval.py and export.py run the same declarations under their own names.
`qvera COMMAND --help` shows a command's flags with their defaults.
"""

from __future__ import annotations

import argparse
import sys

from qvera.cli import adapters
from qvera.cli.chat import CHAT
from qvera.cli.command import Command
from qvera.cli.evaluate import EVAL
from qvera.cli.serve import SERVE
from qvera.cli.train import TRAIN
from qvera.core.config import HelpFormatter

COMMANDS: dict[str, Command] = {c.name: c for c in (TRAIN, CHAT, SERVE, EVAL, *adapters.COMMANDS)}


def parser() -> argparse.ArgumentParser:
    """The `qvera` parser: its help lists the sub-commands, each with its own flags."""
    root = argparse.ArgumentParser(
        prog="qvera",
        description="Fine-tune, chat with, serve, evaluate and export VeRA adapters on 4-bit bases.",
        epilog="`qvera COMMAND --help` shows a command's flags and their defaults.",
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        parents = [command.parser(f"qvera {name}")] if command.options else []
        commands.add_parser(
            name,
            help=command.summary,
            description=command.description,
            parents=parents,
            add_help=not parents,
            formatter_class=HelpFormatter,
        )
    return root


def main(argv: list[str] | None = None) -> int:
    """Run `qvera`; returns the exit code: 0, 2 for bad input, 1 when the work failed, each
    error in one `qvera COMMAND: error: ...` line (command.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        parser().parse_args(argv)  # prints the help, or refuses the command line; exits either way
    return COMMANDS[argv[0]].main(argv[1:], prog=f"qvera {argv[0]}")
