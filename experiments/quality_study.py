"""The VeRA-vs-LoRA quality study: one run = train one adapter, then score it on held-out data.

Both methods go through the same TRL SFTTrainer with the same rows, token budget, chat
rendering (qvera.data, loss on assistant tokens), AdamW, schedule and bf16 autocast; only the
adapter differs. Trainable parameters stay fp32 for both: TRL casts them to bf16 on quantized
models, where small AdamW updates to LoRA's A would round away and VeRA's vectors lose digits.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from trl import SFTConfig

from qvera.adapters.format import save_adapter
from qvera.adapters.loading import load_adapted
from qvera.core.attach import attach_vera
from qvera.core.base import load_base
from qvera.core.config import ModelConfig, VeraConfig
from qvera.training.data import split_held_out, tokenized_dataset
from qvera.training.evaluate import exact_match, heldout_loss, load_examples
from qvera.training.trainer import VeraSFTTrainer

DATA = Path(__file__).resolve().parents[1] / "data"
ALPACA = str(DATA / "alpaca_en_demo.json")
LIMA = str(DATA / "lima_eval50.json")  # the 50 LIMA rows seed 0 picks from its 1,029
METHODS = ("base", "vera", "lora")


@dataclass
class StudyRun:
    method: str  # base (no training), vera or lora
    rank: int = 0
    learning_rate: float = 0.0
    d_initial: float = 0.1  # VeRA only
    train_rows: int = 128  # of the 900 training rows; the full study uses 900
    max_length: int = 256
    batch_size: int = 4
    seed: int = 0
    model: str = "smollm2-135m"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method != "base" and (self.rank < 1 or self.learning_rate <= 0):
            raise ValueError(f"a {self.method} run needs --rank >= 1 and --lr > 0")

    @property
    def name(self) -> str:
        if self.method == "base":
            return "base"
        extra = f"-d{self.d_initial:g}" if self.method == "vera" and self.d_initial != 0.1 else ""
        return f"{self.method}-r{self.rank}-lr{self.learning_rate:g}{extra}-n{self.train_rows}"


def study_data(seed: int = 0, held_out: int = 100):
    """The fixed split: 900 Alpaca rows to train on, 100 held out; 50 LIMA rows never trained on."""
    train, alpaca_eval = split_held_out(load_examples(ALPACA), held_out, seed)
    return train, alpaca_eval, load_examples(LIMA)


def attach(model, run: StudyRun):
    if run.method == "vera":
        return attach_vera(model, VeraConfig(rank=run.rank, projection_seed=run.seed, d_initial=run.d_initial))
    # load_base has switched off bitsandbytes' CPU repacking, which would silently drop the
    # input gradients of the layers peft wraps after the first no-grad forward.
    return get_peft_model(model, LoraConfig(r=run.rank, lora_alpha=2 * run.rank, target_modules="all-linear"))


def train(model, tokenizer, run: StudyRun, train_convs) -> dict:
    dataset = tokenized_dataset(tokenizer, train_convs[: run.train_rows])
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            output_dir=scratch,
            num_train_epochs=1,
            per_device_train_batch_size=run.batch_size,
            learning_rate=run.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=0.03,  # a fraction of the steps
            weight_decay=0.0,
            optim="adamw_torch",
            max_length=run.max_length,
            bf16=True,
            use_cpu=not torch.cuda.is_available(),
            gradient_checkpointing=False,
            logging_steps=4,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=run.seed,
            data_seed=run.seed,
            dataloader_num_workers=0,
        )
        trainer = VeraSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"train_seconds": seconds, "steps": trainer.state.global_step, "train_loss_log": losses}


def save(model, run: StudyRun, folder: Path) -> int:
    """Write the adapter; return its size in bytes (the file a user would ship)."""
    if run.method == "lora":
        model.save_pretrained(str(folder))
        return sum(f.stat().st_size for f in folder.glob("adapter_model.safetensors"))
    save_adapter(model, folder)
    return (folder / "vectors.safetensors").stat().st_size


def reload(run: StudyRun, folder: Path):
    """The base with a saved adapter, its parameters trainable as in training, so the
    evaluation runs the same kernels as one right after training."""
    return load_adapted(ModelConfig(name=run.model), folder, is_trainable=True)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def run_one(run: StudyRun, out_dir: str | Path, eval_batch_size: int = 2) -> dict:
    """Train (unless base), evaluate, and write `<out_dir>/<name>/result.json`.

    The training record (`train.json`) and the adapter are written before the evaluation: a
    run whose evaluation was killed resumes from them instead of training again.
    """
    torch.manual_seed(run.seed)
    folder = Path(out_dir) / run.name
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "train.json"
    train_convs, alpaca_eval, lima_eval = study_data(run.seed)
    if run.method != "base" and record.is_file() and (folder / "adapter").is_dir():
        result = json.loads(record.read_text())
        model, tokenizer = reload(run, folder / "adapter")
    else:
        model, tokenizer = load_base(ModelConfig(name=run.model))
        result = {"run": asdict(run), "name": run.name, "trainable_params": 0, "adapter_bytes": 0, "train_seconds": 0.0}
        if run.method != "base":
            model = attach(model, run)
            result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            result.update(train(model, tokenizer, run, train_convs))
            result["adapter_bytes"] = save(model, run, folder / "adapter")
            write_json(record, result)
    start = time.perf_counter()
    # Small batches: evaluation keeps autograd on (see heldout_loss), and a LoRA model's graph
    # over 8 x 256 tokens took several GB.
    result["alpaca_heldout"] = heldout_loss(model, tokenizer, alpaca_eval, run.max_length, eval_batch_size)
    result["lima_heldout"] = heldout_loss(model, tokenizer, lima_eval, run.max_length, eval_batch_size)
    result["alpaca_short_answers"] = exact_match(model, tokenizer, alpaca_eval)
    result["eval_seconds"] = time.perf_counter() - start
    write_json(folder / "result.json", result)
    return result


def collect(runs_dir: str | Path) -> list[dict]:
    """Every finished run's result, base first, then by method, rank and learning rate."""
    results = [json.loads(f.read_text()) for f in sorted(Path(runs_dir).glob("*/result.json"))]
    if not results:
        raise FileNotFoundError(f"no results under {runs_dir}; run `scripts/quality_study.py run ...` first")
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(
        results,
        key=lambda r: (order[r["run"]["method"]], r["run"]["rank"], r["run"]["learning_rate"], r["run"]["d_initial"]),
    )


