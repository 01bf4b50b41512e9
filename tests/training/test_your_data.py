"""docs/your-data.md's worked example, as written there, on a tiny random model: train on the
bundled set with its held-out file, then score the base and the adapter with eval.py."""

from __future__ import annotations

import json
import runpy
import shlex
import sys

from conftest import REPO
from test_recipe import sft_script

from qvera.training.data import conversations, read_rows

DOC = REPO / "docs" / "your-data.md"
PYTHON = ".venv/bin/python "


def doc_commands(script: str) -> list[list[str]]:
    """The arguments of each `.venv/bin/python scripts/<script>` line of the worked example."""
    lines = [line.strip() for line in DOC.read_text().split("## A worked example")[1].splitlines()]
    return [shlex.split(line)[2:] for line in lines if line.startswith(f"{PYTHON}scripts/{script}")]


def run_eval(argv: list[str], monkeypatch, capsys) -> dict:
    main = runpy.run_path(str(REPO / "scripts" / "eval.py"), run_name="eval")["main"]
    monkeypatch.setattr(sys, "argv", ["eval.py", *argv])
    capsys.readouterr()
    main()
    return json.loads(capsys.readouterr().out)


def test_the_bundled_sets_are_what_the_guide_says():
    train = conversations(read_rows(str(REPO / "data" / "tarnwick_train.jsonl")), "auto", "train")
    held_out = conversations(read_rows(str(REPO / "data" / "tarnwick_eval.jsonl")), "auto", "eval")
    assert (len(train), len(held_out)) == (32, 8)
    questions = {c[0]["content"] for c in train}
    assert not questions & {c[0]["content"] for c in held_out}, "a held-out question is in the training set"
    assert {c[-1]["content"] for c in held_out} == {c[-1]["content"] for c in train}  # the same eight facts


def test_the_worked_example_trains_and_evaluates(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    (sft,) = doc_commands("sft.py")
    base, tuned = doc_commands("eval.py")
    run = tmp_path / "tarnwick"
    monkeypatch.chdir(REPO)  # the doc's paths are relative to the repository
    quick = ["--model", tiny_llama_dir, "--max-steps", "4", "--output-dir", str(run), "--no-gradient-checkpointing"]
    assert sft_script().main([*sft, *quick]) == 0
    assert [step for step, _ in json.loads((run / "losses.json").read_text())["eval"]] == [0, 4]

    assert tuned[tuned.index("--adapter") + 1] == "runs/tarnwick/adapter"
    tuned[tuned.index("--adapter") + 1] = str(run / "adapter")
    small = ["--model", tiny_llama_dir, "--max-length", "64"]
    before = run_eval([*base, *small], monkeypatch, capsys)
    after = run_eval([*tuned, *small], monkeypatch, capsys)
    assert before["adapter"] is None and after["adapter"] == str(run / "adapter")
    assert before["heldout"]["examples"] == after["heldout"]["examples"] == 8
    assert after["heldout"]["loss"] < before["heldout"]["loss"]
