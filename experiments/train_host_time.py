"""Host time of a training step, where a GPU spends most of it: issuing small operations.

On an H200 a qvera r=512 step of Llama-2-7B at 2,048 tokens took 723 ms, of which its kernels
ran 278 ms (BENCHMARKS.md): the rest is the host's Python, dispatch and launch work, about
13,300 kernels. On a CPU, with a model so narrow that the arithmetic is negligible, that same
work is what a step costs, so this measures it without a GPU: `random:deep-narrow` (Llama-2-7B's
32 layers at hidden size 64, NF4), built and stepped as the GPU benchmark does (gradient
checkpointing, bf16 autocast, TRL's fused LM head, one optimizer step), 32 tokens a step.
On a GPU (`--device cuda`) the same run times the launches themselves, which checks the proxy.

Per variant: the median host time of a step (every model resident, one step of each in turn)
and the number of operators the step dispatches, views left out. The count is exact and
repeatable; each one is a kernel launch on a GPU. Both minus the floor's are the adapter's own.
bf16 always, as on a GPU, so the casts a GPU makes are counted: on a CPU without native bf16
the times come out slow, the counts the same.
To compare two versions of qvera, run this file with each on PYTHONPATH, alternating:

    PYTHONPATH=path/to/qvera python experiments/train_host_time.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # as a script: the repository root, after PYTHONPATH

from experiments.profiling import OperatorCount  # noqa: E402
from experiments.train_step_bench import Stepper, build  # noqa: E402

VARIANTS = ["floor", "qvera:64", "peft-lora:16", "peft-vera:64"]


def operators_per_step(step: Stepper, seq: int) -> Counter[str]:
    with OperatorCount() as count:
        step(1, seq)
    return count.counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--seq", type=int, default=32, help="tokens a step (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=15, help="timed steps of each variant, in turn")
    parser.add_argument("--top", type=int, default=0, help="also list each variant's most frequent operators")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steppers, operators = {}, {}
    for variant in args.variants:
        model, method, _ = build("deep-narrow", variant, "bfloat16", args.device, alone=False)
        steppers[variant] = Stepper(model, method, args.device)
        steppers[variant](1, args.seq)  # warm-up: optimizer state made
        operators[variant] = operators_per_step(steppers[variant], args.seq)
    times: dict[str, list[float]] = {variant: [] for variant in args.variants}
    for round_ in range(args.rounds):
        shift = round_ % len(args.variants)
        for variant in args.variants[shift:] + args.variants[:shift]:
            start = time.perf_counter()
            steppers[variant](1, args.seq)
            times[variant].append(time.perf_counter() - start)
    if args.device == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        cpu = (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        machine = f"{next(cpu, '?')}, 1 thread"
    rows = [
        dict(variant=v, step_ms=round(statistics.median(times[v]) * 1e3, 2), operators=sum(operators[v].values()))
        for v in args.variants
    ]
    print(f"{machine}, torch {torch.__version__}, random:deep-narrow, 1 x {args.seq} tokens", end="")
    print(f", medians of {args.rounds}")
    floor = rows[0] if rows[0]["variant"] == "floor" else None
    header = f"  {'variant':14} {'ms a step':>10} {'operators':>10}"
    print(header + ("  above the floor: ms, operators" if floor else ""))
    for row in rows:
        line = f"  {row['variant']:14} {row['step_ms']:10.1f} {row['operators']:10d}"
        if floor and row is not floor:
            line += f"  {row['step_ms'] - floor['step_ms']:+8.1f} {row['operators'] - floor['operators']:+8d}"
        print(line)
        if args.top:
            print("    " + ", ".join(f"{name} {n}" for name, n in operators[row["variant"]].most_common(args.top)))
    if args.json:
        report = dict(machine=machine, torch=torch.__version__, seq=args.seq, rows=rows)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
