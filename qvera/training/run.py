"""One fine-tuning run, end to end: check the recipe, the data and the output folder (cheap,
before any model loads), build the trainer, train, then write the adapter, the loss curve and
a summary. A start that fails removes the output folder if it created it.

A run never writes into a folder that holds another run unless asked: `resume` continues it
(a run that had reached its last step trains nothing more), `overwrite` replaces it. A final
adapter that cannot be written (a full disk) is written to a fallback folder instead, named in
the one-line error, so the trained vectors are not lost.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.trainer_callback import ProgressCallback, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from qvera.adapters.format import save_adapter
from qvera.adapters.peft_interop import export_peft
from qvera.core.attach import (
    attach_vera,
    trainable_summary,
)
from qvera.core.base import cache_dir, load_base, resolve_model_path
from qvera.core.hardware import compute_dtype
from qvera.training.data import load_conversations, replay_shape, tokenized_dataset
from qvera.training.recipe import SFTRecipe, TrainConfig, check_recipe
from qvera.training.replay import replay_conversations
from qvera.training.trainer import (
    STAGING_DIR,
    LogLastStep,
    ProgressWithThroughput,
    VeraSFTTrainer,
    checkpoint_step,
    last_checkpoint,
    lr_scales,
    planned_steps,
    trainer_arguments,
    write_failure,
)

ADAPTER_DIR = "adapter"
PEFT_DIR = "peft"
LOSS_PLOT = "loss.png"
LOSS_DATA = "losses.json"  # the curves loss.png draws, as numbers
RUN_OUTPUTS = (ADAPTER_DIR, PEFT_DIR, LOSS_PLOT, LOSS_DATA, STAGING_DIR)  # besides the checkpoints


def run_outputs(folder: Path) -> list[Path]:
    """What runs have written into `folder` (checkpoints, adapter, loss curve, ...); nothing else
    in it is a run's."""
    if not folder.is_dir():
        return []
    named = [folder / name for name in RUN_OUTPUTS if (folder / name).exists()]
    return named + sorted(folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"))


def check_output_dir(train: TrainConfig) -> None:
    """Refuse, in one line naming the folder and the flags, to write into a folder that holds a
    run unless resume or overwrite says what to do with it; touches nothing."""
    folder = train.run_dir
    found = run_outputs(folder)
    if train.resume:
        if last_checkpoint(folder) is not None:
            return
        if (folder / ADAPTER_DIR).is_dir():
            raise ValueError(
                f"{folder} holds a finished run and no checkpoint to continue from: nothing to resume, its "
                "adapter is left as it is; pass --overwrite instead of --resume to train it afresh"
            )
        raise FileNotFoundError(f"no checkpoint to resume in {folder}; run without --resume to start afresh")
    if found and not train.overwrite:
        names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise ValueError(
            f"{folder} already holds a run ({names}); pass --resume to continue it or --overwrite to replace "
            "it, or choose another --run-name"
        )


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


def prepare_output_dir(train: TrainConfig) -> Path | None:
    """Check the folder (that check_output_dir passed) is writable, creating it only then, and
    remove the old run's outputs for `overwrite`; return the checkpoint to resume."""
    folder = train.run_dir
    if train.overwrite:
        for path in run_outputs(folder):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    checkpoint = last_checkpoint(folder) if train.resume else None
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
    run_name: str
    steps: int
    seconds: float
    tokens: int
    trainable_parameters: int
    adapter_bytes: int
    train_loss: float | None
    eval_loss: float | None
    log_history: list[dict]
    trained: bool = True  # False: a resumed run had already reached its last step

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else float("nan")
        fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        lines = [] if self.trained else [f"nothing left to train: {self.output_dir} had reached step {self.steps}"]
        lines += [
            f"steps               {self.steps}",
            f"time                {self.seconds:.0f} s",
            f"tokens/s            {rate:.0f} ({self.tokens:,} tokens)",
            f"trainable params    {self.trainable_parameters:,}",
            f"adapter size        {self.adapter_bytes / 1e6:.2f} MB",
            f"final train loss    {fmt(self.train_loss)}",
            f"final eval loss     {fmt(self.eval_loss)}",
            f"adapter             {self.adapter_dir}",
            f"loss curve          {self.output_dir / LOSS_PLOT}",
        ]
        return "\n".join(lines)


def build_trainer(recipe: SFTRecipe, log=print):
    """Validate everything cheap first (the recipe, where the base comes from, the data, the
    compute dtype, the output folder), then load the model; a start that fails removes the
    output folder if it created it."""
    check_recipe(recipe)
    if not recipe.data.path:  # a recipe may leave the data to the command line
        raise ValueError(
            "no training data: pass --data with a .json, .jsonl or .parquet file or a hub data set "
            "(docs/your-data.md), or --config configs/demo.yaml for the demo"
        )
    check_output_dir(recipe.train)
    resolve_model_path(recipe.model.name)  # a base that cannot load fails before the data is read
    train_convs, eval_convs = load_conversations(recipe.data, recipe.train.seed)
    compute_dtype(recipe.model.compute_dtype)  # an impossible dtype fails here, before any loading
    created = first_missing_folder(recipe.train.run_dir)
    checkpoint = prepare_output_dir(recipe.train)
    try:
        trainer = _trainer(recipe, train_convs, eval_convs, log)
    except BaseException:
        if created is not None:
            remove_created(recipe.train.run_dir, created)
        raise
    return trainer, checkpoint


def _trainer(recipe: SFTRecipe, train_convs: list, eval_convs: list, log) -> VeraSFTTrainer:
    log(f"data: {len(train_convs)} training and {len(eval_convs)} evaluation examples")
    model, tokenizer = load_base(recipe.model)
    if recipe.data.replay:
        replayed = replay_conversations(model, tokenizer, recipe.data.replay, replay_shape(recipe.data))
        log(f"replay: the base model's own answers to {len(replayed)} general questions join the training data")
        train_convs = train_convs + replayed
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
    """Run the recipe; write the adapter, the loss curve and the summary into the run's folder.

    Resuming a run whose last checkpoint is its last step trains nothing: its adapter is left
    as it is, or written from that checkpoint if the run stopped before writing it.
    """
    trainer, checkpoint = build_trainer(recipe, log)
    output_dir = recipe.train.run_dir
    start_step = checkpoint_step(checkpoint) if checkpoint else 0
    trained = checkpoint is None or start_step < planned_steps(trainer)
    start = time.perf_counter()
    if trained:
        if checkpoint is not None:
            log(f"resuming from {checkpoint}")
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except BaseException:
            next(c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressWithThroughput)).close()
            raise
    else:  # Trainer would run one step past the end before it checks
        trainer._load_from_checkpoint(str(checkpoint))
        trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    seconds = time.perf_counter() - start
    eval_loss = trainer.evaluate()["eval_loss"] if trained and trainer.eval_dataset is not None else None

    model = trainer.accelerator.unwrap_model(trainer.model)
    history = trainer.state.log_history
    adapter_dir = output_dir / ADAPTER_DIR
    if trainer.is_world_process_zero() and (trained or not adapter_dir.is_dir()):
        save_adapter_or_rescue(model, adapter_dir, recipe.train.run_name)
        try:
            if recipe.train.export_peft:
                export_peft(model, output_dir / PEFT_DIR)
            plot_losses(history, output_dir / LOSS_PLOT, recipe.train.run_name)
        except OSError as err:
            raise OSError(f"the adapter is saved in {adapter_dir}, but {err}") from err
        shutil.rmtree(output_dir / STAGING_DIR, ignore_errors=True)
    train_losses = [h["loss"] for h in history if "loss" in h]
    # Tokens trained by this run. A resumed run's history starts with the checkpoint's entries,
    # and TRL counts num_tokens from zero in every process: this run's are the entries after it.
    tokens = max((h.get("num_tokens", 0) for h in history if h.get("step", 0) > start_step), default=0)
    result = SFTResult(
        output_dir=output_dir,
        adapter_dir=adapter_dir if trainer.is_world_process_zero() else None,
        run_name=recipe.train.run_name,
        steps=trainer.state.global_step,
        seconds=seconds,
        tokens=int(tokens),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        adapter_bytes=sum(f.stat().st_size for f in adapter_dir.iterdir()) if adapter_dir.is_dir() else 0,
        train_loss=train_losses[-1] if train_losses else None,
        eval_loss=eval_loss,
        log_history=history,
        trained=trained,
    )
    return result, trainer


