"""Upstream peft's VeRA format, both ways.

peft writes `adapter_config.json` (its VeraConfig: `r`, `projection_prng_key` = our seed,
`save_projection`, `d_initial`, `target_modules`, ...) and `adapter_model.safetensors` with
`base_model.model.<layer>.vera_lambda_d` / `vera_lambda_b`, plus `base_model.vera_A` /
`base_model.vera_B` when the projections are saved. qvera generates A and B exactly as
peft does, so equal vectors give equal logits and only the names change.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import safetensors.torch
import torch
from peft import VeraConfig as PeftVeraConfig
from torch import nn

from qvera.adapters.atomic import atomic_folder
from qvera.adapters.config import PEFT_FORMAT, Adapter, AdapterConfig, BaseModel, Projections
from qvera.adapters.fit import (
    check_fits,
    describe_base,
    model_projections,
    model_targets,
    projection_shapes,
    projections_fingerprint,
)
from qvera.adapters.format import adapter_from_model
from qvera.core.base import BUILTIN_SMOLLM2, resolve_model_path
from qvera.core.methods import method_named
from qvera.core.random_base import is_random
from qvera.core.vera import generate_projections

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_FILES = {PEFT_CONFIG, PEFT_WEIGHTS, "README.md"}
PREFIX = "base_model.model."
VECTOR_SUFFIXES = {".vera_lambda_d": ".lambda_d", ".vera_lambda_b": ".lambda_b"}


def export_peft(source: nn.Module | Adapter, folder: str | Path, *, save_projection: bool = False) -> Path:
    """Write a model's adapter (or an Adapter read from a folder) so that peft's
    `PeftModel.from_pretrained(base, folder)` loads it.

    `save_projection` is peft's option of the same name: A and B go into the file too (larger,
    but peft then needs no regeneration); qvera's fingerprint makes them unnecessary for qvera.
    """
    adapter = source if isinstance(source, Adapter) else adapter_from_model(source)
    config = adapter.config
    if refusal := no_peft_vera(config.method):
        raise ValueError(refusal)
    tensors = {}
    for key, value in adapter.vectors.items():
        layer, _, which = key.rpartition(".")
        tensors[f"{PREFIX}{layer}.vera_{which}"] = value.float().contiguous()
    if save_projection:
        tensors["base_model.vera_A"], tensors["base_model.vera_B"] = regenerated_projections(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that save_projection=False relies on the seed: intended
        peft_config = PeftVeraConfig(
            r=config.rank,
            target_modules=sorted(config.targets),
            projection_prng_key=config.seed,
            save_projection=save_projection,
            d_initial=config.d_initial,
            base_model_name_or_path=peft_base_name(config.base_model.name),
            revision=config.base_model.revision,
            inference_mode=True,
        )
    folder = Path(folder)
    with atomic_folder(folder, replaceable=PEFT_FILES) as staging:
        safetensors.torch.save_file(tensors, staging / PEFT_WEIGHTS, metadata={"format": "pt"})
        peft_config.save_pretrained(str(staging))
    return folder


def no_peft_vera(method: str) -> str | None:
    """Why peft's VeRA cannot hold an adapter of `method`, in one line; None where it can."""
    if method_named(method).peft_vera:
        return None
    return f"peft has no {method_named(method).title} adapter type; export to qvera's format or merge instead"


