"""Training through SFTTrainer on a tiny 4-bit Llama: fp32 vectors, evaluation that does not
disturb gradients, vector-only checkpoints, resume, two processes, early errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from qvera import ModelConfig, VeraConfig, attach_vera, load_base
from qvera.core.attach import vera_layers
from qvera.training.data import DataError
from qvera.training.recipe import DataConfig, SFTRecipe, TrainConfig, recipe_to_dict
from qvera.training.run import build_trainer, train
from qvera.training.trainer import CHECKPOINT_VECTORS, last_checkpoint, trainer_arguments

ROOT = Path(__file__).resolve().parents[2]


def write_data(folder: Path, n: int = 32) -> str:
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say {words[i % 8]} {i}."},
                {"role": "assistant", "content": f"{words[i % 8]} {i} done"},
            ]
        }
        for i in range(n)
    ]
    path = folder / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def tiny_recipe(model_dir, tmp_path, **train) -> SFTRecipe:
    tmp_path.mkdir(parents=True, exist_ok=True)
    values = dict(
        output_dir=str(tmp_path / "run"),
        learning_rate=1e-2,
        max_steps=4,
        batch_size=4,
        logging_steps=1,
        eval_steps=2,
        save_steps=2,
        warmup_steps=0,
        seed=0,
        gradient_checkpointing=False,
    )
    values.update(train)
    return SFTRecipe(
        model=ModelConfig(name=model_dir, quantization="nf4"),
        vera=VeraConfig(rank=16),
        data=DataConfig(path=write_data(tmp_path), eval_fraction=0.125, max_length=64),
        train=TrainConfig(**values),
    )


def quiet(log):
    return None


def vectors(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in vera_layers(model).items():
        out[f"{name}.lambda_d"], out[f"{name}.lambda_b"] = layer.lambda_d, layer.lambda_b
    return out


def test_trainer_keeps_the_vectors_fp32_and_their_small_updates(tiny_llama_dir, tmp_path):
    """TRL casts trainable parameters of 4-bit models to bf16, which rounds d = 0.1 and drops
    updates below bf16's resolution (~5e-4 near 0.1). The trainer must undo that."""
    recipe = tiny_recipe(
        tiny_llama_dir,
        tmp_path,
        learning_rate=1e-5,
        max_steps=1,
        eval_steps=0,
        save_steps=0,
        gradient_checkpointing=True,
    )
    trainer, _ = build_trainer(recipe, log=quiet)
    model = trainer.model
    assert model.is_loaded_in_4bit
    for name, value in vectors(model).items():
        assert value.dtype == torch.float32, name
        expected = 0.1 if name.endswith("lambda_d") else 0.0
        assert torch.equal(value, torch.full_like(value, expected)), f"{name} changed while the trainer was built"
    # b = 0 leaves d without gradient; give b a value so both vectors move in one step.
    with torch.no_grad():
        for layer in vera_layers(model).values():
            layer.lambda_b.normal_(0, 0.01)
    trainer.train()
    assert model.is_activation_checkpointing
    d = torch.cat([layer.lambda_d.detach() for layer in vera_layers(model).values()])
    step = (d - 0.1).abs()
    assert d.dtype == torch.float32
    assert step.max() > 5e-6 and step.max() < 2e-5, "a 1e-5 Adam step must move d by about 1e-5"


