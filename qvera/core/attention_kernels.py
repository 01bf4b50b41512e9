"""Which SDPA kernels qvera's generation and training may use: any but cuDNN's.

Since torch 2.9, on Hopper and Blackwell GPUs (with cuDNN newer than 9.15) SDPA tries cuDNN's
attention first. cuDNN builds an execution plan for every new combination of batch, query
length, key length and strides, and keeps each one for the life of the process (torch's
`aten/src/ATen/native/cudnn/MHA.cpp`). Generation brings a new key length at every decode step,
and row attention (`qvera.generation.invariance`) makes one call per row; an SFT run brings a new
sequence length most steps. Each new shape then pays for a plan build, many times the cost of
the call itself (BENCHMARKS.md). Flash attention, then memory-efficient attention, then the
math kernel, keep no state per shape.

The switch is process-wide in torch, so it is counted: it goes off when the first generation or
training starts and comes back when the last one ends, whatever threads they run on. Setting
QVERA_CUDNN_ATTENTION=1 leaves torch's own order (for a benchmark, or fixed shapes).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import torch

ALLOW_CUDNN_VARIABLE = "QVERA_CUDNN_ATTENTION"

_lock = threading.Lock()
_users = 0
_before: bool | None = None


def cudnn_attention_allowed() -> bool:
    """Whether the user asked to keep cuDNN attention (QVERA_CUDNN_ATTENTION=1)."""
    return os.environ.get(ALLOW_CUDNN_VARIABLE, "") == "1"


@contextmanager
def without_cudnn_attention():
    """Within this context (on every thread) SDPA does not pick cuDNN's kernels."""
    global _users, _before
    if cudnn_attention_allowed():
        yield
        return
    with _lock:
        if _users == 0:
            _before = torch.backends.cuda.cudnn_sdp_enabled()
            torch.backends.cuda.enable_cudnn_sdp(False)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                torch.backends.cuda.enable_cudnn_sdp(_before)
