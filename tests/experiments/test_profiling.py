"""The step measurements, and the memory claim they support: qvera saves less than peft."""

import copy

import torch
from conftest import tiny_llama_config
from peft import VeraConfig as PeftVeraConfig
from peft import get_peft_model
from transformers import LlamaForCausalLM

import qvera
from experiments.profiling import count_flops, count_saved_tensors


def test_flops_of_a_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_saved_bytes_count_storages_once():
    x = torch.randn(100, requires_grad=True)
    with count_saved_tensors() as saved:
        y = x * x  # saves x twice (as self and as other)
    assert saved.total == 2 * 400 and saved.unique == 400
    y.sum().backward()


def saved_excess(model, ids, floor):
    with count_saved_tensors() as saved, torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids).logits.float().sum()
    return saved.unique - floor


def test_qvera_saves_a_fraction_of_what_peft_vera_saves():
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(vocab_size=300))
    ids = torch.randint(0, 300, (4, 128))
    floor_model = copy.deepcopy(base)
    floor_model.requires_grad_(False)
    floor_model.enable_input_require_grads()  # the frozen base still back-propagates to its inputs
    floor = saved_excess(floor_model, ids, 0)
    peft_model = get_peft_model(
        copy.deepcopy(base), PeftVeraConfig(r=64, target_modules="all-linear", save_projection=False)
    )
    ours = qvera.attach_vera(copy.deepcopy(base), qvera.VeraConfig(rank=64))
    peft_excess, qvera_excess = saved_excess(peft_model, ids, floor), saved_excess(ours, ids, floor)
    assert 0 < qvera_excess < peft_excess / 4, (qvera_excess, peft_excess)
