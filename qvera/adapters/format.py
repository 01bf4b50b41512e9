"""The adapter folder format: the vectors, a JSON description, a model card; nothing else.

A and B are not saved: they are regenerated from the seed and checked against the
fingerprint recorded at export (sha256 of A then B as generated, fp32 bytes), so an adapter
of a 7B model at rank 512 is a few MB. Folder layout:

    qvera_adapter.json   `qvera.adapters.config.AdapterConfig`: format version, method, rank,
                         seed, d_initial, targets and their shapes, base model, projections'
                         dtype and fingerprint, vectors' checksum, and `checksum`: sha256 of
                         the file's own other fields (canonical JSON), so a hand edit is
                         reported as one (files without it still load)
    vectors.safetensors  `<layer>.<suffix>` for each vector the method saves (lambda_d and
                         lambda_b; DVoRA adds lambda_m), fp32 (or bf16)
    README.md            a short model card

Versions: 1 is plain VeRA (written so still, so that older qvera reads it); 2 was DVoRA,
marked by `"magnitude": true`, and still reads as `method: dvora`; 3 names its method, and is
what every method but plain VeRA writes, so that a qvera that predates it refuses the file.

Writer and reader of the format stay in this one module (over 300 lines): a change to either
side is a change to the format, and belongs in one diff with its twin.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from qvera.adapters.atomic import atomic_folder, read_files
from qvera.adapters.config import (
    DTYPES,
    FORMAT,
    VECTORS_FILE,
    Adapter,
    AdapterConfig,
    BaseModel,
    Projections,
    Vectors,
)
from qvera.adapters.fit import (
    describe_base,
    projection_shapes,
    projections_fingerprint,
    target_shapes,
)
from qvera.core.attach import shared_projections, vector_state, vera_layers
from qvera.core.config import from_dict
from qvera.core.methods import METHODS, method_named
from qvera.core.vera import generate_projections
from qvera.version import __version__

FORMAT_VERSION = 3  # the newest version this qvera reads
PLAIN_FORMAT_VERSION = 1  # what plain VeRA adapters are written as, so older qvera still reads them
CONFIG_FILE = "qvera_adapter.json"
CARD_FILE = "README.md"
ADAPTER_FILES = {CONFIG_FILE, VECTORS_FILE, CARD_FILE}
PEFT_CONFIG_FILE = "adapter_config.json"
CHECKSUM_FIELD = "checksum"
LEGACY_METHOD_KEY = "magnitude"  # version 2 marked DVoRA with it
# What a file must hold (an AdapterConfig made in memory may lack format_version and vectors).
REQUIRED = {
    "format_version", "rank", "seed", "d_initial", "target_modules", "targets", "base_model", "projections", "vectors"
}  # fmt: skip


def format_version(method: str) -> int:
    """1 for plain VeRA, else 3 (a qvera reading only versions 1 and 2 must refuse the file)."""
    return PLAIN_FORMAT_VERSION if method == "vera" else FORMAT_VERSION


def adapter_from_model(model: nn.Module) -> Adapter:
    """The adapter a model with VeRA attached carries now."""
    if getattr(model, "qvera_merged", None) is not None:
        raise ValueError("the adapter is merged into the weights; call qvera.merge.unmerge(model) before saving it")
    projections = shared_projections(model)
    vera = model.vera_config
    config = AdapterConfig(
        format=FORMAT,
        format_version=format_version(vera.method),
        qvera_version=__version__,
        rank=projections.rank,
        seed=projections.seed,
        d_initial=vera.d_initial,
        method=vera.method,
        target_modules=vera.target_modules,
        targets=target_shapes(model),
        base_model=BaseModel(**describe_base(model)),
        projections=Projections(
            dtype=str(projections.A.dtype).removeprefix("torch."),
            A=list(projections.A.shape),
            B=list(projections.B.shape),
            fingerprint=projections_fingerprint(projections.A, projections.B),
        ),
    )
    return Adapter(config, vector_state(model))


def serialize_vectors(vectors: dict[str, torch.Tensor], dtype: torch.dtype) -> bytes:
    """The exact bytes of vectors.safetensors (also how `adapter_size` counts, without a file)."""
    return safetensors.torch.save({k: v.to(dtype).contiguous() for k, v in sorted(vectors.items())}, {"format": "pt"})


def write_adapter(adapter: Adapter, folder: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write an Adapter as a qvera adapter folder (vectors first, the JSON that vouches for them last).

    Raises ValueError for vectors holding NaN or infinite numbers (nothing is written), and
    `qvera.adapters.atomic.FolderWriteError` (an OSError) for a disk error, what `folder` held
    before left untouched."""
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"adapter vectors are saved as float32 or bfloat16, not {dtype}")
    folder = Path(folder)
    if found := _non_finite(adapter.vectors):
        raise ValueError(
            f"not saving {folder}: {found}; the training diverged, resume from an earlier checkpoint "
            "with a lower learning rate"
        )
    data = serialize_vectors(adapter.vectors, dtype)
    typed = dataclasses.replace(
        adapter.config,
        format=FORMAT,
        format_version=format_version(adapter.config.method),
        qvera_version=__version__,
        vectors=Vectors(
            file=VECTORS_FILE,
            dtype=names[dtype],
            parameters=sum(v.numel() for v in adapter.vectors.values()),
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        ),
        checksum=None,
    )
    config = {k: v for k, v in dataclasses.asdict(typed).items() if k != CHECKSUM_FIELD}
    config[CHECKSUM_FIELD] = config_checksum(config)
    card, description = model_card(typed), json.dumps(config, indent=2) + "\n"
    with atomic_folder(folder, replaceable=ADAPTER_FILES, size=len(data) + len(card) + len(description)) as staging:
        (staging / VECTORS_FILE).write_bytes(data)
        (staging / CARD_FILE).write_text(card)
        (staging / CONFIG_FILE).write_text(description)
    return folder


