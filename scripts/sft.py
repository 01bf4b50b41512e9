"""Fine-tune VeRA vectors on a 4-bit base with TRL's SFTTrainer.

    python scripts/sft.py --data train.jsonl                     # the built-in SmolLM2-135M, into runs/sft
    python scripts/sft.py --model meta-llama/Llama-2-7b-hf --rank 512 --data train.jsonl --run-name llama
    python scripts/sft.py --config configs/demo.yaml             # the embedded demo (make demo), into runs/demo
    python scripts/sft.py --config configs/alpaca.yaml --help    # every flag, with its value under that recipe

Without --config the defaults below apply; with it, the recipe YAML's values; flags override
single fields. A run writes runs/<run-name> (or --output-dir) and refuses a folder that holds
a run unless --resume (continue it) or --overwrite (replace it) says otherwise. Your own data:
docs/your-data.md.
"""

from __future__ import annotations

import sys

from qvera.training.demo import compare
from qvera.training.recipe import DEMO_DATA, SFTRecipe, parse_recipe
from qvera.training.run import train


def parse(argv: list[str] | None = None) -> SFTRecipe:
    return parse_recipe(argv, description=__doc__)


def main(argv: list[str] | None = None) -> int:
    recipe = parse(argv)
    try:
        result, trainer = train(recipe)
    except (ValueError, FileNotFoundError, PermissionError) as err:  # found before training started
        print(f"sft.py: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a write failed while training or after it (a full disk)
        print(f"sft.py: error: {err}", file=sys.stderr)
        return 1
    if not trainer.is_world_process_zero():
        return 0
    print("\n" + result.summary())
    if result.trained and recipe.data.path == DEMO_DATA:
        print("\nBefore and after, on questions the training data never asked:\n")
        print(compare(trainer.model, trainer.processing_class, result.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
