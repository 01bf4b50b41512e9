"""Held-out loss, perplexity and next-token accuracy of a base model, with or without an
adapter, on a data file.

    python scripts/eval.py --adapter runs/sft/adapter --dataset held_out.jsonl
    python scripts/eval.py --adapter none --dataset held_out.jsonl      # the base alone, to compare

The loss is per answer token (assistant turns only, as training sees them); accuracy is the
share of answer tokens that are the model's greedy pick; rows whose answer is a few tokens
long are also answered greedily and scored by exact match. Prints JSON (docs/your-data.md
reads it).
"""

import argparse
import json
import sys

from transformers.utils import logging as hf_logging

from qvera.adapters.loading import load_adapted
from qvera.core.config import HelpFormatter, ModelConfig, spellings, tidy_flags
from qvera.core.hardware import COMPUTE_DTYPES
from qvera.training.evaluate import exact_match, heldout_loss, load_examples

NO_ADAPTER = "none"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="base: smollm2-135m, a local folder or a hub id")
    parser.add_argument(
        "--adapter",
        default=NO_ADAPTER,
        help="a qvera adapter folder or a peft adapter folder; none: the base alone",
    )
    parser.add_argument(
        "--dataset", "--data", required=True, help="a .json/.jsonl file (messages, Alpaca or prompt-completion rows)"
    )
    parser.add_argument("--limit", type=int, help="score a fixed random subset of this many rows")
    parser.add_argument("--seed", type=int, default=0, help="which subset --limit picks")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "int8", "bf16", "fp32"], help="of the base")
    parser.add_argument(
        *spellings("compute-dtype"),
        default=ModelConfig.compute_dtype,
        choices=COMPUTE_DTYPES,
        help="auto: bf16 where the hardware has it, else fp16 (GPU) or fp32 (CPU)",
    )
    parser.add_argument(*spellings("max-length"), type=int, default=256, help="tokens per example, as in training")
    parser.add_argument(*spellings("batch-size"), type=int, default=8, help="examples per forward pass")
    tidy_flags(parser)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    for name in ("max_length", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    try:  # the data first: a bad file fails in a second, not after the base has loaded
        convs = load_examples(args.dataset, args.limit, args.seed)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    base = ModelConfig(name=args.model, quantization=args.quantization, compute_dtype=args.compute_dtype)
    adapter = None if args.adapter.lower() == NO_ADAPTER else args.adapter
    try:
        model, tokenizer = load_adapted(base, adapter)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"eval.py: error: {err}")
    report = {
        "model": args.model,
        "adapter": adapter,
        "dataset": args.dataset,
        "heldout": heldout_loss(model, tokenizer, convs, args.max_length, args.batch_size),
        "short_answers": exact_match(model, tokenizer, convs),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
