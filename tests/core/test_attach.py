"""Attaching VeRA to whole models, with upstream peft's VeRA as the oracle."""

import copy
import gc
import weakref

import bitsandbytes as bnb
import pytest
import torch
from conftest import adapted, save_tiny_llama, tiny_llama_config
from peft import VeraConfig as PeftVeraConfig
from peft import get_peft_model
from transformers import LlamaForCausalLM

import qvera
from qvera.core.attach import find_targets, has_vera, vector_state, vera_layers
from qvera.core.vera import VeraLinear


def randomize_vectors(qvera_model, peft_model, seed=1):
    """Give both models the same nonzero vectors (b = 0 at init would hide every error)."""
    generator = torch.Generator().manual_seed(seed)
    for name, layer in vera_layers(qvera_model).items():
        d = torch.randn(layer.lambda_d.shape, generator=generator)
        b = torch.randn(layer.lambda_b.shape, generator=generator) * 0.1
        layer.lambda_d.data, layer.lambda_b.data = d.clone(), b.clone()
        peft_layer = peft_model.base_model.model.get_submodule(name)
        peft_layer.vera_lambda_d["default"].data = d.clone()
        peft_layer.vera_lambda_b["default"].data = b.clone()


def pair(base, rank, seed=3):
    peft_model = get_peft_model(
        copy.deepcopy(base),
        PeftVeraConfig(r=rank, target_modules="all-linear", projection_prng_key=seed, save_projection=False),
    )
    qvera_model = qvera.attach_vera(copy.deepcopy(base), qvera.VeraConfig(rank=rank, projection_seed=seed))
    randomize_vectors(qvera_model, peft_model)
    return qvera_model, peft_model


@pytest.mark.parametrize(
    "rank,overrides",
    [
        (8, {}),
        (128, {}),  # r > hidden size (64)
        (32, dict(hidden_size=96, intermediate_size=200, num_attention_heads=6, num_key_value_heads=1)),
    ],
)
def test_fp32_logits_and_gradients_equal_peft(rank, overrides):
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(vocab_size=300, **overrides)).float()
    qvera_model, peft_model = pair(base, rank)
    ids = torch.randint(0, 300, (2, 24))
    ours, theirs = qvera_model(input_ids=ids).logits, peft_model(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for name, layer in vera_layers(qvera_model).items():
        peft_layer = peft_model.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lambda_d.grad, peft_layer.vera_lambda_d["default"].grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(layer.lambda_b.grad, peft_layer.vera_lambda_b["default"].grad, rtol=1e-4, atol=1e-7)


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("fold", [False, True])
def test_nf4_logits_and_gradients_match_peft_within_bf16(tmp_path, fold):
    folder = save_tiny_llama(tmp_path / "m", vocab_size=300)
    base, _ = qvera.load_base(qvera.ModelConfig(name=folder, quantization="nf4"))
    peft_model = get_peft_model(
        base, PeftVeraConfig(r=96, target_modules="all-linear", projection_prng_key=5, save_projection=False)
    )
    qvera_base, _ = qvera.load_base(qvera.ModelConfig(name=folder, quantization="nf4"))
    qvera_model = qvera.attach_vera(qvera_base, qvera.VeraConfig(rank=96, projection_seed=5, fold=fold))
    assert isinstance(vera_layers(qvera_model)["model.layers.0.mlp.up_proj"].base_layer, bnb.nn.Linear4bit)
    randomize_vectors(qvera_model, peft_model)
    ids = torch.randint(0, 300, (4, 128))  # 512 tokens: enough that the folded path is chosen
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = qvera_model(input_ids=ids).logits, peft_model(input_ids=ids).logits
    assert relative_error(ours, theirs) < 2e-2
    ours.float().square().mean().backward()
    theirs.float().square().mean().backward()
    for name, layer in vera_layers(qvera_model).items():
        peft_layer = peft_model.base_model.model.get_submodule(name)
        assert layer.lambda_d.grad.dtype == torch.float32
        assert relative_error(layer.lambda_d.grad, peft_layer.vera_lambda_d["default"].grad) < 3e-2
        assert relative_error(layer.lambda_b.grad, peft_layer.vera_lambda_b["default"].grad) < 3e-2


def test_all_linear_wraps_every_linear_but_the_head():
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=300, tie_word_embeddings=False))
    assert not has_vera(model)
    qvera.attach_vera(model, qvera.VeraConfig(rank=16))
    assert has_vera(model)
    with pytest.raises(ValueError, match="already has VeRA attached"):
        qvera.attach_vera(model, qvera.VeraConfig(rank=16))
    names = set(vera_layers(model))
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    assert not isinstance(model.lm_head, VeraLinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lambda_{v}" for n in names for v in "db"}
    layer = vera_layers(model)["model.layers.1.self_attn.k_proj"]
    assert layer.lambda_d.dtype == torch.float32 and torch.all(layer.lambda_d == 0.1)
    assert torch.all(layer.lambda_b == 0)
    assert model.vera_projections.A.shape == (16, 160) and model.vera_projections.B.shape == (160, 16)


def test_named_targets_and_bad_targets():
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=300))
    assert set(find_targets(model, ["q_proj", "v_proj"])) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    }
    with pytest.raises(ValueError, match="no linear layer matches target_modules=\\['qkv'\\]"):
        qvera.attach_vera(model, qvera.VeraConfig(rank=8, target_modules=["qkv"]))
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        qvera.attach_vera(model, qvera.VeraConfig(rank=0))
    qvera.attach_vera(model, qvera.VeraConfig(rank=8))
    with pytest.raises(ValueError, match="already has VeRA attached"):
        qvera.attach_vera(model, qvera.VeraConfig(rank=8))


