import json
import re
import shutil
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import save_tiny_llama

from qvera import ModelConfig, VeraConfig, attach_vera, load_base, load_vector_state, vector_state
from qvera.adapters import attach_adapter, save_adapter
from qvera.generation.decode import Sampling, generate
from qvera.serving.app import ServeOptions, Server

ADAPTERS = ["alpha", "beta", "gamma", "delta"]
QUESTIONS = [
    [{"role": "user", "content": "Tell me about rivers."}],
    [{"role": "user", "content": "Name three lakes. " * 9}],
]
MAX_TOKENS = 6
KEY = "secret-key"


def save_random_adapter(model, folder, seed):
    generator = torch.Generator().manual_seed(seed)
    load_vector_state(model, {k: torch.randn(v.shape, generator=generator) for k, v in vector_state(model).items()})
    save_adapter(model, folder)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server (fp32, API key, 100 kB body limit) over four adapters of one tiny base, one of
    another base, leftovers of interrupted writes; plus each adapter's greedy replies alone."""
    root = tmp_path_factory.mktemp("serving")
    base = save_tiny_llama(root / "base", dtype=torch.float32)
    other_base = save_tiny_llama(root / "other-base", dtype=torch.float32, seed=1)
    folder = root / "adapters"
    model, _ = load_base(ModelConfig(name=base, quantization="fp32"))
    attach_vera(model, VeraConfig(rank=16, projection_seed=3))
    for seed, name in enumerate(ADAPTERS):
        save_random_adapter(model, folder / name, seed)
    shutil.copytree(folder / "alpha", folder / ".alpha.old-1234")
    shutil.copytree(folder / "beta", folder / ".beta.tmp-99")
    other, _ = load_base(ModelConfig(name=other_base, quantization="fp32"))
    save_random_adapter(attach_vera(other, VeraConfig(rank=16, projection_seed=3)), folder / "foreign", 9)

    reference, tokenizer = load_base(ModelConfig(name=base, quantization="fp32"))
    greedy = Sampling(0.0, 1.0, MAX_TOKENS)
    expected = {("base", i): generate(reference, tokenizer, [q], sampling=greedy)[0] for i, q in enumerate(QUESTIONS)}
    for name in ADAPTERS:
        attach_adapter(reference, folder / name)
        for i, question in enumerate(QUESTIONS):
            expected[name, i] = generate(reference, tokenizer, [question], sampling=greedy)[0]
    for i in range(len(QUESTIONS)):
        assert len({expected[n, i] for n in ["base", *ADAPTERS]}) == 1 + len(ADAPTERS), (
            "the adapters must change the replies"
        )

    served_model, tokenizer = load_base(ModelConfig(name=base, quantization="fp32"))
    options = ServeOptions(max_resident=3, prefill_tokens=16, api_key=KEY, max_body_bytes=100_000)
    server = Server(served_model, tokenizer, folder, options)
    url = server.start()
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    yield server, client, expected, str(root)
    server.close()


def ask(client, model, question=0, **options):
    options = {"temperature": 0, "max_tokens": MAX_TOKENS, **options}
    return client.chat.completions.create(model=model, messages=QUESTIONS[question], **options)


