"""Loading bases: the built-in SmolLM2, local folders, quantization choices, bad names."""

import time

import bitsandbytes as bnb
import pytest
import torch

import qvera
import qvera.core.base
from qvera.core.base import BUILTIN_SMOLLM2, builtin_smollm2_folder, smollm2_gguf_path


def test_builtin_smollm2_converts_once_and_loads_in_nf4(smollm2_dir):
    assert smollm2_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert builtin_smollm2_folder() == smollm2_dir  # cached: the second call converts nothing
    model, tokenizer = qvera.load_base(BUILTIN_SMOLLM2)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.quant_state.nested  # double quant
    assert model.qvera_base_name == BUILTIN_SMOLLM2
    assert not any(p.requires_grad for p in model.parameters())
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


@pytest.mark.parametrize("quantization,layer_type", [("bf16", torch.nn.Linear), ("fp32", torch.nn.Linear)])
def test_unquantized_bases(tiny_llama_dir, quantization, layer_type):
    model, _ = qvera.load_base(qvera.ModelConfig(name=tiny_llama_dir, quantization=quantization))
    layer = model.model.layers[0].mlp.up_proj
    assert type(layer) is layer_type
    assert layer.weight.dtype == (torch.float32 if quantization == "fp32" else torch.bfloat16)


def test_bad_model_and_quantization_fail_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot load model .*not a local folder, a reachable hub id"):
        qvera.load_base(str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="quantization 'nf3' is not one of"):
        qvera.load_base(qvera.ModelConfig(name="smollm2-135m", quantization="nf3"))


def test_4bit_weights_stored_as_bfloat16_for_fsdp(tiny_llama_dir):
    config = qvera.ModelConfig(name=tiny_llama_dir, quantization="nf4", quant_storage="bfloat16")
    model, _ = qvera.load_base(config)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # packed 4-bit, FSDP-flattenable
    qvera.attach_vera(model, qvera.VeraConfig(rank=16))
    model.train()
    ids = torch.randint(0, 1000, (2, 300))  # enough tokens for the folded path, which dequantizes itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[0].mlp.up_proj.lambda_b.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "offline, reachable, reason",
    [
        (True, True, "not in the hub cache, and HF_HUB_OFFLINE is set; pass a local folder or go online"),
        (False, False, "not in the hub cache, and https://huggingface.co cannot be reached; pass a local folder"),
    ],
    ids=["HF_HUB_OFFLINE", "unreachable"],
)
def test_an_unknown_hub_model_fails_at_once_offline(monkeypatch, offline, reachable, reason):
    monkeypatch.setattr(qvera.core.base, "is_offline_mode", lambda: offline)
    monkeypatch.setattr(qvera.core.base, "hub_reachable", lambda: reachable)
    monkeypatch.setattr(qvera.core.base.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("no retries"))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=f"^cannot load model 'someone/no-such-model' .*: {reason}"):
        qvera.load_base("someone/no-such-model")
    assert time.perf_counter() - start < 1


def test_a_base_without_chat_template_is_prompted_as_training_prompts_it(capsys, tmp_path, monkeypatch):
    """Llama-2-7b-hf and the random bases have no chat template: training gives them qvera's
    plain one, so chat and serving must render prompts with it too, not refuse the base."""
    from qvera.generation.decode import chat_prompt

    monkeypatch.setenv("QVERA_CACHE", str(tmp_path))
    _, tokenizer = qvera.load_base(qvera.ModelConfig(name="random:tiny", quantization="fp32", compute_dtype="float32"))
    assert "random:tiny has no chat template; using qvera's plain one" in capsys.readouterr().err
    ids = chat_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    assert tokenizer.decode(ids) == "### User:\nHi\n\n### Assistant:\n"
