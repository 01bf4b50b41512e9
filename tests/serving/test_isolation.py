"""A failure in one row costs that request alone: injected at each stage a row goes through
(admitting, prefill, decode, sampling), it fails the request it belongs to, with a clear
error, its adapter released and counted; every other request in the batch gets exactly the
reply it gets alone (fp32)."""

import threading

import pytest
import torch

from qvera import ModelConfig, VeraConfig, attach_vera, load_base, load_vector_state, vector_state
from qvera.adapters import save_adapter
from qvera.generation.decode import Sampling, chat_prompt
from qvera.serving import scheduler as scheduler_module
from qvera.serving.scheduler import GenerationFailed, Job, Scheduler
from qvera.serving.store import AdapterStore

MAX_TOKENS = 6
BYSTANDERS = [("Tell me about rivers.", "a"), ("Hi", None), ("Name three lakes and a sea.", "b")]
VICTIM = ("Why is the sky blue? Tell me in detail, with the physics of scattering and all. " * 2, "a")


@pytest.fixture(scope="module")
def model_tokenizer_store(tiny_llama_dir, tmp_path_factory):
    model, tokenizer = load_base(ModelConfig(name=tiny_llama_dir, quantization="fp32"))
    attach_vera(model, VeraConfig(rank=16, projection_seed=3))
    folder = tmp_path_factory.mktemp("adapters")
    generator = torch.Generator().manual_seed(1)
    for name in ("a", "b"):
        load_vector_state(model, {k: torch.randn(v.shape, generator=generator) for k, v in vector_state(model).items()})
        save_adapter(model, folder / name)
    return model, tokenizer, AdapterStore(model, folder, max_resident=2)


class Request:
    """A job and what the scheduler reported for it."""

    def __init__(self, tokenizer, text, adapter, temperature=0.0, seed=None):
        self.text, self.done, self.error = "", threading.Event(), None
        self.produced = None
        sampling = Sampling(temperature=temperature, top_p=1.0, max_new_tokens=MAX_TOKENS)
        prompt = chat_prompt(tokenizer, [{"role": "user", "content": text}])
        self.job = Job(prompt, adapter, sampling, self.emit, seed=seed)

    def emit(self, event):
        if event[0] == "text":
            self.text += event[1]
        elif event[0] == "done":
            self.produced = event[2]
            self.done.set()
        else:
            self.error = event[1]
            self.done.set()


def run(scheduler, tokenizer, requests):
    for request in requests:
        scheduler.submit(request.job)
    for request in requests:
        assert request.done.wait(30), "a request was never answered"
    return requests


@pytest.fixture(scope="module")
def alone(model_tokenizer_store):
    model, tokenizer, store = model_tokenizer_store
    scheduler = Scheduler(model, tokenizer, store, prefill_tokens=16).start()
    try:
        return [run(scheduler, tokenizer, [Request(tokenizer, *b)])[0].text for b in BYSTANDERS]
    finally:
        scheduler.close()


def victim_prompt_length(tokenizer):
    return len(chat_prompt(tokenizer, [{"role": "user", "content": VICTIM[0]}]))


def inject(stage, model, tokenizer, monkeypatch):
    """Make the victim's row, and no other, raise at `stage`; return the victim's request."""
    if stage == "admitting":  # a seed no generator takes, as a request could once send
        return Request(tokenizer, *VICTIM, seed=2**64)
    length = victim_prompt_length(tokenizer)
    for text, _ in BYSTANDERS:
        assert len(chat_prompt(tokenizer, [{"role": "user", "content": text}])) + MAX_TOKENS < length - 1
    if stage in ("prefill", "decode"):
        # A position only the victim's row reaches (the bystanders' prompts and replies are
        # shorter): its last prompt token, or its second decode step.
        at = length - 1 if stage == "prefill" else length + 1

        def fail(module, args, kwargs):
            positions = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
            if (positions == at).any():
                raise RuntimeError(f"injected failure at position {at}")

        inject.handles.append(model.model.rotary_emb.register_forward_pre_hook(fail, with_kwargs=True))
        return Request(tokenizer, *VICTIM)
    real = scheduler_module.pick_rows

    def pick_rows(logits, temperature, top_p, generators):
        if (temperature == 0.5).any():
            raise RuntimeError("injected failure while sampling")
        return real(logits, temperature, top_p, generators)

    monkeypatch.setattr(scheduler_module, "pick_rows", pick_rows)
    return Request(tokenizer, *VICTIM, temperature=0.5, seed=1)


inject.handles = []


@pytest.mark.parametrize("stage", ["admitting", "prefill", "decode", "sampling"])
def test_a_row_that_fails_fails_its_request_alone(stage, model_tokenizer_store, alone, monkeypatch):
    model, tokenizer, store = model_tokenizer_store
    scheduler = Scheduler(model, tokenizer, store, prefill_tokens=16).start()
    try:
        victim = inject(stage, model, tokenizer, monkeypatch)
        bystanders = [Request(tokenizer, *b) for b in BYSTANDERS]
        run(scheduler, tokenizer, [bystanders[0], victim, *bystanders[1:]])
    finally:
        scheduler.close()
        while inject.handles:
            inject.handles.pop().remove()
    assert [b.error for b in bystanders] == [None] * len(bystanders)
    assert [b.text for b in bystanders] == alone
    assert isinstance(victim.error, GenerationFailed) and "generating this reply failed" in str(victim.error)
    assert scheduler.stats.failed == 1
    assert not +store.pins  # every adapter released, the victim's too
    assert scheduler.fault is None  # the worker went on
