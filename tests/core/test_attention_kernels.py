"""The process-wide switch that keeps SDPA off cuDNN's kernels: counted, restored, overridable."""

import threading

import pytest
import torch

from qvera.core.attention_kernels import ALLOW_CUDNN_VARIABLE, without_cudnn_attention


def cudnn_on() -> bool:
    return torch.backends.cuda.cudnn_sdp_enabled()


pytestmark = pytest.mark.usefixtures("cudnn_attention_default")


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
