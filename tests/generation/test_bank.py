"""AdapterBank: many adapters beside one base, with upstream peft's VeRA as the per-row oracle."""

import copy
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from peft import VeraConfig as PeftVeraConfig
from peft import get_peft_model
from transformers import LlamaForCausalLM

from qvera import VeraConfig, attach_vera
from qvera.core.attach import vector_state, vera_layers
from qvera.core.methods import METHODS
from qvera.core.vera import SharedProjections, VeraLinear
from qvera.generation.bank import AdapterBank, own_vectors_as_rows, running_rows


def random_state(model, seed):
    generator = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=generator) * (0.1 if k.endswith("lambda_b") else 1)
        for k, v in vector_state(model).items()
    }


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=300)).float()


@pytest.fixture
def bank(base):
    model = attach_vera(copy.deepcopy(base), VeraConfig(rank=24, projection_seed=3))
    bank = AdapterBank(model)
    for seed, name in enumerate(["a", "b", "c"]):
        bank.add(name, random_state(model, seed))
    return bank


def test_mixed_batch_rows_equal_peft_with_each_adapter(base, bank):
    peft_model = get_peft_model(
        copy.deepcopy(base),
        PeftVeraConfig(r=24, target_modules="all-linear", projection_prng_key=3, save_projection=False),
    )
    rows = ["b", None, "a", "b"]
    ids = torch.randint(0, 300, (len(rows), 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), bank.mixed_batch(rows):
        mixed = bank.model(input_ids=ids).logits
    assert all(layer.row_vectors is None for layer in bank.layers.values())
    for row, name in enumerate(rows):
        with torch.no_grad():
            if name is None:
                with peft_model.disable_adapter():
                    expected = peft_model(input_ids=ids[row : row + 1]).logits
            else:
                for layer_name in vera_layers(bank.model):
                    peft_layer = peft_model.base_model.model.get_submodule(layer_name)
                    peft_layer.vera_lambda_d["default"].data = bank.adapters[name][f"{layer_name}.lambda_d"].clone()
                    peft_layer.vera_lambda_b["default"].data = bank.adapters[name][f"{layer_name}.lambda_b"].clone()
                expected = peft_model(input_ids=ids[row : row + 1]).logits
        assert (mixed[row] - expected[0]).abs().max().item() <= 1e-5
    assert (mixed[0] - mixed[2]).abs().max() > 1e-2  # the adapters differ, so the check has teeth


def test_activate_loads_vectors_and_none_runs_the_base(base, bank):
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        bank.activate("c")
        assert torch.equal(
            vector_state(bank.model)["model.layers.0.mlp.up_proj.lambda_b"],
            bank.adapters["c"]["model.layers.0.mlp.up_proj.lambda_b"],
        )
        adapted = bank.model(input_ids=ids).logits
        bank.activate(None)
        assert (bank.model(input_ids=ids).logits - plain).abs().max() <= 1e-6 < (adapted - plain).abs().max()


def test_least_recently_used_adapter_leaves_first(bank):
    bank.max_resident = 3
    bank.activate("a")  # b is now the least recently used
    bank.add("d", random_state(bank.model, 7))
    assert sorted(bank.names()) == ["a", "c", "d"]
    with bank.mixed_batch(["c", None, "a"]):  # a mixed batch counts as use, too
        pass
    bank.add("e", random_state(bank.model, 8))
    assert sorted(bank.names()) == ["a", "c", "e"]
    bank.add("a", random_state(bank.model, 9))  # replacing a resident adapter evicts nothing
    assert sorted(bank.names()) == ["a", "c", "e"]


def test_bank_errors_name_the_problem(base, bank):
    with pytest.raises(ValueError, match="max_resident must be at least 1"):
        AdapterBank(bank.model, max_resident=0)
    with pytest.raises(ValueError, match="no VeRA attached"):
        AdapterBank(copy.deepcopy(base))
    state = random_state(bank.model, 0)
    del state["model.layers.1.self_attn.v_proj.lambda_d"]
    with pytest.raises(ValueError, match="adapter 'x' does not fit this model: missing"):
        bank.add("x", state)
    with pytest.raises(KeyError, match="no adapter named 'zz' is loaded"):
        with bank.mixed_batch(["a", "zz"]):
            pass
    assert all(layer.row_vectors is None for layer in bank.layers.values())


def test_bytes_per_adapter_counts_fp32_vectors(bank):
    numbers = sum(layer.lambda_d.numel() + layer.lambda_b.numel() for layer in bank.layers.values())
    assert bank.bytes_per_adapter() == 4 * numbers
    bank.remove("a")
    assert bank.names() == ["b", "c"]


def test_serving_benchmark_reports_speeds_and_sizes(tiny_llama_dir, tmp_path):
    script = Path(__file__).parents[2] / "experiments" / "bench_serving.py"
    args = [
        "--model",
        tiny_llama_dir,
        "--quantization",
        "fp32",
        "--rank",
        "8",
        "--adapters",
        "3",
        "--new-tokens",
        "3",
        "--repeats",
        "1",
        "--compare-cudnn",
        "--profile",
        str(tmp_path / "profile.txt"),
    ]
    result = subprocess.run(
        [sys.executable, str(script), *args, "--json", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    speed = report["decode_tokens_per_s"]
    assert set(speed) == {"mixed", "single", "loop", "loop_cudnn"} and all(v > 0 for v in speed.values())
    assert report["mixed_over_single"] == pytest.approx(speed["mixed"] / speed["single"])
    assert report["loop_over_loop_cudnn"] == pytest.approx(speed["loop"] / speed["loop_cudnn"])
    # Tiny Llama: 2 layers of q, k, v, o, gate, up, down; b has each layer's output size.
    per_layer = 7 * 8 + 64 + 32 + 32 + 64 + 160 + 160 + 64
    assert report["bytes_per_resident_adapter"] == 4 * 2 * per_layer
    # Llama-2-7B: 32 layers; outputs 4096 (q, k, v, o, down) and 11008 (gate, up).
    llama = 4 * 32 * (7 * 8 + 5 * 4096 + 2 * 11008)
    assert report["llama2_7b"] == {"rank": 8, "bytes_per_adapter": llama, "adapters_per_GB": 10**9 // llama}
    assert "mixed / single = " in result.stdout and "loop without / with cuDNN attention = " in result.stdout
    profile = (tmp_path / "profile.txt").read_text()
    assert profile.startswith("one batch-1 decode on CPU: prompt of ") and "Self CPU" in profile


def test_every_timed_run_of_the_serving_benchmark_meets_new_shapes():
    """A kernel cache keyed on shapes must not serve one run from an earlier one."""
    script = Path(__file__).parents[2] / "experiments" / "bench_serving.py"
    fresh = runpy.run_path(str(script))["FreshShapes"]([[5, 6, 7], [8, 9]])
    first, second = fresh(), fresh()
    assert first == [[5, 5, 6, 7], [8, 8, 9]] and second == [[5, 5, 5, 6, 7], [8, 8, 8, 9]]


def test_serving_benchmark_times_the_servers_batcher_in_both_modes(tiny_llama_dir, tmp_path):
    script = Path(__file__).parents[2] / "experiments" / "bench_serving.py"
    args = ["--model", tiny_llama_dir, "--quantization", "fp32", "--rank", "8", "--adapters", "3"]
    args += ["--new-tokens", "3", "--repeats", "1", "--server", "--json", str(tmp_path / "r.json")]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    speed = report["decode_tokens_per_s"]
    assert set(speed) == {"default", "batch_invariant"} and all(v > 0 for v in speed.values())
    assert report["batch_invariant_over_default"] == pytest.approx(speed["batch_invariant"] / speed["default"])


@pytest.mark.parametrize("method", ["vera", "dvora"])
def test_a_layers_own_vectors_as_rows_give_its_numbers(method):
    """Decoding runs the model's own fp32 vectors as one bf16 row, cast once: bit for bit the
    layer's own output, with DVoRA's output scale too."""
    torch.manual_seed(9)
    base_layer = torch.nn.Linear(24, 20).to(torch.bfloat16).requires_grad_(False)
    layer = VeraLinear(base_layer, SharedProjections(16, 24, 20, seed=0), 0.1, fold=False, method=METHODS[method])
    with torch.no_grad():
        for vector in (layer.lambda_d, layer.lambda_b):
            vector.normal_()
    x = torch.randn(3, 5, 24, dtype=torch.bfloat16)
    layers = {"layer": layer}
    with torch.no_grad():
        own = layer(x)
        with running_rows(layers, own_vectors_as_rows(layers, torch.bfloat16)):
            as_rows = layer(x)
    assert layer.row_vectors is None and torch.equal(as_rows, own)
    assert (own - base_layer(x)).abs().max() > 0.1  # the vectors do change the output
