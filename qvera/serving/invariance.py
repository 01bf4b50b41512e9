"""Keeping a row's numbers independent of its batch-mates while generating.

Two things make a left-padded row's logits depend on what else shares its batch:

- Attention. SDPA's CPU kernel walks the keys in fixed blocks from the left edge, so the pads in
  front of a short row move where its keys fall in those blocks and its sums round otherwise;
  and once a padding mask exists transformers takes another route (repeat_kv, or pack_gqa for
  one query, instead of enable_gqa and is_causal). `row_attention` runs each row over its own
  keys only: the very call that row makes alone, so padding and batch-mates drop out exactly.
- Matrix products. oneDNN and MKL pick their blocking from the whole problem size, so a row's
  dot products round differently when a product has 1, 12 or 400 rows. `fixed_row_tiles` runs
  every product on tiles of exactly the same number of rows (zero-filled at the end), so each
  row meets the same kernel whatever the batch; it costs the products of the filler rows.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ROW_ATTENTION = "qvera_row_sdpa"
TILE_ROWS = 32


def row_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA one row at a time over that row's real keys, for left-padded rows.

    query (batch, heads, q, dim); key and value (batch, kv_heads, kv, dim); attention_mask None
    (no padding) or bool (batch, 1, q, kv). Padding queries get zeros: nothing real reads them.
    """
    batch, heads, q_length, _ = query.shape
    kv_length = key.shape[2]
    if attention_mask is None:
        starts = [0] * batch
    else:
        # The last query sees every real key of its row; left padding puts all the pads first.
        starts = (kv_length - attention_mask[:, 0, -1].sum(-1)).tolist()
    output = query.new_zeros(batch, q_length, heads, value.shape[-1])
    for row, start in enumerate(starts):
        first_query = max(0, start - (kv_length - q_length))
        q = query[row : row + 1, :, first_query:]
        k, v = key[row : row + 1, :, start:], value[row : row + 1, :, start:]
        mask = None
        if 1 < q.shape[2] < k.shape[2]:  # queries after cached keys: is_causal would align them top-left
            mask = attention_mask[row : row + 1, :, first_query:, start:]
        attended = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=mask is None and q.shape[2] > 1,
            scale=scaling,
            enable_gqa=heads != k.shape[1],
        )
        output[row, first_query:] = attended[0].transpose(0, 1)
    return output, None


AttentionInterface.register(ROW_ATTENTION, row_attention_forward)
AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)


@contextmanager
def row_attention(model: nn.Module):
    """Within this context the model's attention runs row by row (see `row_attention_forward`)."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ROW_ATTENTION
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


@contextmanager
def generation_numerics(model: nn.Module, batch_invariant: bool):
    """How `decode_steps` runs each forward: always row by row in attention; with
    `batch_invariant`, matrix products on fixed row tiles too."""
    with row_attention(model), FixedRowTiles() if batch_invariant else nullcontext():
        yield
