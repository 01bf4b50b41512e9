"""Which compute dtype the hardware runs well, decided once, from capabilities that tests inject.

bf16 is fast only where the hardware has it: CUDA GPUs from Ampere on, and CPUs with AMX or
AVX512-BF16. Elsewhere it is emulated, many times slower than fp32, so `auto` picks fp16 on
older GPUs (T4, V100, RTX 20xx; the trainer adds loss scaling and the
vectors stay fp32) and fp32 on other CPUs. An explicit dtype wins, except bf16 on a GPU that
cannot run it, which fails at start-up. fp16 on a CPU is allowed (it runs) but trains without
loss scaling: meant for inference only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

AUTO = "auto"
COMPUTE_DTYPES = (AUTO, "bfloat16", "float16", "float32")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names of native bf16 units


@dataclass(frozen=True)
class Capabilities:
    """What the device that will run the model can do."""

    device: str  # "cuda" or "cpu"
    cuda_bf16: bool = False
    gpu_name: str = ""
    cpu_flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def cpu_bf16_flags(self) -> list[str]:
        return [flag for flag in CPU_BF16_FLAGS if flag in self.cpu_flags]


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is absent, which reads as no bf16."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def detect(device: str | None = None) -> Capabilities:
    """Capabilities of `device` ("cuda" or "cpu"; default: CUDA when there is a GPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return Capabilities("cuda", cuda_bf16=bf16, gpu_name=torch.cuda.get_device_name())
    return Capabilities("cpu", cpu_flags=cpu_flags())


def resolve_compute_dtype(requested: str, caps: Capabilities) -> tuple[str, str]:
    """(dtype name, reason). Raises a one-line ValueError for a dtype the hardware cannot run."""
    if requested not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype {requested!r} is unknown; pass one of {', '.join(COMPUTE_DTYPES)}")
    if caps.device == "cuda":
        gpu = caps.gpu_name or "this CUDA GPU"
        if requested == "bfloat16" and not caps.cuda_bf16:
            raise ValueError(
                f"compute dtype bfloat16 is not supported on {gpu} (no bf16 units); "
                "pass --compute-dtype float16 (or auto, or float32)"
            )
        if requested != AUTO:
            return requested, f"requested, on {gpu}"
        if caps.cuda_bf16:
            return "bfloat16", f"{gpu} has bf16"
        return "float16", f"{gpu} has no bf16; fp16 with loss scaling, vectors in fp32"
    if requested != AUTO:
        return requested, "requested, on the CPU"
    if caps.cpu_bf16_flags:
        return "bfloat16", f"CPU has native bf16 ({', '.join(caps.cpu_bf16_flags)})"
    return "float32", "CPU has no native bf16 (no amx_bf16 or avx512_bf16): bf16 would be emulated, far slower"


_announced: set[tuple[str, str]] = set()


def announce(dtype: str, reason: str) -> None:
    """Print the choice and its reason on stderr, once per process for each choice."""
    if (dtype, reason) not in _announced:
        _announced.add((dtype, reason))
        print(f"qvera: compute dtype {dtype} ({reason})", file=sys.stderr, flush=True)


def compute_dtype(requested: str, device: str | None = None, *, verbose: bool = True) -> torch.dtype:
    """The torch dtype for `requested` on `device` (detected), announcing the choice once."""
    name, reason = resolve_compute_dtype(requested, detect(device))
    if verbose:
        announce(name, reason)
    return getattr(torch, name)
