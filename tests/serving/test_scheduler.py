import threading
import time

import pytest
import torch
from transformers import AutoTokenizer

from qvera import ModelConfig, VeraConfig, attach_vera, load_base, load_vector_state, vector_state
from qvera.adapters import save_adapter
from qvera.generation.decode import Sampling, chat_prompt
from qvera.generation.sampling import ReplyText, pick_rows
from qvera.serving.kv_rows import CacheRows
from qvera.serving.scheduler import Job, Scheduler
from qvera.serving.store import AdapterStore

LEAVES = (
    "Leaves are green because chlorophyll absorbs red and blue light and reflects green. In autumn the "
    "chlorophyll breaks down, and the yellow and orange carotenoids that were there all along show through, "
    "while some trees also make red anthocyanins from the sugars trapped in the leaf. "
)
# Prompts of about 20, 110 and 35 tokens, adapters and budgets of their own: rows leave at
# different steps. (prompt, adapter, max_new_tokens); the last two join once a row is answering.
REQUESTS = [
    ("Hi", "a", 6),
    (LEAVES + "Why do leaves change colour in autumn? Answer in one sentence.", None, 4),
    ("What makes a leaf green, and what happens to that pigment in autumn?", "b", 5),
    ("Hello there", None, 3),
]


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


@pytest.fixture(scope="module")
def smollm2_store(tmp_path_factory, smollm2_dir):
    """The real SmolLM2 in NF4 with bf16 compute, and a store of two small random adapters."""
    model, tokenizer = load_base("smollm2-135m")
    assert model.dtype == torch.bfloat16
    return model, tokenizer, two_adapter_store(model, tmp_path_factory.mktemp("adapters"))


def two_adapter_store(model, folder) -> AdapterStore:
    """VeRA attached to `model`, and a store in `folder` of two small random adapters, a and b."""
    attach_vera(model, VeraConfig(rank=16, projection_seed=3))
    generator = torch.Generator().manual_seed(1)
    for name in ("a", "b"):
        # Small vectors: the adapter moves the logits without drowning the base model's reply.
        load_vector_state(
            model, {k: 0.1 * torch.randn(v.shape, generator=generator) for k, v in vector_state(model).items()}
        )
        save_adapter(model, folder / name)
    return AdapterStore(model, folder)


class RecordingScheduler(Scheduler):
    """Keeps the tokens each job was given and the logits they were picked from."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Keyed by id, with the job kept alive beside its list: a finished job's id could
        # otherwise be reused by a later one, which would then inherit its tokens.
        self.picked: dict[int, tuple[Job, list[tuple[int, torch.Tensor]]]] = {}

    def _pick(self, rows, logits):
        tokens = super()._pick(rows, logits)
        for row, token, row_logits in zip(rows, tokens, logits):
            self.picked.setdefault(id(row.job), (row.job, []))[1].append((token, row_logits.clone()))
        return tokens


def serve(scheduler: RecordingScheduler, tokenizer, requests, joining=()):
    """Each request's greedy (token, logits) list: `requests` submitted at once, `joining` once a
    row is answering (so they enter a batch whose rows are mid-way)."""
    jobs, done = [], []

    def submit(prompt, adapter, max_new_tokens):
        finished = threading.Event()
        prompt = chat_prompt(tokenizer, [{"role": "user", "content": prompt}])
        greedy = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
        jobs.append(Job(prompt, adapter, greedy, lambda event: event[0] != "text" and finished.set()))
        done.append(finished)
        scheduler.submit(jobs[-1])

    for request in requests:
        submit(*request)
    deadline = time.monotonic() + 120
    while joining and not scheduler.load()["running"]:
        assert time.monotonic() < deadline, "no row started answering"
        time.sleep(0.01)
    for request in joining:
        submit(*request)
    for finished in done:
        assert finished.wait(120), "a request did not finish"
    return [scheduler.picked[id(job)][1] for job in jobs]


def test_batch_invariant_scheduler_replies_as_each_request_alone_bf16(smollm2_store):
    """bf16 on the NF4 base: prompts of very different lengths, chunked prefill shared among
    them, rows joining and leaving mid-run (so pads between a row's keys): each request gets
    the very tokens, from the very logits, that it gets served alone."""
    assert_batch_invariant_replies(*smollm2_store)


def assert_batch_invariant_replies(model, tokenizer, store):
    scheduler = RecordingScheduler(model, tokenizer, store, prefill_tokens=32, batch_invariant=True).start()
    try:
        mixed = serve(scheduler, tokenizer, REQUESTS[:2], joining=REQUESTS[2:])
        alone = [serve(scheduler, tokenizer, [request])[0] for request in REQUESTS]
    finally:
        scheduler.close()
    assert scheduler.stats.failed == 0
    for i, (together, by_itself) in enumerate(zip(mixed, alone)):
        assert [token for token, _ in together] == [token for token, _ in by_itself], f"request {i}"
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(together, by_itself)), f"request {i}'s logits"
    assert mixed[0][0][1].ne(mixed[3][0][1]).any()  # different prompts and adapters, different numbers
