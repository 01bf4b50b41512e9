"""Keeping a row's numbers independent of its batch-mates while generating.

Three things make a row's logits depend on what else shares its batch:

- Attention. SDPA's CPU kernel walks the keys in fixed blocks from the left edge, so the pads in
  front of a short row move where its keys fall in those blocks and its sums round otherwise;
  and once a padding mask exists transformers takes another route (repeat_kv, or pack_gqa for
  one query, instead of enable_gqa and is_causal). `row_attention` runs each row over its own
  keys only, gathered past any pads between them: the very call that row makes alone, so
  padding and batch-mates drop out exactly.
- Prefill chunks. A continuous batch feeds a prompt in chunks whose size depends on how many
  prompts share the step, and SDPA's sums for a query change with the queries and keys of its
  call. In fixed query tiles (starting at multiples of QUERY_TILE) each query meets the same
  call however its prompt was cut, provided the chunks start on those multiples.
- Matrix products. oneDNN and MKL pick their blocking from the whole problem size, so a row's
  dot products round differently when a product has 1, 12 or 400 rows. `FixedRowTiles` runs
  every product on tiles of exactly the same number of rows (zero-filled at the end), so each
  row meets the same kernel whatever the batch; it costs the products of the filler rows.
- Rotary angles. cos and sin are computed elementwise over the whole batch's positions, and
  those kernels' vectorized and scalar paths can differ in the last bit, so a position's value
  can depend on where it falls in the tensor (seen in fp16, where the difference survives the
  cast, in about one process of five). `rotary_from_table` gathers every position's cos and
  sin from one table, computed once, instead.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from qvera.core.attention_kernels import without_cudnn_attention

ROW_ATTENTION = "qvera_row_sdpa"
TILED_ROW_ATTENTION = "qvera_row_sdpa_tiled"
TILE_ROWS = 32
QUERY_TILE = 16  # queries per attention call in the batch-invariant mode; prefill chunks start on its multiples


@dataclass(frozen=True)
class _RowCall:
    """What one row sends to SDPA: its real queries and keys, then per query tile (one tile
    without `query_tile`) the tile's queries within the row's and how many keys it sees (None
    for a single tile: all of them), and its mask or `is_causal`."""

    row: int
    queries: slice | torch.Tensor
    keys: slice | torch.Tensor
    tiles: tuple[tuple[slice | None, int | None, torch.Tensor | None, bool], ...]


def _plan_rows(attention_mask, batch, q_length, kv_length, device, query_tile) -> tuple[list[_RowCall], bool]:
    """The row calls for one mask, and whether every row has all its queries real (then the
    output is the rows stacked). Reading the mask's counts waits for the device, so a forward
    plans once and its layers reuse the plan (`_row_plan`)."""
    if attention_mask is None:  # no padding: every row whole, nothing to read from the device
        counts, left_padded = [kv_length] * batch, [True] * batch
    else:
        real = attention_mask[:, 0, -1]  # the last query sees every real key of its row, in causal masks
        counts = real.sum(-1)
        left_padded = (real == (torch.arange(kv_length, device=device) >= kv_length - counts[:, None])).all(-1)
        counts, left_padded = counts.tolist(), left_padded.tolist()
    calls, full = [], True
    for row, (count, contiguous) in enumerate(zip(counts, left_padded)):
        if contiguous:  # the fast path: slices, no copies
            start = kv_length - count
            first_query = max(0, start - (kv_length - q_length))
            queries, keys, n_queries = slice(first_query, q_length), slice(start, kv_length), q_length - first_query
        else:
            keys = real[row].nonzero().squeeze(-1)
            queries = real[row, kv_length - q_length :].nonzero().squeeze(-1)
            count, n_queries = len(keys), len(queries)
        full = full and n_queries == q_length
        if n_queries == 0:
            continue
        mask = None
        if attention_mask is not None and 1 < n_queries < count:
            mask = attention_mask[row : row + 1, :, queries][..., keys]
        calls.append(_RowCall(row, queries, keys, _query_tiles(n_queries, count, mask, query_tile, device)))
    return calls, full


def _query_tiles(queries: int, keys: int, mask, query_tile, device):
    """One row's SDPA calls: its queries are its last real positions. With `query_tile`,
    queries go in tiles that start at multiples of it in the row's own positions, each over the
    keys up to its last query: then a query's numbers depend neither on how a prompt was cut
    into prefill chunks (chunks starting on tile multiples) nor on the other queries of the
    call. SDPA's sums shift with both otherwise."""
    first = keys - queries  # the row's position of the first query
    bounds = [(first, keys)]
    if query_tile is not None:
        starts = [first] + list(range((first // query_tile + 1) * query_tile, keys, query_tile))
        bounds = list(zip(starts, starts[1:] + [keys]))
    tiles = []
    for start, end in bounds:
        tile_mask = None
        if 1 < end - start < end:  # queries after earlier keys: is_causal would align them top-left
            if mask is None:
                tile_mask = torch.ones(end - start, end, dtype=torch.bool, device=device).tril(start)
            else:
                tile_mask = mask[:, :, start - first : end - first, :end]
        whole = len(bounds) == 1  # the row's queries over all its keys: no slicing needed
        queries_in_tile = None if whole else slice(start - first, end - first)
        tiles.append((queries_in_tile, None if whole else end, tile_mask, tile_mask is None and end - start > 1))
    return tuple(tiles)


_last_plan: tuple | None = None  # (weak reference to a mask, the plan's key, the plan)


def _row_plan(attention_mask, batch, q_length, kv_length, device, query_tile):
    """`_plan_rows`, kept while the mask that every layer of one forward receives lives."""
    global _last_plan
    key = (batch, q_length, kv_length, device, query_tile)
    cached = _last_plan  # read once: a server's worker and another thread may both run a model
    if attention_mask is not None and cached is not None and cached[0]() is attention_mask and cached[1] == key:
        return cached[2]
    plan = _plan_rows(attention_mask, batch, q_length, kv_length, device, query_tile)
    if attention_mask is not None:
        _last_plan = (weakref.ref(attention_mask, _forget_plan), key, plan)
    return plan


def _forget_plan(dead_mask):
    """Drops the plan with its mask: a prefill's masks per row are as large as the mask."""
    global _last_plan
    if _last_plan is not None and _last_plan[0] is dead_mask:
        _last_plan = None


def row_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, query_tile=None, **kwargs
):
    """SDPA one row at a time over that row's real keys, wherever its pads sit.

    query (batch, heads, q, dim); key and value (batch, kv_heads, kv, dim); attention_mask None
    (no padding) or bool (batch, 1, q, kv), causal. Query i sits at key position kv - q + i, so
    it is real where that key is. A left-padded row is sliced; a row with pads between its keys
    (a continuous batch's rows joining, leaving and taking chunks of unequal length) has its real
    keys gathered. Either way the row makes the call it makes alone. Padding queries get zeros:
    nothing real reads them. `query_tile`: see `_query_tiles`.
    """
    batch, heads, q_length, _ = query.shape
    calls, full = _row_plan(attention_mask, batch, q_length, key.shape[2], key.device, query_tile)
    gqa = heads != key.shape[1]
    attended = []
    for call in calls:
        row = call.row
        q = query[row : row + 1, :, call.queries]
        k, v = key[row : row + 1, :, call.keys], value[row : row + 1, :, call.keys]
        pieces = [
            F.scaled_dot_product_attention(
                q if tile is None else q[:, :, tile],
                k if end is None else k[:, :, :end],
                v if end is None else v[:, :, :end],
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal,
                scale=scaling,
                enable_gqa=gqa,
            )
            for tile, end, mask, causal in call.tiles
        ]
        attended.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])  # (1, heads, queries, dim)
    if full:  # every row real throughout (decoding): no zeros to fill
        return torch.cat(attended).transpose(1, 2).contiguous(), None
    output = query.new_zeros(batch, q_length, heads, value.shape[-1])
    for call, rows_output in zip(calls, attended):
        output[call.row, call.queries] = rows_output[0].transpose(0, 1)
    return output, None


