"""An adapter's description, typed: what qvera_adapter.json holds (format.py) and what the fit
checks (fit.py) read. Checked once, by `qvera.core.config.from_dict`, where a file is read;
code below trusts it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qvera.core.config import VeraConfig
from qvera.core.methods import METHODS

FORMAT = "qvera-adapter"
PEFT_FORMAT = "peft-vera"  # an Adapter read from a peft folder (its base name is not checkable)
VECTORS_FILE = "vectors.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_shape(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_int(n) and n > 0 for n in value)


def checked(check, expects: str, **kwargs):
    """A field narrowed beyond its type (`from_dict` reads both): `check` tests the value,
    `expects` names what passes it."""
    return field(metadata={"check": check, "expects": expects}, **kwargs)


@dataclass
class BaseModel:
    """Which base the adapter was made for (`qvera.adapters.fit.describe_base`)."""

    name: str | None
    revision: str | None
    content_hash: str | None


@dataclass
class Projections:
    """A and B's dtype, shapes and fingerprint (sha256 of A then B, fp32 bytes); shapes and
    fingerprint are null where not known (a peft adapter read without its base)."""

    dtype: str
    A: list[int] | None = checked(lambda v: v is None or _is_shape(v), "[rank, in] or null", default=None)
    B: list[int] | None = checked(lambda v: v is None or _is_shape(v), "[out, rank] or null", default=None)
    fingerprint: str | None = None


@dataclass
class Vectors:
    """vectors.safetensors as the description vouches for it."""

    file: str = checked(lambda v: v == VECTORS_FILE, repr(VECTORS_FILE))
    dtype: str = checked(lambda v: v in DTYPES, f"one of {sorted(DTYPES)}")
    parameters: int
    bytes: int
    sha256: str


@dataclass
class AdapterConfig:
    """qvera_adapter.json: the adapter's shape, method, targets, base and vectors."""

    format: str
    rank: int = checked(lambda v: v >= 1, "a positive integer")
    seed: int = checked(lambda v: True, "an integer")
    d_initial: float = checked(math.isfinite, "a finite number")
    target_modules: str | list[str] = checked(lambda v: True, "a string or a list of strings")
    # [out, in] per layer; `in` is null for a peft adapter read without its base.
    targets: dict[str, list[int | None]] = checked(
        lambda v: bool(v) and all(_is_shape(s) for s in v.values()),
        "an object mapping each layer name to [out, in]",
    )
    base_model: BaseModel
    projections: Projections
    method: str = checked(lambda v: v in METHODS, "the name of a registered adapter method", default="vera")
    # An integer in qvera's format; a peft adapter read in keeps peft's version string.
    format_version: int | str | None = checked(_is_int, "an integer", default=None)
    qvera_version: str | None = None
    vectors: Vectors | None = checked(lambda v: v is not None, "an object", default=None)
    checksum: str | None = None

    @property
    def vera_config(self) -> VeraConfig:
        """The VeraConfig that recreates the adapter's layers; targets are the exact layer names."""
        return VeraConfig(
            rank=self.rank,
            projection_seed=self.seed,
            d_initial=self.d_initial,
            target_modules=sorted(self.targets),
            method=self.method,
        )


@dataclass
class Adapter:
    """An adapter in memory: its description and its fp32 vectors, keyed as
    `qvera.core.attach.vector_state` keys them."""

    config: AdapterConfig
    vectors: dict[str, torch.Tensor]
    folder: Path | None = None  # where it was read from: errors name it
