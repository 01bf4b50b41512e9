"""A third adapter method defined here, in the test, to show that the seam (qvera.core.method)
is all a method needs: "d only", VeRA with b fixed at 1 (ΔW = B Λd A), registered below and
run through attach, training, the file format, merge and a mixed batch without any other edit."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from qvera.adapters.format import read_adapter, save_adapter
from qvera.adapters.loading import attach_adapter
from qvera.adapters.lora_export import export_lora
from qvera.adapters.merge import merge, unmerge
from qvera.core.attach import attach_vera, load_vector_state, vector_state, vera_layers
from qvera.core.config import VeraConfig
from qvera.core.method import Method
from qvera.core.methods import METHODS, register
from qvera.generation.bank import AdapterBank


class DOnly(Method):
    """VeRA with b fixed at 1: only d trains and is saved."""

    name = "d-only"
    title = "d-only VeRA"
    lora_options = None  # pretend it has no LoRA form, to see the export refuse it
    peft_vera = False

    def init_layer(self, layer):
        with torch.no_grad():
            layer.lambda_b.fill_(1.0)
        layer.lambda_b.requires_grad_(False)

    def vector_names(self):
        return ("lambda_d",)

    def shapes(self, rank, out_features):
        return {"lambda_d": (rank,)}

    def rows(self, layer, vectors):
        d = vectors["lambda_d"]
        return d, torch.ones(layer.out_features, dtype=d.dtype, device=d.device), None

    def base_vectors(self, layer):
        return {"lambda_d": torch.zeros_like(layer.lambda_d)}


@pytest.fixture(scope="module", autouse=True)
def d_only():
    method = register(DOnly())
    yield method
    del METHODS[method.name]


@pytest.fixture(scope="module")
def small_base():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=300)).float()


IDS = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(0))


def toy_model(base, seed=None):
    model = attach_vera(copy.deepcopy(base), VeraConfig(rank=24, projection_seed=3, method="d-only"))
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        load_vector_state(model, {k: torch.randn(v.shape, generator=generator) for k, v in vector_state(model).items()})
    return model


def logits_of(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_only_d_trains_and_a_step_changes_the_loss(small_base):
    model = toy_model(small_base)
    assert sorted({key.rsplit(".", 1)[1] for key in vector_state(model)}) == ["lambda_d"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.shape == (24,) for p in trainable)  # the d of every layer, nothing else
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    losses = []
    for _ in range(2):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    assert all(torch.equal(layer.lambda_b, torch.ones_like(layer.lambda_b)) for layer in vera_layers(model).values())


def test_saved_and_reloaded_it_runs_the_same(small_base, tmp_path):
    model = toy_model(small_base, seed=1)
    folder = save_adapter(model, tmp_path / "toy")
    adapter = read_adapter(folder)
    assert adapter.config.method == "d-only" and adapter.config.format_version == 3
    saved = vector_state(model)
    assert adapter.vectors.keys() == saved.keys()
    assert all(torch.equal(adapter.vectors[key], value) for key, value in saved.items())
    reloaded = attach_adapter(copy.deepcopy(small_base), folder)
    assert torch.equal(logits_of(reloaded), logits_of(model))
    with pytest.raises(ValueError, match=r"^a d-only VeRA adapter has no LoRA equivalent; merge it \(qvera merge\)"):
        export_lora(adapter, tmp_path / "lora")


def test_a_qvera_without_the_method_refuses_its_files_in_one_line(small_base, tmp_path, monkeypatch):
    folder = save_adapter(toy_model(small_base, seed=1), tmp_path / "toy")
    monkeypatch.delitem(METHODS, "d-only")
    with pytest.raises(ValueError, match=r"is a 'd-only' adapter, a method this qvera does not know \(dvora, vera\)"):
        read_adapter(folder)


def test_merged_it_computes_the_unmerged_function(small_base):
    model = toy_model(small_base, seed=2)
    before, vectors = logits_of(model), vector_state(model)
    merge(model)
    torch.testing.assert_close(logits_of(model), before, atol=1e-5, rtol=1e-5)
    unmerge(model)
    assert all(torch.equal(value, vectors[key]) for key, value in vector_state(model).items())
    torch.testing.assert_close(logits_of(model), before, atol=1e-5, rtol=1e-5)
    assert (before - logits_of(small_base)).abs().max() > 1e-2  # the adapter does change the output


def test_a_mixed_batch_with_vera_rows_equals_each_alone(small_base):
    toy = toy_model(small_base, seed=3)
    plain = attach_vera(copy.deepcopy(small_base), VeraConfig(rank=24, projection_seed=3))
    generator = torch.Generator().manual_seed(4)
    state = {k: 0.1 * torch.randn(v.shape, generator=generator) for k, v in vector_state(plain).items()}
    load_vector_state(plain, state)
    bank = AdapterBank(attach_vera(copy.deepcopy(small_base), VeraConfig(rank=24, projection_seed=3)))
    bank.add("toy", vector_state(toy), "d-only")
    bank.add("plain", vector_state(plain))
    rows = ["toy", "plain", None]
    with torch.no_grad(), bank.mixed_batch(rows):
        mixed = bank.model(input_ids=IDS).logits
    for row, alone in enumerate([toy, plain, small_base]):
        torch.testing.assert_close(mixed[row], logits_of(alone, IDS[row : row + 1])[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"adapter 'toy' is a d-only VeRA adapter and this model's layers are VeRA"):
        bank.activate("toy")
