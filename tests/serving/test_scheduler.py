import pytest
import torch
from transformers import AutoTokenizer

from qvera import ModelConfig, load_base
from qvera.serving.kv_rows import CacheRows
from qvera.serving.sampling import ReplyText, pick_rows


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama_dir):
    return load_base(ModelConfig(name=tiny_llama_dir, quantization="fp32"))


def alone(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1].float()


def test_rows_fed_in_chunks_moved_and_repacked_see_what_they_would_see_alone(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [list(range(100, 117)), list(range(300, 305)), list(range(500, 530))]
    prefill = CacheRows(model, tokenizer.pad_token_id)
    prefill.add_empty(2)
    prefill.forward([prompts[0][:8], prompts[1]])  # unequal chunks leave gaps in the cache
    prefill.add_empty(1)  # a row joins mid-way
    prefill.forward([prompts[0][8:], [7], prompts[2][:6]])
    assert prefill.wasted() > 0
    running = CacheRows(model, tokenizer.pad_token_id)
    running.add(prefill.take([1, 0]))
    prefill.keep([2])
    prefill.repack()
    logits = prefill.forward([prompts[2][6:]])
    torch.testing.assert_close(logits[0], alone(model, prompts[2]), rtol=1e-4, atol=1e-4)
    logits = running.forward([[9], [11]])
    torch.testing.assert_close(logits[0], alone(model, prompts[1] + [7, 9]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], alone(model, prompts[0] + [11]), rtol=1e-4, atol=1e-4)
    prefill.add_empty(2)
    prefill.keep([0, 2])  # a new prompt cancelled before any of it was fed
    assert len(prefill) == 2 and prefill.mask.shape[0] == 2
    fresh = CacheRows(model, tokenizer.pad_token_id)
    fresh.add_empty(2)
    fresh.keep([1])  # nothing cached at all yet
    torch.testing.assert_close(fresh.forward([prompts[1]])[0], alone(model, prompts[1]), rtol=1e-4, atol=1e-4)
    running.keep([1])  # the shorter row leaves; the longer one goes on alone
    torch.testing.assert_close(running.forward([[12]])[0], alone(model, prompts[0] + [11, 12]), rtol=1e-4, atol=1e-4)


def test_stop_strings_cut_the_reply_and_hold_back_what_might_start_one(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    reply = ReplyText(tokenizer, ["sea,", "the moon"])
    sent = "".join(reply.push(token)[0] for token in tokenizer("Rivers flow to the")["input_ids"])
    assert sent == "Rivers flow to "  # "the" might begin "the moon": held back
    pieces = [
        reply.push(token) for token in tokenizer(" sea, then rain falls.", add_special_tokens=False)["input_ids"][:3]
    ]
    assert "".join(p for p, _ in pieces) == "the " and pieces[-1][1]  # "sea," stopped the reply and is not sent
    assert reply.flush() == "" and reply.text == "Rivers flow to the "


def test_seeded_rows_draw_the_same_tokens_in_any_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    temperature, top_p = torch.tensor([1.0, 0.0, 0.8]), torch.tensor([0.9, 1.0, 1.0])

    def draw(seeds, rows):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return [pick_rows(logits[rows], temperature[rows], top_p[rows], generators).tolist() for _ in range(5)]

    together = draw([7, 1, 5], [0, 1, 2])
    assert [step[0] for step in together] == [step[0] for step in draw([7], [0])]
    assert [step[2] for step in together] == [step[0] for step in draw([5], [2])]
    assert all(step[1] == int(logits[1].argmax()) for step in together)  # temperature 0: greedy
