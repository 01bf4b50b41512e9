"""DVoRA: VeRA's update inside DoRA (Liu et al., ICML 2024, eq. 5).

A trainable magnitude m (out) per layer, initialised to the row norms of W0 so that the
adapted layer starts as the base:

    h = m ⊙ (W0 + ΔW) x / ||W0 + ΔW|| + bias,    ||·|| per output row, detached

The norm gets no gradient (DoRA section 4.3), and the bias is left unscaled, as peft's DoRA
does. The folded path has W0 + ΔW at hand, so its norm costs one pass over the weight; the
unfolded path expands ||W0 + ΔW||² over W0 Aᵀ and A Aᵀ, made once per base layer and kept
(adapted_norm.py, `VeraLinear.adapted_norms`), so that a new (d, b) costs out x r²
multiply-adds, not out x in x r. It exports as peft's DoRA (`use_dora`), whose magnitude is
this m and whose norm is the same detached ||W0 + ΔW||; peft's VeRA type has no magnitude.
"""

from __future__ import annotations

import torch
from torch import nn

from qvera.core.bnb import dequantized_weight, is_8bit
from qvera.core.method import Method
from qvera.core.vera import row_norms


def magnitude_scale(lambda_m: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """m / ||W0 + ΔW|| per output row, fp32: DVoRA's only change to VeRA's output."""
    return lambda_m.float() / norms


def _require_dequantizable(layer: nn.Module) -> None:
    if is_8bit(layer.base_layer):
        raise ValueError("DVoRA needs an nf4, bf16 or fp32 base; int8 weights are not dequantized")


class DVoRA(Method):
    name = "dvora"
    title = "DVoRA"
    scales_by_norm = True
    lora_options = {"use_dora": True}
    peft_vera = False

    def init_layer(self, layer: nn.Module) -> None:
        _require_dequantizable(layer)
        # m starts at ||W0|| (b = 0), so the adapted layer starts as the base layer.
        norms = row_norms(dequantized_weight(layer.base_layer, torch.float32))
        layer.lambda_m = nn.Parameter(norms.to(layer.lambda_b.device))

    def vector_names(self) -> tuple[str, ...]:
        return ("lambda_d", "lambda_b", "lambda_m")

    def shapes(self, rank: int, out_features: int) -> dict[str, tuple[int, ...]]:
        return {**super().shapes(rank, out_features), "lambda_m": (out_features,)}

    def scale(self, layer, vectors, norms=None):
        if norms is None:
            norms = layer.adapted_norms(vectors["lambda_d"].float(), vectors["lambda_b"].float())
        return magnitude_scale(vectors["lambda_m"], norms)

    def rows(self, layer, vectors):
        _require_dequantizable(layer)
        return super().rows(layer, vectors)

    def base_vectors(self, layer):
        """b = 0 and m = ||W0||: the scale is exactly 1."""
        vectors = super().base_vectors(layer)
        vectors["lambda_m"] = layer.adapted_norms(vectors["lambda_d"].float(), vectors["lambda_b"].float())
        return vectors

    def lora_tensors(self, vectors):
        return {"lora_magnitude_vector": vectors["lambda_m"].float()}
