"""Adapter folders: round trip, one-call attach on 4-bit and full-precision bases, every
mismatch failing with one clear line, atomic writes, many adapters on one base, sizes."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    RANK,
    REPO,
    adapted,
    logits,
    randomize_vectors,
    save_tiny_llama,
    tiny_llama_config,
)
from safetensors import safe_open

from experiments.profiling import llama2_7b_adapter_size
from qvera import ModelConfig, VeraConfig, attach_vera, load_base
from qvera.adapters.atomic import FolderWriteError
from qvera.adapters.fit import check_fits, projections_fingerprint
from qvera.adapters.format import (
    CONFIG_FILE,
    VECTORS_FILE,
    adapter_size,
    config_checksum,
    read_adapter,
    save_adapter,
    serialize_vectors,
)
from qvera.adapters.loading import attach_adapter, read_adapters_for, read_any
from qvera.core.attach import shared_projections, vector_state, vera_layers
from qvera.core.vera import generate_projections
from qvera.generation.bank import AdapterBank


@pytest.fixture(scope="module")
def fp32_adapter(tiny_llama_dir, tmp_path_factory):
    """An adapter saved from a full-precision base, with the logits it gave."""
    model, tokenizer = adapted(tiny_llama_dir)
    folder = save_adapter(model, tmp_path_factory.mktemp("adapters") / "a")
    return folder, vector_state(model), logits(model, tokenizer)


def test_round_trip_keeps_vectors_and_describes_the_adapter(tiny_llama_dir, fp32_adapter):
    folder, vectors, _ = fp32_adapter
    adapter = read_adapter(folder)
    assert adapter.vectors.keys() == vectors.keys()
    for key, value in vectors.items():
        assert torch.equal(adapter.vectors[key], value)
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["format_version"] == 1 and config["qvera_version"] == "0.1.0"
    assert (config["rank"], config["seed"], config["d_initial"]) == (RANK, 0, 0.1)
    assert config["targets"]["model.layers.0.self_attn.k_proj"] == [32, 64]  # GQA: k is narrower than q
    assert config["targets"]["model.layers.1.mlp.down_proj"] == [64, 160]
    assert len(config["targets"]) == 14
    assert config["base_model"]["name"] == str(tiny_llama_dir) and len(config["base_model"]["content_hash"]) == 64
    A, B = generate_projections(RANK, 160, 160, 0)
    assert config["projections"] == {
        "dtype": "float32",
        "A": [RANK, 160],
        "B": [160, RANK],
        "fingerprint": projections_fingerprint(A, B),
    }
    with safe_open(folder / VECTORS_FILE, "pt") as f:  # no A or B inside
        assert all(k.endswith((".lambda_d", ".lambda_b")) for k in f.keys())
    assert "rank 8" in (folder / "README.md").read_text()


def test_bf16_vectors_halve_the_file(tiny_llama_dir, tmp_path):
    model, _ = adapted(tiny_llama_dir)
    fp32 = save_adapter(model, tmp_path / "fp32")
    bf16 = save_adapter(model, tmp_path / "bf16", dtype=torch.bfloat16)
    size = adapter_size(model)
    assert (fp32 / VECTORS_FILE).stat().st_size == size["float32_bytes"]
    assert (bf16 / VECTORS_FILE).stat().st_size == size["bfloat16_bytes"]
    assert size["float32_bytes"] - size["bfloat16_bytes"] > 1.9 * size["parameters"]  # 2 bytes a number saved
    for key, value in read_adapter(bf16).vectors.items():
        assert value.dtype == torch.float32 and torch.equal(value, vector_state(model)[key].bfloat16().float())
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        save_adapter(model, tmp_path / "fp16", dtype=torch.float16)


@pytest.mark.parametrize("quantization", ["nf4", "fp32"])
def test_attach_adapter_in_one_call_gives_the_saved_logits(tiny_llama_dir, tmp_path, quantization):
    model, tokenizer = adapted(tiny_llama_dir, quantization)
    expected = logits(model, tokenizer)
    save_adapter(model, tmp_path / "a")
    fresh, _ = load_base(ModelConfig(name=str(tiny_llama_dir), quantization=quantization))
    assert attach_adapter(fresh, tmp_path / "a") is fresh
    assert torch.equal(logits(fresh, tokenizer), expected)
    for layer in vera_layers(fresh).values():
        layer.lambda_b.data.zero_()
    assert (expected - logits(fresh, tokenizer)).abs().max() > 0.1  # the adapter does change the output


def test_attach_adapter_on_attached_model_loads_vectors(tiny_llama_dir, fp32_adapter):
    folder, _, expected = fp32_adapter
    model, tokenizer = adapted(tiny_llama_dir, seed=7)
    attach_adapter(model, folder)
    assert torch.allclose(logits(model, tokenizer), expected, atol=1e-5, rtol=0)


def _edit_config(folder, **changes):
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            config[section][field] = value
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def _old_style(folder):
    """As adapters were written before qvera_adapter.json carried its own checksum."""
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text())
    del config["checksum"]
    path.write_text(json.dumps(config))


def _copy(folder, tmp_path):
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "copy"))


@pytest.mark.parametrize(
    "make_model, match",
    [
        (lambda d: load_base(ModelConfig(name=d["other_base"], quantization="fp32"))[0], "made for another base model"),
        (
            lambda d: _hand_built(intermediate_size=128),
            r"layer model\.layers\.0\.mlp\.down_proj is \(64, 160\) in the adapter but \(64, 128\)",
        ),
        (
            lambda d: attach_vera(_hand_built(), VeraConfig(rank=RANK, target_modules=["q_proj", "v_proj"])),
            "targets other layers",
        ),
        (
            lambda d: attach_vera(_hand_built(), VeraConfig(rank=RANK, projection_seed=3)),
            "trained with projection seed 0, this model's VeRA uses seed 3",
        ),
        (lambda d: attach_vera(_hand_built(), VeraConfig(rank=16)), "has rank 8, this model's VeRA has rank 16"),
    ],
    ids=["base", "shapes", "targets", "seed", "rank"],
)
def test_mismatch_fails_with_one_line_before_computing(fp32_adapter, tmp_path, make_model, match):
    folder = fp32_adapter[0]
    model = make_model({"other_base": save_tiny_llama(tmp_path / "other", dtype=torch.float32, seed=5)})
    attached_before = hasattr(model, "vera_projections")
    with pytest.raises(ValueError, match=match) as err:
        attach_adapter(model, folder)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(folder))  # names the folder
    with pytest.raises(ValueError, match=match):
        check_fits(read_adapter(folder), model)
    assert hasattr(model, "vera_projections") == attached_before  # nothing was attached


def _hand_built(**overrides):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_llama_config(**overrides))  # no name, no folder: shapes decide


@pytest.mark.parametrize(
    "damage, match",
    [
        (
            lambda f: (_old_style(f), _edit_config(f, projections__fingerprint="0" * 64)),
            "projections regenerated from seed 0 do not match its fingerprint",
        ),
        (lambda f: _edit_config(f, format_version=4), "format version 4, newer than this qvera reads"),
        (lambda f: _truncate(f / VECTORS_FILE), "vectors.safetensors is truncated or corrupted"),
        (lambda f: _flip_byte(f / VECTORS_FILE), "vectors.safetensors is truncated or corrupted"),
        (lambda f: _truncate(f / CONFIG_FILE), "qvera_adapter.json is truncated or corrupted"),
        (lambda f: (f / VECTORS_FILE).unlink(), "vectors.safetensors is missing"),
        (
            lambda f: (f / CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000),
            "qvera_adapter.json is not a qvera adapter description; export the adapter again",
        ),
    ],
    ids=["fingerprint", "version", "truncated", "corrupted", "config", "missing", "nested"],
)
def test_damaged_or_foreign_adapter_fails_with_one_line(tiny_llama_dir, fp32_adapter, tmp_path, damage, match):
    folder = _copy(fp32_adapter[0], tmp_path)
    damage(folder)
    model, _ = load_base(ModelConfig(name=str(tiny_llama_dir), quantization="fp32"))
    with pytest.raises(ValueError, match=match) as err:
        attach_adapter(model, folder)
    assert "\n" not in str(err.value)
    assert not hasattr(model, "vera_projections")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


EDITED = r"qvera_adapter.json was edited after export \(its checksum does not match\): "
DOWN = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"seed": 5}, EDITED + "seed 5 does not regenerate the projections its fingerprint records"),
        ({"rank": 16}, EDITED + "rank is 16, the vectors have rank 8"),
        ({f"targets__{DOWN}": [80, 160]}, EDITED + f"targets gives {DOWN} 80 outputs, its lambda_b has 64"),
        (
            {f"targets__{DOWN}": [64, 200]},
            EDITED + r"projections.A and B are \[8, 160\] and \[160, 8\], the targets imply \[8, 200\]",
        ),
        ({"d_initial": 0.5}, EDITED + "which field changed cannot be told, it is one the vectors do not vouch for"),
    ],
    ids=["seed", "rank", "out-width", "in-width", "d_initial"],
)
def test_a_hand_edit_is_reported_as_an_edit_naming_the_field(tiny_llama_dir, fp32_adapter, tmp_path, changes, match):
    folder = _copy(fp32_adapter[0], tmp_path)
    _edit_config(folder, **changes)
    model, _ = load_base(ModelConfig(name=str(tiny_llama_dir), quantization="fp32"))
    with pytest.raises(ValueError, match=match + ".*restore the original file or export the adapter again$") as err:
        attach_adapter(model, folder)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(folder / CONFIG_FILE))
    with pytest.raises(ValueError, match=match):
        read_adapter(folder)  # without a model too: `qvera inspect` reads it so


def test_an_adapter_without_checksum_still_loads_and_names_an_edited_rank(fp32_adapter, tmp_path):
    folder = _copy(fp32_adapter[0], tmp_path)
    _old_style(folder)
    assert read_adapter(folder).vectors.keys() == fp32_adapter[1].keys()
    _edit_config(folder, rank=16)
    with pytest.raises(
        ValueError,
        match=r"vectors.safetensors does not match qvera_adapter.json \(rank 16\): "
        r"model.layers.0.mlp.down_proj.lambda_d is of shape \(8,\) in the vectors, of shape \(16,\) in",
    ):
        read_adapter(folder)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"format_version": "2"}, 'format_version is "2" \\(a string\\), expected an integer'),
        ({"vectors": None}, "vectors is null, expected an object"),
        ({"rank": 0}, "rank is 0 \\(an integer\\), expected a positive integer"),
        ({"targets": []}, r"targets is \[\] \(a list\), expected an object mapping each layer name to \[out, in\]"),
        ({"base_model__name": 7}, r"base_model.name is 7 \(an integer\), expected a string or null"),
        ({"projections__A": "big"}, r'projections.A is "big" \(a string\), expected \[rank, in\] or null'),
        ({"d_initial": float("nan")}, r"d_initial is NaN \(a number\), expected a finite number"),
    ],
    ids=["format_version", "vectors", "rank", "targets", "base-name", "projections", "d_initial"],
)
def test_a_field_of_the_wrong_type_fails_in_one_line_naming_it(fp32_adapter, tmp_path, changes, match):
    folder = _copy(fp32_adapter[0], tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(
        ValueError, match=f"^{re.escape(str(folder / CONFIG_FILE))}: {match}; export the adapter again$"
    ):
        read_adapter(folder)


def test_not_an_adapter_folder(tmp_path):
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a peft adapter; read it with qvera.peft_interop.import_peft"):
        read_adapter(tmp_path / "peft")
    with pytest.raises(ValueError, match="not a qvera adapter folder"):
        read_adapter(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_adapter(tmp_path / "nowhere")


def test_failed_write_keeps_the_previous_adapter(tiny_llama_dir, fp32_adapter, tmp_path, monkeypatch):
    folder = _copy(fp32_adapter[0], tmp_path)
    model, _ = adapted(tiny_llama_dir, seed=9)
    real_write = Path.write_bytes

    def half_then_fail(self, data):
        real_write(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    with pytest.raises(FolderWriteError, match=f"^no space left on device writing {re.escape(str(folder))} "):
        save_adapter(model, folder)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no staging folder left behind
    for key, value in read_adapter(folder).vectors.items():
        assert torch.equal(value, fp32_adapter[1][key])


def _replace_vectors(folder, data: bytes) -> None:
    """Put `data` in vectors.safetensors with qvera_adapter.json's checksums recomputed to
    match: what a crafted folder looks like."""
    (folder / VECTORS_FILE).write_bytes(data)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["vectors"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    config["checksum"] = config_checksum(config)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def _with(vectors, key, value):
    vectors = {k: v.clone() for k, v in vectors.items()}
    vectors[key][1] = value
    return vectors


Q = "model.layers.0.self_attn.q_proj"
NOT_SAFETENSORS = r" is not a safetensors file qvera reads \(.+\); export the adapter again with save_adapter$"


@pytest.mark.parametrize(
    "data, match",
    [
        (lambda v: pickle.dumps(v), NOT_SAFETENSORS),
        (lambda v: _torch_save(v), NOT_SAFETENSORS),
        (
            lambda v: _header({"x": {"dtype": "F8_E8M0", "shape": [2], "data_offsets": [0, 2]}}) + b"\0\0",
            NOT_SAFETENSORS,
        ),
        (
            lambda v: serialize_vectors(_with(v, f"{Q}.lambda_d", float("nan")), torch.float32),
            rf": {Q}.lambda_d holds 1 NaN or infinite number of 8, so the model would give NaN; its training "
            "diverged: train it again with a lower learning rate or use an earlier checkpoint$",
        ),
        (
            lambda v: serialize_vectors(_with(v, f"{Q}.lambda_b", -float("inf")), torch.float32),
            rf": {Q}.lambda_b holds 1 NaN or infinite number of 64, so the model would give NaN",
        ),
        (
            lambda v: serialize_vectors({k: t.round().long() for k, t in v.items()}, torch.int64),
            r": model.layers.0.mlp.down_proj.lambda_b is int64, qvera_adapter.json says float32; export the adapter",
        ),
    ],
    ids=["pickle", "torch.save", "f8_e8m0", "nan", "inf", "int64"],
)
def test_crafted_vectors_fail_in_one_line_in_every_reader(tiny_llama_dir, fp32_adapter, tmp_path, data, match):
    """Checksums recomputed to match, so only reading the vectors themselves can tell: each
    reader (inspect and export, load-check, chat.py and the server, attach_adapter) raises one
    line naming the file."""
    folder = _copy(fp32_adapter[0], tmp_path)
    _replace_vectors(folder, data(fp32_adapter[1]))
    model, _ = load_base(ModelConfig(name=str(tiny_llama_dir), quantization="fp32"))
    readers = [
        read_adapter,
        read_any,
        lambda f: read_adapters_for(str(tiny_llama_dir), [f]),
        lambda f: attach_adapter(model, f),
    ]
    for reader in readers:
        with pytest.raises(ValueError, match=f"^{re.escape(str(folder / VECTORS_FILE))}" + match) as err:
            reader(folder)
        assert "\n" not in str(err.value)
    assert not hasattr(model, "vera_projections")


def _header(header: dict) -> bytes:
    """The start of a safetensors file: its header's length, then the header."""
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text


