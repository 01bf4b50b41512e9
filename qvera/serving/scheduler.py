"""Continuous batching with a per-row adapter: requests join the running batch at the next
step and leave it when done, whatever their adapters.

One worker thread alternates two kinds of forward while both have work: a prefill step feeds
the newly arrived prompts a chunk each (at most `prefill_tokens` tokens in all), and a decode
step gives every running row its next token. A long prompt is thus fed over several prefill
steps with decode steps between them, and the rows already answering keep getting tokens. A
prompt whose last chunk is in moves, with its KV cache, into the running batch (`CacheRows`).
Each forward gathers every row's (d, b) from the AdapterBank while `A x` and the product by B
stay one matmul for the batch. Cancelled, finished and timed-out rows leave at the next step.

With `batch_invariant`, attention runs row by row over each row's own keys
(`qvera.generation.invariance`), whatever pads the joining and leaving rows leave between them, in
fixed query tiles; the matrix products run on fixed row tiles; and a prompt's chunks start on
multiples of the query tile (at least one tile a prompt a step, past `prefill_tokens` when many
prompts share the step): a row's numbers, and so its greedy reply, are then those of its
request alone. The default mode keeps transformers' batched attention: row attention without
the tiles made two same-seed sampled requests sent together diverge in a server test, which
batched attention does not.
"""

from __future__ import annotations

import ctypes
import queue
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from qvera.core.attention_kernels import without_cudnn_attention
from qvera.generation.decode import Sampling, end_token_ids
from qvera.generation.invariance import QUERY_TILE, generation_numerics
from qvera.generation.sampling import ReplyText, pick_rows, token_logprobs
from qvera.serving.kv_rows import CacheRows
from qvera.serving.store import AdapterStore, AdapterUnservable, AllSlotsHeld


class GenerationFailed(RuntimeError):
    """Generating one request's reply failed (its traceback is logged); the other rows go on."""


class ReplyTimedOut(TimeoutError):
    """A reply took longer than the server's limit, queueing included."""


class WorkerStopped(RuntimeError):
    """The generation worker has stopped on a fault no row explains; nothing is answered until a restart."""


@dataclass
class Job:
    """One generation: a prompt, its adapter (None: the base) and how to pick its tokens.
    The scheduler reports into `emit`: ("text", piece, logprob entries), then ("done",
    finish_reason, completion tokens, timing) or ("error", exception): GenerationFailed,
    ReplyTimedOut, WorkerStopped, or AdapterUnservable for an adapter gone bad since its check."""

    prompt: list[int]
    adapter: str | None
    sampling: Sampling
    emit: Callable[[tuple], None]
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    timeout: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled.set()


class Row:
    """A job inside the scheduler: how far its prompt is fed, what it has produced."""

    def __init__(self, job: Job, adapter_key: str | None, tokenizer, device):
        self.job, self.adapter_key, self.fed, self.produced, self.last_token = job, adapter_key, 0, 0, -1
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(job.seed if job.seed is not None else int(torch.randint(2**62, ())))
        self.reply = ReplyText(tokenizer, job.stop)
        self.entries: list = []  # logprob entries, one a token; the first `sent_entries` went out
        self.sent_entries = 0
        # queued_s: arrival to its first prefill forward; prefill_s: the prefill forwards it took part in.
        self.timing = {"queued_s": 0.0, "prefill_s": 0.0, "first_token_s": 0.0}


@dataclass
class Stats:
    """Counters for /metrics and tests; step times of the last few hundred steps."""

    decode_steps: int = 0
    prefill_steps: int = 0
    decode_seconds_total: float = 0.0
    tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    decode_seconds: deque = field(default_factory=lambda: deque(maxlen=512))
    prefill_seconds: deque = field(default_factory=lambda: deque(maxlen=512))


