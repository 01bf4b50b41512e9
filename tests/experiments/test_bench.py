"""experiments/bench.py end to end on a tiny 4-bit model: rows, ratios and JSON fields."""

import argparse
import json
import runpy
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from experiments import train_step_bench
from qvera.core.attach import vera_layers

ROOT = Path(__file__).resolve().parents[2]


def test_bench_writes_rows_with_ratios(tiny_llama_dir, tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        "experiments/bench.py",
        "--model",
        tiny_llama_dir,
        "--variants",
        "floor",
        "peft-vera:32",
        "qvera:32",
        "qvera-dvora:32",
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
    assert "| qvera | 32 |" in result.stdout and "command: python experiments/bench.py --model" in result.stdout
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
    # DVoRA adds one magnitude per output row, as many as VeRA's b: VeRA's count (layers x r d
    # entries + the b entries) minus the added ones leaves layers x 32.
    vera, dvora = rows["qvera"]["trainable"], rows["qvera-dvora"]["trainable"]
    assert dvora > vera and (2 * vera - dvora) > 0 and (2 * vera - dvora) % 32 == 0
    assert rows["qvera-dvora"]["adapter_bytes"] > rows["qvera"]["adapter_bytes"]
    assert rows["qvera-dvora"]["tflop"] >= rows["qvera"]["tflop"]


def test_bench_refuses_a_run_without_the_floor():
    result = subprocess.run(
        [sys.executable, "experiments/bench.py", "--variants", "qvera:8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "--variants must include 'floor'" in result.stderr


def test_train_step_bench_runs_each_kind_of_variant_on_a_cpu(monkeypatch, tmp_path):
    """The GPU benchmark's code on the random tiny base (a CPU has no memory figures)."""
    monkeypatch.setenv("QVERA_CACHE", str(tmp_path))
    rows = [
        train_step_bench.measure("tiny", variant, batch=1, seq=32, repeats=1, compute_dtype="float32", device="cpu")
        for variant in ("floor", "peft-lora:4", "peft-vera:16", "qvera:16")
    ]
    assert [r["variant"] for r in rows] == ["floor", "peft-lora", "peft-vera", "qvera"]
    assert all(r["tokens_per_s"] > 0 and r["peak_allocated_gb"] is None for r in rows)
    assert rows[3]["trainable"] == rows[2]["trainable"] > 0 and rows[0]["trainable"] == 0
    rows[2]["rank"] = rows[3]["rank"] = 512  # as the GPU run names them
    summary = train_step_bench.ratios(rows)
    assert summary["qvera512_over_peft_vera512"] > 0 and summary["qvera512_over_lora64"] is None
    # Each method's usual optimizer: qvera's default, and fused AdamW for peft on a CPU too.
    assert [r["optimizer"] for r in rows] == [None] + ["adamw_torch_fused"] * 3
    assert train_step_bench.default_optimizer("peft-lora", "cuda") == "paged_adamw_8bit"
    assert train_step_bench.default_optimizer("qvera", "cuda") == "adamw_torch_fused"
    assert "| qvera | 512 | adamw_torch_fused | 1 x 32 |" in train_step_bench.markdown(rows, [], summary)


def test_bench_refuses_bad_flags_in_one_line():
    for flags, message in (
        (["--device", "cuda"], "no CUDA GPU"),
        (["--max-context", "8"], "needs --device cuda"),
        (["--rounds", "-1"], "--rounds must be 0 (off) or more, got -1"),
    ):
        if flags[0] == "--device" and torch.cuda.is_available():
            continue
        result = subprocess.run(
            [sys.executable, "experiments/bench.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize("seq", [16, 512])  # the unfolded and the folded path
def test_train_step_bench_frees_each_variant_before_the_next(monkeypatch, tmp_path, seq):
    """4-bit layers sit in reference cycles: unless measure() collects its model, the next
    variant's peak memory (and the capped context search) would count it too."""
    monkeypatch.setenv("QVERA_CACHE", str(tmp_path))
    built = []
    build = train_step_bench.build

    def recording_build(*args, **kwargs):
        model, method, rank = build(*args, **kwargs)
        built.extend(weakref.ref(layer) for layer in vera_layers(model).values())
        return model, method, rank

    monkeypatch.setattr(train_step_bench, "build", recording_build)
    train_step_bench.measure("tiny", "qvera:8", batch=1, seq=seq, repeats=1, compute_dtype="float32", device="cpu")
    assert len(built) == 28 and [ref() for ref in built] == [None] * 28


def test_interleaved_speeds_time_every_variant_in_turn_and_free_them(monkeypatch, tmp_path):
    monkeypatch.setenv("QVERA_CACHE", str(tmp_path))
    order, built = [], []
    build, step = train_step_bench.build, train_step_bench.Stepper.__call__

    def recording_build(shape, variant, *args, **kwargs):
        model, method, rank = build(shape, variant, *args, **kwargs)
        built.append(weakref.ref(model.get_input_embeddings()))
        return model, method, rank

    def recording_step(self, batch, seq):
        order.append(self.method)
        return step(self, batch, seq)

    monkeypatch.setattr(train_step_bench, "build", recording_build)
    monkeypatch.setattr(train_step_bench.Stepper, "__call__", recording_step)
    variants = ["floor", "peft-lora:4", "qvera:16"]
    speeds = train_step_bench.interleaved_speeds("tiny", variants, 1, 16, 3, "float32", "cpu")
    assert list(speeds) == variants and all(v > 0 for v in speeds.values())
    # one warm-up each, then three rounds, each starting one variant later
    methods = ["floor", "peft-lora", "qvera"]
    assert order == methods + methods + methods[1:] + methods[:1] + methods[2:] + methods[:2]
    assert [ref() for ref in built] == [None] * 3
    rows = [
        dict(variant=m, rank=r, tokens_per_s=1.0, peak_allocated_gb=1.0, peak_reserved_gb=1.0)
        for m, r in (("qvera", 512), ("peft-lora", 64))
    ]
    rows[0]["interleaved_tokens_per_s"], rows[1]["interleaved_tokens_per_s"] = 3.0, 2.0
    assert train_step_bench.ratios(rows)["qvera512_over_lora64"] == 1.5  # the ratios use the speeds in turn


def test_train_step_bench_refuses_to_measure_over_a_leftover_model(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 3 * 2**30)
    with pytest.raises(RuntimeError, match="3.00 GB of GPU memory is still allocated before qvera:512"):
        train_step_bench.build("tiny", "qvera:512", "bfloat16", "cuda")


def test_gpu_bench_keeps_the_rows_measured_before_a_failure(monkeypatch, tmp_path):
    """A GPU run stopped midway (time limit, error) still leaves its finished rows in the JSON."""
    bench_cuda = runpy.run_path(str(ROOT / "experiments" / "bench.py"), run_name="bench")["bench_cuda"]
    row = dict(variant="floor", rank=0, batch=1, seq=8, step_s=1.0, tokens_per_s=8.0, trainable=0)
    row |= dict(peak_allocated_gb=1.0, peak_reserved_gb=1.0)

    def measure(shape, variant, *args):
        if variant != "floor":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return row

    monkeypatch.setattr(train_step_bench, "measure", measure)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    args = argparse.Namespace(variants=["floor", "qvera:512"], shape="tiny", batch=1, seq=8, repeats=1, rounds=0)
    args.compute_dtype, args.max_context, args.json, args.markdown = "auto", [], tmp_path / "b.json", tmp_path / "b.md"
    with pytest.raises(RuntimeError, match="illegal memory access"):
        bench_cuda(args, "python experiments/bench.py --device cuda")
    report = json.loads(args.json.read_text())
    assert report["device"] == "a GPU" and [r["variant"] for r in report["rows"]] == ["floor"]
    assert "| floor | - | - | 1 x 8 |" in args.markdown.read_text()


def test_gpu_bench_falls_back_when_the_variants_do_not_fit_at_once(monkeypatch, tmp_path, capsys):
    bench_cuda = runpy.run_path(str(ROOT / "experiments" / "bench.py"), run_name="bench")["bench_cuda"]
    row = dict(variant="floor", rank=0, batch=1, seq=8, step_s=1.0, tokens_per_s=8.0, trainable=0)
    row |= dict(peak_allocated_gb=1.0, peak_reserved_gb=1.0)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(train_step_bench, "measure", lambda *args: dict(row))
    monkeypatch.setattr(train_step_bench, "interleaved_speeds", out_of_memory)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    args = argparse.Namespace(variants=["floor"], shape="tiny", batch=1, seq=8, repeats=1, rounds=5)
    args.compute_dtype, args.max_context, args.json, args.markdown = "auto", [], tmp_path / "b.json", tmp_path / "b.md"
    bench_cuda(args, "python experiments/bench.py --device cuda")
    assert "do not fit on this GPU all at once" in capsys.readouterr().err
    assert "interleaved_tokens_per_s" not in json.loads(args.json.read_text())["rows"][0]
