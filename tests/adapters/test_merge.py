"""Merging: a plain bf16 folder that transformers alone loads, with the adapter model's
logits up to bf16 rounding; in-place merge and unmerge on full-precision bases."""

from __future__ import annotations

import json
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
from conftest import adapted, logits

from qvera.adapters.format import save_adapter
from qvera.adapters.merge import merge, merge_to_folder, unmerge
from qvera.core.attach import vector_state, vera_layers

PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
tokenizer.pad_token = tokenizer.eos_token
batch = tokenizer(["The quick brown fox", "VeRA adapters are"], return_tensors="pt", padding=True)
with torch.no_grad():
    torch.save(model(**batch).logits.float(), sys.argv[2])
assert model.dtype == torch.bfloat16
assert not {"qvera", "peft", "bitsandbytes"} & set(sys.modules), "the merged folder needed more than transformers"
"""


def test_merged_4bit_model_loads_with_plain_transformers(tiny_llama_dir, tmp_path):
    reference, tokenizer = adapted(tiny_llama_dir, "nf4", compute_dtype="float32")
    model, _ = adapted(tiny_llama_dir, "nf4")
    exact, ours = logits(reference, tokenizer), logits(model, tokenizer)
    before = vector_state(model)
    folder = merge_to_folder(model, tokenizer, tmp_path / "merged")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert not list(folder.glob("adapter*")) and not list(folder.glob("qvera*"))

    run = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(folder), str(tmp_path / "logits.pt")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    merged = torch.load(tmp_path / "logits.pt")
    # bf16 rounding: how far qvera's own bf16 computation is from computing in fp32.
    rounding = (ours - exact).abs().max()
    assert (merged - ours).abs().max() <= 3 * rounding
    for layer in vera_layers(model).values():
        layer.lambda_b.data.zero_()
    assert (logits(model, tokenizer) - ours).abs().max() > 10 * rounding  # the tolerance can fail
    for key, value in vector_state(model).items():  # merging left the model as it was (b zeroed above)
        assert key.endswith("lambda_b") or torch.equal(value, before[key])


def test_merged_weights_are_dequantized_base_plus_delta(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    model, tokenizer = adapted(tiny_llama_dir, "nf4")
    merge_to_folder(model, tokenizer, tmp_path / "merged")
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    layer = vera_layers(model)["model.layers.1.mlp.down_proj"]
    base = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
    A, B = model.vera_projections.A[:, :160], model.vera_projections.B[:64]
    expected = base + (layer.lambda_b[:, None] * B) @ (layer.lambda_d[:, None] * A)  # peft's get_delta_weight
    merged = weights["model.layers.1.mlp.down_proj.weight"]
    assert merged.dtype == torch.bfloat16
    assert torch.allclose(merged.float(), expected, rtol=2**-8, atol=1e-6)  # one bf16 rounding
    assert (merged.float() - base).abs().max() > 0.1
    assert "model.layers.0.self_attn.q_proj.weight.absmax" not in weights


def test_merge_to_folder_from_a_full_precision_base(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = adapted(tiny_llama_dir, "fp32")
    folder = merge_to_folder(model, tokenizer, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # bf16 weights, fp32 compute
    ours = logits(model, tokenizer)
    rounding = (logits(adapted(tiny_llama_dir, "bf16")[0], tokenizer) - ours).abs().max()
    assert (logits(plain, tokenizer) - ours).abs().max() <= rounding


def test_merge_refuses_an_occupied_folder(tiny_llama_dir, tmp_path):
    model, tokenizer = adapted(tiny_llama_dir, "fp32")
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="already holds other files"):
        merge_to_folder(model, tokenizer, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "qvera_adapter.json").is_file()


def test_merge_and_unmerge_in_place_on_a_full_precision_base(tiny_llama_dir, tmp_path):
    model, tokenizer = adapted(tiny_llama_dir, "fp32")
    ours = logits(model, tokenizer)
    vectors = vector_state(model)
    weight = vera_layers(model)["model.layers.0.mlp.up_proj"].base_layer.weight
    original = weight.detach().clone()

    merge(model)
    assert (weight - original).abs().max() > 0.1
    assert all(not layer.lambda_b.any() for layer in vera_layers(model).values())  # the adapter lives in W now
    assert (logits(model, tokenizer) - ours).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="already merged"):
        merge(model)
    with pytest.raises(ValueError, match="merged into the weights; call qvera.merge.unmerge"):
        save_adapter(model, tmp_path / "a")

    unmerge(model)
    assert (weight - original).abs().max() <= 1e-6
    for key, value in vector_state(model).items():
        assert torch.equal(value, vectors[key])
    assert (logits(model, tokenizer) - ours).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="not merged"):
        unmerge(model)


def test_in_place_merge_needs_a_full_precision_base(tiny_llama_dir):
    model, _ = adapted(tiny_llama_dir, "nf4")
    with pytest.raises(
        ValueError, match=r"needs a full-precision base \(bf16 or fp32\), this one is quantized; write a merged copy"
    ):
        merge(model)
