"""DVoRA's row norms ||W0 + ΔW|| without forming W0 + ΔW (ΔW = Λb B Λd A, see vera.py).

Row i of W0 + ΔW is W0_i + b_i u_i A with u_i = B_i ⊙ d (r values), so

    ||W0_i + ΔW_i||² = ||W0_i||² + 2 b_i u_i · (A W0_iᵀ) + b_i² u_i (A Aᵀ) u_iᵀ

W0 and A are frozen: ||W0_i||² (out values) and P = W0 Aᵀ (out x r) are computed once per base
layer, G = A Aᵀ (r x r) once per input width, and a new (d, b) then costs out x r² multiply-adds
(the product U G) where forming W0 + ΔW costs out x in x r. That pays only while r < in: past it
P is larger than W0 itself and U G costs more than forming ΔW, so the layer forms W0 + ΔW there
(`expansion_pays`).

The memory this costs, and where it lives: each DVoRA layer keeps ||W0||² and P in fp32 on the
weight's device, 4·out·(r + 1) bytes: 2.8 GB over Llama-2-7B's 224 layers at r=512, nearly as
much as their 4-bit weights (3.2 GB), the price of the speed. A layer computes them at its first
unfolded norm in training mode (the first training step below the folding crossover), and again
when the base weight changes (a merge writing it in place, a new state dict, a move to another
device or dtype). A layer in eval mode that holds none forms W0 + ΔW instead: a server or a
merge takes each adapter's norm once, where the products would cost their memory and save
nothing. bf16 would halve them but round P to 8 bits, and the norm would no longer equal the
formed one to fp32 rounding; computing P per layer on the fly costs what forming W0 + ΔW costs,
which is what this removes.
The sum is taken in fp32, as the dense norm is: the two agree to fp32 rounding unless a row of
W0 + ΔW nearly cancels, far from any adapter's operating point.
"""

from __future__ import annotations

import torch


def expansion_pays(rank: int, in_features: int) -> bool:
    """Whether the expanded norm costs less than forming W0 + ΔW: out·r² against out·in·r."""
    return rank < in_features


def base_products(base_weight: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||W0_i||² per row, W0 Aᵀ), fp32: what the expansion needs of the frozen base weight.
    ||W0_i||² is squared from the norm as vera.row_norms takes it, not summed from squares: with
    b = 0 the square root then gives back that norm bit for bit (√(x²) = x in IEEE arithmetic),
    the norm DVoRA's m starts at, so an untrained layer scales its output by exactly 1."""
    weight = base_weight.float()
    return torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square(), weight @ A.float().t()


def gram(A: torch.Tensor) -> torch.Tensor:
    """A Aᵀ (r x r) in fp32."""
    A = A.float()
    return A @ A.t()


def expanded_row_norms(
    base_squared_norms: torch.Tensor,
    base_projected: torch.Tensor,
    projections_gram: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    B: torch.Tensor,
) -> torch.Tensor:
    """||W0 + ΔW|| per row from `base_products`, `gram` and the vectors, in fp32 (no gradient
    needed: DVoRA detaches the norm)."""
    U = B.float() * lambda_d.float()  # row i: u_i = B_i ⊙ d
    cross = (U * base_projected).sum(1)  # u_i · (A W0_iᵀ)
    quadratic = (U @ projections_gram).mul_(U).sum(1)  # u_i G u_iᵀ = ||u_i A||²
    b = lambda_b.float()
    squared = base_squared_norms + b * (2 * cross + b * quadratic)
    return squared.clamp_min_(0).sqrt_()  # rounding could take an all-but-cancelled row below 0
