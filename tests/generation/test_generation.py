import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from experiments.profiling import OperatorCount
from qvera import ModelConfig, VeraConfig, attach_vera, load_base
from qvera.adapters.format import read_adapter, save_adapter
from qvera.adapters.peft_interop import export_peft
from qvera.core.attach import vector_state, vera_layers
from qvera.generation.bank import AdapterBank
from qvera.generation.decode import (
    Chat,
    Sampling,
    TextStream,
    chat_prompt,
    decode_steps,
    end_token_ids,
    generate,
    pick_tokens,
    reply_batch,
)
from qvera.generation.invariance import FixedRowTiles, row_attention_forward

CONVERSATIONS = [
    [{"role": "user", "content": "Name three colours of the rainbow, please."}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is two plus two?"}],
    [{"role": "user", "content": "Hi"}],
]
ROW_ADAPTERS = ["a", None, "b", "b"]
PHOTOSYNTHESIS = (
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light energy into "
    "chemical energy. Inside the chloroplasts, chlorophyll absorbs mostly red and blue light, and the energy "
    "splits water into oxygen, protons and electrons. The electrons pass along a chain of proteins that pumps "
    "protons, and the gradient drives ATP synthase. In the Calvin cycle, the enzyme RuBisCO fixes carbon dioxide "
    "into sugars using ATP and NADPH. "
)
# Prompts of about 30, 130 and 40 tokens: the short rows carry long runs of left padding.
SPREAD_CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": PHOTOSYNTHESIS + "Summarise the text above in one sentence."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What does RuBisCO do in a leaf?"}],
]
SPREAD_ADAPTERS = ["a", None, "a"]


def random_vectors(model, seed):
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(value.shape, generator=generator) for key, value in vector_state(model).items()}


def model_with_bank(folder, quantization, rank=16, compute_dtype="auto"):
    model, tokenizer = load_base(ModelConfig(name=folder, quantization=quantization, compute_dtype=compute_dtype))
    attach_vera(model, VeraConfig(rank=rank, projection_seed=3))
    bank = AdapterBank(model)
    bank.add("a", random_vectors(model, 1))
    bank.add("b", random_vectors(model, 2))
    return model, tokenizer, bank


@pytest.fixture(scope="module")
def tiny_fp32_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-fp32"), dtype=torch.float32)


@pytest.fixture(scope="module")
def fp32_setup(tiny_fp32_dir):
    return model_with_bank(tiny_fp32_dir, "fp32")


@pytest.fixture(scope="module")
def smollm2_bf16_setup(smollm2_dir):
    """The real SmolLM2 in NF4 with bf16 compute, VeRA attached, adapter `a` in a bank."""
    model, tokenizer = load_base("smollm2-135m")
    assert model.dtype == torch.bfloat16
    attach_vera(model, VeraConfig(rank=16, projection_seed=3))
    bank = AdapterBank(model)
    generator = torch.Generator().manual_seed(1)
    # Small vectors: the adapter moves the logits without drowning the base model's reply.
    bank.add("a", {k: 0.1 * torch.randn(v.shape, generator=generator) for k, v in vector_state(model).items()})
    return model, tokenizer, bank


def run_steps(model, tokenizer, conversations, max_new_tokens=6, batch_invariant=False):
    prompts = [chat_prompt(tokenizer, m) for m in conversations]
    sampling = [Sampling(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)] * len(prompts)
    end_ids = end_token_ids(model, tokenizer)
    steps = decode_steps(model, prompts, sampling, end_ids, tokenizer.pad_token_id, batch_invariant=batch_invariant)
    return list(steps)


