"""qvera: VeRA adapters on 4-bit quantized bases."""

import logging

# bitsandbytes warns at import that it cannot fetch a hub kernel for its AVX512-BF16 repacked
# 4-bit path; qvera switches that path off (see qvera.model.disable_cpu_repacking).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .base import load_base
from .config import ModelConfig, VeraConfig
from .model import attach_vera, trainable_summary, vector_state, load_vector_state

__version__ = "0.1.0"
__all__ = ["load_base", "ModelConfig", "VeraConfig", "attach_vera", "trainable_summary", "vector_state", "load_vector_state"]
