"""Separate learning rates for d, b and DVoRA's m, and a DVoRA run from recipe to adapter folder."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import safetensors.torch
import torch

from qvera import ModelConfig, VeraConfig
from qvera.adapters.format import read_adapter
from qvera.core.attach import vera_layers
from qvera.training.recipe import DataConfig, SFTRecipe, TrainConfig
from qvera.training.run import build_trainer, train

SCALES = {"lambda_d": 2.0, "lambda_b": 0.5, "lambda_m": 0.25}


def recipe(model_dir, tmp_path, **train_values) -> SFTRecipe:
    rows = [
        {"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i} done"}]}
        for i in range(8)
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    values = dict(
        output_dir=str(tmp_path / "run"),
        learning_rate=1e-3,
        lr_scale_d=SCALES["lambda_d"],
        lr_scale_b=SCALES["lambda_b"],
        lr_scale_m=SCALES["lambda_m"],
        lr_scheduler="constant",
        max_steps=1,
        batch_size=4,
        warmup_steps=0,
        eval_steps=0,
        save_steps=0,
        gradient_checkpointing=False,
    )
    values.update(train_values)
    return SFTRecipe(
        model=ModelConfig(name=model_dir, quantization="nf4"),
        vera=VeraConfig(rank=16, method="dvora"),
        data=DataConfig(path=str(tmp_path / "train.jsonl"), eval_fraction=0, max_length=96),
        train=TrainConfig(**values),
    )


def test_defaults_are_the_quality_studys_best_rates(tiny_llama_dir, tmp_path):
    """docs/quality.md: b at 3x the learning rate and DVoRA's m at 0.1x had the lowest held-out
    loss; a recipe that sets no scale trains at those rates."""
    defaults = TrainConfig()
    assert (defaults.lr_scale_d, defaults.lr_scale_b, defaults.lr_scale_m) == (1.0, 3.0, 0.1)
    config = recipe(tiny_llama_dir, tmp_path)
    for field in ("lr_scale_d", "lr_scale_b", "lr_scale_m"):
        setattr(config.train, field, getattr(defaults, field))
    trainer, _ = build_trainer(config, log=lambda _: None)
    lr_of = {id(p): group["lr"] for group in trainer.create_optimizer().param_groups for p in group["params"]}
    layer = next(iter(vera_layers(trainer.model).values()))
    assert [lr_of[id(getattr(layer, v))] for v in ("lambda_d", "lambda_b", "lambda_m")] == pytest.approx(
        [1e-3, 3e-3, 1e-4]
    )


@pytest.mark.parametrize("optimizer", ["auto", "adamw_torch", "paged_adamw_8bit"])
def test_each_vector_kind_gets_its_own_rate_in_the_optimizer_trainer_picks(tiny_llama_dir, tmp_path, optimizer):
    trainer, _ = build_trainer(recipe(tiny_llama_dir, tmp_path, optimizer=optimizer), log=lambda _: None)
    created = trainer.create_optimizer()
    if optimizer == "paged_adamw_8bit":
        assert isinstance(created, bnb.optim.optimizer.Optimizer8bit)
    if optimizer == "auto":  # one fused update for all the vectors, whatever the device
        assert isinstance(created, torch.optim.AdamW) and created.defaults["fused"]
    lr_of = {id(p): group["lr"] for group in created.param_groups for p in group["params"]}
    layers = vera_layers(trainer.model)
    assert len(lr_of) == 3 * len(layers)
    for layer in layers.values():
        for which, scale in SCALES.items():
            assert lr_of[id(getattr(layer, which))] == pytest.approx(1e-3 * scale)


def test_a_dvora_run_moves_each_vector_by_its_rate_and_saves_a_dvora_adapter(tiny_llama_dir, tmp_path):
    config = recipe(tiny_llama_dir, tmp_path, save_steps=1)
    trainer, _ = build_trainer(config, log=lambda _: None)
    with torch.no_grad():  # b = 0 leaves d without gradient; give b a value so every vector moves
        for layer in vera_layers(trainer.model).values():
            layer.lambda_b.normal_(0, 0.01)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    trainer.train()
    for which, scale in SCALES.items():
        moved = [(p.detach() - before[k]).abs() for k, p in trainer.model.named_parameters() if k.endswith(which)]
        steps = torch.cat(moved)
        # Adam's first step moves each entry by about its learning rate
        assert 0.5 * 1e-3 * scale < steps.max() <= 1.01 * 1e-3 * scale, which
    checkpoint = safetensors.torch.load_file(tmp_path / "run" / "checkpoint-1" / "vectors.safetensors")
    assert any(key.endswith(".lambda_m") for key in checkpoint)

    config.train.output_dir = str(tmp_path / "whole-run")
    result, _ = train(config, log=lambda _: None)  # the whole run, from recipe to adapter folder
    adapter = read_adapter(result.adapter_dir)
    assert adapter.config.format_version == 3 and adapter.config.method == "dvora"
