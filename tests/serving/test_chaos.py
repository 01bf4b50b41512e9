"""A bounded chaos run (127.0.0.1 only, a fixed time): valid requests across several adapters,
streamed or not, interleaved with bad requests, clients hanging up, adapters rewritten and
deleted and a corrupt adapter folder appearing and going. Invariants: every valid request is
answered 200 with its adapter's old or new reply, nothing gets a 5xx, no request waits past
its timeout, the process's memory stays bounded and /health says ok throughout."""

import json
import random
import shutil
import socket
import threading
import time

import httpx
import pytest
import torch
from conftest import save_tiny_llama

from qvera import ModelConfig, VeraConfig, attach_vera, load_base, load_vector_state
from qvera.adapters import save_adapter
from qvera.generation.decode import Sampling, generate
from qvera.serving.app import ServeOptions, Server
from tests.generation.test_generation import random_vectors

SECONDS, TIMEOUT, MAX_TOKENS = 15.0, 15.0, 3
STEADY, FLEETING = ["a", "b", "c"], "d"  # rewritten in turn; deleted and saved again
QUESTION = [{"role": "user", "content": "Tell me about rivers."}]


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos")
    base = save_tiny_llama(root / "base", dtype=torch.float32)
    writer, tokenizer = load_base(ModelConfig(name=base, quantization="fp32"))
    attach_vera(writer, VeraConfig(rank=16, projection_seed=3))
    versions, expected = {}, {}
    for i, name in enumerate([*STEADY, FLEETING]):
        for version in (0, 1):
            vectors = random_vectors(writer, 10 * i + version)
            versions[name, version] = vectors
            load_vector_state(writer, vectors)
            greedy = Sampling(0.0, 1.0, MAX_TOKENS)
            expected[name, version] = generate(writer, tokenizer, [QUESTION], sampling=greedy)[0]
        load_vector_state(writer, versions[name, 0])
        save_adapter(writer, root / "adapters" / name)
    model, tokenizer = load_base(ModelConfig(name=base, quantization="fp32"))
    options = ServeOptions(max_resident=3, prefill_tokens=16, request_timeout=TIMEOUT, read_timeout=5)
    server = Server(model, tokenizer, root / "adapters", options)
    url = server.start()
    yield server, url, writer, versions, expected, root / "adapters"
    server.close()


def test_chaos(setup):
    server, url, writer, versions, expected, folder = setup
    host, port = httpx.URL(url).host, httpx.URL(url).port
    stop_at = time.monotonic() + SECONDS
    valid, bad, health, errors = [], [], [], []
    rss_before = resident_bytes()

    def guarded(loop):
        def run(*args):
            try:
                while time.monotonic() < stop_at:
                    loop(*args)
            except Exception as err:  # reported by the test, not lost in a thread
                errors.append(repr(err))

        return run

    def ask_valid(rng, client):
        name, stream = rng.choice(STEADY), rng.random() < 0.5
        body = {"model": name, "messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
        started = time.monotonic()
        if stream:
            with client.stream("POST", "/chat/completions", json=body) as reply:
                text = "".join(
                    (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                    for line in reply.iter_lines()
                    if line.startswith("data: {")
                )
                status = reply.status_code
        else:
            reply = client.post("/chat/completions", json=body)
            status, text = (
                reply.status_code,
                reply.json()["choices"][0]["message"]["content"] if reply.is_success else reply.text,
            )
        valid.append((name, status, text, time.monotonic() - started))

    def ask_bad(rng, client):
        kind = rng.randrange(6)
        if kind == 0:
            bad.append(client.post("/chat/completions", content=b'{"model": "a", "messages": [').status_code)
        elif kind == 1:
            body = {
                "model": rng.choice(["broken", FLEETING, "nobody", "x" * 300]),
                "messages": QUESTION,
                "max_tokens": 2,
            }
            bad.append(client.post("/chat/completions", json=body).status_code)
        elif kind == 2:
            body = {"model": "a", "messages": QUESTION, "seed": 2**64, "n": rng.randrange(1, 3)}
            bad.append(client.post("/chat/completions", json=body).status_code)
        elif kind == 3:  # hang up before the reply
            body = json.dumps({"model": rng.choice(STEADY), "messages": QUESTION, "max_tokens": 50}).encode()
            with socket.create_connection((host, port)) as sock:
                sock.sendall(
                    f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                time.sleep(rng.random() * 0.05)
        elif kind == 4:  # hang up mid-stream
            body = {"model": rng.choice(STEADY), "messages": QUESTION, "max_tokens": 50, "stream": True}
            with client.stream("POST", "/chat/completions", json=body) as reply:
                bad.append(reply.status_code)
                next(reply.iter_lines(), None)
        else:
            bad.append(client.get(rng.choice(["/models", "/models/broken", "/models/d"])).status_code)

    def clients(seed, ask):
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=TIMEOUT + 10) as client:
            guarded(ask)(rng, client)

    def mutate(rng):
        name = rng.choice(STEADY)
        load_vector_state(writer, versions[name, rng.randrange(2)])
        save_adapter(writer, folder / name)
        if rng.random() < 0.3:
            if (folder / FLEETING).exists():
                shutil.rmtree(folder / FLEETING)
            else:
                load_vector_state(writer, versions[FLEETING, 0])
                save_adapter(writer, folder / FLEETING)
        if rng.random() < 0.3:
            broken = folder / "broken"
            if broken.exists():
                shutil.rmtree(broken)
            else:
                broken.mkdir()
                (broken / "adapter_config.json").write_text('{"qvera": ')
        time.sleep(0.2)

    def poll_health():
        reply = httpx.get(url.replace("/v1", "/health"), timeout=10)
        health.append((reply.status_code, reply.json()["status"]))
        time.sleep(0.2)

    threads = [threading.Thread(target=clients, args=(i, ask_valid)) for i in range(3)]
    threads += [threading.Thread(target=clients, args=(10 + i, ask_bad)) for i in range(2)]
    threads += [threading.Thread(target=guarded(mutate), args=(random.Random(99),))]
    threads += [threading.Thread(target=guarded(poll_health))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SECONDS + TIMEOUT + 20)
    assert not errors, errors[:3]
    assert len(valid) > 30 and len(bad) > 30 and len(health) > 10
    for name, status, text, seconds in valid:
        assert status == 200 and text in (expected[name, 0], expected[name, 1]), (name, status, text)
        assert seconds < TIMEOUT
    assert all(status < 500 for status in bad), sorted(set(bad))
    assert set(health) == {(200, "ok")}
    assert {text == expected[name, 1] for name, _, text, _ in valid} == {True, False}  # both versions were served
    assert resident_bytes() - rss_before < 300 * 2**20
    deadline = time.monotonic() + 10
    while +server.store.pins or sum(server.scheduler.load().values()):
        assert time.monotonic() < deadline, "requests or adapter pins were left behind"
        time.sleep(0.05)
    assert server.scheduler.stats.failed == 0 and server.scheduler.thread.is_alive()
