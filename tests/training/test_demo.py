"""The demo's general-knowledge check: the bundled question set, its scoring, and the
before/after table and answers file (a fake generator stands in for the model)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from qvera.training import demo
from qvera.training.demo import (
    ANIMAL_SOUNDS,
    BABY_ANIMALS,
    CAPITALS,
    GENERAL_KNOWLEDGE,
    OPPOSITES,
    SCIENCE,
    Question,
    comparison_table,
    general_questions,
    held_out_questions,
    training_questions,
)

ROWS = json.loads(GENERAL_KNOWLEDGE.read_text())
BY_QUESTION = {q.prompt: q for split in demo.GENERAL_SPLITS for q in general_questions(split)}


def normalized(text: str) -> str:
    return " ".join(re.sub(r"[^\w ]", " ", text.lower()).split())


def test_general_knowledge_set_loads_whole_and_split():
    assert all(set(row) == {"question", "answer", "also", "topic", "split"} for row in ROWS)
    splits = {split: general_questions(split) for split in demo.GENERAL_SPLITS}
    assert sum(map(len, splits.values())) == len(ROWS) >= 300
    assert 40 <= len(splits["demo"]) <= 60  # small enough to keep make demo quick
    assert len({row["topic"] for row in ROWS}) >= 15
    assert len({row["topic"] for row in ROWS if row["split"] == "demo"}) >= 10
    assert all(q.fact.strip() and all(a.strip() for a in q.also) for q in BY_QUESTION.values())
    assert len({normalized(row["question"]) for row in ROWS}) == len(ROWS)  # no duplicates
    with pytest.raises(ValueError, match="unknown general-knowledge split 'train'; use one of demo, replay, study"):
        general_questions("train")


def test_general_knowledge_is_unlike_the_demo_training_data():
    """No question of the demo's tables (trained or held out) and none of their facts: a right
    answer here is knowledge the base brought, not one the demo taught."""
    demo_prompts = {normalized(q.prompt) for q in training_questions() + held_out_questions()}
    assert not demo_prompts & {normalized(row["question"]) for row in ROWS}
    table_facts = [fact for _, fact in CAPITALS + OPPOSITES + ANIMAL_SOUNDS + BABY_ANIMALS]
    table_facts += [fact for _, _, fact in SCIENCE]
    taught = {f.lower() for f in table_facts}
    for row in ROWS:
        assert not {a.lower() for a in [row["answer"], *row["also"]]} & taught, row
        # and the question does not give its answer away
        assert not any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", row["question"], re.I) for a in [row["answer"]]), row


def test_general_knowledge_answers_spot_checked():
    known = {
        "Who wrote Romeo and Juliet?": "William Shakespeare",
        "How many hearts does an octopus have?": "3",
        "What is the SI unit of force?": "newton",
        "What colour do you get by mixing blue and yellow paint?": "green",
        "How do you say 'thank you' in German?": "danke",
        "In which year did World War II end?": "1945",
        "What is the chemical symbol for iron?": "Fe",
        "How many bones are in the adult human body?": "206",
        "What is the plural of 'goose'?": "geese",
        "Which planet is farthest from the Sun?": "Neptune",
    }
    assert {prompt: BY_QUESTION[prompt].fact for prompt in known} == known


def test_general_knowledge_is_scored_by_whole_words_and_alternatives():
    romeo, octopus = BY_QUESTION["Who wrote Romeo and Juliet?"], BY_QUESTION["How many hearts does an octopus have?"]
    thank = BY_QUESTION["How do you say 'thank you' in Japanese?"]
    right = [
        (romeo, '{"topic": "literature", "answer": "Romeo and Juliet was written by William Shakespeare."}'),
        (romeo, "It is a play by Shakespeare."),
        (octopus, "An octopus has three hearts."),
        (octopus, "3 hearts."),
        (thank, "Arigatō gozaimasu."),
    ]
    wrong = [
        (romeo, '{"topic": "literature", "answer": "Romeo and Juliet is a tragedy."}'),
        (octopus, "An octopus has 13 hearts."),
        (octopus, "It has one heart and 3000 suckers."),
        (thank, "Konnichiwa."),
    ]
    assert all(q.answered_by(text) for q, text in right)
    assert not any(q.answered_by(text) for q, text in wrong)


def test_bundled_set_is_listed_with_its_checksum_and_license():
    data = GENERAL_KNOWLEDGE.parent
    sums = dict(line.split()[::-1] for line in (data / "SHA256SUMS").read_text().splitlines())
    assert sums["general_knowledge.json"] == hashlib.sha256(GENERAL_KNOWLEDGE.read_bytes()).hexdigest()
    readme = (data / "README.md").read_text()
    assert "`general_knowledge.json`" in readme and "Apache-2.0" in readme


LIMA = Question("Capital of Peru?", "geography", "The capital of Peru is Lima.", "Lima")
LONG = Question("What is the capital of Ukraine?", "geography", "The capital of Ukraine is Kyiv.", "Kyiv")


def test_table_shows_the_tuned_answer_field_and_the_general_share():
    tuned_long = '{"topic": "geography", "answer": "The capital city of Ukraine is Kyiv."}'
    general = [BY_QUESTION["Who wrote Romeo and Juliet?"], BY_QUESTION["What is the chemical symbol for iron?"]]
    table = comparison_table(
        [LIMA, LONG],
        ["Lima.", "I think it is Lviv."],
        ['{"topic": "geography", "answer": "Lima"}', tuned_long],
        general,
        ["Shakespeare wrote it.", "Iron is Fe."],
        ['{"topic": "literature", "answer": "Shakespeare."}', '{"topic": "science", "answer": "It is Ir."}'],
    )
    row = next(line for line in table.splitlines() if line.startswith("What is the capital of Ukraine?"))
    assert row.endswith("| + The capital city of Ukraine is Kyiv.")  # the fact, not '{"topic": ... "The capit…'
    assert "|   I think it is Lviv." in row  # the base missed it: no mark
    assert "answers containing the right fact: base 50%  ->  tuned 100%" in table
    assert "general knowledge kept (right):    base 100% (2)  ->  tuned 50% (1)  (2 questions" in table


def test_compare_writes_every_reply_and_scores_both_sets(monkeypatch, tmp_path):
    """compare() asks base then tuned for the held-out and the general questions in one batch;
    a fake generator answers the fact for the base and a blank for the tuned general ones."""
    held = held_out_questions()
    general = general_questions("demo") + general_questions("study")  # every split the demo never trains on
    questions = held + general

    class FakeBank:
        def __init__(self, model):
            pass

        def add_current(self, name):
            assert name == "tuned"

        def activate(self, name):
            assert name == "tuned"

    def fake_generate(model, tokenizer, convs, adapters, bank, sampling):
        assert [c[0]["content"] for c in convs] == [q.prompt for q in questions] * 2
        assert adapters == [None] * len(questions) + ["tuned"] * len(questions)
        base = [f"It is {q.fact}." for q in questions]
        tuned = [json.dumps({"topic": q.topic, "answer": f"It is {q.fact}."}) for q in held]
        return base + tuned + ['{"topic": "general", "answer": "I do not know."}'] * len(general)

    monkeypatch.setattr(demo, "AdapterBank", FakeBank)
    monkeypatch.setattr(demo, "generate", fake_generate)
    table = demo.compare(None, None, output_dir=tmp_path)
    assert table.endswith(f"every reply in full:              {tmp_path / demo.ANSWERS_FILE}")
    assert "answers in the taught JSON format: base 0%  ->  tuned 100%" in table
    assert "general knowledge kept (right):    base 100% (320)  ->  tuned 0% (0)  (320 questions" in table
    rows = [json.loads(line) for line in (tmp_path / demo.ANSWERS_FILE).read_text().splitlines()]
    assert [r["question"] for r in rows] == [q.prompt for q in questions]
    assert [r["set"] for r in rows] == ["held-out"] * len(held) + ["general"] * len(general)
    assert all(r["base_right"] for r in rows)
    assert [r["tuned_right"] for r in rows] == [True] * len(held) + [False] * len(general)
    assert rows[0]["tuned"] == json.dumps({"topic": held[0].topic, "answer": f"It is {held[0].fact}."})


def test_the_set_is_read_from_the_repository_data_folder():
    assert GENERAL_KNOWLEDGE == Path(__file__).resolve().parents[2] / "data" / "general_knowledge.json"
