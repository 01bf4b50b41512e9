"""The host-side benchmarks and the training-step profile run and report every setting they
promise (timings are not asserted: those live in BENCHMARKS.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_train_step_profile_splits_a_step_by_kind_for_each_variant(tmp_path):
    args = "--shape tiny --variants qvera:32 peft-lora:8 --seq 32 --repeats 1 --top 3".split()
    out = run("train_step_profile.py", *args, "--json", str(tmp_path / "p.json"))
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert [row["variant"] for row in rows] == ["qvera:32", "peft-lora:8"]
    for row in rows:
        assert row["step_ms"] > 0 and len(row["top_ms"]) == 3
        assert sum(row["by_kind_ms"].values()) == pytest.approx(row["kernel_ms"], abs=0.05)
        assert row["by_kind_ms"]["matmul"] > 0  # the products are found by name
    assert "qvera:32:" in out and "peft-lora:8:" in out


def test_train_step_options_times_every_setting_fixed_and_varying(tmp_path):
    settings = ["--setting", "qvera:32", "adamw_torch/torch", "--setting", "qvera:32", "adamw_torch_fused/no-cudnn"]
    args = "--shape tiny --seq 32 --short 24 --rounds 2".split()
    out = run("train_step_options.py", *settings, *args, "--json", str(tmp_path / "o.json"))
    rows = json.loads((tmp_path / "o.json").read_text())["rows"]
    assert [(row["setting"], row["mode"]) for row in rows] == [
        (s, m) for s in ("adamw_torch/torch", "adamw_torch_fused/no-cudnn") for m in ("fixed", "varying")
    ]
    assert all(row["ms"] > 0 for row in rows)
    fixed = [row for row in rows if row["mode"] == "fixed"]
    assert all(row["tokens_per_s"] == pytest.approx(32 / row["ms"] * 1e3, rel=0.01) for row in fixed)
    assert out.count("qvera:32") == 4


def test_train_step_options_refuses_an_unknown_setting_before_building_anything():
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "train_step_options.py"), "--setting", "qvera:32", "adam/torch"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "setting 'adam/torch' for qvera:32: use OPTIMIZER/ATTENTION with an optimizer in" in result.stderr
    assert "'paged_adamw_8bit'" in result.stderr and "'no-cudnn'" in result.stderr


def test_train_host_time_counts_each_variants_operators_against_the_floor(tmp_path):
    args = "--variants floor qvera:16 --rounds 1".split()
    out = run("train_host_time.py", *args, "--json", str(tmp_path / "h.json"))
    rows = {row["variant"]: row for row in json.loads((tmp_path / "h.json").read_text())["rows"]}
    assert list(rows) == ["floor", "qvera:16"] and all(row["step_ms"] > 0 for row in rows.values())
    extra = rows["qvera:16"]["operators"] - rows["floor"]["operators"]
    assert 0 < extra <= 23 * 32 * 7  # the adapter's own, on 7 layers of each of the 32 blocks
    assert f"+{extra}" in out
