"""No client input yields a 5xx: a few thousand random requests to 127.0.0.1, bounded in count
and time (malformed and oversized bodies, odd model names, unicode, numbers at type limits,
fields of the wrong type), then the server is alive and answers a normal request."""

import json
import random
import threading
import time
from collections import Counter

import httpx
import pytest
import torch
from conftest import save_tiny_llama

from qvera import ModelConfig, VeraConfig, attach_vera, load_base
from qvera.adapters import save_adapter
from qvera.generation.decode import Sampling
from qvera.serving.app import ServeOptions, Server

REQUESTS, SECONDS, CLIENTS = 2500, 30.0, 16
NUMBERS = [0, 1, 2, -1, 7, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30]
NUMBERS += [0.0, 0.5, -0.0, 1e-320, 1e308, -1e308, 3.5, float("nan"), float("inf"), float("-inf")]
TEXTS = [
    "",
    " ",
    "hi",
    "a" * 5000,
    "🙂" * 50,
    "\u0000",
    "\ud800",
    "\udfff x",
    "e\u0301",
    "\u202e",
    "日本語",
    "%00",
    "\\",
]
NAMES = ["a", "b", "base", ".a", "..", ".", "a/../a", "/etc/passwd", "a\\b", "x" * 300, "x" * 5000, "a\u0000", "ä"]
NAMES += ["CON", "a" + "/" * 10, "\ud800", "a b", "%2e%2e", "-", "*"]


def value(rng: random.Random, depth=0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice(NUMBERS)
    if kind == 1:
        return rng.choice(TEXTS + NAMES)
    if kind == 2:
        return rng.choice([None, True, False])
    if kind == 3:
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(12)))
    if kind == 4:
        return rng.randrange(-(2**70), 2**70)
    if kind in (5, 6):
        return [value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice(["role", "content", "type", "text", "x"]): value(rng, depth + 1) for _ in range(rng.randrange(4))
    }


def valid(rng: random.Random, chat: bool) -> dict:
    body = {"model": rng.choice(["a", "b", "base"]), "max_tokens": rng.choice([1, 2])}
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(TEXTS[:5])}]
    else:
        body["prompt"] = rng.choice(["Rivers", "hi there"])
    return body


FIELDS = [
    "model", "messages", "prompt", "n", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop",
    "seed", "logprobs", "top_logprobs", "stream", "stream_options", "logit_bias", "response_format", "user",
    "presence_penalty", "frequency_penalty", "echo", "suffix", "best_of", "tools", "\u0000",
]  # fmt: skip


def body(rng: random.Random, chat: bool, limit: int) -> bytes:
    kind = rng.randrange(10)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if kind == 1:
        depth = rng.choice([10, 1000, 50_000])
        return b'{"model": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == 2:
        return json.dumps({**valid(rng, chat), "pad": "x" * (limit + rng.randrange(10))}).encode()
    request = valid(rng, chat)
    for _ in range(rng.randrange(1, 4)):
        field = rng.choice(FIELDS)
        request[field] = rng.choice(NAMES) if field == "model" and rng.random() < 0.5 else value(rng)
    if kind == 3:
        request = value(rng)
    text = json.dumps(request, ensure_ascii=rng.random() < 0.5)
    if kind == 4 and text:  # cut short
        text = text[: rng.randrange(len(text))]
    return text.encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    base = save_tiny_llama(root / "base", dtype=torch.float32)
    model, tokenizer = load_base(ModelConfig(name=base, quantization="fp32"))
    attach_vera(model, VeraConfig(rank=16, projection_seed=3))
    for name in ("a", "b"):
        save_adapter(model, root / "adapters" / name)
    options = ServeOptions(max_body_bytes=20_000, defaults=Sampling(0.7, 0.9, 2))
    server = Server(model, tokenizer, root / "adapters", options)
    server.base_name = "base"
    url = server.start()
    yield server, url
    server.close()


def test_random_requests_never_get_a_5xx(server):
    server, url = server
    rng = random.Random(0)
    requests = []
    for _ in range(REQUESTS):
        path = rng.choice(["/chat/completions", "/completions", "/models/" + rng.choice(NAMES).replace("\u0000", "")])
        content = body(rng, path == "/chat/completions", 20_000)
        requests.append((path, content, rng.choice(["application/json", "text/plain", "text/json; charset=latin-1"])))
    deadline = time.monotonic() + SECONDS
    statuses, problems = Counter(), []

    def send(share):  # one connection each: a reply takes a round trip, so they go side by side
        with httpx.Client(base_url=url, timeout=30) as client:
            for path, content, kind in share:
                if time.monotonic() > deadline:
                    return
                try:
                    if path.startswith("/models/"):
                        reply = client.get(path)
                    else:
                        reply = client.post(path, content=content, headers={"content-type": kind})
                except UnicodeEncodeError:  # a name the client cannot put in a URL: nothing sent
                    continue
                statuses[reply.status_code] += 1
                if reply.status_code >= 500 or (reply.status_code >= 400 and not reply.json()["error"]["message"]):
                    problems.append((content[:200], reply.status_code, reply.text[:200]))

    threads = [threading.Thread(target=send, args=(requests[i::CLIENTS],)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not problems, problems[:3]
    assert sum(statuses.values()) >= 2000 and statuses[200] > 100 and statuses[400] > 1000, statuses
    with httpx.Client(base_url=url, timeout=30) as client:
        ok = client.post("/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "Hi"}]})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None
    assert server.scheduler.thread.is_alive() and server.scheduler.stats.failed == 0
    assert not +server.store.pins
