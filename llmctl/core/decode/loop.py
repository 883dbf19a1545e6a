"""The decode loop (`Decoder`): prefill a batch of requests, then one token per row per step until each sequence
ends, yielding text as it becomes final and each result as its sequence finishes; left padding and end-of-text ids."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import torch

from llmctl.core.decode.generic import HFForward
from llmctl.core.decode.gpt2 import GPT2Forward
from llmctl.core.decode.llama import LlamaForward
from llmctl.core.decode.requests import Finished, Request, RequestList, RequestSource, Result, TextDelta
from llmctl.core.decode.sampling import Sampler
from llmctl.core.decode.speculate import _Guesser
from llmctl.core.decode.text import _TextTail
from llmctl.core.model import max_positions

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# The decode loop


class Decoder:
    """Decodes batches of requests with one model and tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, ignore_eos: bool = False, batch_invariant: bool = True,
                 speculate: bool = True, stop_ids: Sequence[int] = (), batch_size: int | None = None):
        """`batch_size`: the most requests the caller decodes together, where known: on CPUs whose BLAS sums rows
        in tiles, batches of 4 or more then go through the products in whole tiles (see `plan_rows`), which keeps
        every row's bits among all such batch sizes but not against batches of 1-3."""
        self.model = model.eval()
        self.speculate = speculate
        self.guesses = self.right_guesses = 0  # speculation, over this decoder's life
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        if GPT2Forward.supports(model):
            self.forward = GPT2Forward(model, batch_invariant=batch_invariant, batch_size=batch_size,
                                       speculate=speculate)
            log.debug("decoding with the lean GPT-2 path (preallocated KV cache)")
        elif LlamaForward.supports(model):
            self.forward = LlamaForward(model, batch_invariant=batch_invariant, batch_size=batch_size)
            log.debug("decoding with the lean Llama path (preallocated KV cache)")
        else:
            self.forward = HFForward(model)
            log.debug("%s is not a plain GPT-2: decoding through its own forward and transformers' cache",
                      type(model).__name__)
        vocab = model.get_output_embeddings().weight.shape[0]
        self.vocab_size = vocab
        # stop_ids: more tokens that end a text (a chat template's end-of-turn marker)
        self.eos_ids = set() if ignore_eos else _eos_ids(model, tokenizer, vocab) | {i for i in stop_ids if i < vocab}
        self.context_length = max_positions(model)
        self.pad_id = next(iter(self.eos_ids), None) or tokenizer.pad_token_id or 0

    @property
    def path(self) -> str:
        """`gpt2` or `llama` (the lean paths), or `generic`."""
        if isinstance(self.forward, GPT2Forward):
            return "gpt2"
        return "llama" if isinstance(self.forward, LlamaForward) else "generic"

    def generate(self, requests: Sequence[Request]) -> Iterator[TextDelta | Finished]:
        """Decode `requests` together, as one batch; yield text as it becomes final and each result as its sequence
        ends (events carry the request's index in `requests`)."""
        return self.stream(RequestList(requests), max(len(requests), 1))

    def stream(self, source: RequestSource, batch_size: int, continuous: bool = True
               ) -> Iterator[TextDelta | Finished]:
        """Decode the requests `source` hands out, `batch_size` at a time with continuous batching: when a sequence
        ends, the next waiting request is prefilled into its row at once and decodes with the others, instead of
        waiting for the whole batch to end. Events carry each request's number in the order taken from `source`.
        A row's arithmetic does not depend on its batch (see GPT2Forward), so every completion is what a batch of
        its own gives: the same bytes as static batches. Not `continuous`, or with a forward that cannot admit rows
        into a running batch (the generic path): static batches, each taking new requests once all its rows have
        ended."""
        can_admit = continuous and hasattr(self.forward, "admit")
        rows: list[_Row] = []  # one per physical row of the forward, each still decoding
        ended: list[int] = []  # rows whose sequence ended at the last step
        taken = 0  # requests taken from the source
        sampler = tokens = guesser = None
        local = 0  # the sampler's step number (its draws count from its making)
        stale = False  # rows joined a running batch: the sampler is rebuilt before the next step
        while True:
            if ended or not rows:
                # Rows that ended make room: the next waiting requests take them (all rows, on a fresh start).
                idle = len(ended) == len(rows)
                room = batch_size - len(rows) + len(ended)
                new = (source.take(room, wait=idle) if room > 0 and not source.ended and (can_admit or idle)
                       else [])
                firsts: list[int] = []
                with torch.inference_mode():
                    if idle:
                        rows, firsts, sampler = self._start(new, taken)
                        local, stale, admitted = 1, False, range(len(rows))
                    else:
                        rows, firsts, admitted = self._admit(rows, ended, new, taken, sampler)
                        stale = stale or bool(new)
                taken += len(new)
                if not rows:
                    if source.ended:
                        return
                    continue
                ended = []
                for j, token in zip(admitted, firsts):
                    events, done = rows[j].take(token, self.eos_ids)
                    yield from events
                    if done:
                        ended.append(j)
                if ended:  # a sequence may end at its first token: make room again before a step
                    continue
                with torch.inference_mode():
                    if stale:  # one sampler for all rows, each drawing its own next number
                        sampler = Sampler([r.request for r in rows], self.vocab_size, self.device,
                                          [r.generated for r in rows])
                        local, stale = 0, False
                    tokens = torch.tensor([r.generated[-1] for r in rows], device=self.device)
            # One decode step for every row; a lone row may check a guessed next token too.
            guess = right = None
            with torch.inference_mode():
                row = rows[0]
                if len(rows) == 1 and len(row.generated) + 2 <= row.limit and self._can_speculate():
                    if guesser is None or guesser.row != row.index:
                        guesser = _Guesser(row.index, row.request.prompt_ids)
                    guess = guesser.guess(row.generated)
                if guess is None:
                    tokens = sampler(self.forward.step(tokens), local)
                else:
                    logits = self.forward.step(tokens, guess)  # (2, V): after the token, and after the guess
                    tokens = sampler(logits[:1], local)
                    self.guesses += 1
                    right = sampler.tolist(tokens)[0] == guess
                    guesser.record(right)
                    if right:
                        self.forward.accept()
                        self.right_guesses += 1
                local += 1
            for j, (row, token) in enumerate(zip(rows, sampler.tolist(tokens))):
                events, done = row.take(token, self.eos_ids)
                yield from events
                if done:
                    ended.append(j)
            if right and not ended:
                # The guess was right: it was this step's token, and the second row's logits give the next one.
                with torch.inference_mode():
                    tokens = sampler(logits[1:], local)
                local += 1
                events, done = rows[0].take(sampler.tolist(tokens)[0], self.eos_ids)
                yield from events
                if done:
                    ended.append(0)

    def _start(self, requests: list[Request], taken: int) -> tuple[list[_Row], list[int], Sampler | None]:
        """Prefill a batch from nothing: its rows (longest prompt first, so that rows of equal prompt length sit
        together: see GPT2Forward), their first tokens and the sampler."""
        if not requests:
            return [], [], None
        start = time.perf_counter()
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt_ids))
        rows = [_Row(taken + i, requests[i], self.tokenizer, start) for i in order]
        for row in rows:
            self._check_fits(row.request)
        ids, mask = _left_pad([r.request.prompt_ids for r in rows], self.pad_id, self.device)  # (B, P)
        logits = self.forward.prefill(ids, mask, max(r.limit for r in rows))  # (B, V)
        sampler = Sampler([r.request for r in rows], self.vocab_size, self.device)
        return rows, sampler.tolist(sampler(logits, 0)), sampler

    def _admit(self, rows: list[_Row], ended: list[int], new: list[Request], taken: int, sampler: Sampler
               ) -> tuple[list[_Row], list[int], list[int]]:
        """New requests take the rows of `ended` ones (and rows after the last, where the batch is not full); ended
        rows nobody takes are dropped. Each new request is prefilled alone into its row; its first token is drawn
        with a sampler of its own (its draw number 0). Returns the rows, the first tokens and the rows they are in."""
        drop = set(ended[len(new):])
        slots = ended[:len(new)] + list(range(len(rows), len(rows) + len(new) - len(ended)))
        if drop:
            keep = [j for j in range(len(rows)) if j not in drop]
            index = torch.tensor(keep, device=self.device)
            self.forward.select(index)
            sampler.select(index)
            position = {old: j for j, old in enumerate(keep)}
            rows, slots = [rows[j] for j in keep], [position[j] for j in slots]
        firsts = []
        for offset, (slot, request) in enumerate(zip(slots, new)):
            self._check_fits(request)
            row = _Row(taken + offset, request, self.tokenizer, time.perf_counter())
            ids = torch.tensor(list(request.prompt_ids), dtype=torch.long, device=self.device)
            logits = self.forward.admit(slot, ids, row.limit)  # (1, V)
            first = Sampler([request], self.vocab_size, self.device)
            firsts.append(first.tolist(first(logits, 0))[0])
            if slot == len(rows):
                rows.append(row)
            else:
                rows[slot] = row
        return rows, firsts, slots

    def _check_fits(self, request: Request) -> None:
        if self.context_length and len(request.prompt_ids) + request.params.max_new_tokens > self.context_length:
            raise ValueError("prompt + max_new_tokens exceed the context; truncate before decoding")

    def _can_speculate(self) -> bool:
        """Whether a lone sequence may check a guessed next token in the spare row of its step (see `_Guesser`): on
        a forward that offers it (the lean GPT-2 path), where the spare row's arithmetic is what its own step would
        be. Sampling too: each step draws with its own pre-drawn random number, so a right guess is exactly the token
        the step would sample."""
        return self.speculate and getattr(self.forward, "can_speculate", False)


