"""qvera: VeRA adapters on 4-bit quantized bases.

qvera.core       the VeRA math, attaching it, the bitsandbytes backend, base loading, configs
qvera.adapters   the adapter folder format, fit checks, atomic writes, peft interop, merge
qvera.training   recipes, data, the trainer, evaluation, the embedded demo
qvera.serving    the adapter bank, generation, the batcher, the HTTP server
"""

import logging

# Before bitsandbytes is first imported: it warns at import that it cannot fetch a hub kernel
# for its repacked CPU path, which qvera switches off (qvera.core.bnb).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from qvera.core.attach import (  # noqa: E402
    attach_vera,
    load_vector_state,
    trainable_summary,
    vector_state,
)
from qvera.core.base import load_base  # noqa: E402
from qvera.core.config import ModelConfig, VeraConfig  # noqa: E402
from qvera.version import __version__  # noqa: E402

__all__ = [
    "ModelConfig",
    "VeraConfig",
    "__version__",
    "attach_vera",
    "load_base",
    "load_vector_state",
    "trainable_summary",
    "vector_state",
]
