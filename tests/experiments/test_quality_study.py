import json
import math

import pytest

from experiments.quality_study import (
    StudyRun,
    best_per_rank,
    collect,
    markdown_table,
    write_report,
)


def fake_result(folder, method, rank, lr, loss, params):
    run = StudyRun(method, rank, lr)
    result = {
        "run": {"method": method, "rank": rank, "learning_rate": lr, "d_initial": 0.1},
        "name": run.name,
        "trainable_params": params,
        "alpaca_heldout": {"loss": loss, "perplexity": math.exp(loss)},
        "lima_heldout": {"loss": loss + 0.5},
        "alpaca_short_answers": {"exact_match": 0.25, "examples": 12},
        "adapter_bytes": 4 * params,
        "train_seconds": 100.0,
    }
    (folder / run.name).mkdir(parents=True)
    (folder / run.name / "result.json").write_text(json.dumps(result))


def test_report_picks_the_best_learning_rate_per_rank(tmp_path):
    runs = tmp_path / "runs"
    fake_result(runs, "base", 0, 0.0, 2.0, 0)
    fake_result(runs, "vera", 512, 1e-2, 1.8, 263_040)
    fake_result(runs, "vera", 512, 3e-2, 1.7, 263_040)
    fake_result(runs, "lora", 16, 1e-3, 1.6, 4_884_480)
    write_report(runs, tmp_path / "results.json", tmp_path / "plot.png")
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in results] == [
        "base",
        "vera-r512-lr0.01-n128",
        "vera-r512-lr0.03-n128",
        "lora-r16-lr0.001-n128",
    ]
    best = {r["name"] for r in best_per_rank(collect(runs))}
    assert best == {"base", "vera-r512-lr0.03-n128", "lora-r16-lr0.001-n128"}
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown_table(results).splitlines()
    assert len(table) == 2 + 4
    assert table[3] == "| vera-r512-lr0.01-n128 | 263,040 | 1,052,160 | 100 | 1.8000 | 6.05 | 2.3000 | 3/12 |"


def test_run_names_and_bad_runs():
    assert StudyRun("vera", 256, 3e-2, d_initial=1.0).name == "vera-r256-lr0.03-d1-n128"
    assert StudyRun("base").name == "base"
    with pytest.raises(ValueError, match="method must be one of"):
        StudyRun("dora", 8, 1e-3)
    with pytest.raises(ValueError, match="a lora run needs --rank >= 1 and --lr > 0"):
        StudyRun("lora", 0, 1e-3)
    with pytest.raises(FileNotFoundError, match="no results under"):
        collect("/nonexistent")
