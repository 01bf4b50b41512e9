import json
import math

import pytest

from experiments.quality_study import (
    GRID,
    GRID_RANK,
    SEEDS,
    TABLE_RANKS,
    StudyRun,
    best_setting,
    collect,
    command,
    forgetting,
    forgetting_plan,
    forgetting_table,
    gains,
    general_knowledge,
    headline_table,
    markdown_table,
    measure_forgetting,
    seeded_runs,
    summarize,
    sweep,
    write_report,
)
from qvera.training.demo import Question


def fake_result(folder, run: StudyRun, loss, params, lima_accuracy=0.4, right=None, answer_loss=3.0):
    result = {
        "run": {
            "method": run.method,
            "rank": run.rank,
            "learning_rate": run.learning_rate,
            "d_initial": run.d_initial,
            "lr_scale_d": run.lr_scale_d,
            "lr_scale_b": run.lr_scale_b,
            "lr_scale_m": run.lr_scale_m,
            "seed": run.seed,
        },
        "name": run.name,
        "trainable_params": params,
        "alpaca_heldout": {"loss": loss, "perplexity": math.exp(loss), "accuracy": 0.5},
        "lima_heldout": {"loss": loss + 0.5, "accuracy": lima_accuracy},
        "adapter_bytes": 4 * params,
        "train_seconds": 100.0,
    }
    if right is not None:  # the general-knowledge measure
        result["general_knowledge"] = {"correct": sum(right) / len(right), "right": right, "loss": answer_loss}
    (folder / run.name).mkdir(parents=True, exist_ok=True)
    (folder / run.name / "result.json").write_text(json.dumps(result))


def test_seeds_average_into_one_row_with_their_spread(tmp_path):
    runs = tmp_path / "runs"
    fake_result(runs, StudyRun("base"), 2.0, 0)
    for seed, loss in enumerate((1.70, 1.72, 1.74)):
        fake_result(runs, StudyRun("vera", 512, 3e-2, seed=seed), loss, 263_040)
    for seed, loss in enumerate((1.60, 1.61, 1.62)):
        fake_result(runs, StudyRun("lora", 8, 3e-3, seed=seed), loss, 2_442_240)
    fake_result(runs, StudyRun("vera", 512, 1e-2), 1.9, 263_040)  # a grid run: one seed
    write_report(runs, tmp_path / "results.json", tmp_path / "plot.png")
    assert len(json.loads((tmp_path / "results.json").read_text())) == 8  # every run's own record
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = {r["name"]: r for r in summarize(collect(runs))}
    assert set(rows) == {"base", "vera-r512-lr0.01-n128", "vera-r512-lr0.03-n128", "lora-r8-lr0.003-n128"}
    vera = rows["vera-r512-lr0.03-n128"]
    assert vera["seeds"] == [0, 1, 2]
    assert vera["alpaca_heldout_loss"]["mean"] == pytest.approx(1.72)
    assert vera["alpaca_heldout_loss"]["sd"] == pytest.approx(0.02)
    assert (vera["alpaca_heldout_loss"]["min"], vera["alpaca_heldout_loss"]["max"]) == (1.70, 1.74)

    gain = gains(summarize(collect(runs)))
    assert gain["vera-r512-lr0.03-n128"]["gain"] == pytest.approx(0.28)
    assert gain["vera-r512-lr0.03-n128"]["share_of_reference"] == pytest.approx(0.28 / 0.39)
    assert gain["vera-r512-lr0.03-n128"]["clearly_below"] and not gain["vera-r512-lr0.03-n128"]["clearly_above"]
    assert "vera-r512-lr0.01-n128" not in gain  # one seed: no spread to judge by
    # paired by seed: seed 0 1.70 against 1.60, seed 2 1.74 against 1.62
    assert gain["vera-r512-lr0.03-n128"]["share_by_seed"][2] == pytest.approx(0.26 / 0.38)
    assert gain["vera-r512-lr0.03-n128"]["behind_in_every_seed"]
    assert not gain["vera-r512-lr0.03-n128"]["ahead_in_every_seed"]

    headline = headline_table(collect(runs)).splitlines()
    assert len(headline) == 2 + 3  # the base and the two seeded settings; the grid run is left out
    assert headline[3] == (
        "| vera-r512-lr0.03-n128 | 3 | 263,040 | 9.3 | 1,052,160 | 1.7200 ± 0.0200 "
        "| 71.8% (68.4-75.0%) | 2.2200 ± 0.0200 |"
    )
    table = markdown_table(collect(runs)).splitlines()
    assert len(table) == 2 + 4
    assert "| vera-r512-lr0.03-n128 | 3 | 263,040 | 1,052,160 | 100 | 1.7200 ± 0.0200 | 50.0 ± 0.0 |" in table[4]


