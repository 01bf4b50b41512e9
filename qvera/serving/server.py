"""An OpenAI-compatible chat server for many adapters on one base.

The request's `model` field names an adapter folder under the adapters directory (or the
base model itself). Requests that arrive within a short window form one batch whatever their
adapters: every row gathers its own (d, b) vectors while `A x` and the product by B stay
shared (`AdapterBank.mixed_batch`), so a batch of 32 adapters costs about what a batch of one
adapter does. Adapters load from their folder on first use; at most `max_resident` stay in
memory, the least recently used leaving first.

Bad requests are answered in the request's own thread before they reach the batch, so they
never disturb the requests being generated.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import uuid
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from torch import nn

from qvera.adapters.format import CONFIG_FILE, read_adapter
from qvera.core.attach import PROJECTIONS_ATTR, attach_vera
from qvera.serving.bank import AdapterBank
from qvera.serving.generation import (
    Sampling,
    TextStream,
    chat_prompt,
    decode_steps,
    end_token_ids,
)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SAMPLING_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
}
FIELDS = {"model", "messages", "stream", "stream_options", "n", *SAMPLING_FIELDS}


class RequestError(Exception):
    """A request the server answers with an OpenAI-style error object instead of a reply."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class AdapterStore:
    """The adapters directory and the bank of resident adapters, behind one lock."""

    def __init__(self, model: nn.Module, folder: str | Path, max_resident: int):
        self.model, self.folder = model, Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(
                f"adapters folder {self.folder} does not exist; create it and save adapters into it"
            )
        if not hasattr(model, PROJECTIONS_ATTR):
            attach_vera(model, self.first_fitting().vera_config)
        # Vectors kept in the compute dtype (bf16 for an NF4 base): half the memory, same results.
        self.bank = AdapterBank(model, max_resident=max_resident, dtype=model.dtype)
        self.lock = threading.Lock()

    def first_fitting(self):
        """Every served adapter shares A and B, so the first one that fits this base decides
        rank, seed and targets for all."""
        names = self.available()
        if not names:
            raise ValueError(f"{self.folder} holds no adapter; save one there with qvera.adapters.save_adapter")
        errors = []
        for name in names:
            try:
                return read_adapter(self.folder / name, self.model)
            except ValueError as err:
                errors.append(err)
        raise ValueError(f"no adapter in {self.folder} fits this base; the first says: {errors[0]}")

    def available(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir() if (p / CONFIG_FILE).is_file())

    def ensure(self, names: list[str | None]) -> None:
        """Make the named adapters resident, reading them from their folders if needed. Call
        with the lock held."""
        self.bank.touch(names)
        for name in dict.fromkeys(names):
            if name is not None and name not in self.bank.adapters:
                self.load(name)

    def load(self, name: str) -> None:
        path = self.folder / name
        if "/" in name or name.startswith(".") or not (path / CONFIG_FILE).is_file():
            known = ", ".join(self.available()[:10]) or "none"
            raise RequestError(
                404, f"the model {name!r} does not exist; available adapters: {known}", "model", "model_not_found"
            )
        try:
            self.bank.add(name, read_adapter(path, self.model).vectors)
        except (ValueError, OSError) as err:
            raise RequestError(
                400, f"adapter {name!r} cannot be served on this base: {err}", "model", "adapter_mismatch"
            ) from err


