import threading

import pytest
import torch
from test_scheduler import two_adapter_store

from qvera import ModelConfig, load_base
from qvera.serving.attention_kernels import ALLOW_CUDNN_VARIABLE, without_cudnn_attention
from qvera.serving.generation import GREEDY, Sampling, chat_prompt, generate
from qvera.serving.scheduler import Job, Scheduler


def cudnn_on() -> bool:
    return torch.backends.cuda.cudnn_sdp_enabled()


@pytest.fixture(autouse=True)
def cudnn_enabled_before():
    """Every test starts with torch's default (cuDNN attention allowed) and leaves it so."""
    assert cudnn_on()
    yield
    torch.backends.cuda.enable_cudnn_sdp(True)


def test_cudnn_attention_is_off_inside_and_back_after():
    with without_cudnn_attention():
        assert not cudnn_on()
        with without_cudnn_attention():
            assert not cudnn_on()
        assert not cudnn_on()
    assert cudnn_on()


def test_the_switch_comes_back_when_the_last_thread_leaves_in_any_order():
    """Generations on two threads, the first to start ending first: cuDNN stays off until both end."""
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with without_cudnn_attention():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with without_cudnn_attention():
            second_in.set()
            first_out.wait(10)
            seen["after the first left"] = cudnn_on()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == {"after the first left": False}
    assert cudnn_on()


def test_a_user_who_turned_cudnn_off_keeps_it_off():
    torch.backends.cuda.enable_cudnn_sdp(False)
    with without_cudnn_attention():
        assert not cudnn_on()
    assert not cudnn_on()


def test_the_environment_variable_keeps_torchs_choice(monkeypatch):
    monkeypatch.setenv(ALLOW_CUDNN_VARIABLE, "1")
    with without_cudnn_attention():
        assert cudnn_on()
    assert cudnn_on()


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
