"""The `qvera` command (and scripts/export.py, which calls it)."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, adapted, randomize_vectors

from qvera import ModelConfig, VeraConfig, attach_vera, load_base
from qvera.adapters.format import CONFIG_FILE, read_adapter, save_adapter
from qvera.adapters.lora_export import lora_factors
from qvera.adapters.peft_interop import export_peft
from qvera.cli import main
from qvera.core.attach import vector_state
from qvera.generation.decode import chat_prompt


@pytest.fixture(scope="module")
def saved(tiny_llama_dir, tmp_path_factory):
    """A qvera adapter and the same adapter in peft's format, from a full-precision base."""
    model, _ = adapted(tiny_llama_dir)
    folder = tmp_path_factory.mktemp("cli")
    return save_adapter(model, folder / "qvera"), export_peft(model, folder / "peft"), vector_state(model)


def test_script_help_lists_every_command(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["scripts/export.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "scripts" / "export.py"), run_name="__main__")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("inspect", "export", "convert", "merge", "load-check"):
        assert command in out
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "--help"])
    assert exit_.value.code == 0 and "--base" in capsys.readouterr().out


def test_inspect_qvera_and_peft_folders(saved, tiny_llama_dir, capsys):
    qvera_folder, peft_folder, _ = saved
    assert main(["inspect", str(qvera_folder)]) == 0
    out = capsys.readouterr().out
    fingerprint = read_adapter(qvera_folder).config.projections.fingerprint
    assert "rank:         8 (projection seed 0" in out
    assert "targets:      14 layers: down_proj x2, gate_proj x2, k_proj x2" in out
    assert "parameters:   1,264 (5,056 bytes fp32, 2,528 bytes bf16)" in out
    assert f"base model:   {tiny_llama_dir}" in out and f"fingerprint:  {fingerprint}" in out
    assert "checksum:     verified" in out
    assert main(["inspect", str(peft_folder)]) == 0
    out = capsys.readouterr().out
    assert "format:       peft-vera v0.21.2" in out and "rank:         8" in out and "14 layers" in out
    assert "fingerprint:  not recorded" in out  # peft regenerates A and B from the seed unchecked


