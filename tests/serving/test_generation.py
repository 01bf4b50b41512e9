import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama

from qvera import ModelConfig, VeraConfig, attach_vera, load_base
from qvera.adapters.format import save_adapter
from qvera.core.attach import vector_state
from qvera.serving.bank import AdapterBank
from qvera.serving.generation import (
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

CONVERSATIONS = [
    [{"role": "user", "content": "Name three colours of the rainbow, please."}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is two plus two?"}],
    [{"role": "user", "content": "Hi"}],
]
ROW_ADAPTERS = ["a", None, "b", "b"]


def random_vectors(model, seed):
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(value.shape, generator=generator) for key, value in vector_state(model).items()}


def model_with_bank(folder, quantization, rank=16):
    model, tokenizer = load_base(ModelConfig(name=folder, quantization=quantization))
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


def run_steps(model, tokenizer, conversations, max_new_tokens=6):
    prompts = [chat_prompt(tokenizer, m) for m in conversations]
    sampling = [Sampling(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)] * len(prompts)
    return list(decode_steps(model, prompts, sampling, end_token_ids(model, tokenizer), tokenizer.pad_token_id))


def assert_rows_match_alone(model, tokenizer, bank, atol, rtol, steps):
    """Row i of the mixed batch against conversation i run alone with its adapter activated."""
    lengths = {len(chat_prompt(tokenizer, m)) for m in CONVERSATIONS}
    assert len(lengths) > 2, "the batch must hold prompts of different lengths (so, padding)"
    with bank.mixed_batch(ROW_ADAPTERS):
        mixed = run_steps(model, tokenizer, CONVERSATIONS, steps)
    for row, (messages, name) in enumerate(zip(CONVERSATIONS, ROW_ADAPTERS)):
        bank.activate(name)
        alone = run_steps(model, tokenizer, [messages], steps)
        assert len(alone) == len(mixed)
        for step_alone, step_mixed in zip(alone, mixed):
            assert step_mixed.tokens[row] == step_alone.tokens[0]
            torch.testing.assert_close(step_mixed.logits[row], step_alone.logits[0], atol=atol, rtol=rtol)
    bank.activate(None)
    # Rows 1 and 3 hold the same prompt, base against adapter b: the adapter must matter.
    assert (mixed[0].logits[1] - mixed[0].logits[3]).abs().max() > 10 * atol


def test_mixed_batch_rows_equal_each_prompt_alone_fp32(fp32_setup):
    model, tokenizer, bank = fp32_setup
    assert_rows_match_alone(model, tokenizer, bank, atol=1e-5, rtol=0, steps=6)


def test_mixed_batch_rows_equal_each_prompt_alone_nf4(tmp_path):
    model, tokenizer, bank = model_with_bank(save_tiny_llama(tmp_path / "tiny"), "nf4")
    # bf16 compute: batched and single matmuls may round differently in the last bf16 bit.
    assert_rows_match_alone(model, tokenizer, bank, atol=2e-2, rtol=1e-2, steps=2)
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
