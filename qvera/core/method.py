"""The seam for an adapter method: what one VeRA-family method adds to the layer in vera.py.

Every method shares VeRA's update, ΔW = Λb B Λd A with frozen shared A and B; a method says
which vectors it trains and saves, and whether it rescales the layer's output row by row.
The rest of qvera asks the layer's method (or an adapter's) and never names one:

- `init_layer`    creates the method's extra vectors on a new layer (and refuses a base it cannot run on);
- `vector_names`, `shapes`, `vectors`: the vectors it trains and an adapter file holds, by suffix;
- `scale`         the output scale per row (None: none), from the vectors and ||W0 + ΔW||;
                  merging folds it into the weight, so it is also the merge rule;
- `factors`       (d, b) of the update from an adapter's vectors (its LoRA export);
- `rows`          (d, b, scale) from an adapter's vectors: one adapter's rows in a mixed batch;
- `base_vectors`  the vectors that make the layer compute its base weight alone (the bare
                  base between adapters, and what a merged layer keeps);
- `lora_options` and `lora_tensors`: the adapter as a peft LoRA (None: it has none).

This class is plain VeRA, the method every other one builds on; a new method is a subclass in
its own module and one line in qvera.core.methods.METHODS.
"""

from __future__ import annotations

import torch
from torch import nn


class Method:
    """Plain VeRA: trains d and b, no output scale, exports as a LoRA of the same rank."""

    name = "vera"
    #: What it is, for one-line messages.
    title = "VeRA"
    #: Whether `scale` needs ||W0 + ΔW|| (then the folded path returns it with the output).
    scales_by_norm = False
    #: peft LoraConfig options of its LoRA export; None: no LoRA equivalent, export refuses.
    lora_options: dict | None = {}
    #: Whether peft's own VeRA type holds it (peft's VeraConfig).
    peft_vera = True

    def init_layer(self, layer: nn.Module) -> None:
        """Create the method's extra vectors on a new VeraLinear (which already holds d and b)."""

    def vector_names(self) -> tuple[str, ...]:
        """The suffixes of the vectors an adapter of this method saves, per layer."""
        return ("lambda_d", "lambda_b")

    def vectors(self, layer: nn.Module) -> dict[str, nn.Parameter]:
        """The layer's saved vectors by suffix."""
        return {name: getattr(layer, name) for name in self.vector_names()}

    def shapes(self, rank: int, out_features: int) -> dict[str, tuple[int, ...]]:
        """The shape of each saved vector of a layer with `out_features` outputs."""
        return {"lambda_d": (rank,), "lambda_b": (out_features,)}

    def scale(self, layer: nn.Module, vectors: dict[str, torch.Tensor], norms: torch.Tensor | None = None):
        """The output scale per row (fp32), or None for none. `norms` is ||W0 + ΔW|| when the
        caller has it (the folded path, a merge); else the method asks `layer.adapted_norms`."""
        return None

    def factors(self, vectors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(d, b) of VeRA's update from an adapter's saved vectors."""
        return vectors["lambda_d"], vectors["lambda_b"]

    def rows(self, layer: nn.Module, vectors: dict[str, torch.Tensor]):
        """(d, b, scale or None) that make a mixed batch's row run this adapter's `vectors`."""
        return (*self.factors(vectors), self.scale(layer, vectors))

    def base_vectors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """Vectors with which the layer computes its base weight alone: b = 0."""
        vectors = {name: value.detach().clone() for name, value in self.vectors(layer).items()}
        vectors["lambda_b"].zero_()
        return vectors

    def lora_tensors(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-layer tensors its LoRA export adds beside lora_A and lora_B, by peft's suffix."""
        return {}


VERA = Method()
