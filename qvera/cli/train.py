"""Fine-tune VeRA vectors on a 4-bit base with TRL's SFTTrainer.

    qvera train --data train.jsonl                     # the built-in SmolLM2-135M, into runs/sft
    qvera train --model meta-llama/Llama-2-7b-hf --rank 512 --data train.jsonl --run-name llama
    qvera train --config configs/demo.yaml             # the embedded demo (make demo), into runs/demo
    qvera train --config configs/alpaca.yaml --help    # every flag, with its value under that recipe

Without --config the defaults below apply; with it, the recipe YAML's values; flags override
single fields. A run writes runs/<run-name> (or --output-dir) and refuses a folder that holds
a run unless --resume (continue it) or --overwrite (replace it) says otherwise. Your own data:
docs/your-data.md. `python scripts/sft.py` is the same command.
"""

from __future__ import annotations

from qvera.cli.command import Command
from qvera.training.demo import compare
from qvera.training.recipe import DEMO_DATA, SFTRecipe, parse_recipe
from qvera.training.run import train

SCRIPT = "sft.py"


def parse(argv: list[str] | None = None, prog: str | None = None) -> SFTRecipe:
    """The recipe a command line asks for: its flags are the recipe's fields (parse_recipe)."""
    return parse_recipe(argv, description=__doc__, prog=prog or SCRIPT)


def fit(recipe: SFTRecipe) -> None:
    """Train as the recipe says; print the run's summary and, for the demo, its answers before
    and after. A problem found before training starts raises ValueError, FileNotFoundError or
    PermissionError (exit 2); a write that fails later (a full disk), OSError (exit 1)."""
    result, trainer = train(recipe)
    if not trainer.is_world_process_zero():
        return
    print("\n" + result.summary())
    if result.trained and recipe.data.path == DEMO_DATA:
        print("\nBefore and after, on questions the training data never asked:\n")
        print(compare(trainer.model, trainer.processing_class, result.output_dir))


TRAIN = Command(
    "train",
    "fine-tune an adapter on your data, from a recipe YAML and flags",
    __doc__,
    fit,
    script=SCRIPT,
    parse=parse,
)
main = TRAIN.main
