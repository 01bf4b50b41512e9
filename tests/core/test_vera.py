"""The VeRA math against references: peft's projection generator and plain autograd."""

import pytest
import torch
from peft.tuners.vera.model import _kaiming_init

from experiments.profiling import OperatorCount
from qvera.core.vera import (
    AddVeraDelta,
    FoldedVeraLinear,
    SharedProjections,
    VeraLinear,
    delta_weight,
    generate_projections,
)


@pytest.mark.parametrize("rank,in_features,out_features,seed", [(4, 16, 8, 0), (512, 576, 1536, 7), (96, 64, 160, 3)])
def test_projections_equal_peft_draw_for_draw(rank, in_features, out_features, seed):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    peft_A = _kaiming_init((rank, in_features), generator=generator)
    peft_B = _kaiming_init((out_features, rank), generator=generator)
    A, B = generate_projections(rank, in_features, out_features, seed)
    assert torch.equal(A, peft_A) and torch.equal(B, peft_B)


def reference_delta(x, A, B, d, b):
    """The paper's equation with plain autograd."""
    return b * ((d * (x @ A.t())) @ B.t())


def test_vera_delta_matches_autograd_reference():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    base = torch.randn(3, 5, 10, dtype=torch.float64, requires_grad=True)
    A, B = torch.randn(8, 12, dtype=torch.float64), torch.randn(10, 8, dtype=torch.float64)
    d = torch.randn(8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 5, 10, dtype=torch.float64)

    expected = base + reference_delta(x, A, B, d, b)
    expected_grads = torch.autograd.grad(expected, (base, x, d, b), grad_out)
    ax = x @ A.t()
    got = AddVeraDelta.apply(base, ax, d, b, B)
    got_grads = torch.autograd.grad(got, (base, x, d, b), grad_out)
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_folded_layer_matches_autograd_reference():
    torch.manual_seed(1)
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    W0, bias = torch.randn(10, 12, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    A, B = torch.randn(8, 12, dtype=torch.float64), torch.randn(10, 8, dtype=torch.float64)
    d = torch.randn(8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 7, 10, dtype=torch.float64)

    expected = x @ W0.t() + bias + reference_delta(x, A, B, d, b)
    expected_grads = torch.autograd.grad(expected, (x, d, b), grad_out)
    got = FoldedVeraLinear.apply(x, (x @ A.t()).detach(), d, b, lambda: W0, bias, A, B)
    got_grads = torch.autograd.grad(got, (x, d, b), grad_out)
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_delta_weight_is_the_paper_product():
    A, B = torch.randn(4, 6), torch.randn(5, 4)
    d, b = torch.randn(4), torch.randn(5)
    torch.testing.assert_close(delta_weight(d, b, A, B), torch.diag(b) @ B @ torch.diag(d) @ A)


def test_shared_projection_is_computed_once_per_input():
    projections = SharedProjections(rank=8, in_features=12, out_features=10, seed=0)
    A, _ = projections.sliced(12, 10, torch.float32)
    x = torch.randn(2, 12)
    first = projections.project(x, A)
    assert projections.project(x, A) is first  # q/k/v reading one input share `A x`
    assert projections.project(x.clone(), A) is not first
    x.add_(1.0)  # an in-place change must not reuse the stale product
    torch.testing.assert_close(projections.project(x, A), x @ A.t())


@pytest.mark.parametrize("autocast", [False, True])
def test_a_layer_without_gradients_gives_the_same_numbers(autocast):
    """Decoding skips autograd's nodes and the autocast switch; the output must not move a bit."""
    torch.manual_seed(2)
    layer = VeraLinear(
        torch.nn.Linear(24, 20).to(torch.bfloat16), SharedProjections(16, 24, 20, seed=0), 0.1, fold=False
    )
    with torch.no_grad():
        layer.lambda_d.normal_()
        layer.lambda_b.normal_()
    x = torch.randn(3, 5, 24, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with_grad = layer(x)
        with torch.no_grad():
            without = layer(x)
    assert with_grad.grad_fn is not None and without.grad_fn is None
    assert torch.equal(with_grad, without)


# Unfolded (few tokens): forward, cast d and b, d ⊙ Ax, B(·), the product by b and the sum, and
# `A x` itself (shared by q/k/v in a model); backward, g ⊙ b, its product by B, two products and
# two token sums for the vectors' gradients, the product by d, `A x`'s input gradient, and the
# sum of x's two gradients. Folded (many tokens): cast d and b, scale A's and B's rows, W0 + ΔW
# in one addmm, `A x`; backward, W0 + ΔW again (two scalings, an addmm), M = gᵀ(A x), its cast,
# its product by B, and the two vector products. The casts are made once, in the forward.
@pytest.mark.parametrize("fold, tokens, budget", [(False, 3, 16), (True, 30, 14)], ids=["unfolded", "folded"])
def test_a_training_call_issues_few_operators_beyond_its_base_layer(fold, tokens, budget):
    """On a GPU a 7B step is bound by the kernels it launches (BENCHMARKS.md): VeRA's count per
    layer is held."""
    torch.manual_seed(4)
    base_layer = torch.nn.Linear(24, 20, bias=False).to(torch.bfloat16).requires_grad_(False)
    layer = VeraLinear(base_layer, SharedProjections(16, 24, 20, seed=0), 0.1, fold=fold)
    x = torch.randn(2, tokens, 24, dtype=torch.bfloat16, requires_grad=True)
    assert layer._should_fold(2 * tokens) == fold

    def operators(module):
        module(x).sum().backward()  # the first call casts A and B once, for good
        x.grad = None
        module.zero_grad(set_to_none=True)  # as the trainer leaves them between steps
        with OperatorCount() as count:
            module(x).sum().backward()
        return sum(count.counts.values())

    assert operators(layer) - operators(base_layer) <= budget
