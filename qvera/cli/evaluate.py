"""Held-out loss, perplexity and next-token accuracy of a base model, with or without an
adapter, on a data file.

    qvera eval --adapter runs/sft/adapter --dataset held_out.jsonl
    qvera eval --adapter none --dataset held_out.jsonl      # the base alone, to compare

The loss is per answer token (assistant turns only, as training sees them); accuracy is the
share of answer tokens that are the model's greedy pick; rows whose answer is a few tokens
long are also answered greedily and scored by exact match. Prints JSON (docs/your-data.md
reads it). `python scripts/eval.py` is the same command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from transformers.utils import logging as hf_logging

from qvera.adapters.loading import load_adapted
from qvera.cli.command import NO_ADAPTER, Command, Failed, required
from qvera.core.config import ModelConfig, option
from qvera.training.evaluate import exact_match, heldout_loss, load_examples


@dataclass
class EvalOptions:
    """What `qvera eval` scores, and how much of it at once."""

    _argument_group_name = "evaluation"

    data: str = required("a .json/.jsonl file (messages, Alpaca or prompt-completion rows)", aliases=["--dataset"])
    adapter: str = option(NO_ADAPTER, f"a qvera adapter folder or a peft adapter folder; {NO_ADAPTER}: the base alone")
    limit: int | None = option(None, "score a fixed random subset of this many rows")
    seed: int = option(0, "which subset --limit picks")
    max_length: int = option(256, "tokens per example, as in training")
    batch_size: int = option(8, "examples per forward pass")

    def __post_init__(self):
        for name in ("max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def evaluate(base: ModelConfig, options: EvalOptions) -> None:
    """Print the scores as JSON. The data is read first: a bad file fails in a second, not after
    the base has loaded."""
    hf_logging.disable_progress_bar()
    convs = load_examples(options.data, options.limit, options.seed)
    adapter = None if options.adapter.lower() == NO_ADAPTER else options.adapter
    try:
        model, tokenizer = load_adapted(base, adapter)
    except (ValueError, FileNotFoundError) as err:
        raise Failed(str(err)) from err
    report = {
        "model": base.name,
        "adapter": adapter,
        "dataset": options.data,
        "heldout": heldout_loss(model, tokenizer, convs, options.max_length, options.batch_size),
        "short_answers": exact_match(model, tokenizer, convs),
    }
    print(json.dumps(report, indent=2))


EVAL = Command(
    "eval",
    "score a base, or an adapter on it, on held-out data (loss, accuracy, exact match)",
    __doc__,
    evaluate,
    options=(ModelConfig, EvalOptions),
    script="eval.py",
)
main = EVAL.main
