"""Adapter folders: the vectors, a JSON description, a model card; nothing else.

A and B are not saved: they are regenerated from the seed and checked against the
fingerprint recorded at export (sha256 of A then B as generated, fp32 bytes), so an adapter
of a 7B model at rank 512 is a few MB. Folder layout:

    qvera_adapter.json   format version, rank, seed, d_initial, targets and their shapes,
                         base model, projections' dtype and fingerprint, vectors' checksum
    vectors.safetensors  `<layer>.lambda_d` and `<layer>.lambda_b`, fp32 (or bf16)
    README.md            a short model card

Every write goes to a staging folder beside the target and replaces it in one rename, so a
killed export leaves the previous adapter (or nothing), never a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .config import VeraConfig
from .model import PROJECTIONS_ATTR, attach_vera, find_targets, load_vector_state, shared_projections, vector_state, vera_layers
from .vera import generate_projections

FORMAT = "qvera-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "qvera_adapter.json"
VECTORS_FILE = "vectors.safetensors"
CARD_FILE = "README.md"
ADAPTER_FILES = {CONFIG_FILE, VECTORS_FILE, CARD_FILE}
PEFT_CONFIG_FILE = "adapter_config.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Adapter:
    """An adapter in memory: its description (the JSON, as a dict) and its fp32 vectors,
    keyed as `qvera.model.vector_state` keys them."""

    config: dict
    vectors: dict[str, torch.Tensor]

    @property
    def vera_config(self) -> VeraConfig:
        """The VeraConfig that recreates the adapter's layers; targets are the exact layer names."""
        return VeraConfig(
            rank=self.config["rank"],
            seed=self.config["seed"],
            d_initial=self.config["d_initial"],
            target_modules=sorted(self.config["targets"]),
        )


# --- describing a model ---------------------------------------------------------------


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


def adapter_from_model(model: nn.Module) -> Adapter:
    """The adapter a model with VeRA attached carries now."""
    if getattr(model, "qvera_merged", None) is not None:
        raise ValueError("the adapter is merged into the weights; call qvera.merge.unmerge(model) before saving it")
    projections = shared_projections(model)
    vectors = vector_state(model)
    vera = model.vera_config
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "qvera_version": _qvera_version(),
        "rank": projections.rank,
        "seed": projections.seed,
        "d_initial": vera.d_initial,
        "target_modules": vera.target_modules,
        "targets": target_shapes(model),
        "base_model": describe_base(model),
        "projections": {
            "dtype": str(projections.A.dtype).removeprefix("torch."),
            "A": list(projections.A.shape),
            "B": list(projections.B.shape),
            "fingerprint": projections_fingerprint(projections.A, projections.B),
        },
    }
    return Adapter(config, vectors)


def _qvera_version() -> str:
    from . import __version__

    return __version__


# --- writing ----------------------------------------------------------------------------


