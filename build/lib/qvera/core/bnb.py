"""Everything qvera must know about bitsandbytes' quantized layers, in one place.

bitsandbytes on CPUs with AVX512-BF16 repacks 4-bit weights in place at the first eval-mode
forward, for a faster inference kernel. That kernel has no autograd (training afterwards
silently loses gradients), the round trip back is lossy (double-quantized scales change), and
it crashes on out_features not divisible by 32. qvera switches it off at load and at attach.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
from torch import nn


def is_4bit(layer: nn.Module) -> bool:
    return isinstance(layer, bnb.nn.Linear4bit)


def is_8bit(layer: nn.Module) -> bool:
    return isinstance(layer, bnb.nn.Linear8bitLt)


def dequantized_weight(layer: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """The weight of an nn.Linear or bitsandbytes 4-bit layer as a plain tensor."""
    if is_4bit(layer):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
    return layer.weight.detach().to(dtype)


def unpack_cpu_4bit(layer: nn.Module) -> None:
    """Undo bitsandbytes' AVX512-BF16 inference repacking, whose kernel has no autograd."""
    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)


def disable_cpu_repacking(model: nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel (see above)."""
    for module in model.modules():
        if is_4bit(module):
            unpack_cpu_4bit(module)
            module.support_avx512bf16_for_cpu = False
