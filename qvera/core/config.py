"""Run descriptions as dataclasses; the YAML files under configs/ mirror them field for field.

Each field carries its own help text (`metadata={"help": ...}`), which transformers'
HfArgumentParser turns into a command-line flag named after the field. The help formatter and
flag spellings below are shared by every command, so their flags read and parse alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ALL_LINEAR = "all-linear"
TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
    list: "a list",
    dict: "a mapping",
}


def option(default, help: str, **metadata):
    """A dataclass field with its help text (and flag aliases), for HfArgumentParser."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class VeraConfig:
    """The adapter's shape. `projection_seed` regenerates A and B (peft: projection_prng_key)."""

    _argument_group_name = "vera"

    rank: int = option(512, "rank r of the shared projections A (r x in) and B (out x r)")
    projection_seed: int = option(0, "seed that generates A and B (peft: projection_prng_key)")
    d_initial: float = option(0.1, "initial value of every entry of d (b starts at 0)")
    target_modules: str | list[str] = option(ALL_LINEAR, "all-linear, or layer names (space- or comma-separated)")
    fold: bool = option(True, "fold the update into the dequantized weight when that is cheaper (see vera.py)")
    magnitude: bool = option(False, "DVoRA: a trainable magnitude per output row on top of VeRA (DoRA's m)")

    def __post_init__(self):
        # Flags give a list, YAML a string or a list; "q_proj,v_proj" is a list of two.
        names = [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)
        names = [n.strip() for name in names for n in name.split(",") if n.strip()]
        self.target_modules = ALL_LINEAR if names == [ALL_LINEAR] else names


@dataclass
class ModelConfig:
    """Which base to load and how."""

    _argument_group_name = "model"

    name: str = option(
        "smollm2-135m",
        "hub id, local folder, smollm2-135m (the built-in model), or random:llama2-7b / random:tiny "
        "(random weights, no download)",
        aliases=["--model"],
    )
    quantization: str = option("nf4", "nf4 (QLoRA's default), int8, bf16 or fp32")
    double_quant: bool = option(True, "quantize the 4-bit scales too (QLoRA)")
    compute_dtype: str = option(
        "auto",
        "dtype of the dequantized matmuls: auto (bf16 where the GPU or CPU has it, else fp16 on a GPU, "
        "fp32 on a CPU; see qvera.core.hardware), bfloat16, float16 or float32",
    )
    # FSDP shards 4-bit weights only when they are stored in the same dtype as the rest.
    quant_storage: str = option("uint8", "dtype the 4-bit weights are packed in (bfloat16 for FSDP)")
    revision: str | None = option(None, "hub revision of the base")


def from_dict(cls, values: dict, *, source: str = "config"):
    """Build a dataclass from a mapping, naming any unknown key or value of the wrong type
    (a typo in YAML must not pass, nor fail later as a TypeError deep inside a run)."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    values = dict(values)
    for name, value in values.items():
        if hints[name] is float and isinstance(value, str):
            try:  # PyYAML reads 4e-3 (no dot) as a string; argparse would read it as a number
                values[name] = value = float(value)
            except ValueError:
                pass
        if not _matches(value, hints[name]):
            raise ValueError(
                f"{source}: {name} is {value!r} ({_describe(type(value))}), expected {_describe(hints[name])}"
            )
    return cls(**values)


def _matches(value, hint) -> bool:
    """isinstance for the annotations config fields use (bool is not a number here)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_matches(v, typing.get_args(hint)[0]) for v in value)
    if isinstance(value, bool) and hint is not bool:
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    return TYPE_NAMES.get(hint, hint.__name__)


def load_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping; raises FileNotFoundError or ValueError in one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; pass a YAML file from configs/")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections at the top level")
    return data


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """A command's description as written, and each flag's default after its help."""


def tidy_flags(parser: argparse.ArgumentParser, hidden: set[str] = frozenset()) -> None:
    """Show each flag in the spelling the docs use (hyphens: --learning-rate) while every spelling
    it was given still parses (--learning_rate, and the `hidden` names); each --no-X flag says what it does.

    argparse parses through its table of option strings and prints `option_strings`: trimming the
    latter changes the help and the usage line only.
    """
    for action in parser._actions:
        shown = [s for s in action.option_strings if "_" not in s and s not in hidden]
        if shown and shown != action.option_strings:
            action.option_strings = shown
            name = shown[0].lstrip("-").replace("-", "_")
            if action.nargs != 0 and action.metavar is None and name != action.dest:  # --model MODEL, not NAME
                action.metavar = name.upper()
    for action in parser._actions:
        if isinstance(action, argparse._StoreFalseAction):
            positive = next(a for a in parser._actions if a.dest == action.dest and a is not action)
            action.help = f"the same as {positive.option_strings[0]} false"
            action.default = argparse.SUPPRESS  # the positive flag holds the default


def spellings(name: str) -> list[str]:
    """A flag with dashes and with underscores (--top-p, --top_p): commands take both."""
    return [f"--{name}", f"--{name.replace('-', '_')}"]
