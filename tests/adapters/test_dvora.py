"""DVoRA adapters (method="dvora") through the format, merge, peft export and serving."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from conftest import adapted, logits, tiny_llama_config
from transformers import LlamaForCausalLM

from qvera.adapters.format import CONFIG_FILE, config_checksum, read_adapter, save_adapter
from qvera.adapters.loading import attach_adapter
from qvera.adapters.merge import merge, merged_state_dict, unmerge
from qvera.adapters.peft_interop import export_peft
from qvera.core.attach import attach_vera, load_vector_state, vector_state, vera_layers
from qvera.core.base import load_base
from qvera.core.config import ModelConfig, VeraConfig
from qvera.generation.bank import AdapterBank
from qvera.training.recipe import recipe_from_dict


def dvora(base_dir, quantization="fp32", seed=1, **vera):
    """A DVoRA model with random d, b and m (m within ±30% of its initial row norms)."""
    model, tokenizer = adapted(base_dir, quantization, seed=seed, method="dvora", **vera)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in vera_layers(model).values():
            layer.lambda_m.mul_(1 + 0.3 * torch.randn(layer.lambda_m.shape, generator=generator))
    return model, tokenizer


@pytest.fixture(scope="module")
def dvora_adapter(tiny_llama_dir, tmp_path_factory):
    """A DVoRA adapter saved from a full-precision base, with its vectors and logits."""
    model, tokenizer = dvora(tiny_llama_dir)
    folder = save_adapter(model, tmp_path_factory.mktemp("dvora") / "a")
    return folder, vector_state(model), logits(model, tokenizer)


def test_dvora_adapter_round_trips_as_format_version_3(tiny_llama_dir, dvora_adapter):
    folder, vectors, expected = dvora_adapter
    adapter = read_adapter(folder)
    assert adapter.config.format_version == 3 and adapter.config.method == "dvora"
    assert adapter.config.vera_config.method == "dvora"
    assert sorted(adapter.vectors) == sorted(vectors)
    assert any(key.endswith(".lambda_m") for key in vectors)
    for key, value in vectors.items():
        assert torch.equal(adapter.vectors[key], value)
    model, tokenizer = load_base(ModelConfig(name=str(tiny_llama_dir), quantization="fp32"))
    attach_adapter(model, folder)  # attaches DVoRA from the folder alone
    torch.testing.assert_close(logits(model, tokenizer), expected, atol=1e-5, rtol=0)


def test_plain_adapters_stay_at_format_version_1(tiny_llama_dir, tmp_path):
    model, _ = adapted(tiny_llama_dir)
    adapter = read_adapter(save_adapter(model, tmp_path / "plain"))
    assert adapter.config.format_version == 1 and adapter.config.method == "vera"
    assert json.loads((adapter.folder / CONFIG_FILE).read_text())["method"] == "vera"


def as_version_2(folder):
    """Rewrite a DVoRA adapter's description as qvera wrote version 2: `magnitude: true`, no method."""
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text())
    del config["method"]
    config.update(format_version=2, magnitude=True)
    config["checksum"] = config_checksum(config)
    path.write_text(json.dumps(config))


def test_a_version_2_dvora_file_still_loads_as_dvora(tiny_llama_dir, dvora_adapter, tmp_path):
    folder, vectors, expected = dvora_adapter
    old = tmp_path / "v2"
    shutil.copytree(folder, old)
    as_version_2(old)
    adapter = read_adapter(old)
    assert adapter.config.method == "dvora" and adapter.vectors.keys() == vectors.keys()
    model, tokenizer = load_base(ModelConfig(name=str(tiny_llama_dir), quantization="fp32"))
    attach_adapter(model, old)
    torch.testing.assert_close(logits(model, tokenizer), expected, atol=1e-5, rtol=0)


def test_qvera_reading_version_2_only_refuses_a_dvora_adapter(dvora_adapter, monkeypatch):
    monkeypatch.setattr("qvera.adapters.format.FORMAT_VERSION", 2)  # qvera before methods were named
    with pytest.raises(ValueError, match=r"format version 3, newer than this qvera reads \(2\); upgrade qvera"):
        read_adapter(dvora_adapter[0])
    assert (dvora_adapter[0] / CONFIG_FILE).is_file()


def test_dvora_adapter_on_a_plain_model_fails_in_one_line(tiny_llama_dir, dvora_adapter):
    model, _ = adapted(tiny_llama_dir)
    with pytest.raises(
        ValueError,
        match=r"is a DVoRA adapter and this model has VeRA attached; attach with "
        r"VeraConfig\(method='dvora'\)",
    ) as err:
        attach_adapter(model, dvora_adapter[0])
    assert "\n" not in str(err.value)


