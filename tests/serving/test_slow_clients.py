"""Slow clients cannot starve normal ones: hundreds of sockets sending a request a byte at a
time (a slow-loris attack, on 127.0.0.1 only, bounded in sockets and time) while a normal
client keeps getting 200s; the slow sockets are closed once their read deadline passes."""

import socket
import time

import httpx
import pytest
import torch
from conftest import save_tiny_llama

from qvera import ModelConfig, VeraConfig, attach_vera, load_base
from qvera.adapters import save_adapter
from qvera.serving.app import ServeOptions, Server

SLOW_SOCKETS = 600  # more than uvicorn's connection limit the server once had (512)
READ_TIMEOUT = 3.0
SECONDS = 8.0  # past the read deadline, so the server closes the slow sockets


@pytest.fixture
def server(tmp_path):
    base = save_tiny_llama(tmp_path / "base", dtype=torch.float32)
    model, tokenizer = load_base(ModelConfig(name=base, quantization="fp32"))
    save_adapter(attach_vera(model, VeraConfig(rank=16, projection_seed=3)), tmp_path / "adapters" / "a")
    server = Server(model, tokenizer, tmp_path / "adapters", ServeOptions(read_timeout=READ_TIMEOUT))
    url = server.start()
    yield server, url
    server.close()


def test_clients_sending_a_byte_at_a_time_do_not_starve_a_normal_one(server):
    server, url = server
    host, port = httpx.URL(url).host, httpx.URL(url).port
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
    slow = []
    try:
        for _ in range(SLOW_SOCKETS):
            sock = socket.create_connection((host, port), timeout=5)
            sock.setblocking(False)
            slow.append(sock)
        statuses, closed_by_server, sent = [], set(), 0
        body = {"model": "a", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        started = time.monotonic()
        with httpx.Client(base_url=url, timeout=10) as client:
            while time.monotonic() - started < SECONDS:
                for i, sock in enumerate(slow):
                    if i not in closed_by_server:
                        try:
                            sock.send(request[sent % len(request) : sent % len(request) + 1])
                        except OSError:  # reset or broken pipe: the server closed it
                            closed_by_server.add(i)
                sent += 1
                statuses.append(client.get("/models").status_code)
                statuses.append(client.post("/chat/completions", json=body).status_code)
                time.sleep(0.1)
        assert statuses and set(statuses) == {200}, f"a normal client got {sorted(set(statuses))}"
        for i, sock in enumerate(slow):  # every slow socket was closed by the server
            if i not in closed_by_server:
                sock.setblocking(True)
                sock.settimeout(5)
                try:
                    assert sock.recv(1) == b"", "a slow socket was answered, not closed"
                except ConnectionResetError:
                    pass
    finally:
        for sock in slow:
            sock.close()
