"""One fine-tuning run, end to end: check the recipe, the data and the output folder (cheap,
before any model loads), build the trainer, train, then write the adapter, the loss curve and
a summary. A start that fails removes the output folder if it created it."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.trainer_callback import ProgressCallback

from qvera.adapters.format import save_adapter
from qvera.adapters.peft_interop import export_peft
from qvera.core.attach import (
    attach_vera,
    trainable_summary,
)
from qvera.core.base import load_base, resolve_model_path
from qvera.core.hardware import compute_dtype
from qvera.training.data import (
    load_conversations,
    tokenized_dataset,
)
from qvera.training.recipe import SFTRecipe, check_recipe
from qvera.training.trainer import (
    STAGING_DIR,
    LogLastStep,
    ProgressWithThroughput,
    VeraSFTTrainer,
    checkpoint_step,
    last_checkpoint,
    lr_scales,
    trainer_arguments,
)

ADAPTER_DIR = "adapter"
PEFT_DIR = "peft"
LOSS_PLOT = "loss.png"


def first_missing_folder(folder: str | Path) -> Path | None:
    """The outermost folder that creating `folder` would create (None if it exists): what a
    failed start removes again."""
    missing = None
    for path in (Path(folder).absolute(), *Path(folder).absolute().parents):
        if path.exists():
            return missing
        missing = path
    return missing


def remove_created(folder: str | Path, created: Path) -> None:
    """Undo a failed start: the output folder (new, so all in it is this run's), then the
    parents it needed up to `created`, each only while empty."""
    folder = Path(folder).absolute()
    shutil.rmtree(folder, ignore_errors=True)
    for parent in folder.parents:
        if not parent.is_relative_to(created):
            return
        try:
            parent.rmdir()
        except OSError:  # something else appeared in it meanwhile: not ours to remove
            return


def prepare_output_dir(output_dir: str | Path, resume: bool) -> Path | None:
    """Check the folder fits the request and is writable (creating it only then); return the
    checkpoint to resume."""
    folder = Path(output_dir)
    checkpoint = last_checkpoint(folder) if folder.is_dir() else None
    if resume and checkpoint is None:
        raise FileNotFoundError(f"no checkpoint to resume in {folder}; run without --resume to start afresh")
    if not resume and checkpoint is not None:
        raise ValueError(
            f"{folder} already holds checkpoints ({checkpoint.name}); "
            "pass --resume to continue, or choose another --output-dir"
        )
    created = first_missing_folder(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as err:
        if created is not None:
            remove_created(folder, created)
        raise PermissionError(
            f"output folder {folder} is not writable ({err.strerror}); choose another --output-dir"
        ) from err
    return checkpoint


@dataclass
class SFTResult:
    """What a run did: where it wrote, how long, how fast, and its last losses."""

    output_dir: Path
    adapter_dir: Path | None
    steps: int
    seconds: float
    tokens: int
    trainable_parameters: int
    adapter_bytes: int
    train_loss: float | None
    eval_loss: float | None
    log_history: list[dict]

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else float("nan")
        fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        lines = [
            f"steps               {self.steps}",
            f"time                {self.seconds:.0f} s",
            f"tokens/s            {rate:.0f} ({self.tokens:,} tokens)",
            f"trainable params    {self.trainable_parameters:,}",
            f"adapter size        {self.adapter_bytes / 1e6:.2f} MB",
            f"final train loss    {fmt(self.train_loss)}",
            f"final eval loss     {fmt(self.eval_loss)}",
            f"adapter             {self.adapter_dir}",
        ]
        return "\n".join(lines)


def build_trainer(recipe: SFTRecipe, log=print):
    """Validate everything cheap first (the recipe, where the base comes from, the data, the
    compute dtype, the output folder), then load the model; a start that fails removes the
    output folder if it created it."""
    check_recipe(recipe)
    resolve_model_path(recipe.model.name)  # a base that cannot load fails before the data is read
    train_convs, eval_convs = load_conversations(recipe.data, recipe.train.seed)
    compute_dtype(recipe.model.compute_dtype)  # an impossible dtype fails here, before any loading
    created = first_missing_folder(recipe.train.output_dir)
    checkpoint = prepare_output_dir(recipe.train.output_dir, recipe.train.resume)
    try:
        trainer = _trainer(recipe, train_convs, eval_convs, log)
    except BaseException:
        if created is not None:
            remove_created(recipe.train.output_dir, created)
        raise
    return trainer, checkpoint


def _trainer(recipe: SFTRecipe, train_convs: list, eval_convs: list, log) -> VeraSFTTrainer:
    log(f"data: {len(train_convs)} training and {len(eval_convs)} evaluation examples")
    model, tokenizer = load_base(recipe.model)
    attach_vera(model, recipe.vera)
    log(trainable_summary(model))
    train_ds = tokenized_dataset(tokenizer, train_convs, recipe.data.assistant_only_loss)
    eval_ds = tokenized_dataset(tokenizer, eval_convs, recipe.data.assistant_only_loss) if eval_convs else None
    trainer = VeraSFTTrainer(
        model=model,
        args=trainer_arguments(recipe, eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        lr_scales=lr_scales(recipe.train),
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressWithThroughput())
    trainer.add_callback(LogLastStep())
    return trainer


def train(recipe: SFTRecipe, log=print) -> tuple[SFTResult, VeraSFTTrainer]:
    """Run the recipe; write the adapter, the loss curve and the summary into output_dir."""
    trainer, checkpoint = build_trainer(recipe, log)
    if checkpoint is not None:
        log(f"resuming from {checkpoint}")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - start
    eval_loss = trainer.evaluate()["eval_loss"] if trainer.eval_dataset is not None else None

    output_dir = Path(recipe.train.output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    history = trainer.state.log_history
    adapter_dir, adapter_bytes = None, 0
    if trainer.is_world_process_zero():
        adapter_dir = save_adapter(model, output_dir / ADAPTER_DIR, dtype=torch.float32)
        adapter_bytes = sum(f.stat().st_size for f in adapter_dir.iterdir())
        if recipe.train.export_peft:
            export_peft(model, output_dir / PEFT_DIR)
        plot_losses(history, output_dir / LOSS_PLOT)
        shutil.rmtree(output_dir / STAGING_DIR, ignore_errors=True)
    train_losses = [h["loss"] for h in history if "loss" in h]
    # Tokens trained by this run. A resumed run's history starts with the checkpoint's entries,
    # and TRL counts num_tokens from zero in every process: this run's are the entries after it.
    start_step = checkpoint_step(checkpoint) if checkpoint else 0
    tokens = max((h.get("num_tokens", 0) for h in history if h.get("step", 0) > start_step), default=0)
    result = SFTResult(
        output_dir=output_dir,
        adapter_dir=adapter_dir,
        steps=trainer.state.global_step,
        seconds=seconds,
        tokens=int(tokens),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        adapter_bytes=adapter_bytes,
        train_loss=train_losses[-1] if train_losses else None,
        eval_loss=eval_loss,
        log_history=history,
    )
    return result, trainer


def plot_losses(history: list[dict], path: Path) -> None:
    """Train and eval loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h and math.isfinite(h["loss"])]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
