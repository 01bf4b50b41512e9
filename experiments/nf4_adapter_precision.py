"""Which is closer to fp32 on an NF4 base in bf16 compute: qvera's VeRA or peft's?

    python experiments/nf4_adapter_precision.py [--rank 512] [--scale 0.05]

Both run the built-in SmolLM2 base in NF4 with bf16 compute, the same adapter (random vectors,
b scaled by --scale) and the same prompts. The reference is qvera in fp32 compute on the same
NF4 weights: dequantizing is exact, and there qvera and peft agree to 1e-5
(tests/adapters/test_peft_interop.py). Prints the max and mean |logit difference| of each,
and, for scale, what bf16 compute alone moves the bare base's logits.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import torch
from peft import PeftModel

from qvera import ModelConfig, VeraConfig, attach_vera, load_base
from qvera.adapters.peft_interop import export_peft
from qvera.core.attach import vera_layers

PROMPTS = ["The capital of France is", "VeRA adapters are small because", "Once upon a time, in a quiet village,"]


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch).logits.float()
    return out[batch["attention_mask"].bool()]  # padded positions hold no prediction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--scale", type=float, default=0.05, help="standard deviation of b")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results, folder = {}, tempfile.mkdtemp()
    for compute in ("float32", "bfloat16"):
        model, tokenizer = load_base(ModelConfig(name="smollm2-135m", quantization="nf4", compute_dtype=compute))
        attach_vera(model, VeraConfig(rank=args.rank))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in vera_layers(model).values():
                layer.lambda_d.copy_(torch.randn(layer.lambda_d.shape, generator=generator))
                layer.lambda_b.copy_(torch.randn(layer.lambda_b.shape, generator=generator) * args.scale)
        results[f"qvera-{compute}"] = logits(model, tokenizer)
        export_peft(model, folder)
        with torch.no_grad():
            for layer in vera_layers(model).values():
                layer.lambda_b.zero_()
        results[f"base-{compute}"] = logits(model, tokenizer)  # the bare base: what bf16 alone moves
        base, _ = load_base(ModelConfig(name="smollm2-135m", quantization="nf4", compute_dtype=compute))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[f"peft-{compute}"] = logits(PeftModel.from_pretrained(base, folder), tokenizer)
    reference = results["qvera-float32"]
    print(f"rank {args.rank}, b ~ N(0, {args.scale}^2), {reference.shape[0]} positions")
    diff = (results["base-bfloat16"] - results["base-float32"]).abs()
    print(f"{'base-bfloat16':15s} vs base in fp32:      max {diff.max():.4f}, mean {diff.mean():.4f}")
    for name in ("peft-float32", "qvera-bfloat16", "peft-bfloat16"):
        diff = (results[name] - reference).abs()
        print(f"{name:15s} vs fp32 reference: max {diff.max():.4f}, mean {diff.mean():.4f}")
    diff = (results["qvera-bfloat16"] - results["peft-bfloat16"]).abs()
    print(f"qvera-bf16 vs peft-bf16:           max {diff.max():.4f}, mean {diff.mean():.4f}")


if __name__ == "__main__":
    main()
