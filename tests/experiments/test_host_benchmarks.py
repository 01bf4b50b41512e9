"""The two host-side benchmarks run and report every setting they promise (timings are not
asserted: those live in BENCHMARKS.md)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_attention_new_shapes_times_both_kernel_orders_for_decode_and_training(tmp_path):
    out = run(
        "attention_new_shapes.py",
        "--shapes",
        "2",
        "--heads",
        "2",
        "--head-dim",
        "8",
        "--json",
        str(tmp_path / "a.json"),
    )
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    settings = [(row["kind"], row["order"]) for row in rows]
    assert settings == [(k, o) for k in ("decode", "train") for o in ("torch's order", "without cuDNN")]
    assert all(row["new_ms"] > 0 and row["warm_ms"] > 0 for row in rows)
    assert out.count("new shapes") == 4


def test_decode_host_time_reports_every_measure():
    out = run("decode_host_time.py", "--repeats", "1")
    values = {line.rsplit(None, 1)[0].strip(): float(line.rsplit(None, 1)[1]) for line in out.splitlines()[1:]}
    assert len(values) == 9 and all(v > 0 for v in values.values())
    assert "qvera mixed, 32 rows (ms a step)" in values and "row attention, 32 rows (us a layer)" in values