def _non_finite(vectors: dict[str, torch.Tensor]) -> str | None:
    """The first vector holding NaN or infinite numbers, described; None where all are finite."""
    if not vectors or torch.isfinite(torch.cat([v.reshape(-1) for v in vectors.values()])).all():
        return None  # one pass over all the numbers: the common case
    for key, value in sorted(vectors.items()):
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            return f"{key} holds {bad} NaN or infinite number{'s' if bad > 1 else ''} of {value.numel()}"
    return None


def config_checksum(config: dict) -> str:
    """sha256 of the canonical JSON of every field but the checksum itself."""
    fields = {k: v for k, v in config.items() if k != CHECKSUM_FIELD}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_adapter(model: nn.Module, folder: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Save the adapter a model with VeRA carries (its vectors and description), atomically."""
    return write_adapter(adapter_from_model(model), folder, dtype=dtype)


def model_card(config: AdapterConfig) -> str:
    """The adapter folder's README: what it is and how to load it."""
    base, vectors, targets = config.base_model, config.vectors, config.target_modules
    return (
        f"# {method_named(config.method).title} adapter\n\n"
        f"- base model: {base.name or 'unnamed'} (revision {base.revision or '-'}, "
        f"content hash {(base.content_hash or '-')[:16]})\n"
        f"- rank {config.rank}, projection seed {config.seed}, {len(config.targets)} adapted layers "
        f"({targets if isinstance(targets, str) else ', '.join(targets)})\n"
        f"- {vectors.parameters:,} trained numbers ({vectors.dtype}, {vectors.bytes:,} bytes)\n"
        f"- projections fingerprint (sha256 of A and B): {config.projections.fingerprint}\n\n"
        f"Made with qvera {config.qvera_version}. Load it with\n\n"
        f"    from qvera import load_base\n"
        f"    from qvera.adapters import attach_adapter\n"
        f"    model, tokenizer = load_base({base.name!r})\n"
        f"    attach_adapter(model, 'path/to/this/folder')\n"
    )


def read_adapter(folder: str | Path) -> Adapter:
    """Read an adapter folder, checking its files (not whether it fits a model: whoever attaches
    it checks that once, with qvera.adapters.fit.check_fits).

    The files are read as one version of the folder (`qvera.adapters.atomic.read_files`), so a
    write replacing the folder meanwhile never makes a whole adapter look corrupted. Raises
    FileNotFoundError for a missing folder, ValueError (one line naming the file and the fix)
    for anything wrong in it."""
    folder = Path(folder)
    try:
        files = read_files(folder, [CONFIG_FILE, VECTORS_FILE, PEFT_CONFIG_FILE])
    except (FileNotFoundError, NotADirectoryError) as err:
        raise FileNotFoundError(f"adapter folder {folder} does not exist") from err
    config = _read_config(folder, files)
    return Adapter(config, _read_vectors(folder, config, files[VECTORS_FILE]), folder)


def _read_config(folder: Path, files: dict[str, bytes | None]) -> AdapterConfig:
    path = folder / CONFIG_FILE
    if files[CONFIG_FILE] is None:
        if files[PEFT_CONFIG_FILE] is not None:
            raise ValueError(
                f"{folder} is a peft adapter; read it with "
                "qvera.peft_interop.import_peft or convert it with `qvera convert`"
            )
        raise ValueError(
            f"{folder} is not a qvera adapter folder (no {CONFIG_FILE}); pass a folder written by save_adapter"
        )
    try:
        raw = json.loads(files[CONFIG_FILE])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is truncated or corrupted ({err}); export the adapter again") from err
    except RecursionError as err:  # nested thousands deep: nothing save_adapter writes
        raise ValueError(f"{path} is not a qvera adapter description; export the adapter again") from err
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a qvera adapter description; export the adapter again")
    version = raw.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {version}, newer than this qvera reads ({FORMAT_VERSION}); upgrade qvera"
        )
    values = dict(raw)
    if LEGACY_METHOD_KEY in values and version in (1, 2):
        values["method"] = "dvora" if values.pop(LEGACY_METHOD_KEY) is True else "vera"
    missing = sorted(REQUIRED - set(values))
    if missing:
        raise ValueError(f"{path} lacks {missing}; the file is damaged, export the adapter again")
    if isinstance(values.get("method"), str) and values["method"] not in METHODS:
        raise ValueError(
            f"{path} is a {values['method']!r} adapter, a method this qvera does not know "
            f"({', '.join(sorted(METHODS))}); upgrade qvera or install what registers it"
        )
    try:
        config = from_dict(AdapterConfig, values, source=str(path), as_json=True)
    except ValueError as err:
        raise ValueError(f"{err}; export the adapter again") from None
    if CHECKSUM_FIELD in raw and raw[CHECKSUM_FIELD] != config_checksum(raw):
        found = _edits(config, files[VECTORS_FILE]) or [
            "which field changed cannot be told, it is one the vectors do not vouch for "
            "(d_initial, target_modules, base_model, ...)"
        ]
        raise ValueError(
            f"{path} was edited after export (its checksum does not match): {'; '.join(found)}; "
            "restore the original file or export the adapter again"
        )
    return config


