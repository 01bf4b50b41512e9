"""What a run does with its folder: it refuses one that holds a run unless told to resume or
overwrite it, resuming a finished run trains nothing, a full disk costs no trained vectors and
reads as one line, and the loss curve starts from the untrained model."""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from test_recipe import sft_script
from test_run import quiet, tiny_recipe

import qvera.training.run
from qvera.adapters.format import read_adapter
from qvera.training.recipe import recipe_to_dict
from qvera.training.run import build_trainer, train


def run_sft(recipe, tmp_path, capsys, *flags) -> tuple[int, str]:
    """scripts/sft.py's main() on the recipe (as a YAML file); its exit code and its last line
    on stderr (after the progress bars), the only one that is not a progress bar."""
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe_to_dict(recipe)))
    capsys.readouterr()
    try:
        code = sft_script().main(["--config", str(config), *flags])
    except SystemExit as exit_:  # argparse's refusal
        code = exit_.code
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert not any("Traceback" in line for line in lines)
    return code, lines[-1]


def adapter_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_folder_that_holds_a_run_is_refused_before_the_model_loads(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    recipe = tiny_recipe(tiny_llama_dir, tmp_path)
    run = Path(recipe.train.output_dir)
    (run / "adapter").mkdir(parents=True)
    (run / "loss.png").write_bytes(b"old")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the folder was refused")

    monkeypatch.setattr(qvera.training.run, "load_base", no_model)
    code, err = run_sft(recipe, tmp_path, capsys)
    assert code == 2 and err == (
        f"sft.py: error: {run} already holds a run (adapter, loss.png); pass --resume to continue it or "
        "--overwrite to replace it, or choose another --run-name"
    )
    assert (run / "loss.png").read_bytes() == b"old"
    code, err = run_sft(recipe, tmp_path, capsys, "--resume", "--overwrite")
    assert code == 2 and err.endswith("pass --resume to continue a run or --overwrite to replace it, not both")
    (run / "notes.txt").write_text("mine")  # not a run's output: --overwrite leaves it
    with pytest.raises(AssertionError, match="the model was loaded"):
        build_trainer(replace(recipe, train=replace(recipe.train, overwrite=True)), log=quiet)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_adapter(tiny_llama_dir, tmp_path, capsys):
    """Trainer would train one step past the end and write the adapter again; a run killed
    between its last checkpoint and the adapter write gets the adapter from that checkpoint.
    The run's loss curve starts with the untrained model's evaluation, titled with its name."""
    recipe = tiny_recipe(tiny_llama_dir, tmp_path, run_name="tiny")
    first, _ = train(recipe, log=quiet)
    run = Path(recipe.train.output_dir)
    curves = json.loads((run / "losses.json").read_text())
    assert curves["title"] == "tiny: loss by optimizer step"
    assert [step for step, _ in curves["eval"]] == [0, 2, 4] and [s for s, _ in curves["train"]] == [1, 2, 3, 4]
    assert curves["eval"][0][1] > curves["eval"][-1][1]  # the untrained model's loss, then lower
    assert (run / "loss.png").stat().st_size > 1000
    finished = adapter_bytes(run / "adapter")

    resume = replace(recipe, train=replace(recipe.train, resume=True))
    again, _ = train(resume, log=quiet)
    assert not again.trained and again.steps == 4
    assert max(h["step"] for h in again.log_history) == 4
    assert adapter_bytes(run / "adapter") == finished
    assert again.summary().startswith(f"nothing left to train: {run} had reached step 4")

    shutil.rmtree(run / "adapter")  # as if killed between the last checkpoint and the adapter write
    (run / "loss.png").unlink()
    rewritten, _ = train(resume, log=quiet)
    assert not rewritten.trained and rewritten.steps == 4
    checkpoint = safetensors.torch.load_file(run / "checkpoint-4" / "vectors.safetensors")
    vectors = read_adapter(run / "adapter").vectors
    assert vectors.keys() == checkpoint.keys() and all(torch.equal(vectors[k], checkpoint[k]) for k in vectors)
    assert [s for s, _ in json.loads((run / "losses.json").read_text())["eval"]] == [0, 2, 4]

    for checkpoint in run.glob("checkpoint-*"):  # a finished run saved without checkpoints
        shutil.rmtree(checkpoint)
    code, err = run_sft(resume, tmp_path, capsys)
    assert code == 2 and err == (
        f"sft.py: error: {run} holds a finished run and no checkpoint to continue from: nothing to resume, its "
        "adapter is left as it is; pass --overwrite instead of --resume to train it afresh"
    )
    assert read_adapter(run / "adapter").vectors.keys() == vectors.keys()


def test_a_full_disk_at_the_final_save_keeps_the_vectors_in_a_rescue_folder(
    tiny_llama_dir, tmp_path, monkeypatch, capsys
):
    recipe = tiny_recipe(tiny_llama_dir, tmp_path, max_steps=1, save_steps=0, eval_steps=0, run_name="full")
    run = Path(recipe.train.output_dir)
    save = qvera.training.run.save_adapter

    def full_disk(model, folder, **kwargs):
        if Path(folder).parent == run:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(model, folder, **kwargs)

    monkeypatch.setattr(qvera.training.run, "save_adapter", full_disk)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    code, err = run_sft(recipe, tmp_path, capsys)
    (rescue,) = (tmp_path / "tmp" / "qvera-rescued").iterdir()
    assert code == 1 and err == (
        f"sft.py: error: could not write the adapter to {run / 'adapter'} (no space left on device); the trained "
        f"vectors are saved in {rescue} instead: move that folder to {run / 'adapter'} once there is space"
    )
    assert rescue.name.startswith("full-") and not (run / "adapter").exists()
    vectors = read_adapter(rescue).vectors
    assert any((v != 0).any() for k, v in vectors.items() if k.endswith("lambda_b")), "the trained vectors"


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 448 vs 342"),
    ],
    ids=["ENOSPC", "torch-unexpected-pos"],
)
def test_a_full_disk_at_a_checkpoint_stops_the_run_in_one_line(tiny_llama_dir, tmp_path, monkeypatch, capsys, failure):
    recipe = tiny_recipe(tiny_llama_dir, tmp_path, max_steps=2, save_steps=1, eval_steps=0)
    run = Path(recipe.train.output_dir)
    save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-2" in str(f):
            raise failure
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    code, err = run_sft(recipe, tmp_path, capsys)
    assert code == 1 and err == (
        f"sft.py: error: could not write checkpoint {run / 'checkpoint-2'} (no space left on device); the last "
        f"complete checkpoint is {run / 'checkpoint-1'}; free space, then run again with --resume"
    )
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["checkpoint-1"]
    assert not list((run / ".staging").iterdir())
