"""Generation: chat prompts, a batched decode loop, streamed text.

The decode loop is our own rather than `model.generate` because a served batch mixes
requests that differ in adapter, temperature, top-p and length, and each row streams on its
own. Rows are left-padded, so every row's last position is the next token's position; the
batch keeps its rows fixed to the end, which lets one `AdapterBank.mixed_batch` wrap it all.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Iterator

import torch
from torch import nn
from transformers import DynamicCache

from qvera.adapters.fit import check_fits
from qvera.adapters.loading import attach_adapter, read_any
from qvera.core.attach import vera_layers
from qvera.core.config import option
from qvera.generation.bank import AdapterBank, own_vectors_as_rows, running_rows
from qvera.generation.invariance import generation_numerics
from qvera.generation.last_logits import fold_last_position


@dataclass
class Sampling:
    """How the next token is picked; temperature 0 is greedy (argmax)."""

    _argument_group_name = "sampling"

    temperature: float = option(0.7, "how far sampling strays from the likeliest token; 0: greedy")
    top_p: float = option(0.9, "nucleus sampling: draw from the likeliest tokens that hold this much probability")
    max_new_tokens: int = option(256, "the longest reply, in tokens")

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")


GREEDY = Sampling(temperature=0.0, top_p=1.0)


@dataclass
class Step:
    """One decode step for the whole batch. Per row: the chosen token and the logits it came
    from, whether the row was still running (`active`), whether its token ends the turn
    (`stopped`), and whether the row is done after this step (stopped or out of budget)."""

    tokens: torch.Tensor  # (batch,)
    logits: torch.Tensor  # (batch, vocab), fp32
    active: torch.Tensor  # (batch,) bool
    stopped: torch.Tensor  # (batch,) bool
    finished: torch.Tensor  # (batch,) bool

    def text_tokens(self) -> list[tuple[int, int]]:
        """(row, token) for the rows whose token belongs to the reply's text."""
        keep = (self.active & ~self.stopped).tolist()
        return [(row, token) for row, (token, k) in enumerate(zip(self.tokens.tolist(), keep)) if k]


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` rendered by the model's chat template, ready for the reply."""
    if not tokenizer.chat_template:
        raise ValueError("this tokenizer has no chat template; use an instruction-tuned model such as smollm2-135m")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_token_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def nucleus(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities sorted high to low, zero past the smallest set that reaches top_p; the
    token ids in that order), per row, after temperature: what nucleus sampling draws from."""
    probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    # Drop a token when the tokens ranked above it already reach top_p (the top one always stays).
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p[:, None]
    return sorted_probs.masked_fill(drop, 0.0), order


def pick_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generator=None) -> torch.Tensor:
    """Per-row sampling: rows with temperature 0 take the argmax; the others sample from the
    smallest set of tokens whose probability reaches top_p (nucleus sampling)."""
    greedy = logits.argmax(-1)
    sampled_rows = temperature > 0
    if not sampled_rows.any():
        return greedy
    sorted_probs, order = nucleus(logits, temperature, top_p)
    choice = torch.multinomial(sorted_probs, 1, generator=generator).squeeze(-1)
    sampled = order.gather(-1, choice[:, None]).squeeze(-1)
    return torch.where(sampled_rows, sampled, greedy)


@torch.no_grad()
def decode_steps(
    model: nn.Module,
    prompts: list[list[int]],
    sampling: list[Sampling],
    end_ids: set[int],
    pad_id: int,
    generator: torch.Generator | None = None,
    batch_invariant: bool = False,
) -> Iterator[Step]:
    """Yield one `Step` per new token until every row is finished. A finished row keeps
    feeding padding (its output is ignored): the batch shape never changes mid-batch.

    Attention always runs row by row, so padding never reaches a row's numbers; with
    `batch_invariant` the matrix products run on fixed row tiles too, and a row's logits are
    bit for bit those of the same prompt alone, in every dtype (see `qvera.generation.invariance`).
    The model's own VeRA vectors (no mixed batch around) are read once, at the start."""
    assert len(prompts) == len(sampling) and prompts and all(prompts), "one non-empty prompt per sampling"
    fold_last_position(model)
    device = model.get_input_embeddings().weight.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    # Positions count real tokens only, so a padded row sees the positions it would see alone.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    temperature = torch.tensor([s.temperature for s in sampling], device=device)
    top_p = torch.tensor([s.top_p for s in sampling], device=device)
    budget = torch.tensor([s.max_new_tokens for s in sampling], device=device)
    ends = torch.tensor(sorted(end_ids), device=device, dtype=torch.long)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    cache = DynamicCache(config=model.config)
    step_inputs, step_positions = ids, positions
    # Without a mixed batch's rows, the model's own vectors, cast once, run as every row's. Set
    # around each forward only: a caller may stop iterating and then change or train them.
    layers = vera_layers(model)
    own_rows = None
    if layers and all(layer.row_vectors is None for layer in layers.values()):
        own_rows = own_vectors_as_rows(layers, model.get_input_embeddings().weight.dtype)
    for produced in range(1, int(budget.max()) + 1):
        with generation_numerics(model, batch_invariant), running_rows(layers, own_rows) if own_rows else nullcontext():
            out = model(
                input_ids=step_inputs,
                attention_mask=mask,
                position_ids=step_positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        logits = out.logits[:, -1].float()
        tokens = pick_tokens(logits, temperature, top_p, generator)
        active = ~finished
        tokens = torch.where(active, tokens, pad_id)
        stopped = active & torch.isin(tokens, ends)
        finished = finished | stopped | (produced >= budget)
        yield Step(tokens, logits, active, stopped, finished)
        if finished.all():
            return
        step_inputs = tokens[:, None]
        step_positions = step_positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)


class TextStream:
    """Turns a row's tokens into text pieces as they come. Decoding the whole reply each time
    keeps multi-token characters and word-initial spaces right; a piece ending in an
    incomplete UTF-8 sequence waits for the next token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.text = text[len(self.text) :], text
        return piece


def generate(
    model: nn.Module,
    tokenizer,
    conversations: list[list[dict]],
    adapters: list[str | None] | None = None,
    bank=None,
    sampling: Sampling = GREEDY,
    generator: torch.Generator | None = None,
    batch_invariant: bool = False,
) -> list[str]:
    """Reply to each conversation in one batch; row i runs with adapter `adapters[i]` from
    `bank` (None: the base). `batch_invariant`: see `decode_steps`."""
    if adapters is not None and bank is None:
        raise ValueError("adapters were named but no AdapterBank was given; pass bank=AdapterBank(model)")
    if adapters is not None and len(adapters) != len(conversations):
        raise ValueError(
            f"got {len(adapters)} adapter names for {len(conversations)} conversations; give one per conversation"
        )
    prompts = [chat_prompt(tokenizer, messages) for messages in conversations]
    streams = [TextStream(tokenizer) for _ in prompts]
    with bank.mixed_batch(adapters) if adapters is not None else nullcontext():
        end_ids, pad_id = end_token_ids(model, tokenizer), tokenizer.pad_token_id
        steps = decode_steps(model, prompts, [sampling] * len(prompts), end_ids, pad_id, generator, batch_invariant)
        for step in steps:
            for row, token in step.text_tokens():
                streams[row].push(token)
    return [s.text for s in streams]


def greedy_replies(
    model: nn.Module, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int = 32
) -> list[str]:
    """The greedy reply to each conversation, `batch_size` at a time, with the model in eval
    mode and put back in its own mode after: how scores and replay ask a model for answers."""
    was_training = model.training
    model.eval()
    sampling = replace(GREEDY, max_new_tokens=max_new_tokens)
    try:
        return [
            reply
            for start in range(0, len(conversations), batch_size)
            for reply in generate(model, tokenizer, conversations[start : start + batch_size], sampling=sampling)
        ]
    finally:
        model.train(was_training)


def reply_batch(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    adapter_folders: list[str | None],
    system: str | None = None,
    sampling: Sampling = GREEDY,
    batch_invariant: bool = False,
) -> list[str]:
    """Answer each prompt with its own adapter folder (None: the base), all in one mixed batch.
    A folder holds a qvera adapter or a peft VeRA one."""
    if len(adapter_folders) != len(prompts):
        raise ValueError(
            f"got {len(adapter_folders)} adapters for {len(prompts)} prompts; give one per prompt (or `none`)"
        )
    adapters = {folder: read_any(folder) for folder in adapter_folders if folder is not None}
    if adapters and not vera_layers(model):
        attach_adapter(model, next(iter(adapters.values())))  # A and B as the adapters were trained
    conversations = [
        ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}] for p in prompts
    ]
    if not vera_layers(model):
        return generate(model, tokenizer, conversations, sampling=sampling, batch_invariant=batch_invariant)
    bank = AdapterBank(model, dtype=model.dtype)
    for folder, adapter in adapters.items():
        check_fits(adapter, model, source=folder)
        bank.add(folder, adapter.vectors, adapter.config.method)
    return generate(model, tokenizer, conversations, adapter_folders, bank, sampling, batch_invariant=batch_invariant)


class Chat:
    """A multi-turn conversation with one model; `reply` streams the answer as it is made."""

    COMMANDS = "/reset (clear the history), /adapter FOLDER (switch adapter; `none`: the base), /exit"

    def __init__(self, model: nn.Module, tokenizer, system: str | None = None, sampling: Sampling = Sampling()):
        self.model, self.tokenizer, self.system, self.sampling = model, tokenizer, system, sampling
        self.end_ids = end_token_ids(model, tokenizer)
        self.adapter: str | None = None
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []

    def use_adapter(self, folder: str | None) -> None:
        """Answer with the adapter in `folder` (qvera's or peft's VeRA) from now on (None: the bare
        base); the history stays."""
        if folder is None:
            if vera_layers(self.model):
                AdapterBank(self.model).activate(None)
        else:
            attach_adapter(self.model, read_any(folder))
        self.adapter = folder

    def command(self, line: str) -> str:
        """Run a /command typed in the chat; return what to tell the user."""
        name, _, argument = line.strip().partition(" ")
        argument = argument.strip()
        if name == "/reset":
            self.reset()
            return "history cleared"
        if name == "/adapter" and argument:
            try:
                self.use_adapter(None if argument == "none" else argument)
            except (ValueError, FileNotFoundError) as err:
                return f"adapter not changed: {err}"
            return f"now answering with {self.adapter or 'the base model'}"
        return f"unknown command {line.strip()!r}; commands: {self.COMMANDS}"

    def reply(self, text: str) -> Iterator[str]:
        """Yield the answer to `text` piece by piece; the turn enters the history once complete."""
        messages = self.messages + [{"role": "user", "content": text}]
        stream = TextStream(self.tokenizer)
        steps = decode_steps(
            self.model,
            [chat_prompt(self.tokenizer, messages)],
            [self.sampling],
            self.end_ids,
            self.tokenizer.pad_token_id,
        )
        for step in steps:
            for _, token in step.text_tokens():
                piece = stream.push(token)
                if piece:
                    yield piece
        self.messages = messages + [{"role": "assistant", "content": stream.text}]
