"""Generation and the server run every forward without cuDNN's attention (qvera.core.attention_kernels)."""

import threading

import pytest
import torch
from test_scheduler import two_adapter_store

from qvera import ModelConfig, load_base
from qvera.generation.decode import GREEDY, Sampling, chat_prompt, generate
from qvera.serving.scheduler import Job, Scheduler


def cudnn_on() -> bool:
    return torch.backends.cuda.cudnn_sdp_enabled()


pytestmark = pytest.mark.usefixtures("cudnn_attention_default")


def record_cudnn_switch(model) -> list[bool]:
    """The cuDNN-attention switch as each forward of `model` starts."""
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(cudnn_on()))
    return seen


def test_generation_and_the_server_run_every_forward_without_cudnn(tiny_llama_dir, tmp_path):
    model, tokenizer = load_base(ModelConfig(name=tiny_llama_dir, quantization="fp32"))
    seen = record_cudnn_switch(model)
    generate(model, tokenizer, [[{"role": "user", "content": "Hi"}]], sampling=Sampling(0.0, 1.0, 3))
    assert len(seen) == 3 and not any(seen)  # the prefill and two decode steps
    assert cudnn_on()

    store = two_adapter_store(model, tmp_path)
    for invariant in (False, True):
        seen.clear()
        scheduler = Scheduler(model, tokenizer, store, batch_invariant=invariant).start()
        try:
            done = threading.Event()
            prompt = chat_prompt(tokenizer, [{"role": "user", "content": "Hello there"}])
            sampling = Sampling(GREEDY.temperature, GREEDY.top_p, max_new_tokens=3)
            scheduler.submit(Job(prompt, "a", sampling, lambda event, done=done: event[0] != "text" and done.set()))
            assert done.wait(60)
        finally:
            scheduler.close()
        assert scheduler.stats.failed == 0
        assert len(seen) >= 3 and not any(seen), f"batch_invariant={invariant}: {seen}"
    assert cudnn_on()
