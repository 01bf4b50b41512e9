"""Two training settings that are not the adapter's math, timed side by side: the optimizer and
the attention kernels.

- Optimizer: paged 8-bit AdamW keeps a large optimizer state small (QLoRA's reason for it), but
  steps each parameter tensor on its own; VeRA has hundreds of small vectors and a state of a few
  MB, where one fused AdamW launch over all of them may cost less.
- Attention: torch 2.9+ tries cuDNN's attention first on Hopper, and cuDNN builds a plan for each
  new sequence length; an SFT run meets a new length most steps.

Every variant is built once and kept resident; each round takes one step of every (variant,
setting) in turn, the order rotating, so a drift in clocks reaches all alike. `fixed` steps all
have `--seq` tokens; `varying` steps each get a length no step before had (`--short` tokens,
less one per step), as an SFT run's batches do.

    python experiments/train_step_options.py --json options.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root

from experiments.train_step_bench import OPTIMIZERS, Stepper, build, release  # noqa: E402

ATTENTION = {"torch": True, "no-cudnn": False}  # -> Stepper's cudnn_attention
DEFAULT_SETTINGS = {  # variant -> "optimizer/attention" settings timed for it
    "qvera:512": ["paged_adamw_8bit/torch", "paged_adamw_8bit/no-cudnn", "adamw_torch_fused/no-cudnn"],
    "peft-lora:64": ["paged_adamw_8bit/torch", "paged_adamw_8bit/no-cudnn"],
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument(
        "--setting",
        nargs=2,
        action="append",
        metavar=("VARIANT", "OPTIMIZER/ATTENTION"),
        help="repeatable; default: " + "; ".join(f"{v} {s}" for v, ss in DEFAULT_SETTINGS.items() for s in ss),
    )
    parser.add_argument("--seq", type=int, default=2048, help="tokens of a fixed step")
    parser.add_argument("--short", type=int, default=512, help="longest varying step")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--compute-dtype", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    settings = args.setting or [(v, s) for v, ss in DEFAULT_SETTINGS.items() for s in ss]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for variant, setting in settings:  # all checked before minutes go into building models
        optimizer, _, attention = setting.partition("/")
        if optimizer not in OPTIMIZERS or attention not in ATTENTION:
            parser.error(
                f"setting {setting!r} for {variant}: use OPTIMIZER/ATTENTION with an optimizer in "
                f"{sorted(OPTIMIZERS)} and an attention in {sorted(ATTENTION)}"
            )
    models, steppers = {}, {}
    for variant, setting in settings:
        optimizer, _, attention = setting.partition("/")
        if variant not in models:
            models[variant] = build(args.shape, variant, args.compute_dtype, device, alone=not models)
        model, method, _ = models[variant]
        steppers[variant, setting] = Stepper(model, method, device, optimizer, cudnn_attention=ATTENTION[attention])
    keys = list(steppers)
    lengths = itertools.count(args.short, -1)  # a length no step before had
    times = {(key, mode): [] for key in keys for mode in ("fixed", "varying")}
    for key in keys:  # warm-up: kernels chosen, optimizer state made, the fixed shape's plans built
        steppers[key](1, args.seq)
    for round_ in range(args.rounds):
        shift = round_ % len(keys)
        for key in keys[shift:] + keys[:shift]:
            for mode in ("fixed", "varying"):
                seq = args.seq if mode == "fixed" else next(lengths)
                start = time.perf_counter()
                steppers[key](1, seq)
                times[key, mode].append((time.perf_counter() - start, seq))
    rows = []
    for (variant, setting), mode in times:
        samples = times[(variant, setting), mode]
        seconds = statistics.median(s for s, _ in samples)
        tokens = statistics.mean(n for _, n in samples)
        rows.append(
            dict(
                variant=variant,
                setting=setting,
                mode=mode,
                ms=round(seconds * 1e3, 1),
                tokens_per_s=round(tokens / seconds, 1),
            )
        )
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {args.shape}: fixed 1 x {args.seq}, varying 1 x <= {args.short}")
    for row in rows:
        print(
            f"  {row['variant']:14} {row['setting']:28} {row['mode']:8} {row['ms']:9.1f} ms  "
            f"{row['tokens_per_s']:9.1f} tokens/s"
        )
    if args.json:
        args.json.write_text(json.dumps(dict(device=name, torch=torch.__version__, rows=rows), indent=1) + "\n")
    del models, steppers
    release()


if __name__ == "__main__":
    main()
