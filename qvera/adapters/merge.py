"""Merging an adapter into the weights: W = W0 + Λb B Λd A, each row times the output scale
the layer's method applies (DVoRA's m / ||W0 + ΔW||; the bias stays as it is).

`merge_to_folder` writes a plain bf16 transformers folder (4-bit layers dequantized first)
that loads with neither qvera nor peft, and leaves the model in memory untouched.
`merge`/`unmerge` do it in place on a full-precision base: a 4-bit weight cannot take ΔW.
"""

from __future__ import annotations

import copy
from pathlib import Path

import bitsandbytes as bnb
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from qvera.adapters.atomic import atomic_folder
from qvera.core.attach import vera_layers
from qvera.core.bnb import dequantized_weight, is_4bit
from qvera.core.vera import VeraLinear, delta_weight, row_norms

MERGED_DTYPE = torch.bfloat16


def layer_delta(layer: VeraLinear, lambda_d: torch.Tensor, lambda_b: torch.Tensor) -> torch.Tensor:
    """ΔW of one layer in fp32, whatever the compute dtype (a bf16 ΔW would round twice)."""
    projections = layer.projections[0]
    A = projections.A[:, : layer.in_features].float()
    B = projections.B[: layer.out_features].float()
    return delta_weight(lambda_d.float().to(A.device), lambda_b.float().to(A.device), A, B)


def adapted_weight(layer: VeraLinear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight the layer computes with now, in fp32, and the row scale its method folds into
    it (None for none; unmerge divides it out again)."""
    weight = plain_weight(layer.base_layer) + layer_delta(layer, layer.lambda_d, layer.lambda_b)
    scale = layer.method.scale(layer, layer.method.vectors(layer), norms=row_norms(weight))
    if scale is None:
        return weight, None
    scale = scale.to(weight.device)
    return weight * scale[:, None], scale


def plain_weight(layer: nn.Module) -> torch.Tensor:
    """A linear layer's weight in fp32, dequantized if it is 4-bit."""
    if isinstance(layer, bnb.nn.Linear8bitLt):
        raise ValueError("merging an int8 base is not supported; load the base in nf4, bf16 or fp32 to merge")
    return dequantized_weight(layer, torch.float32)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as a plain model holds them, in bf16, with every VeRA layer's ΔW added."""
    if getattr(model, "qvera_merged", None) is not None:
        raise ValueError("the adapter is already merged in place; call qvera.merge.unmerge(model) first")
    state, replaced = {}, []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in replaced):
            continue  # the base layer inside a VeraLinear, already done
        if isinstance(module, VeraLinear):
            weight, _ = adapted_weight(module)
            bias = module.base_layer.bias
        elif isinstance(module, nn.Linear) and (is_4bit(module) or isinstance(module, bnb.nn.Linear8bitLt)):
            weight, bias = plain_weight(module), module.bias
        else:
            continue
        replaced.append(name + ".")
        state[f"{name}.weight"] = weight.to(MERGED_DTYPE).cpu()
        if bias is not None:
            state[f"{name}.bias"] = bias.detach().to(MERGED_DTYPE).cpu()
    for key, value in model.state_dict().items():
        if key.startswith(tuple(replaced)):
            continue
        state[key] = value.detach().to(MERGED_DTYPE).cpu() if value.is_floating_point() else value.cpu()
    return state


def merge_to_folder(model: nn.Module, tokenizer, folder: str | Path) -> Path:
    """Write the adapted model as a plain bf16 transformers folder (atomically); `folder`
    must be new or empty."""
    state = merged_state_dict(model)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = MERGED_DTYPE
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=MERGED_DTYPE)
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()  # assign=True replaced the tied tensors one by one
    if model.generation_config is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    folder = Path(folder)
    with atomic_folder(folder) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return folder


def _full_precision_layers(model: nn.Module) -> dict[str, VeraLinear]:
    layers = vera_layers(model)
    if not layers:
        raise ValueError("this model has no VeRA attached; nothing to merge")
    for layer in layers.values():
        if is_4bit(layer.base_layer) or isinstance(layer.base_layer, bnb.nn.Linear8bitLt):
            raise ValueError(
                "merging in place needs a full-precision base (bf16 or fp32), this one is quantized; "
                "write a merged copy with qvera.merge.merge_to_folder"
            )
    return layers


def _layer_state(layer: VeraLinear) -> dict[str, torch.Tensor]:
    """Everything a merge changes in a layer besides its weight: d, b and its method's vectors."""
    vectors = {"lambda_d": layer.lambda_d, "lambda_b": layer.lambda_b, **layer.method.vectors(layer)}
    return {which: value.detach().clone() for which, value in vectors.items()}


def merge(model: nn.Module) -> None:
    """Put each layer's update (and its method's row scale) into its base weight, and set its
    vectors to those that make it compute that weight alone (`Method.base_vectors`: b = 0, and
    DVoRA's m the merged rows' norms), so the model computes the same function with the
    adapter in its weights; `unmerge` restores both. Switch adapters only when unmerged."""
    layers = _full_precision_layers(model)
    if getattr(model, "qvera_merged", None) is not None:
        raise ValueError("the adapter is already merged; call qvera.merge.unmerge(model) first")
    saved = {}
    with torch.no_grad():
        for name, layer in layers.items():
            saved[name] = _layer_state(layer)
            merged, scale = adapted_weight(layer)
            layer.base_layer.weight.copy_(merged)
            if scale is not None:
                saved[name]["merge_scale"] = scale
            _assign(layer, layer.method.base_vectors(layer))
    model.qvera_merged = saved


def _assign(layer: VeraLinear, vectors: dict[str, torch.Tensor]) -> None:
    for which, value in vectors.items():
        getattr(layer, which).copy_(value)


def unmerge(model: nn.Module) -> None:
    """Take the update out of the weights again and restore the vectors. Exact to fp32 rounding
    on an fp32 base; a bf16 base keeps the rounding of W0 + ΔW (as with peft's unmerge)."""
    layers = _full_precision_layers(model)
    saved = getattr(model, "qvera_merged", None)
    if saved is None:
        raise ValueError("the adapter is not merged; nothing to unmerge")
    with torch.no_grad():
        for name, layer in layers.items():
            state = dict(saved[name])
            weight = layer.base_layer.weight
            if "merge_scale" in state:
                weight.div_(state.pop("merge_scale").to(weight.device, weight.dtype)[:, None])
            weight.sub_(layer_delta(layer, state["lambda_d"], state["lambda_b"]).to(weight.device, weight.dtype))
            _assign(layer, state)
    model.qvera_merged = None
