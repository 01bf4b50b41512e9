"""Measuring a training step: time, bytes saved for the backward, floating-point work."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig

from qvera.adapters.format import adapter_size
from qvera.adapters.loading import meta_model
from qvera.core.attach import attach_vera
from qvera.core.config import VeraConfig
from qvera.core.random_base import SHAPES


@dataclass
class SavedBytes:
    """Bytes autograd keeps for the backward. `total` counts every save (as a naive hook
    does); `unique` counts each storage once, which is what memory actually holds."""

    total: int = 0
    unique: int = 0


@contextmanager
def count_saved_tensors():
    result, seen = SavedBytes(), set()

    def pack(tensor):
        size = tensor.numel() * tensor.element_size()
        result.total += size
        storage = tensor.untyped_storage()
        key = storage._cdata  # the storage itself (data pointers are all 0 on the meta device)
        if key not in seen:
            seen.add(key)
            result.unique += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield result


def count_flops(step) -> int:
    """Floating-point operations of one call of `step` (matmuls and the like, as PyTorch counts)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def median_seconds(step, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def llama2_7b_adapter_size(rank: int = 512) -> dict[str, int]:
    """Adapter size for Llama-2-7B with VeRA on all linear layers, measured on a meta-device model."""
    config = LlamaConfig(**SHAPES["llama2-7b"])
    return adapter_size(attach_vera(meta_model(config), VeraConfig(rank=rank)))