def rescue_folders(run_name: str) -> list[Path]:
    """Where a final adapter goes when its own folder cannot be written: the system's temporary
    folder, then qvera's cache (often another disk)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return [
        Path(tempfile.gettempdir()) / "qvera-rescued" / f"{run_name}-{stamp}",
        cache_dir() / "rescued" / f"{run_name}-{stamp}",
    ]


def save_adapter_or_rescue(model, folder: Path, run_name: str) -> Path:
    """save_adapter; when that fails (a full disk), the same vectors (a few MB) in the first
    rescue folder that takes them, then OSError in one line naming both folders, or the last
    complete checkpoint when no folder took them."""
    try:
        return save_adapter(model, folder, dtype=torch.float32)
    except OSError as err:
        cause = write_failure(err)
        for rescue in rescue_folders(run_name):
            try:
                save_adapter(model, rescue, dtype=torch.float32)
            except OSError:
                continue
            raise OSError(
                f"could not write the adapter to {folder} ({cause}); the trained vectors are saved in {rescue} "
                f"instead: move that folder to {folder} once there is space"
            ) from err
        checkpoint = last_checkpoint(folder.parent)
        kept = f"the last complete checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written"
        raise OSError(f"could not write the adapter to {folder} ({cause}), nor to a rescue folder; {kept}") from err


def loss_curves(history: list[dict], run_name: str) -> dict:
    """What loss.png draws: the title, and (step, loss) pairs for training and evaluation, the
    evaluation from step 0 (the untrained model) when the run had an evaluation set."""
    evals = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}  # the final one repeats the last step's
    return {
        "title": f"{run_name}: loss by optimizer step",
        "train": [[h["step"], h["loss"]] for h in history if "loss" in h and math.isfinite(h["loss"])],
        "eval": [[step, loss] for step, loss in evals.items()],
    }


def plot_losses(history: list[dict], path: Path, run_name: str) -> None:
    """Train and eval loss against the step, as a PNG titled with the run's name, and the same
    curves as numbers beside it (LOSS_DATA); raises OSError naming the file that failed."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    curves = loss_curves(history, run_name)
    fig, ax = plt.subplots(figsize=(6, 4))
    if curves["train"]:
        ax.plot(*zip(*curves["train"]), label="train")
    if curves["eval"]:
        ax.plot(*zip(*curves["eval"]), "o-", label="eval")
    ax.set_title(curves["title"])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    writes = (
        (path, lambda tmp: fig.savefig(tmp, dpi=100, format="png")),
        (path.with_name(LOSS_DATA), lambda tmp: tmp.write_text(json.dumps(curves, indent=1))),
    )
    try:
        for target, write in writes:
            tmp = target.with_name(f".{target.name}.tmp")
            try:
                write(tmp)
                os.replace(tmp, target)
            except OSError as err:
                tmp.unlink(missing_ok=True)
                raise OSError(f"{target} could not be written ({write_failure(err)})") from err
    finally:
        plt.close(fig)
