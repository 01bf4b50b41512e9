"""What a new attention shape costs: SDPA with torch's own kernel order against SDPA without cuDNN.

cuDNN's attention (tried first by torch 2.9+ on Hopper and Blackwell) builds a plan for each new
shape and keeps it; flash and memory-efficient attention keep nothing per shape. Decoding meets a
new key length every step, and an SFT run a new sequence length most steps. This times, at
Llama-2-7B's attention (32 heads of 128, bf16 on a GPU), calls on shapes never seen before
against the same shapes again:

- decode: one query over 1,000 + i keys, i = 0, 1, 2, ... (forward only);
- train: a causal sequence of 500 + i tokens, forward and backward.

Each setting gets `--shapes` new shapes, then the same shapes once more (warm); the time per call
of each pass, and which kernel ran (from the profiler, on a GPU).

    python experiments/attention_new_shapes.py --json attention.json
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from qvera.core.attention_kernels import without_cudnn_attention


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_call(kind: str, i: int, heads: int, dim: int, device, dtype):
    if kind == "decode":
        query = torch.randn(1, heads, 1, dim, device=device, dtype=dtype)
        keys = torch.randn(1, heads, 1000 + i, dim, device=device, dtype=dtype)
        return lambda: F.scaled_dot_product_attention(query, keys, keys)
    tokens = torch.randn(1, heads, 500 + i, dim, device=device, dtype=dtype, requires_grad=True)

    def train():
        F.scaled_dot_product_attention(tokens, tokens, tokens, is_causal=True).sum().backward()

    return train


def seconds_per_call(calls, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for call in calls:
        call()
    synchronize(device)
    return (time.perf_counter() - start) / len(calls)


def kernel_names(call, device) -> list[str]:
    if device.type != "cuda":
        return []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        call()
        synchronize(device)
    names = {event.name for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA}
    return sorted(name[:60] for name in names if any(k in name.lower() for k in ("attn", "attention", "sdpa", "fmha")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=int, default=24, help="new shapes per setting")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    rows = []
    for kind in ("decode", "train"):  # first use of the device and its libraries, outside the timing
        for context in (nullcontext, without_cudnn_attention):
            with context():
                make_call(kind, 10_000, args.heads, args.head_dim, device, dtype)()
    offset = 0
    for kind in ("decode", "train"):
        for order, context in (("torch's order", nullcontext), ("without cuDNN", without_cudnn_attention)):
            # Shapes no earlier setting used, so neither order inherits the other's plans.
            calls = [make_call(kind, offset + i, args.heads, args.head_dim, device, dtype) for i in range(args.shapes)]
            offset += args.shapes
            with context():
                new = seconds_per_call(calls, device)
                warm = seconds_per_call(calls, device)
                kernels = kernel_names(calls[0], device)
            rows.append({"kind": kind, "order": order, "new_ms": new * 1e3, "warm_ms": warm * 1e3, "kernels": kernels})
    print(f"{name}, torch {torch.__version__}, {args.heads} heads of {args.head_dim}, {dtype}, {args.shapes} shapes")
    for row in rows:
        print(
            f"  {row['kind']:6} {row['order']:14} new shapes {row['new_ms']:8.3f} ms a call, "
            f"same shapes again {row['warm_ms']:8.3f} ms  {', '.join(row['kernels'])}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
