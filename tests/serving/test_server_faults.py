"""The server under faults: client input that once gave 5xx or hung, a worker that dies or
stalls, an adapter rewritten while in use, logprobs of split characters and stop strings."""

import json
import re
import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import save_tiny_llama

from qvera import ModelConfig, VeraConfig, attach_vera, load_base, load_vector_state
from qvera.adapters import save_adapter
from qvera.generation.decode import Sampling, generate
from qvera.generation.sampling import token_logprobs
from qvera.serving.app import ServeOptions, Server
from tests.generation.test_generation import random_vectors

QUESTION = [{"role": "user", "content": "Tell me about rivers."}]


@pytest.fixture(scope="module")
def base_and_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    base = save_tiny_llama(root / "base", dtype=torch.float32)
    model, _ = load_base(ModelConfig(name=base, quantization="fp32"))
    attach_vera(model, VeraConfig(rank=16, projection_seed=3))
    for seed, name in enumerate(["a", "b"]):
        load_vector_state(model, random_vectors(model, seed))
        save_adapter(model, root / "adapters" / name)
    return base, root / "adapters", model


def start(base, folder, **options):
    model, tokenizer = load_base(ModelConfig(name=base, quantization="fp32"))
    server = Server(model, tokenizer, folder, ServeOptions(prefill_tokens=16, **options))
    url = server.start()
    return server, openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def served(base_and_folder):
    server, client = start(*base_and_folder[:2])
    yield server, client
    server.close()


def wait_for(condition, seconds=10):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def post(client, path, content: bytes) -> httpx.Response:
    return httpx.post(f"{client.base_url}{path}", content=content, timeout=30)


def chat(model, **fields) -> bytes:
    return json.dumps({"model": model, "messages": QUESTION, "max_tokens": 4, **fields}).encode()


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("chat/completions", chat("a", seed=2**64), r"'seed' must be a whole number from -9223372036854775808"),
        ("chat/completions", chat("a", seed=-(2**63) - 1), "'seed' must be a whole number"),
        ("chat/completions", chat("a", seed=2**64 - 1, n=2), r"to 18446744073709551614 \(with n=2\)"),
        ("chat/completions", chat("x" * 300), "does not exist"),
        ("chat/completions", chat("a\u0000b"), "does not exist"),
        ("chat/completions", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        ("chat/completions", b'{"model": "a", "max_tokens": 1' + b"0" * 5000 + b"}", "not valid JSON"),
        ("completions", b'{"model": "a", "prompt": "\\ud800 rivers"}', "lone surrogate"),
        ("chat/completions", b'{"model": "a", "messages": [{"role": "user", "content": "\\udfff"}]}', "lone surrogate"),
    ],
)
def test_client_input_gets_a_4xx_and_bystanders_are_answered(served, path, body, message):
    server, client = served
    failed = server.scheduler.stats.failed
    bystander = threading.Thread(
        target=lambda: client.chat.completions.create(model="b", messages=QUESTION, max_tokens=3)
    )
    bystander.start()
    reply = post(client, path, body)
    bystander.join(30)
    assert not bystander.is_alive()
    assert 400 <= reply.status_code < 500, reply.text
    assert re.search(message, reply.json()["error"]["message"]), reply.json()
    assert server.scheduler.stats.failed == failed
    wait_for(lambda: not +server.store.pins)  # released once the step that finished the bystander ends
    assert httpx.get(str(client.base_url).replace("/v1/", "/health")).json()["status"] == "ok"


