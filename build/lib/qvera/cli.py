"""The `qvera` command: inspect, export, convert, merge and load-check adapter folders.

qvera inspect runs/sft/adapter
qvera export runs/sft/adapter out/peft --to peft
qvera convert some-peft-adapter out/adapter --base smollm2-135m
qvera merge runs/sft/adapter out/merged
qvera load-check runs/sft/adapter --prompt "Hello"
"""

from __future__ import annotations

import argparse
import sys

import torch

from qvera.adapters.format import DTYPES, describe, read_adapter, write_adapter
from qvera.adapters.loading import load_adapted, meta_base, read_any
from qvera.adapters.merge import merge_to_folder
from qvera.adapters.peft_interop import export_peft, import_peft
from qvera.core.base import QUANTIZATIONS
from qvera.core.config import ModelConfig


def cmd_inspect(args) -> None:
    print(describe(read_any(args.adapter), args.adapter))


def cmd_export(args) -> None:
    adapter = read_adapter(args.adapter)
    if args.to == "peft":
        export_peft(adapter, args.out, save_projection=args.save_projection)
    else:
        write_adapter(adapter, args.out, dtype=DTYPES[args.dtype])
    print(f"wrote {args.to} adapter {args.out}")


def cmd_convert(args) -> None:
    write_adapter(import_peft(args.adapter, meta_base(args.base)), args.out, dtype=DTYPES[args.dtype])
    print(f"wrote qvera adapter {args.out}")


def cmd_merge(args) -> None:

    model, tokenizer = load_adapted(ModelConfig(name=args.base or "", quantization=args.quantization), args.adapter)
    merge_to_folder(model, tokenizer, args.out)
    print(f"wrote merged bf16 model {args.out}")


def cmd_load_check(args) -> None:
    model, tokenizer = load_adapted(ModelConfig(name=args.base or "", quantization=args.quantization), args.adapter)
    batch = tokenizer([args.prompt], return_tensors="pt").to(model.device)
    with torch.no_grad():
        next_token = model(**batch).logits[0, -1].argmax()
    print(describe(read_any(args.adapter), args.adapter))
    print(
        f"loaded onto {model.qvera_base_name} ({args.quantization}); next "
        f"token after {args.prompt!r}: {tokenizer.decode(next_token)!r}"
    )


def parser() -> argparse.ArgumentParser:
    """The `qvera` command's argument parser, one sub-command per verb."""
    root = argparse.ArgumentParser(
        prog="qvera", description="Inspect, export, convert, merge and load-check VeRA adapters."
    )
    commands = root.add_subparsers(dest="command", required=True)

    p = commands.add_parser(
        "inspect", help="print rank, targets, sizes, base model and fingerprint of an adapter folder (qvera or peft)"
    )
    p.add_argument("adapter")
    p.set_defaults(run=cmd_inspect)

    p = commands.add_parser("export", help="rewrite a qvera adapter: as bf16, or in peft's VeRA format")
    p.add_argument("adapter")
    p.add_argument("out")
    p.add_argument("--to", choices=["qvera", "peft"], default="qvera")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="vector dtype of a qvera adapter")
    p.add_argument(
        "--save-projection", action="store_true", help="peft only: also store A and B (peft's save_projection)"
    )
    p.set_defaults(run=cmd_export)

    p = commands.add_parser(
        "convert", help="convert a peft VeRA adapter to a qvera adapter (reads only the base's config)"
    )
    p.add_argument("adapter")
    p.add_argument("out")
    p.add_argument("--base", required=True, help="the base model the adapter was trained on (name, hub id or folder)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.set_defaults(run=cmd_convert)

    for name, run, text in [
        ("merge", cmd_merge, "write a plain bf16 transformers folder with the adapter merged in"),
        ("load-check", cmd_load_check, "load the base, attach the adapter and run one forward"),
    ]:
        p = commands.add_parser(name, help=text)
        p.add_argument("adapter")
        if name == "merge":
            p.add_argument("out")
        p.add_argument("--base", help="base model (default: the one the adapter records)")
        p.add_argument("--quantization", choices=QUANTIZATIONS, default=ModelConfig.quantization)
        if name == "load-check":
            p.add_argument("--prompt", default="Hello")
        p.set_defaults(run=run)
    return root


def main(argv: list[str] | None = None) -> int:
    """Run the `qvera` command; returns the exit code (2 with a one-line error for bad input)."""
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"qvera {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
