"""Run descriptions as dataclasses; the YAML files under configs/ mirror them field for field.

Each field carries its own help text (`metadata={"help": ...}`), which transformers'
HfArgumentParser turns into a command-line flag named after the field. The help formatter and
flag spellings below are shared by every command, so their flags read and parse alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path

import yaml

from qvera.core.methods import method_named

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
    method: str = option(
        "vera", "the adapter method: vera, or dvora (a trainable magnitude per output row on top, DoRA's m)"
    )
    # Keys of older YAML files, each with the line that says what replaced it.
    RETIRED: typing.ClassVar[dict[str, str]] = {"magnitude": "write `method: dvora` (or leave it out for plain VeRA)"}

    def __post_init__(self):
        # Flags give a list, YAML a string or a list; "q_proj,v_proj" is a list of two.
        names = [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)
        names = [n.strip() for name in names for n in name.split(",") if n.strip()]
        self.target_modules = ALL_LINEAR if names == [ALL_LINEAR] else names
        method_named(self.method)  # an unknown name fails here, before any base loads


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


def from_dict(cls, values: dict, *, source: str = "config", as_json: bool = False, _prefix: str = ""):
    """Build a dataclass from a mapping, naming any unknown key or value of the wrong type
    (a typo in YAML must not pass, nor fail later as a TypeError deep inside a run).

    A field whose type is a dataclass is built the same way from a nested mapping. A field may
    narrow its type in its metadata: `check` (a test of the value) and `expects` (what passes
    it, for the message). `as_json` spells values and types as JSON does (an adapter's
    description) rather than as Python does (a YAML recipe)."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    for key in unknown:
        if key in getattr(cls, "RETIRED", {}):
            raise ValueError(f"{source}: {_prefix}{key} is no longer a {cls.__name__} key; {cls.RETIRED[key]}")
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
    required = [f.name for f in known.values() if f.default is MISSING and f.default_factory is MISSING]
    if missing := [name for name in required if name not in values]:
        raise ValueError(f"{source}: lacks {[_prefix + name for name in missing]}")
    hints = typing.get_type_hints(cls)
    values = dict(values)
    for name, value in values.items():
        hint, metadata = hints[name], known[name].metadata
        nested = next((h for h in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(h)), None)
        if nested is not None and isinstance(value, dict):
            values[name] = from_dict(nested, value, source=source, as_json=as_json, _prefix=f"{_prefix}{name}.")
            continue
        if hint is float and isinstance(value, str) and not as_json:
            try:  # PyYAML reads 4e-3 (no dot) as a string; argparse would read it as a number
                values[name] = value = float(value)
            except ValueError:
                pass
        if not _matches(value, hint) or not metadata.get("check", lambda _: True)(value):
            expected = metadata.get("expects") or _describe(hint, as_json)
            raise ValueError(f"{source}: {_prefix}{name} is {_spell(value, as_json)}, expected {expected}")
    return cls(**values)


def _spell(value, as_json: bool) -> str:
    """A found value and its type, as a message shows them."""
    if not as_json:
        return f"{value!r} ({_describe(type(value))})"
    found = json.dumps(value)
    found = found if len(found) <= 40 else found[:37] + "..."
    return found if value is None else f"{found} ({_describe(type(value), as_json)})"


def _matches(value, hint) -> bool:
    """isinstance for the annotations config fields use (bool is not a number here)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_matches(v, typing.get_args(hint)[0]) for v in value)
    if typing.get_origin(hint) is dict:
        key_hint, value_hint = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _matches(k, key_hint) and _matches(v, value_hint) for k, v in value.items()
        )
    if dataclasses.is_dataclass(hint):
        return False  # a mapping is built into it above; anything else is of the wrong type
    if isinstance(value, bool) and hint is not bool:
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _describe(hint, as_json: bool = False) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h, as_json) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0], as_json).removeprefix('a ').removeprefix('an ')}s"
    if as_json and (hint is dict or typing.get_origin(hint) is dict or dataclasses.is_dataclass(hint)):
        return "an object"
    return TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


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
