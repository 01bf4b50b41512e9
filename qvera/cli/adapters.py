"""The adapter-folder commands: inspect, export, convert, merge, load-check.

qvera inspect runs/sft/adapter
qvera export runs/sft/adapter out/peft --to peft
qvera export runs/sft/adapter out/lora --to lora --dtype bfloat16 --rank 64
qvera convert some-peft-adapter out/adapter --base smollm2-135m
qvera merge runs/sft/adapter out/merged
qvera load-check runs/sft/adapter --prompt "Hello"
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from peft import PeftModel

from qvera.adapters.format import DTYPES, Adapter, describe, read_adapter, write_adapter
from qvera.adapters.loading import attach_adapter, load_adapted, meta_base, read_adapters_for, read_any
from qvera.adapters.lora_export import LORA_DTYPES, export_lora
from qvera.adapters.merge import merge_to_folder
from qvera.adapters.peft_interop import complete_from_model, export_peft, import_peft
from qvera.cli.command import Command, positional, required
from qvera.core.base import load_base
from qvera.core.config import ModelConfig, option
from qvera.generation.decode import GREEDY, reply_batch
from qvera.training.evaluate import heldout_loss, load_examples

EXPORT_FORMATS = ("qvera", "peft", "lora")
LOAD_CHECK_TOKENS = 32


@dataclass
class Folder:
    adapter: str = positional("an adapter folder (qvera's, or peft's VeRA where the command reads it)")


@dataclass
class Written:
    out: str = positional("the folder to write (replaced whole, or not at all)")


@dataclass
class OnBase:
    """The base an adapter is loaded onto."""

    _argument_group_name = "base"

    base: str | None = option(None, "base model: a name, hub id or folder (unset: the one the adapter records)")
    quantization: str = option(ModelConfig.quantization, "of the base")


@dataclass
class ExportOptions:
    _argument_group_name = "export"

    to: str = option(
        "qvera",
        "qvera: qvera's format; peft: peft's VeRA; lora: peft's LoRA, exact, for vLLM, SGLang, LoRAX, TGI",
        choices=EXPORT_FORMATS,
    )
    dtype: str = option(
        "float32",
        "of the saved numbers (float16: lora only); float32 keeps a LoRA export exact",
        choices=sorted(LORA_DTYPES),
    )
    rank: int | None = option(
        None,
        "lora only: a lower LoRA rank for engines with a cap (vLLM 512), by a truncated SVD per layer; "
        "prints each layer's error",
    )
    eval_data: str | None = option(
        None,
        "lora only: a data file (as qvera train reads) to print the held-out loss of the adapter and of the export",
    )
    save_projection: bool = option(False, "peft only: also store A and B (peft's save_projection)")


@dataclass
class ConvertOptions:
    _argument_group_name = "convert"

    base: str = required("the base model the adapter was trained on (name, hub id or folder)")
    dtype: str = option("float32", "of the saved vectors", choices=sorted(DTYPES))


@dataclass
class LoadCheckOptions:
    _argument_group_name = "load-check"

    prompt: str = option("Hello", "the message both answer")
    max_new_tokens: int = option(LOAD_CHECK_TOKENS, "length of each greedy reply, in tokens")


def inspect(folder: Folder) -> None:
    print(describe(read_any(folder.adapter), folder.adapter))


def export(folder: Folder, written: Written, options: ExportOptions) -> None:
    if (options.rank is not None or options.eval_data) and options.to != "lora":
        raise ValueError("--rank and --eval-data apply to --to lora only; a VeRA adapter keeps its rank")
    adapter = read_adapter(folder.adapter)
    if options.to == "peft":
        export_peft(adapter, written.out, save_projection=options.save_projection)
    elif options.to == "lora":
        print(export_lora(adapter, written.out, dtype=LORA_DTYPES[options.dtype], rank=options.rank).summary())
        if options.eval_data:
            print(heldout_change(adapter, written.out, options.eval_data))
    elif options.dtype not in DTYPES:
        raise ValueError(f"qvera adapters are saved as {' or '.join(sorted(DTYPES))}, not {options.dtype}")
    else:
        write_adapter(adapter, written.out, dtype=DTYPES[options.dtype])
    print(f"wrote {options.to} adapter {written.out}")


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


def convert(folder: Folder, written: Written, options: ConvertOptions) -> None:
    adapter = complete_from_model(import_peft(folder.adapter), meta_base(options.base))
    write_adapter(adapter, written.out, dtype=DTYPES[options.dtype])
    print(f"wrote qvera adapter {written.out}")


def merge(folder: Folder, written: Written, on: OnBase) -> None:
    model, tokenizer = load_adapted(ModelConfig(name=on.base or "", quantization=on.quantization), folder.adapter)
    merge_to_folder(model, tokenizer, written.out)
    print(f"wrote merged bf16 model {written.out}")


def load_check(folder: Folder, on: OnBase, options: LoadCheckOptions) -> None:
    """The adapter's greedy reply beside the base's, both in one batch (checked before loading)."""
    name = on.base or read_any(folder.adapter).config.base_model.name
    if not name:
        raise ValueError(f"{folder.adapter} does not name its base model; pass the base's name or folder with --base")
    base = ModelConfig(name=name, quantization=on.quantization)
    (adapter,) = read_adapters_for(base, [folder.adapter])
    model, tokenizer = load_base(base)
    sampling = dataclasses.replace(GREEDY, max_new_tokens=options.max_new_tokens)
    prompts, adapters = [options.prompt] * 2, [None, folder.adapter]
    base_reply, adapted_reply = reply_batch(model, tokenizer, prompts, adapters, sampling=sampling)
    print(describe(adapter, folder.adapter))
    print(f"loaded onto {model.qvera_base_name} ({on.quantization}); greedy replies to {options.prompt!r}:")
    print(f"  base:    {base_reply!r}")
    print(f"  adapter: {adapted_reply!r}")


COMMANDS = [
    Command(
        "inspect",
        "print rank, targets, sizes, base model and fingerprint of an adapter folder (qvera or peft)",
        "Print an adapter folder's rank, targets, sizes, base model and fingerprint; qvera's or peft's VeRA.",
        inspect,
        options=(Folder,),
    ),
    Command(
        "export",
        "rewrite a qvera adapter: as bf16, in peft's VeRA format, or as a peft LoRA (DoRA) for serving engines",
        "Rewrite a qvera adapter: in qvera's format (bf16 halves it), in peft's VeRA format, or as an exact\n"
        "peft LoRA (DoRA for DVoRA) that vLLM, SGLang, LoRAX and TGI serve. docs/export.md has the details.",
        export,
        options=(Folder, Written, ExportOptions),
    ),
    Command(
        "convert",
        "convert a peft VeRA adapter to a qvera adapter (reads only the base's config)",
        "Convert a peft VeRA adapter to a qvera adapter; reads only the base's config, not its weights.",
        convert,
        options=(Folder, Written, ConvertOptions),
    ),
    Command(
        "merge",
        "write a plain bf16 transformers folder with the adapter merged in",
        "Write a plain bf16 transformers folder with the adapter merged into the base's weights.",
        merge,
        options=(Folder, Written, OnBase),
    ),
    Command(
        "load-check",
        "load the base and the adapter; print a short greedy reply of each",
        "Load the base and the adapter, then print the adapter's description and a short greedy reply\n"
        "of the base and of the adapter to one prompt, side by side.",
        load_check,
        options=(Folder, OnBase, LoadCheckOptions),
    ),
]
