"""DVoRA (VeraConfig(method="dvora")) against a dense fp32 reference written out plainly."""

import json

import pytest
import torch
from conftest import adapted, logits, randomize_vectors
from torch import nn

from experiments.dvora_norm import VARIANTS, formed_norms, norm_flops
from experiments.dvora_norm import main as dvora_norm_main
from experiments.profiling import count_flops
from qvera.core.adapted_norm import base_products, expanded_row_norms, gram
from qvera.core.attach import attach_vera, vera_layers
from qvera.core.base import load_base
from qvera.core.bnb import dequantized_weight
from qvera.core.config import ModelConfig, VeraConfig
from qvera.core.methods import METHODS
from qvera.core.vera import SharedProjections, VeraLinear, folded_weight, generate_projections, row_norms

TOL = dict(atol=1e-5, rtol=1e-5)


def reference(x, W0, bias, A, B, d, b, m):
    """DoRA eq. 5 with VeRA's ΔW: m ⊙ (W0 + ΔW) x / ||W0 + ΔW|| (norm detached) + bias."""
    W = W0 + torch.diag(b) @ B @ torch.diag(d) @ A
    norm = W.norm(dim=1).detach()
    return (m / norm) * (x @ W.t()) + bias


def magnitude_layer(fold, seed=0, in_features=12, out_features=10, rank=6):
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features)
    projections = SharedProjections(rank, in_features, out_features, seed)
    layer = VeraLinear(base, projections, d_initial=0.1, fold=fold, method=METHODS["dvora"])
    with torch.no_grad():
        layer.lambda_d.copy_(torch.randn(rank))
        layer.lambda_b.copy_(torch.randn(out_features) * 0.5)
        layer.lambda_m.mul_(1 + 0.3 * torch.randn(out_features))
    return layer


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_forward_and_gradients_equal_the_dense_reference(fold):
    layer = magnitude_layer(fold)
    x = torch.randn(2, 7, 12, requires_grad=True)
    assert layer._should_fold(14) == fold  # each path is the one under test
    grad_out = torch.randn(2, 7, 10)
    params = (x, layer.lambda_d, layer.lambda_b, layer.lambda_m)

    W0, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    A, B = layer.projections[0].A, layer.projections[0].B
    expected = reference(x, W0, bias, A, B, *params[1:])
    expected_grads = torch.autograd.grad(expected, params, grad_out)
    for _ in range(2):  # the second pass reads the unfolded path's cached norm
        got = layer(x)
        got_grads = torch.autograd.grad(got, params, grad_out)
        torch.testing.assert_close(got, expected, **TOL)
        for g, e in zip(got_grads, expected_grads):
            torch.testing.assert_close(g, e, **TOL)


def test_unfolded_norm_follows_changed_vectors():
    layer = magnitude_layer(fold=False)
    x = torch.randn(3, 12)
    layer(x)
    with torch.no_grad():
        layer.lambda_b.mul_(2)
    W0, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    A, B = layer.projections[0].A, layer.projections[0].B
    expected = reference(x, W0, bias, A, B, layer.lambda_d, layer.lambda_b, layer.lambda_m)
    torch.testing.assert_close(layer(x), expected, **TOL)


@pytest.mark.parametrize("quantization", ["fp32", "nf4"])
def test_magnitude_starts_at_the_base_row_norms_and_the_model_at_the_base(tiny_llama_dir, quantization):
    model, tokenizer = adapted(tiny_llama_dir, quantization, method="dvora")
    before = logits(model, tokenizer)
    with torch.no_grad():
        for layer in vera_layers(model).values():
            layer.lambda_b.zero_()
            torch.testing.assert_close(
                layer.lambda_m, row_norms(dequantized_weight(layer.base_layer, torch.float32)), rtol=0, atol=0
            )
    base = logits(model, tokenizer)  # b = 0: the scale m / ||W0|| is exactly 1
    bare, _ = adapted(tiny_llama_dir, quantization)
    for layer in vera_layers(bare).values():
        with torch.no_grad():
            layer.lambda_b.zero_()
    torch.testing.assert_close(base, logits(bare, tokenizer), rtol=0, atol=0)
    assert not torch.allclose(before, base)


def vector_grads(model, tokenizer, tokens):
    ids = tokenizer(["VeRA with a magnitude " * tokens], return_tensors="pt").input_ids[:, :tokens]
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {
        f"{name}.{which}": getattr(layer, which).grad.clone()
        for name, layer in vera_layers(model).items()
        for which in ("lambda_d", "lambda_b", "lambda_m")
    }


def test_nf4_base_trains_on_both_paths(tiny_llama_dir):
    folded, tokenizer = adapted(tiny_llama_dir, "nf4", method="dvora")
    unfolded, _ = adapted(tiny_llama_dir, "nf4", method="dvora", fold=False)
    tokens = 96  # past every layer's crossover: the folded model folds each layer
    assert all(layer._should_fold(tokens) for layer in vera_layers(folded).values())
    a, b = vector_grads(folded, tokenizer, tokens), vector_grads(unfolded, tokenizer, tokens)
    for key in a:
        assert torch.isfinite(a[key]).all() and a[key].abs().sum() > 0, key
        # bf16 compute: the two paths round differently, agree to bf16's precision
        assert (a[key] - b[key]).norm() <= 0.05 * b[key].norm(), key


FP32_ROUNDING = dict(rtol=2**-20, atol=0)  # a few units in the last place of fp32


def formed_norms_fp64(W0, A, B, d, b):
    """||W0 + ΔW|| per row with W0 + ΔW written out plainly, in fp64."""
    W = W0.double() + torch.diag(b.double()) @ B.double() @ torch.diag(d.double()) @ A.double()
    return W.norm(dim=1)