def assert_rows_match_alone(
    model,
    tokenizer,
    bank,
    atol,
    rtol,
    steps,
    conversations=CONVERSATIONS,
    row_adapters=ROW_ADAPTERS,
    batch_invariant=False,
):
    """Row i of the mixed batch against conversation i run alone with its adapter activated."""
    lengths = {len(chat_prompt(tokenizer, m)) for m in conversations}
    assert len(lengths) > 2, "the batch must hold prompts of different lengths (so, padding)"
    with bank.mixed_batch(row_adapters):
        mixed = run_steps(model, tokenizer, conversations, steps, batch_invariant)
    for row, (messages, name) in enumerate(zip(conversations, row_adapters)):
        bank.activate(name)
        alone = run_steps(model, tokenizer, [messages], steps, batch_invariant)
        assert len(alone) == len(mixed)
        assert [s.tokens[0].item() for s in alone] == [s.tokens[row].item() for s in mixed], f"row {row}"
        for step_alone, step_mixed in zip(alone, mixed):
            torch.testing.assert_close(step_mixed.logits[row], step_alone.logits[0], atol=atol, rtol=rtol)
    bank.activate(None)
    return mixed


def assert_adapter_matters(mixed, atol):
    """Rows 1 and 3 of CONVERSATIONS hold the same prompt, base against adapter b."""
    assert (mixed[0].logits[1] - mixed[0].logits[3]).abs().max() > 10 * atol


def test_mixed_batch_rows_equal_each_prompt_alone_fp32(fp32_setup):
    model, tokenizer, bank = fp32_setup
    assert_adapter_matters(assert_rows_match_alone(model, tokenizer, bank, atol=1e-5, rtol=0, steps=6), 1e-5)


def test_mixed_batch_rows_equal_each_prompt_alone_nf4(tmp_path):
    model, tokenizer, bank = model_with_bank(save_tiny_llama(tmp_path / "tiny"), "nf4")
    # bf16 compute: batched and single matmuls may round differently in the last bf16 bit.
    assert_adapter_matters(assert_rows_match_alone(model, tokenizer, bank, atol=2e-2, rtol=1e-2, steps=2), 2e-2)
    # Batch-invariant: the very same bits.
    assert_rows_match_alone(model, tokenizer, bank, atol=0, rtol=0, steps=2, batch_invariant=True)
    # Vectors resident in the compute dtype give the very same logits at half the memory.
    assert model.dtype == torch.bfloat16
    half = AdapterBank(model, dtype=model.dtype)
    for name in ("a", "b"):
        half.add(name, bank.adapters[name])
    assert half.bytes_per_adapter() * 2 == bank.bytes_per_adapter()
    with bank.mixed_batch(ROW_ADAPTERS):
        full_steps = run_steps(model, tokenizer, CONVERSATIONS, 2)
    with half.mixed_batch(ROW_ADAPTERS):
        half_steps = run_steps(model, tokenizer, CONVERSATIONS, 2)
    assert all(torch.equal(f.logits, h.logits) for f, h in zip(full_steps, half_steps))


def test_batch_invariant_rows_equal_each_prompt_alone_fp16(tmp_path):
    """fp16, the compute dtype of GPUs without bf16. Before the mode took rotary angles from one
    table, one row here moved by up to 1e-3 in about one process of five (two threads): cos and
    sin of a position came out a bit apart depending on where it fell in the batch's tensor."""
    model, tokenizer, bank = model_with_bank(save_tiny_llama(tmp_path / "tiny"), "nf4", compute_dtype="float16")
    assert model.dtype == torch.float16
    mixed = assert_rows_match_alone(model, tokenizer, bank, atol=0, rtol=0, steps=2, batch_invariant=True)
    assert_adapter_matters(mixed, 1e-3)


def test_batch_invariant_rows_equal_each_prompt_alone_smollm2_bf16(smollm2_bf16_setup):
    """The real NF4 base in bf16: with batch_invariant, a row's tokens and logits are those of
    its prompt alone, however much padding its batch-mates force on it."""
    model, tokenizer, bank = smollm2_bf16_setup
    lengths = [len(chat_prompt(tokenizer, m)) for m in SPREAD_CONVERSATIONS]
    assert max(lengths) > 3 * min(lengths)
    assert_rows_match_alone(
        model, tokenizer, bank, 0, 0, 2, SPREAD_CONVERSATIONS, SPREAD_ADAPTERS, batch_invariant=True
    )
    with bank.mixed_batch([None, "a"]):  # the adapter must matter, or rows 0 and 2 prove nothing about it
        base_and_adapter = run_steps(model, tokenizer, SPREAD_CONVERSATIONS[:1] * 2, 1, batch_invariant=True)
    assert (base_and_adapter[0].logits[0] - base_and_adapter[0].logits[1]).abs().max() > 0.5