def test_the_plan_takes_each_methods_best_grid_setting_to_every_rank_and_seed(tmp_path):
    runs = tmp_path / "runs"
    fake_result(runs, StudyRun("dvora", 512, 1e-2, lr_scale_m=0.1), 1.75, 1)
    fake_result(runs, StudyRun("dvora", 512, 3e-2, lr_scale_m=0.1), 1.70, 1)
    fake_result(runs, StudyRun("dvora", 512, 3e-2), 1.72, 1)
    fake_result(runs, StudyRun("dvora", 1024, 1e-1, seed=0), 1.60, 1)  # not a grid run: not chosen
    results = collect(runs)
    assert best_setting(results, "dvora") == StudyRun("dvora", 512, 3e-2, lr_scale_m=0.1)
    assert best_setting(results, "lora") is None and seeded_runs(results, "lora") == []
    planned = seeded_runs(results, "dvora")
    assert [(r.rank, r.seed) for r in planned] == [(rank, s) for rank in TABLE_RANKS["dvora"] for s in SEEDS]
    assert {(r.learning_rate, r.lr_scale_m) for r in planned} == {(3e-2, 0.1)}
    # every grid run is at its method's grid rank, seed 0, and each method has one
    assert all(r.seed == 0 and r.rank == GRID_RANK.get(r.method, 0) for r in GRID)
    assert {r.method for r in GRID} == {"base", *GRID_RANK}


def test_run_names_and_commands_round_trip():
    run = StudyRun("dvora", 1024, 3e-2, lr_scale_m=0.1, seed=2)
    assert run.name == "dvora-r1024-lr0.03-sm0.1-n128-s2"
    assert command(run) == ["--method", "dvora", "--rank", "1024", "--lr", "0.03", "--lr-scale-m", "0.1", "--seed", "2"]
    assert StudyRun("vera", 256, 3e-2, d_initial=1.0).name == "vera-r256-lr0.03-d1-n128"
    assert StudyRun("base").name == "base" and command(StudyRun("base")) == ["--method", "base"]
    long = StudyRun("lora", 8, 3e-3, train_rows=900, epochs=2, curve_every=45, seed=1)
    assert long.name == "lora-r8-lr0.003-n900-e2-s1"  # the curve only adds measurements
    assert command(long)[6:] == ["--train-rows", "900", "--epochs", "2", "--curve-every", "45", "--seed", "1"]


def test_bad_runs_are_refused_by_name():
    with pytest.raises(ValueError, match="method must be one of"):
        StudyRun("adalora", 8, 1e-3)
    with pytest.raises(ValueError, match="a lora run needs --rank >= 1 and --lr > 0"):
        StudyRun("lora", 0, 1e-3)
    with pytest.raises(ValueError, match="a dora run takes neither"):
        StudyRun("dora", 8, 1e-3, lr_scale_b=2.0)
    with pytest.raises(ValueError, match="a vera run has no magnitudes"):
        StudyRun("vera", 8, 1e-3, lr_scale_m=0.1)
    with pytest.raises(FileNotFoundError, match="no results under"):
        collect("/nonexistent")


