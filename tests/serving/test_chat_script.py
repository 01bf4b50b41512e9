"""scripts/chat.py: Ctrl-C during a reply stops it and keeps the conversation; its help shows
the sampling defaults; --seed repeats a sampled reply; --batch-invariant keeps a greedy reply
in a batch that of its prompt alone."""

import json
import runpy
import sys
from pathlib import Path

import pytest

from qvera.cli.chat import answer

CHAT = runpy.run_path(str(Path(__file__).resolve().parents[2] / "scripts" / "chat.py"), run_name="chat")


class InterruptedChat:
    """A Chat whose reply is interrupted (Ctrl-C) after two pieces."""

    def __init__(self):
        self.messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]

    def reply(self, text):
        yield "Rivers "
        yield "flow"
        raise KeyboardInterrupt


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(capsys):
    chat = InterruptedChat()
    answer(chat, "Tell me about rivers.")
    assert capsys.readouterr().out == "Rivers flow [stopped]\n"
    assert chat.messages[:2] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert chat.messages[2:] == [
        {"role": "user", "content": "Tell me about rivers."},
        {"role": "assistant", "content": "Rivers flow"},
    ]


def chat(argv, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", ["chat.py", *argv])
    CHAT["main"]()
    return capsys.readouterr().out


def test_help_shows_the_sampling_defaults(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        chat(["--help"], monkeypatch, capsys)
    shown = " ".join(capsys.readouterr().out.split())
    for default in ("0: greedy (default: 0.7)", "(default: 0.9)", "(default: 256)", "--max_new_tokens"):
        assert default in shown


def test_a_seed_repeats_a_sampled_reply(tiny_llama_dir, monkeypatch, capsys):
    flags = ["--model", tiny_llama_dir, "--quantization", "bf16", "--temperature", "1", "--max_new_tokens", "8"]
    first, again, other = (
        chat([*flags, "--seed", str(seed), "--prompt", "Tell me about rivers."], monkeypatch, capsys)
        for seed in (5, 5, 6)
    )
    assert first == again != other


def test_batch_invariant_greedy_replies_do_not_depend_on_the_batch(tiny_llama_dir, monkeypatch, capsys):
    flags = ["--model", tiny_llama_dir, "--quantization", "bf16", "--temperature", "0", "--max-new-tokens", "8"]
    question = ["--prompt", "At what temperature does water boil?"]
    others = [["--prompt", "Tell me about rivers " * i] for i in range(1, 10)]

    def reply(batch):
        out = chat([*flags, "--batch_invariant", *question, *[f for p in batch for f in p]], monkeypatch, capsys)
        return json.loads(out.splitlines()[0])["reply"]

    assert reply(others[:1]) == reply(others)
