"""The last position's logits, without copying the output layer once per row.

Generation asks transformers for the last position's logits only (`logits_to_keep=1`), which
hands the output layer a slice of the hidden states: (rows, 1, hidden) with the stride of the
whole sequence. torch's matmul cannot fold such a tensor into one matrix product, so it runs a
batched product over a copy of the output weight made for every row (on a CPU; SmolLM2's weight
is 57 MB, so 32 prompts prefilled together copied 1.8 GB). Copying the slice instead, rows x
hidden numbers, keeps it one product (the prefill time it saved is in docs/benchmark-log.md).
"""

from __future__ import annotations

import torch
from torch import nn

_MARK = "_qvera_folds_last_position"


def _foldable(module: nn.Module, args: tuple) -> tuple | None:
    hidden = args[0]
    if hidden.dim() == 3 and hidden.stride(0) != hidden.stride(1) * hidden.shape[1]:
        return (hidden.clone(memory_format=torch.contiguous_format), *args[1:])
    return None


def fold_last_position(model: nn.Module) -> None:
    """Make the model's output layer take a sliced last position as one matrix product. Once
    per model; the layer's results are unchanged but for the product's rounding."""
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, _MARK, False):
        head.register_forward_pre_hook(_foldable)
        setattr(head, _MARK, True)
