"""The compute-dtype decision, with injected capabilities (nothing here depends on this machine),
and the random-weight bases of real shapes."""

from __future__ import annotations

import runpy
import sys

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM

from qvera import ModelConfig, load_base
from qvera.adapters.loading import meta_base
from qvera.core import hardware
from qvera.core.bnb import is_4bit
from qvera.core.hardware import Capabilities, cpu_flags, resolve_compute_dtype
from qvera.core.random_base import byte_tokenizer, random_config

A100 = Capabilities("cuda", cuda_bf16=True, gpu_name="NVIDIA A100-SXM4-80GB")
T4 = Capabilities("cuda", cuda_bf16=False, gpu_name="Tesla T4")
SAPPHIRE_RAPIDS = Capabilities("cpu", cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
COOPER_LAKE = Capabilities("cpu", cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16"}))
ZEN1 = Capabilities("cpu", cpu_flags=frozenset({"avx2", "fma"}))


@pytest.mark.parametrize(
    "caps,expected,reason_part",
    [
        (A100, "bfloat16", "A100-SXM4-80GB has bf16"),
        (T4, "float16", "loss scaling"),
        (SAPPHIRE_RAPIDS, "bfloat16", "amx_bf16"),
        (COOPER_LAKE, "bfloat16", "avx512_bf16"),
        (ZEN1, "float32", "no native bf16"),
    ],
)
def test_auto_follows_the_hardware(caps, expected, reason_part):
    dtype, reason = resolve_compute_dtype("auto", caps)
    assert dtype == expected and reason_part in reason


@pytest.mark.parametrize(
    "caps,requested", [(ZEN1, "bfloat16"), (A100, "float32"), (T4, "float16"), (ZEN1, "float16"), (A100, "float16")]
)
def test_an_explicit_dtype_wins(caps, requested):
    assert resolve_compute_dtype(requested, caps)[0] == requested


def test_bf16_on_a_gpu_without_bf16_fails_in_one_line():
    with pytest.raises(ValueError) as err:
        resolve_compute_dtype("bfloat16", T4)
    message = str(err.value)
    assert "\n" not in message
    assert "bfloat16" in message and "Tesla T4" in message and "--compute-dtype float16" in message


def test_an_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match="auto, bfloat16, float16, float32"):
        resolve_compute_dtype("bf16", A100)


def test_cpu_flags_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 amx_bf16\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "absent") == frozenset()


@pytest.fixture
def fresh_announcements(monkeypatch):
    monkeypatch.setattr(hardware, "_announced", set())


@pytest.mark.parametrize("caps,dtype", [(ZEN1, torch.float32), (SAPPHIRE_RAPIDS, torch.bfloat16)])
def test_auto_reaches_load_base_and_is_announced_once(
    tiny_llama_dir, monkeypatch, capsys, fresh_announcements, caps, dtype
):
    monkeypatch.setattr(hardware, "detect", lambda device=None: caps)
    assert ModelConfig().compute_dtype == "auto"
    for _ in range(2):
        model, _ = load_base(ModelConfig(name=tiny_llama_dir, quantization="nf4"))
        assert model.dtype == dtype
        layer = model.model.layers[0].mlp.up_proj
        assert is_4bit(layer) and layer.compute_dtype == dtype
    announced = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qvera: compute dtype")]
    name, reason = resolve_compute_dtype("auto", caps)
    assert announced == [f"qvera: compute dtype {name} ({reason})"] and getattr(torch, name) == dtype


def run_script(monkeypatch, script: str, argv: list[str]):
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "scripts" / script), run_name="__main__")
    return exit_.value


@pytest.mark.parametrize("script", ["chat.py", "eval.py"])
def test_scripts_pass_compute_dtype_to_the_model_config(
    script, tiny_llama_dir, monkeypatch, capsys, fresh_announcements
):
    """bf16 asked of a T4 stops the script at start-up, with the resolver's one line."""
    monkeypatch.setattr(hardware, "detect", lambda device=None: T4)
    argv = ["--model", tiny_llama_dir, "--compute-dtype", "bfloat16"]
    if script == "eval.py":
        argv += ["--dataset", str(REPO / "data" / "alpaca_en_demo.json"), "--limit", "2"]
    else:
        argv += ["--prompt", "Hi"]
    assert run_script(monkeypatch, script, argv).code == 1
    (message,) = capsys.readouterr().err.strip().splitlines()
    assert message.startswith(f"{script}: error: compute dtype bfloat16 is not supported on Tesla T4")


def test_random_llama2_7b_has_llama2_7b_shapes():
    config = random_config("random:llama2-7b")
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size) == (
        4096,
        11008,
        32,
        32000,
    )
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert 6.7e9 < parameters < 6.8e9  # Llama-2-7B: 6.74B
    with pytest.raises(ValueError, match="random:llama2-7b"):
        random_config("random:llama3-405b")


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = byte_tokenizer()
    text = "héllo, wörld ✓\n"
    ids = tokenizer(text).input_ids
    assert len(ids) == len(text.encode()) and max(ids) < random_config("random:tiny").vocab_size
    assert tokenizer.decode(ids) == text


def test_a_random_base_loads_in_nf4_and_describes_itself(monkeypatch, tmp_path):
    monkeypatch.setenv("QVERA_CACHE", str(tmp_path))
    model, tokenizer = load_base(ModelConfig(name="random:tiny", compute_dtype="float32"))
    assert is_4bit(model.model.layers[0].self_attn.q_proj) and model.dtype == torch.float32
    ids = tokenizer(["a random base"], return_tensors="pt").input_ids
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert meta_base("random:tiny").config.hidden_size == 256  # read by name, as adapter checks do
