"""Run descriptions as dataclasses; the YAML files under configs/ mirror them field for field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass
class VeraConfig:
    """The adapter's shape. `seed` regenerates A and B (peft calls it projection_prng_key)."""

    rank: int = 512
    seed: int = 0
    d_initial: float = 0.1
    target_modules: str | list[str] = "all-linear"
    # Fold ΔW into the dequantized weight during training when that is cheaper (see vera.py).
    fold: bool = True


@dataclass
class ModelConfig:
    """Which base to load and how. `quantization`: nf4 (QLoRA's default), int8, bf16 or fp32."""

    name: str = "smollm2-135m"
    quantization: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    # FSDP shards 4-bit weights only when they are stored in the same dtype as the rest.
    quant_storage: str = "uint8"
    revision: str | None = None


def from_dict(cls, values: dict, *, source: str = "config"):
    """Build a dataclass from a mapping, naming any unknown key (a typo in YAML must not pass)."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
    return cls(**values)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; pass a YAML file from configs/")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections at the top level")
    return data
