"""Decode benchmark for many-adapter serving.

Three ways to answer P prompts, measured side by side in this one process on the same base,
prompts and adapters (random vectors; speed does not depend on their values):

- mixed:  one batch, every row with its own adapter (AdapterBank.mixed_batch);
- single: one batch, all rows with one adapter (the plain VeRA forward);
- loop:   one adapter at a time, each running the prompts that use it (here one each).

With `--server`, the server's own path instead: its continuous batcher (no HTTP) answers the
P prompts, each with its own adapter, in the default mode and with `batch_invariant`, the two
alternating. The prefill budget holds every prompt, so each decode step runs the full mixed
batch; decode tokens/s counts those steps' tokens over their forward time.

Every row decodes exactly `--new-tokens` tokens (no end token stops it). Decode tokens/s
counts the tokens after the first, over the time after the prefill; `--repeats` runs the
three in turn (mixed and single swap places every other repeat) and keeps each one's best,
the least disturbed by other load. Each run lengthens every prompt by one more token (its
first, repeated), so no run meets shapes an earlier one saw: live traffic does not either,
and a kernel cache keyed on shapes (cuDNN's attention plans on Hopper GPUs) would otherwise
make a repeat look faster than serving is. `--compare-cudnn` also times the loop with
cuDNN's attention allowed, as torch picks it (see `qvera.core.attention_kernels`), and
`--profile FILE` writes torch's profile of one batch-1 decode, operations by host time. Also
printed: memory per resident adapter (vectors kept in the compute dtype, as the server
keeps them), and how many Llama-2-7B adapters at the same rank and dtype fit in 1 GB (10^9
bytes; sizes from a meta-device model).

    python experiments/bench_serving.py                    # SmolLM2-135M in NF4, 32 adapters at r=512
    python experiments/bench_serving.py --json serving.json
    python experiments/bench_serving.py --threads 1 --new-tokens 8 --loop-adapters 8   # a busy CPU
    python experiments/bench_serving.py --threads 1 --new-tokens 8 --server            # batch-invariant cost
    python experiments/bench_serving.py --model random:llama2-7b --loop-adapters 4 --compare-cudnn   # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from qvera import ModelConfig, VeraConfig, attach_vera, load_base, load_vector_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root

from experiments.profiling import llama2_7b_adapter_size
from qvera.adapters import save_adapter
from qvera.core.attach import vector_state
from qvera.core.attention_kernels import ALLOW_CUDNN_VARIABLE
from qvera.generation.bank import AdapterBank
from qvera.generation.decode import Sampling, chat_prompt, decode_steps
from qvera.serving.scheduler import Job, Scheduler
from qvera.serving.store import AdapterStore

PROMPTS = Path(__file__).resolve().parents[1] / "data" / "alpaca_en_demo.json"


class FreshShapes:
    """The prompts, one token longer at every call: each timed run meets shapes never run before."""

    def __init__(self, prompts: list[list[int]]):
        self.prompts, self.calls = prompts, 0

    def __call__(self) -> list[list[int]]:
        self.calls += 1
        return [prompt[:1] * self.calls + prompt for prompt in self.prompts]


def timed_decode(model, tokenizer, prompts, new_tokens, context) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for one batch."""
    sampling = [Sampling(temperature=0.0, top_p=1.0, max_new_tokens=new_tokens)] * len(prompts)
    start = time.perf_counter()  # a mixed batch's gathering of vectors counts in its prefill
    with context:
        steps = decode_steps(model, prompts, sampling, set(), tokenizer.pad_token_id)
        next(steps)
        prefilled = time.perf_counter()
        for _ in steps:
            pass
        return prefilled - start, time.perf_counter() - prefilled


def served_decode(model, tokenizer, store, prompts, names, new_tokens, batch_invariant) -> tuple[float, int]:
    """(decode forward seconds, decode tokens) of the server's continuous batcher answering all
    prompts at once, prompt i with adapter names[i]."""
    scheduler = Scheduler(
        model,
        tokenizer,
        store,
        max_batch_size=len(prompts),
        prefill_tokens=sum(len(p) for p in prompts),  # one prefill step: then every decode step is the full batch
        batch_invariant=batch_invariant,
    )
    scheduler.end_ids = set()  # every row makes exactly new_tokens tokens
    greedy = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=new_tokens)
    done = [threading.Event() for _ in prompts]
    for prompt, name, finished in zip(prompts, names, done):
        scheduler.submit(Job(prompt, name, greedy, lambda event, f=finished: event[0] != "text" and f.set()))
    scheduler.start()
    for finished in done:
        finished.wait()
    scheduler.close()
    stats = scheduler.stats
    if stats.failed:
        sys.exit("error: the scheduler failed a step; see above")
    return stats.decode_seconds_total, stats.tokens - len(prompts)  # each prompt's first token comes from its prefill


