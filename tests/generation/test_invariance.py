import torch
import torch.nn.functional as F
from transformers.masking_utils import sdpa_mask

from qvera import ModelConfig, load_base
from qvera.generation import invariance
from qvera.generation.decode import Sampling, chat_prompt, decode_steps
from qvera.generation.invariance import QUERY_TILE, rotary_from_table, row_attention_forward

GENERATOR = torch.Generator().manual_seed(0)


def states(rows, heads, length):
    return torch.randn(rows, heads, length, 64, generator=GENERATOR).to(torch.bfloat16)


def gqa_module():
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    return module


def test_row_attention_with_pads_between_keys_is_sdpa_over_the_real_keys():
    """A continuous batch's rows: cached keys with pads between them (rows joined, left, took
    chunks of unequal length), then a chunk of new queries, some left-padded. Each row's real
    queries get bit for bit what SDPA gives over that row's real keys alone; pads get zeros."""
    real = torch.tensor(
        [
            [0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1],  # gaps in the cache, and a padded chunk
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # no pads at all
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],  # left-padded only: the sliced path
            [1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1],  # one real query over scattered keys
        ],
        dtype=torch.bool,
    )
    rows, width = real.shape
    key, value = states(rows, 3, width), states(rows, 3, width)
    for chunk in (5, 1):  # a prefill chunk, then a decode step over the same keys
        query = states(rows, 9, chunk)
        offset = width - chunk
        mask = sdpa_mask(rows, chunk, width, offset, attention_mask=real, allow_is_causal_skip=False)
        batched, _ = row_attention_forward(gqa_module(), query, key, value, mask)
        for row in range(rows):
            keys = real[row].nonzero().squeeze(-1)
            queries = real[row, offset:].nonzero().squeeze(-1)
            q, k, v = query[row : row + 1, :, queries], key[row : row + 1, :, keys], value[row : row + 1, :, keys]
            causal = torch.ones(len(queries), len(keys), dtype=torch.bool).tril(len(keys) - len(queries))
            alone = F.scaled_dot_product_attention(
                q, k, v, attn_mask=causal if len(queries) > 1 else None, enable_gqa=True
            )
            assert torch.equal(batched[row, queries], alone[0].transpose(0, 1)), f"row {row}, chunk {chunk}"
            padding = torch.ones(chunk, dtype=torch.bool)
            padding[queries] = False
            assert not batched[row, padding].any()  # padding queries: zeros, never NaN


def fed_in_chunks(query, key, value, tiles_a_chunk, query_tile):
    """One row's prompt fed in chunks of `tiles_a_chunk` query tiles, each over the keys so far."""
    length = query.shape[2]
    bounds = list(range(0, length, tiles_a_chunk * QUERY_TILE)) + [length]
    pieces = []
    for start, end in zip(bounds, bounds[1:]):
        mask = sdpa_mask(1, end - start, end, start, allow_is_causal_skip=False)
        chunk = query[:, :, start:end]
        attended, _ = row_attention_forward(
            gqa_module(), chunk, key[:, :, :end], value[:, :, :end], mask, query_tile=query_tile
        )
        pieces.append(attended)
    return torch.cat(pieces, dim=1)


def test_query_tiles_make_attention_independent_of_the_prefill_chunks():
    """A prompt fed whole or in chunks that start on tile multiples: in query tiles each query
    gets the very same bits; without them the chunks move SDPA's sums (so the tiles matter)."""
    moved = 0
    for length in (7 * QUERY_TILE + 5, 15 * QUERY_TILE + 10, 7 * QUERY_TILE + 5, 15 * QUERY_TILE + 10):
        prompt = states(1, 9, length), states(1, 3, length), states(1, 3, length)
        whole = fed_in_chunks(*prompt, length, QUERY_TILE)
        for tiles_a_chunk in (1, 3):
            assert torch.equal(fed_in_chunks(*prompt, tiles_a_chunk, QUERY_TILE), whole), f"{tiles_a_chunk} tiles"
        moved += not torch.equal(fed_in_chunks(*prompt, 1, None), fed_in_chunks(*prompt, length, None))
    assert moved, "untiled, some chunked prompt should have attended otherwise than whole"


def test_rotary_angles_come_from_one_table_inside_the_mode(tiny_llama_dir):
    model, _ = load_base(ModelConfig(name=tiny_llama_dir, quantization="fp32"))
    rotary = model.model.rotary_emb
    positions, x = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]]), torch.empty(0, dtype=torch.float16)
    usual_cos, usual_sin = rotary(x, positions)
    with rotary_from_table(model):
        cos, sin = rotary(x, positions)
        alone_cos, alone_sin = rotary(x, positions[1:, 1:])
    assert torch.equal(cos[1, 1:], alone_cos[0]) and torch.equal(sin[1, 1:], alone_sin[0])
    # The usual angles, to fp16's last bit at most; and the class's forward is back afterwards.
    torch.testing.assert_close(cos, usual_cos, atol=1e-3, rtol=0)
    torch.testing.assert_close(sin, usual_sin, atol=1e-3, rtol=0)
    assert "forward" not in rotary.__dict__ and rotary(x, positions)[0].dtype == torch.float16


def test_a_forward_plans_its_rows_once_for_all_its_layers(tiny_llama_dir, monkeypatch):
    """Reading the mask's row counts waits for the device: once a forward, not once a layer."""
    model, tokenizer = load_base(ModelConfig(name=tiny_llama_dir, quantization="fp32"))
    plans = []
    plan_rows = invariance._plan_rows
    monkeypatch.setattr(invariance, "_plan_rows", lambda *args: plans.append(args) or plan_rows(*args))
    prompts = [chat_prompt(tokenizer, [{"role": "user", "content": text}]) for text in ("Hi", "Name three rivers.")]
    steps = list(decode_steps(model, prompts, [Sampling(0.0, 1.0, 3)] * 2, set(), tokenizer.pad_token_id))
    assert model.config.num_hidden_layers == 2 and len(steps) == 3
    assert len(plans) == 3  # the padded prefill and two decode steps, each planned once