def tiled_row_attention_forward(*args, **kwargs):
    """`row_attention_forward` with queries in tiles of QUERY_TILE: the batch-invariant mode's."""
    return row_attention_forward(*args, **kwargs, query_tile=QUERY_TILE)


AttentionInterface.register(ROW_ATTENTION, row_attention_forward)
AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)
AttentionInterface.register(TILED_ROW_ATTENTION, tiled_row_attention_forward)
AttentionMaskInterface.register(TILED_ROW_ATTENTION, sdpa_mask)


@contextmanager
def row_attention(model: nn.Module, query_tiles: bool = False):
    """Within this context the model's attention runs row by row (see `row_attention_forward`),
    with `query_tiles` in fixed query tiles too."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = TILED_ROW_ATTENTION if query_tiles else ROW_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


def _by_tiles(product, rows: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """product(tile) for tiles of exactly `tile_rows` rows of the 2-D `rows`, stacked back."""
    count = rows.shape[0]
    filler = -count % tile_rows
    if filler:
        rows = torch.cat([rows, rows.new_zeros(filler, rows.shape[1])])
    return torch.cat([product(tile) for tile in rows.split(tile_rows)])[:count]


def _dequantize_4bit(
    B, shapeB, absmax, blocksize, quant_type, dtype, absmax_8bit=None, absmax_code=None, absmax_offset=None
):
    """The weight bitsandbytes' gemm_4bit multiplies by, rebuilt as its default kernel does."""
    if absmax_8bit is not None:  # double quantization: the scales are themselves 8-bit blockwise
        dequantize_scales = torch.ops.bitsandbytes.dequantize_blockwise.default
        absmax = dequantize_scales(absmax_8bit, absmax, absmax_code, 256, torch.float32) + absmax_offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(B, absmax, blocksize, quant_type, shapeB, dtype)


