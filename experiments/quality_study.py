"""The VeRA-vs-LoRA quality study: one run = train one adapter, then score it on held-out data.

Methods: VeRA and DVoRA (qvera), LoRA and DoRA (peft). All go through the same TRL
SFTTrainer with the same rows, token budget, chat rendering (qvera.data, loss on assistant
tokens), AdamW, schedule and bf16 autocast; only the adapter differs.

Beside the gain on the task (Alpaca held-out loss), each run measures what it costs off the
task: greedy answers to the `study` split of the general-knowledge questions
(data/general_knowledge.json, whole-word scoring as the demo's) and the loss of their short
reference answers, against the base's. Trainable parameters
stay fp32 for all: TRL casts them to bf16 on quantized models, where small AdamW updates to
LoRA's A would round away and VeRA's vectors lose digits.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback
from trl import SFTConfig

from qvera.adapters.format import save_adapter
from qvera.adapters.loading import load_adapted
from qvera.core.attach import attach_vera
from qvera.core.base import load_base
from qvera.core.config import ModelConfig, VeraConfig
from qvera.generation.decode import greedy_replies
from qvera.training.data import split_held_out, tokenized_dataset
from qvera.training.demo import Question, general_questions
from qvera.training.evaluate import heldout_loss, load_examples
from qvera.training.trainer import VeraSFTTrainer

DATA = Path(__file__).resolve().parents[1] / "data"
ALPACA = str(DATA / "alpaca_en_demo.json")
LIMA = str(DATA / "lima_eval50.json")  # the 50 LIMA rows seed 0 picks from its 1,029
METHODS = ("base", "vera", "dvora", "lora", "dora")
QVERA_METHODS = ("vera", "dvora")
SPLIT_SEED = 0  # every run, whatever its seed, trains and is scored on the same rows


@dataclass
class StudyRun:
    method: str  # base (no training), vera, dvora, lora or dora
    rank: int = 0
    learning_rate: float = 0.0
    d_initial: float = 0.1  # VeRA and DVoRA only
    lr_scale_d: float = 1.0  # VeRA's vectors' learning rates, as multiples of learning_rate
    lr_scale_b: float = 1.0
    lr_scale_m: float = 1.0  # DVoRA only
    train_rows: int = 128  # of the 900 training rows; the full study uses 900
    epochs: int = 1
    curve_every: int = 0  # also score the Alpaca held-out loss every N steps while training (0: at the end only)
    max_length: int = 256
    batch_size: int = 4
    seed: int = 0  # projections (VeRA) or initial A (LoRA), and the order of the training rows
    model: str = "smollm2-135m"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method != "base" and (self.rank < 1 or self.learning_rate <= 0):
            raise ValueError(f"a {self.method} run needs --rank >= 1 and --lr > 0")
        scales = (self.lr_scale_d, self.lr_scale_b, self.lr_scale_m)
        if self.method not in QVERA_METHODS and (scales != (1.0, 1.0, 1.0) or self.d_initial != 0.1):
            raise ValueError(f"d_initial and the lr scales are VeRA's settings; a {self.method} run takes neither")
        if self.method == "vera" and self.lr_scale_m != 1.0:
            raise ValueError("lr_scale_m is DVoRA's magnitude learning rate; a vera run has no magnitudes")

    @property
    def name(self) -> str:
        if self.method == "base":
            return "base"
        extra = ""
        for label, value, default in (
            ("d", self.d_initial, 0.1),
            ("sd", self.lr_scale_d, 1.0),
            ("sb", self.lr_scale_b, 1.0),
            ("sm", self.lr_scale_m, 1.0),
        ):
            extra += f"-{label}{value:g}" if value != default else ""
        seed = f"-s{self.seed}" if self.seed else ""
        epochs = f"-e{self.epochs}" if self.epochs != 1 else ""
        return f"{self.method}-r{self.rank}-lr{self.learning_rate:g}{extra}-n{self.train_rows}{epochs}{seed}"

    @property
    def setting(self) -> tuple:
        """Everything but the seed: the runs a table row averages over."""
        return (
            self.method,
            self.rank,
            self.learning_rate,
            self.d_initial,
            self.lr_scale_d,
            self.lr_scale_b,
            self.lr_scale_m,
            self.train_rows,
            self.epochs,
            self.max_length,
            self.batch_size,
            self.model,
        )


def study_data(held_out: int = 100):
    """The fixed split: 900 Alpaca rows to train on, 100 held out; 50 LIMA rows never trained on."""
    train, alpaca_eval = split_held_out(load_examples(ALPACA), held_out, SPLIT_SEED)
    return train, alpaca_eval, load_examples(LIMA)


def general_knowledge(model, tokenizer, questions: list[Question], batch_size: int = 64) -> dict:
    """Off-task knowledge: the share of greedy replies that state each question's answer (as
    the demo scores it), which ones (`right`, for paired comparisons), and the loss of the
    short reference answers ("Fe", "William Shakespeare") after each question."""
    convs = [[{"role": "user", "content": q.prompt}] for q in questions]
    replies = greedy_replies(model, tokenizer, convs, max_new_tokens=48, batch_size=batch_size)
    right = [q.answered_by(r) for q, r in zip(questions, replies)]
    pairs = [[{"role": "user", "content": q.prompt}, {"role": "assistant", "content": q.fact}] for q in questions]
    loss = heldout_loss(model, tokenizer, pairs, batch_size=16)
    return {"correct": sum(right) / len(right), "right": right, "loss": loss["loss"], "examples": len(right)}


def attach(model, run: StudyRun):
    if run.method in QVERA_METHODS:
        config = VeraConfig(rank=run.rank, projection_seed=run.seed, d_initial=run.d_initial, method=run.method)
        return attach_vera(model, config)
    # load_base has switched off bitsandbytes' CPU repacking, which would silently drop the
    # input gradients of the layers peft wraps after the first no-grad forward.
    config = LoraConfig(r=run.rank, lora_alpha=2 * run.rank, target_modules="all-linear", use_dora=run.method == "dora")
    return get_peft_model(model, config)


class HeldOutCurve(TrainerCallback):
    """The held-out loss every `every` steps while training: how the gain grows with steps
    along one run's schedule (the end of the run is scored by run_one, not here)."""

    def __init__(self, every: int, tokenizer, convs: list, max_length: int):
        self.every, self.tokenizer, self.convs, self.max_length = every, tokenizer, convs, max_length
        self.points: list[list[float]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            loss = heldout_loss(model, self.tokenizer, self.convs, self.max_length, batch_size=2)["loss"]
            self.points.append([state.global_step, loss])


def train(model, tokenizer, run: StudyRun, train_convs, curve_convs: list | None = None) -> dict:
    dataset = tokenized_dataset(tokenizer, train_convs[: run.train_rows])
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            output_dir=scratch,
            num_train_epochs=run.epochs,
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
        scales = {"lambda_d": run.lr_scale_d, "lambda_b": run.lr_scale_b, "lambda_m": run.lr_scale_m}
        curve = HeldOutCurve(run.curve_every, tokenizer, curve_convs or [], run.max_length) if run.curve_every else None
        trainer = VeraSFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            lr_scales=scales,
            callbacks=[curve] if curve else None,
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = {"train_seconds": seconds, "steps": trainer.state.global_step, "train_loss_log": losses}
    return result | ({"alpaca_curve": curve.points} if curve else {})


def save(model, run: StudyRun, folder: Path) -> int:
    """Write the adapter; return its size in bytes (the file a user would ship)."""
    if run.method not in QVERA_METHODS:
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
    train_convs, alpaca_eval, lima_eval = study_data()
    if run.method != "base" and record.is_file() and (folder / "adapter").is_dir():
        result = json.loads(record.read_text())
        model, tokenizer = reload(run, folder / "adapter")
    else:
        model, tokenizer = load_base(ModelConfig(name=run.model))
        result = {"run": asdict(run), "name": run.name, "trainable_params": 0, "adapter_bytes": 0, "train_seconds": 0.0}
        if run.method != "base":
            model = attach(model, run)
            result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            result.update(train(model, tokenizer, run, train_convs, alpaca_eval))
            result["adapter_bytes"] = save(model, run, folder / "adapter")
            write_json(record, result)
    start = time.perf_counter()
    # Small batches: evaluation keeps autograd on (see heldout_loss), and a LoRA model's graph
    # over 8 x 256 tokens took several GB.
    result["alpaca_heldout"] = heldout_loss(model, tokenizer, alpaca_eval, run.max_length, eval_batch_size)
    result["lima_heldout"] = heldout_loss(model, tokenizer, lima_eval, run.max_length, eval_batch_size)
    result["general_knowledge"] = general_knowledge(model, tokenizer, general_questions("study"))
    result["eval_seconds"] = time.perf_counter() - start
    write_json(folder / "result.json", result)
    return result


def collect(runs_dir: str | Path, records: str | Path | None = None) -> list[dict]:
    """Every finished run's result, base first, then by method, rank, setting and seed.

    `records`: a results file an earlier report wrote (docs/quality_results.json); its runs
    count as finished unless the runs folder has them too, so a study started on another
    machine goes on from its committed records.
    """
    by_name = {}
    if records is not None and Path(records).is_file():
        by_name = {r["name"]: r for r in json.loads(Path(records).read_text())}
    by_name.update({r["name"]: r for r in map(json.loads, map(Path.read_text, Path(runs_dir).glob("*/result.json")))})
    if not by_name:
        raise FileNotFoundError(f"no results under {runs_dir}; run `scripts/quality_study.py run ...` first")
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(
        by_name.values(), key=lambda r: (order[r["run"]["method"]], study_run(r).setting[1:], r["run"]["seed"])
    )


def study_run(result: dict) -> StudyRun:
    """The run a result came from (records written before a field existed take its default)."""
    return StudyRun(**result["run"])


# The plan: each method's learning-rate grid at one rank with seed 0, then every rank the
# table shows at the method's best setting, three seeds each.
GRID_RANK = {"lora": 8, "vera": 512, "dvora": 512, "dora": 8}
GRID = [
    StudyRun("base"),
    # LoRA at 1e-3 was clearly behind 3e-3 in the first study (1.7316 against 1.7055).
    *(StudyRun("lora", 8, lr) for lr in (3e-3, 1e-2)),
    *(StudyRun("vera", 512, lr) for lr in (1e-2, 3e-2, 1e-1)),
    *(StudyRun("vera", 512, 3e-2, lr_scale_d=scale) for scale in (0.3, 3.0)),
    *(StudyRun("vera", 512, 3e-2, lr_scale_b=scale) for scale in (3.0, 10.0)),
    # DVoRA takes VeRA's faster b (found above) and tries m at VeRA's rate and at a tenth.
    StudyRun("dvora", 512, 3e-2, lr_scale_m=0.1),
    *(StudyRun("dvora", 512, 3e-2, lr_scale_b=3.0, lr_scale_m=scale) for scale in (0.1, 1.0)),
    # DoRA at LoRA's best rate: LoRA at 1e-2 was far behind 3e-3 (1.8108 against 1.6886).
    StudyRun("dora", 8, 3e-3),
]
TABLE_RANKS = {"vera": (512, 1024, 2048), "dvora": (512, 1024), "lora": (8, 16), "dora": (8,)}
SEEDS = (0, 1, 2)


def best_setting(results: list[dict], method: str) -> StudyRun | None:
    """The method's grid run (seed 0, its grid rank) with the lowest Alpaca held-out loss."""
    grid = [
        r
        for r in results
        if r["run"]["method"] == method and r["run"]["rank"] == GRID_RANK[method] and r["run"]["seed"] == 0
    ]
    if not grid:
        return None
    return study_run(min(grid, key=lambda r: r["alpaca_heldout"]["loss"]))


def seeded_runs(results: list[dict], method: str) -> list[StudyRun]:
    """Every table rank of a method at its best grid setting, one run per seed."""
    best = best_setting(results, method)
    if best is None:
        return []
    return [replace(best, rank=rank, seed=seed) for rank in TABLE_RANKS[method] for seed in SEEDS]


def command(run: StudyRun) -> list[str]:
    """The `scripts/quality_study.py run` flags that make this run."""
    flags = ["--method", run.method]
    if run.method != "base":
        flags += ["--rank", str(run.rank), "--lr", f"{run.learning_rate:g}"]
    defaults = StudyRun("base")
    for field in (
        "d_initial",
        "lr_scale_d",
        "lr_scale_b",
        "lr_scale_m",
        "train_rows",
        "epochs",
        "curve_every",
        "max_length",
        "seed",
    ):
        if getattr(run, field) != getattr(defaults, field):
            flags += ["--" + field.replace("_", "-"), f"{getattr(run, field):g}"]
    return flags


def launch_run(run: StudyRun, out_dir: Path, threads: int = 1) -> subprocess.Popen:
    """One run in its own process, its output in `<out_dir>/<name>/log.txt`."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "quality_study.py"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    (out_dir / run.name).mkdir(parents=True, exist_ok=True)
    with open(out_dir / run.name / "log.txt", "a") as log:
        argv = [sys.executable, str(script), "run", *command(run), "--out", str(out_dir)]
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)


# The table's other rows in the order they matter: VeRA r=1024 is the largest VeRA within a
# fifth of LoRA r=8's parameters (DVoRA r=1024 and VeRA r=2048 are past it).
OTHER_ROWS = [("vera", 1024), ("lora", 16), ("dvora", 1024), ("vera", 2048)]


def priority(run: StudyRun) -> tuple:
    """Grid runs first; then the seeds of each method's grid rank, so the table's main rows
    fill first if the sweep is cut short; then the other rows, one row's seeds together."""
    if run.rank == GRID_RANK.get(run.method, 0):
        return (0, 0, 0) if run.seed == 0 else (1, run.seed, 0)
    return (2, OTHER_ROWS.index((run.method, run.rank)), run.seed)


def sweep(
    out_dir: str | Path,
    jobs: int = 1,
    threads: int = 2,
    poll_seconds: float = 5.0,
    launch=launch_run,
    records: str | Path | None = None,
) -> list[str]:
    """Run the whole plan, `jobs` runs at a time with `threads` threads each, skipping finished
    runs; return the names started. On an otherwise idle 2-core machine one run with two
    threads finished runs about twice as fast as two runs with one thread each.

    A method's seeded runs start once its grid is done. Interrupted, it resumes where it
    stopped: finished runs keep their result.json (or their record in `records`, see
    `collect`), and a run killed after training resumes from its saved adapter.
    """
    out_dir = Path(out_dir)
    recorded = {r["name"] for r in collect(out_dir, records)} if records and Path(records).is_file() else set()

    def done(run):
        return run.name in recorded or (out_dir / run.name / "result.json").is_file()

    queue = [run for run in GRID if not done(run)]
    planned = {run.name for run in GRID}
    running: dict[str, subprocess.Popen] = {}
    started = []
    while True:
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                print(f"{time.strftime('%H:%M:%S')} {name}: exit {proc.returncode}", flush=True)
        results = collect(out_dir, records) if recorded or any(out_dir.glob("*/result.json")) else []
        for method in GRID_RANK:
            if any(r.method == method and not done(r) for r in GRID):
                continue
            for run in seeded_runs(results, method):
                if run.name not in planned:
                    planned.add(run.name)
                    if not done(run):
                        queue.append(run)
        queue.sort(key=priority)  # stable: the grid first, then every method's grid rank, then the others
        if not queue and not running:
            return started
        while queue and len(running) < jobs:
            run = queue.pop(0)
            running[run.name] = launch(run, out_dir, threads)
            started.append(run.name)
            print(f"{time.strftime('%H:%M:%S')} {run.name}: started", flush=True)
        time.sleep(poll_seconds)


FORGETTING_METHODS = ("vera", "lora", "dvora", "dora")  # the order a cut-short run fills them
FORGETTING_RANKS = {"lora": (8, 16)}  # beyond each method's grid rank


def forgetting_plan(results: list[dict], methods=FORGETTING_METHODS) -> list[StudyRun]:
    """The base, then each method's best grid setting at its grid rank for every seed, seed by
    seed (every method's seed 0 first), then the other ranks of FORGETTING_RANKS the same way:
    runs that measure general knowledge beside the gain."""
    best = [b for b in (best_setting(results, m) for m in methods) if b is not None]
    others = [replace(b, rank=r) for b in best for r in FORGETTING_RANKS.get(b.method, ()) if r != b.rank]
    return [StudyRun("base")] + [replace(b, seed=seed) for group in (best, others) for seed in SEEDS for b in group]


def measure_forgetting(
    out_dir: str | Path, records: str | Path | None = None, methods=FORGETTING_METHODS, threads: int = 2, launch=None
) -> list[str]:
    """Run `forgetting_plan` one run at a time, skipping runs whose result already holds the
    general-knowledge measure (records written before it existed are run again); return the
    names started."""
    out_dir = Path(out_dir)
    launch = launch or launch_run
    started = []
    for run in forgetting_plan(collect(out_dir, records), methods):
        done = out_dir / run.name / "result.json"
        if done.is_file() and "general_knowledge" in json.loads(done.read_text()):
            continue
        print(f"{time.strftime('%H:%M:%S')} {run.name}: started", flush=True)
        proc = launch(run, out_dir, threads)
        print(f"{time.strftime('%H:%M:%S')} {run.name}: exit {proc.wait()}", flush=True)
        started.append(run.name)
    return started


def summarize(results: list[dict]) -> list[dict]:
    """One row per setting: the mean and spread over its seeds of every measure."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(study_run(r).setting, []).append(r)
    rows = []
    for runs in groups.values():
        row = {
            "name": runs[0]["name"].rsplit("-s", 1)[0] if runs[0]["run"]["seed"] else runs[0]["name"],
            "run": runs[0]["run"] | {"seed": None},
            "seeds": sorted(r["run"]["seed"] for r in runs),
            "trainable_params": runs[0]["trainable_params"],
            "adapter_bytes": runs[0]["adapter_bytes"],
            "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
            "alpaca_loss_by_seed": {r["run"]["seed"]: r["alpaca_heldout"]["loss"] for r in runs},
        }
        for key in ("alpaca_heldout", "lima_heldout"):
            for measure in ("loss", "accuracy"):
                values = [r[key][measure] for r in runs if measure in r[key]]
                if values:
                    row[f"{key}_{measure}"] = spread(values)
        known = [r for r in runs if "general_knowledge" in r]  # records from before the measure lack it
        if known:
            row["general_knowledge_by_seed"] = {r["run"]["seed"]: r["general_knowledge"] for r in known}
            for measure in ("correct", "loss"):
                row[f"general_knowledge_{measure}"] = spread([r["general_knowledge"][measure] for r in known])
        rows.append(row)
    return rows


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), lowest and highest."""
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def gains(rows: list[dict], reference: str = "lora-r8") -> dict[str, dict]:
    """Each seeded setting's gain over the base (Alpaca held-out loss) and its share of the
    reference's gain: over the seed means, and seed by seed (a seed fixes the order of the
    training rows for every method, so runs of one seed are paired). `clearly_*`: every seed
    of one beats every seed of the other; `*_in_every_seed`: paired, seed by seed."""
    base = next(r for r in rows if r["run"]["method"] == "base")["alpaca_heldout_loss"]["mean"]
    seeded = [r for r in rows if len(r["seeds"]) > 1]
    ref = next((r for r in seeded if r["name"].startswith(reference + "-")), None)
    out = {}
    for row in seeded:
        loss = row["alpaca_heldout_loss"]
        entry = {"gain": base - loss["mean"], "gain_min": base - loss["max"], "gain_max": base - loss["min"]}
        if ref is not None:
            ref_loss = ref["alpaca_heldout_loss"]
            entry["share_of_reference"] = entry["gain"] / (base - ref_loss["mean"])
            entry["clearly_above"] = loss["max"] < ref_loss["min"]
            entry["clearly_below"] = loss["min"] > ref_loss["max"]
            mine, theirs = row["alpaca_loss_by_seed"], ref["alpaca_loss_by_seed"]
            paired = sorted(set(mine) & set(theirs))
            entry["share_by_seed"] = {s: (base - mine[s]) / (base - theirs[s]) for s in paired}
            entry["ahead_in_every_seed"] = bool(paired) and all(mine[s] < theirs[s] for s in paired)
            entry["behind_in_every_seed"] = bool(paired) and all(mine[s] > theirs[s] for s in paired)
        out[row["name"]] = entry
    return out


def forgetting(rows: list[dict]) -> dict[str, dict]:
    """For each setting measured on the general-knowledge questions: its gain on the task (the
    drop in Alpaca held-out loss from the base's) and its cost off the task, against the base,
    seed by seed: `kept` (right answers, tuned minus base, in points of the share), `lost`
    (the share of the questions the base answered right that the run did not), `loss_change` (the
    reference answers' loss, tuned minus base); each as the mean and spread over seeds."""
    base = next((r for r in rows if r["run"]["method"] == "base" and "general_knowledge_by_seed" in r), None)
    if base is None:
        return {}
    base_gk = next(iter(base["general_knowledge_by_seed"].values()))
    base_loss = base["alpaca_heldout_loss"]["mean"]
    base_right = max(1, sum(base_gk["right"]))
    out = {}
    for row in rows:
        if row["run"]["method"] == "base" or "general_knowledge_by_seed" not in row:
            continue
        by_seed = row["general_knowledge_by_seed"]
        seeds = sorted(by_seed)
        lost = [sum(b and not t for b, t in zip(base_gk["right"], by_seed[s]["right"])) / base_right for s in seeds]
        out[row["name"]] = {
            "seeds": seeds,
            "gain": spread([base_loss - row["alpaca_loss_by_seed"][s] for s in seeds]),
            "kept": spread([100 * (by_seed[s]["correct"] - base_gk["correct"]) for s in seeds]),
            "lost": spread(lost),
            "loss_change": spread([by_seed[s]["loss"] - base_gk["loss"] for s in seeds]),
        }
    return out


def forgetting_table(results: list[dict]) -> str:
    """Gain on the task beside the cost off it, one row per setting with general-knowledge
    results (mean ± sample sd over seeds; the base's own figures in its row)."""
    rows = summarize(results)
    costs = forgetting(rows)
    lines = [
        "| setting | seeds | gain on Alpaca (nats) | general knowledge right | change vs base (points) "
        "| base's right answers lost | answer loss | change vs base |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pm(value, digits, scale=1.0, sign=""):
        text = f"{value['mean'] * scale:{sign}.{digits}f}"
        return text + (f" ± {value['sd'] * scale:.{digits}f}" if value["n"] > 1 else "")

    for r in rows:
        if "general_knowledge_correct" not in r:
            continue
        right, loss = r["general_knowledge_correct"], r["general_knowledge_loss"]
        if r["name"] not in costs:
            lines.append(f"| {r['name']} | 1 | - | {pm(right, 1, 100)}% | - | - | {pm(loss, 4)} | - |")
            continue
        c = costs[r["name"]]
        lines.append(
            f"| {r['name']} | {len(c['seeds'])} | {pm(c['gain'], 4)} | {pm(right, 1, 100)}% "
            f"| {pm(c['kept'], 1, sign='+')} | {pm(c['lost'], 1, 100)}% | {pm(loss, 4)} "
            f"| {pm(c['loss_change'], 4, sign='+')} |"
        )
    return "\n".join(lines)


COLORS = {"vera": "tab:blue", "dvora": "tab:green", "lora": "tab:orange", "dora": "tab:red"}  # one per method


def save_figure(fig, path: str | Path) -> None:
    """Write the figure whole or not at all (a temporary file renamed over `path`)."""
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def plot_forgetting(rows: list[dict], path: str | Path) -> None:
    """Gain on the task against the change in general knowledge, one point per setting (mean
    over seeds, bars from the lowest to the highest seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = forgetting(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "kept", "general-knowledge answers right, tuned minus base (points)"),
        (axes[1], "loss_change", "loss of the reference answers, tuned minus base (nats)"),
    ):
        ax.axhline(0, color="gray", linestyle="--", label="base (no training)")
        for name, c in costs.items():
            method = name.split("-", 1)[0]
            g, y = c["gain"], c[key]
            ax.errorbar(
                g["mean"],
                y["mean"],
                xerr=[[g["mean"] - g["min"]], [g["max"] - g["mean"]]],
                yerr=[[y["mean"] - y["min"]], [y["max"] - y["mean"]]],
                fmt="o",
                color=COLORS[method],
                capsize=3,
            )
            ax.annotate(
                name.rsplit("-n", 1)[0], (g["mean"], y["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
        ax.set_xlabel("gain on the task: Alpaca held-out loss, base minus tuned (nats)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "Gain on the task against knowledge off it (270 general questions), mean and range over seeds", fontsize=10
    )
    fig.tight_layout()
    save_figure(fig, path)


def curve_rows(results: list[dict], base_loss: float, reference: str = "lora") -> list[dict]:
    """The held-out loss of each run with a curve (`--curve-every`), step by step, beside the
    gain over the base as a share of the `reference` method's gain at the same step: whether a
    method's gap to LoRA shrinks as the steps grow. The last point is the run's final score."""
    curves = {}
    for r in results:
        if "alpaca_curve" in r:
            points = [*map(tuple, r["alpaca_curve"]), (r["steps"], r["alpaca_heldout"]["loss"])]
            curves[r["name"]] = dict(points)
    ref = next((name for name in curves if name.startswith(reference + "-")), None)
    rows = []
    for step in sorted({s for c in curves.values() for s in c}):
        row = {"step": step, "loss": {name: c[step] for name, c in curves.items() if step in c}}
        if ref is not None and step in curves[ref]:
            ref_gain = base_loss - curves[ref][step]
            row["share"] = {name: (base_loss - loss) / ref_gain for name, loss in row["loss"].items()}
        rows.append(row)
    return rows


def curve_table(rows: list[dict]) -> str:
    """`curve_rows` as markdown: one line per step, each run's loss and its share of the reference's gain."""
    names = sorted({name for r in rows for name in r["loss"]})
    lines = [
        "| step | " + " | ".join(f"{n} loss | {n} share" for n in names) + " |",
        "|---:|" + "---:|---:|" * len(names),
    ]
    for r in rows:
        cells = []
        for n in names:
            loss, share = r["loss"].get(n), r.get("share", {}).get(n)
            cells += [f"{loss:.4f}" if loss is not None else "-", f"{share:.1%}" if share is not None else "-"]
        lines.append(f"| {r['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(rows: list[dict], base_loss: float, path: str | Path) -> None:
    """Held-out loss against steps for each run with a curve, the base as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.axhline(base_loss, color="gray", linestyle="--", label="base (no training)")
    for name in sorted({n for r in rows for n in r["loss"]}):
        points = [(r["step"], r["loss"][name]) for r in rows if name in r["loss"]]
        ax.plot(*zip(*points), "o-", color=COLORS[name.split("-", 1)[0]], label=name, markersize=3)
    ax.set_xlabel("optimizer steps (batch 4)")
    ax.set_ylabel("Alpaca held-out loss (nats per answer token)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def write_report(
    runs_dir: str | Path, json_path: str | Path, plot_path: str | Path, forgetting_plot: str | Path | None = None
) -> None:
    """Every run's record as JSON (those already in `json_path` kept), the plot of the seeded
    settings' mean loss against size and, given `forgetting_plot`, gain against forgetting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = collect(runs_dir, json_path)
    tmp = Path(json_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, json_path)

    rows = summarize(results)
    if forgetting_plot is not None:
        plot_forgetting(rows, forgetting_plot)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in (
        (axes[0], "alpaca_heldout_loss", "Alpaca, 100 held-out rows"),
        (axes[1], "lima_heldout_loss", "LIMA, 50 rows (never trained on)"),
    ):
        for r in rows:
            if r["run"]["method"] == "base":
                ax.axhline(r[key]["mean"], color="gray", linestyle="--", label="base (no training)")
        for method, color in COLORS.items():
            line = sorted(
                (r for r in rows if r["run"]["method"] == method and len(r["seeds"]) > 1),
                key=lambda r: r["trainable_params"],
            )
            if not line:
                continue
            ax.errorbar(
                [r["trainable_params"] for r in line],
                [r[key]["mean"] for r in line],
                yerr=[[r[key]["mean"] - r[key]["min"] for r in line], [r[key]["max"] - r[key]["mean"] for r in line]],
                fmt="o-",
                color=color,
                capsize=3,
                label=f"{method} (best grid setting, {len(line[0]['seeds'])} seeds)",
            )
            for r in line:
                ax.annotate(
                    f"r={r['run']['rank']}",
                    (r["trainable_params"], r[key]["mean"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                )
        reference = next((r for r in rows if r["name"].startswith("lora-r8-") and len(r["seeds"]) > 1), None)
        if reference is not None:
            ax.axvline(reference["trainable_params"] / 5, color="gray", linestyle=":", label="1/5 of LoRA r=8's")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("held-out loss (nats per answer token)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct in NF4: mean over seeds, bars from lowest to highest seed", fontsize=10)
    fig.tight_layout()
    save_figure(fig, plot_path)


def markdown_table(results: list[dict]) -> str:
    """One row per setting (mean over its seeds, +- the sample standard deviation)."""
    lines = [
        "| setting | seeds | trainable params | adapter bytes | train time (s) | "
        "Alpaca loss | Alpaca accuracy | LIMA loss | LIMA accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(row, key, digits, percent=False):
        if key not in row:
            return "-"
        value = row[key]
        scale = 100 if percent else 1
        text = f"{value['mean'] * scale:.{digits}f}"
        return text + (f" ± {value['sd'] * scale:.{digits}f}" if value["n"] > 1 else "")

    for r in summarize(results):
        lines.append(
            f"| {r['name']} | {len(r['seeds'])} | {r['trainable_params']:,} | {r['adapter_bytes']:,} | "
            f"{r['train_seconds']:.0f} | {cell(r, 'alpaca_heldout_loss', 4)} | "
            f"{cell(r, 'alpaca_heldout_accuracy', 1, True)} | {cell(r, 'lima_heldout_loss', 4)} | "
            f"{cell(r, 'lima_heldout_accuracy', 1, True)} |"
        )
    return "\n".join(lines)


def headline_table(results: list[dict], reference: str = "lora-r8") -> str:
    """The seeded settings (and the base) with each one's share of the reference's gain over
    the base: of the seed means, and the lowest and highest of the per-seed (paired) shares."""
    rows = summarize(results)
    shares = gains(rows, reference)
    ref = next((r for r in rows if r["name"].startswith(reference + "-") and len(r["seeds"]) > 1), None)
    lines = [
        f"| setting | seeds | trainable params | x fewer than {reference} | adapter bytes | Alpaca loss "
        f"| share of {reference}'s gain (per seed) | LIMA loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["run"]["method"] != "base" and len(r["seeds"]) < 2:
            continue
        loss, lima = r["alpaca_heldout_loss"], r["lima_heldout_loss"]
        sd = f" ± {loss['sd']:.4f}" if loss["n"] > 1 else ""
        lima_sd = f" ± {lima['sd']:.4f}" if lima["n"] > 1 else ""
        fewer = share = "-"
        if r["name"] in shares and ref is not None:
            fewer = f"{ref['trainable_params'] / r['trainable_params']:.1f}"
            entry, per_seed = shares[r["name"]], shares[r["name"]]["share_by_seed"].values()
            share = f"{100 * entry['share_of_reference']:.1f}% ({100 * min(per_seed):.1f}-{100 * max(per_seed):.1f}%)"
        lines.append(
            f"| {r['name']} | {len(r['seeds'])} | {r['trainable_params']:,} | {fewer} | {r['adapter_bytes']:,} "
            f"| {loss['mean']:.4f}{sd} | {share} | {lima['mean']:.4f}{lima_sd} |"
        )
    return "\n".join(lines)
