"""peft is the oracle: an exported adapter gives qvera's logits under PeftModel, and an
imported peft adapter gives peft's logits under qvera."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import RANK, adapted, logits
from safetensors import safe_open

from qvera import ModelConfig, VeraConfig, attach_vera, load_base
from qvera.adapters.format import adapter_from_model, read_adapter, write_adapter
from qvera.adapters.loading import attach_adapter
from qvera.adapters.peft_interop import complete_from_model, export_peft, import_peft
from qvera.core.attach import vera_layers
from qvera.core.bnb import is_4bit


def peft_model(base_dir, folder, quantization="fp32", compute_dtype="bfloat16"):
    from peft import PeftModel

    base, _ = load_base(ModelConfig(name=str(base_dir), quantization=quantization, compute_dtype=compute_dtype))
    for module in base.modules():
        if is_4bit(module):  # bitsandbytes' CPU repacking crashes on the tiny model's 160-wide layers
            module.support_avx512bf16_for_cpu = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, str(folder))


@pytest.mark.parametrize("save_projection", [False, True])
def test_export_loads_in_peft_with_the_same_logits(tiny_llama_dir, tmp_path, save_projection):
    model, tokenizer = adapted(tiny_llama_dir)
    folder = export_peft(model, tmp_path / "peft", save_projection=save_projection)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["projection_prng_key"], config["save_projection"]) == (
        "VERA",
        RANK,
        0,
        save_projection,
    )
    assert len(config["target_modules"]) == 14
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_d" in keys
    assert ("base_model.vera_A" in keys) == save_projection
    diff = (logits(peft_model(tiny_llama_dir, folder), tokenizer) - logits(model, tokenizer)).abs().max()
    assert diff <= 1e-5


def test_export_on_a_4bit_base_matches_peft(tiny_llama_dir, tmp_path):
    ours, theirs = {}, {}
    for compute_dtype in ("float32", "bfloat16"):
        model, tokenizer = adapted(tiny_llama_dir, "nf4", compute_dtype=compute_dtype)
        ours[compute_dtype] = logits(model, tokenizer)
        folder = export_peft(model, tmp_path / compute_dtype)
        theirs[compute_dtype] = logits(peft_model(tiny_llama_dir, folder, "nf4", compute_dtype), tokenizer)
    # Computing in fp32 on the 4-bit weights, qvera and peft agree exactly ...
    assert (theirs["float32"] - ours["float32"]).abs().max() <= 1e-5
    # ... in bf16 (peft adds the VeRA term in fp32, qvera in bf16) they stay within what bf16
    # rounding alone moves qvera's logits away from that fp32 result.
    rounding = (ours["bfloat16"] - ours["float32"]).abs().max()
    assert (theirs["bfloat16"] - ours["bfloat16"]).abs().max() <= 2 * rounding
    assert (theirs["bfloat16"] - ours["float32"]).abs().max() <= rounding
    for layer in vera_layers(model).values():
        layer.lambda_b.data.zero_()
    assert (logits(model, tokenizer) - ours["bfloat16"]).abs().max() > 10 * rounding  # the tolerance can fail


@pytest.fixture(scope="module", params=[False, True], ids=["seed-only", "saved-projections"])
def peft_adapter(request, tiny_llama_dir, tmp_path_factory):
    """A VeRA adapter made by peft itself on some layers, with seed 3, and peft's logits."""
    from peft import VeraConfig as PeftVeraConfig
    from peft import get_peft_model

    base, tokenizer = load_base(ModelConfig(name=str(tiny_llama_dir), quantization="fp32"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = PeftVeraConfig(
            r=RANK,
            target_modules=["q_proj", "v_proj", "down_proj"],
            projection_prng_key=3,
            save_projection=request.param,
        )
        model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(str(folder))
    return folder, logits(model, tokenizer)


def test_import_gives_peft_logits(tiny_llama_dir, peft_adapter):
    folder, expected = peft_adapter
    model, tokenizer = load_base(ModelConfig(name=str(tiny_llama_dir), quantization="fp32"))
    adapter = import_peft(folder)
    assert (adapter.config.rank, adapter.config.seed) == (RANK, 3)
    assert adapter.config.targets["model.layers.1.mlp.down_proj"] == [64, None]  # peft records no input sizes
    attach_adapter(model, adapter)
    assert len(vera_layers(model)) == 6
    assert (logits(model, tokenizer) - expected).abs().max() <= 1e-5


def test_imported_adapter_saves_as_a_qvera_folder(tiny_llama_dir, peft_adapter, tmp_path):
    folder, expected = peft_adapter
    model, tokenizer = load_base(ModelConfig(name=str(tiny_llama_dir), quantization="fp32"))
    completed = complete_from_model(import_peft(folder), model)
    assert completed.config.targets["model.layers.1.mlp.down_proj"] == [64, 160]
    write_adapter(completed, tmp_path / "qvera")
    attach_adapter(model, read_adapter(tmp_path / "qvera"))
    assert (logits(model, tokenizer) - expected).abs().max() <= 1e-5
    # and back to peft: the same vectors under peft's names
    back = export_peft(read_adapter(tmp_path / "qvera"), tmp_path / "peft-again")
    with (
        safe_open(folder / "adapter_model.safetensors", "pt") as a,
        safe_open(back / "adapter_model.safetensors", "pt") as b,
    ):
        for key in b.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key))


def test_import_without_a_model_reads_what_the_folder_says(peft_adapter):
    adapter = import_peft(peft_adapter[0])
    assert adapter.config.targets["model.layers.0.self_attn.v_proj"] == [32, None]  # inputs need the base
    assert len(adapter.vectors) == 12


def test_saved_projections_that_the_seed_does_not_give_are_refused(tiny_llama_dir, tmp_path):
    model, _ = adapted(tiny_llama_dir)
    folder = export_peft(model, tmp_path / "peft", save_projection=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["projection_prng_key"] = 5
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="saved projections differ from those projection_prng_key=5 generates"):
        import_peft(folder)


def test_import_checks_the_model(tiny_llama_dir, peft_adapter, tmp_path):
    folder = peft_adapter[0]
    model, _ = load_base(ModelConfig(name=str(tiny_llama_dir), quantization="fp32"))
    attach_vera(model, VeraConfig(rank=RANK, projection_seed=3))
    with pytest.raises(ValueError, match="targets other layers than this model's VeRA"):
        complete_from_model(import_peft(folder), model)
    with pytest.raises(ValueError, match="targets other layers than this model's VeRA"):
        attach_adapter(model, import_peft(folder))
    lora = tmp_path / "lora"
    shutil.copytree(folder, lora)
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match="is a LORA adapter, not VeRA"):
        import_peft(lora)
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        import_peft(tmp_path)


def test_export_names_a_base_peft_can_load(tiny_llama_dir, smollm2_dir, tmp_path):
    """qvera's own base names mean nothing to peft: the built-in base is written as its folder."""
    adapter = adapter_from_model(adapted(tiny_llama_dir)[0])
    folder = export_peft(adapter, tmp_path / "folder-base")
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_llama_dir
    adapter.config.base_model.name = "smollm2-135m"
    folder = export_peft(adapter, tmp_path / "builtin-base")
    written = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert written == str(Path(smollm2_dir).resolve()) and (Path(written) / "config.json").is_file()
