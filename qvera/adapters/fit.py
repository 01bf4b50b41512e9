"""Does an adapter fit a model? Base identity, target layers and shapes, rank, seed and the
projections' fingerprint, checked before any computation, each failure one line naming it.

Whoever attaches an adapter checks it once (`check_fits`); on a bare model the check generates
A and B to compare fingerprints, and hands them back (`Fit`) so that attaching uses them
rather than generating them again."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qvera.adapters.config import PEFT_FORMAT, Adapter, BaseModel
from qvera.core.attach import (
    find_targets,
    has_vera,
    shared_projections,
    vera_layers,
)
from qvera.core.vera import generate_projections


def projections_fingerprint(A: torch.Tensor, B: torch.Tensor) -> str:
    """sha256 over A then B as fp32 C-order bytes: proves the regenerated matrices are the trained ones."""
    digest = hashlib.sha256()
    for matrix in (A, B):
        digest.update(matrix.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def folder_content_hash(folder: str | Path) -> str | None:
    """sha256 over config.json and each weight file's name, size, first and last MiB.

    Names a local base by content, so an adapter still fits when the folder moves; reading
    only the ends of the files keeps it constant-time for a 13 GB base.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return None
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    chunk = 1 << 20
    for path in sorted(folder.iterdir()):
        if path.suffix not in (".safetensors", ".bin", ".gguf"):
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            digest.update(f.read(chunk))
            f.seek(max(size - chunk, 0))
            digest.update(f.read(chunk))
    return digest.hexdigest()


def describe_base(model: nn.Module) -> dict:
    """Which base the model is: the name it was loaded by, its hub revision, and for a local
    folder a content hash."""
    config = getattr(model, "config", None)
    path = getattr(config, "_name_or_path", "") or ""
    return {
        "name": getattr(model, "qvera_base_name", None),
        "revision": getattr(config, "_commit_hash", None),
        "content_hash": folder_content_hash(path) if path and Path(path).is_dir() else None,
    }


def target_shapes(model: nn.Module) -> dict[str, list[int]]:
    """[out, in] of every VeRA layer (works on a meta-device model too)."""
    return {name: [layer.out_features, layer.in_features] for name, layer in sorted(vera_layers(model).items())}


def projection_shapes(rank: int, targets: dict[str, list[int]]) -> tuple[list[int], list[int]]:
    """A is rank x (widest input), B is (widest output) x rank, as attach_vera sizes them."""
    return [rank, max(s[1] for s in targets.values())], [max(s[0] for s in targets.values()), rank]


@dataclass
class Fit:
    """What `check_fits` hands to whoever attaches: on a bare model, the A and B it generated to
    check the fingerprint (pass them to attach_vera); None where the model has VeRA attached or
    the adapter records no fingerprint."""

    projections: tuple[torch.Tensor, torch.Tensor] | None = None


def check_fits(adapter: Adapter, model: nn.Module, *, source: str | None = None) -> Fit:
    """Raise one clear line naming the first thing that differs between the adapter and the
    model (with or without VeRA attached, or its meta-device twin), before any computation;
    `source` (by default the folder the adapter was read from) starts the line."""
    source = source or str(adapter.folder or "adapter")
    config = adapter.config
    if config.format != PEFT_FORMAT:  # peft records a name to load, no identity to check
        _check_base(config.base_model, BaseModel(**describe_base(model)), source)
    here = model_targets(model, config.targets)
    _check_targets(config.targets, here, source)
    if has_vera(model):
        projections = shared_projections(model)
        rank, seed = projections.rank, projections.seed
        if config.rank != rank:
            raise ValueError(
                f"{source} has rank {config.rank}, this model's VeRA has rank {rank}; "
                f"load it on a base with rank {config.rank} attached"
            )
        if config.seed != seed:
            raise ValueError(
                f"{source} was trained with projection seed {config.seed}, this model's VeRA uses seed {seed}; "
                f"attach VeRA with seed {config.seed}"
            )
    expected = config.projections.fingerprint
    if expected is None:
        return Fit()
    A, B = model_projections(model, config.rank, config.seed, here)
    fingerprint = projections_fingerprint(A, B)
    if fingerprint != expected:
        raise ValueError(
            f"{source}: the projections regenerated from seed {config.seed} do not match its fingerprint "
            f"({fingerprint[:12]} here, {expected[:12]} recorded); this torch build draws other random numbers"
        )
    return Fit(None if has_vera(model) else (A, B))


def model_targets(model: nn.Module, names) -> dict[str, list[int]]:
    """[out, in] of the model's VeRA layers, or, on a bare model, of the named linear layers."""
    if has_vera(model):
        return target_shapes(model)
    return {n: [m.out_features, m.in_features] for n, m in find_targets(model, sorted(names)).items()}


def model_projections(model: nn.Module, rank: int, seed: int, targets: dict[str, list[int]]):
    """The model's A and B, or on a bare model those attach_vera would generate for `targets`
    ([out, in] of the model's layers)."""
    if has_vera(model):
        projections = shared_projections(model)
        return projections.A, projections.B
    a_shape, b_shape = projection_shapes(rank, targets)
    return generate_projections(rank, a_shape[1], b_shape[0], seed)


def _check_base(recorded: BaseModel, here: BaseModel, source: str) -> None:
    """Content hashes decide when both sides have one (a folder may move); else names and revisions."""
    if recorded.content_hash and here.content_hash:
        if recorded.content_hash != here.content_hash:
            raise ValueError(
                f"{source} was made for another base model ({recorded.name or 'a local folder'}, content hash "
                f"{recorded.content_hash[:12]}); this model's content hash "
                f"is {here.content_hash[:12]}; load the base it was made for"
            )
        return
    if recorded.name and here.name and recorded.name != here.name:
        raise ValueError(
            f"{source} was made for base model {recorded.name!r}, not {here.name!r}; load the base it was made for"
        )
    if recorded.revision and here.revision and recorded.revision != here.revision:
        raise ValueError(
            f"{source} was made for revision {recorded.revision} of {recorded.name!r}, this model is "
            f"revision {here.revision}; load that revision"
        )


def _check_targets(recorded: dict, here: dict, source: str) -> None:
    missing, extra = sorted(set(recorded) - set(here)), sorted(set(here) - set(recorded))
    if missing or extra:
        name = (missing or extra)[0]
        where = "this model has no such layer" if missing else "the adapter has none for it"
        raise ValueError(
            f"{source} targets other layers than this model's VeRA ({name}: {where}); "
            "load it on the base and target modules it was trained with"
        )
    for name, shape in recorded.items():
        if shape[0] != here[name][0] or shape[1] not in (None, here[name][1]):  # a peft import lacks `in`
            raise ValueError(
                f"{source}: layer {name} is {tuple(shape)} in the adapter but {tuple(here[name])} in this model "
                "(out, in); it was made for another base model"
            )