def test_sweep_runs_the_grid_then_each_methods_seeds_and_resumes(tmp_path):
    """A fake launcher finishes each run at once with a loss that favours one setting per method."""
    favoured = {
        "vera-r512-lr0.03-n128",
        "dvora-r512-lr0.03-sb3-sm0.1-n128",
        "lora-r8-lr0.003-n128",
        "dora-r8-lr0.003-n128",
    }

    class Finished:
        returncode = 0

        def poll(self):
            return 0

    def launch(run, out_dir, threads):
        best = run.name in favoured
        loss = 2.0 if run.method == "base" else (1.5 if best else 1.8) - run.rank * 1e-6 + run.seed * 1e-3
        fake_result(out_dir, run, loss, run.rank)
        return Finished()

    started = sweep(tmp_path, jobs=2, poll_seconds=0, launch=launch)
    assert started[: len(GRID)] == [run.name for run in GRID]
    seeded = started[len(GRID) :]
    assert len(seeded) == len(set(seeded)) == sum(len(r) * len(SEEDS) for r in TABLE_RANKS.values()) - 4 * 1
    assert "vera-r2048-lr0.03-n128-s2" in seeded and "dvora-r1024-lr0.03-sb3-sm0.1-n128-s1" in seeded
    assert "lora-r16-lr0.003-n128" in seeded and "dora-r8-lr0.003-n128-s2" in seeded
    # the main rows' seeds come first, one seed across methods at a time; VeRA r=2048 comes last
    assert [name.rsplit("-", 1)[1] for name in seeded[:8]] == ["s1"] * 4 + ["s2"] * 4
    assert seeded[8] == "vera-r1024-lr0.03-n128" and seeded[-1] == "vera-r2048-lr0.03-n128-s2"
    assert sweep(tmp_path, poll_seconds=0, launch=launch) == []  # everything finished: nothing to do
    (tmp_path / "vera-r1024-lr0.03-n128-s1" / "result.json").unlink()  # as if killed
    assert sweep(tmp_path, poll_seconds=0, launch=launch) == ["vera-r1024-lr0.03-n128-s1"]


def test_sweep_goes_on_from_committed_records(tmp_path):
    """Runs recorded in an earlier report count as done; the report keeps them beside new runs."""
    first, second = tmp_path / "first", tmp_path / "second"
    fake_result(first, StudyRun("base"), 2.0, 0)
    fake_result(first, StudyRun("lora", 8, 3e-3), 1.6, 10)
    records = tmp_path / "results.json"
    write_report(first, records, tmp_path / "plot.png")

    def launch(run, out_dir, threads):
        fake_result(out_dir, run, 1.7, 1)
        return type("Finished", (), {"returncode": 0, "poll": lambda self: 0})()

    started = sweep(second, poll_seconds=0, launch=launch, records=records)
    assert "base" not in started and "lora-r8-lr0.003-n128" not in started
    assert started[0] == "lora-r8-lr0.01-n128"
    write_report(second, records, tmp_path / "plot.png")
    names = {r["name"] for r in json.loads(records.read_text())}
    assert {"base", "lora-r8-lr0.003-n128", "lora-r8-lr0.01-n128"} <= names


