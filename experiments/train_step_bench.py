"""Training steps on a random-weight base of a real model's shape (`random:llama2-7b`), as sft.py
runs them: NF4 base, gradient checkpointing, autocast in the compute dtype, the loss from TRL's
fused LM head (no full logits over the sequence), attention off cuDNN's kernels. The optimizer is
each method's usual one: qvera's default fused AdamW (transformers' default too), and QLoRA's
paged 8-bit AdamW for peft's adapters on a GPU (fused AdamW on a CPU). Per variant:
tokens/s and peak allocated and reserved GPU memory; and the longest batch-1 sequence that
trains under each memory cap. Used by `experiments/bench.py --device cuda`; runs on a CPU too
(no memory figures there), which is how it is tested without a GPU.
"""

from __future__ import annotations

import gc
import statistics
import time
from contextlib import nullcontext

import bitsandbytes as bnb
import torch
from trl.trainer.utils import add_fused_lm_head

from experiments.profiling import attach_variant
from qvera.core.attention_kernels import without_cudnn_attention
from qvera.core.base import load_base
from qvera.core.config import ModelConfig
from qvera.training.trainer import AUTO_OPTIMIZER

VARIANTS = ["floor", "peft-lora:16", "peft-lora:64", "peft-vera:512", "qvera:512", "qvera:1024", "qvera-dvora:512"]
CONTEXT_VARIANTS = ["qvera:512", "peft-lora:16"]
GB = 2**30
LEFTOVER_BYTES = 256 * 2**20  # cuBLAS workspaces and the like; a leftover model is gigabytes


def build(shape: str, variant: str, compute_dtype: str, device: str, alone: bool = True):
    """The random base with one variant attached, in training mode with gradient checkpointing.
    `alone`: nothing else may be resident (the memory figures are this variant's only)."""
    if alone:
        check_released(variant)
    config = ModelConfig(name=f"random:{shape}", quantization="nf4", compute_dtype=compute_dtype)
    model, _ = load_base(config, device_map="cpu" if device == "cpu" else None)
    add_fused_lm_head(model)  # before peft wraps it, as TRL does
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, method, rank = attach_variant(model, variant)
    model.train()
    return model, method, rank


OPTIMIZERS = {  # by transformers' names, as sft.py's `--optimizer` takes them
    "paged_adamw_8bit": lambda params: bnb.optim.PagedAdamW8bit(params, lr=1e-4),
    "adamw_torch_fused": lambda params: torch.optim.AdamW(params, lr=1e-4, fused=True),
    "adamw_torch": lambda params: torch.optim.AdamW(params, lr=1e-4),
}


def default_optimizer(method: str, device: str) -> str:
    """qvera's default (sft.py's `auto`); QLoRA's paged 8-bit AdamW for peft on a GPU."""
    return "paged_adamw_8bit" if method.startswith("peft") and torch.device(device).type == "cuda" else AUTO_OPTIMIZER


class Stepper:
    """One optimizer step on batch x seq random tokens, the way sft.py takes it. `optimizer`: a
    name in OPTIMIZERS (default: `default_optimizer`); `cudnn_attention`: leave torch's kernel
    order (sft.py keeps attention off cuDNN)."""

    def __init__(self, model, method: str, device: str, optimizer: str | None = None, cudnn_attention=False):
        self.model, self.method, self.device = model, method, torch.device(device)
        self.params = [p for p in model.parameters() if p.requires_grad] if method != "floor" else []
        self.optimizer_name = optimizer or default_optimizer(method, device)
        self.optimizer = OPTIMIZERS[self.optimizer_name](self.params) if self.params else None
        self.attention = nullcontext if cudnn_attention else without_cudnn_attention
        self.dtype = model.get_input_embeddings().weight.dtype
        self.generator = torch.Generator(device=self.device).manual_seed(0)

    def __call__(self, batch: int, seq: int) -> None:
        ids = torch.randint(0, self.model.config.vocab_size, (batch, seq), device=self.device, generator=self.generator)
        autocast = self.dtype != torch.float32
        with self.attention():
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
                loss = self.model(input_ids=ids, labels=ids, fused_lm_head=True).loss
            loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.synchronize()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def check_released(variant: str) -> None:
    """Stop before building on top of what an earlier variant left: every figure would count it."""
    if torch.cuda.is_available() and torch.cuda.memory_allocated() > LEFTOVER_BYTES:
        raise RuntimeError(
            f"{torch.cuda.memory_allocated() / GB:.2f} GB of GPU memory is still allocated before {variant}: "
            "an earlier variant was not freed, and its memory would count in this one's figures"
        )


