"""The CUDA path, on one GPU: exactness against peft, folded == unfolded, gradients through 4-bit
layers, bf16 and fp16 training whose loss falls, mixed batches. Run by scripts/gpu_check.sh
(`pytest -m cuda`); skipped, with the reason shown, where PyTorch sees no CUDA GPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import RANK, logits, randomize_vectors, tiny_llama_config
from peft import PeftModel, get_peft_model
from peft import VeraConfig as PeftVeraConfig
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from qvera import ModelConfig, VeraConfig, attach_vera, load_base
from qvera.adapters.format import read_adapter
from qvera.adapters.merge import merge_to_folder
from qvera.adapters.peft_interop import export_peft
from qvera.core.attach import vector_state, vera_layers
from qvera.core.base import FALLBACK_CHAT_TEMPLATE
from qvera.core.bnb import is_4bit
from qvera.core.hardware import detect
from qvera.core.random_base import byte_tokenizer
from qvera.generation.decode import Sampling, generate
from qvera.training.run import train
from tests.generation.test_generation import ROW_ADAPTERS, assert_rows_match_alone, model_with_bank
from tests.serving.test_scheduler import assert_batch_invariant_replies, two_adapter_store
from tests.training.test_run import tiny_recipe

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: PyTorch sees none (run gpu_check.sh)"),
]


VOCAB = 320  # the byte tokenizer's 259 tokens, rounded up


def save_tiny(folder, dtype) -> str:
    """A tiny random Llama with the byte tokenizer: needs no wheel beyond the pinned packages."""
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, tie_word_embeddings=False)).to(dtype).save_pretrained(folder)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def true_fp32():
    """Exactness is checked in true fp32: TF32 matmuls would round to 10 bits."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def cuda_base(folder, quantization="nf4", compute_dtype="bfloat16"):
    model, tokenizer = load_base(ModelConfig(name=str(folder), quantization=quantization, compute_dtype=compute_dtype))
    assert next(model.parameters()).device.type == "cuda"
    return model, tokenizer


def on_cuda(batch):
    return {k: v.cuda() for k, v in batch.items()}


def tiny_logits(model, tokenizer):
    batch = tokenizer(["The quick brown fox", "VeRA adapters are"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**on_cuda(batch)).logits.float()


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("cuda-fp32"), torch.float32)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("cuda-bf16"), torch.bfloat16)


def test_fp32_logits_equal_peft_on_cuda(fp32_dir, tmp_path):
    model, tokenizer = cuda_base(fp32_dir, "fp32", "float32")
    attach_vera(model, VeraConfig(rank=RANK))
    randomize_vectors(model, 1)
    folder = export_peft(model, tmp_path / "peft")
    peft_base, _ = cuda_base(fp32_dir, "fp32", "float32")
    theirs = PeftModel.from_pretrained(peft_base, str(folder))
    assert (tiny_logits(model, tokenizer) - tiny_logits(theirs, tokenizer)).abs().max().item() <= 1e-5


def nf4_errors(folder, fold: bool, device: str = "cuda") -> dict:
    """Relative errors of qvera's and peft's bf16 logits and vector gradients on one NF4 model,
    each against the same model computed in fp32: bf16 rounding is the yardstick."""
    generator = torch.Generator().manual_seed(0)
    vectors, results = {}, {}
    ids = torch.randint(0, VOCAB, (4, 128), generator=generator).to(device)  # 512 tokens: folding chosen
    for name, compute_dtype, fold_here in (
        ("ref", "float32", False),
        ("qvera", "bfloat16", fold),
        ("peft", "bfloat16", None),
    ):
        model, _ = load_base(
            ModelConfig(name=str(folder), quantization="nf4", compute_dtype=compute_dtype), device_map={"": device}
        )
        if fold_here is None:
            config = PeftVeraConfig(r=96, target_modules="all-linear", projection_prng_key=5, save_projection=False)
            model = get_peft_model(model, config)
            params = {n: (m.vera_lambda_d["default"], m.vera_lambda_b["default"]) for n, m in vera_modules(model)}
        else:
            attach_vera(model, VeraConfig(rank=96, projection_seed=5, fold=fold_here))
            assert is_4bit(vera_layers(model)["model.layers.0.mlp.up_proj"].base_layer)
            params = {n: (layer.lambda_d, layer.lambda_b) for n, layer in vera_layers(model).items()}
        with torch.no_grad():
            for layer_name, (d, b) in params.items():
                if layer_name not in vectors:
                    vectors[layer_name] = (
                        torch.randn(d.shape, generator=generator),
                        torch.randn(b.shape, generator=generator) * 0.5,
                    )
                d.copy_(vectors[layer_name][0])
                b.copy_(vectors[layer_name][1])
        model.train()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=compute_dtype == "bfloat16"):
            out = model(input_ids=ids).logits.float()
        out.square().mean().backward()
        grads = torch.cat([torch.cat([d.grad.flatten(), b.grad.flatten()]) for d, b in params.values()])
        results[name] = out.detach(), grads
        del model
    errors = {}
    for name in ("qvera", "peft"):
        errors[name] = {
            part: relative_error(results[name][i], results["ref"][i]) for i, part in enumerate(("logits", "grads"))
        }
    errors["qvera_vs_peft_logits"] = relative_error(results["qvera"][0], results["peft"][0])
    return errors