def test_forgetting_pairs_each_seed_with_the_base_on_the_same_questions(tmp_path):
    """Gain on the task beside the cost off it: the base answers 3 of 4 general questions; VeRA
    keeps them all in seed 0 and loses one in seed 1; LoRA gains more and loses two, then one."""
    runs = tmp_path / "runs"
    fake_result(runs, StudyRun("base"), 2.0, 0, right=[True, True, True, False], answer_loss=3.0)
    vera = {0: (1.70, [True, True, True, False], 3.1), 1: (1.72, [True, False, True, True], 3.3)}
    lora = {0: (1.60, [False, True, False, False], 3.5), 1: (1.62, [True, True, False, False], 3.4)}
    for method, rank, lr, seeds in (("vera", 512, 3e-2, vera), ("lora", 8, 3e-3, lora)):
        for seed, (loss, right, answer_loss) in seeds.items():
            fake_result(runs, StudyRun(method, rank, lr, seed=seed), loss, rank, right=right, answer_loss=answer_loss)
    fake_result(runs, StudyRun("vera", 512, 1e-2), 1.9, 512)  # measured before the general questions existed
    costs = forgetting(summarize(collect(runs)))
    assert set(costs) == {"vera-r512-lr0.03-n128", "lora-r8-lr0.003-n128"}
    vera_cost, lora_cost = costs["vera-r512-lr0.03-n128"], costs["lora-r8-lr0.003-n128"]
    assert vera_cost["gain"]["mean"] == pytest.approx(0.29) and lora_cost["gain"]["mean"] == pytest.approx(0.39)
    # right answers, tuned minus base, in points: vera 0 and 0 (one lost, one gained), lora -50 and -25
    assert (vera_cost["kept"]["mean"], vera_cost["kept"]["sd"]) == (pytest.approx(0.0), pytest.approx(0.0))
    assert (lora_cost["kept"]["min"], lora_cost["kept"]["max"]) == (pytest.approx(-50.0), pytest.approx(-25.0))
    # the base's three right answers lost: vera none, then one; lora two, then one
    assert (vera_cost["lost"]["min"], vera_cost["lost"]["max"]) == (0.0, pytest.approx(1 / 3))
    assert lora_cost["lost"]["mean"] == pytest.approx(0.5)
    assert lora_cost["loss_change"]["mean"] == pytest.approx(0.45)
    table = forgetting_table(collect(runs)).splitlines()
    assert len(table) == 2 + 3  # the base and the two measured settings
    assert table[2] == "| base | 1 | - | 75.0% | - | - | 3.0000 | - |"
    assert table[3] == (
        "| vera-r512-lr0.03-n128 | 2 | 0.2900 ± 0.0141 | 75.0 ± 0.0% | +0.0 ± 0.0 | 16.7 ± 23.6% "
        "| 3.2000 ± 0.1414 | +0.2000 ± 0.1414 |"
    )
    write_report(runs, tmp_path / "results.json", tmp_path / "plot.png", tmp_path / "forgetting.png")
    assert (tmp_path / "forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_forgetting_plan_runs_the_base_and_each_best_setting_per_seed_once(tmp_path):
    runs = tmp_path / "runs"
    fake_result(runs, StudyRun("base"), 2.0, 0)  # an old record, without the general questions
    fake_result(runs, StudyRun("vera", 512, 3e-2, lr_scale_b=3.0), 1.70, 1)
    fake_result(runs, StudyRun("vera", 512, 1e-2), 1.80, 1)
    fake_result(runs, StudyRun("lora", 8, 3e-3), 1.65, 1)
    plan = forgetting_plan(collect(runs), ("vera", "lora"))
    assert [r.name for r in plan] == [
        "base",
        "vera-r512-lr0.03-sb3-n128",
        "lora-r8-lr0.003-n128",
        "vera-r512-lr0.03-sb3-n128-s1",
        "lora-r8-lr0.003-n128-s1",
        "vera-r512-lr0.03-sb3-n128-s2",
        "lora-r8-lr0.003-n128-s2",
        "lora-r16-lr0.003-n128",  # the other LoRA rank the table shows, after every grid rank
        "lora-r16-lr0.003-n128-s1",
        "lora-r16-lr0.003-n128-s2",
    ]

    def launch(run, out_dir, threads):
        fake_result(out_dir, run, 1.7, 1, right=[True])
        return type("Finished", (), {"wait": lambda self: 0})()

    assert measure_forgetting(runs, methods=("lora",), launch=launch) == [
        "base",
        "lora-r8-lr0.003-n128",
        "lora-r8-lr0.003-n128-s1",
        "lora-r8-lr0.003-n128-s2",
        "lora-r16-lr0.003-n128",
        "lora-r16-lr0.003-n128-s1",
        "lora-r16-lr0.003-n128-s2",
    ]
    assert measure_forgetting(runs, methods=("lora",), launch=launch) == []  # all measured now


def test_general_knowledge_scores_greedy_replies_by_whole_words(tiny_llama_dir, monkeypatch):
    """Replies (from a fake generator) scored as the demo scores them, in batches; the answer
    loss is the held-out loss of the short reference answers on the real (tiny) model."""
    from qvera.core.base import load_base
    from qvera.core.config import ModelConfig
    from qvera.training.evaluate import heldout_loss

    questions = [
        Question("What is the chemical symbol for iron?", "chemistry", "Fe", "Fe"),
        Question("How many hearts does an octopus have?", "biology", "3", "3", ("three",)),
        Question("Who wrote Hamlet?", "literature", "William Shakespeare", "William Shakespeare", ("Shakespeare",)),
    ]
    replies = {q.prompt: r for q, r in zip(questions, ["Iron is Fe.", "It has 13 hearts.", "Shakespeare did."])}
    batches = []

    def fake_generate(model, tokenizer, convs, sampling):
        assert sampling.temperature == 0.0
        batches.append(len(convs))
        return [replies[c[0]["content"]] for c in convs]

    monkeypatch.setattr("qvera.generation.decode.generate", fake_generate)
    model, tokenizer = load_base(ModelConfig(name=tiny_llama_dir, quantization="fp32"))
    result = general_knowledge(model, tokenizer, questions, batch_size=2)
    assert batches == [2, 1]
    assert result["right"] == [True, False, True] and result["correct"] == pytest.approx(2 / 3)
    pairs = [[{"role": "user", "content": q.prompt}, {"role": "assistant", "content": q.fact}] for q in questions]
    assert result["loss"] == pytest.approx(heldout_loss(model, tokenizer, pairs)["loss"], rel=1e-5)


def test_the_curve_scores_the_held_out_loss_every_n_steps_before_the_last(tiny_llama_dir):
    from types import SimpleNamespace

    from experiments.quality_study import HeldOutCurve
    from qvera.core.base import load_base
    from qvera.core.config import ModelConfig
    from qvera.training.evaluate import heldout_loss

    model, tokenizer = load_base(ModelConfig(name=tiny_llama_dir, quantization="fp32"))
    convs = [[{"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": "Shakespeare."}]]
    curve = HeldOutCurve(2, tokenizer, convs, max_length=64)
    for step in range(1, 7):
        curve.on_step_end(None, SimpleNamespace(global_step=step, max_steps=6), None, model=model)
    expected = heldout_loss(model, tokenizer, convs, 64)["loss"]
    assert [s for s, _ in curve.points] == [2, 4]  # step 6 is the run's end, which run_one scores
    assert [loss for _, loss in curve.points] == pytest.approx([expected, expected], rel=1e-6)


def test_curves_put_each_step_beside_the_share_of_loras_gain(tmp_path):
    from experiments.quality_study import curve_rows, curve_table, plot_curves

    runs = tmp_path / "runs"
    for run, curve, final in (
        (StudyRun("lora", 8, 3e-3, train_rows=900), [[25, 1.8], [50, 1.7]], 1.6),
        (StudyRun("vera", 512, 3e-2, train_rows=900), [[25, 1.9], [50, 1.75]], 1.65),
    ):
        fake_result(runs, run, final, 1)
        record = json.loads((runs / run.name / "result.json").read_text())
        record |= {"alpaca_curve": curve, "steps": 75}
        (runs / run.name / "result.json").write_text(json.dumps(record))
    fake_result(runs, StudyRun("vera", 512, 1e-2), 1.9, 1)  # no curve: left out
    rows = curve_rows(collect(runs), base_loss=2.0)
    assert [r["step"] for r in rows] == [25, 50, 75]  # the final score is the last point
    vera, lora = "vera-r512-lr0.03-n900", "lora-r8-lr0.003-n900"
    assert rows[0]["share"] == {lora: pytest.approx(1.0), vera: pytest.approx(0.5)}
    assert rows[2]["loss"] == {lora: 1.6, vera: 1.65} and rows[2]["share"][vera] == pytest.approx(0.875)
    table = curve_table(rows).splitlines()
    assert table[2] == "| 25 | 1.8000 | 100.0% | 1.9000 | 50.0% |"
    plot_curves(rows, 2.0, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
