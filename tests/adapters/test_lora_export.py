"""VeRA exported as LoRA, with peft as the oracle: peft's LoRA (DoRA for DVoRA adapters) on
the same base gives qvera's logits, and `rank=K` truncates each layer's update as the SVD
says it should."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import logits, randomize_vectors, save_tiny_llama
from safetensors import safe_open

from qvera import ModelConfig, VeraConfig, attach_vera, load_base
from qvera.adapters.format import adapter_from_model
from qvera.adapters.lora_export import export_lora, lora_factors
from qvera.core.attach import vera_layers
from qvera.core.vera import delta_weight, generate_projections
from tests.adapters.test_peft_interop import peft_model


@pytest.fixture(scope="module")
def odd_llama_dir(tmp_path_factory):
    """Biases in attention and MLP, an untied output head, grouped-query attention."""
    folder = tmp_path_factory.mktemp("odd-llama")
    return save_tiny_llama(folder, seed=5, attention_bias=True, mlp_bias=True, tie_word_embeddings=False)


def vera_model(base_dir, quantization="fp32", compute_dtype="bfloat16", **vera):
    model, tokenizer = load_base(
        ModelConfig(name=str(base_dir), quantization=quantization, compute_dtype=compute_dtype)
    )
    attach_vera(model, VeraConfig(**vera))
    randomize_vectors(model, 2)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in vera_layers(model).values():
            if layer.method.name == "dvora":  # away from ||W0||, so a wrong norm convention shows
                layer.lambda_m.mul_(1 + 0.3 * torch.rand(layer.lambda_m.shape, generator=generator))
    return model, tokenizer


@pytest.mark.parametrize(
    "base, vera",
    [
        ("tiny", dict(rank=8)),
        # r = 96 is wider than k/v's 32 outputs and every 64-wide input
        ("odd", dict(rank=96, target_modules=["k_proj", "v_proj", "o_proj", "down_proj"])),
        ("odd", dict(rank=16, target_modules=["q_proj", "v_proj", "up_proj"], method="dvora")),
    ],
    ids=["gqa-all-linear", "bias-untied-subset-wide-rank", "dvora-as-dora"],
)
def test_peft_lora_gives_qvera_logits(tiny_llama_dir, odd_llama_dir, tmp_path, base, vera):
    base_dir = tiny_llama_dir if base == "tiny" else odd_llama_dir
    model, tokenizer = vera_model(base_dir, **vera)
    result = export_lora(adapter_from_model(model), tmp_path / "lora")
    config = json.loads((result.folder / "adapter_config.json").read_text())
    rank = vera["rank"]
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", rank, rank)
    assert config["use_dora"] == (vera.get("method") == "dvora")
    assert sorted(config["target_modules"]) == sorted(vera_layers(model))  # peft keeps a set
    with safe_open(result.folder / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    layer = "base_model.model.model.layers.1.self_attn.v_proj"
    assert {f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"} <= keys
    assert (f"{layer}.lora_magnitude_vector" in keys) == (vera.get("method") == "dvora")
    assert result.exact and result.rank == rank
    diff = (logits(peft_model(base_dir, result.folder), tokenizer) - logits(model, tokenizer)).abs().max()
    assert diff <= 1e-5


@pytest.mark.parametrize("method", ["vera", "dvora"])
def test_peft_lora_on_a_4bit_base(tiny_llama_dir, tmp_path, method):
    ours, theirs = {}, {}
    for compute_dtype in ("float32", "bfloat16"):
        model, tokenizer = vera_model(tiny_llama_dir, "nf4", compute_dtype, rank=8, method=method)
        ours[compute_dtype] = logits(model, tokenizer)
        folder = export_lora(adapter_from_model(model), tmp_path / compute_dtype).folder
        theirs[compute_dtype] = logits(peft_model(tiny_llama_dir, folder, "nf4", compute_dtype), tokenizer)
    # In fp32 on the same 4-bit weights, peft's LoRA is qvera's VeRA ...
    assert (theirs["float32"] - ours["float32"]).abs().max() <= 1e-5
    # ... in bf16 the two differ by no more than bf16 rounding moves either away from fp32.
    rounding = max((ours["bfloat16"] - ours["float32"]).abs().max(), (theirs["bfloat16"] - ours["float32"]).abs().max())
    assert (theirs["bfloat16"] - ours["bfloat16"]).abs().max() <= 2 * rounding
    for layer in vera_layers(model).values():
        layer.lambda_b.data.zero_()
    assert (logits(model, tokenizer) - ours["bfloat16"]).abs().max() > 10 * rounding  # the tolerance can fail


def test_half_precision_factors_are_the_fp32_ones_rounded(tiny_llama_dir, tmp_path):
    model, _ = vera_model(tiny_llama_dir, rank=8)
    adapter = adapter_from_model(model)
    exact = export_lora(adapter, tmp_path / "fp32")
    for dtype in (torch.bfloat16, torch.float16):
        half = export_lora(adapter, tmp_path / str(dtype), dtype=dtype)
        assert half.bytes < 0.6 * exact.bytes
        with safe_open(exact.folder / "adapter_model.safetensors", "pt") as a:
            with safe_open(half.folder / "adapter_model.safetensors", "pt") as b:
                for key in a.keys():
                    assert b.get_tensor(key).dtype == dtype
                    assert torch.equal(b.get_tensor(key), a.get_tensor(key).to(dtype))


def test_factors_are_the_vera_update(tiny_llama_dir):
    model, _ = vera_model(tiny_llama_dir, rank=8, target_modules=["down_proj"])
    A, B = generate_projections(8, 160, 64, 0)
    layer = vera_layers(model)["model.layers.0.mlp.down_proj"]
    lora_A, lora_B, extra = lora_factors(adapter_from_model(model))["model.layers.0.mlp.down_proj"]
    assert lora_A.shape == (8, 160) and lora_B.shape == (64, 8) and extra == {}
    expected = delta_weight(layer.lambda_d.detach(), layer.lambda_b.detach(), A, B)
    assert torch.allclose(lora_B @ lora_A, expected, atol=1e-6)


def test_rank_below_the_adapters_truncates_by_svd(tiny_llama_dir, tmp_path):
    model, tokenizer = vera_model(tiny_llama_dir, rank=24, target_modules=["q_proj", "k_proj", "down_proj"])
    adapter = adapter_from_model(model)
    deltas = {name: B @ A for name, (A, B, _) in lora_factors(adapter).items()}
    worst = {}
    for rank in (4, 12, 24, 40):
        result = export_lora(adapter, tmp_path / f"r{rank}", rank=rank)
        assert result.rank == min(rank, 24)
        with safe_open(result.folder / "adapter_model.safetensors", "pt") as f:
            for name, delta in deltas.items():
                key = f"base_model.model.{name}.lora_"
                lora_A, lora_B = f.get_tensor(key + "A.weight"), f.get_tensor(key + "B.weight")
                assert lora_A.shape == (result.rank, delta.shape[1]) and lora_B.shape == (delta.shape[0], result.rank)
                measured = float((delta - lora_B @ lora_A).norm() / delta.norm())
                singular = torch.linalg.svdvals(delta.double())
                optimal = float(singular[rank:].square().sum().sqrt() / singular.square().sum().sqrt())
                assert result.errors[name] == pytest.approx(optimal, abs=1e-6)  # Eckart-Young: the best rank-K
                assert measured == pytest.approx(optimal, abs=1e-5)  # and the factors written are that one
        worst[rank] = max(result.errors.values())
        assert json.loads((result.folder / "adapter_config.json").read_text())["r"] == result.rank
    assert worst[4] > worst[12] > 0 and worst[24] == worst[40] == 0.0  # exact from the adapter's rank up
    summary = export_lora(adapter, tmp_path / "summary", rank=4).summary()
    assert "LoRA rank 4:" in summary and f"max {worst[4]:.3g}" in summary
    assert "against VeRA's" in summary and "exact" in export_lora(adapter, tmp_path / "whole").summary()
    full = peft_model(tiny_llama_dir, tmp_path / "r24")
    cut = peft_model(tiny_llama_dir, tmp_path / "r4")
    ours = logits(model, tokenizer)
    assert (logits(full, tokenizer) - ours).abs().max() <= 1e-5
    assert (logits(cut, tokenizer) - ours).abs().max() > 1e-3
