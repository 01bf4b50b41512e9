"""Chat with a base model, or with one of its adapters, in the terminal.

    python scripts/chat.py --adapter runs/sft/adapter
    python scripts/chat.py --prompt "Write a haiku about rivers."     # answer once and exit

In the chat: /reset clears the history, /adapter FOLDER switches adapter (/adapter none: the
base), /exit (or Ctrl-D) leaves.
"""

import argparse
import sys

from qvera import ModelConfig, load_base
from qvera.generation import Chat, Sampling


def main() -> None:
    defaults, model_defaults = Sampling(), ModelConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=model_defaults.name, help="base: a local folder, a hub id or the built-in smollm2-135m")
    parser.add_argument("--quantization", default=model_defaults.quantization, choices=["nf4", "int8", "bf16", "fp32"])
    parser.add_argument("--adapter", help="adapter folder (from save_adapter or training); without it, the base answers")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--prompt", help="answer this one message and exit")
    args = parser.parse_args()

    try:
        sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens)
    except ValueError as err:
        parser.error(str(err))
    model, tokenizer = load_base(ModelConfig(name=args.model, quantization=args.quantization))
    chat = Chat(model, tokenizer, system=args.system, sampling=sampling)
    if args.adapter:
        try:
            chat.use_adapter(args.adapter)
        except (ValueError, FileNotFoundError) as err:
            sys.exit(f"error: {err}")

    if args.prompt is not None:
        for piece in chat.reply(args.prompt):
            print(piece, end="", flush=True)
        print()
        return
    print(f"chatting with {args.adapter or args.model}; commands: {Chat.COMMANDS}", file=sys.stderr)
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
            for piece in chat.reply(line):
                print(piece, end="", flush=True)
            print()


if __name__ == "__main__":
    main()
