"""Host time of a decode step, where a GPU spends it: launching small operations.

A GPU decoding at batch 1 (or a few dozen rows) waits on the Python and dispatch work of each
operation more than on the arithmetic. On a CPU, with dimensions so small that the arithmetic
is negligible, that same work is what a step costs, so this measures it without a GPU:

- row attention (`qvera.generation.invariance.row_attention_forward`) for one decode query per
  row over a 60-key cache with left padding, 1, 8 and 32 rows;
- one VeRA layer (64 x 64, r=64, bf16) at one token, gradients off, and its base linear alone;
- a decode step of a 32-layer Llama with hidden size 64 (about a 7B model's layer count):
  the bare base and with a qvera adapter at batch 1, a mixed batch of 32 rows (16 with an
  adapter, 16 on the base), through `decode_steps`. fp32 by default; `--dtype bfloat16` runs
  it as a GPU does, the fp32 vectors cast to the model's dtype.

Medians over alternating repeats, one thread. To compare two versions of qvera, run this file
with each on PYTHONPATH, alternating:

    PYTHONPATH=path/to/qvera python experiments/decode_host_time.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.masking_utils import sdpa_mask

from qvera.core.attach import attach_vera, vector_state
from qvera.core.config import VeraConfig
from qvera.core.vera import SharedProjections, VeraLinear
from qvera.generation.bank import AdapterBank
from qvera.generation.decode import Sampling, decode_steps
from qvera.generation.invariance import row_attention_forward


def microseconds(call, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def row_attention_inputs(rows: int, width: int = 60):
    real = torch.zeros(rows, width, dtype=torch.bool)
    for row in range(rows):
        real[row, width - 20 - row % 40 :] = True  # a different length every row
    key, value = (torch.randn(rows, 4, width, 16, dtype=torch.bfloat16) for _ in range(2))
    query = torch.randn(rows, 4, 1, 16, dtype=torch.bfloat16)
    mask = sdpa_mask(rows, 1, width, width - 1, attention_mask=real, allow_is_causal_skip=False)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 1, True
    return module, query, key, value, mask


def vera_layer():
    base = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    layer = VeraLinear(base, SharedProjections(64, 64, 64, seed=0), 0.1)
    with torch.no_grad():
        layer.lambda_b.fill_(0.01)
    return base, layer


def toy_llama(dtype: torch.dtype = torch.float32):
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=32,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype).eval()


def step_ms(model, rows: int, context=None, new_tokens: int = 24) -> float:
    """Milliseconds a decode step, after the prefill, prompts of different lengths."""
    prompts = [[3 + (i * 7 + j) % 200 for j in range(10 + 3 * i)] for i in range(rows)]
    sampling = [Sampling(temperature=0.0, top_p=1.0, max_new_tokens=new_tokens)] * rows
    with context or nullcontext():
        steps = decode_steps(model, prompts, sampling, {999}, 2)
        next(steps)
        start = time.perf_counter()
        count = sum(1 for _ in steps)
    return (time.perf_counter() - start) / count * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the toy Llama's dtype; in bfloat16 the fp32 vectors are cast as on a GPU (default: %(default)s)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results: dict[str, list[float]] = {}

    def record(label, value):
        results.setdefault(label, []).append(value)

    attention = {rows: row_attention_inputs(rows) for rows in (1, 8, 32)}
    base, layer = vera_layer()
    dtype = getattr(torch, args.dtype)
    model, adapted = toy_llama(dtype), toy_llama(dtype)
    attach_vera(adapted, VeraConfig(rank=64))
    bank = AdapterBank(adapted)
    bank.add("a", {name: value + 0.01 for name, value in vector_state(adapted).items()})
    token = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(args.repeats):
            for rows, inputs in attention.items():
                record(
                    f"row attention, {rows} rows (us a layer)",
                    microseconds(lambda inputs=inputs: row_attention_forward(*inputs), 200),
                )
            record("base linear, 1 token (us)", microseconds(lambda: base(token), 1000))
            record("VeRA layer, 1 token (us)", microseconds(lambda: layer(token.clone()), 1000))
            record("bare base, batch 1 (ms a step)", step_ms(model, 1))
            record("bare base, 32 rows (ms a step)", step_ms(model, 32))
            bank.activate("a")
            record("qvera adapter, batch 1 (ms a step)", step_ms(adapted, 1))
            record("qvera mixed, 32 rows (ms a step)", step_ms(adapted, 32, bank.mixed_batch(["a", None] * 16)))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{cpu}, torch {torch.__version__}, 1 thread, toy Llama in {args.dtype}, medians of {args.repeats}")
    for label, values in results.items():
        print(f"  {label:40} {statistics.median(values):9.1f}")


if __name__ == "__main__":
    main()