def test_export_bf16_and_to_peft(saved, tmp_path):
    qvera_folder, _, vectors = saved
    assert main(["export", str(qvera_folder), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    for key, value in read_adapter(tmp_path / "bf16").vectors.items():
        assert torch.equal(value, vectors[key].bfloat16().float())
    assert main(["export", str(qvera_folder), str(tmp_path / "peft"), "--to", "peft", "--save-projection"]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_convert_peft_reads_only_the_base_config(saved, tiny_llama_dir, tmp_path, monkeypatch):
    qvera_folder, peft_folder, vectors = saved
    monkeypatch.setattr(
        "qvera.adapters.loading.load_base", lambda *a, **k: pytest.fail("convert must not load weights")
    )
    assert main(["convert", str(peft_folder), str(tmp_path / "converted"), "--base", str(tiny_llama_dir)]) == 0
    monkeypatch.undo()
    converted, original = read_adapter(tmp_path / "converted"), read_adapter(qvera_folder)
    for key in ("rank", "seed", "targets", "base_model", "projections"):
        assert getattr(converted.config, key) == getattr(original.config, key), key
    for key, value in converted.vectors.items():
        assert torch.equal(value, vectors[key])


def test_load_check_and_merge(saved, tmp_path, capsys):
    qvera_folder = saved[0]
    assert main(["load-check", str(qvera_folder), "--quantization", "nf4", "--prompt", "Hi"]) == 0
    out = capsys.readouterr().out
    assert "(nf4); greedy replies to 'Hi':" in out
    base, adapter = (eval(line.split(":", 1)[1]) for line in out.splitlines()[-2:])  # the repr of each reply
    assert out.splitlines()[-2].startswith("  base:") and out.splitlines()[-1].startswith("  adapter:")
    assert base != adapter and len(base) > 20 and len(adapter) > 20  # replies, not one token
    assert main(["merge", str(qvera_folder), str(tmp_path / "merged"), "--quantization", "fp32"]) == 0
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / "model.safetensors").is_file()


def test_errors_are_one_line(saved, tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"qvera inspect: error: adapter folder {tmp_path / 'nowhere'} does not exist\n"
    damaged = tmp_path / "damaged"
    main(["export", str(saved[0]), str(damaged)])
    (damaged / "vectors.safetensors").write_bytes(b"\0" * 10)
    assert main(["load-check", str(damaged), "--quantization", "fp32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vectors.safetensors is truncated or corrupted" in err
    with pytest.raises(SystemExit):
        main(["convert", str(saved[1]), str(tmp_path / "x")])  # --base is required
    assert "the following arguments are required: --base" in capsys.readouterr().err


def test_inspect_verifies_the_checksum_and_the_field_types(saved, tmp_path, capsys):
    edited = tmp_path / "edited"
    shutil.copytree(saved[0], edited)
    config = json.loads((edited / CONFIG_FILE).read_text())
    (edited / CONFIG_FILE).write_text(json.dumps({**config, "seed": 5}))
    assert main(["inspect", str(edited)]) == 2
    assert capsys.readouterr().err == (
        f"qvera inspect: error: {edited / CONFIG_FILE} was edited after export (its checksum does not match): "
        "seed 5 does not regenerate the projections its fingerprint records (seed or projections.fingerprint "
        "was changed); restore the original file or export the adapter again\n"
    )
    (edited / CONFIG_FILE).write_text(json.dumps({**config, "format_version": "2"}))
    assert main(["inspect", str(edited)]) == 2
    assert capsys.readouterr().err == (
        f'qvera inspect: error: {edited / CONFIG_FILE}: format_version is "2" (a string), expected an integer; '
        "export the adapter again\n"
    )


def test_smollm2_adapter_loads_from_the_command_line(smollm2_dir, tmp_path, capsys):
    """The real model at the default rank: save, then load-check in one command (a bf16 base:
    loading it in NF4 twice would double this test's time; the tiny tests cover NF4)."""
    model, tokenizer = load_base(ModelConfig(name="smollm2-135m", quantization="bf16"))
    attach_vera(model, VeraConfig())
    randomize_vectors(model, 1)
    with torch.no_grad():
        prompt = chat_prompt(tokenizer, [{"role": "user", "content": "The capital of France is"}])
        expected = tokenizer.decode(model(torch.tensor([prompt])).logits[0, -1].argmax())
    folder = save_adapter(model, tmp_path / "smollm2-adapter", dtype=torch.bfloat16)
    assert main(["load-check", str(folder), "--quantization", "bf16", "--prompt", "The capital of France is"]) == 0
    out = capsys.readouterr().out
    assert "rank:         512" in out and "targets:      210 layers" in out
    assert "loaded onto smollm2-135m (bf16); greedy replies to 'The capital of France is':" in out
    assert out.splitlines()[-1].startswith(f"  adapter: {expected!r}"[:-1])  # the reply goes on from that token


def test_export_to_lora(saved, tmp_path, capsys):
    qvera_folder = saved[0]
    assert main(["export", str(qvera_folder), str(tmp_path / "lora"), "--to", "lora"]) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 8: 17,920 numbers (" in out and "against VeRA's 1,264 (5,056 bytes fp32)" in out
    assert "exact: every layer's update is kept whole" in out
    argv = ["export", str(qvera_folder), str(tmp_path / "lora4"), "--to", "lora", "--rank", "4", "--dtype", "float16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 4: 8,960 numbers" in out and "relative error of ΔW per layer (Frobenius): max " in out
    assert "median " in out and "over 14 layers" in out and "  model.layers." in out  # the worst layers
    config = json.loads((tmp_path / "lora4" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 4)
    assert len(lora_factors(read_adapter(qvera_folder))) == 14
    assert main(["export", str(qvera_folder), str(tmp_path / "x"), "--to", "lora", "--rank", "0"]) == 2
    assert "--rank must be at least 1, not 0" in capsys.readouterr().err
    assert main(["export", str(qvera_folder), str(tmp_path / "x"), "--to", "peft", "--rank", "4"]) == 2
    assert "--rank and --eval-data apply to --to lora only" in capsys.readouterr().err
    assert main(["export", str(qvera_folder), str(tmp_path / "x"), "--dtype", "float16"]) == 2
    assert "qvera adapters are saved as bfloat16 or float32, not float16" in capsys.readouterr().err


def test_disk_errors_are_one_line_naming_the_path(saved, tmp_path, capsys, monkeypatch):
    qvera_folder = saved[0]

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr("pathlib.Path.write_bytes", disk_full)
    for to in ("qvera", "lora"):
        assert main(["export", str(qvera_folder), str(tmp_path / to), "--to", to]) == 1
        err = capsys.readouterr().err
        assert err.startswith("qvera export: error: ") and err.count("\n") == 1
        assert str(tmp_path / to) in err and "no space left on device" in err.lower()
    monkeypatch.undo()

    def failing_disk(folder, *args, **kwargs):  # as a read fails, whatever reads the folder
        raise OSError(5, "Input/output error", str(Path(folder) / CONFIG_FILE))

    monkeypatch.setattr("qvera.cli.adapters.read_any", failing_disk)
    assert main(["inspect", str(qvera_folder)]) == 1
    assert capsys.readouterr().err == f"qvera inspect: error: {qvera_folder / CONFIG_FILE}: Input/output error\n"


def test_lora_export_reports_the_heldout_loss(saved, tmp_path, capsys):
    rows = [("What is the capital of France?", "Paris."), ("Name a primary color.", "Blue."), ("2 + 2?", "4.")]
    data = tmp_path / "heldout.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            for q, a in rows
        )
    )
    losses = {}
    for rank in ("8", "1"):
        argv = ["export", str(saved[0]), str(tmp_path / rank), "--to", "lora", "--rank", rank, "--eval-data", str(data)]
        assert main(argv) == 0
        line = capsys.readouterr().out.splitlines()[-2]
        assert line.startswith(f"held-out loss on {data} (3 examples, ") and "fp32 base): VeRA " in line
        vera, lora = (float(part.split()[-1]) for part in line.split(": ", 1)[1].split(" (")[0].split(", "))
        losses[rank] = vera, lora
    assert losses["8"][1] == pytest.approx(losses["8"][0], abs=1e-4)  # the adapter's rank: exact
    assert abs(losses["1"][1] - losses["1"][0]) > 1e-3  # rank 1 of 8 moves it
