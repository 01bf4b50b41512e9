"""The OpenAI request fields this server reads, and the response objects it writes.

Parameters clients commonly send are accepted: the ones with no effect here (`user`,
`metadata`, zero penalties) are ignored; the ones that would change the reply and are not
implemented (tools, non-zero penalties, `echo`) are refused with a 400 that names them.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from qvera.generation.decode import Sampling, chat_prompt

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
COMMON = {
    "model",
    "stream",
    "stream_options",
    "n",
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "seed",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "response_format",
    *IGNORED,
}
# Accepted only at a value that changes nothing (0, empty, text, best_of = n): not "supported".
NEUTRAL_ONLY = {"presence_penalty", "frequency_penalty", "logit_bias", "response_format", "echo", "suffix", "best_of"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
TEXT_FIELDS = COMMON | {"prompt", "echo", "suffix", "best_of"}
MAX_CHOICES, MAX_STOPS, MAX_TOP_LOGPROBS = 8, 4, 20
SEEDS = (-(2**63), 2**64)


class RequestError(Exception):
    """A request answered with an OpenAI-style error object instead of a reply."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        kind = "server_error" if self.status >= 500 else kind
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Parsed:
    """A checked request: one prompt per choice group, and how every choice is generated."""

    chat: bool
    model: str
    prompts: list[list[int]]
    sampling: Sampling
    n: int
    stop: list[str]
    seed: int | None
    logprobs: int | None  # None: no logprobs; k: the chosen token's and the k likeliest
    stream: bool
    include_usage: bool