def test_training_and_evaluation_run_attention_without_cudnn(tiny_llama_dir, tmp_path, cudnn_attention_default):
    """cuDNN's attention builds a plan for each new sequence length (qvera.core.attention_kernels)."""
    trainer, _ = build_trainer(tiny_recipe(tiny_llama_dir, tmp_path, max_steps=2, save_steps=0), log=quiet)
    seen = []
    trainer.model.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    trainer.train()
    trainer.evaluate()
    assert len(seen) >= 3 and not any(seen)  # two training steps, an evaluation each step and one more
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_an_evaluation_pass_leaves_training_gradients_unchanged(tiny_llama_dir):
    """bitsandbytes would repack 4-bit CPU weights in place at the first no-grad eval forward
    (lossy, and without autograd); periodic evaluation must leave training's gradients as
    they were."""
    model, tokenizer = load_base(ModelConfig(name=tiny_llama_dir, quantization="nf4"))
    attach_vera(model, VeraConfig(rank=16))
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in vera_layers(model).values():
            layer.lambda_b.normal_(0, 0.1)
    batch = torch.randint(0, 1000, (2, 12))

    def grads():
        model.train()
        model.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        return {k: v.grad.clone() for k, v in vectors(model).items()}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=batch)
    after = grads()
    assert not any(
        getattr(m.base_layer.weight.quant_state, "packing_format_for_cpu", False) for m in vera_layers(model).values()
    )
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(g.abs().sum() > 0 for k, g in after.items() if k.endswith("lambda_d"))


def train_losses(history):
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_a_run_killed_with_sigkill_resumes_to_the_same_loss_curve(tiny_llama_dir, tmp_path):
    full, _ = train(tiny_recipe(tiny_llama_dir, tmp_path / "a"), log=quiet)

    killed = tiny_recipe(tiny_llama_dir, tmp_path / "b")
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe_to_dict(killed)))
    run = Path(killed.train.output_dir)
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "sft.py"), "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (run / "checkpoint-2").exists():
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.kill()  # SIGKILL: no handler, no cleanup
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    process.stderr.close()

    checkpoint = last_checkpoint(run)
    files = {p.name for p in checkpoint.iterdir()}
    assert CHECKPOINT_VECTORS in files and "trainer_state.json" in files and "optimizer.pt" in files
    assert not any(name.startswith(("model", "pytorch_model", "adapter_model")) for name in files), files
    saved = safetensors.torch.load_file(checkpoint / CHECKPOINT_VECTORS)
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert sum(p.stat().st_size for p in checkpoint.iterdir()) < 1_000_000

    with pytest.raises(ValueError, match="already holds a run .* pass --resume to continue it or --overwrite"):
        build_trainer(killed, log=quiet)
    resumed, _ = train(replace(killed, train=replace(killed.train, resume=True)), log=quiet)
    expected, got = train_losses(full.log_history), train_losses(resumed.log_history)
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}"
    assert resumed.eval_loss == pytest.approx(full.eval_loss, rel=1e-5)
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "adapter" / "vectors.safetensors").is_file()


def test_bad_setups_fail_before_the_model_loads(tiny_llama_dir, tmp_path, monkeypatch):
    recipe = tiny_recipe(tiny_llama_dir, tmp_path)
    import qvera.training.run

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(qvera.training.run, "load_base", no_model)
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl row 1: missing 'completion'"):
        build_trainer(replace(recipe, data=replace(recipe.data, path=str(bad_rows), format="prompt-completion")))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=f"output folder {blocker / 'run'} is not writable \\({blocker} is a file\\)"):
        build_trainer(replace(recipe, train=replace(recipe.train, output_dir=str(blocker / "run"))))
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        build_trainer(replace(recipe, train=replace(recipe.train, resume=True)))
    with pytest.raises(ValueError, match="vera.rank must be at least 1, got 0"):
        build_trainer(replace(recipe, vera=replace(recipe.vera, rank=0)))
    assert not (tmp_path / "run").exists()  # no failed start left a folder behind
    monkeypatch.setattr(qvera.training.run, "load_conversations", no_model)  # nor the data read
    nested = replace(recipe.train, output_dir=str(tmp_path / "runs" / "run"))
    with pytest.raises(FileNotFoundError, match="cannot load model"):
        build_trainer(replace(recipe, model=replace(recipe.model, name=str(tmp_path / "no-model")), train=nested))
    assert not (tmp_path / "runs").exists()
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"cannot load model .*: the folder {tmp_path / 'empty'} has no config"):
        build_trainer(replace(recipe, model=replace(recipe.model, name=str(tmp_path / "empty")), train=nested))
    assert not (tmp_path / "runs").exists()
    (tmp_path / "mine").mkdir()
    nested = replace(recipe.train, output_dir=str(tmp_path / "mine" / "run"))
    monkeypatch.setattr(qvera.training.run, "attach_vera", lambda *a: sys.exit("interrupted after the load"))
    with pytest.raises(SystemExit):
        build_trainer(replace(recipe, train=nested), log=quiet)
    assert (tmp_path / "mine").is_dir() and not (tmp_path / "mine" / "run").exists()  # only what it created


