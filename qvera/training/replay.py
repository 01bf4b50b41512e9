"""Replay: the base model's own answers to general questions, mixed into the training data.

An adapter trained on a narrow set also moves the model's answers to everything else; on the
demo, general-knowledge answers the base got right came out wrong after training. Training on
what the base already says to unrelated questions holds those answers where they were
(rehearsal with the model's own outputs, so no outside data or labels are needed). The
questions are the `replay` split of data/general_knowledge.json, which no score uses.
"""

from __future__ import annotations

from collections.abc import Callable

from qvera.generation.decode import greedy_replies
from qvera.training.demo import Question, general_questions

REPLAY_SPLIT = "replay"
REPLAY_TOKENS = 64  # a reply still running at this length is cut mid-answer

# How a question and the base's whole reply become the taught answer; None leaves the row out.
Shape = Callable[[Question, str], "str | None"]


def replay_conversations(
    model, tokenizer, count: int, shape: Shape | None = None, batch_size: int = 32
) -> list[list[dict]]:
    """The base model's greedy answers to the first `count` replay questions, as training
    conversations; call it before the adapter is attached. Without `shape` the whole reply is
    the answer, and replies cut off at REPLAY_TOKENS are left out, so the adapter never learns
    to stop mid-sentence; `shape` turns (question, reply) into the answer to teach instead."""
    questions = general_questions(REPLAY_SPLIT)[:count]
    convs = [[{"role": "user", "content": q.prompt}] for q in questions]
    replies = greedy_replies(model, tokenizer, convs, REPLAY_TOKENS, batch_size)
    answers = [shape(q, r) if shape else whole_reply(tokenizer, r) for q, r in zip(questions, replies)]
    return [conv + [{"role": "assistant", "content": a}] for conv, a in zip(convs, answers) if a]


def whole_reply(tokenizer, reply: str) -> str | None:
    """The reply as it came, unless it is empty or ran to the token limit."""
    if not reply.strip() or len(tokenizer(reply, add_special_tokens=False).input_ids) >= REPLAY_TOKENS:
        return None
    return reply.strip()
