"""scripts/serve.py and scripts/chat.py refuse what they can check without the base before it
loads (minutes for a 7B model), in one line; serve.py then serves on the port it took first."""

import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import save_tiny_llama
from test_commands import refused

from qvera import ModelConfig, VeraConfig, attach_vera, load_base
from qvera.adapters import save_adapter
from qvera.serving.app import bind_address

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"  # serve.py run as a user runs it


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A folder holding one adapter of a tiny local base."""
    root = tmp_path_factory.mktemp("serve-script")
    base = save_tiny_llama(root / "base", dtype=torch.float32)
    model, _ = load_base(ModelConfig(name=base, quantization="fp32"))
    save_adapter(attach_vera(model, VeraConfig(rank=8)), root / "adapters" / "alpha")
    return base, root / "adapters"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "-3"], "temperature must be >= 0, got -3.0"),
        (["--max-batch-size", "0"], "max_batch_size must be at least 1, got 0"),
        (["--request-timeout", "0"], "request_timeout must be above 0 seconds, got 0.0"),
        (["--port", "99999"], "cannot listen on 127.0.0.1:99999 (port 99999 is outside 0-65535)"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_serve_refuses_bad_options_before_loading_the_base(adapters, monkeypatch, capsys, flags, message):
    base, folder = adapters
    code, line = refused("serve.py", ["--model", base, "--adapters", str(folder), *flags], monkeypatch, capsys)
    assert code == 2 and line.startswith("serve.py: error: ") and message in line


def test_serve_refuses_a_missing_or_empty_adapters_folder_and_a_port_in_use(adapters, tmp_path, monkeypatch, capsys):
    base, folder = adapters
    argv = ["--model", base, "--adapters"]
    code, line = refused("serve.py", [*argv, str(tmp_path / "none")], monkeypatch, capsys)
    assert code == 2 and line.endswith(
        f"adapters folder {tmp_path / 'none'} does not exist; create it and save adapters into it"
    )
    code, line = refused("serve.py", [*argv, str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and line.endswith(f"{tmp_path} holds no adapter; save one there with qvera.adapters.save_adapter")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, line = refused("serve.py", [*argv, str(folder), "--port", str(port)], monkeypatch, capsys)
    assert code == 2 and line.endswith(
        f"cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port or --host"
    )


def test_chat_refuses_an_adapter_of_another_base_before_loading_it(adapters, tmp_path, monkeypatch, capsys):
    base, folder = adapters
    other = save_tiny_llama(tmp_path / "other", dtype=torch.float32, seed=1)
    code, line = refused("chat.py", ["--model", other, "--adapter", str(folder / "alpha")], monkeypatch, capsys)
    assert code == 2 and line.startswith("chat.py: error: ") and "was made for another base model" in line
    code, line = refused("chat.py", ["--model", base, "--adapter", str(tmp_path / "x")], monkeypatch, capsys)
    assert code == 2 and line.endswith(
        f"adapter folder {tmp_path / 'x'} does not exist; pass the folder a training run saved"
    )


def test_serve_answers_on_the_port_it_took_before_loading(adapters):
    base, folder = adapters
    command = [sys.executable, str(SCRIPTS / "serve.py"), "--model", base, "--quantization", "fp32"]
    server = subprocess.Popen(
        [*command, "--adapters", str(folder), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        ready, _, _ = select.select([server.stdout], [], [], 120)
        assert ready, "serve.py printed nothing in 120 s"
        line = server.stdout.readline()
        assert line.startswith("serving ") and " at http://127.0.0.1:" in line, server.stderr.read()
        url = line.split(" at ", 1)[1].strip()
        assert not url.endswith(":0/v1")  # the port the system gave, not the one asked for
        deadline = time.monotonic() + 60
        while True:
            try:
                reply = httpx.get(f"{url}/models", timeout=5)
                break
            except httpx.TransportError:  # bound, not yet listening
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.1)
        assert reply.status_code == 200
        assert "alpha" in [entry["id"] for entry in reply.json()["data"]]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_bind_address_binds_a_host_as_uvicorn_does():
    with bind_address("localhost", 0) as sock:  # a name: IPv4, as uvicorn binds it
        assert sock.family == socket.AF_INET and sock.getsockname()[0] == "127.0.0.1"
    with pytest.raises(ValueError, match="port 70000 is outside 0-65535"):
        bind_address("127.0.0.1", 70000)