def test_row_attention_gives_a_padded_row_what_it_gets_alone():
    """Prefill and one decode query, grouped-query heads, bf16: each left-padded row attends
    bit for bit as the same row unpadded through transformers' own SDPA path."""
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    generator = torch.Generator().manual_seed(0)
    lengths, width = [41, 9], 41
    padding = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], dtype=torch.bool)

    def states(heads, queries):
        return torch.randn(len(lengths), heads, queries, 64, generator=generator).to(torch.bfloat16)

    key, value = states(3, width), states(3, width)
    for query in (states(9, width), states(9, 1)):  # prefill, then a decode step over the same keys
        q_length = query.shape[2]
        offset = width - q_length
        mask = sdpa_mask(len(lengths), q_length, width, offset, attention_mask=padding, allow_is_causal_skip=False)
        batched, _ = row_attention_forward(module, query, key, value, mask)
        for row, n in enumerate(lengths):
            queries = min(n, q_length)
            row_query = query[row : row + 1, :, -queries:]
            alone, _ = sdpa_attention_forward(
                module, row_query, key[row : row + 1, :, -n:], value[row : row + 1, :, -n:], None
            )
            assert torch.equal(batched[row, -queries:], alone[0])
            assert not batched[row, : q_length - queries].any()  # padding queries: zeros, never NaN


def test_fixed_row_tiles_make_each_row_independent_of_the_others(smollm2_bf16_setup):
    """Under FixedRowTiles a row's product (4-bit base layer, VeRA layer, bf16 output head) is
    the same bits whether it comes alone or among 4, 31 or 100 rows."""
    model, _, bank = smollm2_bf16_setup
    layer = model.model.layers[0]
    generator = torch.Generator().manual_seed(0)
    bank.activate("a")
    try:
        for module in (layer.mlp.down_proj, layer.self_attn.q_proj, model.lm_head):
            width = module.in_features
            rows = torch.randn(100, width, generator=generator).to(torch.bfloat16)
            with torch.no_grad(), FixedRowTiles():
                alone = torch.cat([module(rows[i : i + 1]) for i in range(4)])
                for count in (4, 31, 100):
                    assert torch.equal(module(rows[:count][None])[0, :4], alone)
    finally:
        bank.activate(None)


def test_decode_loop_matches_transformers_generate(fp32_setup):
    model, tokenizer, bank = fp32_setup
    bank.activate("a")
    ids = chat_prompt(tokenizer, CONVERSATIONS[0])
    expected = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    steps = list(
        decode_steps(model, [ids], [Sampling(0.0, 1.0, 8)], end_token_ids(model, tokenizer), tokenizer.pad_token_id)
    )
    bank.activate(None)
    assert [s.tokens[0].item() for s in steps] == expected


def test_generate_takes_one_adapter_per_conversation(fp32_setup):
    model, tokenizer, bank = fp32_setup
    replies = generate(model, tokenizer, CONVERSATIONS, ROW_ADAPTERS, bank, Sampling(0.0, 1.0, 5))
    for messages, name, reply in zip(CONVERSATIONS, ROW_ADAPTERS, replies):
        bank.activate(name)
        assert generate(model, tokenizer, [messages], sampling=Sampling(0.0, 1.0, 5)) == [reply]
    bank.activate(None)
    assert replies[1] != replies[3]  # same prompt, base against adapter b
    with pytest.raises(ValueError, match="one per conversation"):
        generate(model, tokenizer, CONVERSATIONS, ["a"], bank)
    with pytest.raises(KeyError, match="no adapter named 'zzz'"):
        generate(model, tokenizer, CONVERSATIONS[:1], ["zzz"], bank)


