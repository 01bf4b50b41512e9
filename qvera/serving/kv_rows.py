"""A batch of KV-cache rows that come and go: the storage under continuous batching.

Each row's cached keys and values sit at the right end of the length axis, left-padded, and
`mask` marks its real positions. RoPE bakes each token's position into its keys, so moving a
row's entries along that axis changes nothing it attends to: rows can join (left-padded to
the common length), leave (the columns only they used are trimmed) and be re-packed at will.
Positions stay per row, so a row sees exactly the positions it would see alone.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from qvera.generation.last_logits import fold_last_position


class CacheRows:
    """Rows of one DynamicCache; `forward` feeds each row its next chunk of tokens."""

    def __init__(self, model: nn.Module, pad_id: int):
        self.model, self.pad_id = model, pad_id
        fold_last_position(model)
        self.device = model.get_input_embeddings().weight.device
        self.cache = DynamicCache(config=model.config)
        if not all(type(layer) is DynamicLayer for layer in self.cache.layers):
            raise NotImplementedError(
                "continuous batching needs full-attention layers; this model has sliding-window ones"
            )
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)

    def __len__(self) -> int:
        return self.mask.shape[0]

    @torch.no_grad()
    def forward(self, chunks: list[list[int]]) -> torch.Tensor:
        """Feed row i the tokens `chunks[i]` (at least one each); return each row's logits
        for the token after its chunk, (rows, vocab) in fp32."""
        assert len(chunks) == len(self) and all(chunks), "one non-empty chunk per row"
        width = max(len(chunk) for chunk in chunks)
        ids = torch.full((len(chunks), width), self.pad_id, dtype=torch.long)
        new_mask = torch.zeros((len(chunks), width), dtype=torch.long)
        for row, chunk in enumerate(chunks):
            ids[row, width - len(chunk) :] = torch.tensor(chunk)
            new_mask[row, width - len(chunk) :] = 1
        ids, new_mask = ids.to(self.device), new_mask.to(self.device)
        # Real tokens continue each row's own count; the padding before them takes position 0.
        offsets = torch.arange(width, device=self.device) - width + new_mask.sum(-1, keepdim=True)
        position_ids = (self.positions[:, None] + offsets).clamp(min=0)
        mask = torch.cat([self.mask, new_mask], dim=1)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.mask, self.positions = mask, self.positions + new_mask.sum(-1)
        return out.logits[:, -1].float()

    def take(self, rows: list[int]) -> list[tuple[list[tuple[torch.Tensor, torch.Tensor]], int]]:
        """Each named row's real entries per layer, packed, and its next position."""
        taken = []
        for row in rows:
            real = self.mask[row].bool()
            entries = [(layer.keys[row][:, real], layer.values[row][:, real]) for layer in self.cache.layers]
            taken.append((entries, int(self.positions[row])))
        return taken

    def keep(self, rows: list[int]) -> None:
        """Drop every row not named, and the columns no remaining row uses."""
        if not rows:
            self._rebuild([], self.mask[:0, :0], self.positions[:0])
            return
        index = torch.tensor(rows, device=self.device)
        mask = self.mask.index_select(0, index)
        if not mask.any():  # the kept rows have nothing cached yet (new prompts not fed)
            self._rebuild([], mask[:, :0], self.positions.index_select(0, index))
            return
        first = int(mask.any(0).long().argmax())
        layers = [
            (layer.keys.index_select(0, index)[:, :, first:], layer.values.index_select(0, index)[:, :, first:])
            for layer in self.cache.layers
        ]
        self._rebuild(layers, mask[:, first:], self.positions.index_select(0, index))

    def add(self, taken: list[tuple[list[tuple[torch.Tensor, torch.Tensor]], int]]) -> None:
        """Append rows as `take` returned them (from this batch or another of the same model)."""
        if not taken:
            return
        length = max([self.mask.shape[1]] + [entries[0][0].shape[1] for entries, _ in taken])
        masks = [_left_pad(self.mask, length)]
        for entries, _ in taken:
            real = entries[0][0].shape[1]
            masks.append(_left_pad(torch.ones((1, real), dtype=torch.long, device=self.device), length))
        layers = []
        for i in range(len(self.cache.layers)):
            layer = self.cache.layers[i]
            keys = [_left_pad(layer.keys, length)] if len(self) else []
            values = [_left_pad(layer.values, length)] if len(self) else []
            keys += [_left_pad(entries[i][0][None], length) for entries, _ in taken]
            values += [_left_pad(entries[i][1][None], length) for entries, _ in taken]
            layers.append((torch.cat(keys), torch.cat(values)))
        positions = torch.cat([self.positions, torch.tensor([p for _, p in taken], device=self.device)])
        self._rebuild(layers, torch.cat(masks), positions)

    def add_empty(self, count: int) -> None:
        """Append rows with nothing cached yet (new prompts, fed by the next `forward`)."""
        mask = torch.zeros((count, self.mask.shape[1]), dtype=torch.long, device=self.device)
        positions = torch.zeros(count, dtype=torch.long, device=self.device)
        layers = []
        if len(self) and self.mask.shape[1]:
            for layer in self.cache.layers:
                blank = layer.keys.new_zeros((count, *layer.keys.shape[1:]))
                layers.append((torch.cat([layer.keys, blank]), torch.cat([layer.values, blank])))
        self._rebuild(layers, torch.cat([self.mask, mask]), torch.cat([self.positions, positions]))

    def snapshot(self) -> tuple:
        """The cache as it is now, for `restore`. A forward replaces each layer's tensors by
        new ones (it concatenates), so holding the present ones is enough."""
        layers = [(layer.keys, layer.values) for layer in self.cache.layers] if self.mask.shape[1] else []
        return layers, self.mask, self.positions

    def restore(self, snapshot: tuple) -> None:
        """Put the cache back as `snapshot` found it (after a forward that raised part-way)."""
        self._rebuild(*snapshot)

    def row_alone(self, row: int) -> CacheRows:
        """A new batch holding a copy of one row, to feed it on its own."""
        alone = CacheRows(self.model, self.pad_id)
        if self.mask[row].any():
            alone.add(self.take([row]))
        else:
            alone.add_empty(1)
        return alone

    def wasted(self) -> float:
        """The share of cached columns that hold padding."""
        return 1 - float(self.mask.float().mean()) if self.mask.numel() else 0.0

    def repack(self) -> None:
        """Left-pad every row afresh, dropping the gaps that chunks of unequal length leave."""
        taken = self.take(list(range(len(self))))
        self.keep([])
        self.add(taken)

    def _rebuild(self, layers: list, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.cache = DynamicCache(ddp_cache_data=layers or None, config=self.model.config)
        self.mask, self.positions = mask, positions


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zeros in front along the length axis (-2 for keys and values, -1 for masks)."""
    axis = -1 if tensor.dim() == 2 else -2
    missing = length - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)
