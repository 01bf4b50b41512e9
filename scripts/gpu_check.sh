#!/usr/bin/env bash
# The GPU check in one command, offline: the `cuda` tests, a short GPU benchmark at Llama-2-7B
# shapes (random weights, NF4 on the GPU) and a 20-step sft.py run on the same random model with
# paged 8-bit AdamW, a checkpoint every 10 steps, then a resume. About 8 minutes on one H100.
#
#     bash scripts/gpu_check.sh OUT_DIR
#
# Writes into OUT_DIR: cuda_tests.xml/.log, bench.json/.md, sft/ (+ sft.log, sft_resume.log),
# summary.json and summary.md. Exits non-zero when any stage failed; later stages still run.
set -euo pipefail
if [[ $# -ne 1 ]]; then
    echo "usage: bash scripts/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export QVERA_CACHE="$OUT/cache" MPLBACKEND=Agg
PYTHON=${PYTHON:-python3}
declare -A STATUS SECONDS_TAKEN

stage() {  # stage NAME LOG COMMAND...: run, time and record one stage without stopping the others
    local name=$1 log=$2 start
    shift 2
    start=$(date +%s)
    echo "== $name: $*" >&2
    if "$@" >"$log" 2>&1; then STATUS[$name]=0; else STATUS[$name]=$?; fi
    SECONDS_TAKEN[$name]=$(($(date +%s) - start))
    echo "== $name: exit ${STATUS[$name]} in ${SECONDS_TAKEN[$name]} s (log: $log)" >&2
    tail -n 5 "$log" >&2
}

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name())"

stage cuda_tests "$OUT/cuda_tests.log" \
    "$PYTHON" -m pytest -m cuda tests/cuda -q -rs -p no:cacheprovider --junitxml "$OUT/cuda_tests.xml"

stage bench "$OUT/bench.log" \
    "$PYTHON" scripts/bench.py --device cuda --shape llama2-7b --repeats 2 --max-context 8 \
    --json "$OUT/bench.json" --markdown "$OUT/bench.md"

SFT=("$PYTHON" scripts/sft.py --model random:llama2-7b --rank 512 --data data/alpaca_en_demo.json
    --max_examples 400 --max_length 512 --batch_size 1 --optimizer auto --gradient_checkpointing true
    --save_steps 10 --eval_steps 0 --logging_steps 5 --output_dir "$OUT/sft")
rm -rf "$OUT/sft"
stage sft "$OUT/sft.log" "${SFT[@]}" --max_steps 20
stage sft_resume "$OUT/sft_resume.log" "${SFT[@]}" --max_steps 24 --resume true

STAGES=""
for name in cuda_tests bench sft sft_resume; do
    STAGES+="$name ${STATUS[$name]} ${SECONDS_TAKEN[$name]};"
done
"$PYTHON" - "$OUT" "$STAGES" <<'PY'
"""summary.json and summary.md from the stages' exit codes, the junit file and the benchmark."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

out, stages = Path(sys.argv[1]), [s.split() for s in sys.argv[2].split(";") if s]
summary = {
    "device": torch.cuda.get_device_name(),
    "torch": torch.__version__,
    "stages": {name: {"exit": int(code), "seconds": int(secs)} for name, code, secs in stages},
}
junit = out / "cuda_tests.xml"
if junit.is_file():
    suite = ET.parse(junit).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    summary["cuda_tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
bench = out / "bench.json"
if bench.is_file():
    report = json.loads(bench.read_text())
    summary["bench"] = {k: v for k, v in report.items() if k not in ("rows", "contexts")}
    summary["bench"]["max_context"] = report.get("contexts")
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
lines = [f"# GPU check on {summary['device']} (torch {summary['torch']})", "", "| stage | exit | seconds |", "|---|---:|---:|"]
lines += [f"| {name} | {s['exit']} | {s['seconds']} |" for name, s in summary["stages"].items()]
if "cuda_tests" in summary:
    lines += ["", "cuda tests: " + ", ".join(f"{k} {v}" for k, v in summary["cuda_tests"].items())]
if (out / "bench.md").is_file():
    lines += ["", (out / "bench.md").read_text()]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY

for name in cuda_tests bench sft sft_resume; do
    [[ ${STATUS[$name]} -eq 0 ]] || exit 1
done