def parse(body, tokenizer, defaults: Sampling, context: int | None, chat: bool) -> Parsed:
    """Check a /v1/chat/completions (chat) or /v1/completions body; raise RequestError on anything wrong."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    fields = CHAT_FIELDS if chat else TEXT_FIELDS
    unknown = sorted(set(body) - fields)
    if unknown:
        raise RequestError(
            400,
            f"unsupported parameter {unknown[0]!r}; this endpoint supports {sorted(fields - NEUTRAL_ONLY - IGNORED)}, "
            f"ignores {sorted(IGNORED)} and takes {sorted(fields & NEUTRAL_ONLY)} only at values that change nothing",
            unknown[0],
        )
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise RequestError(400, "'model' must name an adapter or the base model (GET /v1/models lists them)", "model")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0):
            raise RequestError(400, f"'{key}' is not supported; leave it out or 0", key)
    if body.get("logit_bias"):
        raise RequestError(400, "'logit_bias' is not supported", "logit_bias")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise RequestError(400, "only response_format {'type': 'text'} is supported", "response_format")
    if not chat and (body.get("echo") or body.get("suffix") is not None):
        raise RequestError(400, "'echo' and 'suffix' are not supported", "echo" if body.get("echo") else "suffix")
    n = _whole(body, "n", 1, 1, MAX_CHOICES)
    if not chat and body.get("best_of") not in (None, n):
        raise RequestError(400, "'best_of' must equal n when given", "best_of")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise RequestError(400, "'stream_options' supports only include_usage", "stream_options")
    sampling = _sampling(body, defaults, chat)
    prompts = _chat_prompts(body, tokenizer) if chat else _text_prompts(body, tokenizer)
    longest = max(len(p) for p in prompts)
    if context and longest + sampling.max_new_tokens > context:
        raise RequestError(
            400,
            f"the prompt takes {longest} tokens and max_tokens is {sampling.max_new_tokens}: "
            "more than the model's context "
            f"of {context}; shorten the prompt or lower max_tokens",
            "messages" if chat else "prompt",
        )
    seed = body.get("seed")
    # Choice j samples with seed + j, and a generator takes seeds in [-2**63, 2**64).
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not SEEDS[0] <= seed <= SEEDS[1] - n
    ):
        raise RequestError(
            400, f"'seed' must be a whole number from {SEEDS[0]} to {SEEDS[1] - n} (with n={n}), got {seed!r}", "seed"
        )
    return Parsed(
        chat,
        name,
        prompts,
        sampling,
        n,
        _stops(body.get("stop")),
        seed,
        _logprobs(body, chat),
        stream,
        bool(options.get("include_usage")),
    )


def _whole(body: dict, key: str, default: int, low: int, high: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(400, f"'{key}' must be a whole number from {low} to {high}, got {value!r}", key)
    return value


def _sampling(body: dict, defaults: Sampling, chat: bool) -> Sampling:
    values = {}
    keys = {"temperature": "temperature", "top_p": "top_p", "max_tokens": "max_new_tokens"}
    if chat:
        keys["max_completion_tokens"] = "max_new_tokens"
    for key, attr in keys.items():
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
        return Sampling(**{**defaults.__dict__, **values})
    except ValueError as err:
        raise RequestError(400, str(err).replace("max_new_tokens", "max_tokens")) from err


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
    return stops


def _logprobs(body: dict, chat: bool) -> int | None:
    if chat:
        wanted = body.get("logprobs")
        if wanted not in (None, True, False):
            raise RequestError(400, "'logprobs' must be true or false", "logprobs")
        top = _whole(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if top and not wanted:
            raise RequestError(400, "'top_logprobs' needs logprobs: true", "top_logprobs")
        return top if wanted else None
    return None if body.get("logprobs") is None else _whole(body, "logprobs", 0, 0, 5)


def _chat_prompts(body: dict, tokenizer) -> list[list[int]]:
    messages = body.get("messages")
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
    try:
        return [chat_prompt(tokenizer, parsed)]
    except Exception as err:  # the template's own checks (say, on the order of roles)
        raise RequestError(400, f"the model's chat template rejects these messages: {err}", "messages") from err


def _text_prompts(body: dict, tokenizer) -> list[list[int]]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if (
        not isinstance(prompts, list)
        or not prompts
        or len(prompts) > MAX_CHOICES
        or not all(isinstance(p, str) for p in prompts)
    ):
        raise RequestError(400, f"'prompt' must be a string or a list of up to {MAX_CHOICES} strings", "prompt")
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    if not all(ids):
        raise RequestError(400, "'prompt' must not be empty", "prompt")
    return ids


class Reply:
    """The OpenAI response objects for one request (chat or text completion)."""

    def __init__(self, parsed: Parsed):
        self.chat, self.model, self.created = parsed.chat, parsed.model, int(time.time())
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _envelope(self, choices: list, chunk: bool, **extra) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def completion(self, texts: list[str], reasons: list[str], logprobs: list[list | None], usage: dict) -> dict:
        choices = []
        for index, (text, reason, entries) in enumerate(zip(texts, reasons, logprobs)):
            content = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            choices.append({"index": index, **content, "logprobs": self.logprobs(entries), "finish_reason": reason})
        return self._envelope(choices, chunk=False, usage=usage)

    def chunk(
        self, index: int, text: str | None, entries: list | None = None, reason: str | None = None, first=False
    ) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": self.logprobs(entries), "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": self.logprobs(entries), "finish_reason": reason}
        return self._envelope([choice], chunk=True)

    def usage_chunk(self, usage: dict) -> dict:
        return self._envelope([], chunk=True, usage=usage)

    def logprobs(self, entries: list | None) -> dict | None:
        """Entries are (token text, its bytes, logprob, [(alternative text, bytes, logprob), ...])."""
        if entries is None:
            return None
        if self.chat:

            def item(text, raw, logprob):
                return {"token": text, "logprob": logprob, "bytes": raw}

            return {
                "content": [
                    {**item(t, raw, lp), "top_logprobs": [item(*alternative) for alternative in top]}
                    for t, raw, lp, top in entries
                ]
            }
        offsets = [sum(len(t) for t, *_ in entries[:i]) for i in range(len(entries))]
        return {
            "tokens": [t for t, *_ in entries],
            "token_logprobs": [lp for _, _, lp, _ in entries],
            "top_logprobs": [{a: alp for a, _, alp in top} for *_, top in entries],
            "text_offset": offsets,
        }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