def release() -> None:
    """Free what a finished variant left. Its 4-bit layers sit in reference cycles (each
    Params4bit points back at its layer), so dropping the last name frees nothing until a
    collection: the next variant's peak memory and capped context would count the old model."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def median_step_seconds(step: Stepper, batch: int, seq: int, repeats: int, warmups: int = 1) -> float:
    """Median seconds of `repeats` steps after `warmups` (kernels chosen, optimizer state made)."""
    for _ in range(warmups):
        step(batch, seq)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(batch, seq)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(shape: str, variant: str, batch: int, seq: int, repeats: int, compute_dtype: str, device: str) -> dict:
    """tokens/s (median of `repeats` steps after one warm-up) and peak memory, with the optimizer's state."""
    model, method, rank = build(shape, variant, compute_dtype, device)
    step = Stepper(model, method, device)
    cuda = step.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_s = median_step_seconds(step, batch, seq, repeats)
    row = dict(
        variant=method,
        rank=rank,
        batch=batch,
        seq=seq,
        step_s=round(step_s, 4),
        tokens_per_s=round(batch * seq / step_s, 1),
        peak_allocated_gb=round(torch.cuda.max_memory_allocated() / GB, 3) if cuda else None,
        peak_reserved_gb=round(torch.cuda.max_memory_reserved() / GB, 3) if cuda else None,
        trainable=sum(p.numel() for p in step.params),
        optimizer=step.optimizer_name if step.params else None,
    )
    del model, step
    release()
    return row


def interleaved_speeds(
    shape: str, variants: list[str], batch: int, seq: int, rounds: int, compute_dtype: str, device: str
) -> dict[str, float]:
    """tokens/s per variant (median of `rounds` steps) with every variant's model resident and
    one step of each in turn, the order rotating each round. Timed one variant after another,
    two runs on one H100 put the same variant up to 45% apart, more than the gaps measured:
    taken in turn, a drift in the GPU's clocks reaches every variant alike. Needs room for all
    the models at once (about 35 GB for the seven 7B-shaped variants)."""
    steppers = {}
    for variant in variants:
        model, method, _ = build(shape, variant, compute_dtype, device, alone=not steppers)
        steppers[variant] = Stepper(model, method, device)
        steppers[variant](batch, seq)  # warm-up: kernels chosen, optimizer state made
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for round_ in range(rounds):
        shift = round_ % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            start = time.perf_counter()
            steppers[variant](batch, seq)
            times[variant].append(time.perf_counter() - start)
    del model, steppers
    release()
    return {variant: round(batch * seq / statistics.median(t), 1) for variant, t in times.items()}


def fits(step: Stepper, seq: int) -> bool:
    """Whether one step at `seq` tokens trains; after an out-of-memory error, frees what it left."""
    try:
        step(1, seq)
    except torch.OutOfMemoryError:
        pass  # freed below, once the exception (and the frames holding activations) is gone
    else:
        return True
    for param in step.params:
        param.grad = None
    release()
    return False


