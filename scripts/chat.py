"""Chat with a base model, or with one of its adapters, in the terminal.

    python scripts/chat.py --adapter runs/sft/adapter
    python scripts/chat.py --prompt "Write a haiku about rivers."     # answer once and exit
    python scripts/chat.py --prompt "Hi" --adapter a/ --prompt "Hi" --adapter none   # one batch, JSON lines

Replies are sampled (see the defaults below); --temperature 0 answers greedily, --seed makes a
sampled reply repeatable. In a batch a greedy reply can change with the batch's size, as the
batch's sums round otherwise; --batch-invariant keeps each reply that of its prompt alone.
Flags take dashes or underscores (--max-new-tokens, --max_new_tokens).

In the chat: /reset clears the history, /adapter FOLDER switches adapter (/adapter none: the
base), /exit (or Ctrl-D) leaves. Ctrl-C stops the reply being written; the conversation goes on.
"""

import argparse
import json
import sys

import torch

from qvera import ModelConfig, load_base
from qvera.adapters.loading import read_adapters_for
from qvera.core.config import HelpFormatter, spellings
from qvera.core.hardware import COMPUTE_DTYPES
from qvera.generation.decode import Chat, Sampling, reply_batch


def main() -> None:
    defaults, model_defaults = Sampling(), ModelConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--model", default=model_defaults.name, help="base: a local folder, a hub id or the built-in smollm2-135m"
    )
    parser.add_argument(
        "--quantization",
        default=model_defaults.quantization,
        choices=["nf4", "int8", "bf16", "fp32"],
        help="of the base",
    )
    parser.add_argument(
        *spellings("compute-dtype"),
        default=model_defaults.compute_dtype,
        choices=COMPUTE_DTYPES,
        help="auto: bf16 where the hardware has it, else fp16 (GPU) or fp32 (CPU)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        help="adapter folder (from save_adapter or training); without it, the base answers. With several "
        "--prompt, give one --adapter per prompt (`none`: the base)",
    )
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0: greedy")
    parser.add_argument(*spellings("top-p"), type=float, default=defaults.top_p, help="nucleus sampling's mass")
    parser.add_argument(
        *spellings("max-new-tokens"), type=int, default=defaults.max_new_tokens, help="the longest reply, in tokens"
    )
    parser.add_argument("--seed", type=int, help="seed the sampling, so a sampled reply can be repeated")
    parser.add_argument(
        *spellings("batch-invariant"),
        action="store_true",
        help="with several --prompt: each reply bit for bit that of its prompt alone, whatever the batch (slower)",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="answer this message and exit; repeated, all prompts run as one batch, each reply a JSON line",
    )
    args = parser.parse_args()

    try:
        sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens)
        if args.seed is not None:
            torch.manual_seed(args.seed)
    except (ValueError, RuntimeError) as err:  # a seed outside the generator's range
        parser.error(str(err))
    if len(args.adapter) > 1 and len(args.adapter) != len(args.prompt):
        parser.error(
            f"got {len(args.adapter)} --adapter for {len(args.prompt)} --prompt; give one per prompt, or one for all"
        )
    base = ModelConfig(name=args.model, quantization=args.quantization, compute_dtype=args.compute_dtype)
    try:
        read_adapters_for(base, sorted({name for name in args.adapter if name != "none"}))
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))  # before the base's weights load
    try:
        model, tokenizer = load_base(base)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    if len(args.prompt) > 1:
        names = args.adapter if len(args.adapter) > 1 else (args.adapter or ["none"]) * len(args.prompt)
        folders = [None if name == "none" else name for name in names]
        try:
            replies = reply_batch(
                model, tokenizer, args.prompt, folders, args.system, sampling, batch_invariant=args.batch_invariant
            )
        except (ValueError, FileNotFoundError) as err:
            sys.exit(f"error: {err}")
        for prompt, folder, reply in zip(args.prompt, folders, replies):
            print(json.dumps({"prompt": prompt, "adapter": folder, "reply": reply}, ensure_ascii=False))
        return
    chat = Chat(model, tokenizer, system=args.system, sampling=sampling)
    if args.adapter and args.adapter[0] != "none":
        try:
            chat.use_adapter(args.adapter[0])
        except (ValueError, FileNotFoundError) as err:
            sys.exit(f"error: {err}")

    if args.prompt:
        for piece in chat.reply(args.prompt[0]):
            print(piece, end="", flush=True)
        print()
        return
    print(f"chatting with {chat.adapter or args.model}; commands: {Chat.COMMANDS}", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.startswith("/"):
            print(chat.command(line))
            continue
        if line.strip():
            answer(chat, line)


def answer(chat: Chat, line: str) -> None:
    """Stream the reply; Ctrl-C stops it and keeps the conversation, the words so far included."""
    before, pieces = len(chat.messages), []
    try:
        for piece in chat.reply(line):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
    except KeyboardInterrupt:
        print(" [stopped]", flush=True)
        if len(chat.messages) == before:  # the turn had not entered the history yet
            chat.messages += [{"role": "user", "content": line}, {"role": "assistant", "content": "".join(pieces)}]


if __name__ == "__main__":
    main()
