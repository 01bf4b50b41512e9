import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qvera import ModelConfig, load_base
from qvera.adapters.loading import load_adapted
from qvera.training.data import split_held_out
from qvera.training.evaluate import (
    exact_match,
    heldout_loss,
    load_examples,
    normalize_answer,
    short_answer_examples,
    tokenize_examples,
)

ROOT = Path(__file__).resolve().parents[2]

CONVS = [
    [{"role": "user", "content": "Name a primary color."}, {"role": "assistant", "content": "Red."}],
    [
        {"role": "user", "content": "Say hello in French."},
        {"role": "assistant", "content": "Bonjour, comment allez-vous aujourd'hui ?"},
    ],
    [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two, three."},
        {"role": "user", "content": "And back?"},
        {"role": "assistant", "content": "Three, two, one."},
    ],
]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_base(ModelConfig(name=tiny_llama_dir, quantization="fp32"))


def reference_loss(model, tokenizer, convs, max_length):
    """The model's own mean loss, one example at a time, weighted back to a per-token mean."""
    total = tokens = 0
    for row in tokenize_examples(tokenizer, convs, max_length):
        labels = torch.tensor([row["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss.item() * n
        tokens += n
    return total / tokens, tokens


def test_heldout_loss_equals_the_models_own_loss(tiny):
    model, tokenizer = tiny
    result = heldout_loss(model, tokenizer, CONVS, max_length=64, batch_size=2)  # padding in the batch
    loss, tokens = reference_loss(model, tokenizer, CONVS, 64)
    assert result["tokens"] == tokens and result["examples"] == 3
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert 5 < result["loss"] < 15  # a random model over a 49k vocabulary: about ln(49152) = 10.8


def test_accuracy_counts_answer_tokens_the_model_would_pick(tiny):
    model, tokenizer = tiny
    hits = tokens = 0
    for row in tokenize_examples(tokenizer, CONVS, 64):  # one example at a time: no padding
        with torch.no_grad():
            picks = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].argmax(-1)
        targets = torch.tensor(row["labels"][1:])
        scored = targets != -100
        hits += int((picks[scored] == targets[scored]).sum())
        tokens += int(scored.sum())
    result = heldout_loss(model, tokenizer, CONVS, max_length=64, batch_size=2)
    assert tokens == result["tokens"] and result["accuracy"] == hits / tokens


def test_only_answer_tokens_count_and_truncation_applies(tiny):
    model, tokenizer = tiny
    rows = tokenize_examples(tokenizer, CONVS[2:], max_length=1000)
    answer_tokens = sum(label != -100 for label in rows[0]["labels"])
    assert heldout_loss(model, tokenizer, CONVS[2:], max_length=1000)["tokens"] == answer_tokens
    assert answer_tokens < len(rows[0]["input_ids"]) / 2  # the prompt and system turn are not scored
    prompt_len = rows[0]["labels"].index(next(label for label in rows[0]["labels"] if label != -100))
    with pytest.raises(ValueError, match="no answer tokens left to score within max_length=5"):
        heldout_loss(model, tokenizer, CONVS[2:], max_length=min(5, prompt_len))


def test_a_saved_peft_adapter_reloads_and_changes_the_loss(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_base(ModelConfig(name=tiny_llama_dir, quantization="fp32"))
    base = heldout_loss(model, tokenizer, CONVS, max_length=64)["loss"]
    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    tuned = heldout_loss(lora, tokenizer, CONVS, max_length=64)["loss"]
    lora.save_pretrained(tmp_path / "lora")
    reloaded, tokenizer = load_adapted(ModelConfig(name=tiny_llama_dir, quantization="fp32"), tmp_path / "lora")
    assert heldout_loss(reloaded, tokenizer, CONVS, max_length=64)["loss"] == pytest.approx(tuned, rel=1e-5)
    assert abs(tuned - base) > 1e-3


def test_a_saved_qvera_adapter_reloads_and_changes_the_loss(tiny_llama_dir, tmp_path):
    adapters = pytest.importorskip("qvera.adapters")
    from qvera import VeraConfig, attach_vera

    model, tokenizer = load_base(ModelConfig(name=tiny_llama_dir, quantization="fp32"))
    base = heldout_loss(model, tokenizer, CONVS, max_length=64)["loss"]
    attach_vera(model, VeraConfig(rank=16))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lambda_b"):
                param.copy_(torch.linspace(-1, 1, param.numel()))
    tuned = heldout_loss(model, tokenizer, CONVS, max_length=64)["loss"]
    adapters.save_adapter(model, str(tmp_path / "vera"))
    reloaded, tokenizer = load_adapted(ModelConfig(name=tiny_llama_dir, quantization="fp32"), tmp_path / "vera")
    assert heldout_loss(reloaded, tokenizer, CONVS, max_length=64)["loss"] == pytest.approx(tuned, rel=1e-5)
    assert abs(tuned - base) > 1e-3


def test_exact_match_scores_short_answers_only(tiny):
    model, tokenizer = tiny
    assert short_answer_examples(tokenizer, CONVS) == [CONVS[0]]  # the long and multi-turn ones are left out
    result = exact_match(model, tokenizer, CONVS)
    assert result == {"exact_match": 0.0, "examples": 1}  # a random model does not say "Red."
    assert normalize_answer("  The Answer:  RED! ") == "the answer red"


def test_split_is_fixed_and_disjoint():
    convs = [[{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}] for i in range(10)]
    train, held = split_held_out(convs, 3, seed=0)
    assert (train, held) == split_held_out(convs, 3, seed=0)
    assert len(train) == 7 and len(held) == 3
    assert sorted(c[0]["content"] for c in train + held) == sorted(str(i) for i in range(10))
    with pytest.raises(ValueError, match="held_out must be between 1 and 9 for 10 examples"):
        split_held_out(convs, 10)


def test_bad_inputs_fail_clearly(tmp_path, tiny_llama_dir):
    with pytest.raises(FileNotFoundError, match="data file .*missing.json does not exist"):
        load_examples(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(ValueError, match="unknown data format"):
        load_examples(str(bad))
    with pytest.raises(FileNotFoundError, match="adapter folder .*nowhere does not exist"):
        load_adapted(ModelConfig(name=tiny_llama_dir, quantization="fp32"), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="limit must be at least 1"):
        load_examples(str(bad), limit=0)


def test_eval_script_reports_json(tiny_llama_dir, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"messages": c}) for c in CONVS))
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "eval.py"),
            "--model",
            tiny_llama_dir,
            "--dataset",
            str(data),
            "--quantization",
            "fp32",
            "--max-length",
            "64",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    report = json.loads(out.stdout)
    model, tokenizer = load_base(ModelConfig(name=tiny_llama_dir, quantization="fp32"))
    assert report["heldout"]["loss"] == pytest.approx(
        heldout_loss(model, tokenizer, CONVS, max_length=64)["loss"], rel=1e-5
    )
    assert 0 <= report["heldout"]["accuracy"] <= 1
    assert report["short_answers"]["examples"] == 1