def _edits(config: AdapterConfig, data: bytes | None) -> list[str]:
    """The fields of an edited qvera_adapter.json that disagree with the vectors (`data`, the
    bytes of vectors.safetensors) or the projections they imply; empty when the edit is in a
    field nothing else vouches for."""
    if data is None:
        return []
    try:
        vectors = _load_safetensors(data, VECTORS_FILE)
    except ValueError:
        return []
    found = []
    if hashlib.sha256(data).hexdigest() != config.vectors.sha256 or len(data) != config.vectors.bytes:
        found.append(f"vectors.sha256 or vectors.bytes does not describe {VECTORS_FILE}")
    if config.vectors.parameters != sum(v.numel() for v in vectors.values()):
        found.append(
            f"vectors.parameters is {config.vectors.parameters}, the vectors hold "
            f"{sum(v.numel() for v in vectors.values())}"
        )
    ranks = {v.shape[0] for k, v in vectors.items() if k.endswith(".lambda_d")}
    if len(ranks) != 1:
        return found
    rank = ranks.pop()
    if config.rank != rank:
        found.append(f"rank is {config.rank}, the vectors have rank {rank}")
    outs = {k.removesuffix(".lambda_b"): v.shape[0] for k, v in vectors.items() if k.endswith(".lambda_b")}
    targets = config.targets
    if set(targets) != set(outs):
        name = sorted(set(targets) ^ set(outs))[0]
        found.append(f"targets lists {name}, which has no vectors" if name in targets else f"targets lacks {name}")
        return found
    for name, (out_features, _) in sorted(targets.items()):
        if out_features != outs[name]:
            found.append(f"targets gives {name} {out_features} outputs, its lambda_b has {outs[name]}")
    recorded = config.projections
    if recorded.A is None:
        return found
    implied = list(projection_shapes(rank, targets))
    if [recorded.A, recorded.B] != implied:
        found.append(
            f"projections.A and B are {recorded.A} and {recorded.B}, the targets imply {implied[0]} and "
            f"{implied[1]} (a width in targets or projections was changed)"
        )
    elif recorded.fingerprint is not None:
        A, B = generate_projections(rank, recorded.A[1], recorded.B[0], config.seed)
        if projections_fingerprint(A, B) != recorded.fingerprint:
            found.append(
                f"seed {config.seed} does not regenerate the projections its fingerprint records "
                "(seed or projections.fingerprint was changed)"
            )
    return found


