"""DVoRA's unfolded row norm ||W0 + ΔW||, two ways: formed (W0 + ΔW built in fp32, out·in·r
multiply-adds every new (d, b)) and expanded (qvera/core/adapted_norm.py: out·r² a new (d, b),
from W0 Aᵀ kept per layer). Counts the work and the cache at a model's shapes, then trains
DVoRA r=512 with each norm and plain VeRA r=512 in turn, one step of each per round, in one
process, as `train_step_bench` builds them (NF4 base, gradient checkpointing, bf16 autocast,
fused AdamW). The formed norm is the code before the expansion, reached by switching the
expansion off around its steps; both norms are compared on every layer at the end.

    python experiments/dvora_norm.py --count-only                   # work and bytes at llama2-7b
    OMP_NUM_THREADS=1 python experiments/dvora_norm.py              # CPU: a small Llama shape
    python experiments/dvora_norm.py --device cuda --shape llama2-7b --seq 2048 --runs 3 --json OUT

`--shape cpu-llama` is Llama's layout at hidden size 1024 (the smallest width where r=512 is
below every layer's input width, so the expansion is what runs), 4 layers, grouped-query k/v.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # as a script: the repository root, after PYTHONPATH

from experiments.train_step_bench import Stepper, build  # noqa: E402
from qvera.core.attach import vera_layers  # noqa: E402
from qvera.core.bnb import dequantized_weight  # noqa: E402
from qvera.core.random_base import SHAPES  # noqa: E402
from qvera.core.vera import folded_weight, row_norms  # noqa: E402

CPU_SHAPE = SHAPES["tiny"] | dict(
    hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4
)
VARIANTS = {"vera": "qvera:512", "dvora": "qvera-dvora:512", "dvora-formed": "qvera-dvora:512"}


def layer_shapes(shape: dict) -> list[tuple[int, int]]:
    """(out, in) of every linear layer qvera adapts in a Llama of this shape (all but the head)."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    block = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden)]
    return (block + [(hidden, inter)]) * shape["num_hidden_layers"]


def norm_flops(out_features: int, in_features: int, rank: int) -> dict[str, int]:
    """Matmul FLOPs (2 per multiply-add, as torch's FlopCounterMode counts) of one layer's norm:
    `formed` and `expanded` for each new (d, b), `once` for W0 Aᵀ when the layer first needs it.
    A Aᵀ (2·r²·in) is made once per input width for the whole model and left out."""
    return dict(
        formed=2 * out_features * rank * in_features,
        expanded=2 * out_features * rank * rank,
        once=2 * out_features * in_features * rank,
    )


def count(shape: dict, rank: int) -> dict:
    """The norm's work for the whole model per new (d, b), and the expansion's cache in fp32."""
    layers = layer_shapes(shape)
    totals = {key: sum(norm_flops(o, i, rank)[key] for o, i in layers) for key in ("formed", "expanded", "once")}
    base_step = sum(2 * o * i for o, i in layers)  # the adapted layers' forward FLOPs per token
    return dict(
        rank=rank,
        layers=len(layers),
        tflop_formed=round(totals["formed"] / 1e12, 3),
        tflop_expanded=round(totals["expanded"] / 1e12, 3),
        tflop_once=round(totals["once"] / 1e12, 3),
        base_forward_gflop_per_token=round(base_step / 1e9, 3),
        cache_gb=round(sum(4 * o * (rank + 1) for o, _ in layers) / 1e9, 3),
        weights_gb_nf4=round(sum(o * i for o, i in layers) / 2 / 1e9, 3),
    )


@contextmanager
def formed_norms():
    """The unfolded norm as before the expansion: W0 + ΔW formed in fp32 for every new (d, b)."""
    with mock.patch("qvera.core.vera.expansion_pays", lambda rank, in_features: False):
        yield


def norm_agreement(model) -> float:
    """The largest relative difference between the expanded and the formed norm over the
    layers, at the model's current vectors."""
    worst = 0.0
    with torch.no_grad():
        for layer in vera_layers(model).values():
            d, b = layer.lambda_d.float(), layer.lambda_b.float()
            expanded = layer.adapted_norms(d, b)
            A, B = layer.projections[0].sliced(layer.in_features, layer.out_features, torch.float32)
            formed = row_norms(folded_weight(dequantized_weight(layer.base_layer, torch.float32), d, b, A, B))
            worst = max(worst, ((expanded - formed).abs() / formed).max().item())
    return worst


def cache_bytes(model) -> int:
    """Bytes the layers hold for the expansion (||W0||² and W0 Aᵀ)."""
    held = (layer._base_products for layer in vera_layers(model).values() if layer._base_products is not None)
    return sum(t.numel() * t.element_size() for _, *tensors in held for t in tensors)


def step_speeds(shape: str, seq: int, runs: int, rounds: int, device: str, report: dict, save) -> None:
    """tokens/s of VeRA r=512, DVoRA r=512 and DVoRA r=512 with the formed norm, one step of each
    in turn (the order rotating each round), the median of `rounds` per run; then the two norms
    compared and the cache's size. Adds each to `report` and calls `save(report)` as it comes, so
    a run stopped by a time limit keeps what it measured."""
    shapes = {"cpu-llama": CPU_SHAPE} if shape == "cpu-llama" else {}
    with mock.patch.dict(SHAPES, shapes):
        models = {name: build(shape, VARIANTS[name], "bfloat16", device, alone=False) for name in ("vera", "dvora")}
    steppers = {name: Stepper(model, method, device) for name, (model, method, _) in models.items()}
    steppers["dvora-formed"] = steppers["dvora"]
    contexts = {"vera": nullcontext, "dvora": nullcontext, "dvora-formed": formed_norms}
    kinds = list(VARIANTS)

    def step(kind):
        with contexts[kind]():
            start = time.perf_counter()
            steppers[kind](1, seq)
            return time.perf_counter() - start

    for kind in kinds:
        step(kind)  # warm-up: kernels chosen, optimizer state made, W0 Aᵀ computed
    report["runs"] = []
    for _ in range(runs):
        times = {kind: [] for kind in kinds}
        for round_ in range(rounds):
            shift = round_ % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:
                times[kind].append(step(kind))
        speeds = {kind: round(seq / statistics.median(t), 1) for kind, t in times.items()}
        speeds["dvora_over_vera"] = round(speeds["dvora"] / speeds["vera"], 3)
        speeds["formed_over_vera"] = round(speeds["dvora-formed"] / speeds["vera"], 3)
        report["runs"].append(speeds)
        save(report)
    dvora_model = models["dvora"][0]
    report["norm_max_relative_difference"] = norm_agreement(dvora_model)
    report["cache_gb"] = round(cache_bytes(dvora_model) / 1e9, 4)
    save(report)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu-llama", help="cpu-llama or a random base shape (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=512, help="rank of the counted work (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=256, help="tokens a step, batch 1 (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="runs, each its own medians (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="steps of each kind in a run (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s)")
    parser.add_argument("--count-only", action="store_true", help="count the work and the cache at llama2-7b, no steps")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = CPU_SHAPE if args.shape == "cpu-llama" else SHAPES[args.shape]
    report = {"count_llama2-7b": count(SHAPES["llama2-7b"], args.rank), f"count_{args.shape}": count(shape, args.rank)}

    def save(report):
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")

    save(report)
    if not args.count_only:
        report |= dict(device=args.device, shape=args.shape, seq=args.seq, threads=args.threads)
        if args.device == "cuda":
            report["gpu"] = torch.cuda.get_device_name()
        step_speeds(args.shape, args.seq, args.runs, args.rounds, args.device, report, save)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
