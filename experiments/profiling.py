"""Measuring a training step: time, bytes saved for the backward, floating-point work."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from peft import VeraConfig as PeftVeraConfig
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
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


NO_KERNEL = ("aten::_unsafe_view", "aten::detach", "aten::lift_fresh", "aten::empty")  # metadata or allocation only


class OperatorCount(TorchDispatchMode):
    """Counts the operators that reach a kernel, by name: on a GPU each is a launch, and a
    step that issues many small ones waits on the host. Views and aliases launch nothing."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (func.is_view or func._schema.name in NO_KERNEL):
            self.counts[func.overloadpacket.__name__] += 1
        return out


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


def attach_variant(model: nn.Module, variant: str, *, fp32_trainables: bool = True):
    """Put one benchmark variant on a frozen base: `floor` (nothing to train; the backward
    still reaches the inputs, the base's own cost), `peft-lora:R`, `peft-dora:R`, `peft-vera:R`
    (peft, all linear layers, LoRA alpha = 2R), `qvera:R` or `qvera-dvora:R` (VeRA with DoRA's
    magnitude). Returns (model, method, rank).

    `fp32_trainables`: keep peft's trainable parameters in fp32, as the trainer keeps them
    (off on the meta device, which holds no values)."""
    method, _, rank = variant.partition(":")
    rank = int(rank or 0)
    if method == "floor":
        model.enable_input_require_grads()
    elif method in ("peft-lora", "peft-dora", "peft-vera"):
        config = (
            PeftVeraConfig(r=rank, target_modules="all-linear", save_projection=False)
            if method == "peft-vera"
            else LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", use_dora=method == "peft-dora")
        )
        model = get_peft_model(model, config)
        if fp32_trainables:
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
    elif method in ("qvera", "qvera-dvora"):
        attach_vera(model, VeraConfig(rank=rank, method="dvora" if method == "qvera-dvora" else "vera"))
    else:
        raise ValueError(
            f"unknown variant {variant!r}; use floor, peft-lora:R, peft-dora:R, peft-vera:R, qvera:R or qvera-dvora:R"
        )
    return model, method, rank