@pytest.mark.parametrize(
    "in_features, out_features, rank",
    [(24, 20, 6), (8, 20, 12), (24, 4, 16), (12, 12, 12)],
    ids=["r<in", "r>in", "r>out", "r=in=out"],
)
def test_expanded_norms_equal_the_formed_norms_to_fp32_rounding(in_features, out_features, rank):
    generator = torch.Generator().manual_seed(rank)
    W0 = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    A, B = generate_projections(rank, in_features, out_features, seed=rank)
    d, b = torch.randn(rank, generator=generator), torch.randn(out_features, generator=generator) * 0.5
    expected = formed_norms_fp64(W0, A, B, d, b)
    assert (expected / W0.norm(dim=1)).max() > 1.5  # ΔW is not small beside W0: every term counts
    expanded = expanded_row_norms(*base_products(W0, A), gram(A), d, b, B)
    torch.testing.assert_close(expanded.double(), expected, **FP32_ROUNDING)
    torch.testing.assert_close(row_norms(folded_weight(W0, d, b, A, B)).double(), expected, **FP32_ROUNDING)


@pytest.mark.parametrize("rank", [8, 96])
def test_nf4_layers_expand_their_norm_where_it_costs_less_and_match_the_dense_norm(tiny_llama_dir, rank, monkeypatch):
    """Rank 8 is below every layer's input width; 96 is above all but down_proj's (160), and
    above k/v's output width (32, grouped-query attention). W0 is the dequantized NF4 weight.
    In eval mode (as loaded, as a server holds it) every layer forms W0 + ΔW and keeps nothing;
    once it has trained it holds the products, and evaluating uses them too."""
    model, _ = load_base(ModelConfig(name=str(tiny_llama_dir), quantization="nf4", compute_dtype="bfloat16"))
    attach_vera(model, VeraConfig(rank=rank, method="dvora"))
    randomize_vectors(model, seed=rank)
    formed = []
    monkeypatch.setattr("qvera.core.vera.folded_weight", lambda *args: formed.append(1) or folded_weight(*args))
    projections = model.vera_projections
    for step, training in enumerate((False, True, False)):
        model.train(training)
        for name, layer in vera_layers(model).items():
            d, b = layer.lambda_d.detach(), layer.lambda_b.detach() * (1 + step)  # a new b: no cached norm
            W0 = dequantized_weight(layer.base_layer, torch.float32)
            A, B = projections.A[:, : layer.in_features], projections.B[: layer.out_features]
            formed.clear()
            expected = formed_norms_fp64(W0, A, B, d, b)
            torch.testing.assert_close(layer.adapted_norms(d, b).double(), expected, **FP32_ROUNDING)
            expanded = step > 0 and rank < layer.in_features  # only where r < in, once it has trained
            assert bool(formed) != expanded, name


def test_the_expanded_norm_follows_a_changed_base_weight():
    layer = magnitude_layer(fold=False)  # rank 6 < in 12: expanded
    d, b = layer.lambda_d.detach(), layer.lambda_b.detach()
    A, B = layer.projections[0].A, layer.projections[0].B
    layer.adapted_norms(d, b)  # keeps ||W0||² and W0 Aᵀ
    weight = layer.base_layer.weight
    with torch.no_grad():
        weight.mul_(2).add_(0.1)  # in place, as merge writes it
    torch.testing.assert_close(
        layer.adapted_norms(d, b).double(), formed_norms_fp64(weight.detach(), A, B, d, b), **FP32_ROUNDING
    )
    weight.data = torch.randn_like(weight)  # a new tensor, as loading a state dict by assignment gives
    torch.testing.assert_close(
        layer.adapted_norms(d, b).double(), formed_norms_fp64(weight.detach(), A, B, d, b), **FP32_ROUNDING
    )


def test_a_new_vector_costs_the_counted_out_by_r_squared_work():
    in_features, out_features, rank = 48, 20, 16
    layer = magnitude_layer(fold=False, in_features=in_features, out_features=out_features, rank=rank)
    d, b = layer.lambda_d.detach(), layer.lambda_b.detach()
    flops = norm_flops(out_features, in_features, rank)
    gram_flops = 2 * rank * rank * in_features  # A Aᵀ, once per input width for the model
    assert count_flops(lambda: layer.adapted_norms(d, b)) == flops["once"] + gram_flops + flops["expanded"]
    assert count_flops(lambda: layer.adapted_norms(d, b * 2)) == flops["expanded"]  # each new (d, b)
    with formed_norms():  # the norm as it was: W0 + ΔW formed for each new (d, b)
        assert count_flops(lambda: layer.adapted_norms(d * 2, b)) == flops["formed"]
    assert flops["expanded"] * in_features == flops["formed"] * rank


def test_the_step_comparison_runs_and_keeps_its_report(tmp_path):
    """experiments/dvora_norm.py as the GPU check runs it, at a tiny shape and a few tokens."""
    report_path = tmp_path / "dvora_norm.json"
    dvora_norm_main(["--shape", "tiny", "--seq", "16", "--runs", "2", "--rounds", "1", "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    assert [sorted(run) for run in report["runs"]] == [sorted([*VARIANTS, "dvora_over_vera", "formed_over_vera"])] * 2
    assert 0 < report["norm_max_relative_difference"] < 2**-20
    assert report["count_llama2-7b"]["cache_gb"] == 2.79  # 4 bytes x (r + 1) per output row of its 224 layers
    # r = 512 is below only down_proj's input width (688) in the tiny shape: its 4 layers keep (r + 1) x 256 each
    assert report["cache_gb"] == round(4 * 4 * 256 * 513 / 1e9, 4)
