import os
import shutil

import pytest
import torch
from conftest import save_tiny_llama
from peft import LoraConfig, get_peft_model

from qvera import ModelConfig, VeraConfig, attach_vera, load_base
from qvera.adapters import save_adapter
from qvera.adapters.format import Adapter, read_adapter
from qvera.adapters.peft_interop import export_peft
from qvera.serving.store import AdapterNotFound, AdapterStore, AdapterUnservable, AllSlotsHeld


@pytest.fixture
def folder_and_base(tmp_path, tiny_llama_dir):
    """Two adapters of the tiny base, one of rank 8 (unservable beside them), one of another
    base, and the leftovers an interrupted write leaves."""
    folder = tmp_path / "adapters"
    for rank, names in ((16, ["one", "two"]), (8, ["narrow"])):
        model, _ = load_base(ModelConfig(name=tiny_llama_dir, quantization="fp32"))
        attach_vera(model, VeraConfig(rank=rank, projection_seed=3))
        for name in names:
            save_adapter(model, folder / name)
    other, _ = load_base(
        ModelConfig(name=save_tiny_llama(tmp_path / "other", dtype=torch.float32, seed=1), quantization="fp32")
    )
    save_adapter(attach_vera(other, VeraConfig(rank=16, projection_seed=3)), folder / "foreign")
    shutil.copytree(folder / "one", folder / ".one.old-12")
    shutil.copytree(folder / "two", folder / ".two.tmp-34")
    (folder / "notes").mkdir()
    return folder, tiny_llama_dir


def test_store_lists_servable_adapters_and_warns_once_about_the_rest(folder_and_base):
    folder, base = folder_and_base
    model, _ = load_base(ModelConfig(name=base, quantization="fp32"))
    lines = []
    store = AdapterStore(model, folder, max_resident=1, log=lines.append)
    assert store.servable() == ["one", "two"]
    assert len(lines) == 1 and lines[0].startswith("warning: skipped 5 adapter folder(s)")
    for name in [".one.old-12", ".two.tmp-34", "notes", "foreign", "narrow"]:
        assert name in lines[0]
    assert str(folder.parent) not in lines[0].replace(str(folder), "")  # messages name adapters, not server paths
    with pytest.raises(AdapterUnservable, match="rank 8") as caught:
        store.check("narrow")
    assert str(folder) not in str(caught.value)
    with pytest.raises(AdapterNotFound):
        store.check(".one.old-12")


def test_held_adapters_are_never_evicted(folder_and_base):
    folder, base = folder_and_base
    model, _ = load_base(ModelConfig(name=base, quantization="fp32"))
    store = AdapterStore(model, folder, max_resident=1, log=lambda line: None)
    one = store.acquire("one")
    with pytest.raises(AllSlotsHeld):  # the one slot is held
        store.acquire("two")
    store.release(one)
    store.acquire("two")
    assert store.resident() == ["two"] and len(store.bank.names()) == 1


def test_store_needs_a_folder_with_an_adapter(tmp_path, tiny_llama_dir):
    model, _ = load_base(ModelConfig(name=tiny_llama_dir, quantization="fp32"))
    with pytest.raises(FileNotFoundError, match="adapters folder .*missing does not exist"):
        AdapterStore(model, tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no adapter; save one there"):
        AdapterStore(model, tmp_path)


def test_store_serves_a_peft_vera_folder_and_names_why_it_skips_a_lora_one(folder_and_base):
    folder, base = folder_and_base
    export_peft(read_adapter(folder / "one"), folder / "one-peft")  # "one" as peft saves it
    lora_base, _ = load_base(ModelConfig(name=base, quantization="fp32"))
    get_peft_model(lora_base, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(folder / "lora"))
    model, _ = load_base(ModelConfig(name=base, quantization="fp32"))
    lines = []
    store = AdapterStore(model, folder, max_resident=4, log=lines.append)
    assert store.servable() == ["one", "one-peft", "two"]
    assert "lora (lora is a LORA adapter, not VeRA; qvera reads VeRA adapters only)" in lines[0]
    one, one_peft = store.bank.adapters[store.acquire("one")], store.bank.adapters[store.acquire("one-peft")]
    assert one.keys() == one_peft.keys() and all(torch.equal(one[k], one_peft[k]) for k in one)


def test_a_peft_folder_rewritten_in_place_is_read_again(folder_and_base, tmp_path):
    folder, base = folder_and_base
    one = read_adapter(folder / "one")
    export_peft(one, folder / "mine")
    model, _ = load_base(ModelConfig(name=base, quantization="fp32"))
    store = AdapterStore(model, folder, max_resident=4, log=lambda line: None)
    store.release(store.acquire("mine"))
    retrained = Adapter(one.config, {name: value + 1 for name, value in one.vectors.items()})
    export_peft(retrained, tmp_path / "retrained")
    vectors = folder / "mine" / "adapter_model.safetensors"
    shutil.copyfile(tmp_path / "retrained" / "adapter_model.safetensors", vectors)  # its config is untouched
    os.utime(vectors, ns=(vectors.stat().st_atime_ns, vectors.stat().st_mtime_ns + 10**9))
    served = store.bank.adapters[store.acquire("mine")]
    assert all(torch.allclose(served[k], retrained.vectors[k].to(served[k].dtype)) for k in retrained.vectors)
