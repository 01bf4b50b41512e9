"""Chat with a base model, or with one of its adapters, in the terminal.

    qvera chat --adapter runs/sft/adapter
    qvera chat --prompt "Write a haiku about rivers."     # answer once and exit
    qvera chat --prompt "Hi" --adapter a/ --prompt "Hi" --adapter none   # one batch, JSON lines

Replies are sampled (see the defaults below); --temperature 0 answers greedily, --seed makes a
sampled reply repeatable. In a batch a greedy reply can change with the batch's size, as the
batch's sums round otherwise; --batch-invariant keeps each reply that of its prompt alone.
Flags take dashes or underscores (--max-new-tokens, --max_new_tokens).

In the chat: /reset clears the history, /adapter FOLDER switches adapter (/adapter none: the
base), /exit (or Ctrl-D) leaves. Ctrl-C stops the reply being written; the conversation goes on.
`python scripts/chat.py` is the same command.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import torch

from qvera.adapters.loading import read_adapters_for
from qvera.cli.command import NO_ADAPTER, Command, Failed
from qvera.core.base import load_base
from qvera.core.config import ModelConfig, option
from qvera.generation.decode import Chat, Sampling, reply_batch

SEEDS = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes


@dataclass
class ChatOptions:
    """What `qvera chat` answers, and with which adapter."""

    _argument_group_name = "chat"

    adapter: list[str] = field(
        default_factory=list,
        metadata={
            "help": "adapter folder (from training or save_adapter); without it, the base answers. With several "
            f"--prompt, give one --adapter per prompt ({NO_ADAPTER}: the base)"
        },
    )
    prompt: list[str] = field(
        default_factory=list,
        metadata={
            "help": "answer this message and exit; repeated, all prompts run as one batch, each reply a JSON line"
        },
    )
    system: str | None = option(None, "system prompt")
    seed: int | None = option(None, "seed the sampling, so a sampled reply can be repeated")
    batch_invariant: bool = option(
        False, "with several --prompt: each reply bit for bit that of its prompt alone, whatever the batch (slower)"
    )

    def __post_init__(self):
        if len(self.adapter) > 1 and len(self.adapter) != len(self.prompt):
            raise ValueError(
                f"got {len(self.adapter)} --adapter for {len(self.prompt)} --prompt; "
                "give one per prompt, or one for all"
            )
        if self.seed is not None and not SEEDS[0] <= self.seed <= SEEDS[1]:
            raise ValueError(f"--seed {self.seed} is outside {SEEDS[0]} to {SEEDS[1]}")


def chat(base: ModelConfig, options: ChatOptions, sampling: Sampling) -> None:
    """Answer the prompts given (one line, or a JSON line each), else chat until /exit. The
    adapters are checked against the base before its weights load."""
    read_adapters_for(base, sorted({name for name in options.adapter if name != NO_ADAPTER}))
    if options.seed is not None:
        torch.manual_seed(options.seed)
    try:
        model, tokenizer = load_base(base)
    except (ValueError, FileNotFoundError) as err:
        raise Failed(str(err)) from err
    prompts = options.prompt
    if len(prompts) > 1:
        names = options.adapter if len(options.adapter) > 1 else (options.adapter or [NO_ADAPTER]) * len(prompts)
        folders = [None if name == NO_ADAPTER else name for name in names]
        try:
            replies = reply_batch(
                model, tokenizer, prompts, folders, options.system, sampling, batch_invariant=options.batch_invariant
            )
        except (ValueError, FileNotFoundError) as err:
            raise Failed(str(err)) from err
        for prompt, folder, reply in zip(prompts, folders, replies):
            print(json.dumps({"prompt": prompt, "adapter": folder, "reply": reply}, ensure_ascii=False))
        return
    session = Chat(model, tokenizer, system=options.system, sampling=sampling)
    if options.adapter and options.adapter[0] != NO_ADAPTER:
        try:
            session.use_adapter(options.adapter[0])
        except (ValueError, FileNotFoundError) as err:
            raise Failed(str(err)) from err
    if prompts:
        for piece in session.reply(prompts[0]):
            print(piece, end="", flush=True)
        print()
        return
    print(f"chatting with {session.adapter or base.name}; commands: {Chat.COMMANDS}", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.startswith("/"):
            print(session.command(line))
            continue
        if line.strip():
            answer(session, line)


def answer(session: Chat, line: str) -> None:
    """Stream the reply; Ctrl-C stops it and keeps the conversation, the words so far included."""
    before, pieces = len(session.messages), []
    try:
        for piece in session.reply(line):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
    except KeyboardInterrupt:
        print(" [stopped]", flush=True)
        if len(session.messages) == before:  # the turn had not entered the history yet
            session.messages += [{"role": "user", "content": line}, {"role": "assistant", "content": "".join(pieces)}]


CHAT = Command(
    "chat",
    "chat with the base or an adapter in the terminal, or answer prompts and exit",
    __doc__,
    chat,
    options=(ModelConfig, ChatOptions, Sampling),
    script="chat.py",
)
main = CHAT.main