def regenerated_projections(config: AdapterConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B (fp32, at their widest) regenerated from an adapter description's seed, checked
    against its fingerprint where it records one."""
    a_shape, b_shape = projection_shapes(config.rank, config.targets)
    A, B = generate_projections(config.rank, a_shape[1], b_shape[0], config.seed)
    if config.projections.fingerprint not in (None, projections_fingerprint(A, B)):
        raise ValueError(
            f"the projections regenerated from seed {config.seed} do not match the adapter's fingerprint; "
            "this torch build draws other random numbers, so the adapter cannot be exported for peft"
        )
    return A, B


def peft_base_name(name: str | None) -> str | None:
    """What `base_model_name_or_path` says for peft: qvera's own names (the built-in
    `smollm2-135m`, `random:...`) mean nothing to peft, so they become the local folder they
    resolve to (converted once, under QVERA_CACHE); hub ids and folders stay as they are."""
    if name == BUILTIN_SMOLLM2 or (name is not None and is_random(name)):
        return str(Path(resolve_model_path(name)).resolve())
    return name


def import_peft(folder: str | Path) -> Adapter:
    """Read a peft VeRA adapter folder (with or without saved projections) as an Adapter, ready
    for `qvera.adapters.attach_adapter`. The folder does not record the layers' input sizes
    (nor, without saved projections, a fingerprint): `complete_from_model` adds them from a
    model, for `write_adapter`."""
    folder = Path(folder)
    peft_config = _read_peft_config(folder)
    rank, seed = peft_config["r"], peft_config.get("projection_prng_key", 0)
    vectors, A, B = _read_peft_weights(folder / PEFT_WEIGHTS, rank)
    fingerprint = None
    if A is not None:
        regenerated = generate_projections(rank, A.shape[1], B.shape[0], seed)
        if not (torch.equal(A.float(), regenerated[0]) and torch.equal(B.float(), regenerated[1])):
            raise ValueError(
                f"{folder}: the saved projections differ from those projection_prng_key={seed} generates here; "
                "qvera regenerates A and B from the seed, so it cannot run this adapter"
            )
        fingerprint = projections_fingerprint(A, B)
    targets = {
        key.removesuffix(".lambda_b"): [value.shape[0], None]
        for key, value in vectors.items()
        if key.endswith(".lambda_b")
    }
    config = AdapterConfig(
        format=PEFT_FORMAT,  # write_adapter stamps qvera's own format when saving it
        format_version=peft_config.get("peft_version"),
        rank=rank,
        seed=seed,
        d_initial=peft_config.get("d_initial", 0.1),
        target_modules=sorted(targets),
        targets=targets,
        base_model=BaseModel(
            name=peft_config.get("base_model_name_or_path"), revision=peft_config.get("revision"), content_hash=None
        ),
        projections=Projections(dtype="float32", fingerprint=fingerprint),
    )
    return Adapter(config, vectors, folder)


def complete_from_model(adapter: Adapter, model: nn.Module) -> Adapter:
    """A peft adapter checked against `model` (bare, VeRA-attached, or built on the meta device)
    and its description completed from it: input sizes, base, projections' shapes and
    fingerprint, so that `write_adapter` saves it as a qvera folder. peft records no checkable
    base identity, so the model stands for the base."""
    fit = check_fits(adapter, model)
    config = adapter.config
    here = model_targets(model, config.targets)
    targets = {name: [out_features, here[name][1]] for name, (out_features, _) in config.targets.items()}
    A, B = fit.projections or model_projections(model, config.rank, config.seed, targets)
    a_shape, b_shape = projection_shapes(config.rank, targets)
    completed = dataclasses.replace(
        config,
        targets=targets,
        base_model=BaseModel(**describe_base(model)),
        projections=Projections(dtype="float32", A=a_shape, B=b_shape, fingerprint=projections_fingerprint(A, B)),
    )
    return Adapter(completed, adapter.vectors, adapter.folder)


def _peft_config(folder: Path) -> dict:
    path = folder / PEFT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {PEFT_CONFIG}; pass a folder written by peft's save_pretrained")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is truncated or corrupted ({err})") from err


def peft_type(folder: str | Path) -> str | None:
    """The adapter type a peft folder declares (VERA, LORA, ...)."""
    return _peft_config(Path(folder)).get("peft_type")


def _read_peft_config(folder: Path) -> dict:
    config = _peft_config(folder)
    if config.get("peft_type") != "VERA":
        raise ValueError(f"{folder} is a {config.get('peft_type')} adapter, not VeRA; qvera reads VeRA adapters only")
    unsupported = {k: config[k] for k in ("modules_to_save", "layers_to_transform") if config.get(k)}
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if unsupported:
        raise ValueError(f"{folder} uses peft options qvera does not support ({unsupported}); train it without them")
    return config


def _read_peft_weights(path: Path, rank: int):
    """The vectors under qvera's names, and A and B when saved (else None)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; peft VeRA adapters are read from safetensors files")
    try:
        tensors = safetensors.torch.load(path.read_bytes())
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{path} is truncated or corrupted ({err})") from err
    A, B = tensors.pop("base_model.vera_A", None), tensors.pop("base_model.vera_B", None)
    vectors = {}
    for key, value in tensors.items():
        suffix = next((s for s in VECTOR_SUFFIXES if key.endswith(s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise ValueError(f"{path} holds {key!r}, which is not a VeRA vector; qvera reads VeRA adapters only")
        vectors[key[len(PREFIX) : -len(suffix)] + VECTOR_SUFFIXES[suffix]] = value.float()
    for key, value in vectors.items():
        if key.endswith(".lambda_d") and value.shape != (rank,):
            raise ValueError(f"{path}: {key} has {value.shape[0]} entries but adapter_config.json says r={rank}")
    return vectors, A, B
