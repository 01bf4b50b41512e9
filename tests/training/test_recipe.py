"""Recipes: YAML files mirror the dataclasses, flags override them, bad values fail early."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import yaml

from qvera.training.recipe import (
    SECTIONS,
    DataConfig,
    SFTRecipe,
    load_recipe,
    parse_recipe,
    recipe_from_dict,
    recipe_to_dict,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def parse(recipe: SFTRecipe, argv: list[str], tmp_path) -> SFTRecipe:
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe_to_dict(recipe)))
    return parse_recipe(argv, config)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_in_configs_loads(path):
    recipe = load_recipe(path)
    assert recipe.train.learning_rate > 0


def test_the_required_recipes_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "llama2-7b-r512.yaml", "alpaca.yaml", "fsdp-4bit.yaml"} <= names
    llama = load_recipe(ROOT / "configs" / "llama2-7b-r512.yaml")
    assert (llama.model.name, llama.model.quantization, llama.vera.rank) == ("meta-llama/Llama-2-7b-hf", "nf4", 512)
    assert llama.vera.target_modules == "all-linear"
    alpaca = load_recipe(ROOT / "configs" / "alpaca.yaml")
    assert alpaca.data.path == "tatsu-lab/alpaca", "the alpaca recipe trains on the hub data set a user expects"
    offline = ROOT / "data" / "alpaca_en_demo.json"
    assert offline.is_file() and "data/alpaca_en_demo.json" in (ROOT / "configs" / "alpaca.yaml").read_text()


def test_flags_override_the_yaml_and_keep_the_rest(tmp_path):
    base = load_recipe(ROOT / "configs" / "demo.yaml")
    recipe = parse(
        base,
        [
            "--model",
            "meta-llama/Llama-2-7b-hf",
            "--rank",
            "512",
            "--no-gradient-checkpointing",
            "--target-modules",
            "q_proj,v_proj",
            "--max-examples",
            "10",
            "--projection-seed",
            "7",
        ],
        tmp_path,
    )
    assert recipe.model.name == "meta-llama/Llama-2-7b-hf"
    assert recipe.vera.rank == 512 and recipe.vera.projection_seed == 7
    assert recipe.vera.target_modules == ["q_proj", "v_proj"]
    assert recipe.train.gradient_checkpointing is False
    assert recipe.data.max_examples == 10
    assert recipe.train.learning_rate == base.train.learning_rate
    assert parse(base, ["--target-modules", "q_proj", "v_proj"], tmp_path).vera.target_modules == ["q_proj", "v_proj"]
    assert parse(base, [], tmp_path) == base


def test_unknown_keys_and_bad_values_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lr'\] for TrainConfig"):
        recipe_from_dict({"train": {"lr": 1e-3}})
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['trainer'\]"):
        recipe_from_dict({"trainer": {}})
    with pytest.raises(ValueError, match="data.format 'csv' is unknown"):
        recipe_from_dict({"data": {"format": "csv"}})
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        recipe_from_dict({"data": {"eval_fraction": 1.5}})
    with pytest.raises(FileNotFoundError, match="config file .* does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def sft_script():
    spec = importlib.util.spec_from_file_location("sft_script", ROOT / "scripts" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(capsys, *args) -> tuple[int, str, str]:
    """scripts/sft.py's argument parsing, in this process (a fresh interpreter would spend
    most of the test importing torch)."""
    with pytest.raises(SystemExit) as exit_info:
        sft_script().parse(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_help_lists_every_field_with_the_recipe_value(capsys):
    code, raw, _ = run_script(capsys, "--config", str(ROOT / "configs" / "llama2-7b-r512.yaml"), "--help")
    out = "".join(raw.split())  # argparse wraps lines, at hyphens too
    assert code == 0
    for section in ("model", "vera", "data", "train"):
        assert f"\n{section}:" in raw, f"--help has no {section} group"
        for field in dataclasses.fields(SECTIONS[section]):
            flag = field.metadata.get("aliases", [f"--{field.name.replace('_', '-')}"])[0]
            assert flag in out, f"--help does not document {section}.{field.name}"
    assert "(default:meta-llama/Llama-2-7b-hf)" in out and "--rankRANKrankrofthesharedprojections" in out
    assert "(default:512)" in out


def test_script_rejects_bad_flags_and_configs_in_one_line(capsys, tmp_path):
    code, _, err = run_script(capsys, "--rank", "many")
    assert code == 2 and "argument --rank: invalid int value: 'many'" in err
    code, _, err = run_script(capsys, "--format", "csv")
    assert code == 2 and "data.format 'csv' is unknown" in err
    code, _, err = run_script(capsys, "--config", str(tmp_path / "none.yaml"))
    assert code == 2 and "none.yaml does not exist" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rank", "0"], "vera.rank must be at least 1, got 0"),
        (["--rank", "-5"], "vera.rank must be at least 1, got -5"),
        (["--d-initial", "nan"], "vera.d_initial must be a finite number, got nan"),
        (["--learning-rate", "0"], "train.learning_rate must be above 0, got 0.0"),
        (["--batch-size", "0"], "train.batch_size must be at least 1, got 0"),
        (["--grad-accum", "-1"], "train.grad_accum must be at least 1, got -1"),
        (["--eval-steps", "-1"], "train.eval_steps must be at least 0 (0: only at the end), got -1"),
        (["--logging-steps", "0"], "train.logging_steps must be at least 1, got 0"),
        (["--quantization", "nf3"], "model.quantization 'nf3' is unknown; use one of nf4, int8, bf16, fp32"),
        (["--compute-dtype", "float8"], "model.compute_dtype 'float8' is unknown; use one of auto, bfloat16"),
        (["--lr-scheduler", "cosin"], "train.lr_scheduler 'cosin' is unknown; use one of linear, cosine"),
        (["--optimizer", "adam"], "train.optimizer 'adam' is unknown; use auto or a transformers optim name"),
        (["--data", "missing.jsonl"], "data.path missing.jsonl does not exist; pass a .json, .jsonl or .parquet"),
        (["--model", "random:huge"], "unknown random base 'random:huge'; use one of random:llama2-7b, random:tiny"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_script_rejects_every_value_checkable_without_the_model(capsys, flags, message):
    code, _, err = run_script(capsys, *flags)
    assert code == 2 and err.splitlines()[-1].split(": error: ", 1)[1].startswith(message)


def test_script_rejects_an_output_folder_it_cannot_create_and_creates_nothing(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run_script(capsys, "--data", "demo", "--output-dir", str(blocker / "run"))
    assert code == 2 and f"output folder {blocker / 'run'} is not writable ({blocker} is a file)" in err
    assert sft_script().parse(["--data", "demo", "--output-dir", str(tmp_path / "new" / "run")])
    assert not (tmp_path / "new").exists()  # checked, not created


def test_yaml_values_of_the_wrong_type_are_named_with_file_and_field(capsys, tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("vera:\n  rank: many\ntrain:\n  learning_rate: 4e-3\n")
    with pytest.raises(ValueError, match=r"recipe.yaml \[vera\]: rank is 'many' \(a string\), expected an integer$"):
        load_recipe(config)
    code, _, err = run_script(capsys, "--config", str(config))
    assert code == 2 and "recipe.yaml [vera]: rank is 'many' (a string), expected an integer" in err
    config.write_text("vera:\n  rank: 8\ntrain:\n  learning_rate: 4e-3\n  resume: maybe\n")
    with pytest.raises(ValueError, match=r"\[train\]: resume is 'maybe' \(a string\), expected a boolean$"):
        load_recipe(config)
    config.write_text("train:\n  learning_rate: 4e-3\n")  # PyYAML reads 4e-3 as a string
    assert load_recipe(config).train.learning_rate == 4e-3


def test_flags_may_fix_what_the_yaml_gets_wrong(capsys, tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("data:\n  path: not-here.jsonl\n")
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    assert sft_script().parse(["--config", str(config), "--data", str(data)]).data.path == str(data)


def test_a_failed_start_leaves_no_output_folder(capsys, tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text('[{"instruction": "Say hi."}]')
    out = tmp_path / "runs" / "first"
    assert sft_script().main(["--data", str(data), "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"sft.py: error: {data} row 1: missing 'output' (alpaca rows need 'instruction' and 'output')\n"
    )
    assert not (tmp_path / "runs").exists()


def test_without_a_config_the_script_trains_with_the_documented_defaults(capsys, tmp_path):
    """The dataclasses' defaults (VeRA's 4e-3, b at 3x, checkpointing on, runs/<run-name>), not
    the demo's: the demo runs only when its config is named (make demo)."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    recipe = sft_script().parse(["--model", "meta-llama/Llama-2-7b-hf", "--rank", "512", "--data", str(data)])
    assert recipe == SFTRecipe(
        model=dataclasses.replace(SFTRecipe().model, name="meta-llama/Llama-2-7b-hf"),
        vera=dataclasses.replace(SFTRecipe().vera, rank=512),
        data=DataConfig(path=str(data)),
    )
    train = recipe.train
    assert (train.learning_rate, train.lr_scale_b, train.gradient_checkpointing) == (4e-3, 3.0, True)
    assert train.run_dir == Path("runs/sft") and recipe.data.max_length == 512
    named = sft_script().parse(["--data", str(data), "--run-name", "mine", "--learning_rate", "1e-3"])
    assert named.train.run_dir == Path("runs/mine") and named.train.learning_rate == 1e-3  # either spelling
    demo = sft_script().parse(["--config", str(ROOT / "configs" / "demo.yaml")])
    assert demo == load_recipe(ROOT / "configs" / "demo.yaml") and demo.train.run_dir == Path("runs/demo")
    assert "--config configs/demo.yaml" in (ROOT / "Makefile").read_text().split("\ndemo:")[1].split("\n\n")[0]
    assert sft_script().main([]) == 2
    assert capsys.readouterr().err == (
        "sft.py: error: no training data: pass --data with a .json, .jsonl or .parquet file or a hub data set "
        "(docs/your-data.md), or --config configs/demo.yaml for the demo\n"
    )


def test_the_7b_commands_help_shows_the_documented_defaults_and_the_flags_the_docs_use(capsys):
    code, raw, _ = run_script(
        capsys, "--model", "meta-llama/Llama-2-7b-hf", "--rank", "512", "--data", "x.jsonl", "--help"
    )
    out = " ".join(raw.split())
    assert code == 0
    assert "--learning-rate LEARNING_RATE peak learning rate (VeRA: about 10x LoRA's) (default: 0.004)" in out
    assert "learning rate of the vectors b, as a multiple of learning_rate (default: 3.0)" in out
    assert (
        "--gradient-checkpointing [GRADIENT_CHECKPOINTING] recompute activations to save memory (default: True)" in out
    )
    assert "--no-gradient-checkpointing the same as --gradient-checkpointing false" in out
    assert "--no-double-quant the same as --double-quant false" in out
    assert "(unset: runs/<run_name>)" in out and "(default: runs/demo)" not in out
    usage = out.split("Fine-tune")[0]
    assert "[--model MODEL]" in usage and "[--data DATA]" in usage and "[--learning-rate LEARNING_RATE]" in usage
    assert not any(flag in usage for flag in ("--learning_rate", "--name ", "--path "))