def stride(seq: int, granularity: int) -> int:
    return max(granularity, seq // 20 // granularity * granularity)


def max_context(shape: str, variant: str, caps_gb: list[float], compute_dtype: str, granularity: int = 256) -> dict:
    """For each cap, the longest batch-1 sequence (a multiple of `granularity`) that trains with
    the process's GPU memory limited to the cap. Peak reserved memory grows about linearly with
    the length; two uncapped steps place the first guess, capped steps then confirm it."""
    model, method, rank = build(shape, variant, compute_dtype, "cuda")
    step = Stepper(model, method, "cuda")
    total = torch.cuda.get_device_properties(step.device).total_memory
    peaks = {}
    for seq in (1024, 2048):
        release()
        torch.cuda.reset_peak_memory_stats()
        step(1, seq)
        peaks[seq] = torch.cuda.max_memory_reserved()
    per_token = max((peaks[2048] - peaks[1024]) / 1024, 1.0)
    fixed = peaks[1024] - 1024 * per_token
    result = {}
    for cap in caps_gb:
        release()
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GB / total))
        seq = max(granularity, int((cap * GB - fixed) / per_token) // granularity * granularity)
        best = None
        try:
            if fits(step, seq):  # the guess fits: climb in about 5% steps until one fails
                best = seq
                while fits(step, seq + stride(seq, granularity)):
                    seq += stride(seq, granularity)
                    best = seq
            else:  # step down until one fits
                while best is None and seq > granularity:
                    seq -= stride(seq, granularity)
                    best = seq if fits(step, seq) else None
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        result[str(cap)] = best
    del model, step
    release()
    return dict(variant=method, rank=rank, max_tokens_by_cap_gb=result)


def ratios(rows: list[dict]) -> dict:
    """The issue's targets, read off the rows (None where a row is missing); speeds taken in
    turn (`interleaved_speeds`) where the rows have them."""
    by_name = {f"{r['variant']}:{r['rank']}" if r["rank"] else r["variant"]: r for r in rows}

    def speed(name: str) -> float:  # taken in turn where measured so, else one after another
        return by_name[name].get("interleaved_tokens_per_s") or by_name[name]["tokens_per_s"]

    def ratio(a: str, b: str):
        return round(speed(a) / speed(b), 3) if {a, b} <= set(by_name) else None

    qvera = by_name.get("qvera:512")
    return {
        "qvera512_over_lora64": ratio("qvera:512", "peft-lora:64"),
        "qvera512_over_peft_vera512": ratio("qvera:512", "peft-vera:512"),
        "qvera512_over_floor": ratio("qvera:512", "floor"),
        "qvera512_peak_allocated_gb": qvera["peak_allocated_gb"] if qvera else None,
        "qvera512_peak_reserved_gb": qvera["peak_reserved_gb"] if qvera else None,
    }


def markdown(rows: list[dict], contexts: list[dict], summary: dict) -> str:
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    lines = [
        "| variant | rank | optimizer | batch x seq | s/step | tokens/s | tokens/s in turn | peak allocated GB "
        "| peak reserved GB | trainable |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        in_turn = r.get("interleaved_tokens_per_s")
        lines.append(
            f"| {r['variant']} | {r['rank'] or '-'} | {r.get('optimizer') or '-'} | {r['batch']} x {r['seq']} "
            f"| {r['step_s']:.3f} "
            f"| {r['tokens_per_s']:.0f} | {'-' if in_turn is None else f'{in_turn:.0f}'} "
            f"| {fmt(r['peak_allocated_gb'])} | {fmt(r['peak_reserved_gb'])} | {r['trainable']:,} |"
        )
    lines += ["", "| ratio | value | target |", "|---|---:|---|"]
    targets = {
        "qvera512_over_lora64": ">= 1.0",
        "qvera512_over_peft_vera512": ">= 1.3",
        "qvera512_peak_allocated_gb": "< 6 at 2,048 tokens",
    }
    for name, value in summary.items():
        lines.append(f"| {name} | {fmt(value)} | {targets.get(name, '')} |")
    if contexts:
        caps = list(contexts[0]["max_tokens_by_cap_gb"])
        lines += ["", "| variant | rank | " + " | ".join(f"max tokens @ {c} GB" for c in caps) + " |"]
        lines.append("|---|---:|" + "---:|" * len(caps))
        for c in contexts:
            cells = " | ".join("-" if v is None else f"{v:,}" for v in c["max_tokens_by_cap_gb"].values())
            lines.append(f"| {c['variant']} | {c['rank']} | {cells} |")
        lines.append("")
        lines.append("Target: qvera r=512 trains at least 4,096 tokens under the 8 GB cap.")
    return "\n".join(lines)
