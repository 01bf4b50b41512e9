"""Supervised fine-tuning of VeRA vectors on a quantized base, through TRL's SFTTrainer.

What qvera changes in the trainer, and why:
- TRL casts the trainable parameters of quantized models to bf16 (right for QLoRA's
  matrices, wrong for VeRA: d = 0.1 rounds, and updates of d below bf16's resolution are
  lost). `VeraSFTTrainer` restores the fp32 vectors, values unchanged, after TRL's setup.
- d, b and DVoRA's m train at their own learning rates (`lr_scales`, multiples of the
  learning rate), one optimizer parameter group each, whatever optimizer Trainer picks.
- Checkpoints hold the vectors only (plus the optimizer, scheduler, RNG and trainer state
  that Trainer writes), never the 4-bit base; each appears by one rename, so a run killed at
  any moment (kill -9) resumes from its last complete checkpoint. A checkpoint that cannot be
  written (a full disk) stops the run with one line naming it, the cause and the last
  complete checkpoint, instead of torch's serializer traceback.
- Attention runs without cuDNN's kernels, which build a plan for each new sequence length
  (`qvera.core.attention_kernels`).
- The default optimizer is fused AdamW, also on a GPU: VeRA's optimizer state is a few MB, so
  paged 8-bit AdamW (QLoRA's choice for its large matrices) saves nothing worth its cost, one
  update per vector tensor (hundreds), about a fifth of a 7B step on an H200 (BENCHMARKS.md).
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import SFTConfig, SFTTrainer

from qvera.core.attach import (
    load_vector_state,
    vector_state,
)
from qvera.core.attention_kernels import without_cudnn_attention
from qvera.core.hardware import compute_dtype
from qvera.core.methods import METHODS
from qvera.training.recipe import SFTRecipe

CHECKPOINT_VECTORS = "vectors.safetensors"
AUTO_OPTIMIZER = "adamw_torch_fused"  # what `optimizer: auto` trains with (see the module docstring)
STAGING_DIR = ".staging"  # checkpoints are written here, then renamed into the output folder


class VeraSFTTrainer(SFTTrainer):
    """SFTTrainer for an adapter on a quantized base: VeRA attached by qvera (or a peft adapter)."""

    def __init__(self, model, *args, lr_scales: dict[str, float] | None = None, **kwargs):
        self.lr_scales = lr_scales or {}  # "lambda_d" / "lambda_b" / "lambda_m" -> multiple of the learning rate
        initial = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
        # Trainer refuses a quantized model without adapters it knows; VeRA's vectors are
        # the adapter here, as peft's would be.
        model._hf_peft_config_loaded = True
        super().__init__(model, *args, **kwargs)
        # Undo TRL's bf16 cast of trainable parameters of quantized models (see the module
        # docstring): the exact fp32 values come back; the optimizer does not exist yet, so
        # replacing the data is safe.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in initial:
                    param.data = initial[name].to(param.device)

    def train(self, *args, **kwargs):
        with without_cudnn_attention():
            return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with without_cudnn_attention():
            return super().evaluate(*args, **kwargs)

    def create_optimizer(self, model=None):
        """Trainer's optimizer class and settings (paged 8-bit AdamW included), with one parameter
        group per vector kind at learning_rate times its scale; the scheduler scales each group."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(self.vector_groups(opt_model), **optimizer_kwargs)
        return super().create_optimizer(model)

    def vector_groups(self, model) -> list[dict]:
        groups: dict[float, list] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                scale = self.lr_scales.get(name.rpartition(".")[2], 1.0)
                groups.setdefault(scale, []).append(param)
        return [
            {"params": params, "lr": self.args.learning_rate * scale, "weight_decay": self.args.weight_decay}
            for scale, params in groups.items()
        ]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints hold the vectors, never the (4-bit) base model."""
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        if state_dict is None:
            vectors = vector_state(self.accelerator.unwrap_model(self.model))
        else:  # FSDP / DeepSpeed gathered a full state dict for us
            suffixes = tuple({f".{name}" for method in METHODS.values() for name in method.vector_names()})
            vectors = {k: v.float().cpu() for k, v in state_dict.items() if k.endswith(suffixes)}
        safetensors.torch.save_file(
            {k: v.contiguous() for k, v in vectors.items()}, os.path.join(output_dir, CHECKPOINT_VECTORS)
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        vectors = safetensors.torch.load_file(os.path.join(resume_from_checkpoint, CHECKPOINT_VECTORS))
        load_vector_state(self.accelerator.unwrap_model(model or self.model), vectors)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written to a staging folder and renamed into place whole."""
        run_dir = self.args.output_dir
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIR)
        if self.args.should_save:
            shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)  # left by a killed run
        self.accelerator.wait_for_everyone()
        self.args.output_dir = staging_root  # Trainer names the checkpoint folder after it
        try:
            # Trainer's own method: TRL's override only adds a model card for a full model.
            Trainer._save_checkpoint(self, model, trial)
        except (OSError, RuntimeError, SafetensorError) as err:  # torch.save reports a full disk as RuntimeError
            if self.args.should_save:
                shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)
            last = last_checkpoint(run_dir)
            if last:
                then = f"the last complete checkpoint is {last}; free space, then run again with --resume"
            else:
                then = "no checkpoint was completed; free space, then run again with --overwrite"
            raise OSError(
                f"could not write checkpoint {os.path.join(run_dir, name)} ({write_failure(err)}); {then}"
            ) from err
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            os.rename(os.path.join(staging_root, name), os.path.join(run_dir, name))
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()


