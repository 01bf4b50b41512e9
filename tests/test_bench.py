"""scripts/bench.py end to end on a tiny 4-bit model: rows, ratios and JSON fields."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_writes_rows_with_ratios(tiny_llama_dir, tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        "scripts/bench.py",
        "--model",
        tiny_llama_dir,
        "--variants",
        "floor",
        "peft-vera:32",
        "qvera:32",
        "--reference-rank",
        "32",
        "--batch",
        "2",
        "--seq",
        "16",
        "--repeats",
        "1",
        "--json",
        str(out),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| qvera | 32 |" in result.stdout and "command: python scripts/bench.py --model" in result.stdout
    rows = {row["variant"]: row for row in json.loads(out.read_text())}
    for field in (
        "rank",
        "step_s",
        "ratio_to_floor",
        "ratio_to_peft_vera",
        "saved_bytes",
        "trainable",
        "adapter_bytes",
    ):
        assert field in rows["qvera"], field
    assert rows["floor"]["ratio_to_floor"] == 1.0 and rows["peft-vera"]["ratio_to_peft_vera"] == 1.0
    assert rows["qvera"]["trainable"] == rows["peft-vera"]["trainable"] > 0  # same vectors, same count
    assert rows["qvera"]["tflop"] > rows["floor"]["tflop"] > 0
    assert rows["qvera"]["adapter_bytes"] > 0 and rows["floor"]["adapter_bytes"] == 0


def test_bench_refuses_a_run_without_the_floor():
    result = subprocess.run(
        [sys.executable, "scripts/bench.py", "--variants", "qvera:8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "--variants must include 'floor'" in result.stderr