def vera_modules(peft_model):
    prefix = "base_model.model."
    return [(n.removeprefix(prefix), m) for n, m in peft_model.named_modules() if hasattr(m, "vera_lambda_d")]


@pytest.mark.parametrize("fold", [False, True])
def test_nf4_logits_and_gradients_match_peft_within_bf16(bf16_dir, fold):
    errors = nf4_errors(bf16_dir, fold)
    assert errors["qvera_vs_peft_logits"] < 2e-2
    for part in ("logits", "grads"):
        # Folding adds ΔW to W0 before bf16 rounds the sum: about 1.4x peft's error on a CPU.
        assert errors["qvera"][part] <= 2 * errors["peft"][part], (part, errors)


def test_folded_equals_unfolded_on_cuda(fp32_dir):
    model, _ = cuda_base(fp32_dir, "nf4", "float32")
    attach_vera(model, VeraConfig(rank=64))
    randomize_vectors(model, 2)
    ids = torch.randint(0, VOCAB, (4, 128), device="cuda")
    results = {}
    for fold in (False, True):
        for layer in vera_layers(model).values():
            layer.fold = fold
            layer.lambda_d.grad = layer.lambda_b.grad = None
        out = model(input_ids=ids).logits
        out.square().mean().backward()
        grads = [layer.lambda_d.grad.clone() for layer in vera_layers(model).values()]
        results[fold] = out.detach(), grads
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-3, atol=1e-4)
    for folded, unfolded in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(folded, unfolded, rtol=1e-3, atol=1e-6)


def test_gradients_flow_through_4bit_layers_with_checkpointing(bf16_dir):
    model, _ = cuda_base(bf16_dir)
    attach_vera(model, VeraConfig(rank=32))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, VOCAB, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    layers = vera_layers(model)
    assert len(layers) == 14 and all(is_4bit(layer.base_layer) for layer in layers.values())
    # b starts at 0, so d's first gradient is 0 everywhere; b's must not be.
    assert all(layer.lambda_b.grad is not None and layer.lambda_b.grad.abs().sum() > 0 for layer in layers.values())


@pytest.mark.parametrize("optimizer", ["auto", "paged_adamw_8bit"])
@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float16"])
def test_training_loss_falls_on_cuda(bf16_dir, tmp_path, compute_dtype, optimizer):
    """sft's path on the GPU: its default fused AdamW and paged 8-bit AdamW, gradient
    checkpointing, checkpoint and resume; fp16 runs with loss scaling and fp32 vectors."""
    if compute_dtype == "bfloat16" and not detect("cuda").cuda_bf16:
        pytest.skip("this GPU has no bf16")
    recipe = tiny_recipe(bf16_dir, tmp_path, max_steps=12, save_steps=6, eval_steps=0, gradient_checkpointing=True)
    recipe.model.compute_dtype, recipe.train.optimizer = compute_dtype, optimizer
    result, trainer = train(recipe, log=lambda *a: None)
    args = trainer.args
    assert args.optim == {"auto": "adamw_torch_fused"}.get(optimizer, optimizer) and (args.fp16, args.bf16) == (
        compute_dtype == "float16",
        compute_dtype == "bfloat16",
    )
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 12 and all(map(math.isfinite, losses))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)
    saved, trained = read_adapter(result.adapter_dir), vector_state(trainer.accelerator.unwrap_model(trainer.model))
    assert saved.config.rank == recipe.vera.rank and saved.vectors.keys() == trained.keys()
    assert all(torch.equal(saved.vectors[k], trained[k]) for k in trained)
    recipe.train.max_steps, recipe.train.resume = 14, True
    resumed, _ = train(recipe, log=lambda *a: None)
    assert resumed.steps == 14


