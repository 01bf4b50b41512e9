"""A VeRA adapter as a peft LoRA folder, for serving engines that load LoRA only (vLLM,
SGLang, LoRAX, TGI).

A VeRA update is a LoRA update of the same rank:

    ΔW = Λb B Λd A = B'A',   A' = Λd A[:, :in] (r x in),   B' = Λb B[:out] (out x r)

and `lora_alpha = r` makes peft's scale α/r exactly 1. The adapter's method adds its own
peft options and tensors (`Method.lora_options`, `lora_tensors`): DVoRA exports as peft's DoRA
(qvera.core.dvora), which LoRA-only engines refuse, and a merged model (`qvera merge`) is the
way to them; a method with no LoRA form is refused in one line.

What it costs: a LoRA holds r·(in + out) numbers a layer where VeRA holds r + out, so a
rank-512 export is hundreds of times larger. For engines with a rank cap (vLLM 512),
`rank=K` below the adapter's replaces each layer's ΔW by its best rank-K approximation
(truncated SVD) and reports the relative error per layer; K at or above the adapter's rank
is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from peft import LoraConfig

from qvera.adapters.atomic import atomic_folder
from qvera.adapters.config import Adapter
from qvera.adapters.peft_interop import PEFT_FILES, PEFT_WEIGHTS, PREFIX, peft_base_name, regenerated_projections
from qvera.core.methods import method_named

LORA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraExport:
    """What `export_lora` wrote: the LoRA rank, the relative error of each layer's ΔW
    (||ΔW - B'A'||_F / ||ΔW||_F; all zeros when exact), and the sizes beside VeRA's."""

    folder: Path
    rank: int
    errors: dict[str, float] = field(default_factory=dict)
    parameters: int = 0
    bytes: int = 0
    vera_parameters: int = 0

    @property
    def exact(self) -> bool:
        return not any(self.errors.values())

    def summary(self, worst: int = 3) -> str:
        """A few lines for the command line: sizes, then the error's spread and worst layers."""
        lines = [
            f"LoRA rank {self.rank}: {self.parameters:,} numbers ({self.bytes:,} bytes) "
            f"against VeRA's {self.vera_parameters:,} ({4 * self.vera_parameters:,} bytes fp32), "
            f"{self.parameters / self.vera_parameters:,.0f}x"
        ]
        if self.exact:
            return "\n".join([*lines, "exact: every layer's update is kept whole"])
        errors = sorted(self.errors.values())
        lines.append(
            f"relative error of ΔW per layer (Frobenius): max {errors[-1]:.3g}, "
            f"median {errors[len(errors) // 2]:.3g}, over {len(errors)} layers"
        )
        for name, error in sorted(self.errors.items(), key=lambda item: -item[1])[:worst]:
            lines.append(f"  {error:.3g}  {name}")
        return "\n".join(lines)


def lora_factors(adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """Per adapted layer, (A', B') in fp32 and the other tensors its method's LoRA form holds
    (`Method.lora_tensors`), by peft's suffix."""
    A, B = regenerated_projections(adapter.config)
    method = method_named(adapter.config.method)
    factors = {}
    for name, (out_features, in_features) in sorted(adapter.config.targets.items()):
        if in_features is None:
            raise ValueError(f"the adapter does not record {name}'s input size; convert it with `qvera convert` first")
        vectors = {which: adapter.vectors[f"{name}.{which}"] for which in method.vector_names()}
        d, b = method.factors(vectors)
        lora_A = d.float()[:, None] * A[:, :in_features]
        lora_B = b.float()[:, None] * B[:out_features]
        factors[name] = (lora_A, lora_B, method.lora_tensors(vectors))
    return factors


def truncate(lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` factors of B'A' (Eckart-Young) and the relative Frobenius error.

    The SVD runs on an r x r core after QR of B' and A'ᵀ, in float64, so a 4096-wide layer costs
    O((in + out)·r²) rather than an SVD of the whole ΔW. A layer whose update has fewer than
    `rank` singular values gets zero rows, so every layer has the one rank peft's config names.
    """
    Q_b, R_b = torch.linalg.qr(lora_B.double())
    Q_a, R_a = torch.linalg.qr(lora_A.double().t())
    U, S, Vh = torch.linalg.svd(R_b @ R_a.t())
    total = S.square().sum()
    error = float((S[rank:].square().sum() / total).sqrt()) if total > 0 else 0.0
    root = S[:rank].sqrt()
    new_B = (Q_b @ U[:, :rank]) * root
    new_A = root[:, None] * (Vh[:rank] @ Q_a.t())
    missing = rank - root.shape[0]
    if missing > 0:
        new_B = torch.cat([new_B, new_B.new_zeros(new_B.shape[0], missing)], dim=1)
        new_A = torch.cat([new_A, new_A.new_zeros(missing, new_A.shape[1])])
    return new_A.float(), new_B.float(), error


def export_lora(
    adapter: Adapter, folder: str | Path, *, dtype: torch.dtype = torch.float32, rank: int | None = None
) -> LoraExport:
    """Write `adapter` as a peft LoRA folder (`adapter_config.json`, `adapter_model.safetensors`
    keyed as peft saves them) that `PeftModel.from_pretrained(base, folder)` and LoRA engines load.

    Args:
        dtype: of the saved factors: float32 for exactness, bfloat16 or float16 for engines.
        rank: the LoRA rank; below the adapter's, a truncated SVD per layer (see `truncate`).

    Raises:
        ValueError: a rank below 1, a method with no LoRA equivalent, or projections this torch
            build does not regenerate.
    """
    if rank is not None and rank < 1:
        raise ValueError(f"--rank must be at least 1, not {rank}")
    method = method_named(adapter.config.method)
    if method.lora_options is None:
        raise ValueError(f"a {method.title} adapter has no LoRA equivalent; merge it (qvera merge) instead")
    vera_rank = adapter.config.rank
    lora_rank = vera_rank if rank is None or rank >= vera_rank else rank
    tensors, errors = {}, {}
    for name, (lora_A, lora_B, extra) in lora_factors(adapter).items():
        errors[name] = 0.0
        if lora_rank < vera_rank:
            lora_A, lora_B, errors[name] = truncate(lora_A, lora_B, lora_rank)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = lora_A.to(dtype).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = lora_B.to(dtype).contiguous()
        for suffix, value in extra.items():
            tensors[f"{PREFIX}{name}.{suffix}"] = value.to(dtype).contiguous()
    base = adapter.config.base_model
    config = LoraConfig(
        r=lora_rank,
        lora_alpha=lora_rank,  # peft scales by alpha / r: 1, as VeRA's update has no scale
        target_modules=sorted(adapter.config.targets),
        base_model_name_or_path=peft_base_name(base.name),
        revision=base.revision,
        **method.lora_options,
        inference_mode=True,
    )
    folder = Path(folder)
    data = safetensors.torch.save(tensors, metadata={"format": "pt"})
    with atomic_folder(folder, replaceable=PEFT_FILES) as staging:
        (staging / PEFT_WEIGHTS).write_bytes(data)
        config.save_pretrained(str(staging))
    return LoraExport(
        folder=folder,
        rank=lora_rank,
        errors=errors,
        parameters=sum(t.numel() for t in tensors.values()),
        bytes=len(data),
        vera_parameters=sum(v.numel() for v in adapter.vectors.values()),
    )
