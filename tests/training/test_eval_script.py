"""scripts/eval.py refuses a bad data file, flag or adapter in one line, before the base loads."""

import json
import runpy
import sys

import pytest
from conftest import DATA_DIR, REPO
from test_commands import refused

import qvera.adapters.loading

DATA = f"{DATA_DIR}/alpaca_en_demo.json"
TARNWICK_EVAL = f"{DATA_DIR}/tarnwick_eval.jsonl"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset", "/none.json"], "data file /none.json does not exist; pass a .json, .jsonl or .parquet file"),
        (["--dataset", f"{DATA_DIR}/README.md"], "README.md: unsupported file type '.md'; use .json, .jsonl"),
        (["--dataset", DATA, "--limit", "0"], "limit must be at least 1, got 0"),
        (["--dataset", DATA, "--batch-size", "0"], "batch_size must be at least 1, got 0"),
        (["--dataset", DATA, "--max-length", "-1"], "max_length must be at least 1, got -1"),
    ],
    ids=lambda v: " ".join(v[-2:]) if isinstance(v, list) else "",
)
def test_eval_refuses_bad_input_before_loading_the_model(monkeypatch, capsys, flags, message):
    code, line = refused("eval.py", flags, monkeypatch, capsys, loader="load_adapted")
    assert code == 2 and line.startswith("eval.py: error: ") and message in line


def test_eval_names_a_missing_adapter_folder_before_loading_the_base(monkeypatch, capsys, tmp_path):
    def loaded(*args, **kwargs):
        raise AssertionError("the base was loaded before the adapter folder was checked")

    monkeypatch.setattr(qvera.adapters.loading, "load_base", loaded)
    argv = ["--dataset", DATA, "--adapter", str(tmp_path / "x")]
    code, line = refused("eval.py", argv, monkeypatch, capsys, loader=None)
    assert code == 1
    assert (
        line == f"eval.py: error: adapter folder {tmp_path / 'x'} does not exist; pass the folder a training run saved"
    )


def test_eval_scores_the_base_alone_with_adapter_none(tiny_llama_dir, monkeypatch, capsys):
    """--help offers `none: the base alone` (the default), in either flag spelling."""
    main = runpy.run_path(str(REPO / "scripts" / "eval.py"), run_name="eval")["main"]
    argv = ["--model", tiny_llama_dir, "--adapter", "none", "--data", TARNWICK_EVAL, "--max_length", "64"]
    monkeypatch.setattr(sys, "argv", ["eval.py", *argv])
    main()
    report = json.loads(capsys.readouterr().out)
    assert report["adapter"] is None and report["heldout"]["examples"] == 8
    assert report["heldout"]["loss"] > 0 and report["short_answers"]["examples"] == 8
