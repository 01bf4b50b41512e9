"""Training-step benchmark: qvera VeRA against upstream peft (VeRA and LoRA) on a 4-bit base.

Every variant runs in this one process, one after another, on the same base, data and
settings, so the ratios are measured side by side. Per variant: median step time (forward,
backward, AdamW step) and its ratio to the frozen-base floor (forward + backward to the
inputs, no adapter) and to peft VeRA at the same rank as qvera's middle rank; bytes saved for
the backward (each storage once, and every save as a naive hook counts) and their excess over
the floor; floating-point work per step as PyTorch's flop counter sees it; trainable
parameters; adapter file bytes.

    python experiments/bench.py                      # SmolLM2-135M in NF4, batch 4 x 256, bf16 autocast
    python experiments/bench.py --json bench.json    # also write the rows as JSON
    python experiments/bench.py --meta llama2-7b     # work and saved bytes at Llama-2-7B shapes, no weights
    python experiments/bench.py --device cuda --shape llama2-7b --max-context 8 12 16 24   # one GPU

`--device cuda` builds a random-weight model of the `--shape` (Llama-2-7B: no download),
quantizes it to NF4 on the GPU and measures tokens/s and peak memory per variant at batch 1 x
2048 tokens (experiments/train_step_bench.py); `--max-context` adds the longest sequence that
trains under each memory cap in GB.

`--meta` builds the model on PyTorch's meta device (shapes only, nothing computed), so it
counts floating-point work and bytes saved for the backward of any size on any machine; it
has no timings. There the model is bf16 without autocast (the meta device has none).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

import qvera
from qvera.adapters.format import save_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root

from transformers import AutoModelForCausalLM, LlamaConfig

from experiments import train_step_bench
from experiments.profiling import attach_variant, count_flops, count_saved_tensors, median_seconds
from qvera.core.hardware import COMPUTE_DTYPES, compute_dtype
from qvera.core.random_base import SHAPES

VARIANTS = [
    "floor",
    "peft-lora:16",
    "peft-lora:64",
    "peft-dora:16",
    "peft-vera:512",
    "qvera:256",
    "qvera:512",
    "qvera:1024",
    "qvera-dvora:512",
]
GPU_VARIANTS = train_step_bench.VARIANTS


META_CONFIGS = {"llama2-7b": SHAPES["llama2-7b"]}  # the shape the random 7B base is built in


def meta_model(config):
    """The same architecture on the meta device: shapes only, for counting work and bytes."""
    if isinstance(config, str):
        config = LlamaConfig(**META_CONFIGS[config])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.requires_grad_(False)
    return model


def build(model_name: str, variant: str, meta=None):
    if meta is not None:
        model = meta_model(meta)
    else:
        model, _ = qvera.load_base(qvera.ModelConfig(name=model_name, quantization="nf4"), device_map="cpu")
    model.train()
    return attach_variant(model, variant, fp32_trainables=meta is None)


def adapter_bytes(model, method: str) -> int:
    if method == "floor":
        return 0
    with tempfile.TemporaryDirectory() as folder:
        if method.startswith("qvera"):
            save_adapter(model, folder)
        else:
            model.save_pretrained(folder)
        return sum(f.stat().st_size for f in Path(folder).iterdir() if f.suffix == ".safetensors")


def measure(model_name: str, variant: str, batch: int, seq: int, repeats: int, dtype: torch.dtype) -> dict:
    model, method, rank = build(model_name, variant)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3) if method != "floor" else None
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            return model(input_ids=ids, labels=ids).loss

    def step():
        forward().backward()
        if optimizer:
            optimizer.step()
            optimizer.zero_grad()

    with count_saved_tensors() as saved:
        loss = forward()
    loss.backward()
    if optimizer:
        optimizer.zero_grad()
    del loss
    step_s, times = median_seconds(step, repeats)
    # Work is counted on a meta-device twin: bitsandbytes' kernels are partly invisible to the
    # flop counter, which would undercount the 4-bit base's own matmuls.
    flops = measure_meta(model.config, variant, batch, seq)["tflop"]
    row = dict(
        variant=method,
        rank=rank,
        step_s=round(step_s, 3),
        times=[round(t, 3) for t in times],
        saved_bytes=saved.unique,
        saved_bytes_naive=saved.total,
        tflop=flops,
        trainable=sum(p.numel() for p in params) if optimizer else 0,
        adapter_bytes=adapter_bytes(model, method),
    )
    gc.collect()
    return row


def measure_meta(config, variant: str, batch: int, seq: int) -> dict:
    model, method, rank = build("", variant, meta=config)
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    with count_saved_tensors() as saved:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = dict(
        variant=method,
        rank=rank,
        step_s=None,
        tflop=round(count_flops(step) / 1e12, 6),
        saved_bytes=saved.unique,
        saved_bytes_naive=saved.total,
        trainable=trainable,
    )
    gc.collect()
    return row


def meta_markdown(rows: list[dict]) -> str:
    floor = next(r for r in rows if r["variant"] == "floor")
    peft_vera = next((r for r in rows if r["variant"] == "peft-vera"), None)
    gb = 2**30
    lines = [
        "| variant | rank | TFLOP/step | adapter TFLOP | adapter work x peft VeRA's | saved GB | excess GB "
        "| excess GB (naive) | trainable |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        extra = r["tflop"] - floor["tflop"]
        vs = f"{extra / (peft_vera['tflop'] - floor['tflop']):.2f}" if peft_vera and r["variant"] != "floor" else "-"
        lines.append(
            f"| {r['variant']} | {r['rank'] or '-'} | {r['tflop']:.2f} "
            f"| {extra:.2f} | {vs} | {r['saved_bytes'] / gb:.2f} "
            f"| {(r['saved_bytes'] - floor['saved_bytes']) / gb:+.2f} "
            f"| {(r['saved_bytes_naive'] - floor['saved_bytes_naive']) / gb:+.2f} | {r['trainable']:,} |"
        )
    return "\n".join(lines)


def add_ratios(rows: list[dict], reference_rank: int) -> None:
    floor = next(r for r in rows if r["variant"] == "floor")
    peft_vera = next((r for r in rows if r["variant"] == "peft-vera" and r["rank"] == reference_rank), None)
    rate = floor["tflop"] / floor["step_s"]  # what this machine sustains on the base's own work
    for row in rows:
        row["ratio_to_floor"] = round(row["step_s"] / floor["step_s"], 3)
        row["ratio_to_peft_vera"] = round(row["step_s"] / peft_vera["step_s"], 3) if peft_vera else None
        row["saved_excess_bytes"] = row["saved_bytes"] - floor["saved_bytes"]
        row["saved_excess_naive"] = row["saved_bytes_naive"] - floor["saved_bytes_naive"]
        row["step_s_at_floor_rate"] = round(row["tflop"] / rate, 3)


def markdown(rows: list[dict]) -> str:
    mb = 2**20
    lines = [
        "| variant | rank | step s | x floor | x peft VeRA | TFLOP/step | TFLOP/s | s at floor's TFLOP/s "
        "| saved MB | excess MB | excess MB (naive) | trainable | adapter bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs_peft = f"{r['ratio_to_peft_vera']:.2f}" if r["ratio_to_peft_vera"] is not None else "-"
        lines.append(
            f"| {r['variant']} | {r['rank'] or '-'} | {r['step_s']:.2f} | {r['ratio_to_floor']:.2f} | {vs_peft} "
            f"| {r['tflop']:.2f} | {r['tflop'] / r['step_s']:.2f} | "
            f"{r['step_s_at_floor_rate']:.2f} | {r['saved_bytes'] / mb:.0f} "
            f"| {r['saved_excess_bytes'] / mb:+.0f} | {r['saved_excess_naive'] / mb:+.0f} "
            f"| {r['trainable']:,} | {r['adapter_bytes']:,} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="base model (default: %(default)s)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default: %(default)s)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b", help="random base for --device cuda")
    parser.add_argument(
        "--compute-dtype", choices=COMPUTE_DTYPES, default="auto", help="autocast dtype (default: %(default)s)"
    )
    parser.add_argument("--max-context", type=float, nargs="*", default=[], metavar="GB", help="memory caps (cuda)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this path")
    parser.add_argument("--variants", nargs="+", help=f"method:rank list (cpu: {VARIANTS}; cuda: {GPU_VARIANTS})")
    parser.add_argument("--batch", type=int, help="sequences per step (cpu: 4; cuda: 1)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (cpu: 256; cuda: 2048)")
    parser.add_argument("--repeats", type=int, help="timed steps per variant (cpu: 4; cuda: 3)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="cuda: then time every variant again, all resident, one step each in turn, this many rounds "
        "(the ratios use these; 0: off; default: %(default)s)",
    )
    parser.add_argument(
        "--reference-rank", type=int, default=512, help="peft VeRA rank for ratios (default: %(default)s)"
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this path")
    parser.add_argument("--meta", choices=sorted(META_CONFIGS), help="count work and bytes at these shapes, no timing")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    for name, on_cpu, on_cuda in (
        ("variants", VARIANTS, GPU_VARIANTS),
        ("batch", 4, 1),
        ("seq", 256, 2048),
        ("repeats", 4, 3),
    ):
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to PyTorch")
    if args.rounds < 0:
        parser.error(f"--rounds must be 0 (off) or more, got {args.rounds}")
    if args.max_context and not cuda:
        parser.error("--max-context needs --device cuda (it caps GPU memory)")
    if "floor" not in args.variants:
        parser.error("--variants must include 'floor': every ratio is taken against it")

    command = f"python experiments/bench.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    torch.manual_seed(0)
    rows = []
    if cuda:
        return bench_cuda(args, command)
    if args.meta:
        rows = [measure_meta(args.meta, variant, args.batch, args.seq) for variant in args.variants]
        print(f"command: {command}")
        print(meta_markdown(rows))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
        return
    dtype = compute_dtype(args.compute_dtype, "cpu")
    for variant in args.variants:
        rows.append(measure(args.model, variant, args.batch, args.seq, args.repeats, dtype))
        print(f"{variant}: {rows[-1]['step_s']:.2f} s/step", file=sys.stderr, flush=True)
    add_ratios(rows, args.reference_rank)
    print(f"command: {command}")
    print(f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(f"command: `{command}`\n\n{markdown(rows)}\n")


def bench_cuda(args, command: str) -> None:
    """The GPU benchmark, one process: every variant alone on the random base (memory and speed),
    then all of them resident and stepped in turn (speed, for the ratios), then the context
    search. The JSON and markdown are rewritten after every row, so a run stopped by a time
    limit keeps what it measured."""
    rows, contexts = [], []
    device = torch.cuda.get_device_name()

    def write() -> str:
        summary = train_step_bench.ratios(rows)
        table = train_step_bench.markdown(rows, contexts, summary)
        report = dict(command=command, device=device, torch=torch.__version__, rows=rows, contexts=contexts, **summary)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        if args.markdown:
            args.markdown.write_text(
                f"command: `{command}`\n\ndevice: {device}, torch {torch.__version__}\n\n{table}\n"
            )
        return table

    for variant in args.variants:
        rows.append(
            train_step_bench.measure(
                args.shape, variant, args.batch, args.seq, args.repeats, args.compute_dtype, "cuda"
            )
        )
        print(f"{variant}: {rows[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
        write()
    if args.rounds:
        try:
            speeds = train_step_bench.interleaved_speeds(
                args.shape, args.variants, args.batch, args.seq, args.rounds, args.compute_dtype, "cuda"
            )
        except torch.OutOfMemoryError:
            speeds = None
        if speeds is None:
            train_step_bench.release()  # out here: inside the except clause its traceback still held the models
            message = (
                "the variants do not fit on this GPU all at once; the ratios use the timings taken one after another"
            )
            print(f"{message} (--rounds 0 skips the attempt)", file=sys.stderr, flush=True)
        else:
            for row, variant in zip(rows, args.variants):
                row["interleaved_tokens_per_s"] = speeds[variant]
            print(f"taken in turn: {speeds}", file=sys.stderr, flush=True)
            write()
    for variant in train_step_bench.CONTEXT_VARIANTS if args.max_context else []:
        contexts.append(train_step_bench.max_context(args.shape, variant, args.max_context, args.compute_dtype))
        write()
    print(f"command: {command}\ndevice: {device}, torch {torch.__version__}\n{write()}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"bench.py: {err}")
