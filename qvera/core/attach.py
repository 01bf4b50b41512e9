"""Attaching VeRA to a model: pick the target layers, size the shared projections, wrap."""

from __future__ import annotations

import torch
from torch import nn

from qvera.core.bnb import disable_cpu_repacking
from qvera.core.config import VeraConfig
from qvera.core.method import Method
from qvera.core.methods import method_named
from qvera.core.vera import SharedProjections, VeraLinear

PROJECTIONS_ATTR = "vera_projections"


def find_targets(model: nn.Module, target_modules: str | list[str]) -> dict[str, nn.Linear]:
    """`all-linear`: every linear layer but the output head (as peft does); else names or suffixes."""
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is output_head or isinstance(module, VeraLinear):
            continue
        if target_modules == "all-linear":
            targets[name] = module
        elif any(name == t or name.endswith("." + t) for t in target_modules):
            targets[name] = module
    if not targets:
        raise ValueError(
            f"no linear layer matches target_modules={target_modules!r}; "
            "use 'all-linear' or names such as ['q_proj', 'v_proj']"
        )
    return targets


def attach_vera(model: nn.Module, config: VeraConfig, verbose: bool = False, projections=None) -> nn.Module:
    """Wrap the target layers in place and freeze everything but the vectors. `projections`: the
    A and B a fit check generated for this config (qvera.adapters.fit.Fit), so that they are
    generated once."""
    if config.rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {config.rank}")
    if has_vera(model):
        raise ValueError("this model already has VeRA attached; load more adapters with qvera.adapters instead")
    method = method_named(config.method)
    targets = find_targets(model, config.target_modules)
    in_max = max(m.in_features for m in targets.values())
    out_max = max(m.out_features for m in targets.values())
    projections = SharedProjections(config.rank, in_max, out_max, config.projection_seed, projections)
    device = next(iter(targets.values())).weight.device
    projections.to(device)
    for param in model.parameters():
        param.requires_grad_(False)
    disable_cpu_repacking(model)  # before wrapping: a method may read the dequantized weight (DVoRA)
    for name, layer in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        vera = VeraLinear(layer, projections, config.d_initial, fold=config.fold, method=method)
        setattr(parent, child, vera)
    model.add_module(PROJECTIONS_ATTR, projections)
    model.vera_config = config
    if verbose:
        print(trainable_summary(model))
    return model


def has_vera(model: nn.Module) -> bool:
    """Whether `attach_vera` has run on this model (it owns one shared A and B)."""
    return hasattr(model, PROJECTIONS_ATTR)


def vera_layers(model: nn.Module) -> dict[str, VeraLinear]:
    """Every VeRA layer of the model by its module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, VeraLinear)}


def shared_projections(model: nn.Module) -> SharedProjections:
    """The model's one A and B; raises ValueError when no VeRA is attached."""
    if not has_vera(model):
        raise ValueError("this model has no VeRA attached; call qvera.attach_vera(model, VeraConfig(...)) first")
    return getattr(model, PROJECTIONS_ATTR)


def trainable_summary(model: nn.Module) -> str:
    """peft's one-line count of trainable parameters, for logs."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def vector_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter: `<layer>.<suffix>` for every VeRA layer and every vector its method saves
    (lambda_d and lambda_b; DVoRA adds lambda_m), fp32 copies."""
    return {
        f"{name}.{which}": param.detach().float().cpu().clone()
        for name, layer in vera_layers(model).items()
        for which, param in layer.method.vectors(layer).items()
    }


def check_vector_state(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter", method: Method | None = None
) -> None:
    """Raise one line naming the first vector that `state` lacks, adds or shapes otherwise than
    the model's layers hold them (or, with `method`, than that method's vectors for them)."""
    expected = {
        f"{name}.{which}": shape
        for name, layer in vera_layers(model).items()
        for which, shape in (method or layer.method).shapes(layer.projections[0].rank, layer.out_features).items()
    }
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "it was made for another base or other target modules"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, this model needs {shape}")


def load_vector_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy vectors in place (parameters keep their identity, so optimizers stay valid)."""
    check_vector_state(model, state)
    with torch.no_grad():
        for name, layer in vera_layers(model).items():
            for which, param in layer.method.vectors(layer).items():
                param.data = state[f"{name}.{which}"].to(device=param.device, dtype=torch.float32).clone()