def test_mixed_batch_rows_equal_single_runs_on_cuda(bf16_dir):
    model, tokenizer, bank = model_with_bank(bf16_dir, "nf4")
    assert next(model.parameters()).device.type == "cuda" and len(ROW_ADAPTERS) == 4
    assert_rows_match_alone(model, tokenizer, bank, atol=2e-2, rtol=1e-2, steps=2)


def test_chat_logits_on_cuda_match_cpu(fp32_dir):
    """The same base and adapter give the same logits on the GPU as on the CPU (fp32)."""
    cpu_model, tokenizer = load_base(ModelConfig(name=fp32_dir, quantization="fp32"), device_map="cpu")
    attach_vera(cpu_model, VeraConfig(rank=RANK))
    randomize_vectors(cpu_model, 3)
    gpu_model, _ = cuda_base(fp32_dir, "fp32", "float32")
    attach_vera(gpu_model, VeraConfig(rank=RANK))
    randomize_vectors(gpu_model, 3)
    assert (tiny_logits(gpu_model, tokenizer).cpu() - logits(cpu_model, tokenizer)).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def cuda_store(bf16_dir, tmp_path_factory):
    """The tiny base in NF4 with bf16 compute on the GPU, and a store of two small random adapters."""
    model, tokenizer = cuda_base(bf16_dir)
    return model, tokenizer, two_adapter_store(model, tmp_path_factory.mktemp("cuda-adapters"))


def test_batch_invariant_server_replies_as_each_request_alone_on_cuda(cuda_store):
    """The server's batcher on the GPU, bf16, rows joining and leaving: each reply's tokens and
    logits are bit for bit those of the request served alone."""
    assert_batch_invariant_replies(*cuda_store)


def test_merged_folder_matches_the_adapted_model_on_cuda(bf16_dir, tmp_path):
    """A merge on the GPU gives a plain bf16 folder whose logits are the adapted NF4 model's up to
    bf16 rounding (measured as the adapted model's own distance from fp32 compute)."""
    models = {}
    for compute_dtype in ("float32", "bfloat16"):
        model, tokenizer = cuda_base(bf16_dir, "nf4", compute_dtype)
        attach_vera(model, VeraConfig(rank=RANK))
        randomize_vectors(model, 4)
        models[compute_dtype] = model
    exact, ours = (tiny_logits(models[d], tokenizer) for d in ("float32", "bfloat16"))
    folder = merge_to_folder(models["bfloat16"], tokenizer, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda()
    rounding = (ours - exact).abs().max()
    assert (tiny_logits(merged, tokenizer) - ours).abs().max() <= 3 * rounding


def cuda_kernel_names(run) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        run()
        torch.cuda.synchronize()
    return [event.name for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]


def test_generation_runs_no_cudnn_attention_kernel(bf16_dir, record_property):
    """Torch prefers cuDNN's attention on Hopper and Blackwell, which builds a plan for every new
    key length; decoding must not reach it (qvera.core.attention_kernels)."""
    model, tokenizer = cuda_base(bf16_dir)
    query = torch.randn(1, 4, 7, 16, device="cuda", dtype=torch.bfloat16)
    plain = cuda_kernel_names(lambda: F.scaled_dot_product_attention(query, query, query, is_causal=True))
    record_property("torch_picks_cudnn_attention_here", any("cudnn" in name.lower() for name in plain))
    conversations = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Name three rivers."}]]
    kernels = cuda_kernel_names(lambda: generate(model, tokenizer, conversations, sampling=Sampling(0.0, 1.0, 4)))
    assert kernels and not [name for name in kernels if "cudnn" in name.lower()]
    assert torch.backends.cuda.cudnn_sdp_enabled()  # torch's own choice again afterwards