def best_per_rank(results: list[dict]) -> list[dict]:
    """For each (method, rank, d_initial), the learning rate with the lowest Alpaca held-out loss."""
    best: dict = {}
    for r in results:
        key = (r["run"]["method"], r["run"]["rank"], r["run"]["d_initial"])
        if key not in best or r["alpaca_heldout"]["loss"] < best[key]["alpaca_heldout"]["loss"]:
            best[key] = r
    return list(best.values())


def write_report(runs_dir: str | Path, json_path: str | Path, plot_path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = collect(runs_dir)
    tmp = Path(json_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, json_path)

    best = best_per_rank(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in (
        (axes[0], "alpaca_heldout", "Alpaca, 100 held-out rows"),
        (axes[1], "lima_heldout", "LIMA, 50 rows (never trained on)"),
    ):
        for r in results:
            if r["run"]["method"] == "base":
                ax.axhline(r[key]["loss"], color="gray", linestyle="--", label="base (no training)")
        for method, color in (("vera", "tab:blue"), ("lora", "tab:orange")):
            grid = [r for r in results if r["run"]["method"] == method]
            ax.scatter(
                [r["trainable_params"] for r in grid], [r[key]["loss"] for r in grid], color=color, alpha=0.25, s=18
            )
            line = sorted(
                (r for r in best if r["run"]["method"] == method and r["run"]["d_initial"] == 0.1),
                key=lambda r: r["trainable_params"],
            )
            ax.plot(
                [r["trainable_params"] for r in line],
                [r[key]["loss"] for r in line],
                "o-",
                color=color,
                label=f"{method} (best learning rate tried)",
            )
            for r in line:
                ax.annotate(
                    f"r={r['run']['rank']}",
                    (r["trainable_params"], r[key]["loss"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                )
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("held-out loss (nats per answer token)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct in NF4: VeRA vs LoRA (faint points: the other runs)", fontsize=10)
    fig.tight_layout()
    tmp = Path(plot_path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, plot_path)


def markdown_table(results: list[dict]) -> str:
    """One row per run, as docs/quality.md shows them."""
    lines = [
        "| run | trainable params | adapter bytes | train time (s) | "
        "Alpaca loss | Alpaca ppl | LIMA loss | short-answer exact match |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        short = r["alpaca_short_answers"]
        match = (
            "-"
            if short["exact_match"] is None
            else f"{round(short['exact_match'] * short['examples'])}/{short['examples']}"
        )
        lines.append(
            f"| {r['name']} | {r['trainable_params']:,} | {r['adapter_bytes']:,} | {r['train_seconds']:.0f} | "
            f"{r['alpaca_heldout']['loss']:.4f} | {r['alpaca_heldout']['perplexity']:.2f} "
            f"| {r['lima_heldout']['loss']:.4f} | {match} |"
        )
    return "\n".join(lines)
