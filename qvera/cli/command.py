"""What every `qvera` sub-command shares: flags generated from dataclasses, and one way to end.

A command's flags come from dataclasses whose fields are declared with `option(default, help)`
(`ModelConfig`, `Sampling`, `ServeOptions`, a command's own options): transformers'
HfArgumentParser makes each field a flag and each dataclass a group of `--help`. A field made
with `positional` is an argument instead, and a `list[str]` field a flag that may be given
more than once (unset: the field's default).

Exit codes, alike in every command: 0 when done; 2 for bad input (a bad flag or value, a file
named on the command line that is missing or wrong), and 1 when the work fails once started
(a base that does not load, a full disk). A bad flag gets argparse's usage line and its
`PROG: error: ...`; every other error is that one `PROG: error: ...` line alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from typing import Callable

from transformers import HfArgumentParser

from qvera.core.base import QUANTIZATIONS
from qvera.core.config import HelpFormatter, tidy_flags
from qvera.core.hardware import COMPUTE_DTYPES

NO_ADAPTER = "none"  # an --adapter that names no adapter: the base alone
# Values a flag must take from a fixed set, wherever it appears (ModelConfig's fields).
CHOICES = {"quantization": QUANTIZATIONS, "compute_dtype": COMPUTE_DTYPES}


class Failed(Exception):
    """The work failed after the input was accepted (exit 1): a base or adapter that does not load."""


def positional(help: str):
    """A dataclass field that is a command-line argument rather than a flag."""
    return field(metadata={"help": help, "positional": True})


def required(help: str, **metadata):
    """A dataclass field whose flag must be given (it has no default)."""
    return field(metadata={"help": help, **metadata})


class CommandParser(HfArgumentParser):
    """HfArgumentParser, with arguments, repeated flags, and nested dataclasses left out."""

    @staticmethod
    def _parse_dataclass_field(parser, field: dataclasses.Field):  # HfArgumentParser's hook for one field
        if dataclasses.is_dataclass(field.type):  # a dataclass of its own (ServeOptions.defaults)
            return
        if field.metadata.get("positional"):
            parser.add_argument(field.name, help=field.metadata["help"])
        elif typing.get_origin(field.type) is list:
            name = field.name.replace("_", "-")
            parser.add_argument(f"--{name}", action="append", default=argparse.SUPPRESS, help=field.metadata["help"])
        else:
            HfArgumentParser._parse_dataclass_field(parser, field)


def command_parser(options: tuple[type, ...], prog: str | None, description: str) -> CommandParser:
    """The parser of a command whose flags are the fields of `options`, one group per dataclass."""
    parser = CommandParser(list(options), prog=prog, description=description, formatter_class=HelpFormatter)
    for action in parser._actions:
        if action.dest in CHOICES:
            action.choices = CHOICES[action.dest]
        if action.required:  # no "(default: None)" in the help
            action.default = argparse.SUPPRESS
    aliased = {f"--{f.name}" for cls in options for f in dataclasses.fields(cls) if "aliases" in f.metadata}
    tidy_flags(parser, aliased)  # --model, not --name
    return parser


@dataclass(frozen=True)
class Command:
    """One sub-command of `qvera`, declared once: `qvera NAME` and scripts/SCRIPT run it alike.

    `work` takes the parsed dataclasses, in the order of `options`, and raises plain errors:
    ValueError or FileNotFoundError for bad input, `Failed` when the work itself fails. A
    command whose flags come from elsewhere (`train`: a recipe YAML, then flags) gives `parse`
    instead of `options`: argv and prog to the one value `work` takes.
    """

    name: str
    summary: str  # its line in `qvera --help`
    description: str  # its `--help`
    work: Callable[..., None]
    options: tuple[type, ...] = ()
    script: str | None = None  # the scripts/ file that runs it alone, its name in messages
    parse: Callable[[list[str] | None, str | None], object] | None = None

    def parser(self, prog: str | None = None) -> CommandParser:
        return command_parser(self.options, prog or self.script, self.description)

    def main(self, argv: list[str] | None = None, prog: str | None = None) -> int:
        """Parse `argv` (default: sys.argv), run, return the exit code. A bad flag or value
        exits 2 from argparse."""
        if self.parse is not None:
            prog = prog or self.script
            return run(prog, self.work, self.parse(argv, prog))
        parser = self.parser(prog)
        given = vars(parser.parse_args(argv))
        try:  # each dataclass from its flags; a flag left out (a repeated one) keeps the field's default
            values = [
                cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given})
                for cls in self.options
            ]
        except ValueError as err:  # a dataclass's own check of its values (Sampling, ServeOptions)
            parser.error(str(err))
        return run(parser.prog, self.work, *values)


def run(prog: str, work: Callable[..., None], *args) -> int:
    """Call `work(*args)`; print any error as one `PROG: error: ...` line; return the exit code."""
    try:
        work(*args)
    except Failed as err:
        message, code = str(err), 1
    except (ValueError, FileNotFoundError, PermissionError, KeyError) as err:
        message, code = str(err), 2
    except OSError as err:  # the disk, not the input: full, read-only, failing
        message, code = disk_error(err), 1
    else:
        return 0
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def disk_error(err: OSError) -> str:
    """One line naming the path and the cause: `[Errno 28] No space left on device: 'x'` reads
    as `x: No space left on device`; an error that names its path in its own words (qvera's
    adapter writes) is kept, on one line."""
    if err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return " ".join(str(err).split())
