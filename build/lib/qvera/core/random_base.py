"""Random-weight bases of known shapes (`random:llama2-7b`, `random:tiny`), built without a download.

They let a machine with no network measure memory and speed at a real model's shapes, and run
the whole training path (checkpoint, resume, export) on them. The weights are drawn in the
compute dtype one decoder layer at a time on the target device and quantized there at once, so
a 7B-shaped NF4 model never holds more than one layer unquantized. The tokenizer is byte-level
(every byte a token, built in code), so nothing outside the installed packages is needed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import bitsandbytes as bnb
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

PREFIX = "random:"
SHAPES = {
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
}
# Llama-2-7B's 32 layers at a width where the arithmetic is negligible: what a step costs here is
# the host work per layer that a GPU waits on (experiments/train_host_time.py).
SHAPES["deep-narrow"] = SHAPES["tiny"] | dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=32, vocab_size=320
)


def is_random(name: str) -> bool:
    return name.startswith(PREFIX)


def random_config(name: str) -> LlamaConfig:
    """The transformers config of `random:SHAPE`."""
    shape = name.removeprefix(PREFIX)
    if shape not in SHAPES:
        raise ValueError(f"unknown random base {name!r}; use one of {', '.join(PREFIX + s for s in SHAPES)}")
    return LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Bytes as tokens after three special ones (ids 0-2, as `random_config` says)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2} | {char: i + 3 for i, char in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def random_base_folder(name: str, cache: Path) -> str:
    """A folder with the config and tokenizer of `random:SHAPE` (no weights), for code that reads
    a base's config by name (adapter checks, merge, export). Written once, by one rename."""
    config = random_config(name)
    target = cache / name.replace(":", "-")
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".random-"))
    try:
        config.save_pretrained(staging)
        byte_tokenizer().save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _fill(module: nn.Module, std: float, generator: torch.Generator) -> None:
    """Llama's initialization: linears and embeddings N(0, std), norms 1."""
    with torch.no_grad():
        for sub in module.modules():
            weight = getattr(sub, "weight", None)
            if isinstance(sub, (nn.Linear, nn.Embedding)):
                weight.normal_(0.0, std, generator=generator)
            elif isinstance(weight, nn.Parameter) and weight.dim() == 1:
                weight.fill_(1.0)


def _quantize_linears(module: nn.Module, quantization, dtype: torch.dtype, device: torch.device) -> None:
    """Swap every nn.Linear inside `module` for a bitsandbytes 4-bit layer of the same weights."""
    for name, child in list(module.named_children()):
        if not isinstance(child, nn.Linear):
            _quantize_linears(child, quantization, dtype, device)
            continue
        options = dict(
            compress_statistics=quantization.bnb_4bit_use_double_quant,
            quant_type=quantization.bnb_4bit_quant_type,
            quant_storage=quantization.bnb_4bit_quant_storage,
        )
        shape = dict(input_features=child.in_features, output_features=child.out_features, bias=child.bias is not None)
        layer = bnb.nn.Linear4bit(**shape, compute_dtype=dtype, device="meta", **options)
        layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, module=layer, **options).to(device)
        if child.bias is not None:
            layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
        setattr(module, name, layer)


def build_random_model(name: str, dtype: torch.dtype, quantization, device: str, seed: int = 0) -> nn.Module:
    """`random:SHAPE` on `device`, in NF4 as `quantization` (a BitsAndBytesConfig) says, or unquantized (None)."""
    config = random_config(name)
    if quantization is not None and not quantization.load_in_4bit:
        raise ValueError(f"{name} is built in nf4, bf16 or fp32, not int8")
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    decoder = model.model
    pieces = [decoder.embed_tokens, *decoder.layers, decoder.norm, model.lm_head]
    for piece in pieces:
        piece.to_empty(device=device)
        _fill(piece, config.initializer_range, generator)
        if quantization is not None and piece is not model.lm_head:  # the head stays unquantized, as bnb loads it
            _quantize_linears(piece, quantization, dtype, device)
    with torch.device(device):
        decoder.rotary_emb = type(decoder.rotary_emb)(config=config)  # its buffers were on meta
    model.eval()
    return model
