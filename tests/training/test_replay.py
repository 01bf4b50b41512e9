"""Replay: the base model's own answers to general questions join the training data."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_run import quiet, tiny_recipe

from qvera import ModelConfig, load_base
from qvera.generation.decode import Sampling, generate
from qvera.training import replay as replay_module
from qvera.training.data import replay_shape
from qvera.training.demo import SCORED_SPLITS, general_questions, parse_reply, replay_reply
from qvera.training.recipe import REPLAY_QUESTIONS, check_recipe
from qvera.training.replay import REPLAY_SPLIT, REPLAY_TOKENS, replay_conversations
from qvera.training.run import build_trainer


def test_replay_rows_are_the_base_models_own_greedy_answers(smollm2_dir):
    model, tokenizer = load_base(ModelConfig(name=smollm2_dir, quantization="nf4"))
    model.train()
    convs = replay_conversations(model, tokenizer, 4)
    questions = [q.prompt for q in general_questions(REPLAY_SPLIT)[:4]]
    assert len(questions) == 4 and len(set(questions)) == 4
    asked = [[{"role": "user", "content": q}] for q in questions]
    greedy = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=REPLAY_TOKENS)
    expected = [
        c + [{"role": "assistant", "content": r.strip()}]
        for c, r in zip(asked, generate(model, tokenizer, asked, sampling=greedy))
        if r.strip() and len(tokenizer(r, add_special_tokens=False).input_ids) < REPLAY_TOKENS
    ]
    assert convs == expected and len(convs) >= 3  # a real model finishes most short answers
    assert model.training  # left as it was


def test_replies_cut_off_at_the_token_limit_are_left_out(tiny_llama_dir, monkeypatch):
    model, tokenizer = load_base(ModelConfig(name=tiny_llama_dir, quantization="nf4"))
    # A random tiny model never says its end token within 64 tokens: every reply is cut off.
    assert replay_conversations(model, tokenizer, 3) == []
    monkeypatch.setattr(replay_module, "greedy_replies", lambda *a, **k: ["Paris.", "x " * 200, " "])
    kept = replay_conversations(model, tokenizer, 3)
    assert [c[-1]["content"] for c in kept] == ["Paris."]


def test_the_demo_replays_the_whole_sentences_inside_its_json(tiny_llama_dir, monkeypatch):
    model, tokenizer = load_base(ModelConfig(name=tiny_llama_dir, quantization="nf4"))
    replies = ["Na is its symbol. Sodium is a metal.", "cut off mid-sent", "It is 100!\nMore and"]
    monkeypatch.setattr(replay_module, "greedy_replies", lambda *a, **k: replies)
    convs = replay_conversations(model, tokenizer, 3, replay_reply)
    topics = [q.topic for q in general_questions("replay")[:3]]
    assert [json.loads(c[-1]["content"]) for c in convs] == [
        {"topic": topics[0], "answer": "Na is its symbol. Sodium is a metal."},
        {"topic": topics[2], "answer": "It is 100!"},
    ]
    assert parse_reply(convs[0][-1]["content"]) is not None  # the demo's scorer reads it as its format
    assert all(c[-1]["content"].startswith('{"answer": ') for c in convs)  # as the demo's own rows


def test_a_replay_count_out_of_range_is_refused_in_one_line(tiny_llama_dir, tmp_path):
    recipe = tiny_recipe(tiny_llama_dir, tmp_path)
    for count in (-1, REPLAY_QUESTIONS + 1):
        with pytest.raises(ValueError, match=f"data.replay must be from 0 to {REPLAY_QUESTIONS} .*got {count}"):
            check_recipe(replace(recipe, data=replace(recipe.data, replay=count)))


def test_replayed_rows_join_the_training_set_not_the_evaluation_set(tiny_llama_dir, tmp_path, monkeypatch):
    answers = [[{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]] * 5
    monkeypatch.setattr("qvera.training.run.replay_conversations", lambda model, tok, count, shape: answers[:count])
    recipe = tiny_recipe(tiny_llama_dir, tmp_path)
    plain, _ = build_trainer(recipe, log=quiet)
    lines = []
    tmp = tmp_path / "replayed"
    replayed, _ = build_trainer(
        replace(tiny_recipe(tiny_llama_dir, tmp), data=replace(recipe.data, replay=5)), lines.append
    )
    assert len(replayed.train_dataset) == len(plain.train_dataset) + 5
    assert len(replayed.eval_dataset) == len(plain.eval_dataset)
    assert "replay: the base model's own answers to 5 general questions join the training data" in lines


def test_the_replay_limit_is_the_size_of_the_replay_split():
    assert len(general_questions(REPLAY_SPLIT)) == REPLAY_QUESTIONS


def test_the_demo_never_scores_a_question_it_replays():
    assert REPLAY_SPLIT not in SCORED_SPLITS
    scored = {q.prompt for split in SCORED_SPLITS for q in general_questions(split)}
    assert len(scored) == 320 and scored.isdisjoint(q.prompt for q in general_questions(REPLAY_SPLIT))


def test_only_the_demo_replays_inside_a_format(tiny_llama_dir, tmp_path):
    recipe = tiny_recipe(tiny_llama_dir, tmp_path)
    assert replay_shape(recipe.data) is None  # a user's data keeps the base's replies as they came
    assert replay_shape(replace(recipe.data, path="demo")) is replay_reply
