"""Fine-tune VeRA vectors on a 4-bit base with TRL's SFTTrainer.

    python scripts/sft.py                                   # the embedded demo (configs/demo.yaml)
    python scripts/sft.py --config configs/alpaca.yaml      # a recipe
    python scripts/sft.py --model meta-llama/Llama-2-7b-hf --rank 512 --data train.jsonl

Values come from the recipe YAML given by --config; flags override single fields.
`--config X --help` lists every flag with the value it would take under X.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qvera.training.demo import compare
from qvera.training.recipe import DEMO_DATA, SFTRecipe, parse_recipe
from qvera.training.run import train

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def parse(argv: list[str] | None = None) -> SFTRecipe:
    return parse_recipe(argv, DEFAULT_CONFIG, description=__doc__)


def main(argv: list[str] | None = None) -> int:
    recipe = parse(argv)
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
        print("\nBefore and after, on questions the training data never asked:\n")
        print(compare(trainer.model, trainer.processing_class))
    return 0


if __name__ == "__main__":
    sys.exit(main())
