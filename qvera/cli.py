"""The `qvera` command: inspect, export, convert, merge and load-check adapter folders.

qvera inspect runs/sft/adapter
qvera export runs/sft/adapter out/peft --to peft
qvera export runs/sft/adapter out/lora --to lora --dtype bfloat16 --rank 64
qvera convert some-peft-adapter out/adapter --base smollm2-135m
qvera merge runs/sft/adapter out/merged
qvera load-check runs/sft/adapter --prompt "Hello"
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from peft import PeftModel

from qvera.adapters.format import DTYPES, Adapter, describe, read_adapter, write_adapter
from qvera.adapters.loading import attach_adapter, load_adapted, meta_base, read_adapters_for, read_any
from qvera.adapters.lora_export import LORA_DTYPES, export_lora
from qvera.adapters.merge import merge_to_folder
from qvera.adapters.peft_interop import export_peft, import_peft
from qvera.core.base import QUANTIZATIONS, load_base
from qvera.core.config import ModelConfig
from qvera.generation.decode import GREEDY, reply_batch
from qvera.training.evaluate import heldout_loss, load_examples

LOAD_CHECK_TOKENS = 32


def cmd_inspect(args) -> None:
    print(describe(read_any(args.adapter), args.adapter))


def cmd_export(args) -> None:
    if (args.rank is not None or args.eval_data) and args.to != "lora":
        raise ValueError("--rank and --eval-data apply to --to lora only; a VeRA adapter keeps its rank")
    adapter = read_adapter(args.adapter)
    if args.to == "peft":
        export_peft(adapter, args.out, save_projection=args.save_projection)
    elif args.to == "lora":
        print(export_lora(adapter, args.out, dtype=LORA_DTYPES[args.dtype], rank=args.rank).summary())
        if args.eval_data:
            print(heldout_change(adapter, args.out, args.eval_data))
    elif args.dtype not in DTYPES:
        raise ValueError(f"qvera adapters are saved as {' or '.join(sorted(DTYPES))}, not {args.dtype}")
    else:
        write_adapter(adapter, args.out, dtype=DTYPES[args.dtype])
    print(f"wrote {args.to} adapter {args.out}")


def heldout_change(adapter: Adapter, lora_folder: str, data: str) -> str:
    """The held-out loss of the LoRA export (under peft) and of the adapter (under qvera) on
    one fp32 load of the base the adapter records: what a truncated rank costs where it counts."""
    convs = load_examples(data)
    base, tokenizer = load_base(ModelConfig(name=adapter.config.base_model.name or "", quantization="fp32"))
    lora_model = PeftModel.from_pretrained(base, lora_folder)
    lora = heldout_loss(lora_model, tokenizer, convs)
    vera = heldout_loss(attach_adapter(lora_model.unload(), adapter), tokenizer, convs)
    return (
        f"held-out loss on {data} ({vera['examples']} examples, {vera['tokens']} answer tokens, fp32 base): "
        f"VeRA {vera['loss']:.4f}, LoRA {lora['loss']:.4f} ({lora['loss'] - vera['loss']:+.4f})"
    )


def cmd_convert(args) -> None:
    write_adapter(import_peft(args.adapter, meta_base(args.base)), args.out, dtype=DTYPES[args.dtype])
    print(f"wrote qvera adapter {args.out}")


def cmd_merge(args) -> None:
    model, tokenizer = load_adapted(ModelConfig(name=args.base or "", quantization=args.quantization), args.adapter)
    merge_to_folder(model, tokenizer, args.out)
    print(f"wrote merged bf16 model {args.out}")


def cmd_load_check(args) -> None:
    """The adapter's greedy reply beside the base's, both in one batch (checked before loading)."""
    name = args.base or read_any(args.adapter).config.base_model.name
    if not name:
        raise ValueError(f"{args.adapter} does not name its base model; pass the base's name or folder with --base")
    base = ModelConfig(name=name, quantization=args.quantization)
    (adapter,) = read_adapters_for(base, [args.adapter])
    model, tokenizer = load_base(base)
    sampling = dataclasses.replace(GREEDY, max_new_tokens=args.max_new_tokens)
    prompts, adapters = [args.prompt] * 2, [None, args.adapter]
    base_reply, adapted_reply = reply_batch(model, tokenizer, prompts, adapters, sampling=sampling)
    print(describe(adapter, args.adapter))
    print(f"loaded onto {model.qvera_base_name} ({args.quantization}); greedy replies to {args.prompt!r}:")
    print(f"  base:    {base_reply!r}")
    print(f"  adapter: {adapted_reply!r}")


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

    p = commands.add_parser(
        "export",
        help="rewrite a qvera adapter: as bf16, in peft's VeRA format, or as a peft LoRA (DoRA) for serving engines",
    )
    p.add_argument("adapter")
    p.add_argument("out")
    p.add_argument(
        "--to",
        choices=["qvera", "peft", "lora"],
        default="qvera",
        help="qvera: qvera's format; peft: peft's VeRA; lora: peft's LoRA, exact, for vLLM, SGLang, LoRAX, TGI",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(LORA_DTYPES),
        default="float32",
        help="of the saved numbers (float16: lora only); float32 keeps a LoRA export exact",
    )
    p.add_argument(
        "--rank",
        type=int,
        help="lora only: a lower LoRA rank for engines with a cap (vLLM 512), by a truncated SVD per layer; "
        "prints each layer's error",
    )
    p.add_argument(
        "--eval-data",
        help="lora only: a data file (as sft.py reads) to print the held-out loss of the adapter and of the export",
    )
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
        ("load-check", cmd_load_check, "load the base and the adapter; print a short greedy reply of each"),
    ]:
        p = commands.add_parser(name, help=text)
        p.add_argument("adapter")
        if name == "merge":
            p.add_argument("out")
        p.add_argument("--base", help="base model (default: the one the adapter records)")
        p.add_argument("--quantization", choices=QUANTIZATIONS, default=ModelConfig.quantization)
        if name == "load-check":
            p.add_argument("--prompt", default="Hello")
            p.add_argument("--max-new-tokens", type=int, default=LOAD_CHECK_TOKENS, help="length of each greedy reply")
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
    except OSError as err:  # the disk, not the input: full, read-only, permissions
        print(f"qvera {args.command}: error: {disk_error(err)}", file=sys.stderr)
        return 1
    return 0


def disk_error(err: OSError) -> str:
    """One line naming the path and the cause: `[Errno 28] No space left on device: 'x'` reads
    as `x: No space left on device`; an error that names its path in its own words (qvera's
    adapter writes) is kept, on one line."""
    if err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
