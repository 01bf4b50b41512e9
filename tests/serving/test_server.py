import http.client
import json
import re
import threading

import openai
import pytest
import torch
from conftest import save_tiny_llama

from qvera import (
    ModelConfig,
    VeraConfig,
    attach_vera,
    load_base,
    load_vector_state,
    vector_state,
)
from qvera.adapters.format import save_adapter
from qvera.adapters.loading import attach_adapter
from qvera.serving.generation import Sampling, generate
from qvera.serving.server import ChatServer

ADAPTERS = ["alpha", "beta", "gamma", "delta"]
QUESTION = [{"role": "user", "content": "Tell me about rivers."}]
MAX_TOKENS = 6


def save_random_adapter(model, folder, seed):
    generator = torch.Generator().manual_seed(seed)
    load_vector_state(model, {k: torch.randn(v.shape, generator=generator) for k, v in vector_state(model).items()})
    save_adapter(model, folder)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server on an ephemeral port over four adapters of one tiny base and one of another base,
    plus the greedy reply each adapter gives when run alone."""
    root = tmp_path_factory.mktemp("serving")
    base = save_tiny_llama(root / "base", dtype=torch.float32)
    other_base = save_tiny_llama(root / "other-base", dtype=torch.float32, seed=1)
    folder = root / "adapters"
    model, _ = load_base(ModelConfig(name=base, quantization="fp32"))
    attach_vera(model, VeraConfig(rank=16, projection_seed=3))
    for seed, name in enumerate(ADAPTERS):
        save_random_adapter(model, folder / name, seed)
    other, _ = load_base(ModelConfig(name=other_base, quantization="fp32"))
    save_random_adapter(attach_vera(other, VeraConfig(rank=16, projection_seed=3)), folder / "foreign", 9)

    reference, tokenizer = load_base(ModelConfig(name=base, quantization="fp32"))
    expected = {base: generate(reference, tokenizer, [QUESTION], sampling=Sampling(0.0, 1.0, MAX_TOKENS))[0]}
    for name in ADAPTERS:
        attach_adapter(reference, folder / name)
        expected[name] = generate(reference, tokenizer, [QUESTION], sampling=Sampling(0.0, 1.0, MAX_TOKENS))[0]
    assert len(set(expected.values())) == len(expected), "the adapters must change the replies"

    served_model, tokenizer = load_base(ModelConfig(name=base, quantization="fp32"))
    server = ChatServer(served_model, tokenizer, folder, port=0, max_resident=3, batch_window=0.3).start()
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
    yield server, client, expected
    server.close()


def ask(client, model, **options):
    options = {"temperature": 0, "max_tokens": MAX_TOKENS, **options}
    return client.chat.completions.create(model=model, messages=QUESTION, **options)


def ask_streaming(client, model):
    chunks = list(ask(client, model, stream=True, stream_options={"include_usage": True}))
    return chunks, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


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


def test_models_lists_the_base_and_the_adapter_folders(served):
    server, client, _ = served
    assert [m.id for m in client.models.list()] == [server.base_name, "alpha", "beta", "delta", "foreign", "gamma"]


def test_concurrent_requests_for_different_adapters_run_as_one_batch(served):
    server, client, expected = served
    names = ["alpha", "beta", server.base_name, "gamma", "alpha"]
    replies = run_concurrently(*[lambda n=n: ask(client, n) for n in names])
    for name, reply in zip(names, replies):
        assert reply.model == name
        assert reply.choices[0].message.content == expected[name]  # each row as if it ran alone
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == MAX_TOKENS and reply.usage.prompt_tokens > 0
    assert sorted(server.recent_batches[-1], key=str) == sorted(
        [None if n == server.base_name else n for n in names], key=str
    )


def test_streaming_sends_the_same_reply_piece_by_piece(served):
    _, client, expected = served
    chunks, text = ask_streaming(client, "beta")
    assert text == expected["beta"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS and chunks[-1].object == "chat.completion.chunk"


def test_unknown_adapter_is_a_404(served):
    _, client, _ = served
    with pytest.raises(
        openai.NotFoundError, match="the model 'nobody' does not exist; available adapters: alpha, beta"
    ):
        ask(client, "nobody")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(client, "../base")


def test_adapter_for_another_base_is_a_400(served):
    _, client, _ = served
    with pytest.raises(
        openai.BadRequestError, match="adapter 'foreign' cannot be served on this base: .*another base model"
    ):
        ask(client, "foreign")


@pytest.mark.parametrize(
    "body, message",
    [
        ({"messages": QUESTION}, "'model' must name an adapter"),
        ({"model": "alpha"}, "'messages' must be a non-empty list"),
        ({"model": "alpha", "messages": [{"role": "wizard", "content": "hi"}]}, r"messages\[0\] needs a role"),
        ({"model": "alpha", "messages": QUESTION, "temperature": "hot"}, "'temperature' must be a number"),
        ({"model": "alpha", "messages": QUESTION, "max_tokens": 0}, "max_tokens must be at least 1"),
        ({"model": "alpha", "messages": QUESTION, "max_tokens": 10**6}, "more than the model's context of 512"),
        ({"model": "alpha", "messages": QUESTION, "logprobs": True}, "unsupported parameter 'logprobs'"),
        ({"model": "alpha", "messages": QUESTION, "n": 2}, "only n=1 is supported"),
    ],
)
def test_malformed_requests_are_400s(served, body, message):
    server, _, _ = served
    status, reply = post(server, json.dumps(body).encode())
    assert status == 400
    assert reply["error"]["type"] == "invalid_request_error"
    assert re.search(message, reply["error"]["message"])


def test_invalid_json_is_a_400(served):
    server, _, _ = served
    status, reply = post(server, b'{"model": "alpha", "messages": [')
    assert status == 400 and reply["error"]["message"].startswith("the request body is not valid JSON")


def post(server, data: bytes):
    host, port = server.http.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request("POST", "/v1/chat/completions", body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    status, body = response.status, json.loads(response.read())
    connection.close()
    return status, body


def test_bad_requests_do_not_disturb_requests_in_flight(served):
    server, client, expected = served
    long_stream = iter(ask(client, "alpha", max_tokens=64, stream=True))
    first = [next(long_stream), next(long_stream)]  # the role, then the first text: generation runs
    assert first[0].choices[0].delta.role == "assistant" and first[1].choices[0].delta.content
    results = run_concurrently(
        lambda: ask_streaming(client, "alpha")[1],
        lambda: ask(client, "nobody"),
        lambda: ask(client, "gamma").choices[0].message.content,
        lambda: post(server, b"not json"),
        lambda: ask(client, "foreign"),
        lambda: ask_streaming(client, server.base_name)[1],
        lambda: ask(client, "beta", temperature="hot"),
    )
    assert (
        results[0] == expected["alpha"] and results[2] == expected["gamma"] and results[5] == expected[server.base_name]
    )
    assert isinstance(results[1], openai.NotFoundError)
    assert results[3][0] == 400
    assert isinstance(results[4], openai.BadRequestError) and isinstance(results[6], openai.BadRequestError)
    chunks = first + list(long_stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).startswith(expected["alpha"])
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > MAX_TOKENS


def test_least_recently_used_adapters_leave_and_come_back(served):
    server, client, expected = served
    for name in ["alpha", "beta", "gamma"]:
        ask(client, name, max_tokens=1)
    assert sorted(server.store.bank.names()) == ["alpha", "beta", "gamma"]
    ask(client, "alpha", max_tokens=1)  # beta is now the least recently used
    assert ask(client, "delta").choices[0].message.content == expected["delta"]
    assert sorted(server.store.bank.names()) == ["alpha", "delta", "gamma"]
    assert ask(client, "beta").choices[0].message.content == expected["beta"]  # read again from its folder
    assert sorted(server.store.bank.names()) == ["alpha", "beta", "delta"]


def test_server_needs_an_adapters_folder_with_an_adapter(tmp_path, tiny_llama_dir):
    model, tokenizer = load_base(ModelConfig(name=tiny_llama_dir, quantization="fp32"))
    with pytest.raises(FileNotFoundError, match="adapters folder .*missing does not exist"):
        ChatServer(model, tokenizer, tmp_path / "missing", port=0)
    with pytest.raises(ValueError, match="holds no adapter; save one there"):
        ChatServer(model, tokenizer, tmp_path, port=0)
