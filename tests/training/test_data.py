"""Data: formats detected and converted, the chat template applied, loss masked to the
assistant's turns, and bad input named by file and row."""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import DATA_DIR

from qvera.core.base import FALLBACK_CHAT_TEMPLATE, ensure_chat_template
from qvera.training.data import (
    IGNORE_INDEX,
    DataError,
    conversations,
    load_conversations,
    read_rows,
    tokenize_conversation,
)
from qvera.training.demo import Question, demo_conversations, held_out_questions, parse_reply, score, training_questions
from qvera.training.recipe import DataConfig

MESSAGES = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
PROMPT_COMPLETION = {"prompt": "Say yes.", "completion": "Yes."}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def write(path, rows, jsonl=None):
    jsonl = path.suffix == ".jsonl" if jsonl is None else jsonl
    path.write_text("\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows))
    return str(path)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_local_files_of_every_kind_read_the_same(tmp_path, suffix):
    rows = [ALPACA, {**ALPACA, "output": "6"}]
    path = tmp_path / f"d{suffix}"
    if suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        write(path, rows)
    assert [r["output"] for r in read_rows(str(path))] == ["5", "6"]


def test_formats_are_detected_and_become_the_same_messages():
    expected_alpaca = [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert conversations([ALPACA], "auto", "a.json") == [expected_alpaca]
    assert conversations([MESSAGES], "auto", "m.json") == [MESSAGES["messages"]]
    assert conversations([PROMPT_COMPLETION], "auto", "p.json") == [
        [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}]
    ]
    conversational = {
        "prompt": [{"role": "user", "content": "Q"}],
        "completion": [{"role": "assistant", "content": "A"}],
    }
    assert conversations([conversational], "prompt-completion", "p.json")[0][-1] == {
        "role": "assistant",
        "content": "A",
    }


def test_alpaca_history_and_system_become_earlier_turns():
    row = {
        "instruction": "And now?",
        "input": "",
        "output": "Done.",
        "system": "Be brief.",
        "history": [["First?", "Yes."]],
    }
    assert [m["role"] for m in conversations([row], "alpaca", "x")[0]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]


def test_the_bundled_alpaca_and_lima_files_load():
    for name, rows in (("alpaca_en_demo.json", 1000), ("lima_eval50.json", 50)):
        convs = conversations(read_rows(os.path.join(DATA_DIR, name)), "auto", name)
        assert len(convs) == rows
        assert all(c[-1]["role"] == "assistant" for c in convs)
    # lima carries multi-turn history
    assert max(len(c) for c in convs) > 2


def test_a_malformed_row_names_its_file_row_and_what_is_missing(tmp_path):
    path = write(tmp_path / "train.jsonl", [ALPACA, ALPACA, {"instruction": "no answer"}])
    with pytest.raises(DataError, match=r"train.jsonl row 3: missing 'output'"):
        load_conversations(DataConfig(path=path), seed=0)
    path = write(tmp_path / "chat.json", [MESSAGES, {"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match=r"chat.json row 2: messages\[0\] needs 'role' and 'content'"):
        load_conversations(DataConfig(path=path), seed=0)
    path = write(tmp_path / "bad.jsonl", [ALPACA])
    with open(path, "a") as f:
        f.write("\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not valid JSON"):
        read_rows(path)


def test_bad_inputs_fail_in_one_line(tmp_path):
    with pytest.raises(DataError, match="holds no examples"):
        load_conversations(DataConfig(path=write(tmp_path / "empty.json", [])), seed=0)
    with pytest.raises(DataError, match=r"unknown data format \(first row has keys \['question'\]\)"):
        load_conversations(DataConfig(path=write(tmp_path / "q.json", [{"question": "?"}])), seed=0)
    with pytest.raises(FileNotFoundError, match="data file .*missing.jsonl does not exist"):
        load_conversations(DataConfig(path=str(tmp_path / "missing.jsonl")), seed=0)
    with pytest.raises(DataError, match="no assistant answer"):
        conversations([{"messages": [{"role": "user", "content": "Hi"}]}], "messages", "x")
    with pytest.raises(DataError, match=r"x row 1: 'output' is blank"):
        conversations([{"instruction": "Hi", "output": "  "}], "alpaca", "x")
    with pytest.raises(DataError, match=r"x row 2: 'instruction' must be a string, found int"):
        conversations([ALPACA, {"instruction": 3, "output": "y"}], "alpaca", "x")


def test_a_first_row_with_half_a_format_names_the_missing_field(tmp_path):
    path = write(tmp_path / "alpaca.json", [{"instruction": "Say hi."}, ALPACA])
    with pytest.raises(DataError, match=r"alpaca.json row 1: missing 'output' \(alpaca rows need 'instruction' and"):
        load_conversations(DataConfig(path=path), seed=0)
    with pytest.raises(DataError, match=r"^x row 1: missing 'prompt' \(prompt-completion rows need 'prompt' and"):
        conversations([{"completion": "y"}], "auto", "x")


def test_held_out_split_is_deterministic_and_disjoint(tmp_path):
    rows = [{**ALPACA, "output": str(i)} for i in range(40)]
    config = DataConfig(path=write(tmp_path / "d.json", rows), eval_fraction=0.1)
    train, held = load_conversations(config, seed=3)
    assert (len(train), len(held)) == (36, 4)
    assert load_conversations(config, seed=3) == (train, held)
    answers = lambda convs: {c[-1]["content"] for c in convs}  # noqa: E731
    assert answers(train).isdisjoint(answers(held))


def test_loss_covers_exactly_the_assistant_turns_and_their_end_token(tokenizer):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you"},
    ]
    example = tokenize_conversation(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == text  # the chat template, default system prompt included
    learned = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "Hello there<|im_end|>\nSee you<|im_end|>\n"
    everything = tokenize_conversation(tokenizer, messages, assistant_only_loss=False)
    assert everything["labels"] == everything["input_ids"]


def test_a_base_without_chat_template_gets_the_fallback(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert ensure_chat_template(plain) and plain.chat_template == FALLBACK_CHAT_TEMPLATE
    assert not ensure_chat_template(plain)
    example = tokenize_conversation(plain, MESSAGES["messages"])
    learned = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert plain.decode(learned).startswith("Hello!" + plain.eos_token)


def test_demo_data_teaches_one_format_and_holds_out_its_questions():
    convs = demo_conversations()
    assert 150 <= len(convs) <= 300
    assert all(parse_reply(c[-1]["content"]) is not None for c in convs)
    trained = {q.prompt for q in training_questions()}
    held = held_out_questions()
    assert held and not trained & {q.prompt for q in held}
    # held-out capitals and animals are not merely rephrased training rows
    trained_answers = {q.fact for q in training_questions() if q.topic == "geography"}
    assert not trained_answers & {q.fact for q in held if q.topic == "geography"}
    assert demo_conversations() == convs  # generated, but the same every time


def test_every_demo_answer_states_the_right_fact():
    """The demo teaches the facts it trains on: a wrong row would teach a wrong fact."""
    known = {"France": "Paris", "Australia": "Canberra", "Canada": "Ottawa", "kangaroo": "joey", "spider": "8"}
    questions = training_questions() + held_out_questions()
    checked = set()
    for q in questions:
        reply = parse_reply(q.reply())
        assert reply == {"topic": q.topic, "answer": q.answer} and q.answered_by(q.answer), q
        assert q.reply().startswith('{"answer": '), q  # the answer before the topic (qvera.training.demo)
        if q.topic == "math":  # recompute every sum from its question
            a, kind, b = re.search(r"(\d+) (plus|minus) (\d+)", q.prompt).groups()
            assert int(q.fact) == (int(a) + int(b) if kind == "plus" else int(a) - int(b)), q
        for subject, fact in known.items():
            if re.search(rf"\b{subject}\b", q.prompt):
                assert q.fact == fact, q
                checked.add(subject)
    assert checked == set(known)  # every spot check met its question
    assert "H2O" not in {q.fact for q in questions if "symbol" in q.prompt}  # H2O is a formula, not a symbol


def test_demo_score_counts_the_format_and_the_facts():
    lima = Question("Capital of Peru?", "geography", "The capital of Peru is Lima.", "Lima")
    whale = Question("Largest mammal?", "science", "The blue whale is the largest mammal.", "blue whale")
    freeze = Question("Water freezes at?", "science", "Water freezes at 0 degrees Celsius.", "0")
    kyiv = Question("Capital of Ukraine?", "geography", "The capital of Ukraine is Kyiv.", "Kyiv")
    replies = [
        '{"topic": "geography", "answer": "Lima"}',
        "The Blue Whale is the largest mammal.",
        '{"topic": "science", "answer": "It freezes at 100 degrees."}',
        "Kiev is the capital.",
    ]
    assert score([lima, whale, freeze, kyiv], replies) == {"format": 0.5, "correct": 0.75, "right": 3}
    lviv = '{"topic": "geography", "answer": "Lviv"}'
    assert score([lima, kyiv], ["Lima, Peru", lviv]) == {"format": 0.5, "correct": 0.5, "right": 1}
    assert parse_reply('{"answer": "Lima"}') is None and parse_reply('{"topic": "x", "answer": 3}') is None
