"""The decode loop (`Decoder`): prefill a batch of requests, then one token per row per step until each sequence
ends, yielding text as it becomes final and each result as its sequence finishes; left padding and end-of-text ids."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import torch

from llmctl.core.decode.generic import HFForward
from llmctl.core.decode.gpt2 import GPT2Forward
from llmctl.core.decode.requests import Finished, Request, Result, TextDelta
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
                 speculate: bool = True, stop_ids: Sequence[int] = ()):
        self.model = model.eval()
        self.speculate = speculate
        self.guesses = self.right_guesses = 0  # speculation, over this decoder's life
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        if GPT2Forward.supports(model):
            self.forward = GPT2Forward(model, batch_invariant=batch_invariant)
            log.debug("decoding with the lean GPT-2 path (preallocated KV cache)")
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
        """`gpt2` (the lean path) or `generic`."""
        return "gpt2" if isinstance(self.forward, GPT2Forward) else "generic"

    def generate(self, requests: Sequence[Request]) -> Iterator[TextDelta | Finished]:
        """Decode `requests` together; yield text as it becomes final and each result as its sequence ends."""
        start = time.perf_counter()
        if not requests:
            return
        # Longest prompt first: rows with equal prompt lengths then sit together (see GPT2Forward).
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt_ids))
        requests = [requests[i] for i in order]
        lengths = [len(r.prompt_ids) for r in requests]
        limits = [r.params.max_new_tokens for r in requests]
        max_new = max(limits)
        if self.context_length and max(lengths) + max_new > self.context_length:
            raise ValueError("prompt + max_new_tokens exceed the context; truncate before decoding")
        # Inference mode only around the tensor work, not across the yields (the caller's code runs there).
        with torch.inference_mode():
            ids, mask = _left_pad([r.prompt_ids for r in requests], self.pad_id, self.device)  # (B, P)
            logits = self.forward.prefill(ids, mask, max_new)  # (B, V)
            sampler = Sampler(requests, self.vocab_size, self.device)
            tokens = sampler(logits, 0)  # (B,)
        texts = [_TextTail(self.tokenizer, r.prompt_ids, r.params.stop) for r in requests]
        generated: list[list[int]] = [[] for _ in requests]
        eos_ids = self.eos_ids

        def take(i: int, token: int, step: int) -> tuple[list[TextDelta | Finished], bool]:
            """Append token number `step` to sequence i: the events that makes, and whether the sequence ended."""
            generated[i].append(token)
            text, reason = texts[i], None
            if token in eos_ids:
                reason, delta = "eos", text.finish()
            else:
                delta = text.push(token)
                if text.stopped:
                    reason = "stop"
                elif step + 1 >= limits[i]:
                    reason = "length"
                    delta += text.finish()
            events: list[TextDelta | Finished] = [TextDelta(order[i], delta)] if delta else []
            if reason is not None:
                seconds = time.perf_counter() - start
                events.append(Finished(order[i], Result(generated[i], text.text, reason, seconds)))
            return events, reason is not None

        rows = list(range(len(requests)))  # request index of each row still decoding
        guesser = None
        step = 0  # the number of the token(s) in `tokens`, the same for every row
        while True:
            keep = []
            for j, (i, token) in enumerate(zip(rows, sampler.tolist(tokens))):
                events, ended = take(i, token, step)
                yield from events
                if not ended:
                    keep.append(j)
            if not keep:
                return
            guess = None
            with torch.inference_mode():
                if len(keep) < len(rows):
                    index = torch.tensor(keep, device=self.device)
                    rows = [rows[j] for j in keep]
                    tokens = tokens[index]
                    self.forward.select(index)
                    sampler.select(index)
                i = rows[0]
                if len(rows) == 1 and step + 3 <= limits[i] and self._can_speculate():
                    if guesser is None or guesser.row != i:
                        guesser = _Guesser(i, requests[i].prompt_ids)
                    guess = guesser.guess(generated[i])
                if guess is None:
                    tokens = sampler(self.forward.step(tokens), step + 1)
                    step += 1
                    continue
                logits = self.forward.step(tokens, guess)  # (2, V): after the token, and after the guess
                tokens = sampler(logits[:1], step + 1)
                step += 1
                self.guesses += 1
                right = sampler.tolist(tokens)[0] == guess
                guesser.record(right)
                if not right:
                    continue
                self.forward.accept()
                self.right_guesses += 1
            # The guess was right: it is this step's token, and the second row's logits give the next one.
            events, ended = take(i, guess, step)
            yield from events
            if ended:
                return
            with torch.inference_mode():
                tokens = sampler(logits[1:], step + 1)
            step += 1

    def _can_speculate(self) -> bool:
        """Whether a lone sequence may check a guessed next token in the spare row of its step (see `_Guesser`): on
        the lean path, where the spare row's arithmetic is what its own step would be. Sampling too: each step
        draws with its own pre-drawn random number, so a right guess is exactly the token the step would sample."""
        return self.speculate and isinstance(self.forward, GPT2Forward) and self.forward.can_speculate


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
