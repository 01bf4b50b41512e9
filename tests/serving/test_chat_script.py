"""scripts/chat.py: Ctrl-C during a reply stops it and keeps the conversation."""

import runpy
from pathlib import Path

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
    CHAT["answer"](chat, "Tell me about rivers.")
    assert capsys.readouterr().out == "Rivers flow [stopped]\n"
    assert chat.messages[:2] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert chat.messages[2:] == [
        {"role": "user", "content": "Tell me about rivers."},
        {"role": "assistant", "content": "Rivers flow"},
    ]
