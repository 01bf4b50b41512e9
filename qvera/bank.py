"""Many adapters beside one loaded base.

An adapter is only its vectors (d and b per layer), so the bank keeps each one as a dict of
tensors on the model's device; A and B exist once, in the model. Switching the active adapter
copies vectors in place; a mixed batch gathers one (d, b) per row for every layer.

With `max_resident` set, adding an adapter beyond that count drops the least recently used
one (a server reloads it from its folder on the next request that names it). `dtype` is how
resident vectors are stored: the forward casts them to the compute dtype anyway, so storing
them in it (bfloat16 for an NF4 base) halves their memory and changes no result.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .model import load_vector_state, vector_state, vera_layers


class AdapterBank:
    def __init__(self, model: nn.Module, max_resident: int | None = None, dtype: torch.dtype = torch.float32):
        if max_resident is not None and max_resident < 1:
            raise ValueError(f"max_resident must be at least 1 (or None for no limit), got {max_resident}")
        self.model = model
        self.max_resident, self.dtype = max_resident, dtype
        self.layers = vera_layers(model)
        if not self.layers:
            raise ValueError("this model has no VeRA attached; call qvera.attach_vera first")
        self.device = next(iter(self.layers.values())).lambda_d.device
        self.adapters: dict[str, dict[str, torch.Tensor]] = {}
        self.active: str | None = None
        self._last_use: dict[str, int] = {}
        self._clock = 0

    def names(self) -> list[str]:
        return list(self.adapters)

    def add(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Keep an adapter's vectors (as from `vector_state` or an adapter file)."""
        if not name:
            raise ValueError("an adapter needs a non-empty name")
        expected = {f"{n}.lambda_{v}": tuple(getattr(layer, f"lambda_{v}").shape) for n, layer in self.layers.items() for v in "db"}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"adapter {name!r} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                "it was made for another base or other target modules"
            )
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(f"adapter {name!r}: {key} has shape {tuple(state[key].shape)}, this model needs {shape}")
        self.adapters[name] = {k: v.detach().to(self.device, self.dtype).clone() for k, v in state.items()}
        self.touch([name])
        if self.max_resident is not None:
            while len(self.adapters) > self.max_resident:
                self.remove(min(self._last_use, key=self._last_use.get))

    def touch(self, names: list[str | None]) -> None:
        """Mark resident adapters as just used, so eviction spares them."""
        self._clock += 1
        for name in names:
            if name in self.adapters:
                self._last_use[name] = self._clock

    def add_current(self, name: str) -> None:
        """Store the vectors the model holds now (after training, say) under `name`."""
        self.add(name, vector_state(self.model))

    def remove(self, name: str) -> None:
        self._require(name)
        del self.adapters[name]
        del self._last_use[name]
        if self.active == name:
            self.activate(None)

    def activate(self, name: str | None) -> None:
        """Make `name` the adapter the model runs with; None runs the bare base (b = 0)."""
        if name is None:
            with torch.no_grad():
                for layer in self.layers.values():
                    layer.lambda_b.zero_()
        else:
            load_vector_state(self.model, self._require(name))
            self.touch([name])
        self.active = name

    def _require(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r} is loaded; loaded: {self.names()}")
        return self.adapters[name]

    def bytes_per_adapter(self) -> int:
        return sum(t.numel() * t.element_size() for t in next(iter(self.adapters.values())).values()) if self.adapters else 0

    def gather(self, row_adapters: list[str | None]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the (d, b) of every row stacked (zeros for None, the base): what a mixed
        batch sets as each layer's `row_vectors`. A server keeps these while its rows stay."""
        for name in row_adapters:
            if name is not None:
                self._require(name)
        self.touch(row_adapters)
        gathered = {}
        for layer_name, layer in self.layers.items():
            d_rows, b_rows = [], []
            for name in row_adapters:
                if name is None:
                    d_rows.append(torch.zeros_like(layer.lambda_d, dtype=self.dtype))
                    b_rows.append(torch.zeros_like(layer.lambda_b, dtype=self.dtype))
                else:
                    d_rows.append(self.adapters[name][f"{layer_name}.lambda_d"])
                    b_rows.append(self.adapters[name][f"{layer_name}.lambda_b"])
            gathered[layer_name] = (torch.stack(d_rows), torch.stack(b_rows))
        return gathered

    @contextmanager
    def rows(self, gathered: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        """Within this context each batch row runs with the vectors `gather` stacked for it."""
        try:
            for layer_name, layer in self.layers.items():
                layer.row_vectors = gathered[layer_name]
            yield
        finally:
            for layer in self.layers.values():
                layer.row_vectors = None

    @contextmanager
    def mixed_batch(self, row_adapters: list[str | None]):
        """Within this context each batch row runs with its own adapter (None: the base)."""
        with self.rows(self.gather(row_adapters)):
            yield