def decode_profile(model, tokenizer, prompt, new_tokens) -> str:
    """Torch's profiler over one batch-1 decode (after a warm-up on the same shapes): the
    operations by their own host time, which is what bounds a GPU at batch 1."""
    timed_decode(model, tokenizer, [prompt], new_tokens, nullcontext())
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        _, decode = timed_decode(model, tokenizer, [prompt], new_tokens, nullcontext())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    header = (
        f"one batch-1 decode on {device}: prompt of {len(prompt)} tokens, {new_tokens} new; under the "
        f"profiler {decode / (new_tokens - 1) * 1e3:.1f} ms a decode step\n"
    )
    return header + profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=40) + "\n"


def bench_server(model, tokenizer, bank, names, prompts, args) -> None:
    """Default against batch-invariant mode on the server's batcher, alternating, best of repeats."""
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            load_vector_state(model, bank.adapters[name])
            save_adapter(model, Path(folder) / name)
        store = AdapterStore(model, folder, max_resident=len(names))
        best: dict[str, float] = {}
        fresh = FreshShapes(prompts)
        for repeat in range(args.repeats):
            modes = (False, True) if repeat % 2 == 0 else (True, False)  # neither always goes first
            for invariant in modes:
                seconds, tokens = served_decode(model, tokenizer, store, fresh(), names, args.new_tokens, invariant)
                label = "batch_invariant" if invariant else "default"
                best[label] = max(best.get(label, 0.0), tokens / seconds)
            print(f"repeat {repeat + 1}/{args.repeats}: {best}", file=sys.stderr, flush=True)
    ratio = best["batch_invariant"] / best["default"]
    print(
        f"{args.model} ({args.quantization}), rank {args.rank}, {len(prompts)} prompts with {len(names)} adapters, "
        f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads; the server's batcher, mixed-batch decode:"
    )
    for label, speed in best.items():
        print(f"  {label:15} {speed:8.1f} decode tokens/s")
    print(f"  batch_invariant / default = {ratio:.3f}")
    if args.json:
        results = {"decode_tokens_per_s": best, "batch_invariant_over_default": ratio, "setting": vars(args)}
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=ModelConfig().name)
    parser.add_argument("--quantization", default=ModelConfig().quantization, choices=["nf4", "int8", "bf16", "fp32"])
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--adapters", type=int, default=32, help="distinct adapters, one per prompt")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--loop-adapters",
        type=int,
        default=None,
        help="time the loop on the first N adapters only (its rate does not depend on N)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--server", action="store_true", help="time the server's batcher, default against batch-invariant mode"
    )
    parser.add_argument(
        "--compare-cudnn", action="store_true", help="also time the loop with cuDNN attention allowed (GPU)"
    )
    parser.add_argument("--profile", help="write where one batch-1 decode spends its time (torch's profiler) here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_base(ModelConfig(name=args.model, quantization=args.quantization))
    attach_vera(model, VeraConfig(rank=args.rank))
    bank = AdapterBank(model, dtype=model.dtype)  # as the server keeps them: in the compute dtype
    generator = torch.Generator().manual_seed(0)
    names = [f"adapter-{i}" for i in range(args.adapters)]
    for name in names:
        bank.add(name, {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in vector_state(model).items()})
    rows = json.loads(PROMPTS.read_text())[: args.adapters]
    prompts = [chat_prompt(tokenizer, [{"role": "user", "content": r["instruction"]}]) for r in rows]

    if args.server:
        bench_server(model, tokenizer, bank, names, prompts, args)
        return

    loop_count = min(args.loop_adapters or len(prompts), len(prompts))
    best: dict[str, tuple[float, float]] = {}

    def keep(label, prefill, decode):
        if label not in best or decode < best[label][1]:
            best[label] = (prefill, decode)

    fresh = FreshShapes(prompts)

    def mixed():
        keep("mixed", *timed_decode(model, tokenizer, fresh(), args.new_tokens, bank.mixed_batch(names)))

    def single():
        bank.activate(names[0])
        keep("single", *timed_decode(model, tokenizer, fresh(), args.new_tokens, nullcontext()))

    def loop(label="loop"):
        prefill = decode = 0.0
        for name, prompt in list(zip(names, fresh()))[:loop_count]:
            bank.activate(name)
            p, d = timed_decode(model, tokenizer, [prompt], args.new_tokens, nullcontext())
            prefill, decode = prefill + p, decode + d
        # Scaled to all prompts, so the rows answer the same work.
        keep(label, prefill * len(prompts) / loop_count, decode * len(prompts) / loop_count)

    for repeat in range(args.repeats):
        for run in (mixed, single) if repeat % 2 == 0 else (single, mixed):  # neither always goes first
            run()
        loop()
        if args.compare_cudnn:
            os.environ[ALLOW_CUDNN_VARIABLE] = "1"
            try:
                loop("loop_cudnn")
            finally:
                del os.environ[ALLOW_CUDNN_VARIABLE]
        print(
            f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} decode {v[1]:.1f} s" for k, v in best.items()),
            file=sys.stderr,
            flush=True,
        )

    decoded = len(prompts) * (args.new_tokens - 1)
    speed = {label: decoded / decode for label, (_, decode) in best.items()}
    per_adapter = bank.bytes_per_adapter()
    llama = llama2_7b_adapter_size(args.rank)
    llama_bytes = llama["parameters"] * bank.dtype.itemsize
    results = {
        "setting": {
            "model": args.model,
            "quantization": args.quantization,
            "rank": args.rank,
            "prompts": len(prompts),
            "adapters": args.adapters,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "resident_dtype": str(bank.dtype).removeprefix("torch."),
            "loop_adapters_timed": loop_count,
            "threads": torch.get_num_threads(),
            "device": str(bank.device),
        },
        "decode_tokens_per_s": speed,
        "seconds": {label: {"prefill": p, "decode": d} for label, (p, d) in best.items()},
        "mixed_over_single": speed["mixed"] / speed["single"],
        "mixed_over_loop": speed["mixed"] / speed["loop"],
        **({"loop_over_loop_cudnn": speed["loop"] / speed["loop_cudnn"]} if args.compare_cudnn else {}),
        "bytes_per_resident_adapter": per_adapter,
        "llama2_7b": {"rank": args.rank, "bytes_per_adapter": llama_bytes, "adapters_per_GB": 10**9 // llama_bytes},
    }
    s = results["setting"]
    print(
        f"{s['model']} ({s['quantization']}), rank {s['rank']}, {s['prompts']} prompts, {s['new_tokens']} new tokens, "
        f"{s['threads']} threads on {s['device']}"
    )
    for label, text in (
        ("mixed", f"{args.adapters} distinct adapters, one batch"),
        ("single", "one adapter, one batch"),
        ("loop", f"one adapter at a time ({loop_count} timed, scaled to {len(prompts)})"),
        ("loop_cudnn", "the loop again, cuDNN attention allowed (torch's own order)"),
    ):
        if label not in best:
            continue
        p, d = best[label]
        print(f"  {label:10} {speed[label]:8.1f} decode tokens/s  (prefill {p:.2f} s, decode {d:.2f} s)  {text}")
    print(f"  mixed / single = {results['mixed_over_single']:.3f}   mixed / loop = {results['mixed_over_loop']:.2f}")
    if args.compare_cudnn:
        print(f"  loop without / with cuDNN attention = {results['loop_over_loop_cudnn']:.3f}")
    print(f"  memory per resident adapter: {per_adapter:,} bytes ({s['resident_dtype']} vectors)")
    print(
        f"  Llama-2-7B, r={args.rank}: {llama_bytes:,} bytes per adapter, "
        f"{results['llama2_7b']['adapters_per_GB']} adapters per GB"
    )
    if args.profile:
        bank.activate(names[0])
        Path(args.profile).write_text(decode_profile(model, tokenizer, fresh()[0], args.new_tokens))
    if args.json:
        staging = Path(f"{args.json}.tmp")
        staging.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(staging, args.json)


if __name__ == "__main__":
    main()
