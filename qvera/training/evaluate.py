"""Held-out quality: loss, perplexity and next-token accuracy on the answer tokens, and exact
match on short answers.

The loss sees exactly what training sees (qvera.data's chat rendering, assistant tokens only,
sequences cut to `max_length` from the end), so a run's number is comparable to its training
loss and to any other adapter evaluated on the same rows. The loss is averaged over tokens,
not over examples: perplexity is then the usual per-token exp(loss).
"""

from __future__ import annotations

import math
import random
import re
import string

import torch
import torch.nn.functional as F
from torch import nn

from qvera.generation.decode import greedy_replies
from qvera.training.data import (
    IGNORE_INDEX,
    conversations,
    read_rows,
    tokenize_conversation,
)

# Answers this short (in tokens) are scored by exact match: there is one right form to produce.
SHORT_ANSWER_TOKENS = 8


def load_examples(path: str, limit: int | None = None, seed: int = 0) -> list[list[dict]]:
    """Conversations from a data file; with `limit`, a fixed random subset (same seed, same rows)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    convs = conversations(read_rows(path), "auto", path)
    if limit is not None:
        order = list(range(len(convs)))
        random.Random(seed).shuffle(order)
        convs = [convs[i] for i in sorted(order[:limit])]
    return convs


def tokenize_examples(tokenizer, convs: list, max_length: int) -> list[dict]:
    """Tokenized conversations (labels on the answers only), cut to `max_length`."""
    rows = []
    for messages in convs:
        row = tokenize_conversation(tokenizer, messages)
        rows.append({k: v[:max_length] for k, v in row.items()})
    return rows


def heldout_loss(model: nn.Module, tokenizer, convs: list, max_length: int = 256, batch_size: int = 8) -> dict:
    """Mean negative log-likelihood per answer token, its perplexity, the share of answer tokens
    that are the model's greedy pick (`accuracy`), and the counts behind them.

    Autograd stays on: bitsandbytes' no-grad CPU path for 4-bit layers (a fused kernel, slow
    without the optional `kernels` package) took 3x longer than the dequantize-and-matmul path
    training uses. Nothing is kept across batches, so the graph costs only time.
    """
    rows = tokenize_examples(tokenizer, convs, max_length)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    total, tokens, hits = 0.0, 0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        targets = labels[:, 1:].to(device)
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += nll.item()
        scored = targets != IGNORE_INDEX
        tokens += int(scored.sum())
        hits += int((logits[:, :-1].argmax(-1) == targets)[scored].sum())
    model.train(was_training)
    if tokens == 0:
        raise ValueError(
            f"no answer tokens left to score within max_length={max_length}; "
            "raise max_length or use rows with shorter prompts"
        )
    loss = total / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "accuracy": hits / tokens,
        "tokens": tokens,
        "examples": len(rows),
    }


def normalize_answer(text: str) -> str:
    """Case, punctuation and spacing do not count against an answer."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def short_answer_examples(tokenizer, convs: list) -> list[list[dict]]:
    """Single-turn examples whose reference answer is at most SHORT_ANSWER_TOKENS tokens."""
    return [
        c
        for c in convs
        if sum(m["role"] == "assistant" for m in c) == 1
        and c[-1]["role"] == "assistant"
        and len(tokenizer(c[-1]["content"], add_special_tokens=False)["input_ids"]) <= SHORT_ANSWER_TOKENS
    ]


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer, convs: list) -> dict:
    """Greedy answers to the short-answer examples, scored by normalized exact match."""
    scored = short_answer_examples(tokenizer, convs)
    if not scored:
        return {"exact_match": None, "examples": 0}
    replies = greedy_replies(model, tokenizer, [c[:-1] for c in scored], 2 * SHORT_ANSWER_TOKENS, len(scored))
    hits = sum(normalize_answer(r) == normalize_answer(c[-1]["content"]) for r, c in zip(replies, scored))
    return {"exact_match": hits / len(scored), "examples": len(scored)}
