"""Loading an adapter reads its folder once, checks its fit once, and generates A and B once:
the ones the fit check made are the ones attached."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from conftest import adapted, logits

import qvera.adapters.fit
import qvera.core.vera
from qvera.adapters.format import save_adapter
from qvera.adapters.loading import load_adapted
from qvera.core.base import load_base
from qvera.core.config import ModelConfig
from qvera.serving.store import AdapterStore


@pytest.fixture
def calls(monkeypatch):
    """Counts of the calls to generate_projections and check_fits, wherever they were imported."""
    counts = Counter()
    originals = {
        "generate_projections": qvera.core.vera.generate_projections,
        "check_fits": qvera.adapters.fit.check_fits,
    }

    def counting(name, original):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        return wrapper

    for module in [m for name, m in sys.modules.items() if name.startswith("qvera")]:
        for name, original in originals.items():
            if getattr(module, name, None) is original:
                monkeypatch.setattr(module, name, counting(name, original))
    return counts


@pytest.fixture(scope="module")
def saved(tiny_llama_dir, tmp_path_factory):
    model, tokenizer = adapted(tiny_llama_dir)
    folder = tmp_path_factory.mktemp("read-once")
    for name in ("a", "b"):
        save_adapter(model, folder / name)
    return folder, logits(model, tokenizer)


def test_load_adapted_generates_a_and_b_once_and_checks_once(tiny_llama_dir, saved, calls):
    folder, expected = saved
    model, tokenizer = load_adapted(ModelConfig(name=str(tiny_llama_dir), quantization="fp32"), folder / "a")
    assert dict(calls) == {"generate_projections": 1, "check_fits": 1}
    torch.testing.assert_close(logits(model, tokenizer), expected, atol=1e-5, rtol=0)


def test_load_adapted_without_a_base_name_reads_the_folder_once(tiny_llama_dir, saved, calls, monkeypatch):
    reads = Counter()
    original = qvera.adapters.loading.read_adapter
    monkeypatch.setattr(qvera.adapters.loading, "read_adapter", lambda *a: reads.update(["read"]) or original(*a))
    load_adapted(None, saved[0] / "a")  # the base named in the adapter
    assert reads["read"] == 1 and dict(calls) == {"generate_projections": 1, "check_fits": 1}


def test_the_store_attaching_to_a_bare_base_generates_a_and_b_once(tiny_llama_dir, saved, calls):
    folder, _ = saved
    model, _ = load_base(ModelConfig(name=str(tiny_llama_dir), quantization="fp32"))
    store = AdapterStore(model, folder, log=lambda _: None)
    assert store.servable() == ["a", "b"]
    assert dict(calls) == {"generate_projections": 1, "check_fits": 2}  # one check per adapter folder