def _torch_save(vectors) -> bytes:
    buffer = io.BytesIO()
    torch.save(vectors, buffer)
    return buffer.getvalue()


def test_non_finite_vectors_are_not_saved(tiny_llama_dir, fp32_adapter, tmp_path):
    folder = _copy(fp32_adapter[0], tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    model, _ = adapted(tiny_llama_dir)
    with torch.no_grad():
        vera_layers(model)["model.layers.1.mlp.up_proj"].lambda_b[3] = float("nan")
    with pytest.raises(
        ValueError,
        match=f"^not saving {re.escape(str(folder))}: model.layers.1.mlp.up_proj.lambda_b holds 1 NaN or infinite "
        "number of 160; the training diverged, resume from an earlier checkpoint with a lower learning rate$",
    ):
        save_adapter(model, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    with pytest.raises(ValueError, match="not saving"):
        save_adapter(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


KILLED_WRITE = """
import os, signal, sys
from pathlib import Path
from qvera.adapters.format import CONFIG_FILE, read_adapter, write_adapter
adapter = read_adapter(sys.argv[1])
adapter.vectors = {k: v + 1 for k, v in adapter.vectors.items()}
real_write = Path.write_text
def write_half_then_die(self, text):
    if self.name == CONFIG_FILE:
        real_write(self, text[: len(text) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(self, text)
Path.write_text = write_half_then_die
write_adapter(adapter, sys.argv[2])
"""


def test_killed_export_leaves_no_loadable_half_adapter(fp32_adapter, tmp_path):
    folder = _copy(fp32_adapter[0], tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", KILLED_WRITE, str(fp32_adapter[0]), str(folder)], cwd=REPO, capture_output=True
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    for key, value in read_adapter(folder).vectors.items():  # the previous adapter, whole
        assert torch.equal(value, fp32_adapter[1][key])
    (leftover,) = [p for p in tmp_path.iterdir() if p.name != "copy"]
    assert leftover.name.startswith(".copy.tmp-")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        read_adapter(leftover)


def test_refuses_to_replace_a_folder_that_is_not_an_adapter(tiny_llama_dir, tmp_path):
    model, _ = adapted(tiny_llama_dir)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="already holds other files \\(notes.txt\\)"):
        save_adapter(model, tmp_path / "run")
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"


def test_many_adapters_share_one_base_and_one_pair_of_projections(tiny_llama_dir, tmp_path):
    model, tokenizer = load_base(ModelConfig(name=str(tiny_llama_dir), quantization="nf4"))
    expected = {}
    attach_vera(model, VeraConfig(rank=RANK))
    for seed in (1, 2, 3):
        randomize_vectors(model, seed)
        expected[f"a{seed}"] = logits(model, tokenizer)
        save_adapter(model, tmp_path / f"a{seed}")
    A = shared_projections(model).A
    bank = AdapterBank(model)
    for name in expected:
        bank.add(name, read_adapter(tmp_path / name).vectors)
    assert bank.names() == ["a1", "a2", "a3"]
    for name in ["a2", "a1", "a3"]:
        bank.activate(name)
        assert torch.equal(logits(model, tokenizer), expected[name])
    assert len({layer.projections[0].A.data_ptr() for layer in vera_layers(model).values()}) == 1
    assert shared_projections(model).A.data_ptr() == A.data_ptr()
    stored = [t for vectors in bank.adapters.values() for t in vectors.values()]
    assert max(t.numel() for t in stored) < A.numel()  # the bank keeps vectors only
    bank.remove("a3")
    assert bank.names() == ["a1", "a2"]
    with pytest.raises(KeyError, match="no adapter named 'a3'"):
        bank.activate("a3")


def test_adapter_size_is_exact_and_llama2_7b_is_as_the_docs_say():
    from qvera.adapters.loading import meta_model

    model = attach_vera(meta_model(tiny_llama_config()), VeraConfig(rank=RANK))
    # per layer: q 64 + k 32 + v 32 + o 64 + gate 160 + up 160 + down 64 outputs, and 7 d vectors of rank 8
    assert adapter_size(model)["parameters"] == 2 * (576 + 7 * RANK)
    size = llama2_7b_adapter_size(512)
    per_layer_out = 4 * 4096 + 2 * 11008 + 4096  # q, k, v, o; gate, up; down
    assert size["parameters"] == 32 * (per_layer_out + 7 * 512) == 1_474_560
    # the safetensors header adds about 100 bytes for each of the 448 vectors
    assert 4 * size["parameters"] < size["float32_bytes"] < 4 * size["parameters"] + 448 * 120
    assert llama2_7b_adapter_size(1024)["parameters"] == 1_589_248  # the paper's "1.6M" at r=1024
    doc = (REPO / "docs" / "adapters.md").read_text()
    for number in size.values():
        assert f"{number:,}" in doc
