"""Load test for scripts/serve.py, on 127.0.0.1 only, bounded in requests and time.

Saves `--adapters` random adapters (rank `--rank`) for the base, starts the server on a free
local port, and measures two phases against it:

- baseline: one client, one request at a time (so one adapter at a time), `--baseline` requests;
- load: `--clients` concurrent clients, `--requests` each, over all adapters, streaming and
  not, with bad requests (expect a 4xx) and hang-ups (expect a cancelled generation)
  interleaved; client 0 opens with a long prompt (`--long-prompt-tokens`).

Reports p50/p95 time to first token (TTFT) and per-token latency, tokens/s, errors by status,
and the server's RSS before the load (after a warm-up round at full concurrency) and after,
each read once the server is idle again (it hands its free heap back then; the reading the
moment the load ended is reported too).
Targets (exit status 1 when missed): no 5xx; p95 of (TTFT minus the request's own prefill,
as the server reports it) under 3 decode
steps (the server's median decode step under load); RSS growth under 5%; every hang-up
cancelled.

    python experiments/load_test.py --clients 16 --adapters 8 --requests 4 --json load.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from qvera import ModelConfig, VeraConfig, attach_vera, load_base, load_vector_state, vector_state
from qvera.adapters import save_adapter

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [row["instruction"] for row in json.loads((ROOT / "data" / "alpaca_en_demo.json").read_text())[:64]]
BAD_BODIES = [
    b'{"model": "no-such-adapter", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "adapter-0", "messages": [',
    b'{"model": "adapter-0", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
    None,  # headers announcing a 2 MB body: a 413 before any of it is read
]


def save_adapters(model_name: str, folder: Path, count: int, rank: int) -> None:
    model, _ = load_base(ModelConfig(name=model_name))
    attach_vera(model, VeraConfig(rank=rank))
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        load_vector_state(
            model, {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in vector_state(model).items()}
        )
        save_adapter(model, folder / f"adapter-{i}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Client:
    """One connection per request, as plain HTTP, so hang-ups are real socket closes."""

    def __init__(self, port: int, timeout: float):
        self.port, self.timeout = port, timeout

    def post(self, body: bytes | None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        if body is None:
            connection.putrequest("POST", "/v1/chat/completions")
            connection.putheader("Content-Length", "2000000")
            connection.endheaders()
        else:
            connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        return connection, connection.getresponse()

    def chat(self, adapter: str, question: str, max_tokens: int, stream: bool, hang_up: bool = False) -> dict:
        body = {
            "model": adapter,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if hang_up and not stream:  # send, wait a little, close: the reply never gets read
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            connection.request("POST", "/v1/chat/completions", body=json.dumps(body).encode())
            time.sleep(0.5)
            connection.close()
            return {"kind": "hang-up", "status": 200, "adapter": adapter}
        start = time.perf_counter()
        connection, response = self.post(json.dumps(body).encode())
        result = {"kind": "hang-up" if hang_up else "stream" if stream else "plain", "status": response.status}
        result["adapter"] = adapter
        try:
            if response.status != 200:
                response.read()
            elif stream:
                self._read_stream(response, start, result, hang_up)
            else:
                reply = json.loads(response.read())
                result.update(
                    total_s=time.perf_counter() - start,
                    tokens=reply["usage"]["completion_tokens"],
                    timing=reply["timing"][0],
                )
        finally:
            connection.close()
        return result

    def _read_stream(self, response, start: float, result: dict, hang_up: bool) -> None:
        first = last = None
        while line := response.readline():
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
                if hang_up:
                    return
            if chunk.get("usage"):
                result.update(tokens=chunk["usage"]["completion_tokens"], timing=chunk["timing"][0])
        if first is None or "tokens" not in result:
            result["status"] = "no reply"
            return
        result.update(ttft_s=first - start, total_s=last - start)
        if result["tokens"] > 1:
            result["per_token_s"] = (last - first) / (result["tokens"] - 1)

    def bad(self, body: bytes | None) -> dict:
        connection, response = self.post(body)
        response.read()
        connection.close()
        return {"kind": "bad", "status": response.status}


def percentile(values: list[float], share: float) -> float | None:
    values = sorted(values)
    return values[min(int(share * len(values)), len(values) - 1)] if values else None


def summarize(results: list[dict], seconds: float) -> dict:
    served = [r for r in results if r["kind"] in ("stream", "plain") and r["status"] == 200]
    ttft = [r["ttft_s"] for r in served if "ttft_s" in r]
    per_token = [r["per_token_s"] for r in served if "per_token_s" in r]
    timed = [r for r in served if "ttft_s" in r]
    # Waiting: TTFT less the request's own prefill phase (its first prefill forward to its first token).
    waits = [r["ttft_s"] - (r["timing"]["first_token_s"] - r["timing"]["queued_s"]) for r in timed]
    # Stricter: TTFT less only the prefill forwards it took part in (the decode steps between its chunks count too).
    strict = [r["ttft_s"] - r["timing"]["prefill_s"] for r in timed]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[f"{r['kind']} {r['status']}"] = statuses.get(f"{r['kind']} {r['status']}", 0) + 1
    return {
        "requests": len(results),
        "seconds": seconds,
        "statuses": statuses,
        "tokens_per_s": sum(r.get("tokens", 0) for r in served) / seconds,
        "ttft_s": {"p50": percentile(ttft, 0.5), "p95": percentile(ttft, 0.95)},
        "wait_beyond_own_prefill_s": {"p50": percentile(waits, 0.5), "p95": percentile(waits, 0.95)},
        "wait_beyond_own_prefill_forwards_s": {"p50": percentile(strict, 0.5), "p95": percentile(strict, 0.95)},
        "per_token_s": {"p50": percentile(per_token, 0.5), "p95": percentile(per_token, 0.95)},
        "server_5xx": sum(1 for r in results if isinstance(r["status"], int) and r["status"] >= 500),
    }


def metrics(port: int) -> dict[str, float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line}


def run_load(client: Client, args, deadline: float, requests: int) -> list[dict]:
    results, lock = [], threading.Lock()

    def one_client(index: int) -> None:
        rng = random.Random(index)
        time.sleep(rng.uniform(0, 1))  # arrivals spread over a second, not one burst
        for k in range(requests):
            if time.monotonic() > deadline:
                return
            adapter, question = f"adapter-{(index + k) % args.adapters}", rng.choice(QUESTIONS)
            if index == 0 and k == 0:
                question = " ".join(QUESTIONS) * 20
                question = question[: args.long_prompt_tokens * 4]  # about 4 characters a token
            kind = (index + k) % 8
            try:
                if kind == 5 and k:
                    result = client.bad(BAD_BODIES[(index + k) % len(BAD_BODIES)])
                else:
                    stream, hang_up = kind not in (2, 6), kind in (6, 7)
                    result = client.chat(adapter, question, args.max_tokens, stream, hang_up)
            except (OSError, http.client.HTTPException) as err:
                result = {"kind": "transport", "status": 0, "error": repr(err)}
            with lock:
                results.append(result)

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(deadline - time.monotonic(), 0) + args.request_timeout)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--requests", type=int, default=4, help="per client in the load phase")
    parser.add_argument("--baseline", type=int, default=8, help="requests in the one-at-a-time phase")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--long-prompt-tokens", type=int, default=1500)
    parser.add_argument("--prefill-tokens", type=int, default=128, help="the server's prompt tokens per prefill step")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds for the load phase, at most")
    parser.add_argument("--request-timeout", type=float, default=300)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        save_adapters(args.model, folder, args.adapters, args.rank)
        port = free_port()
        command = [
            sys.executable,
            str(ROOT / "scripts" / "serve.py"),
            "--model",
            args.model,
            "--adapters",
            str(folder),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--request-timeout",
            str(args.request_timeout),
            "--prefill-tokens",
            str(args.prefill_tokens),
        ]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        server = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, **quiet)
        try:
            report = measure(args, port, server)
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(0 if all(report["targets"].values()) else 1)


def measure(args, port: int, server: subprocess.Popen) -> dict:
    client = Client(port, args.request_timeout)
    wait_until_healthy(port, server)
    client.chat("adapter-0", "Hi", 2, stream=True)  # warm-up
    start = time.monotonic()
    baseline = [
        client.chat(f"adapter-{i % args.adapters}", QUESTIONS[i], args.max_tokens, stream=True)
        for i in range(args.baseline)
    ]
    baseline_summary = summarize(baseline, time.monotonic() - start)
    run_load(client, args, time.monotonic() + args.time_limit, requests=2)  # warm-up at full concurrency
    rss_before = idle_rss(port, server)
    before = metrics(port)
    start = time.monotonic()
    load = run_load(client, args, start + args.time_limit, args.requests)
    load_summary = summarize(load, time.monotonic() - start)
    after = metrics(port)
    rss_at_once = psutil.Process(server.pid).memory_info().rss
    rss_after = idle_rss(port, server)
    # The mean decode step of the load phase alone (the baseline's steps are of batch 1).
    steps = after["qvera_decode_steps_total"] - before["qvera_decode_steps_total"]
    step = (after["qvera_decode_seconds_total"] - before["qvera_decode_seconds_total"]) / steps
    hang_ups = sum(1 for r in load if r["kind"] == "hang-up")
    cancelled = after["qvera_cancelled_total"] - before["qvera_cancelled_total"]
    return {
        "setting": {**vars(args), "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        "baseline_one_at_a_time": baseline_summary,
        "load": load_summary,
        "server": {
            "decode_step_mean_s": step,
            "rss_before_mb": rss_before / 2**20,
            "rss_after_mb": rss_after / 2**20,
            "rss_the_moment_the_load_ended_mb": rss_at_once / 2**20,
            "hang_ups": hang_ups,
            "cancelled": cancelled,
        },
        "requests": load,
        "targets": {
            "no_5xx": load_summary["server_5xx"] == 0
            and all(isinstance(r["status"], int) and r["status"] for r in load),
            "p95_wait_beyond_own_prefill_under_3_steps": load_summary["wait_beyond_own_prefill_s"]["p95"] < 3 * step,
            "rss_growth_under_5_percent": rss_after < 1.05 * rss_before,
            "every_hang_up_cancelled": cancelled >= hang_ups,
        },
    }


def idle_rss(port: int, server: subprocess.Popen, seconds: float = 60) -> int:
    """The server's resident size once it has no request left and has had a moment to hand its
    free heap back (it does when it goes idle): read earlier, the size still counts the last
    steps' buffers, and growth measured that way says more about timing than about leaks."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        load = metrics(port)
        if not any(load[f"qvera_requests_{name}"] for name in ("waiting", "prefilling", "running")):
            break
        time.sleep(0.2)
    time.sleep(1.0)
    return psutil.Process(server.pid).memory_info().rss


def wait_until_healthy(port: int, server: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited with status {server.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(1)
    sys.exit("the server did not come up in time")


if __name__ == "__main__":
    main()