LAYER = "model.layers.0.mlp.up_proj"  # out 160, in 64


def dense_merged_weight(model, vectors):
    """(m / ||W0 + ΔW||) ⊙ (W0 + ΔW) for LAYER, written out plainly in fp32."""
    projections = model.vera_projections
    W0 = vera_layers(model)[LAYER].base_layer.weight.detach().float()
    d, b, m = (vectors[f"{LAYER}.lambda_{which}"] for which in "dbm")
    W = W0 + torch.diag(b) @ projections.B[:160] @ torch.diag(d) @ projections.A[:, :64]
    return (m / W.norm(dim=1))[:, None] * W


def test_merged_weights_give_the_adapted_logits_and_unmerge_restores_w0(tiny_llama_dir, tmp_path):
    model, tokenizer = dvora(tiny_llama_dir)
    ours = logits(model, tokenizer)
    vectors = vector_state(model)
    layer = vera_layers(model)[LAYER]
    original = layer.base_layer.weight.detach().clone()

    expected = dense_merged_weight(model, vectors)
    merged_copy = merged_state_dict(model)[f"{LAYER}.weight"]  # bf16: rounded once
    torch.testing.assert_close(merged_copy.float(), expected, atol=1e-6, rtol=2**-8)

    merge(model)
    torch.testing.assert_close(layer.base_layer.weight, expected, atol=1e-5, rtol=1e-5)
    assert (logits(model, tokenizer) - ours).abs().max() <= 1e-5
    unmerge(model)
    assert (layer.base_layer.weight - original).abs().max() <= 1e-6
    for key, value in vector_state(model).items():
        assert torch.equal(value, vectors[key])
    assert (logits(model, tokenizer) - ours).abs().max() <= 1e-5


def test_peft_export_refuses_a_dvora_adapter(tiny_llama_dir, dvora_adapter, tmp_path):
    message = r"peft has no DVoRA adapter type; export to qvera's format or merge instead"
    with pytest.raises(ValueError, match=message):
        export_peft(read_adapter(dvora_adapter[0]), tmp_path / "peft")
    with pytest.raises(ValueError, match=message):
        export_peft(dvora(tiny_llama_dir)[0], tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.raises(ValueError, match="train.export_peft: " + message):
        recipe_from_dict({"vera": {"method": "dvora"}, "train": {"export_peft": True}})
    with pytest.raises(
        ValueError, match=r"^recipe \[vera\]: magnitude is no longer a VeraConfig key; write `method: dvora`"
    ):
        recipe_from_dict({"vera": {"magnitude": True}})


@pytest.fixture(scope="module")
def small_base():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=300)).float()


def random_vectors(model, seed):
    """Random d and b, and m within ±30% of the initial row norms where the model has m."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in vector_state(model).items():
        noise = torch.randn(value.shape, generator=generator)
        scale = value * 0.3 if key.endswith("lambda_m") else 0.1 if key.endswith("lambda_b") else 1.0
        state[key] = (value if key.endswith("lambda_m") else 0) + scale * noise
    return state


def run_alone(base, state, ids, method):
    model = attach_vera(copy.deepcopy(base), VeraConfig(rank=24, projection_seed=3, method=method))
    load_vector_state(model, state)
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def test_mixed_batch_of_dvora_and_plain_adapters_equals_each_alone(small_base):
    plain_model = attach_vera(copy.deepcopy(small_base), VeraConfig(rank=24, projection_seed=3))
    model = attach_vera(copy.deepcopy(small_base), VeraConfig(rank=24, projection_seed=3, method="dvora"))
    bank = AdapterBank(model)
    states = {"dvora": random_vectors(model, 0), "plain": random_vectors(plain_model, 1)}
    bank.add("dvora", states["dvora"])
    bank.add("plain", states["plain"], "vera")

    rows = ["dvora", "plain", None, "dvora"]
    ids = torch.randint(0, 300, (len(rows), 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), bank.mixed_batch(rows):
        mixed = model(input_ids=ids).logits
    for row, name in enumerate(rows):
        state = {k: torch.zeros_like(v) for k, v in states["plain"].items()} if name is None else states[name]
        expected = run_alone(small_base, state, ids[row : row + 1], "dvora" if name == "dvora" else "vera")
        torch.testing.assert_close(mixed[row], expected, atol=1e-5, rtol=1e-5)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-2  # the adapters differ, so the check has teeth

    for name in ("dvora", None):  # activate: the model alone runs the adapter, or the bare base
        bank.activate(name)
        with torch.no_grad():
            alone = model(input_ids=ids[:1] if name else ids[2:3]).logits[0]
        torch.testing.assert_close(alone, mixed[0 if name else 2], atol=1e-5, rtol=1e-5)