def test_projections_exist_once_in_memory():
    model = qvera.attach_vera(LlamaForCausalLM(tiny_llama_config(vocab_size=300)), qvera.VeraConfig(rank=16))
    storages = {layer.projections[0].A.untyped_storage().data_ptr() for layer in vera_layers(model).values()}
    assert len(storages) == 1
    assert not any("vera_projections" in k for k in model.state_dict())  # regenerated, never saved


def vector_grads(model, ids, autocast=True):
    model.train()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(input_ids=ids).logits.float().square().mean().backward()
    return {n: layer.lambda_d.grad.clone() for n, layer in vera_layers(model).items()}


@pytest.mark.parametrize("intermediate_size", [80, 160])
def test_eval_pass_on_4bit_cpu_base_leaves_training_exact(tmp_path, intermediate_size):
    """bitsandbytes repacks 4-bit weights at the first eval-mode forward on AVX512-BF16 CPUs:
    lossy, gradient-free, and crashing on out_features not divisible by 32 (80 here)."""
    folder = save_tiny_llama(tmp_path / "m", vocab_size=300, intermediate_size=intermediate_size)
    model, _ = qvera.load_base(qvera.ModelConfig(name=folder, quantization="nf4"))
    qvera.attach_vera(model, qvera.VeraConfig(rank=16, target_modules=["q_proj", "gate_proj"]))
    for layer in vera_layers(model).values():
        layer.lambda_b.data.normal_()
    ids = torch.randint(0, 300, (2, 12))
    before = vector_grads(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = vector_grads(model, ids)
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_int8_base_runs_and_trains(tmp_path):
    folder = save_tiny_llama(tmp_path / "m", vocab_size=300)
    model, _ = qvera.load_base(qvera.ModelConfig(name=folder, quantization="int8"))
    qvera.attach_vera(model, qvera.VeraConfig(rank=16))
    layer = vera_layers(model)["model.layers.0.self_attn.q_proj"]
    assert isinstance(layer.base_layer, bnb.nn.Linear8bitLt)
    for vera_layer in vera_layers(model).values():
        vera_layer.lambda_b.data.normal_()  # with b = 0 the gradient of d is exactly zero
    grads = vector_grads(model, torch.randint(0, 300, (2, 8)))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    assert set(vector_state(model)) == {f"{n}.lambda_{v}" for n in vera_layers(model) for v in "db"}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=300)).float()
    qvera.attach_vera(model, qvera.VeraConfig(rank=32))
    for layer in vera_layers(model).values():
        layer.lambda_b.data.normal_()
    ids = torch.randint(0, 300, (2, 300))  # 600 tokens: the folded path runs too
    model.train()
    plain = vector_grads(model, ids, autocast=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()
    checkpointed = vector_grads(model, ids, autocast=False)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name])


@pytest.mark.parametrize("tokens", [16, 512])  # the unfolded and the folded path
@pytest.mark.parametrize("stopped", [False, True])
def test_model_is_freed_after_a_training_step(tiny_llama_dir, tokens, stopped):
    """Deleting a model that trained frees it, also after a step that died in the forward (out of
    GPU memory, say) and never ran backward. The cached `A x` must not keep a graph alive:
    gradient checkpointing's hooks and the folded path's weight tie that graph to the model, in
    a cycle gc cannot see, and the whole model would stay in memory."""
    model, _ = adapted(tiny_llama_dir, quantization="nf4", compute_dtype="float32")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    def out_of_memory(*_):
        raise torch.OutOfMemoryError("simulated")

    ids = torch.randint(0, 1000, (1, tokens))
    if stopped:
        model.model.layers[1].register_forward_hook(out_of_memory)
        with pytest.raises(torch.OutOfMemoryError, match="simulated"):
            model(input_ids=ids, labels=ids)
    else:
        model(input_ids=ids, labels=ids).loss.backward()
    layers = [weakref.ref(layer) for layer in vera_layers(model).values()]
    del model
    gc.collect()
    assert [ref() for ref in layers] == [None] * len(layers)
