"""Adapters on disk: the folder format, fit checks against a model, atomic writes, peft
interop and merging. Builds on qvera.core only."""

from qvera.adapters.config import Adapter, AdapterConfig
from qvera.adapters.fit import check_fits
from qvera.adapters.format import read_adapter, save_adapter, write_adapter
from qvera.adapters.loading import attach_adapter

__all__ = ["Adapter", "AdapterConfig", "attach_adapter", "check_fits", "read_adapter", "save_adapter", "write_adapter"]
