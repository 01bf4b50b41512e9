"""The VeRA math (Kopiczko et al., 2024, "VeRA: Vector-based Random Matrix Adaptation").

    h = W0 x + Λb B Λd A x

A (r x in) and B (out x r) are frozen, random and shared by every adapted layer; only the
vectors d (r, the diagonal of Λd) and b (out, the diagonal of Λb) train. A layer whose
in/out is smaller than the shared maximum uses the leading slice, as upstream peft does.

Everything else in qvera calls this module. Three choices keep high rank cheap:
- `A x` is computed once per input tensor and shared by the layers that read it (q/k/v,
  gate/up), in the forward and, through autograd's accumulation, in the backward;
- past 2·in·out/(in+out) tokens a call, ΔW = Λb B Λd A is folded into the (dequantized)
  weight, so the layer is one matmul whose cost no longer grows with r·tokens, and only
  `A x` (r values a token) is saved: the gradients of d and b both follow from M = gᵀ(A x);
- below that, the unfolded path saves `A x` and B(d·A x) and needs one matmul in the backward.

A method built on VeRA (DVoRA, qvera.core.dvora) adds its own vectors and may scale the
output row by row; the layer asks its `method` (qvera.core.method) and names none.
"""

from __future__ import annotations

import math
import weakref
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from qvera.core.adapted_norm import base_products, expanded_row_norms, expansion_pays, gram
from qvera.core.bnb import dequantized_weight, is_8bit
from qvera.core.method import VERA, Method


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform with a generator, draw for draw what peft's `_kaiming_init` gives."""
    fan_in = shape[1]
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def generate_projections(rank: int, in_features: int, out_features: int, seed: int):
    """A (rank x in) then B (out x rank) from one CPU generator: peft's order, so adapters interoperate."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    A = kaiming_uniform((rank, in_features), generator)
    B = kaiming_uniform((out_features, rank), generator)
    return A, B


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x.to(dtype)`, skipping the call when it would return `x` itself: a decode step makes
    a few of these in every layer, and each costs host time even when it does nothing."""
    return x if x.dtype == dtype else x.to(dtype)


def compute_dtype_for(x: torch.Tensor) -> torch.dtype:
    """The dtype the adapter math runs in: autocast's when it is on, else the input's."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def autocast_off(x: torch.Tensor):
    """The adapter math picks its dtype itself; autocast would re-cast A and B on every call.
    Entered only where autocast is on: a decode step calls this once a layer."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return nullcontext()


