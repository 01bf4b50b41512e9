"""DVoRA (VeraConfig(magnitude=True)) against a dense fp32 reference written out plainly."""

import pytest
import torch
from conftest import adapted, logits
from torch import nn

from qvera.core.attach import vera_layers
from qvera.core.bnb import dequantized_weight
from qvera.core.vera import SharedProjections, VeraLinear, row_norms

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
    layer = VeraLinear(base, projections, d_initial=0.1, fold=fold, magnitude=True)
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
    model, tokenizer = adapted(tiny_llama_dir, quantization, magnitude=True)
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
    folded, tokenizer = adapted(tiny_llama_dir, "nf4", magnitude=True)
    unfolded, _ = adapted(tiny_llama_dir, "nf4", magnitude=True, fold=False)
    tokens = 64  # past every layer's crossover: the folded model folds each layer
    assert all(layer._should_fold(tokens) for layer in vera_layers(folded).values())
    a, b = vector_grads(folded, tokenizer, tokens), vector_grads(unfolded, tokenizer, tokens)
    for key in a:
        assert torch.isfinite(a[key]).all() and a[key].abs().sum() > 0, key
        # bf16 compute: the two paths round differently, agree to bf16's precision
        assert (a[key] - b[key]).norm() <= 0.05 * b[key].norm(), key
