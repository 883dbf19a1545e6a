"""What a caller hands the decoder and gets back: sampling settings, requests, results and the events
(`TextDelta`, `Finished`) that `Decoder.generate` yields."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is decoded."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    """0 means greedy."""
    top_k: int = 0
    """0 means off."""
    top_p: float = 1.0
    """1 means off."""
    repetition_penalty: float = 1.0
    """1 means off."""
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Request:
    """One sequence to decode: its prompt (token ids, at least one), settings and seed."""

    prompt_ids: Sequence[int]
    params: SamplingParams
    seed: int


@dataclass(frozen=True)
class Result:
    token_ids: list[int]
    """Tokens generated (the end-of-text token included when finish_reason is `eos`)."""
    text: str
    """The completion (cut before the stop string when finish_reason is `stop`)."""
    finish_reason: str
    """`length` (max_new_tokens reached), `stop` (a stop string appeared) or `eos` (the model ended the text)."""
    seconds: float
    """From the sequence's prefill (the start of its batch, or its joining a running one) to its last token."""


@dataclass(frozen=True)
class TextDelta:
    """New completion text of request `index`, final (never taken back)."""

    index: int
    text: str


@dataclass(frozen=True)
class Finished:
    index: int
    result: Result


class RequestSource(Protocol):
    """Where `Decoder.stream` takes its requests from, as rows free up."""

    ended: bool
    """No request will come any more."""

    def take(self, n: int, wait: bool) -> list[Request]:
        """Up to n requests: those waiting now, or with `wait`, at least one unless the source ends first."""


class RequestList:
    """A fixed list of requests as a source."""

    def __init__(self, requests: Sequence[Request]):
        self.requests, self.next = requests, 0
        self.ended = not requests

    def take(self, n: int, wait: bool) -> list[Request]:
        out = list(self.requests[self.next:self.next + n])
        self.next += len(out)
        self.ended = self.next >= len(self.requests)
        return out
