"""Where a training step's time goes, variant against variant: kernel time by kind and host time.

The GPU benchmark gives each variant's tokens/s; this says why two differ. Each variant is built
alone on the random base (as `experiments/bench.py` builds it), warmed up, timed over a few steps, and
one step is profiled: the device's kernel time summed by kind (matrix products, NF4 dequantizing,
attention, the optimizer, the rest) and the host time of the step. On a CPU there are no kernels;
the operators' own host time stands in, which is enough to test that the script runs.

    python experiments/train_step_profile.py --variants qvera:512 peft-lora:64 --json profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root

from experiments.train_step_bench import Stepper, build, median_step_seconds, release  # noqa: E402

KINDS = (  # first match wins; kernel names as CUDA libraries and bitsandbytes spell them
    ("dequantize", ("dequantize", "kdequant")),
    ("attention", ("flash", "fmha", "attention", "attn", "mha", "cudnn")),
    ("optimizer", ("optimizer", "adam", "8bit")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "mm")),
)


def kind_of(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, marks in KINDS if any(mark in lower for mark in marks)), "other")


def profile_step(step: Stepper, batch: int, seq: int, top: int) -> dict:
    cuda = step.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profile:
        start = time.perf_counter()
        step(batch, seq)
        wall = time.perf_counter() - start
    wanted = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    by_kind, by_name, count = defaultdict(float), defaultdict(float), 0
    for event in profile.events():
        # Skip ranges such as "Optimizer.step#...": on the GPU timeline they span the kernels
        # they hold, which would count twice.
        if event.device_type != wanted or event.is_user_annotation:
            continue
        micros = (
            event.time_range.elapsed_us() if cuda else event.self_cpu_time_total
        )  # a kernel's run, an operator's own
        by_kind[kind_of(event.name)] += micros / 1e3
        by_name[event.name[:90]] += micros / 1e3
        count += 1
    return dict(
        profiled_step_ms=round(wall * 1e3, 2),
        kernel_ms=round(sum(by_kind.values()), 2),
        kernels=count,
        by_kind_ms={kind: round(ms, 2) for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        top_ms={name: round(ms, 2) for name, ms in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]},
    )


def measure(shape: str, variant: str, batch: int, seq: int, repeats: int, compute_dtype: str, device: str, top: int):
    model, method, rank = build(shape, variant, compute_dtype, device)
    step = Stepper(model, method, device)
    step_s = median_step_seconds(step, batch, seq, repeats, warmups=2)
    row = dict(variant=variant, step_ms=round(step_s * 1e3, 2), **profile_step(step, batch, seq, top))
    del model, step
    release()
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama2-7b", help="random base shape (default: %(default)s)")
    parser.add_argument("--variants", nargs="+", default=["qvera:512", "peft-lora:64", "peft-vera:512"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps before the profiled one")
    parser.add_argument("--compute-dtype", default="auto")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per variant")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    rows = []
    for variant in args.variants:
        rows.append(
            measure(args.shape, variant, args.batch, args.seq, args.repeats, args.compute_dtype, device, args.top)
        )
        row = rows[-1]
        print(
            f"{variant}: {row['step_ms']} ms a step; profiled step {row['profiled_step_ms']} ms, "
            f"{row['kernel_ms']} ms of {'kernels' if device == 'cuda' else 'operators'} ({row['kernels']})",
            flush=True,
        )
        for kind, ms in row["by_kind_ms"].items():
            print(f"  {kind:11} {ms:9.2f} ms")
        for kernel, ms in row["top_ms"].items():
            print(f"    {ms:9.2f} ms  {kernel}")
        if args.json:
            report = dict(device=name, torch=torch.__version__, batch=args.batch, seq=args.seq, rows=rows)
            args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{name}, torch {torch.__version__}, {args.shape} at {args.batch} x {args.seq}", file=sys.stderr)


if __name__ == "__main__":
    main()