class SharedProjections(nn.Module):
    """The frozen A and B, held once per model, plus the per-input cache of `A x`. `matrices`:
    A and B already generated for this rank, seed and size (by a fit check), else generated here."""

    def __init__(self, rank: int, in_features: int, out_features: int, seed: int, matrices=None):
        super().__init__()
        self.rank, self.seed = rank, seed
        A, B = matrices or generate_projections(rank, in_features, out_features, seed)
        assert A.shape == (rank, in_features) and B.shape == (out_features, rank), "matrices of another size"
        # Not persistent: they are regenerated from the seed, never saved.
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)
        self._casts: dict = {}
        self._last_input: tuple | None = None

    def _apply(self, fn, recurse=True):
        self._casts.clear()
        self._last_input = None
        return super()._apply(fn, recurse)

    def sliced(self, in_features: int, out_features: int, dtype: torch.dtype):
        """A[:, :in] and B[:out] in `dtype`, cast once and kept: casting per call would allocate."""
        key = (in_features, out_features, dtype)
        if key not in self._casts:
            self._casts[key] = (
                self.A[:, :in_features].to(dtype).contiguous(),
                self.B[:out_features].to(dtype).contiguous(),
            )
        return self._casts[key]

    def gram(self, in_features: int) -> torch.Tensor:
        """A[:, :in] A[:, :in]ᵀ in fp32, made once per input width (DVoRA's expanded norm)."""
        key = ("gram", in_features)
        if key not in self._casts:
            self._casts[key] = gram(self.A[:, :in_features])
        return self._casts[key]

    def project(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """`A x`, reused when the same input tensor comes again (q/k/v, gate/up read one `x`)."""
        key = (x._version, A.shape, A.dtype, torch.is_grad_enabled())
        if self._last_input is not None:
            ref, last_key, ax = self._last_input
            if ref() is x and last_key == key:
                return ax
        x_c = cast(x, A.dtype)
        ax = ProjectDown.apply(x_c, A) if torch.is_grad_enabled() else F.linear(x_c, A)  # no autograd node to decode
        self._last_input = (weakref.ref(x, self._forgetter()), key, ax)
        return ax

    def _forgetter(self):
        """A callback that drops the cached `A x` once its input is gone. Kept longer, the cache
        would hold the graph of a step that never ran backward (one stopped by out-of-memory),
        and through gradient checkpointing's hooks that graph holds the model: a cycle through
        C++ that gc cannot free, so the whole model would stay on the GPU."""
        owner = weakref.ref(self)

        def forget(dead_ref):
            projections = owner()
            if projections is not None and projections._last_input and projections._last_input[0] is dead_ref:
                projections._last_input = None

        return forget


class ProjectDown(torch.autograd.Function):
    """`A x` saving nothing: A is frozen, and the input gradient needs only A. F.linear would
    save A, and then a layer reading a checkpointed block's own input (post-norm models), which
    reuses its cached `A x` when checkpointing replays the block, would save one tensor fewer
    in the replay than in the forward: checkpointing refuses that."""

    @staticmethod
    def forward(ctx, x, A):
        ctx.A = A
        ctx.set_materialize_grads(False)  # folded layers send no gradient back through `A x`
        return F.linear(x, A)

    @staticmethod
    def backward(ctx, grad_ax):
        return (None if grad_ax is None else grad_ax @ ctx.A), None


def _vector_grads(grad_out, ax, lambda_d, lambda_b, B):
    """∂/∂d and ∂/∂b from M = gᵀ(A x): d_k = Σ_o b_o B_ok M_ok, b_o = Σ_k B_ok d_k M_ok."""
    M = grad_out.reshape(-1, grad_out.shape[-1]).t() @ ax.reshape(-1, ax.shape[-1])
    BM = M.to(lambda_d.dtype).mul_(B)
    return lambda_b @ BM, BM @ lambda_d


class AddVeraDelta(torch.autograd.Function):
    """base + b * (B (d * A x)) from the base layer's output and a precomputed `A x`. Used when a
    call has few tokens, where saving the out-sized `B (d * A x)` is cheap and spares the
    backward a matmul. The vectors are cast to the compute dtype once, and the casts saved for
    the backward: on a GPU a 7B step is bound by how many kernels it issues, not their size."""

    @staticmethod
    def forward(ctx, base, ax, lambda_d, lambda_b, B):
        d, b = cast(lambda_d, ax.dtype), cast(lambda_b, ax.dtype)
        v = F.linear(ax * d, B)
        ctx.B, ctx.vector_dtype = B, lambda_d.dtype
        ctx.save_for_backward(ax, v, d, b)
        return add_scaled(base, v, b)

    @staticmethod
    def inference(base, ax, lambda_d, lambda_b, B):
        """The forward without an autograd node, for calls with gradients off (decoding)."""
        return add_scaled(base, F.linear(ax * cast(lambda_d, ax.dtype), B), cast(lambda_b, ax.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        ax, v, d, b = ctx.saved_tensors
        grad_u = (cast(grad_out, b.dtype) * b) @ ctx.B
        grad_d = _token_sum(grad_u * ax, ctx.vector_dtype)
        grad_b = _token_sum(grad_out * v, ctx.vector_dtype)
        return grad_out, grad_u * d, grad_d, grad_b, None


def add_scaled(base: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """base + v * b, the product in v's dtype, the sum in base's. Every unfolded path adds VeRA's
    output this way (training, decoding, mixed batches), so they agree bit for bit. Not one
    `addcmul` (one rounding): with it, a same-seed server test's twin requests sampled apart
    (BENCHMARKS.md), and every number qvera was checked with would change."""
    return base + cast(v * b, base.dtype)


def _token_sum(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).sum(0, dtype=dtype)


def _scaled_factors(lambda_d, lambda_b, A, B):
    """(Λb B, Λd A): scaling the rows of B and A costs less than forming Λb B Λd."""
    return B * cast(lambda_b, B.dtype)[:, None], A * cast(lambda_d, A.dtype)[:, None]


def delta_weight(lambda_d, lambda_b, A, B) -> torch.Tensor:
    """ΔW = Λb B Λd A (out x in), in A's dtype."""
    scaled_B, scaled_A = _scaled_factors(lambda_d, lambda_b, A, B)
    return scaled_B @ scaled_A


def folded_weight(base_weight, lambda_d, lambda_b, A, B) -> torch.Tensor:
    """W0 + ΔW in one addmm."""
    return torch.addmm(base_weight, *_scaled_factors(lambda_d, lambda_b, A, B))


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W_j||₂ over the input dim, accumulated in fp32 (DoRA's column norm of Wᵀ)."""
    return torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32)


class FoldedVeraLinear(torch.autograd.Function):
    """(W0 + ΔW) x as one matmul. Saves `A x` for the vector gradients; W0 + ΔW is rebuilt in
    the backward rather than kept, since it is as large as the layer's weight. With `norms`,
    also returns ||W0 + ΔW|| per row (fp32, no gradient: a method scaling by it detaches it)."""

    @staticmethod
    def forward(ctx, x, ax, lambda_d, lambda_b, base_weight, bias, A, B, norms=False):
        ctx.base_weight, ctx.A, ctx.B = base_weight, A, B
        d, b = cast(lambda_d, A.dtype), cast(lambda_b, B.dtype)  # cast once, kept for the backward
        ctx.save_for_backward(ax, lambda_d, lambda_b, d, b)
        weight = folded_weight(base_weight(), d, b, A, B)
        out = F.linear(x, weight, None if bias is None else bias.to(x.dtype))
        if not norms:
            return out
        norm = row_norms(weight)
        ctx.mark_non_differentiable(norm)
        return out, norm

    @staticmethod
    def backward(ctx, grad_out, grad_norm=None):
        ax, lambda_d, lambda_b, d, b = ctx.saved_tensors
        grad_x = grad_out @ folded_weight(ctx.base_weight(), d, b, ctx.A, ctx.B)
        grad_d, grad_b = _vector_grads(grad_out, ax, lambda_d, lambda_b, ctx.B)
        return grad_x, None, grad_d, grad_b, None, None, None, None, None


class VeraLinear(nn.Module):
    """A frozen linear layer (nn.Linear, bitsandbytes 4-bit or 8-bit) plus VeRA's two vectors,
    and whatever its `method` (qvera.core.method) adds (DVoRA's m, say).

    `row_vectors`, when set by the serving code, holds per-row (d, b) for a mixed batch, and
    where a row's method scales the output, per-row output scales (precomputed per adapter):
    `A x` and the product by B stay one matmul for the whole batch.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        projections: SharedProjections,
        d_initial: float,
        fold: bool = True,
        method: Method = VERA,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.projections = [projections]  # a list: not a submodule, so its buffers exist once
        device = base_layer.weight.device
        self.lambda_d = nn.Parameter(torch.full((projections.rank,), float(d_initial), device=device))
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device))
        self.method = method
        method.init_layer(self)
        self.fold = fold
        self.row_vectors: tuple[torch.Tensor, ...] | None = None
        self._norm_cache: tuple[torch.Tensor, ...] | None = None
        self._base_products: tuple | None = None  # (weight key, ||W0||², W0 Aᵀ): adapted_norm.py

    def _apply(self, fn, recurse=True):
        self._norm_cache = self._base_products = None  # made from the weight, which may move or be cast
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        method = "" if self.method is VERA else f", {self.method.name}"
        return f"in={self.in_features}, out={self.out_features}, rank={self.projections[0].rank}{method}"

    def _should_fold(self, tokens: int) -> bool:
        """Per r: folding costs 2·out·in (ΔW built in forward and backward) + tokens·(out + in)
        (`A x` and gᵀ(A x)); the unfolded path tokens·2·(out + in), and for a method scaling by
        ||W0 + ΔW|| the unfolded norm out·min(r, in) (expanded, or W0 + ΔW formed), which the
        folded path gets with its weight. Fold past the crossover."""
        if not (self.fold and torch.is_grad_enabled()) or is_8bit(self.base_layer):
            return False  # without gradients the unfolded path is cheaper at decode sizes
        unfolded_norm = min(self.projections[0].rank, self.in_features) if self.method.scales_by_norm else 0
        folding_extra = self.out_features * (2 * self.in_features - unfolded_norm)
        return folding_extra < tokens * (self.out_features + self.in_features)

    def adapted_norms(self, lambda_d: torch.Tensor, lambda_b: torch.Tensor) -> torch.Tensor:
        """||W0 + ΔW|| per row in fp32 (the unfolded path's norm), kept until d, b or W0 change
        (gradient checkpointing's second forward, every decoding step). Expanded over products of
        W0 and A kept per layer (adapted_norm.py) where that costs less and the layer trains, or
        already holds them; else with W0 + ΔW formed: a model in eval mode (a server, a merge)
        takes each adapter's norm once, and the kept products would cost memory for nothing."""
        weight = self.base_layer.weight
        key = (weight.data_ptr(), weight._version)
        if self._norm_cache is not None and not weight.is_meta:  # meta tensors hold no values to compare
            cached_key, cached_d, cached_b, norms = self._norm_cache
            if cached_key == key and torch.equal(cached_d, lambda_d) and torch.equal(cached_b, lambda_b):
                return norms
        projections = self.projections[0]
        with torch.no_grad():
            A, B = projections.sliced(self.in_features, self.out_features, torch.float32)
            d, b = lambda_d.float(), lambda_b.float()
            kept = self._base_products
            if expansion_pays(projections.rank, self.in_features) and (self.training or kept is not None):
                if kept is None or kept[0] != key:
                    self._base_products = (key, *base_products(dequantized_weight(self.base_layer, torch.float32), A))
                _, squared_norms, projected = self._base_products
                norms = expanded_row_norms(squared_norms, projected, projections.gram(self.in_features), d, b, B)
            else:
                norms = row_norms(folded_weight(dequantized_weight(self.base_layer, torch.float32), d, b, A, B))
            self._norm_cache = (key, lambda_d.detach().clone(), lambda_b.detach().clone(), norms)
        return norms

    def _rescaled(self, out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """scale ⊙ (out - bias) + bias: DoRA scales W x, never the bias (as peft does)."""
        bias = self.base_layer.bias
        if bias is None:
            return out * scale.to(out.dtype)
        bias = bias.to(out.dtype)
        return (out - bias) * scale.to(out.dtype) + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projections = self.projections[0]
        dtype = compute_dtype_for(x)
        A, B = projections.sliced(self.in_features, self.out_features, dtype)
        # The vectors are fp32 whatever a trainer did to them; the math below casts copies.
        lambda_d, lambda_b = cast(self.lambda_d, torch.float32), cast(self.lambda_b, torch.float32)
        if self.row_vectors is None and self._should_fold(x.numel() // x.shape[-1]):
            with autocast_off(x):
                x_c = x.to(dtype)

                def weight():  # dequantized in the forward and again in the backward, never kept
                    return dequantized_weight(self.base_layer, dtype)

                ax, bias = projections.project(x, A), self.base_layer.bias
                if not self.method.scales_by_norm:
                    out = FoldedVeraLinear.apply(x_c, ax, lambda_d, lambda_b, weight, bias, A, B)
                    scale = self.method.scale(self, self.vectors_now(lambda_d, lambda_b))
                    return out if scale is None else self._rescaled(out, scale)
                out, norms = FoldedVeraLinear.apply(x_c, ax, lambda_d, lambda_b, weight, None, A, B, True)
                out = out * self.method.scale(self, self.vectors_now(lambda_d, lambda_b), norms).to(dtype)
                return out if bias is None else out + bias.to(dtype)
        base = self.base_layer(x)  # exactly as without VeRA, under the caller's autocast
        with autocast_off(x):
            ax = projections.project(x, A)  # cast there, once for all the layers that read x
            if self.row_vectors is None:
                add_vera = AddVeraDelta.apply if torch.is_grad_enabled() else AddVeraDelta.inference
                out = add_vera(base, ax, lambda_d, lambda_b, B)
                scale = self.method.scale(self, self.vectors_now(lambda_d, lambda_b))
            else:
                d_rows, b_rows, *scale_rows = self.row_vectors  # scale rows: where a row's method scales
                v = F.linear(ax * cast(d_rows, dtype)[:, None, :], B)
                out = add_scaled(base, v, cast(b_rows, dtype)[:, None, :])
                scale = scale_rows[0][:, None, :] if scale_rows else None
        return out if scale is None else self._rescaled(out, scale)

    def vectors_now(self, lambda_d: torch.Tensor, lambda_b: torch.Tensor) -> dict[str, torch.Tensor]:
        """The method's vectors with d and b as given (the forward's fp32 casts): what
        `Method.scale` and `Method.rows` take."""
        return {**self.method.vectors(self), "lambda_d": lambda_d, "lambda_b": lambda_b}