def _read_vectors(folder: Path, config: AdapterConfig, data: bytes | None) -> dict[str, torch.Tensor]:
    path = folder / VECTORS_FILE  # config["vectors"]["file"] is checked to be this name
    if data is None:
        raise ValueError(f"{path} is missing; the adapter folder is incomplete, export it again")
    if len(data) != config.vectors.bytes or hashlib.sha256(data).hexdigest() != config.vectors.sha256:
        raise ValueError(
            f"{path} is truncated or corrupted ({len(data):,} bytes, "
            f"checksum differs from {CONFIG_FILE}); export the adapter again"
        )
    loaded = _load_safetensors(data, path)
    dtype = DTYPES[config.vectors.dtype]
    for key, value in sorted(loaded.items()):
        if value.dtype != dtype:
            raise ValueError(
                f"{path}: {key} is {str(value.dtype).removeprefix('torch.')}, {CONFIG_FILE} says "
                f"{config.vectors.dtype}; export the adapter again"
            )
    vectors = {k: v.float() for k, v in loaded.items()}
    method = method_named(config.method)
    expected = {
        f"{name}.{which}": shape
        for name, (out_features, _) in config.targets.items()
        for which, shape in method.shapes(config.rank, out_features).items()
    }
    found = {k: tuple(v.shape) for k, v in vectors.items()}
    for key in sorted(set(found) | set(expected)):
        if found.get(key) != expected.get(key):
            raise ValueError(
                f"{path} does not match {CONFIG_FILE} (rank {config.rank}): {key} is "
                f"{_shape(found.get(key))} in the vectors, {_shape(expected.get(key))} in {CONFIG_FILE}; "
                "export the adapter again"
            )
    if found := _non_finite(vectors):
        raise ValueError(
            f"{path}: {found}, so the model would give NaN; its training diverged: train it again "
            "with a lower learning rate or use an earlier checkpoint"
        )
    return vectors


def _load_safetensors(data: bytes, path: Path | str) -> dict[str, torch.Tensor]:
    """The tensors in the safetensors bytes read from `path`; one-line ValueError for anything
    else (a pickle saved under its name, a header torch has no dtype or shape for)."""
    try:
        return safetensors.torch.load(data)
    except Exception as err:  # SafetensorError from safetensors, KeyError or TypeError from torch
        raise ValueError(
            f"{path} is not a safetensors file qvera reads ({str(err).splitlines()[0]}); "
            "export the adapter again with save_adapter"
        ) from err


def _shape(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else f"of shape {shape}"


def adapter_size(model: nn.Module) -> dict[str, int]:
    """Trained numbers and the exact vectors.safetensors size in fp32 and bf16, for a model
    with VeRA attached (a meta-device model will do: only shapes are read)."""
    vectors = {}
    for name, layer in vera_layers(model).items():
        for which, param in layer.method.vectors(layer).items():
            vectors[f"{name}.{which}"] = torch.zeros(param.shape)
    return {
        "parameters": sum(v.numel() for v in vectors.values()),
        "float32_bytes": len(serialize_vectors(vectors, torch.float32)),
        "bfloat16_bytes": len(serialize_vectors(vectors, torch.bfloat16)),
    }


def describe(adapter: Adapter, folder: str | Path | None = None) -> str:
    """What `qvera inspect` prints: rank, targets, sizes, base model and fingerprint."""
    config = adapter.config
    kinds: dict[str, int] = {}
    for name in config.targets:
        kinds[name.rsplit(".", 1)[-1]] = kinds.get(name.rsplit(".", 1)[-1], 0) + 1
    parameters = sum(v.numel() for v in adapter.vectors.values())
    base = config.base_model
    lines = [
        f"format:       {config.format} v{config.format_version}" + (f" ({folder})" if folder else ""),
        f"method:       {method_named(config.method).title}",
        f"rank:         {config.rank} (projection seed {config.seed}, d_initial {config.d_initial})",
        f"targets:      {len(config.targets)} layers: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())),
        f"parameters:   {parameters:,} ({4 * parameters:,} bytes fp32, {2 * parameters:,} bytes bf16)",
    ]
    if config.vectors is not None:
        lines.append(f"vectors file: {config.vectors.file}, {config.vectors.dtype}, {config.vectors.bytes:,} bytes")
    lines += [
        f"base model:   {base.name or '-'} (revision {base.revision or '-'}, content hash {base.content_hash or '-'})",
        f"fingerprint:  {config.projections.fingerprint or 'not recorded'}",
        f"checksum:     {'verified' if config.checksum else 'not recorded'}",
    ]
    return "\n".join(lines)
