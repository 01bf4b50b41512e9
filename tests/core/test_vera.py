"""The VeRA math against references: peft's projection generator and plain autograd."""

import copy

import bitsandbytes as bnb
import pytest
import torch
from peft.tuners.vera.model import _kaiming_init
from torch.utils.checkpoint import checkpoint

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
    got = AddVeraDelta.apply(base, x @ A.t(), d, b, B)
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


# A step as gradient checkpointing runs it (the forward, its replay, the backward) after an
# optimizer update. Unfolded (few tokens), in each forward: cast d and b, `A x` (shared by q/k/v
# in a model), d ⊙ Ax, B(·), the product by b and the sum; backward: g ⊙ b, its product by B,
# two products and two token sums for the vectors' gradients, the product by d, `A x`'s input
# gradient, and the sum of x's two gradients. Folded (many tokens), in each forward: cast d and
# b, scale A's and B's rows, W0 + ΔW in one addmm, `A x`; backward: W0 + ΔW again, M = gᵀ(A x),
# its cast, its product by B, and the two vector products. Both less the base layer's own.
@pytest.mark.parametrize("fold, tokens, budget", [(False, 3, 23), (True, 30, 21)], ids=["unfolded", "folded"])
def test_a_checkpointed_training_step_issues_few_operators_beyond_its_base_layer(fold, tokens, budget):
    """On a GPU a 7B step is bound by the kernels it launches (BENCHMARKS.md): VeRA's count per
    layer is held."""
    torch.manual_seed(4)
    base_layer = torch.nn.Linear(24, 20, bias=False).to(torch.bfloat16).requires_grad_(False)
    layer = VeraLinear(base_layer, SharedProjections(16, 24, 20, seed=0), 0.1, fold=fold)
    x0 = torch.randn(2, tokens, 24, dtype=torch.bfloat16, requires_grad=True)
    assert layer._should_fold(2 * tokens) == fold

    def operators(module):
        checkpoint(module, x0 * 1, use_reentrant=False).sum().backward()  # casts A and B once, for good
        x0.grad = None
        module.zero_grad(set_to_none=True)  # as the trainer leaves them between steps
        with torch.no_grad():
            for vector in (p for p in module.parameters() if p.requires_grad):
                vector.add_(0.01)  # as the optimizer's update: the vectors must be cast again
        x = x0 * 1
        with OperatorCount() as count:
            checkpoint(module, x, use_reentrant=False).sum().backward()
        return sum(count.counts.values())

    assert operators(layer) - operators(base_layer) <= budget


def bf16_layer(seed: int) -> VeraLinear:
    torch.manual_seed(seed)
    base_layer = torch.nn.Linear(24, 20).to(torch.bfloat16).requires_grad_(False)
    layer = VeraLinear(base_layer, SharedProjections(16, 24, 20, seed=0), 0.1, fold=False)
    with torch.no_grad():
        layer.lambda_b.normal_()
    return layer


@pytest.mark.parametrize("update", ["fused AdamW", "bitsandbytes 8-bit AdamW", ".data"])
def test_every_forward_sees_the_vectors_however_they_were_updated(update):
    """Neither fused AdamW, bitsandbytes' optimizers nor a write through `.data` bumps a tensor's
    version, so nothing may cache the vectors' casts by it: each forward, with or without
    gradients, must see the update."""
    layer, x = bf16_layer(5), torch.randn(2, 5, 24, dtype=torch.bfloat16)
    optimizer = {
        "fused AdamW": lambda p: torch.optim.AdamW(p, lr=0.5, fused=True),
        "bitsandbytes 8-bit AdamW": lambda p: bnb.optim.AdamW8bit(p, lr=0.5, min_8bit_size=1),
    }
    for _ in range(2):
        before = layer.lambda_d.detach().clone(), layer.lambda_b.detach().clone()
        layer(x).float().square().sum().backward()
        with torch.no_grad():
            layer(x)
        if update == ".data":
            layer.lambda_d.data.mul_(3.0)
            layer.lambda_b.data.add_(1.0)
        else:
            optimizer[update]([layer.lambda_d, layer.lambda_b]).step()
        assert not torch.equal(before[0], layer.lambda_d) and not torch.equal(before[1], layer.lambda_b)
        fresh = bf16_layer(5)
        with torch.no_grad():
            fresh.lambda_d.copy_(layer.lambda_d)
            fresh.lambda_b.copy_(layer.lambda_b)
            assert torch.equal(layer(x), fresh(x))
        assert torch.equal(layer(x), fresh(x))
        layer.zero_grad(set_to_none=True)


def test_a_layer_copies_after_a_training_forward():
    layer = bf16_layer(7)
    layer(torch.randn(2, 5, 24, dtype=torch.bfloat16))  # with gradients on: nothing kept may be a non-leaf
    torch.testing.assert_close(copy.deepcopy(layer).lambda_b, layer.lambda_b)


def test_checkpointing_a_layer_on_the_blocks_own_input_gives_the_same_gradients():
    """Checkpointing replays a block's forward; a layer reading the block's input gets its `A x`
    from the cache there, which must not change what autograd saved (post-norm models, OPT-350m)."""
    grads = []
    for checkpointed in (False, True):
        layer, x = bf16_layer(6), torch.randn(2, 5, 24, dtype=torch.bfloat16, requires_grad=True)
        out = checkpoint(layer, x * 1, use_reentrant=False) if checkpointed else layer(x * 1)
        out.float().square().sum().backward()
        grads.append((layer.lambda_d.grad, layer.lambda_b.grad, x.grad))
    for plain, replayed in zip(*grads):
        assert torch.equal(plain, replayed)


def test_layers_reading_one_input_in_another_dtype_project_it_once():
    """q/k/v read one x; when x is not in the compute dtype (fp32 hidden states under bf16
    autocast), casting it per layer made three tensors and so three `A x`."""
    torch.manual_seed(8)
    projections = SharedProjections(16, 24, 20, seed=0)
    layers = [
        VeraLinear(torch.nn.Linear(24, 20, bias=False).requires_grad_(False), projections, 0.1, fold=False)
        for _ in range(3)
    ]
    x = torch.randn(2, 5, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), OperatorCount() as count:
        for layer in layers:
            layer(x)
    assert count.counts["mm"] == 3 + 3 + 1  # each base layer, each B(·), one `A x`
