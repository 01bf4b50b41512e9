"""A fine-tuning run as one dataclass: base model, adapter, data and training settings.

The YAML recipes under configs/ mirror `SFTRecipe` section by section; command-line flags
(scripts/sft.py) override single fields. Defaults live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .config import ModelConfig, VeraConfig, from_dict, load_yaml

DEMO_DATA = "demo"  # the data set qvera writes itself (qvera.demo); see DataConfig.path
FORMATS = ("auto", "messages", "alpaca", "prompt-completion")


@dataclass
class DataConfig:
    """Where the examples come from and how they become token sequences."""

    # A local .json/.jsonl/.parquet file, a hub data set name, or `demo` (the embedded data set).
    path: str = DEMO_DATA
    split: str = "train"  # for hub data sets
    format: str = "auto"  # auto, messages, alpaca or prompt-completion
    eval_path: str | None = None  # a separate evaluation file; else eval_fraction is held out
    eval_fraction: float = 0.05
    max_length: int = 512  # tokens; longer examples are truncated (or split across packs)
    packing: bool = False
    assistant_only_loss: bool = True  # loss on the assistant's tokens only
    max_examples: int | None = None  # keep the first N rows (quick trials)


@dataclass
class TrainConfig:
    """Trainer settings. VeRA's vectors want about 10x LoRA's learning rate (the paper: 4e-3 vs 4e-4)."""

    output_dir: str = "runs/sft"
    learning_rate: float = 4e-3
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: float = 0.03  # below 1: a fraction of all steps
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    # `auto`: paged 8-bit AdamW on GPU (bitsandbytes), plain AdamW on CPU.
    optimizer: str = "auto"
    gradient_checkpointing: bool = True
    logging_steps: int = 10
    eval_steps: int = 50  # 0: evaluate only at the end
    save_steps: int = 100  # 0: no checkpoints
    save_total_limit: int = 2
    seed: int = 42
    resume: bool = False  # continue from the last complete checkpoint in output_dir
    export_peft: bool = False  # also write a peft-format adapter (output_dir/peft)


@dataclass
class SFTRecipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    vera: VeraConfig = field(default_factory=VeraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(SFTRecipe)}


def recipe_from_dict(values: dict, *, source: str = "recipe") -> SFTRecipe:
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {unknown}; known: {sorted(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        section = values.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{source}: section {name!r} must be a mapping of fields")
        sections[name] = from_dict(cls, section, source=f"{source} [{name}]")
    recipe = SFTRecipe(**sections)
    check_recipe(recipe)
    return recipe


def load_recipe(path: str | Path) -> SFTRecipe:
    return recipe_from_dict(load_yaml(path), source=str(path))


def recipe_to_dict(recipe: SFTRecipe) -> dict:
    return dataclasses.asdict(recipe)


def check_recipe(recipe: SFTRecipe) -> None:
    """Reject values that would only fail later, after the model has loaded."""
    data, train = recipe.data, recipe.train
    if data.format not in FORMATS:
        raise ValueError(f"data.format {data.format!r} is unknown; use one of {', '.join(FORMATS)}")
    if not 0 <= data.eval_fraction < 1:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {data.eval_fraction}")
    if data.max_length < 8:
        raise ValueError(f"data.max_length must be at least 8 tokens, got {data.max_length}")
    if train.learning_rate <= 0 or train.batch_size < 1 or train.grad_accum < 1:
        raise ValueError("train.learning_rate, train.batch_size and train.grad_accum must be positive")
    if train.max_steps <= 0 and train.epochs <= 0:
        raise ValueError("set train.epochs > 0 or train.max_steps > 0")


# Command-line flags: one per field, named after it; the few that would collide or read
# badly are renamed here.
FLAG_NAMES = {("model", "name"): "model", ("vera", "seed"): "projection-seed", ("data", "path"): "data"}


HELP = {
    "model.name": "hub id, local folder, or smollm2-135m (the built-in model)",
    "model.quantization": "nf4, int8, bf16 or fp32",
    "model.double_quant": "quantize the 4-bit scales too (QLoRA)",
    "model.compute_dtype": "dtype of the dequantized matmuls",
    "model.quant_storage": "dtype the 4-bit weights are packed in (bfloat16 for FSDP)",
    "model.revision": "hub revision of the base",
    "vera.rank": "rank r of the shared projections",
    "vera.seed": "seed that generates A and B (peft: projection_prng_key)",
    "vera.d_initial": "initial value of every d",
    "vera.target_modules": "all-linear, or comma-separated layer names",
    "vera.fold": "fold the update into the weight when cheaper",
    "data.path": ".json/.jsonl/.parquet file, hub data set, or demo",
    "data.split": "split of a hub data set",
    "data.format": "auto, messages, alpaca or prompt-completion",
    "data.eval_path": "evaluation file (else eval-fraction is held out)",
    "data.eval_fraction": "share of the data held out for evaluation",
    "data.max_length": "tokens per example (or per pack)",
    "data.packing": "pack several examples into each sequence",
    "data.assistant_only_loss": "loss on the assistant's tokens only",
    "data.max_examples": "use only the first N examples (none: all)",
    "train.output_dir": "folder for checkpoints, adapter, loss curve",
    "train.learning_rate": "peak learning rate (VeRA: ~10x LoRA's)",
    "train.epochs": "passes over the training data",
    "train.max_steps": "optimizer steps; > 0 overrides epochs",
    "train.batch_size": "examples per device and step",
    "train.grad_accum": "micro-batches per optimizer step",
    "train.warmup_steps": "warmup steps; below 1, a fraction of all steps",
    "train.lr_scheduler": "transformers scheduler name",
    "train.weight_decay": "AdamW weight decay",
    "train.optimizer": "auto (paged 8-bit AdamW on GPU, AdamW on CPU) or a transformers optim name",
    "train.gradient_checkpointing": "recompute activations to save memory",
    "train.logging_steps": "steps between log lines",
    "train.eval_steps": "steps between evaluations (0: only at the end)",
    "train.save_steps": "steps between checkpoints (0: none)",
    "train.save_total_limit": "checkpoints kept",
    "train.seed": "seed for data order and initialisation",
    "train.resume": "continue from the last checkpoint in output-dir",
    "train.export_peft": "also write a peft-format adapter (output-dir/peft)",
}


def flag_name(section: str, field_name: str) -> str:
    return FLAG_NAMES.get((section, field_name), field_name.replace("_", "-"))


def _converter(annotation: str):
    """A parser for one field's type, from its annotation string (these modules use
    `from __future__ import annotations`)."""
    optional = annotation.endswith("| None")
    base = annotation.removesuffix("| None").strip()

    def convert(text: str):
        if optional and text.lower() == "none":
            return None
        if base == "int":
            return int(text)
        if base == "float":
            return float(text)
        if base == "str | list[str]":  # all-linear, or a comma-separated list of module names
            return text if text == "all-linear" else [t.strip() for t in text.split(",") if t.strip()]
        assert base == "str", f"no command-line parser for type {annotation}"
        return text

    convert.__name__ = base  # argparse names the type in its error messages
    return convert


def _show(value) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def add_recipe_arguments(parser, recipe: SFTRecipe) -> None:
    """One flag per recipe field; each flag's default is `recipe`'s value, so --help shows
    what a run would use."""
    import argparse

    for section in SECTIONS:
        config = getattr(recipe, section)
        group = parser.add_argument_group(section, (type(config).__doc__ or "").strip().splitlines()[0])
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            flag = "--" + flag_name(section, f.name)
            dest = f"{section}.{f.name}"
            if f.type == "bool":
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=value,
                                   help=f"{HELP[dest]} [{dest}] (default: %(default)s)")
            else:
                group.add_argument(flag, dest=dest, type=_converter(f.type), default=value, metavar=f.type.split()[0].upper(),
                                   help=f"{HELP[dest]} [{dest}] (default: {_show(value)})")


def recipe_from_args(namespace) -> SFTRecipe:
    values: dict = {section: {} for section in SECTIONS}
    for dest, value in vars(namespace).items():
        section, _, name = dest.partition(".")
        if section in SECTIONS and name:
            values[section][name] = value
    return recipe_from_dict(values, source="command line")
