"""Many adapters beside one loaded base.

An adapter is only its vectors (d and b per layer), so the bank keeps each one as a dict of
tensors on the model's device; A and B exist once, in the model. Switching the active adapter
copies vectors in place; a mixed batch gathers one (d, b) per row for every layer.

With `max_resident` set, adding an adapter beyond that count drops the least recently used
one (a server reloads it from its folder on the next request that names it). `dtype` is how
resident vectors are stored: the forward casts them to the compute dtype anyway, so storing
them in it (bfloat16 for an NF4 base) halves their memory and changes no result.

Each adapter keeps its method (qvera.core.method), which turns its vectors into the rows a
mixed batch runs: (d, b) per layer and, for a method that scales the output (DVoRA's
m / ||W0 + ΔW||), one scale per row, computed once when the adapter is added. So adapters of
different methods share a mixed batch; rows of a method without a scale get a scale of 1.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from qvera.core.attach import check_vector_state, load_vector_state, vector_state, vera_layers
from qvera.core.method import Method
from qvera.core.methods import method_named

Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # (d, b, output scale or None) of one layer


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
        self.method = next(iter(self.layers.values())).method  # the one the layers were attached with
        self.adapters: dict[str, dict[str, torch.Tensor]] = {}
        self.methods: dict[str, Method] = {}
        self.rows_of: dict[str, dict[str, Rows]] = {}  # per adapter, per layer
        self.active: str | None = None
        self._last_use: dict[str, int] = {}
        self._clock = 0

    def names(self) -> list[str]:
        return list(self.adapters)

    def add(self, name: str, state: dict[str, torch.Tensor], method: str | None = None) -> None:
        """Keep an adapter's vectors (as from `vector_state` or an adapter file) of the method
        named `method` (by default the one the model's layers were attached with)."""
        if not name:
            raise ValueError("an adapter needs a non-empty name")
        method = self.method if method is None else method_named(method)
        check_vector_state(self.model, state, source=f"adapter {name!r}", method=method)
        stored = {k: v.detach().to(self.device, self.dtype).clone() for k, v in state.items()}
        rows = {}
        with torch.no_grad():
            for layer_name, layer in self.layers.items():
                vectors = {which: stored[f"{layer_name}.{which}"] for which in method.vector_names()}
                d, b, scale = method.rows(layer, vectors)
                rows[layer_name] = (d.to(self.dtype), b.to(self.dtype), scale)
        self.adapters[name], self.methods[name], self.rows_of[name] = stored, method, rows
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
        del self.adapters[name], self.methods[name], self.rows_of[name], self._last_use[name]
        if self.active == name:
            self.activate(None)

    def activate(self, name: str | None) -> None:
        """Make `name` the adapter the model runs with; None runs the bare base (each layer's
        `Method.base_vectors`: b = 0)."""
        if name is None:
            with torch.no_grad():
                for layer in self.layers.values():
                    for which, value in layer.method.base_vectors(layer).items():
                        getattr(layer, which).copy_(value)
        else:
            self._require(name)
            if self.methods[name] is not self.method:
                raise ValueError(
                    f"adapter {name!r} is a {self.methods[name].title} adapter and this model's layers are "
                    f"{self.method.title}; run it in a mixed batch (mixed_batch, gather) instead"
                )
            load_vector_state(self.model, self.adapters[name])
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
        """Per layer, the (d, b) of every row stacked (zeros for None, the base), and where a
        row's method scales the output, every row's scale (1 for the others): what a mixed batch
        sets as each layer's `row_vectors`. A server keeps these while its rows stay."""
        for name in row_adapters:
            if name is not None:
                self._require(name)
        self.touch(row_adapters)
        gathered = {}
        for layer_name, layer in self.layers.items():
            base = (
                torch.zeros_like(layer.lambda_d, dtype=self.dtype),
                torch.zeros_like(layer.lambda_b, dtype=self.dtype),
                None,
            )
            rows = [base if name is None else self.rows_of[name][layer_name] for name in row_adapters]
            gathered[layer_name] = (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
            if any(r[2] is not None for r in rows):
                ones = torch.ones(layer.out_features, device=self.device)
                gathered[layer_name] += (torch.stack([ones if r[2] is None else r[2] for r in rows]),)
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
            d, b, scale = layer.method.rows(layer, layer.vectors_now(layer.lambda_d.float(), layer.lambda_b.float()))
            rows[name] = (d.to(dtype)[None], b.to(dtype)[None])
            if scale is not None:  # the output scale the layer's own path applies (DVoRA)
                rows[name] += (scale[None],)
    return rows