class _Row:
    """One sequence decoding in a row: its request, the tokens made so far and its text."""

    def __init__(self, index: int, request: Request, tokenizer, start: float):
        self.index, self.request, self.start = index, request, start
        self.limit = request.params.max_new_tokens
        self.text = _TextTail(tokenizer, request.prompt_ids, request.params.stop)
        self.generated: list[int] = []

    def take(self, token: int, eos_ids: set[int]) -> tuple[list[TextDelta | Finished], bool]:
        """Append the sequence's next token: the events that makes, and whether the sequence ended."""
        self.generated.append(token)
        text, reason = self.text, None
        if token in eos_ids:
            reason, delta = "eos", text.finish()
        else:
            delta = text.push(token)
            if text.stopped:
                reason = "stop"
            elif len(self.generated) >= self.limit:
                reason = "length"
                delta += text.finish()
        events: list[TextDelta | Finished] = [TextDelta(self.index, delta)] if delta else []
        if reason is not None:
            seconds = time.perf_counter() - self.start
            events.append(Finished(self.index, Result(self.generated, text.text, reason, seconds)))
        return events, reason is not None


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, P): prompts aligned on the right so that every row's next token goes in one column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = True
    return ids.to(device), mask.to(device)


def _eos_ids(model, tokenizer, vocab: int) -> set[int]:
    """The ids that end a text: the generation config's (an id or a list) and the tokenizer's."""
    ids: set[int] = set()
    config_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_ids, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return {i for i in ids if 0 <= i < vocab}  # GPT2Config's default 50256 is out of range for small vocabularies
