"""A fine-tuning run as one dataclass: base model, adapter, data and training settings.

The YAML recipes under configs/ mirror `SFTRecipe` section by section; command-line flags
(scripts/sft.py) override single fields. Defaults and help texts live here and nowhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, SchedulerType
from transformers.training_args import OptimizerNames

from qvera.adapters.peft_interop import no_peft_vera
from qvera.core.base import QUANTIZATIONS
from qvera.core.config import HelpFormatter, ModelConfig, VeraConfig, from_dict, load_yaml, option, tidy_flags
from qvera.core.hardware import COMPUTE_DTYPES
from qvera.core.random_base import is_random, random_config

DEMO_DATA = "demo"  # the data set qvera writes itself (qvera.demo); see DataConfig.path
FORMATS = ("auto", "messages", "alpaca", "prompt-completion")
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")  # data paths read as local files
QUANT_STORAGES = ("uint8", "bfloat16", "float16", "float32")
REPLAY_QUESTIONS = 100  # the replay split of data/general_knowledge.json


@dataclass
class DataConfig:
    """Where the examples come from and how they become token sequences."""

    _argument_group_name = "data"

    path: str | None = option(
        None, "a .json/.jsonl/.parquet file, a hub data set, or demo (the embedded one)", aliases=["--data"]
    )
    split: str = option("train", "split of a hub data set")
    format: str = option("auto", "auto, messages, alpaca or prompt-completion")
    eval_path: str | None = option(None, "a separate evaluation file (else eval_fraction is held out)")
    eval_fraction: float = option(0.05, "share of the data held out for evaluation")
    max_length: int = option(512, "tokens per example (or per pack); longer examples are truncated")
    packing: bool = option(False, "pack several examples into each sequence")
    assistant_only_loss: bool = option(True, "loss on the assistant's tokens only")
    max_examples: int | None = option(None, "use only the first N examples (unset or 0: all)")
    replay: int = option(
        0,
        f"add the base model's own answers to N general questions (at most {REPLAY_QUESTIONS}) to the "
        "training data, so the adapter keeps more of what the base knew; 0: none (docs/training.md)",
    )


@dataclass
class TrainConfig:
    """Trainer settings. VeRA's vectors want about 10x LoRA's learning rate (the paper: 4e-3 vs 4e-4)."""

    _argument_group_name = "train"

    run_name: str = option("sft", "the run's name: its folder is runs/<run_name>, and loss.png's title")
    output_dir: str | None = option(None, "folder for checkpoints, adapter and loss curve (unset: runs/<run_name>)")
    learning_rate: float = option(4e-3, "peak learning rate (VeRA: about 10x LoRA's)")
    # d starts at 0.1 and b at 0, m at the weight's row norms: their scales differ, so do their
    # best rates. The defaults are the quality study's best (docs/quality.md): b at 3x beat 1x
    # and 10x, d at 0.3x and 3x did not beat b at 3x, m at 0.1x beat 1x.
    lr_scale_d: float = option(1.0, "learning rate of the vectors d, as a multiple of learning_rate")
    lr_scale_b: float = option(3.0, "learning rate of the vectors b, as a multiple of learning_rate")
    lr_scale_m: float = option(0.1, "learning rate of DVoRA's magnitudes m, as a multiple of learning_rate")
    epochs: float = option(1.0, "passes over the training data")
    max_steps: int = option(-1, "optimizer steps; > 0 overrides epochs")
    batch_size: int = option(8, "examples per device and step")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    warmup_steps: float = option(0.03, "warmup steps; below 1, a fraction of all steps")
    lr_scheduler: str = option("cosine", "transformers scheduler name")
    weight_decay: float = option(0.0, "AdamW weight decay")
    optimizer: str = option("auto", "auto (fused AdamW) or a transformers optim name (paged_adamw_8bit, ...)")
    gradient_checkpointing: bool = option(True, "recompute activations to save memory")
    logging_steps: int = option(10, "steps between log lines")
    eval_steps: int = option(50, "steps between evaluations (0: only at the end)")
    save_steps: int = option(100, "steps between checkpoints (0: none)")
    save_total_limit: int = option(2, "checkpoints kept")
    seed: int = option(42, "seed for data order and the evaluation split")
    resume: bool = option(False, "continue the run in the output folder from its last complete checkpoint")
    overwrite: bool = option(
        False, "start afresh in an output folder that holds a run, replacing its checkpoints, adapter and loss curve"
    )
    export_peft: bool = option(False, "also write a peft-format adapter (<output folder>/peft)")

    @property
    def run_dir(self) -> Path:
        """The folder the run writes: output_dir, else runs/<run_name>."""
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.run_name


@dataclass
class SFTRecipe:
    """A whole run: the four sections a recipe YAML holds."""

    model: ModelConfig = field(default_factory=ModelConfig)
    vera: VeraConfig = field(default_factory=VeraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(SFTRecipe)}


def recipe_from_dict(values: dict, *, source: str = "recipe") -> SFTRecipe:
    """A recipe from YAML sections, each field type-checked and the whole checked by
    `check_recipe`; raises ValueError naming the source, section and field."""
    recipe = _unchecked_recipe(values, source)
    check_recipe(recipe)
    return recipe


def _unchecked_recipe(values: dict, source: str) -> SFTRecipe:
    """Sections, keys and types checked; values not yet (flags may still replace them)."""
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {unknown}; known: {sorted(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        section = values.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{source}: section {name!r} must be a mapping of fields")
        sections[name] = from_dict(cls, section, source=f"{source} [{name}]")
    return SFTRecipe(**sections)


def load_recipe(path: str | Path) -> SFTRecipe:
    """The recipe in a YAML file (see recipe_from_dict)."""
    return recipe_from_dict(load_yaml(path), source=str(path))


def recipe_to_dict(recipe: SFTRecipe) -> dict:
    """The recipe as YAML-ready sections, the inverse of recipe_from_dict."""
    return dataclasses.asdict(recipe)


def check_recipe(recipe: SFTRecipe) -> None:
    """Reject, in one line naming the field, every value that would only fail later, after the
    model has loaded (minutes for a 7B base); touches nothing on disk."""
    model, vera, data, train = recipe.model, recipe.vera, recipe.data, recipe.train
    problems = [
        (not model.name, "model.name is empty; pass a hub id, a local folder or smollm2-135m"),
        (
            model.quantization not in QUANTIZATIONS,
            f"model.quantization {model.quantization!r} is unknown; use one of {', '.join(QUANTIZATIONS)}",
        ),
        (
            model.compute_dtype not in COMPUTE_DTYPES,
            f"model.compute_dtype {model.compute_dtype!r} is unknown; use one of {', '.join(COMPUTE_DTYPES)}",
        ),
        (
            model.quant_storage not in QUANT_STORAGES,
            f"model.quant_storage {model.quant_storage!r} is unknown; use one of {', '.join(QUANT_STORAGES)}",
        ),
        (vera.rank < 1, f"vera.rank must be at least 1, got {vera.rank}"),
        (not math.isfinite(vera.d_initial), f"vera.d_initial must be a finite number, got {vera.d_initial}"),
        (not vera.target_modules, "vera.target_modules is empty; use all-linear or layer names such as q_proj,v_proj"),
        (data.format not in FORMATS, f"data.format {data.format!r} is unknown; use one of {', '.join(FORMATS)}"),
        (not 0 <= data.eval_fraction < 1, f"data.eval_fraction must be in [0, 1), got {data.eval_fraction}"),
        (data.max_length < 8, f"data.max_length must be at least 8 tokens, got {data.max_length}"),
        (
            not 0 <= data.replay <= REPLAY_QUESTIONS,
            f"data.replay must be from 0 to {REPLAY_QUESTIONS} general questions, got {data.replay}",
        ),
        (
            (data.max_examples or 0) < 0,
            f"data.max_examples must be at least 0 (0: all), got {data.max_examples}",
        ),
        (
            not (math.isfinite(train.learning_rate) and train.learning_rate > 0),
            f"train.learning_rate must be above 0, got {train.learning_rate}",
        ),
        (train.batch_size < 1, f"train.batch_size must be at least 1, got {train.batch_size}"),
        (train.grad_accum < 1, f"train.grad_accum must be at least 1, got {train.grad_accum}"),
        (train.max_steps <= 0 and train.epochs <= 0, "set train.epochs > 0 or train.max_steps > 0"),
        (train.warmup_steps < 0, f"train.warmup_steps must be at least 0, got {train.warmup_steps}"),
        (train.weight_decay < 0, f"train.weight_decay must be at least 0, got {train.weight_decay}"),
        (train.logging_steps < 1, f"train.logging_steps must be at least 1, got {train.logging_steps}"),
        (train.eval_steps < 0, f"train.eval_steps must be at least 0 (0: only at the end), got {train.eval_steps}"),
        (train.save_steps < 0, f"train.save_steps must be at least 0 (0: no checkpoints), got {train.save_steps}"),
        (train.save_total_limit < 1, f"train.save_total_limit must be at least 1, got {train.save_total_limit}"),
        (
            train.lr_scheduler not in {s.value for s in SchedulerType},
            f"train.lr_scheduler {train.lr_scheduler!r} is unknown; use one of "
            f"{', '.join(s.value for s in SchedulerType)}",
        ),
        (
            train.optimizer != "auto" and train.optimizer not in {o.value for o in OptimizerNames},
            f"train.optimizer {train.optimizer!r} is unknown; use auto or a transformers optim name (adamw_torch, ...)",
        ),
        (
            min(train.lr_scale_d, train.lr_scale_b, train.lr_scale_m) <= 0,
            "train.lr_scale_d, lr_scale_b and lr_scale_m must be above 0, got "
            f"{train.lr_scale_d}, {train.lr_scale_b} and {train.lr_scale_m}",
        ),
        (train.export_peft and no_peft_vera(vera.method), f"train.export_peft: {no_peft_vera(vera.method)}"),
        (
            not train.run_name or Path(train.run_name).name != train.run_name or train.run_name in (".", ".."),
            f"train.run_name must be a plain folder name, got {train.run_name!r}; use --output-dir for a path",
        ),
        (train.resume and train.overwrite, "pass --resume to continue a run or --overwrite to replace it, not both"),
    ]
    for failed, message in problems:
        if failed:
            raise ValueError(message)
    if is_random(model.name):
        random_config(model.name)  # an unknown shape fails here, not after the data has loaded
    for name, path in (("data.path", data.path), ("data.eval_path", data.eval_path)):
        if path and Path(path).suffix in LOCAL_SUFFIXES and not Path(path).is_file():
            raise ValueError(f"{name} {path} does not exist; pass a .json, .jsonl or .parquet file or a hub data set")
    _check_writable(train.run_dir)


def _check_writable(folder: Path) -> None:
    """The output folder exists as a writable folder, or could be created: its nearest
    existing parent is a writable folder (nothing is created here)."""
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"output folder {folder} is not writable ({existing} is a file); choose another --output-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"output folder {folder} is not writable ({existing} does not allow writing); choose another --output-dir"
        )


def parse_recipe(
    argv: list[str] | None,
    default_config: str | Path | None = None,
    description: str | None = None,
    prog: str | None = None,
) -> SFTRecipe:
    """The recipe a command line asks for: the dataclasses' defaults, or the YAML named by
    --config, then flags over it.

    Every field is a flag named after it (HfArgumentParser); `--config X --help` shows each
    flag with the value it would take under X. Errors exit with argparse's one-line usage error.
    """
    first = argparse.ArgumentParser(prog=prog, add_help=False)
    first.add_argument(
        "--config", default=default_config, help="recipe YAML (configs/); unset: the defaults shown below"
    )
    known, _ = first.parse_known_args(argv)
    parser = HfArgumentParser(
        [cls for cls in SECTIONS.values()],
        prog=prog,
        description=description,
        parents=[first],
        formatter_class=HelpFormatter,
    )
    base = SFTRecipe()
    if known.config is not None:
        try:
            base = _unchecked_recipe(load_yaml(known.config), str(known.config))
        except (ValueError, FileNotFoundError) as err:
            parser.error(str(err))
    # Every default from the recipe, also where HfArgumentParser would drop one (a str-or-list field).
    parser.set_defaults(**{k: v for section in recipe_to_dict(base).values() for k, v in section.items()})
    # A field with an alias shows the alias alone (--model, not --name; --data, not --path).
    aliased = {f"--{f.name}" for cls in SECTIONS.values() for f in dataclasses.fields(cls) if "aliases" in f.metadata}
    tidy_flags(parser, aliased)
    try:
        *sections, _ = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
        recipe = SFTRecipe(*sections)
        check_recipe(recipe)
    except ValueError as err:
        parser.error(str(err))
    return recipe
