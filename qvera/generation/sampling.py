"""Per-row token choice, log-probabilities and stop strings for the continuous batcher.

Every row samples with its own torch.Generator, so a request with a `seed` draws the same
tokens whatever rows share its batch (given the same logits: exactly so in fp32).
"""

from __future__ import annotations

import bisect
import re

import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from qvera.generation.decode import TextStream, nucleus


def pick_rows(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generators: list[torch.Generator]
) -> torch.Tensor:
    """Rows with temperature 0 take the argmax; the others sample from the smallest set of
    tokens whose probability reaches top_p (nucleus sampling), each with its own generator."""
    greedy = logits.argmax(-1)
    sampled_rows = temperature > 0
    if not sampled_rows.any():
        return greedy
    sorted_probs, order = nucleus(logits, temperature, top_p)
    cumulative = sorted_probs.cumsum(-1)
    draws = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators]).to(logits.device)
    choice = torch.searchsorted(cumulative, (draws * cumulative[:, -1])[:, None]).clamp(max=logits.shape[-1] - 1)
    sampled = order.gather(-1, choice).squeeze(-1)
    return torch.where(sampled_rows, sampled, greedy)


def token_logprobs(tokenizer, logits: torch.Tensor, token: int, top: int) -> tuple:
    """(token text, its raw bytes, its log-probability, the `top` likeliest tokens as (text,
    bytes, log-probability)) under the model's own distribution, before temperature and top-p."""
    logprobs = torch.log_softmax(logits, dim=-1)
    alternatives = []
    if top:
        values, ids = logprobs.topk(top)
        alternatives = [
            (tokenizer.decode([i]), token_bytes(tokenizer, i), v) for i, v in zip(ids.tolist(), values.tolist())
        ]
    return tokenizer.decode([token]), token_bytes(tokenizer, token), float(logprobs[token]), alternatives


BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
BYTE_LEVEL = {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes(tokenizer, token: int) -> list[int]:
    """The token's own bytes. A token holding part of a character (an emoji's first bytes, say)
    decodes to U+FFFD on its own; its bytes are what a client joins to rebuild the text. Read
    from the vocabulary: byte-level BPE (GPT-2, Llama 3, SmolLM) maps each byte to one
    character, and sentencepiece writes a lone byte as <0xNN> and a space as U+2581."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if piece is None or token in tokenizer.all_special_ids:
        return list(tokenizer.decode([token]).encode())
    if match := BYTE_TOKEN.fullmatch(piece):
        return [int(match.group(1), 16)]
    if getattr(tokenizer, "is_fast", False) and type(tokenizer.backend_tokenizer.pre_tokenizer).__name__ == "ByteLevel":
        if all(char in BYTE_LEVEL for char in piece):
            return [BYTE_LEVEL[char] for char in piece]
    return list(piece.replace("\u2581", " ").encode())


class ReplyText:
    """A row's reply as text pieces, cut at the first stop string. Text that could be the
    start of a stop string is held back until the next tokens settle it."""

    def __init__(self, tokenizer, stops: list[str]):
        self.stream, self.stops = TextStream(tokenizer), stops
        self.sent, self.stopped = 0, False
        self.text = ""
        self.ends: list[int] = []  # the text's length once each token is in

    def push(self, token: int) -> tuple[str, bool]:
        """The new text that can be sent, and whether a stop string ended the reply."""
        self.stream.push(token)
        text = self.stream.text
        self.ends.append(len(text))
        found = [i for i in (text.find(stop, max(self.sent - len(stop), 0)) for stop in self.stops) if i >= 0]
        if found:
            self.stopped = True
            return self._send(text, min(found)), True
        held = max((k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        return self._send(text, len(text) - held), False

    def tokens_sent(self) -> int:
        """How many tokens the text sent so far holds whole."""
        return bisect.bisect_right(self.ends, self.sent)

    def tokens_kept(self) -> int:
        """After a stop string: how many tokens the reply's text needs (each token whose text
        begins before the cut); the rest only made the stop string."""
        starts = [0, *self.ends[:-1]]
        return sum(start < self.sent for start in starts) if self.sent else 0

    def flush(self) -> str:
        """What was held back, once the reply ends for another reason than a stop string."""
        return "" if self.stopped else self._send(self.stream.text, len(self.stream.text))

    def _send(self, text: str, end: int) -> str:
        piece = text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        self.text = text[: self.sent]
        return piece