def run_concurrently(*calls):
    """Start all calls at once; return their results (or exceptions) in order."""
    results = [None] * len(calls)

    def run(i, call):
        try:
            results[i] = call()
        except Exception as err:
            results[i] = err

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def post(client, path: str, data: bytes, key: str = KEY) -> httpx.Response:
    return httpx.post(f"{client.base_url}{path}", content=data, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def wait_for(condition, seconds=20):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_models_lists_only_servable_adapters(served):
    _, client, _, root = served
    assert [m.id for m in client.models.list()] == ["base", "alpha", "beta", "delta", "gamma"]
    assert client.models.retrieve("beta").id == "beta"
    for hidden_or_foreign in ["foreign", ".alpha.old-1234"]:
        with pytest.raises(openai.NotFoundError) as caught:
            client.models.retrieve(hidden_or_foreign)
        assert root not in caught.value.message  # errors name no server path


def test_concurrent_requests_of_any_adapter_and_length_reply_as_if_alone(served):
    server, client, expected = served[:3]
    cases = [("alpha", 0), ("beta", 1), (server.base_name, 0), ("gamma", 1), ("alpha", 1), (server.base_name, 1)]
    replies = run_concurrently(*[lambda n=n, q=q: ask(client, n, q) for n, q in cases])
    for (name, question), reply in zip(cases, replies):
        assert reply.choices[0].message.content == expected[name, question]
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == MAX_TOKENS


def test_a_short_request_does_not_wait_for_a_long_one(served):
    server, client, expected = served[:3]
    long_stream = iter(ask(client, "alpha", max_tokens=300, stream=True))
    next(long_stream), next(long_stream)  # the role, then the first text: the long one runs
    short = ask(client, "beta", 1)
    assert short.choices[0].message.content == expected["beta", 1]
    wait_for(lambda: server.scheduler.load()["running"] == 1)  # the short one has left, the long one goes on
    rest = list(long_stream)
    assert rest[-1].choices[0].finish_reason == "length"


def test_streaming_sends_the_same_reply_with_usage(served):
    _, client, expected = served[:3]
    chunks = list(ask(client, "beta", stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["beta", 0]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_official_client_passes_stop_seed_logprobs_and_user(served):
    _, client, expected = served[:3]
    full = expected["gamma", 0]
    stop = full[len(full) // 2 :][:3]
    stopped = ask(client, "gamma", stop=[stop, "never-said"], user="someone")
    assert stopped.choices[0].message.content == full[: full.index(stop)] and stopped.choices[0].finish_reason == "stop"

    sampled = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 12}
    first, _, again, other = run_concurrently(
        lambda: ask(client, "delta", seed=7, **sampled),
        lambda: ask(client, "alpha", 1, max_tokens=30),
        lambda: ask(client, "delta", seed=7, **sampled),
        lambda: ask(client, "delta", seed=8, **sampled),
    )
    assert first.choices[0].message.content == again.choices[0].message.content != other.choices[0].message.content

    reply = ask(client, "alpha", logprobs=True, top_logprobs=3)
    tokens = reply.choices[0].logprobs.content
    assert len(tokens) == MAX_TOKENS and "".join(t.token for t in tokens) == expected["alpha", 0]
    for token in tokens:  # greedy: the chosen token is the likeliest
        assert len(token.top_logprobs) == 3 and token.logprob == token.top_logprobs[0].logprob <= 0


def test_completions_and_n(served):
    _, client, _ = served[:3]
    reply = client.completions.create(model="alpha", prompt="Rivers are", max_tokens=5, temperature=0, logprobs=2)
    assert reply.object == "text_completion" and reply.usage.completion_tokens == 5
    assert len(reply.choices[0].logprobs.tokens) == 5 and len(reply.choices[0].logprobs.top_logprobs[0]) == 2
    two = ask(client, "beta", n=2, temperature=1.0, seed=3, max_tokens=8)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 16


def test_api_key_body_limit_and_routes(served):
    _, client, _, root = served
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0).models.list()
    assert httpx.get(str(client.base_url).replace("/v1/", "/health")).json()["status"] == "ok"  # open to probes
    reply = post(
        client,
        "chat/completions",
        json.dumps({"model": "alpha", "messages": QUESTIONS[0], "x": "a" * 200_000}).encode(),
    )
    assert reply.status_code == 413 and "limit of 100,000 bytes" in reply.json()["error"]["message"]
    assert post(client, "nowhere", b"{}").status_code == 404
    foreign = post(client, "chat/completions", json.dumps({"model": "foreign", "messages": QUESTIONS[0]}).encode())
    assert foreign.status_code == 400 and "another base" in foreign.json()["error"]["message"]
    assert root not in foreign.text
    with socket.create_connection((client.base_url.host, client.base_url.port), timeout=15) as silent:
        started = time.monotonic()
        assert silent.recv(1) == b"" and time.monotonic() - started < 10  # closed after the 5 s idle timeout


@pytest.mark.parametrize(
    "body, message",
    [
        ({"messages": QUESTIONS[0]}, "'model' must name an adapter"),
        ({"model": "alpha"}, "'messages' must be a non-empty list"),
        ({"model": "alpha", "messages": [{"role": "wizard", "content": "hi"}]}, r"messages\[0\] needs a role"),
        ({"model": "alpha", "messages": QUESTIONS[0], "temperature": "hot"}, "'temperature' must be a number"),
        ({"model": "alpha", "messages": QUESTIONS[0], "max_tokens": 10**6}, "more than the model's context of 512"),
        ({"model": "alpha", "messages": QUESTIONS[0], "tools": []}, "unsupported parameter 'tools'"),
        ({"model": "alpha", "messages": QUESTIONS[0], "n": 99}, "'n' must be a whole number from 1 to 8"),
        ({"model": "alpha", "messages": QUESTIONS[0], "stop": [""]}, "'stop' must be"),
        ({"model": "alpha", "messages": QUESTIONS[0], "top_logprobs": 2}, "needs logprobs: true"),
    ],
)
def test_malformed_requests_are_400s(served, body, message):
    reply = post(served[1], "chat/completions", json.dumps(body).encode())
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
    assert re.search(message, reply.json()["error"]["message"])


def test_a_client_that_hangs_up_cancels_its_generation(served):
    server, client = served[:2]
    stats = server.scheduler.stats
    body = json.dumps({"model": "alpha", "messages": QUESTIONS[0], "max_tokens": 400, "temperature": 0}).encode()
    host, port = client.base_url.host, client.base_url.port
    cancelled = stats.cancelled
    with socket.create_connection((host, port)) as sock:  # not streaming
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_for(lambda: server.scheduler.load()["running"] == 1)
    wait_for(lambda: stats.cancelled == cancelled + 1 and server.scheduler.load()["running"] == 0)

    with httpx.stream(
        "POST",
        f"{client.base_url}chat/completions",
        content=body.replace(b'"temperature"', b'"stream": true, "temperature"'),
        headers={"Authorization": f"Bearer {KEY}"},
    ) as response:
        lines = response.iter_lines()
        next(lines), next(lines)
    wait_for(lambda: stats.cancelled == cancelled + 2 and server.scheduler.load()["running"] == 0)
    tokens = stats.tokens
    time.sleep(0.2)
    assert stats.tokens == tokens  # nothing generates for nobody


def test_least_recently_used_adapters_leave_and_come_back(served):
    server, client, expected = served[:3]
    for name in ["alpha", "beta", "gamma"]:
        ask(client, name, max_tokens=1)
    assert server.store.resident() == ["alpha", "beta", "gamma"]
    ask(client, "alpha", max_tokens=1)  # beta is now the least recently used
    assert ask(client, "delta").choices[0].message.content == expected["delta", 0]
    assert server.store.resident() == ["alpha", "delta", "gamma"]
    assert ask(client, "beta").choices[0].message.content == expected["beta", 0]  # read again from its folder
    assert server.store.resident() == ["alpha", "beta", "delta"]
