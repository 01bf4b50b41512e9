"""qvera: VeRA adapters on 4-bit quantized bases."""

from .base import load_base
from .config import ModelConfig, VeraConfig
from .model import attach_vera, trainable_summary, vector_state, load_vector_state

__version__ = "0.1.0"
__all__ = ["load_base", "ModelConfig", "VeraConfig", "attach_vera", "trainable_summary", "vector_state", "load_vector_state"]