def test_rows_stop_at_their_own_budget_or_end_token(fp32_setup):
    model, tokenizer, _ = fp32_setup
    prompts = [chat_prompt(tokenizer, m) for m in CONVERSATIONS[:3]]
    budgets = [Sampling(0.0, 1.0, 2), Sampling(0.0, 1.0, 5), Sampling(0.0, 1.0, 3)]
    steps = list(decode_steps(model, prompts, budgets, set(), tokenizer.pad_token_id))
    assert [s.active.tolist() for s in steps] == [[True] * 3] * 2 + [
        [False, True, True],
        [False, True, False],
        [False, True, False],
    ]
    assert not any(s.stopped.any() for s in steps) and steps[-1].finished.all()
    # Declare row 1's first token an end token: the rows that chose it stop there, without text.
    end = steps[0].tokens[1].item()
    ended = list(decode_steps(model, prompts, budgets, {end}, tokenizer.pad_token_id))
    assert ended[0].stopped.tolist() == (steps[0].tokens == end).tolist()
    assert not any(row == 1 for s in ended for row, _ in s.text_tokens())
    assert all(not s.active[1] for s in ended[1:])


def test_pick_tokens_per_row_temperature_and_top_p():
    draws = 400  # each row repeated: one call samples them all
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.3, 0.2]] * 3)).repeat(draws, 1)
    temperature, top_p = torch.tensor([0.0, 1.0, 1.0]).repeat(draws), torch.tensor([1.0, 0.5, 1.0]).repeat(draws)
    seen = pick_tokens(logits, temperature, top_p, torch.Generator().manual_seed(0)).reshape(draws, 3)
    assert set(seen[:, 0].tolist()) == {1}  # greedy row
    assert set(seen[:, 1].tolist()) == {1, 2}  # 0.4 + 0.3 reach top_p = 0.5; 0.2 and 0.1 never drawn
    assert set(seen[:, 2].tolist()) == {0, 1, 2, 3}
    assert abs((seen[:, 1] == 1).float().mean().item() - 0.4 / 0.7) < 0.1


def test_sampling_rejects_bad_values():
    with pytest.raises(ValueError, match="top_p must be in"):
        Sampling(top_p=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        Sampling(temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        Sampling(max_new_tokens=0)


def test_text_stream_pieces_add_up_to_the_decoded_text(fp32_setup):
    _, tokenizer, _ = fp32_setup
    text = "Grüße 🦙 from Zürich — naïve 漢字"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) == text == stream.text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # 🦙 spans three tokens and waits until complete


def test_chat_prompt_uses_the_chat_template(fp32_setup):
    _, tokenizer, _ = fp32_setup
    ids = chat_prompt(tokenizer, CONVERSATIONS[2])
    expected = tokenizer.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(ids) == expected
    assert expected.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>") and expected.endswith(
        "<|im_start|>assistant\n"
    )


def test_chat_keeps_history_streams_and_resets(fp32_setup):
    model, tokenizer, _ = fp32_setup
    chat = Chat(model, tokenizer, system="Be brief.", sampling=Sampling(0.0, 1.0, 4))
    first = "".join(chat.reply("Hello"))
    assert chat.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first},
    ]
    expected = generate(
        model, tokenizer, [chat.messages + [{"role": "user", "content": "And then?"}]], sampling=Sampling(0.0, 1.0, 4)
    )
    assert "".join(chat.reply("And then?")) == expected[0]
    assert len(chat.messages) == 5
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}]


def test_chat_switches_adapters_by_folder(fp32_setup, tiny_fp32_dir, tmp_path):
    model, tokenizer, bank = fp32_setup
    bank.activate("a")
    save_adapter(model, tmp_path / "a")
    bank.activate(None)
    greedy = Sampling(0.0, 1.0, 4)
    with_a, plain = (generate(model, tokenizer, [CONVERSATIONS[1]], [name], bank, greedy)[0] for name in ("a", None))
    fresh, _ = load_base(ModelConfig(name=tiny_fp32_dir, quantization="fp32"))  # no VeRA yet
    chat = Chat(fresh, tokenizer, sampling=greedy)
    assert chat.command(f"/adapter {tmp_path / 'a'}") == f"now answering with {tmp_path / 'a'}"
    assert "".join(chat.reply("Hi")) == with_a
    assert chat.command("/adapter none") == "now answering with the base model"
    chat.reset()
    assert "".join(chat.reply("Hi")) == plain != with_a
    assert chat.command(f"/adapter {tmp_path / 'missing'}").startswith("adapter not changed: adapter folder")
    export_peft(read_adapter(tmp_path / "a"), tmp_path / "a-peft")  # the same adapter in peft's format
    assert chat.command(f"/adapter {tmp_path / 'a-peft'}") == f"now answering with {tmp_path / 'a-peft'}"
    chat.reset()
    assert "".join(chat.reply("Hi")) == with_a
    chat.command("/adapter none")
    assert chat.command("/reset") == "history cleared" and chat.messages == []
    assert chat.command("/help").startswith("unknown command '/help'; commands: /reset")