def test_cpu_defaults_pick_fused_adamw_and_no_bf16_autocast(tiny_llama_dir, tmp_path):
    args = trainer_arguments(tiny_recipe(tiny_llama_dir, tmp_path), has_eval=True)
    assert args.optim == "adamw_torch_fused" and not args.bf16 and args.use_cpu
    assert args.eval_strategy == "steps" and args.ddp_broadcast_buffers is False


WORKER = """
import sys, torch, safetensors.torch
sys.path.insert(0, {root!r})
from qvera.core.attach import vector_state
from qvera.training.run import train
import pickle
recipe = pickle.load(open({recipe!r}, "rb"))
result, trainer = train(recipe, log=lambda *a: None)
rank = torch.distributed.get_rank()
vectors = vector_state(trainer.accelerator.unwrap_model(trainer.model))
safetensors.torch.save_file(vectors, f"{out}/rank{{rank}}.safetensors")
"""


def test_two_processes_with_gloo_end_with_identical_vectors(tiny_llama_dir, tmp_path):
    import pickle

    recipe = tiny_recipe(tiny_llama_dir, tmp_path, max_steps=3, batch_size=2, eval_steps=0, save_steps=0)
    (tmp_path / "recipe.pkl").write_bytes(pickle.dumps(recipe))
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), recipe=str(tmp_path / "recipe.pkl"), out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = safetensors.torch.load_file(tmp_path / "rank0.safetensors")
    rank1 = safetensors.torch.load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any((v != 0).any() for k, v in rank0.items() if k.endswith("lambda_b")), "the vectors did not train"


def test_packing_puts_several_examples_in_each_sequence(tiny_llama_dir, tmp_path):
    recipe = tiny_recipe(tiny_llama_dir, tmp_path, max_steps=1, eval_steps=0, save_steps=0)
    recipe = replace(recipe, data=replace(recipe.data, packing=True, max_length=128))
    result, trainer = train(recipe, log=quiet)
    rows = trainer.train_dataset
    assert len(rows) < 28 and max(len(r["seq_lengths"]) for r in rows) > 1
    assert all(len(r["input_ids"]) <= 128 for r in rows)
    assert result.steps == 1 and result.train_loss is not None


def test_the_summary_has_the_last_steps_loss_and_only_this_runs_tokens(tiny_llama_dir, tmp_path):
    """The last step is logged whatever logging_steps says (its loss is the run's final loss),
    and a resumed run's tokens/s counts only the tokens it trained itself."""
    recipe = tiny_recipe(tiny_llama_dir, tmp_path, max_steps=3, logging_steps=2, save_steps=3, eval_steps=0)
    first, _ = train(recipe, log=quiet)
    assert [h["step"] for h in first.log_history if "loss" in h] == [2, 3]
    assert first.train_loss == [h["loss"] for h in first.log_history if "loss" in h][-1]
    resumed, _ = train(replace(recipe, train=replace(recipe.train, max_steps=5, resume=True)), log=quiet)
    assert [h["step"] for h in resumed.log_history if "loss" in h] == [2, 3, 4, 5]
    tokens = {h["step"]: h["num_tokens"] for h in resumed.log_history if "num_tokens" in h}
    assert first.tokens == tokens[3]
    assert 0 < resumed.tokens == tokens[5] < tokens[3]  # TRL restarts the count: 2 steps against 3
