"""FSDP on a 4-bit base, on CPUs (gloo): a few VeRA steps, compared with one process.

    torchrun --nproc_per_node 2 experiments/fsdp_cpu.py OUT_DIR
    torchrun --nproc_per_node 1 experiments/fsdp_cpu.py OUT_DIR   # the one-process reference

`random:tiny` in NF4 with its 4-bit storage packed as bf16 (`quant_storage`), bf16 compute,
VeRA rank 16 on every linear layer. Each process takes its share of one fixed global batch;
FSDP (torch's FullyShardedDataParallel, FULL_SHARD) averages the gradients. Rank 0 writes the
adapter (its vectors gathered from the shards) and checks that it loads and gives the trained
model's loss. Writes OUT_DIR/fsdp_<world size>.json with the loss of every step.

Why not `accelerate launch --config_file configs/accelerate/fsdp.yaml` here: accelerate
applies FSDP only on accelerators; on CPUs it runs the same launch as DDP. And the wrap policy
matters: FSDP flattens each wrapped unit into one tensor of one dtype, so a decoder layer
holding bf16 norms and qvera's fp32 vectors is refused ("Must flatten tensors with uniform
dtype"); each 4-bit layer and each VeRA layer is wrapped as its own unit instead (peft's
`fsdp_auto_wrap_policy` does the same for LoRA).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import bitsandbytes as bnb
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from qvera import ModelConfig, VeraConfig, attach_vera, load_base
from qvera.adapters.format import read_adapter, save_adapter
from qvera.adapters.loading import attach_adapter
from qvera.core.attach import load_vector_state
from qvera.core.vera import VeraLinear

BASE = ModelConfig(name="random:tiny", quantization="nf4", compute_dtype="bfloat16", quant_storage="bfloat16")
VERA = VeraConfig(rank=16)
BATCH, LENGTH, STEPS, LR = 4, 64, 4, 1e-2


def batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def main() -> int:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model, _ = load_base(BASE)
    attach_vera(model, VERA)
    policy = ModuleWrapPolicy({bnb.nn.Linear4bit, VeraLinear, LlamaDecoderLayer})
    sharded = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=policy)
    optimizer = torch.optim.AdamW([p for p in sharded.parameters() if p.requires_grad], lr=LR)
    ids = batch(model.config.vocab_size)
    mine = ids[rank::world]  # equal lengths: the mean of the ranks' losses is the global one
    losses = []
    for _ in range(STEPS):
        loss = loss_of(sharded, mine)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    with torch.no_grad():
        final = loss_of(sharded, mine).detach()
    dist.all_reduce(final)
    # The vectors only: FSDP's full state dict of the 4-bit layers crashes on CPUs
    with FSDP.summon_full_params(sharded, writeback=False):
        vectors = {
            name.replace("_fsdp_wrapped_module.", ""): param.detach().clone()
            for name, param in sharded.named_parameters()
            if param.requires_grad
        }
    if rank == 0:
        plain, _ = load_base(BASE)
        attach_vera(plain, VERA)
        load_vector_state(plain, vectors)
        folder = save_adapter(plain, out / f"adapter_{world}")
        reloaded, _ = load_base(BASE)
        attach_adapter(reloaded, read_adapter(folder))
        with torch.no_grad():
            reloaded_loss = sum(loss_of(reloaded, ids[r::world]).item() for r in range(world)) / world
        result = {
            "world_size": world,
            "losses": losses,
            "final_loss": final.item() / world,
            "reloaded_adapter_loss": reloaded_loss,
            "adapter": str(folder),
        }
        (out / f"fsdp_{world}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