class Scheduler:
    """The worker thread over one model. Failures stay with their row: an exception while
    admitting a request, feeding its prompt, decoding its next token or picking and reporting
    that token fails that request alone (a 500 to its client, its adapter released, counted in
    `stats.failed`). A batched forward that raises is undone (the KV cache is put back as it
    was) and each of its rows is tried alone to find the ones at fault; the others go on with
    the next step and produce the tokens they would have produced without the failed row."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        store: AdapterStore,
        *,
        max_batch_size: int = 32,
        prefill_tokens: int = 128,
        batch_invariant: bool = False,
        stall_seconds: float = 120.0,
    ):
        if max_batch_size < 1 or prefill_tokens < 1:
            raise ValueError(
                f"max_batch_size and prefill_tokens must be at least 1, got {max_batch_size} and {prefill_tokens}"
            )
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.max_batch_size, self.prefill_tokens = max_batch_size, prefill_tokens
        self.batch_invariant, self.stall_seconds = batch_invariant, stall_seconds
        self.end_ids = end_token_ids(model, tokenizer)
        self.device = model.get_input_embeddings().weight.device
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.prefilling, self.prefill_rows = CacheRows(model, tokenizer.pad_token_id), []
        self.running, self.running_rows = CacheRows(model, tokenizer.pad_token_id), []
        self.running_vectors = None  # the running rows' gathered (d, b), kept while they stay
        self.decoded_last = False
        self.steps_at_trim = 0
        self.stats = Stats()
        self.heartbeat = time.monotonic()  # when the worker last went round its loop
        self.fault: str | None = None  # why the worker stopped, once it has
        self.thread = threading.Thread(target=self._run, name="qvera-scheduler", daemon=True)
        self._stopping = threading.Event()

    def start(self) -> Scheduler:
        self.thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        self.inbox.put(None)
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def load(self) -> dict:
        return {
            "waiting": len(self.waiting) + self.inbox.qsize(),
            "prefilling": len(self.prefill_rows),
            "running": len(self.running_rows),
        }

    def trouble(self) -> str | None:
        """Why the worker cannot serve (None: it is serving): it has stopped, or it has work
        and has not gone round its loop for `stall_seconds`."""
        if not self.thread.is_alive():
            return f"the generation worker has stopped ({self.fault or 'not started'})"
        pending = sum(self.load().values())
        idle = time.monotonic() - self.heartbeat
        if pending and idle > self.stall_seconds:
            return f"the generation worker has not stepped for {idle:.0f} s with {pending} request(s) pending"
        return None

    # --- the worker ----------------------------------------------------------------------

    def _run(self) -> None:
        """The loop; should it end on an error (a fault no row explains), every request it holds
        is answered with a 503, and `trouble` says why from then on."""
        try:
            self._loop()
        except BaseException as err:
            self.fault = f"{type(err).__name__}: {err}"
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            error = WorkerStopped(f"the generation worker has stopped ({self.fault}); restart the server")
            jobs = [row.job for row in self.prefill_rows + self.running_rows] + list(self.waiting)
            while not self.inbox.empty():
                jobs.append(self.inbox.get_nowait())
            for job in jobs:
                if job is not None:
                    job.emit(("error", error))

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self.heartbeat = time.monotonic()
            self._admit(block=not (self.prefill_rows or self.running_rows))
            self._drop_gone()
            prefill = self.prefill_rows and (self.decoded_last or not self.running_rows)
            if not (self.prefill_rows if prefill else self.running_rows):
                if self.stats.decode_steps + self.stats.prefill_steps > self.steps_at_trim:
                    self.steps_at_trim = self.stats.decode_steps + self.stats.prefill_steps
                    return_free_memory()  # idle now: hand the step buffers' memory back to the system
                continue
            self._prefill_step() if prefill else self._decode_step()
            self.decoded_last = not prefill

    def _admit(self, block: bool) -> None:
        """Move arrivals into the prefill batch while there is room and an adapter slot."""
        try:
            while True:
                job = self.inbox.get(timeout=0.1) if block else self.inbox.get_nowait()
                block = False
                if job is not None:
                    self.waiting.append(job)
        except queue.Empty:
            pass
        admitted = []
        while self.waiting and len(self.prefill_rows) + len(self.running_rows) + len(admitted) < self.max_batch_size:
            job = self.waiting[0]
            if job.cancelled.is_set():
                self.waiting.popleft()
                self.stats.cancelled += 1
                continue
            try:
                key = self.store.acquire(job.adapter)
            except AllSlotsHeld:
                break  # every resident adapter is in use: wait for a row to finish
            except AdapterUnservable as err:  # deleted or damaged since the request was checked
                self.waiting.popleft()
                job.emit(("error", err))
                continue
            except Exception as err:
                self.waiting.popleft()
                self._fail(job, err)
                continue
            self.waiting.popleft()
            try:
                admitted.append(Row(job, key, self.tokenizer, self.device))
            except Exception as err:
                self.store.release(key)
                self._fail(job, err)
        if admitted:
            self.prefilling.add_empty(len(admitted))
            self.prefill_rows += admitted

    def _fail(self, job: Job, err: Exception) -> None:
        """Answer one request with a server error for `err`, logged with its traceback."""
        print("".join(traceback.format_exception(err)), file=sys.stderr, flush=True)
        failed = GenerationFailed(f"generating this reply failed ({type(err).__name__}); see the server log")
        job.emit(("error", failed))
        self.stats.failed += 1

    def _drop_gone(self) -> None:
        """Drop jobs whose client went away or whose time ran out, waiting or running."""
        now = time.monotonic()
        for job in [job for job in self.waiting if self._gone(job, now)]:
            self.waiting.remove(job)
        for prefill, rows in ((True, self.prefill_rows), (False, self.running_rows)):
            gone = {i for i, row in enumerate(rows) if self._gone(row.job, now)}
            if gone:
                self._remove(prefill, gone)

    def _gone(self, job: Job, now: float) -> bool:
        if job.cancelled.is_set():
            self.stats.cancelled += 1
            return True
        if job.timeout is not None and now - job.arrived > job.timeout:
            job.emit(("error", ReplyTimedOut(f"the reply took longer than the server's limit of {job.timeout:g} s")))
            return True
        return False

    def _prefill_step(self) -> None:
        rows = self.prefill_rows
        share = max(self.prefill_tokens // len(rows), 1)
        if self.batch_invariant:  # whole query tiles, so a chunk's bounds never depend on the load
            share = max(share // QUERY_TILE, 1) * QUERY_TILE
        chunks = [row.job.prompt[row.fed : row.fed + share] for row in rows]
        start = time.monotonic()
        for row in rows:
            if row.fed == 0:
                row.timing["queued_s"] = start - row.job.arrived
        logits = self._forward(True, rows, chunks)
        if logits is None:
            return
        seconds = time.monotonic() - start
        self.stats.prefill_steps += 1
        self.stats.prefill_seconds.append(seconds)
        fed = []
        for i, (row, chunk) in enumerate(zip(rows, chunks)):
            row.fed += len(chunk)
            row.timing["prefill_s"] += seconds
            if row.fed == len(row.job.prompt):
                fed.append(i)
        leaving = set()
        for i, token in zip(fed, self._pick([rows[i] for i in fed], logits[fed])):
            rows[i].timing["first_token_s"] = time.monotonic() - rows[i].job.arrived
            if token is None or self._advance(rows[i], token, logits[i]):
                leaving.add(i)
                self.store.release(rows[i].adapter_key)
        moving = [i for i in fed if i not in leaving]
        if moving:
            self.running.add(self.prefilling.take(moving))
            self.running_rows += [rows[i] for i in moving]
            self.running_vectors = None
        self._remove(True, set(fed), release=False)  # the moving rows keep their adapters
        if self.prefilling.wasted() > 0.5:
            self.prefilling.repack()

    def _decode_step(self) -> None:
        rows = self.running_rows
        start = time.monotonic()
        logits = self._forward(False, rows, [[row.last_token] for row in rows])
        if logits is None:
            return
        self.stats.decode_steps += 1
        self.stats.decode_seconds.append(time.monotonic() - start)
        self.stats.decode_seconds_total += self.stats.decode_seconds[-1]
        tokens = self._pick(rows, logits)
        leaving = {i for i, token in enumerate(tokens) if token is None or self._advance(rows[i], token, logits[i])}
        if leaving:
            self._remove(False, leaving)

    def _forward(self, prefill: bool, rows: list[Row], chunks: list[list[int]]) -> torch.Tensor | None:
        """The batch's logits after feeding each row its chunk; None when the forward raised:
        then the cache is as before, the rows at fault have failed and left, and the step is
        to be taken again by the rows that remain."""
        cache = self.prefilling if prefill else self.running
        saved = cache.snapshot()
        try:
            if prefill:
                vectors = self.store.bank.gather([row.adapter_key for row in rows])
            else:
                if self.running_vectors is None:
                    self.running_vectors = self.store.bank.gather([row.adapter_key for row in rows])
                vectors = self.running_vectors
            with self._numerics(vectors):
                return cache.forward(chunks)
        except Exception as err:
            cache.restore(saved)
            at_fault = set()
            for i, row in enumerate(rows):
                try:
                    with self._numerics(self.store.bank.gather([row.adapter_key])):
                        cache.row_alone(i).forward([chunks[i]])
                except Exception as row_err:
                    at_fault.add(i)
                    self._fail(row.job, row_err)
            if not at_fault:  # no row fails alone (out of memory, say): the whole step fails
                for i, row in enumerate(rows):
                    at_fault.add(i)
                    self._fail(row.job, err)
            self._remove(prefill, at_fault)
            return None

    @contextmanager
    def _numerics(self, vectors):
        """Each row with its own adapter's vectors, attention off cuDNN's per-shape plans
        (`qvera.core.attention_kernels`) and, with `batch_invariant`, the attention and
        products that keep its numbers its own (`generation_numerics`, which includes the former)."""
        numerics = (
            generation_numerics(self.model, batch_invariant=True) if self.batch_invariant else without_cudnn_attention()
        )
        with self.store.bank.rows(vectors), numerics:
            yield

    def _pick(self, rows: list[Row], logits: torch.Tensor) -> list[int | None]:
        """Each row's next token; None for a row whose pick raised (it has failed)."""
        if not rows:
            return []
        try:
            return self._pick_batch(rows, logits)
        except Exception:
            tokens = []
            for i, row in enumerate(rows):
                try:
                    tokens += self._pick_batch([row], logits[i : i + 1])
                except Exception as err:
                    self._fail(row.job, err)
                    tokens.append(None)
            return tokens

    def _pick_batch(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        temperature = torch.tensor([float(row.job.sampling.temperature) for row in rows], device=logits.device)
        top_p = torch.tensor([float(row.job.sampling.top_p) for row in rows], device=logits.device)
        return pick_rows(logits, temperature, top_p, [row.generator for row in rows]).tolist()

    def _advance(self, row: Row, token: int, logits: torch.Tensor) -> bool:
        """Report the row's next token (picked from `logits`, (vocab,)); True when the row
        leaves: done, or failed while reporting."""
        try:
            return self._report(row, token, logits)
        except Exception as err:
            self._fail(row.job, err)
            return True

    def _report(self, row: Row, token: int, logits: torch.Tensor) -> bool:
        job = row.job
        row.produced += 1
        self.stats.tokens += 1
        if job.logprobs is not None:
            row.entries.append(token_logprobs(self.tokenizer, logits, token, job.logprobs))
        if token in self.end_ids:
            return self._finish(row, "stop")
        piece, stopped = row.reply.push(token)
        if stopped:
            return self._finish(row, "stop", piece)
        if piece:
            self._send(row, piece, row.reply.tokens_sent())
        if row.produced >= job.sampling.max_new_tokens:
            return self._finish(row, "length")
        row.last_token = token
        return False

    def _send(self, row: Row, piece: str, tokens: int) -> None:
        """Send a piece of text with the logprob entries of the tokens it completes."""
        entries = row.entries[row.sent_entries : tokens] if row.job.logprobs is not None else []
        row.sent_entries += len(entries)
        row.job.emit(("text", piece, entries))

    def _finish(self, row: Row, reason: str, piece: str = "") -> bool:
        """End the reply. After a stop string, the tokens that only made it (their text is
        left out) leave the logprobs and the token count too."""
        piece += row.reply.flush()
        produced = row.reply.tokens_kept() if row.reply.stopped else row.produced
        if piece or row.entries[row.sent_entries : produced]:
            self._send(row, piece, produced)
        row.job.emit(("done", reason, produced, row.timing))
        self.stats.finished += 1
        return True

    def _remove(self, prefill: bool, indices: set[int], release: bool = True) -> None:
        """Drop rows from the prefill or the running batch, and free their adapters."""
        rows, cache = (self.prefill_rows, self.prefilling) if prefill else (self.running_rows, self.running)
        keep = [i for i in range(len(rows)) if i not in indices]
        for i in indices if release else ():
            self.store.release(rows[i].adapter_key)
        cache.keep(keep)
        kept = [rows[i] for i in keep]
        if prefill:
            self.prefill_rows = kept
        else:
            self.running_rows, self.running_vectors = kept, None


def return_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc keeps them otherwise, and the
    resident size of a long-running server only grows); elsewhere, nothing to do."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