class LogLastStep(TrainerCallback):
    """Log the last step whatever logging_steps says: its loss is the run's final loss, and a
    run that stops between logging steps would otherwise report an older one."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


class ProgressWithThroughput(ProgressCallback):
    """Trainer's progress bar, with the latest loss and tokens/s on it instead of raw log dicts."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._last = (time.perf_counter(), None)

    def close(self) -> None:
        """End the bar's line, so that what follows (an error stopping the run) starts a line of its own."""
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "loss" in logs:
            now, tokens = time.perf_counter(), logs.get("num_tokens")
            last_time, last_tokens = self._last
            postfix = {"loss": f"{logs['loss']:.4f}"}
            if tokens is not None and last_tokens is not None and now > last_time:
                postfix["tok/s"] = f"{(tokens - last_tokens) / (now - last_time):.0f}"
            self._last = (now, tokens)
            self.training_bar.set_postfix(postfix)
        if "eval_loss" in logs:
            self.training_bar.write(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}")


def write_failure(err: BaseException) -> str:
    """The cause of a failed write in words: "no space left on device" for a full disk however it
    surfaced (OSError ENOSPC, torch's `inline_container.cc ... unexpected pos`, safetensors'
    StorageFull), else the error's own first line."""
    text = str(err).strip()
    full = ("no space left", "unexpected pos", "storagefull")
    if getattr(err, "errno", None) == errno.ENOSPC or any(s in text.lower() for s in full):
        return "no space left on device"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return text.splitlines()[0] if text else type(err).__name__


def checkpoint_step(folder: Path) -> int:
    """The optimizer step a `checkpoint-N` folder holds."""
    return int(folder.name.split("-")[-1])


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint; folders appear complete (by rename), so any found is whole."""
    folders = [p for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()]
    folders = [p for p in folders if (p / CHECKPOINT_VECTORS).is_file()]
    return max(folders, key=checkpoint_step, default=None)


def planned_steps(trainer: Trainer) -> int:
    """The optimizer steps the trainer's run ends at (max_steps, or the epochs' steps)."""
    return trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]


def trainer_arguments(recipe: SFTRecipe, has_eval: bool) -> SFTConfig:
    """TRL's settings. A run with an evaluation set evaluates the untrained model at step 0
    (not again when it resumes), so its loss curve starts from the base. On CUDA, autocast in
    the compute dtype, with loss scaling for fp16 (the vectors stay fp32, so the scaler can
    unscale their gradients); on a CPU no autocast: the model runs in the dtype load_base gave
    it (bf16, or fp32 where bf16 would be emulated)."""
    train, data = recipe.train, recipe.data
    cuda = torch.cuda.is_available()
    dtype = compute_dtype(recipe.model.compute_dtype)
    optimizer = train.optimizer
    if optimizer == "auto":
        optimizer = AUTO_OPTIMIZER
    evaluate = has_eval and train.eval_steps > 0
    return SFTConfig(
        output_dir=str(train.run_dir),
        learning_rate=train.learning_rate,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        warmup_steps=train.warmup_steps,
        lr_scheduler_type=train.lr_scheduler,
        weight_decay=train.weight_decay,
        optim=optimizer,
        activation_checkpointing=train.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=train.logging_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_on_start=has_eval and not train.resume,
        eval_steps=train.eval_steps if evaluate else None,
        save_strategy="steps" if train.save_steps > 0 else "no",
        save_steps=train.save_steps if train.save_steps > 0 else 500,
        save_total_limit=train.save_total_limit,
        seed=train.seed,
        bf16=cuda and dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
        use_cpu=not cuda,
        max_length=data.max_length,
        packing=data.packing,
        # The labels already mask everything but the assistant's turns (qvera.data).
        assistant_only_loss=False,
        completion_only_loss=False,
        report_to="none",
        # A and B are equal on every rank (same seed): broadcasting them each step is waste.
        ddp_broadcast_buffers=False,
        ddp_find_unused_parameters=False,
    )


def lr_scales(train) -> dict[str, float]:
    """TrainConfig's per-vector learning-rate multiples, keyed by parameter name."""
    return {"lambda_d": train.lr_scale_d, "lambda_b": train.lr_scale_b, "lambda_m": train.lr_scale_m}
