"""VeRA vs LoRA on SmolLM2-135M-Instruct in NF4: one run per call, or the report of all runs.

python scripts/quality_study.py run --method vera --rank 512 --lr 1e-2
python scripts/quality_study.py report runs/quality
"""

import argparse
import json
import sys
from pathlib import Path

from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ lives beside scripts/

from experiments.quality_study import (
    StudyRun,
    collect,
    markdown_table,
    run_one,
    write_report,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train one adapter (or none: --method base) and evaluate it")
    run.add_argument("--method", choices=["base", "vera", "lora"], required=True)
    run.add_argument("--rank", type=int, default=0)
    run.add_argument("--lr", type=float, default=0.0)
    run.add_argument("--d-initial", type=float, default=0.1, help="VeRA's initial value of d")
    run.add_argument("--train-rows", type=int, default=128, help="of the 900 training rows (900 for the full study)")
    run.add_argument("--max-length", type=int, default=256)
    run.add_argument("--out", default="runs/quality")
    report = sub.add_parser("report", help="collect the runs' results into docs/ (JSON and plot)")
    report.add_argument("runs", nargs="?", default="runs/quality")
    report.add_argument("--json", default="docs/quality_results.json")
    report.add_argument("--plot", default="docs/quality_loss_vs_params.png")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    if args.command == "run":
        spec = StudyRun(args.method, args.rank, args.lr, args.d_initial, args.train_rows, args.max_length)
        result = run_one(spec, args.out)
        print(json.dumps({k: v for k, v in result.items() if k != "train_loss_log"}, indent=2))
    else:
        write_report(args.runs, args.json, args.plot)
        print(markdown_table(collect(args.runs)))
        print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