class FixedRowTiles(TorchDispatchMode):
    """Matrix products (aten mm and addmm, bitsandbytes' 4-bit gemm) on fixed-size row tiles."""

    def __init__(self, tile_rows: int = TILE_ROWS):
        super().__init__()
        self.tile_rows = tile_rows

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func is aten.mm.default:
            a, b = args
            return _by_tiles(lambda tile: func(tile, b), a, self.tile_rows)
        if func is aten.addmm.default and args[0].dim() == 1:  # a bias broadcast over the rows
            bias, a, b = args
            return _by_tiles(lambda tile: func(bias, tile, b, **kwargs), a, self.tile_rows)
        if func is torch.ops.bitsandbytes.gemm_4bit.default:
            # Dequantized once, not per tile: bitsandbytes' CPU kernel dequantizes on every call.
            named = dict(zip((arg.name for arg in func._schema.arguments), args)) | kwargs
            a, bias = named.pop("A"), named.pop("bias", None)
            weight = _dequantize_4bit(**named, dtype=a.dtype)
            out = _by_tiles(lambda tile: F.linear(tile, weight, bias), a.reshape(-1, a.shape[-1]), self.tile_rows)
            return out.reshape(*a.shape[:-1], out.shape[-1])
        return func(*args, **kwargs)


def _rotary_table(module: nn.Module, forward, positions: int, device: torch.device):
    """(cos, sin) in fp32 for positions 0..positions-1 (at least), from the module's own forward."""
    table = getattr(module, "_qvera_rotary_table", None)
    if table is None or table[0].shape[0] < positions or table[0].device != device:
        size = max(positions, module.config.max_position_embeddings)
        ids = torch.arange(size, device=device)[None]
        cos, sin = forward(torch.empty(0, device=device), ids)  # x gives only the device and dtype (fp32)
        table = module._qvera_rotary_table = (cos[0], sin[0])
    return table


@contextmanager
def rotary_from_table(model: nn.Module):
    """Within this context, rotary embeddings of the default kind gather cos and sin per position
    from one table (see the module docstring). Others (dynamic scaling) are left as they are."""
    modules = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("RotaryEmbedding") and getattr(m, "rope_type", None) == "default"
    ]
    previous = [module.__dict__.get("forward") for module in modules]  # set by an enclosing context, if any
    for module in modules:

        def tabled(x, position_ids, module=module, forward=type(module).forward.__get__(module)):
            cos, sin = _rotary_table(module, forward, int(position_ids.max()) + 1, x.device)
            return cos[position_ids].to(x.dtype), sin[position_ids].to(x.dtype)

        module.forward = tabled
    try:
        yield
    finally:
        for module, forward in zip(modules, previous):
            if forward is None:
                del module.forward  # the class's forward again
            else:
                module.forward = forward


@contextmanager
def generation_numerics(model: nn.Module, batch_invariant: bool):
    """How `decode_steps` and the server's scheduler run each forward: always row by row in
    attention and off cuDNN's kernels (see `qvera.core.attention_kernels`); with
    `batch_invariant`, attention in fixed query tiles, matrix products on fixed row tiles and
    rotary angles from one table too."""
    with (
        without_cudnn_attention(),
        row_attention(model, query_tiles=batch_invariant),
        FixedRowTiles() if batch_invariant else nullcontext(),
        rotary_from_table(model) if batch_invariant else nullcontext(),
    ):
        yield