def test_a_rewritten_adapter_serves_new_requests_while_running_ones_finish_on_theirs(base_and_folder, tmp_path):
    base, folder, writer = base_and_folder
    live = tmp_path / "adapters"
    save_adapter(
        attach_vera(load_base(ModelConfig(name=base, quantization="fp32"))[0], VeraConfig(rank=16, projection_seed=3)),
        live / "live",
    )
    reference, tokenizer = load_base(ModelConfig(name=base, quantization="fp32"))
    attach_vera(reference, VeraConfig(rank=16, projection_seed=3))
    old, new = random_vectors(reference, 10), random_vectors(reference, 11)
    load_vector_state(writer, old)
    save_adapter(writer, live / "live")
    expected = {}
    for version, vectors in (("old", old), ("new", new)):
        load_vector_state(reference, vectors)
        for tokens in (4, 40):
            expected[version, tokens] = generate(reference, tokenizer, [QUESTION], sampling=Sampling(0.0, 1.0, tokens))[
                0
            ]
    assert expected["old", 4] != expected["new", 4]
    server, client = start(base, live)
    try:
        long = iter(
            client.chat.completions.create(model="live", messages=QUESTION, max_tokens=40, temperature=0, stream=True)
        )
        text = next(long).choices[0].delta.content + next(long).choices[0].delta.content
        load_vector_state(writer, new)
        save_adapter(writer, live / "live")
        written = time.monotonic()
        while True:  # a request arriving after the write gets the new vectors within a second
            reply = client.chat.completions.create(model="live", messages=QUESTION, max_tokens=4, temperature=0)
            if reply.choices[0].message.content == expected["new", 4]:
                break
            assert reply.choices[0].message.content == expected["old", 4]
            assert time.monotonic() - written < 1, "the old vectors were still served a second after the write"
        text += "".join(chunk.choices[0].delta.content or "" for chunk in long)
        assert text == expected["old", 40]  # the running request finished on the version it started with
        wait_for(lambda: len(server.store.bank.adapters) == 1)  # the old version leaves once released
        assert server.store.resident() == ["live"]
    finally:
        server.close()


def test_health_says_when_the_worker_stalls_or_dies(base_and_folder):
    server, client = start(*base_and_folder[:2], stall_seconds=0.5)
    health = str(client.base_url).replace("/v1/", "/health")
    try:
        assert httpx.get(health).json()["status"] == "ok"
        blocked, release = threading.Event(), threading.Event()
        real = server.scheduler._decode_step

        def stuck():
            blocked.set()
            release.wait(30)
            real()

        server.scheduler._decode_step = stuck
        asked = threading.Thread(
            target=lambda: client.chat.completions.create(model="a", messages=QUESTION, max_tokens=3)
        )
        asked.start()
        assert blocked.wait(30)
        time.sleep(1)
        reply = httpx.get(health)
        assert reply.status_code == 503 and "has not stepped for" in reply.json()["reason"]
        release.set()
        asked.join(30)
        assert httpx.get(health).json()["status"] == "ok"

        def broken():
            raise RuntimeError("a bug in the worker")

        server.scheduler._drop_gone = broken
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="a", messages=QUESTION, max_tokens=3)
        assert caught.value.status_code == 503 and "RuntimeError: a bug in the worker" in caught.value.message
        reply = httpx.get(health)
        assert reply.status_code == 503 and "stopped (RuntimeError: a bug in the worker)" in reply.json()["reason"]
    finally:
        server.close()


def test_logprobs_keep_a_split_characters_bytes_and_leave_out_the_stop_string(served, base_and_folder):
    server, client = served
    tokenizer = server.tokenizer
    ids = tokenizer("🙂🌍", add_special_tokens=False)["input_ids"]
    logits = torch.zeros(tokenizer.vocab_size)
    entries = [token_logprobs(tokenizer, logits, i, 1) for i in ids]
    assert any(text == "\ufffd" for text, *_ in entries)  # at least one token holds part of a character
    assert bytes(b for entry in entries for b in entry[1]) == "🙂🌍".encode()

    full = client.chat.completions.create(model="a", messages=QUESTION, max_tokens=8, temperature=0, logprobs=True)
    tokens = [t.token for t in full.choices[0].logprobs.content]
    cut = next(i for i in range(2, len(tokens)) if tokens[i].strip() and tokens[i] not in "".join(tokens[:i]))
    stopped = client.chat.completions.create(
        model="a", messages=QUESTION, max_tokens=8, temperature=0, logprobs=True, stop=[tokens[cut]]
    )
    assert stopped.choices[0].message.content == "".join(tokens[:cut])
    assert [t.token for t in stopped.choices[0].logprobs.content] == tokens[:cut]
    assert stopped.usage.completion_tokens == cut and stopped.choices[0].finish_reason == "stop"


def test_the_400_for_tools_lists_as_supported_only_what_is(served):
    reply = post(served[1], "chat/completions", chat("a", tools=[]))
    message = reply.json()["error"]["message"]
    assert reply.status_code == 400 and message.startswith("unsupported parameter 'tools'; this endpoint supports [")
    supported = message.split("supports ")[1].split("]")[0]
    assert "'temperature'" in supported and "logit_bias" not in supported and "penalty" not in supported
    assert "takes ['frequency_penalty', 'logit_bias', 'presence_penalty', 'response_format'] only at values" in message
