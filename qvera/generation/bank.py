"""Many adapters beside one loaded base.

An adapter is only its vectors (d and b per layer), so the bank keeps each one as a dict of
tensors on the model's device; A and B exist once, in the model. Switching the active adapter
copies vectors in place; a mixed batch gathers one (d, b) per row for every layer.

With `max_resident` set, adding an adapter beyond that count drops the least recently used
one (a server reloads it from its folder on the next request that names it). `dtype` is how
resident vectors are stored: the forward casts them to the compute dtype anyway, so storing
them in it (bfloat16 for an NF4 base) halves their memory and changes no result.

On a model attached with magnitude=True (DVoRA), each adapter also gets one output scale per
layer row, m / ||W0 + ΔW||, computed once when it is added; a plain VeRA adapter added there
becomes the DVoRA adapter with m = ||W0 + ΔW||, the same function (its scales are exactly 1),
so plain and DVoRA adapters share a mixed batch.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from qvera.core.attach import (
    check_vector_state,
    load_vector_state,
    vector_state,
    vera_layers,
)


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
        self.magnitude = any(layer.lambda_m is not None for layer in self.layers.values())
        self.scales: dict[str, dict[str, torch.Tensor]] = {}  # DVoRA: per adapter, per layer
        self.active: str | None = None
        self._last_use: dict[str, int] = {}
        self._clock = 0

    def names(self) -> list[str]:
        return list(self.adapters)

    def add(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Keep an adapter's vectors (as from `vector_state` or an adapter file)."""
        if not name:
            raise ValueError("an adapter needs a non-empty name")
        if self.magnitude and not any(key.endswith(".lambda_m") for key in state):
            state = {**state, **self._plain_magnitudes(state)}
        check_vector_state(self.model, state, source=f"adapter {name!r}")
        self.adapters[name] = {k: v.detach().to(self.device, self.dtype).clone() for k, v in state.items()}
        if self.magnitude:
            self.scales[name] = self._scales(self.adapters[name])
        self.touch([name])
        if self.max_resident is not None:
            while len(self.adapters) > self.max_resident:
                self.remove(min(self._last_use, key=self._last_use.get))

    def _norms(self, layer_name: str, state: dict[str, torch.Tensor]) -> torch.Tensor:
        d, b = (state[f"{layer_name}.lambda_{which}"].to(self.device, torch.float32) for which in "db")
        return self.layers[layer_name].adapted_norms(d, b)

    def _plain_magnitudes(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """m = ||W0 + ΔW||: a plain VeRA adapter as a DVoRA one."""
        return {f"{name}.lambda_m": self._norms(name, state) for name in self.layers if f"{name}.lambda_d" in state}

    def _scales(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """m / ||W0 + ΔW|| per layer: all a mixed batch needs of DVoRA's magnitude."""
        return {name: state[f"{name}.lambda_m"].float() / self._norms(name, state) for name in self.layers}

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
        self.scales.pop(name, None)
        if self.active == name:
            self.activate(None)

    def activate(self, name: str | None) -> None:
        """Make `name` the adapter the model runs with; None runs the bare base (b = 0)."""
        if name is None:
            with torch.no_grad():
                for layer in self.layers.values():
                    layer.lambda_b.zero_()
                    if layer.lambda_m is not None:  # m = ||W0||: the scale is 1
                        layer.lambda_m.copy_(layer.adapted_norms(layer.lambda_d, layer.lambda_b))
        else:
            load_vector_state(self.model, self._require(name))
            self.touch([name])
        self.active = name

    def _require(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r} is loaded; loaded: {self.names()}")
        return self.adapters[name]

    def bytes_per_adapter(self) -> int:
        return (
            sum(t.numel() * t.element_size() for t in next(iter(self.adapters.values())).values())
            if self.adapters
            else 0
        )

    def gather(self, row_adapters: list[str | None]) -> dict[str, tuple[torch.Tensor, ...]]:
        """Per layer, the (d, b) of every row stacked (zeros for None, the base), and for DVoRA
        the rows' output scales: what a mixed batch sets as each layer's `row_vectors`. A server
        keeps these while its rows stay."""
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
            if self.magnitude:  # DVoRA: one output scale per row, 1 for the base
                ones = torch.ones(layer.out_features, device=self.device)
                scales = [ones if name is None else self.scales[name][layer_name] for name in row_adapters]
                gathered[layer_name] += (torch.stack(scales),)
        return gathered

    def rows(self, gathered: dict[str, tuple[torch.Tensor, ...]]):
        """Within this context each batch row runs with the vectors `gather` stacked for it."""
        return running_rows(self.layers, gathered)

    @contextmanager
    def mixed_batch(self, row_adapters: list[str | None]):
        """Within this context each batch row runs with its own adapter (None: the base)."""
        with self.rows(self.gather(row_adapters)):
            yield


@contextmanager
def running_rows(layers: dict[str, nn.Module], gathered: dict[str, tuple[torch.Tensor, ...]]):
    """Within this context each layer runs with the per-row vectors in `gathered`."""
    try:
        for layer_name, layer in layers.items():
            layer.row_vectors = gathered[layer_name]
        yield
    finally:
        for layer in layers.values():
            layer.row_vectors = None


def own_vectors_as_rows(layers: dict[str, nn.Module], dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, ...]]:
    """The layers' own vectors as one row that every batch row shares, cast to `dtype` now:
    decoding with them as they are casts d and b in every layer at every token (448 casts a
    7B step, each a kernel launch the host waits for on a GPU). The numbers are the same."""
    rows = {}
    with torch.no_grad():
        for name, layer in layers.items():
            d, b = layer.lambda_d.float(), layer.lambda_b.float()
            rows[name] = (d.to(dtype)[None], b.to(dtype)[None])
            if layer.lambda_m is not None:  # DVoRA: the output scale the unfolded path applies
                rows[name] += ((layer.lambda_m.float() / layer.adapted_norms(d, b))[None],)
    return rows
