"""VeRA and DVoRA against LoRA and DoRA on SmolLM2-135M-Instruct in NF4: one run per call,
the whole plan (learning-rate grid, then three seeds per table row), or the report.

python scripts/quality_study.py run --method dvora --rank 512 --lr 3e-2 --lr-scale-m 0.1 --seed 1
python scripts/quality_study.py sweep runs/quality --records docs/quality_results.json
python scripts/quality_study.py forgetting runs/quality --records docs/quality_results.json
python scripts/quality_study.py report runs/quality
python scripts/quality_study.py curves runs/long --plot docs/quality_curves.png
"""

import argparse
import json
import sys
from pathlib import Path

from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ lives beside scripts/

from experiments.quality_study import (
    FORGETTING_METHODS,
    METHODS,
    StudyRun,
    collect,
    curve_rows,
    curve_table,
    forgetting,
    forgetting_table,
    gains,
    headline_table,
    markdown_table,
    measure_forgetting,
    plot_curves,
    run_one,
    summarize,
    sweep,
    write_report,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train one adapter (or none: --method base) and evaluate it")
    run.add_argument("--method", choices=METHODS, required=True)
    run.add_argument("--rank", type=int, default=0)
    run.add_argument("--lr", type=float, default=0.0)
    run.add_argument("--d-initial", type=float, default=0.1, help="VeRA's initial value of d")
    for vector in "dbm":
        run.add_argument(f"--lr-scale-{vector}", type=float, default=1.0, help=f"{vector}'s lr as a multiple of --lr")
    run.add_argument("--train-rows", type=int, default=128, help="of the 900 training rows (900 for the full study)")
    run.add_argument("--epochs", type=int, default=1, help="passes over the training rows")
    run.add_argument("--curve-every", type=int, default=0, help="also score the held-out loss every N steps")
    run.add_argument("--max-length", type=int, default=256)
    run.add_argument("--seed", type=int, default=0, help="projections or LoRA's A, and the order of the rows")
    run.add_argument("--out", default="runs/quality")
    plan = sub.add_parser("sweep", help="run the study's whole plan, resuming where it stopped")
    plan.add_argument("out", nargs="?", default="runs/quality")
    plan.add_argument("--jobs", type=int, default=1, help="runs at a time")
    plan.add_argument("--threads", type=int, default=2, help="threads per run")
    plan.add_argument(
        "--records", help="a results file of earlier runs (docs/quality_results.json): those runs count as done"
    )
    forget = sub.add_parser(
        "forgetting", help="run the base and each method's best setting, 3 seeds, measuring general knowledge"
    )
    forget.add_argument("out", nargs="?", default="runs/quality")
    forget.add_argument("--records", help="a results file of earlier runs: where each method's best setting is read")
    forget.add_argument("--methods", nargs="+", choices=FORGETTING_METHODS, default=list(FORGETTING_METHODS))
    forget.add_argument("--threads", type=int, default=2, help="threads for each run (one run at a time)")
    report = sub.add_parser("report", help="collect the runs' results into docs/ (JSON and plot)")
    report.add_argument("runs", nargs="?", default="runs/quality")
    report.add_argument("--json", default="docs/quality_results.json")
    report.add_argument("--plot", default="docs/quality_loss_vs_params.png")
    report.add_argument("--forgetting-plot", default="docs/quality_forgetting.png")
    curves = sub.add_parser("curves", help="the held-out loss along runs made with --curve-every, as a table and plot")
    curves.add_argument("runs", nargs="?", default="runs/long")
    curves.add_argument("--records", default="docs/quality_results.json", help="where the base's loss is read")
    curves.add_argument("--plot", default="docs/quality_curves.png")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    if args.command == "run":
        spec = StudyRun(
            args.method,
            args.rank,
            args.lr,
            d_initial=args.d_initial,
            lr_scale_d=args.lr_scale_d,
            lr_scale_b=args.lr_scale_b,
            lr_scale_m=args.lr_scale_m,
            train_rows=args.train_rows,
            epochs=args.epochs,
            curve_every=args.curve_every,
            max_length=args.max_length,
            seed=args.seed,
        )
        result = run_one(spec, args.out)
        print(json.dumps({k: v for k, v in result.items() if k != "train_loss_log"}, indent=2))
    elif args.command == "sweep":
        sweep(args.out, args.jobs, args.threads, records=args.records)
    elif args.command == "forgetting":
        measure_forgetting(args.out, args.records, args.methods, args.threads)
    elif args.command == "curves":
        results = collect(args.runs, args.records)  # the runs, and the base's record
        base_loss = next(r for r in results if r["name"] == "base")["alpaca_heldout"]["loss"]
        rows = curve_rows(results, base_loss)
        plot_curves(rows, base_loss, args.plot)
        print(curve_table(rows))
        print(f"wrote {args.plot}")
    else:
        write_report(args.runs, args.json, args.plot, args.forgetting_plot)
        results = collect(args.runs, args.json)
        print(headline_table(results), markdown_table(results), forgetting_table(results), sep="\n\n")
        print(json.dumps(gains(summarize(results)), indent=2))
        print(json.dumps(forgetting(summarize(results)), indent=2))
        print(f"wrote {args.json}, {args.plot} and {args.forgetting_plot}")


if __name__ == "__main__":
    main()
