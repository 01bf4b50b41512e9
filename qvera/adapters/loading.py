"""A base plus an adapter in one call, for every caller (CLI, evaluation, chat, serving).

An adapter folder is read once (`read_any`: no model needed) and checked once against the base
(`check_fits`) by whoever attaches it; `load_adapted` checks against the base's meta-device twin
before any weight loads, and the A and B that check generated are the ones attached."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from qvera.adapters.config import Adapter
from qvera.adapters.fit import Fit, check_fits
from qvera.adapters.format import CONFIG_FILE, PEFT_CONFIG_FILE, read_adapter
from qvera.adapters.peft_interop import import_peft, peft_type
from qvera.core.attach import attach_vera, has_vera, load_vector_state
from qvera.core.base import load_base, resolve_model_path
from qvera.core.config import ModelConfig
from qvera.core.methods import method_named


def attach_adapter(model: nn.Module, adapter: str | Path | Adapter, fit: Fit | None = None) -> nn.Module:
    """Attach VeRA as the adapter was trained and load its vectors, in one call; on a model
    with VeRA already attached, load the vectors. The fit is checked here unless `fit` says it
    was (check_fits against this model or its base's meta-device twin), and then its A and B
    are the ones attached."""
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)
    if fit is None:
        fit = check_fits(adapter, model)
    if not has_vera(model):
        attach_vera(model, adapter.config.vera_config, projections=fit.projections)
    elif adapter.config.method != model.vera_config.method:
        raise ValueError(
            f"{adapter.folder or 'the adapter'} is a {method_named(adapter.config.method).title} adapter and this "
            f"model has {method_named(model.vera_config.method).title} attached; attach with "
            f"VeraConfig(method={adapter.config.method!r}), or run it in a mixed batch (qvera.generation.bank)"
        )
    load_vector_state(model, adapter.vectors)
    return model


def meta_model(config) -> nn.Module:
    """A causal LM built from a transformers config on the meta device: shapes, no weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def meta_base(name: str, revision: str | None = None) -> nn.Module:
    """A base's architecture on the meta device, from its config alone: enough to check,
    describe and convert adapters without loading weights."""
    model = meta_model(AutoConfig.from_pretrained(resolve_model_path(name), revision=revision))
    model.qvera_base_name = name
    return model


def read_adapters_for(base: ModelConfig | str, folders) -> list[Adapter]:
    """Read each qvera or peft VeRA adapter folder and check that it fits the base, from the
    base's config alone: a wrong folder fails in seconds, not after the weights have loaded
    (minutes for a 7B base). Raises what loading would: FileNotFoundError or ValueError."""
    base = base if isinstance(base, ModelConfig) else ModelConfig(name=base)
    folders = [Path(folder) for folder in folders]
    for folder in folders:
        _require_folder(folder)
    model = meta_base(base.name, base.revision) if folders else None
    adapters = [read_any(folder) for folder in folders]
    for adapter in adapters:
        check_fits(adapter, model)
    return adapters


def _require_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist; pass the folder a training run saved")


def is_adapter_folder(folder: Path) -> bool:
    """Whether `folder` holds a qvera adapter or a peft one (`read_any` tells VeRA from the rest)."""
    return (folder / CONFIG_FILE).is_file() or (folder / PEFT_CONFIG_FILE).is_file()


def read_any(folder: str | Path) -> Adapter:
    """A qvera or a peft VeRA adapter folder, told apart by their config files."""
    if (Path(folder) / PEFT_CONFIG_FILE).is_file():
        return import_peft(folder)
    return read_adapter(folder)


def load_adapted(base: ModelConfig | str | None, adapter: str | Path | None = None, *, is_trainable: bool = False):
    """Load a base and attach an adapter to it: the one way every caller does it.

    Args:
        base: the base's ModelConfig or name; an empty name (or None) takes the one the adapter records.
        adapter: a qvera folder, a peft VeRA folder (run by qvera), or any other peft
            adapter folder such as LoRA (run by peft); None loads the bare base.
        is_trainable: for peft adapters, keep their parameters trainable (as in training,
            so an evaluation runs the same kernels).

    Returns:
        (model, tokenizer).

    Raises:
        FileNotFoundError: the adapter folder does not exist.
        ValueError: the adapter does not fit the base, or names no base and none was given.
    """
    folder = Path(adapter) if adapter is not None else None
    if folder is not None:
        _require_folder(folder)
    foreign = folder is not None and (folder / PEFT_CONFIG_FILE).is_file() and peft_type(folder) != "VERA"
    if not isinstance(base, ModelConfig):
        base = ModelConfig(name=base or "")
    adapter = read_any(folder) if folder is not None and not foreign else None
    if not base.name and adapter is not None:
        base = dataclasses.replace(base, name=adapter.config.base_model.name or "")
    if not base.name:
        raise ValueError(f"{folder} does not name its base model; pass the base's name or folder")
    if adapter is not None:  # checked before the weights load
        fit = check_fits(adapter, meta_base(base.name, base.revision))
    model, tokenizer = load_base(base)
    if folder is None:
        return model, tokenizer
    if foreign:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable), tokenizer
    attach_adapter(model, adapter, fit)
    return model, tokenizer