def serialize_vectors(vectors: dict[str, torch.Tensor], dtype: torch.dtype) -> bytes:
    """The exact bytes of vectors.safetensors (also how `adapter_size` counts, without a file)."""
    return safetensors.torch.save({k: v.to(dtype).contiguous() for k, v in sorted(vectors.items())}, {"format": "pt"})


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_folder(folder: str | Path, replaceable: set[str] | None = None):
    """Yield an empty staging folder; on success it takes `folder`'s place by rename.

    `replaceable`: file names an existing `folder` may hold and still be replaced (an older
    adapter); None allows only a missing or empty folder. The staging folder is a sibling, so
    the rename never crosses file systems; a killed write leaves only a hidden `.name.tmp-*`.
    """
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"{folder} is a file; give a folder path to write to")
        present = {p.name for p in folder.iterdir()}
        if present and not present <= (replaceable or set()):
            raise ValueError(
                f"{folder} already holds other files ({', '.join(sorted(present - (replaceable or set()))[:3])}); "
                "write to a new or empty folder"
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        yield staging
        _fsync_tree(staging)
        if folder.exists():
            # Two renames: the window between them is microseconds, and a crash there leaves
            # the old adapter whole under its hidden name.
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, old)
            os.rename(staging, folder)
            shutil.rmtree(old)
        else:
            os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_adapter(adapter: Adapter, folder: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write an Adapter as a qvera adapter folder (vectors first, the JSON that vouches for them last)."""
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"adapter vectors are saved as float32 or bfloat16, not {dtype}")
    folder = Path(folder)
    data = serialize_vectors(adapter.vectors, dtype)
    config = {**adapter.config, "format": FORMAT, "format_version": FORMAT_VERSION, "qvera_version": _qvera_version()}
    config["vectors"] = {
        "file": VECTORS_FILE,
        "dtype": names[dtype],
        "parameters": sum(v.numel() for v in adapter.vectors.values()),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    with atomic_folder(folder, replaceable=ADAPTER_FILES) as staging:
        (staging / VECTORS_FILE).write_bytes(data)
        (staging / CARD_FILE).write_text(model_card(config))
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def save_adapter(model: nn.Module, folder: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Save the adapter a model with VeRA carries (its vectors and description), atomically."""
    return write_adapter(adapter_from_model(model), folder, dtype=dtype)


def model_card(config: dict) -> str:
    base = config["base_model"]
    vectors = config["vectors"]
    return (
        f"# VeRA adapter\n\n"
        f"- base model: {base['name'] or 'unnamed'} (revision {base['revision'] or '-'}, "
        f"content hash {(base['content_hash'] or '-')[:16]})\n"
        f"- rank {config['rank']}, projection seed {config['seed']}, {len(config['targets'])} adapted layers "
        f"({config['target_modules'] if isinstance(config['target_modules'], str) else ', '.join(config['target_modules'])})\n"
        f"- {vectors['parameters']:,} trained numbers ({vectors['dtype']}, {vectors['bytes']:,} bytes)\n"
        f"- projections fingerprint (sha256 of A and B): {config['projections']['fingerprint']}\n\n"
        f"Made with qvera {config['qvera_version']}. Load it with\n\n"
        f"    from qvera import load_base\n"
        f"    from qvera.adapters import attach_adapter\n"
        f"    model, tokenizer = load_base({base['name']!r})\n"
        f"    attach_adapter(model, 'path/to/this/folder')\n"
    )


# --- reading and checking ---------------------------------------------------------------


def read_adapter(folder: str | Path, model: nn.Module | None = None) -> Adapter:
    """Read an adapter folder, checking its files; with `model`, also check that it fits it."""
    folder = Path(folder)
    config = _read_config(folder)
    adapter = Adapter(config, _read_vectors(folder, config))
    if model is not None:
        check_fits(adapter, model, source=str(folder))
    return adapter


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    if not path.is_file():
        if (folder / PEFT_CONFIG_FILE).is_file():
            raise ValueError(
                f"{folder} is a peft adapter; read it with qvera.peft_interop.import_peft or convert it with `qvera convert`"
            )
        raise ValueError(f"{folder} is not a qvera adapter folder (no {CONFIG_FILE}); pass a folder written by save_adapter")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is truncated or corrupted ({err}); export the adapter again") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a qvera adapter description; export the adapter again")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {config['format_version']}, newer than this qvera reads "
            f"({FORMAT_VERSION}); upgrade qvera"
        )
    required = {"rank", "seed", "d_initial", "target_modules", "targets", "base_model", "projections", "vectors"}
    missing = sorted(required - set(config))
    if missing:
        raise ValueError(f"{path} lacks {missing}; the file is damaged, export the adapter again")
    return config


def _read_vectors(folder: Path, config: dict) -> dict[str, torch.Tensor]:
    path = folder / config["vectors"]["file"]
    if not path.is_file():
        raise ValueError(f"{path} is missing; the adapter folder is incomplete, export it again")
    data = path.read_bytes()
    if len(data) != config["vectors"]["bytes"] or hashlib.sha256(data).hexdigest() != config["vectors"]["sha256"]:
        raise ValueError(
            f"{path} is truncated or corrupted ({len(data):,} bytes, checksum differs from {CONFIG_FILE}); export the adapter again"
        )
    vectors = {k: v.float() for k, v in safetensors.torch.load(data).items()}
    expected = {}
    for name, (out_features, _) in config["targets"].items():
        expected[f"{name}.lambda_d"] = (config["rank"],)
        expected[f"{name}.lambda_b"] = (out_features,)
    found = {k: tuple(v.shape) for k, v in vectors.items()}
    if found != expected:
        raise ValueError(f"{path} does not match the targets listed in {CONFIG_FILE}; export the adapter again")
    return vectors


def check_fits(adapter: Adapter, model: nn.Module, *, source: str = "adapter") -> None:
    """Raise one clear line naming the first thing that differs between the adapter and the
    model (with or without VeRA attached), before any computation."""
    config = adapter.config
    _check_base(config["base_model"], describe_base(model), source)
    _check_targets(config["targets"], model_targets(model, config["targets"]), source)
    if hasattr(model, PROJECTIONS_ATTR):
        projections = shared_projections(model)
        rank, seed = projections.rank, projections.seed
        if config["rank"] != rank:
            raise ValueError(
                f"{source} has rank {config['rank']}, this model's VeRA has rank {rank}; "
                f"load it on a base with rank {config['rank']} attached"
            )
        if config["seed"] != seed:
            raise ValueError(
                f"{source} was trained with projection seed {config['seed']}, this model's VeRA uses seed {seed}; "
                f"attach VeRA with seed {config['seed']}"
            )
    expected = config["projections"]["fingerprint"]
    if expected is None:
        return
    fingerprint = model_fingerprint(model, config["rank"], config["seed"], config["targets"])
    if fingerprint != expected:
        raise ValueError(
            f"{source}: the projections regenerated from seed {config['seed']} do not match its fingerprint "
            f"({fingerprint[:12]} here, {expected[:12]} recorded); this torch build draws other random numbers"
        )


def model_targets(model: nn.Module, names) -> dict[str, list[int]]:
    """[out, in] of the model's VeRA layers, or, on a bare model, of the named linear layers."""
    if hasattr(model, PROJECTIONS_ATTR):
        return target_shapes(model)
    return {n: [m.out_features, m.in_features] for n, m in find_targets(model, sorted(names)).items()}