@dataclass
class Pending:
    """One request on its way through the batcher; the worker reports into `events`."""

    adapter: str | None
    prompt: list[int]
    sampling: Sampling
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class ChatServer:
    """The HTTP front (one thread per connection) and the batching worker (one thread)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        adapters_folder: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_resident: int = 64,
        max_batch_size: int = 32,
        batch_window: float = 0.02,
        defaults: Sampling = Sampling(),
    ):
        if max_batch_size < 1 or batch_window < 0:
            raise ValueError(
                "max_batch_size must be at least 1 and batch_window "
                f"at least 0, got {max_batch_size} and {batch_window}"
            )
        self.model, self.tokenizer, self.defaults = model, tokenizer, defaults
        self.base_name = getattr(model, "qvera_base_name", None) or "base"
        self.store = AdapterStore(model, adapters_folder, max_resident)
        self.max_batch_size, self.batch_window = max_batch_size, batch_window
        self.end_ids = end_token_ids(model, tokenizer)
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.queue: queue.Queue[Pending] = queue.Queue()
        self.deferred: deque[Pending] = deque()
        self.recent_batches: deque[list[str | None]] = deque(maxlen=64)  # adapters per row, for logs and tests
        self.http = HTTPServer((host, port), _handler_for(self))
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self.http.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "ChatServer":
        for target in (self.http.serve_forever, self._work):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def serve_forever(self) -> None:
        """Serve until interrupted (Ctrl-C)."""
        self.start()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    def close(self) -> None:
        self._stopping.set()
        self.http.shutdown()
        self.http.server_close()
        for thread in self._threads:
            thread.join(timeout=10)

    # --- requests ---------------------------------------------------------------------

    def models(self) -> dict:
        names = [self.base_name] + self.store.available()
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": "qvera"} for n in names],
        }

    def parse(self, body: dict) -> tuple[Pending, bool, bool, str]:
        """Check a chat request and resolve its adapter; raise RequestError on anything wrong."""
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        unknown = sorted(set(body) - FIELDS)
        if unknown:
            raise RequestError(
                400, f"unsupported parameter {unknown[0]!r}; this server supports {sorted(FIELDS)}", unknown[0]
            )
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise RequestError(
                400, "'model' must name an adapter or the base model (GET /v1/models lists them)", "model"
            )
        messages = parse_messages(body.get("messages"))
        if body.get("n", 1) != 1:
            raise RequestError(400, "only n=1 is supported; send several requests instead", "n")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(400, "'stream' must be true or false", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise RequestError(400, "'stream_options' supports only include_usage", "stream_options")
        sampling = self.sampling(body)
        try:
            prompt = chat_prompt(self.tokenizer, messages)
        except Exception as err:  # the template's own checks (say, on the order of roles)
            raise RequestError(400, f"the model's chat template rejects these messages: {err}", "messages") from err
        if self.context and len(prompt) + sampling.max_new_tokens > self.context:
            raise RequestError(
                400,
                f"the messages take {len(prompt)} tokens and max_tokens "
                f"is {sampling.max_new_tokens}: more than the model's "
                f"context of {self.context}; shorten the messages or lower max_tokens",
                "messages",
            )
        adapter = None if name == self.base_name else name
        with self.store.lock:
            self.store.ensure([adapter])
        return Pending(adapter, prompt, sampling), stream, bool(options.get("include_usage")), name

    def sampling(self, body: dict) -> Sampling:
        values = {}
        for key, attr in SAMPLING_FIELDS.items():
            value = body.get(key)
            if value is None:
                continue
            wanted = int if attr == "max_new_tokens" else (int, float)
            if isinstance(value, bool) or not isinstance(value, wanted):
                raise RequestError(
                    400, f"'{key}' must be a {'whole number' if wanted is int else 'number'}, got {value!r}", key
                )
            values[attr] = value
        try:
            return Sampling(**{**self.defaults.__dict__, **values})
        except ValueError as err:
            raise RequestError(400, str(err).replace("max_new_tokens", "max_tokens")) from err

    def submit(self, pending: Pending) -> None:
        self.queue.put(pending)

    # --- the batching worker -----------------------------------------------------------

    def _collect(self) -> list[Pending]:
        """The first waiting request, then whatever arrives within the window, up to the batch
        size and to `max_resident` distinct adapters (a request past that waits for the next)."""
        batch: list[Pending] = []
        adapters: set[str] = set()
        deadline = None
        while len(batch) < self.max_batch_size:
            if self.deferred:
                item = self.deferred.popleft()
            else:
                try:
                    item = self.queue.get(timeout=0.1 if deadline is None else max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    if deadline is None and not self._stopping.is_set():
                        continue
                    break
            if item.cancelled.is_set():
                continue
            if (
                item.adapter is not None
                and item.adapter not in adapters
                and len(adapters) >= self.store.bank.max_resident
            ):
                self.deferred.appendleft(item)
                break
            batch.append(item)
            if item.adapter is not None:
                adapters.add(item.adapter)
            deadline = deadline or time.monotonic() + self.batch_window
        return batch

    def _work(self) -> None:
        while not self._stopping.is_set():
            batch = self._collect()
            try:
                self._run(batch)
            except Exception as err:  # reported to this batch's requests; the server goes on
                for item in batch:
                    item.events.put(("error", RequestError(500, f"generation failed: {type(err).__name__}: {err}")))

    def _run(self, batch: list[Pending]) -> None:
        with ExitStack() as stack:
            with self.store.lock:
                # Touch the batch's resident adapters first, so loading the others evicts none of them.
                self.store.bank.touch([item.adapter for item in batch])
                for item in list(batch):
                    try:
                        self.store.ensure([item.adapter])  # evicted (or deleted) since the request came in
                    except RequestError as err:
                        item.events.put(("error", err))
                        batch.remove(item)
                if not batch:
                    return
                stack.enter_context(self.store.bank.mixed_batch([item.adapter for item in batch]))
            self.recent_batches.append([item.adapter for item in batch])
            print(
                f"batch of {len(batch)}: {[item.adapter or self.base_name for item in batch]}",
                file=sys.stderr,
                flush=True,
            )
            self._decode(batch)

    def _decode(self, batch: list[Pending]) -> None:
        streams = [TextStream(self.tokenizer) for _ in batch]
        produced = [0] * len(batch)
        steps = decode_steps(
            self.model,
            [p.prompt for p in batch],
            [p.sampling for p in batch],
            self.end_ids,
            self.tokenizer.pad_token_id,
        )
        for step in steps:
            for row, token in step.text_tokens():
                piece = streams[row].push(token)
                if piece:
                    batch[row].events.put(("text", piece))
            for row in step.active.nonzero().flatten().tolist():
                produced[row] += 1
                if step.finished[row]:
                    reason = "stop" if step.stopped[row] else "length"
                    batch[row].events.put(
                        ("done", reason, {"prompt_tokens": len(batch[row].prompt), "completion_tokens": produced[row]})
                    )
            if all(p.cancelled.is_set() for p in batch):
                return


def parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(400, f"messages[{i}] needs a role among {sorted(ROLES)}", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise RequestError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(400, f"messages[{i}].content must be a string", "messages")
        parsed.append({"role": ROLES[message["role"]], "content": content})
    return parsed


class HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client hung up (between keep-alive requests, or mid-stream): nothing to report
        super().handle_error(request, client_address)


def _handler_for(server: ChatServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):
            print(f"{self.address_string()} {format % args}", file=sys.stderr, flush=True)

        def send_json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self.send_json(200, server.models())
            else:
                self.send_json(
                    404, RequestError(404, f"no route {self.path}; use /v1/chat/completions or /v1/models").body()
                )

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self.send_json(
                    404, RequestError(404, f"no route {self.path}; use /v1/chat/completions or /v1/models").body()
                )
                return
            try:
                length = self.headers.get("Content-Length", "")
                if not length.isdigit():
                    self.close_connection = True  # the body's end is unknown: the connection cannot be reused
                    raise RequestError(411, "the request needs a Content-Length header")
                try:
                    body = json.loads(self.rfile.read(int(length)) or b"null")
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise RequestError(400, f"the request body is not valid JSON ({err})") from err
                pending, stream, include_usage, name = server.parse(body)
            except RequestError as err:
                self.send_json(err.status, err.body())
                return
            except Exception as err:  # a bug, reported to this request alone
                self.send_json(500, RequestError(500, f"{type(err).__name__}: {err}").body())
                return
            server.submit(pending)
            reply = Reply(name)
            try:
                if stream:
                    self.stream(pending, reply, include_usage)
                else:
                    self.complete(pending, reply)
            except (BrokenPipeError, ConnectionResetError):
                pending.cancelled.set()

        def complete(self, pending: Pending, reply: "Reply") -> None:
            text = []
            while True:
                event = pending.events.get()
                if event[0] == "text":
                    text.append(event[1])
                elif event[0] == "error":
                    self.send_json(event[1].status, event[1].body())
                    return
                else:
                    self.send_json(200, reply.completion("".join(text), event[1], event[2]))
                    return

        def stream(self, pending: Pending, reply: "Reply", include_usage: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.send_event(reply.chunk({"role": "assistant", "content": ""}))
            while True:
                event = pending.events.get()
                if event[0] == "text":
                    self.send_event(reply.chunk({"content": event[1]}))
                    continue
                if event[0] == "error":
                    self.send_event(event[1].body())
                else:
                    self.send_event(reply.chunk({}, event[1]))
                    if include_usage:
                        self.send_event(reply.usage_chunk(event[2]))
                self.send_event("[DONE]")
                self.write_chunk(b"")
                return

        def send_event(self, data) -> None:
            text = data if isinstance(data, str) else json.dumps(data)
            self.write_chunk(f"data: {text}\n\n".encode())

        def write_chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    return Handler


class Reply:
    """The OpenAI response objects for one request."""

    def __init__(self, model: str):
        self.model, self.id, self.created = model, f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def _envelope(self, kind: str, choices: list, **extra) -> dict:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def completion(self, text: str, finish_reason: str, usage: dict) -> dict:
        message = {"role": "assistant", "content": text}
        return self._envelope(
            "chat.completion", [{"index": 0, "message": message, "finish_reason": finish_reason}], usage=totals(usage)
        )

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return self._envelope("chat.completion.chunk", [{"index": 0, "delta": delta, "finish_reason": finish_reason}])

    def usage_chunk(self, usage: dict) -> dict:
        return self._envelope("chat.completion.chunk", [], usage=totals(usage))


def totals(usage: dict) -> dict:
    return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