def test_chat_script_answers_one_prompt_and_exits(fp32_setup, tiny_fp32_dir, tmp_path):
    model, tokenizer, bank = fp32_setup
    bank.activate("b")
    save_adapter(model, tmp_path / "b")
    bank.activate(None)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = generate(model, tokenizer, [messages], ["b"], bank, Sampling(0.0, 1.0, 5))[0]
    script = Path(__file__).parents[2] / "scripts" / "chat.py"
    args = [
        "--model",
        tiny_fp32_dir,
        "--quantization",
        "fp32",
        "--adapter",
        str(tmp_path / "b"),
        "--system",
        "Be brief.",
    ]
    args += ["--prompt", "Hi", "--temperature", "0", "--max-new-tokens", "5"]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_chat_script_answers_a_batch_with_one_adapter_per_prompt(fp32_setup, tiny_fp32_dir, tmp_path):
    model, tokenizer, bank = fp32_setup
    for name in ("a", "b"):
        bank.activate(name)
        save_adapter(model, tmp_path / name)
    bank.activate(None)
    prompts, names = ["Hi", "Name a colour.", "Hi"], ["a", None, "b"]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    expected = generate(model, tokenizer, conversations, names, bank, Sampling(0.0, 1.0, 4))
    folders = [None if n is None else str(tmp_path / n) for n in names]
    fresh, _ = load_base(ModelConfig(name=tiny_fp32_dir, quantization="fp32"))
    assert reply_batch(fresh, tokenizer, prompts, folders, sampling=Sampling(0.0, 1.0, 4)) == expected
    export_peft(read_adapter(tmp_path / "b"), tmp_path / "b-peft")  # peft's format, read as qvera's
    with_peft = [*folders[:2], str(tmp_path / "b-peft")]
    assert reply_batch(fresh, tokenizer, prompts, with_peft, sampling=Sampling(0.0, 1.0, 4)) == expected
    with pytest.raises(ValueError, match="got 1 adapters for 3 prompts"):
        reply_batch(fresh, tokenizer, prompts, folders[:1])

    script = Path(__file__).parents[2] / "scripts" / "chat.py"
    args = ["--model", tiny_fp32_dir, "--quantization", "fp32", "--temperature", "0", "--max-new-tokens", "4"]
    for prompt, folder in zip(prompts, folders):
        args += ["--prompt", prompt, "--adapter", folder or "none"]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines == [{"prompt": p, "adapter": f, "reply": r} for p, f, r in zip(prompts, folders, expected)]


def test_decoding_casts_the_models_own_vectors_once_and_leaves_no_rows_behind(smollm2_bf16_setup):
    """With the model's own vectors (chat, one adapter at a time) a decode step casted d and b to
    bf16 in every layer: 420 launches a step in SmolLM2, more than all the base's own casts. They
    are now cast once a decode, set around each forward only, so a caller that stops iterating
    leaves the layers as they were."""
    model, tokenizer, bank = smollm2_bf16_setup
    bank.activate("a")
    layers = vera_layers(model)
    prompt = chat_prompt(tokenizer, CONVERSATIONS[0])
    steps = decode_steps(model, [prompt], [Sampling(0.0, 1.0, 6)], set(), tokenizer.pad_token_id)
    next(steps)  # the prefill
    with OperatorCount() as count:
        for _ in range(4):
            next(steps)
    assert count.counts["_to_copy"] / 4 < 2 * len(layers) == 420
    assert all(layer.row_vectors is None for layer in layers.values())
    steps.close()
    bank.activate(None)
