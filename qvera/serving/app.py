"""An OpenAI-compatible server for many VeRA adapters on one base: FastAPI on uvicorn, in
front of the continuous batcher (`scheduler.py`).

The request's `model` names an adapter folder under the adapters directory, or the base.
The ASGI stack brings keep-alive, a large listen backlog and disconnect detection: a
generation whose client has gone is cancelled at the next step, streaming or not. Bodies
past `max_body_bytes` get a 413 before they are read whole; with `api_key` set, /v1 routes
want `Authorization: Bearer <key>`. Errors are OpenAI-style JSON and name no server path;
client input gets a 4xx, never a 5xx. A client has `read_timeout` seconds to send each
request (`SlowClientsClose`), and at most `max_pending` requests wait or generate at once.
`/health` answers 503, saying why, once the generation worker has stopped or stalled.

It runs over 400 lines: every route, its streaming and its cancellation read best
side by side; the request schema and the batcher live in their own modules.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import resource
import socket
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from torch import nn
from uvicorn.protocols.http.h11_impl import H11Protocol

from qvera.core.config import option
from qvera.generation.decode import Sampling
from qvera.serving.openai_schema import Parsed, Reply, RequestError, parse, usage
from qvera.serving.scheduler import GenerationFailed, Job, ReplyTimedOut, Scheduler, WorkerStopped
from qvera.serving.store import AdapterNotFound, AdapterStore, AdapterUnservable

# The store's and the scheduler's plain errors as HTTP answers: status, OpenAI's `param`, `code`.
HTTP_ERRORS = {
    AdapterNotFound: (404, "model", "model_not_found"),
    AdapterUnservable: (400, "model", "adapter_mismatch"),
    GenerationFailed: (500, None, None),
    WorkerStopped: (503, None, None),
    ReplyTimedOut: (504, None, None),
}


def as_request_error(err: Exception) -> RequestError:
    """The OpenAI-style error a client gets for one of `HTTP_ERRORS` (a RequestError as it is)."""
    if isinstance(err, RequestError):
        return err
    status, param, code = HTTP_ERRORS[type(err)]
    return RequestError(status, str(err), param, code)


@dataclass
class ServeOptions:
    """How the server runs; `qvera serve` makes each field a flag (the sampling defaults have their own group)."""

    _argument_group_name = "server"

    max_resident: int = option(64, "adapters kept in memory; the least recently used leave")
    max_batch_size: int = option(32, "requests generating at once")
    prefill_tokens: int = option(128, "prompt tokens fed per prefill step, all new requests together")
    api_key: str | None = option(
        None, "require `Authorization: Bearer KEY` on /v1 routes (unset: $QVERA_API_KEY; neither: open routes)"
    )
    max_body_bytes: int = option(1_000_000, "larger request bodies get a 413")
    request_timeout: float = option(600.0, "seconds a generation may take, queueing included")
    defaults: Sampling = field(default_factory=Sampling)  # for requests that leave a setting out
    batch_invariant: bool = option(
        False, "a reply is bit for bit that of its request alone, whatever shares the batch (slower)"
    )
    read_timeout: float = option(10.0, "seconds a client has to send a request's headers and body; slower ones close")
    max_pending: int = option(1024, "requests waiting or generating at once; more get a 503")
    stall_seconds: float = option(120.0, "seconds a worker with work may go without a step before /health says stalled")

    def __post_init__(self):
        for name in ("max_resident", "max_batch_size", "prefill_tokens", "max_body_bytes", "max_pending"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("request_timeout", "read_timeout", "stall_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be above 0 seconds, got {getattr(self, name)}")


def bind_address(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, not yet listening. Taken before the base loads (minutes for
    7B), so a port in use fails at once; until the server listens, a client is refused rather
    than left waiting."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0-65535")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)  # as uvicorn binds a host
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Server:
    """The adapter store, the scheduler and the FastAPI app over them."""

    def __init__(self, model: nn.Module, tokenizer, adapters_folder: str | Path, options: ServeOptions | None = None):
        self.tokenizer, self.options = tokenizer, options or ServeOptions()
        options = self.options
        self.base_name = public_name(getattr(model, "qvera_base_name", None) or "base")
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.store = AdapterStore(model, adapters_folder, options.max_resident)
        self.scheduler = Scheduler(
            model,
            tokenizer,
            self.store,
            max_batch_size=options.max_batch_size,
            prefill_tokens=options.prefill_tokens,
            batch_invariant=options.batch_invariant,
            stall_seconds=options.stall_seconds,
        )
        self.app = self._routes(FastAPI(title="qvera", docs_url=None, redoc_url=None, openapi_url=None))
        self.uvicorn: uvicorn.Server | None = None

    # --- running ---------------------------------------------------------------------------

    def config(self, log_level: str = "info") -> uvicorn.Config:
        # Idle connections (kept alive, or silent from the start) close after 5 s, slow ones
        # after read_timeout. No limit on open connections (uvicorn's limit_concurrency counts
        # the slow ones too, so they could starve everyone): the limit is on requests pending.
        allow_open_files()
        return uvicorn.Config(
            self.app,
            http=functools.partial(SlowClientsClose, read_timeout=self.options.read_timeout),
            log_level=log_level,
            timeout_keep_alive=5,
            limit_concurrency=None,
            backlog=2048,
        )

    def serve(self, sock: socket.socket) -> None:
        """Serve on a socket from `bind_address` until interrupted (Ctrl-C)."""
        self.scheduler.start()
        self.uvicorn = uvicorn.Server(self.config())
        try:
            self.uvicorn.run(sockets=[sock])
        finally:
            self.scheduler.close()

    def start(self, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> str:
        """Serve from a background thread (tests, notebooks); return the /v1 base URL."""
        sock = socket.create_server((host, port), backlog=2048)
        self.scheduler.start()
        self.uvicorn = uvicorn.Server(self.config(log_level))
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        while not self.uvicorn.started and self._thread.is_alive():
            threading.Event().wait(0.02)
        return f"http://{host}:{sock.getsockname()[1]}/v1"

    def close(self) -> None:
        self.uvicorn.should_exit = True
        self._thread.join(timeout=10)
        self.scheduler.close()

    # --- routes ----------------------------------------------------------------------------

    def _routes(self, app: FastAPI) -> FastAPI:
        async def request_error(request, err: Exception):
            answer = as_request_error(err)
            return JSONResponse(answer.body(), status_code=answer.status)

        for kind in (RequestError, *HTTP_ERRORS):
            app.add_exception_handler(kind, request_error)

        @app.exception_handler(HTTPException)
        async def http_error(request, err: HTTPException):
            message = (
                f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
            )
            return JSONResponse(RequestError(err.status_code, message).body(), status_code=err.status_code)

        @app.exception_handler(Exception)
        async def unexpected(request, err: Exception):
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            return JSONResponse(
                RequestError(500, "internal error; the server log has the details").body(), status_code=500
            )

        @app.get("/health")
        async def health():
            trouble = self.scheduler.trouble()
            if trouble:
                return JSONResponse({"status": "unavailable", "reason": trouble}, status_code=503)
            return {"status": "ok", **self.scheduler.load()}

        @app.get("/metrics", response_class=PlainTextResponse)
        async def metrics():
            return self.metrics()

        @app.get("/v1/models")
        async def models(request: Request):
            self._authorize(request)
            names = [self.base_name] + await run_in_threadpool(self.store.servable)
            return {"object": "list", "data": [model_card(n) for n in names]}

        @app.get("/v1/models/{name:path}")
        async def model(name: str, request: Request):
            self._authorize(request)
            if name != self.base_name:
                try:
                    await run_in_threadpool(self.store.check, name)
                except AdapterUnservable as err:  # not listed, so not found, whatever the reason
                    raise AdapterNotFound(str(err)) from err
            return model_card(name)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await self._generate(request, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._generate(request, chat=False)

        return app

    def _authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key and not hmac.compare_digest(request.headers.get("authorization", ""), f"Bearer {key}"):
            raise RequestError(
                401, "missing or wrong API key; send the header Authorization: Bearer <key>", code="invalid_api_key"
            )

    async def _read_json(self, request: Request):
        limit = self.options.max_body_bytes
        too_big = RequestError(413, f"the request body is larger than this server's limit of {limit:,} bytes")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_big
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_big
        except ClientDisconnect as err:  # gone, or closed for sending too slowly
            raise RequestError(400, "the client closed the connection before sending the whole body") from err
        try:
            parsed = json.loads(body or b"null")
        except RecursionError as err:
            raise RequestError(400, "the request body is nested too deeply") from err
        except ValueError as err:  # not JSON, not UTF-8, or a number past Python's digit limit
            raise RequestError(400, f"the request body is not valid JSON ({err})") from err
        try:  # "\ud800" escapes decode to lone surrogates, which no tokenizer takes
            json.dumps(parsed, ensure_ascii=False).encode()
        except UnicodeEncodeError as err:
            raise RequestError(
                400,
                f"the request body holds a lone surrogate ({err.object[err.start]!r}); send valid Unicode",
            ) from err
        return parsed

    async def _generate(self, request: Request, chat: bool):
        self._authorize(request)
        if not self.scheduler.thread.is_alive():
            raise RequestError(503, f"{self.scheduler.trouble()}; restart the server")
        pending = sum(self.scheduler.load().values())
        if pending >= self.options.max_pending:
            raise RequestError(503, f"the server has {pending} requests pending, its limit; retry shortly")
        body = await self._read_json(request)
        parsed = await run_in_threadpool(parse, body, self.tokenizer, self.options.defaults, self.context, chat)
        adapter = None if parsed.model == self.base_name else parsed.model
        if adapter is not None:
            await run_in_threadpool(self.store.check, adapter)
        events: asyncio.Queue = asyncio.Queue()
        jobs = self._jobs(parsed, adapter, events, asyncio.get_running_loop())
        for job in jobs:
            self.scheduler.submit(job)
        reply = Reply(parsed)
        if parsed.stream:
            return StreamingResponse(
                self._stream(parsed, reply, jobs, events),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return await self._complete(request, parsed, reply, jobs, events)

    def _jobs(self, parsed: Parsed, adapter: str | None, events: asyncio.Queue, loop) -> list[Job]:
        """One job per choice: n for each prompt; choice j samples with seed + j."""
        jobs = []
        for prompt in parsed.prompts:
            for j in range(parsed.n):
                emit = _emitter(loop, events, len(jobs))
                seed = None if parsed.seed is None else parsed.seed + j
                jobs.append(
                    Job(
                        prompt,
                        adapter,
                        parsed.sampling,
                        emit,
                        parsed.stop,
                        seed,
                        parsed.logprobs,
                        self.options.request_timeout,
                    )
                )
        return jobs

    async def _complete(self, request: Request, parsed: Parsed, reply: Reply, jobs: list[Job], events: asyncio.Queue):
        texts, entries = [""] * len(jobs), [[] if parsed.logprobs is not None else None for _ in jobs]
        reasons, produced, timing = [None] * len(jobs), [0] * len(jobs), [None] * len(jobs)
        gone = asyncio.ensure_future(_disconnected(request))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.request_timeout + 5  # the worker answers 504 first, unless stalled
        try:
            while None in reasons:
                next_event = asyncio.ensure_future(events.get())
                await asyncio.wait(
                    {next_event, gone}, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
                )
                if not next_event.done():
                    next_event.cancel()
                    if not gone.done():
                        limit = self.options.request_timeout
                        raise RequestError(504, f"the reply took longer than the server's limit of {limit:g} s")
                    # the client hung up: nobody will read the reply
                    return JSONResponse(RequestError(499, "client closed the request").body(), status_code=499)
                index, event = next_event.result()
                if event[0] == "error":
                    raise event[1]
                if event[0] == "text":
                    texts[index] += event[1]
                    if entries[index] is not None:
                        entries[index] += event[2]
                else:
                    reasons[index], produced[index], timing[index] = event[1], event[2], event[3]
        finally:
            gone.cancel()
            for job in jobs:
                job.cancel()  # no-op for finished jobs
        body = reply.completion(texts, reasons, entries, self._usage(parsed, produced))
        return {**body, "timing": timing}

    async def _stream(self, parsed: Parsed, reply: Reply, jobs: list[Job], events: asyncio.Queue):
        """Server-sent events; when the client goes, Starlette cancels this generator and the
        `finally` cancels the jobs."""
        try:
            if parsed.chat:
                for index in range(len(jobs)):
                    yield _sse(reply.chunk(index, None, first=True))
            produced, timing, open_jobs = [0] * len(jobs), [None] * len(jobs), len(jobs)
            while open_jobs:
                index, event = await events.get()
                if event[0] == "text":
                    yield _sse(reply.chunk(index, event[1], event[2] if parsed.logprobs is not None else None))
                elif event[0] == "done":
                    produced[index], timing[index], open_jobs = event[2], event[3], open_jobs - 1
                    yield _sse(reply.chunk(index, None, [] if parsed.logprobs is not None else None, reason=event[1]))
                else:
                    yield _sse(as_request_error(event[1]).body())
                    break
            else:
                if parsed.include_usage:
                    yield _sse({**reply.usage_chunk(self._usage(parsed, produced)), "timing": timing})
            yield "data: [DONE]\n\n"
        finally:
            for job in jobs:
                job.cancel()

    def _usage(self, parsed: Parsed, produced: list[int]) -> dict:
        return usage(sum(len(p) for p in parsed.prompts), sum(produced))

    def metrics(self) -> str:
        stats, load = self.scheduler.stats, self.scheduler.load()
        lines = [f"qvera_requests_{name} {value}" for name, value in load.items()]
        lines += [f"qvera_decode_seconds_total {stats.decode_seconds_total:.6f}"]
        lines += [
            f"qvera_{name}_total {getattr(stats, name)}"
            for name in ("decode_steps", "prefill_steps", "tokens", "finished", "cancelled", "failed")
        ]
        for name in ("decode", "prefill"):
            times = sorted(getattr(stats, f"{name}_seconds"))
            if times:
                lines.append(f'qvera_{name}_step_seconds{{quantile="0.5"}} {times[len(times) // 2]:.6f}')
        lines.append(f"qvera_adapters_resident {len(self.store.bank.adapters)}")
        return "\n".join(lines) + "\n"


class SlowClientsClose(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with two deadlines. The keep-alive timeout is armed from the
    connection's start too: a client that connects and sends nothing is closed like an idle
    keep-alive one. And a client has `read_timeout` seconds from connecting (or from its last
    response) to send a whole request, headers and body, else the connection closes: uvicorn's
    own timer stops at the first byte, so clients sending a byte at a time kept their
    connections for good. Each open connection costs a socket and a small buffer until then, so
    their number is not limited; the requests pending are (`ServeOptions.max_pending`)."""

    def __init__(self, *args, read_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_timeout, self.read_deadline = read_timeout, None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        self._arm_read_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_read_deadline()

    def connection_lost(self, exc) -> None:
        if self.read_deadline is not None:
            self.read_deadline.cancel()
        super().connection_lost(exc)

    def _arm_read_deadline(self) -> None:
        if self.read_deadline is not None:
            self.read_deadline.cancel()
        self.read_deadline = self.loop.call_later(self.read_timeout, self._read_too_slow)

    def _read_too_slow(self) -> None:
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()


def allow_open_files() -> None:
    """Raise this process's open-file limit to its ceiling: every connection holds one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def public_name(name: str) -> str:
    """The base's model id: its folder's name for a local folder (no server path), else as given."""
    return Path(name).name if Path(name).is_dir() else name


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "qvera"}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int):
    """Hand the scheduler thread's events to the request's event loop."""

    def emit(event: tuple) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, (index, event))
        except RuntimeError:  # the loop has closed (server shutting down): nobody is listening
            pass

    return emit


async def _disconnected(request: Request) -> None:
    """Return once the client has closed the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
