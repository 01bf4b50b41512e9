"""Fine-tune VeRA vectors on a 4-bit base with TRL's SFTTrainer.

    python scripts/sft.py                                   # the embedded demo (configs/demo.yaml)
    python scripts/sft.py --config configs/alpaca.yaml      # a recipe
    python scripts/sft.py --model meta-llama/Llama-2-7b-hf --rank 512 --data train.jsonl

Values come from the recipe YAML given by --config; flags override single fields.
`--config X --help` lists every flag with the value it would take under X.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from qvera.recipe import DEMO_DATA, add_recipe_arguments, load_recipe, recipe_from_args  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def parse(argv: list[str] | None = None):
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", default=str(DEFAULT_CONFIG), help="recipe YAML (default: %(default)s)")
    known, _ = first.parse_known_args(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, parents=[first], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    try:
        add_recipe_arguments(parser, load_recipe(known.config))
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    args = parser.parse_args(argv)
    try:
        return recipe_from_args(args)
    except ValueError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> int:
    recipe = parse(argv)
    from qvera.train import train

    try:
        result, trainer = train(recipe)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        print(f"sft.py: error: {err}", file=sys.stderr)
        return 2
    if not trainer.is_world_process_zero():
        return 0
    print("\n" + result.summary())
    print(f"loss curve          {result.output_dir / 'loss.png'}")
    if recipe.data.path == DEMO_DATA:
        from qvera.demo import compare

        print("\nBefore and after, on questions the training data never asked:\n")
        print(compare(trainer.model, trainer.processing_class))
    return 0


if __name__ == "__main__":
    sys.exit(main())