def model_fingerprint(model: nn.Module, rank: int, seed: int, targets: dict[str, list[int]]) -> str:
    """The fingerprint of the model's projections, or of those attach_vera would generate."""
    if hasattr(model, PROJECTIONS_ATTR):
        projections = shared_projections(model)
        return projections_fingerprint(projections.A, projections.B)
    a_shape, b_shape = projection_shapes(rank, targets)
    return projections_fingerprint(*generate_projections(rank, a_shape[1], b_shape[0], seed))


def _check_base(recorded: dict, here: dict, source: str) -> None:
    """Content hashes decide when both sides have one (a folder may move); else names and revisions."""
    if recorded["content_hash"] and here["content_hash"]:
        if recorded["content_hash"] != here["content_hash"]:
            raise ValueError(
                f"{source} was made for another base model ({recorded['name'] or 'a local folder'}, content hash "
                f"{recorded['content_hash'][:12]}); this model's content hash is {here['content_hash'][:12]}; load the base it was made for"
            )
        return
    if recorded["name"] and here["name"] and recorded["name"] != here["name"]:
        raise ValueError(f"{source} was made for base model {recorded['name']!r}, not {here['name']!r}; load the base it was made for")
    if recorded["revision"] and here["revision"] and recorded["revision"] != here["revision"]:
        raise ValueError(
            f"{source} was made for revision {recorded['revision']} of {recorded['name']!r}, this model is "
            f"revision {here['revision']}; load that revision"
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
        if list(shape) != list(here[name]):
            raise ValueError(
                f"{source}: layer {name} is {tuple(shape)} in the adapter but {tuple(here[name])} in this model "
                "(out, in); it was made for another base model"
            )


def attach_adapter(model: nn.Module, adapter: str | Path | Adapter) -> nn.Module:
    """Attach VeRA as the adapter was trained and load its vectors, in one call; on a model
    with VeRA already attached, check the fit and load the vectors."""
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)
    check_fits(adapter, model)
    if not hasattr(model, PROJECTIONS_ATTR):
        attach_vera(model, adapter.vera_config)
    load_vector_state(model, adapter.vectors)
    return model


# --- sizes and inspection ---------------------------------------------------------------


def adapter_size(model: nn.Module) -> dict[str, int]:
    """Trained numbers and the exact vectors.safetensors size in fp32 and bf16, for a model
    with VeRA attached (a meta-device model will do: only shapes are read)."""
    vectors = {}
    for name, layer in vera_layers(model).items():
        vectors[f"{name}.lambda_d"] = torch.zeros(layer.lambda_d.shape)
        vectors[f"{name}.lambda_b"] = torch.zeros(layer.lambda_b.shape)
    return {
        "parameters": sum(v.numel() for v in vectors.values()),
        "float32_bytes": len(serialize_vectors(vectors, torch.float32)),
        "bfloat16_bytes": len(serialize_vectors(vectors, torch.bfloat16)),
    }


def meta_model(config) -> nn.Module:
    """A causal LM built from a transformers config on the meta device: shapes, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def meta_base(name: str) -> nn.Module:
    """A base's architecture on the meta device, from its config alone: enough to check,
    describe and convert adapters without loading weights."""
    from transformers import AutoConfig

    from .base import resolve_model_path

    model = meta_model(AutoConfig.from_pretrained(resolve_model_path(name)))
    model.qvera_base_name = name
    return model


def llama2_7b_adapter_size(rank: int = 512) -> dict[str, int]:
    """Adapter size for Llama-2-7B with VeRA on all linear layers, measured on a meta-device model."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    return adapter_size(attach_vera(meta_model(config), VeraConfig(rank=rank)))


def describe(adapter: Adapter, folder: str | Path | None = None) -> str:
    """What `qvera inspect` prints: rank, targets, sizes, base model and fingerprint."""
    config = adapter.config
    kinds: dict[str, int] = {}
    for name in config["targets"]:
        kinds[name.rsplit(".", 1)[-1]] = kinds.get(name.rsplit(".", 1)[-1], 0) + 1
    parameters = sum(v.numel() for v in adapter.vectors.values())
    base = config["base_model"]
    lines = [
        f"format:       {config['format']} v{config['format_version']}" + (f" ({folder})" if folder else ""),
        f"rank:         {config['rank']} (projection seed {config['seed']}, d_initial {config['d_initial']})",
        f"targets:      {len(config['targets'])} layers: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())),
        f"parameters:   {parameters:,} ({4 * parameters:,} bytes fp32, {2 * parameters:,} bytes bf16)",
    ]
    if "vectors" in config:
        lines.append(f"vectors file: {config['vectors']['file']}, {config['vectors']['dtype']}, {config['vectors']['bytes']:,} bytes")
    lines += [
        f"base model:   {base['name'] or '-'} (revision {base['revision'] or '-'}, content hash {base['content_hash'] or '-'})",
        f"fingerprint:  {config['projections']['fingerprint'] or 'not recorded'}",
    ]
    return "\n".join(lines)
