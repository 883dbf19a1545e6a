"""Batched autoregressive decoding: a KV cache, left padding with attention masks, per-sequence sampling settings
and per-sequence seeded randomness, streamed text with stop strings.

Two forwards share one loop:
- `GPT2Forward`: a lean decode step over a GPT-2's own weights with a preallocated KV cache. On a small model
  per-token overhead dominates `model.generate` (mask building, cache classes, output dataclasses, logits
  processors, ~5x more small ops, each of which runs with cold caches after a matrix product has streamed megabytes
  of weights through them); this path runs the same ops in the same order (its step compiled by TorchScript), so
  greedy output is token-for-token that of `model.generate`, at about 2x the speed on a 2-core CPU
  (bench/bench_generate.py).
- `HFForward`: any other causal LM through its own forward and transformers' cache, with the same sampling,
  seeding, stop strings and streaming.

Reproducibility: every sequence draws its uniform random numbers up front from a generator seeded with its own seed,
and samples by inverse CDF on its own row, so what a sequence produces does not depend on which other sequences share
its batch (on CPU, where a row's arithmetic does not depend on the batch around it).

Speculation: a lone sequence on the lean path checks a guessed next token (`_Guesser`) in the spare row of its step
and keeps the following token where the guess was right: same output, up to twice the speed on repetitive text.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import itertools
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmctl.core.model import max_positions

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
    """From the start of the sequence's batch to its last token."""


@dataclass(frozen=True)
class TextDelta:
    """New completion text of request `index`, final (never taken back)."""

    index: int
    text: str


@dataclass(frozen=True)
class Finished:
    index: int
    result: Result


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


class _Guesser:
    """Guesses a lone sequence's next token from its own text (prompt lookup): the token that followed the latest
    earlier occurrence of its last 3 tokens, else 2, else 1. The decode step runs the guess in the row that a lone
    sequence leaves spare (see GPT2Forward) and keeps the result only where the guess was right, so output is
    exactly what plain decoding gives; repetitive text (code, lists, a model that loops) comes out up to twice as
    fast. A wrong guess costs about 5% of a step, so where guesses keep failing (sampling at a high temperature)
    it pauses, for twice as long each time, and tries again."""

    ORDERS = (3, 2, 1)
    KEEP_GOING = 0.15
    """The least running share of right guesses worth a guess: a right one saves a step, a wrong one costs ~5%."""

    def __init__(self, row: int, prompt_ids: Sequence[int]):
        self.row = row
        self.tokens: list[int] = []
        self.next: dict[tuple[int, ...], int] = {}  # the last n tokens -> the token that followed them last
        self.prompt_length = len(prompt_ids)
        self.right = 0.5  # running share of right guesses (an exponential average)
        self.pause, self.wait = 0, 8  # tokens left without guessing; the next pause's length
        self._extend(prompt_ids)

    def guess(self, generated: list[int]) -> int | None:
        self._extend(generated[len(self.tokens) - self.prompt_length:])
        if self.pause:
            self.pause -= 1
            return None
        for n in self.ORDERS:
            if len(self.tokens) >= n:
                token = self.next.get(tuple(self.tokens[-n:]))
                if token is not None:
                    return token
        return None

    def record(self, right: bool) -> None:
        """How the last guess went."""
        self.right = 0.8 * self.right + 0.2 * right
        if right:
            self.wait = 8
        elif self.right < self.KEEP_GOING:
            self.pause, self.wait = self.wait, min(2 * self.wait, 256)

    def _extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            for n in self.ORDERS:
                if len(self.tokens) >= n:
                    self.next[tuple(self.tokens[-n:])] = token
            self.tokens.append(token)


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


# ---------------------------------------------------------------------------------------------------------------
# Sampling


class Sampler:
    """Picks each row's next token: repetition penalty, then greedy, or temperature, top-k, top-p and an inverse-CDF
    draw with the row's own uniform random number for this step.

    A row sampling from at most `PYTHON_CANDIDATES` tokens (a top-k, or a small vocabulary) draws in Python, in
    double precision, from its candidates' logits (`_draw_row`); other rows draw with tensor ops (`_draw`). Which way
    is the row's own setting, so a row's token still does not depend on its batch. The Python draw is the faster
    one where it applies: the tensor draw is about 12 small ops, each starting with cold caches right after a decode
    step (at batch 1 with top-k 50 and top-p, a token's draw took 115 us that way, 80 us in Python)."""

    PYTHON_CANDIDATES = 256

    def __init__(self, requests: Sequence[Request], vocab: int, device: torch.device):
        params, seeds = [r.params for r in requests], [r.seed for r in requests]
        self.device = device
        self.greedy = torch.tensor([p.greedy for p in params], device=device)
        self.any_greedy = any(p.greedy for p in params)
        candidates = [min(p.top_k, vocab) or vocab for p in params]
        in_python = [not p.greedy and k <= self.PYTHON_CANDIDATES for p, k in zip(params, candidates)]
        tensor_rows = [not p.greedy and k > self.PYTHON_CANDIDATES for p, k in zip(params, candidates)]
        self.any_tensor_draw = any(tensor_rows)
        # Rows that draw in Python: (row, candidates, temperature, top_p, uniform numbers) each.
        self.python_rows: list[tuple[int, int, float, float, list[float]]] = []
        self.uniforms = None  # (B, steps), for the tensor draw
        if not all(p.greedy for p in params):
            steps = max(p.max_new_tokens for p in params)
            # Drawn on the CPU from each sequence's own generator: the same numbers whatever the device or batch.
            drawn = torch.stack(
                [torch.rand(steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
            )  # (B, steps)
            self.python_rows = [(row, candidates[row], params[row].temperature, params[row].top_p, drawn[row].tolist())
                                for row, use in enumerate(in_python) if use]
            if self.any_tensor_draw:
                self.uniforms = drawn.to(device=device, dtype=torch.float32)
                # float32 rounds the top 2**-25 of [0, 1) up to 1, where u * mass could reach the mass (see `_draw`).
                self.uniforms.clamp_(max=1 - 2**-24)
        self.draw = None  # compiled at the second token: the first comes sooner without waiting for TorchScript
        self.temperature = _column([p.temperature if not p.greedy else 1.0 for p in params], device)
        self.top_p = _column([p.top_p for p in params], device)
        # The tensor draw: top-k through torch.topk when every row it serves has a k (cheap); a full sort when some
        # row needs it. Rows it does not serve take any k: their token comes from elsewhere.
        ks = [k if use else 0 for k, use in zip(candidates, tensor_rows)]
        self.kmax = max(ks)
        self.k_mask = None
        if any(0 < k < self.kmax for k in ks):
            limit = torch.tensor([k or self.kmax for k in ks], device=device)
            self.k_mask = torch.arange(self.kmax, device=device)[None, :] >= limit[:, None]  # (B, kmax)
        self.python_k = max((entry[1] for entry in self.python_rows), default=0)
        self.picked: tuple[torch.Tensor | None, list[int]] = (None, [])  # the Python draw's last tokens, both ways
        self.seen = self.penalty = None
        if any(p.repetition_penalty != 1.0 for p in params):
            self.penalty = _column([p.repetition_penalty for p in params], device)
            self.seen = torch.zeros((len(params), vocab), dtype=torch.bool, device=device)  # (B, V)
            for row, request in enumerate(requests):
                self.seen[row, torch.tensor(list(request.prompt_ids), device=device)] = True

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Next token of each row, (B,), from float logits (B, V)."""
        if self.penalty is not None:
            # CTRL's penalty, as transformers applies it: divide positive logits, multiply negative ones.
            penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            logits = torch.where(self.seen, penalised, logits)
        tokens = None
        if self.any_tensor_draw:
            with torch.jit.optimized_execution(False):  # run the ops as written: no profiling runs, no fusion
                if self.draw is None and step > 0:
                    self.draw = _scripted(_draw)
                draw = self.draw or _draw  # the same ops, the same bits
                tokens = draw(logits, self.uniforms[:, step], self.kmax, self.temperature, self.k_mask, self.top_p)
        if self.any_greedy:
            best = logits.argmax(-1)
            tokens = best if tokens is None else torch.where(self.greedy, best, tokens)
        if self.python_rows:
            values, index = logits.topk(self.python_k, dim=-1)  # (B, k), sorted, largest first
            values, index = values.tolist(), index.tolist()
            picked = tokens.tolist() if tokens is not None else [0] * len(values)
            for row, k, temperature, top_p, uniforms in self.python_rows:
                picked[row] = index[row][_draw_row(values[row][:k], uniforms[step], temperature, top_p)]
            tokens = _token_tensor(picked[0], self.device) if len(picked) == 1 else torch.tensor(picked,
                                                                                                 device=self.device)
            self.picked = (tokens, picked)
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        return tokens

    def tolist(self, tokens: torch.Tensor) -> list[int]:
        """`tokens.tolist()`, from the Python draw's own list where `tokens` came from it: a tensor op right after
        a decode step costs tens of microseconds (cold caches)."""
        made, picked = self.picked
        return picked if tokens is made else tokens.tolist()

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (the others finished)."""
        for name in ("greedy", "uniforms", "temperature", "top_p", "k_mask", "penalty", "seen"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] > 1:
                setattr(self, name, value[rows])
        new_row = {old: new for new, old in enumerate(rows.tolist())}
        self.python_rows = [(new_row[e[0]], *e[1:]) for e in self.python_rows if e[0] in new_row]


def _draw_row(values: list[float], u: float, temperature: float, top_p: float) -> int:
    """The position picked among one row's candidates, by inverse CDF with its uniform number u in [0, 1): the
    candidates' logits `values`, largest first, scaled by temperature, then the smallest head whose probability
    reaches top_p (the top one always stays)."""
    top = values[0]
    weights = [math.exp((v - top) / temperature) for v in values]  # unnormalised probabilities
    cdf = list(itertools.accumulate(weights))
    kept = len(cdf)
    if top_p < 1.0:  # the head ends at the first cdf that reaches top_p of the whole (0 < top_p)
        kept = min(bisect.bisect_left(cdf, top_p * sum(weights)) + 1, kept)
    # The first candidate whose cdf exceeds u * mass: never one of probability 0 (u < 1, so u * mass < mass).
    return min(bisect.bisect_right(cdf, u * cdf[kept - 1], 0, kept), kept - 1)


def _token_tensor(token: int, device) -> torch.Tensor:
    """A (1,) tensor of `token`, made once per token and device: making one costs about 20 us right after a
    decode step (cold caches), a dictionary lookup well under one. Nothing writes into these tensors."""
    key = (token, device)
    tensor = _TOKEN_TENSORS.get(key)
    if tensor is None:
        if len(_TOKEN_TENSORS) >= 1 << 16:
            _TOKEN_TENSORS.clear()
        tensor = _TOKEN_TENSORS[key] = torch.tensor([token], device=device)
    return tensor


_TOKEN_TENSORS: dict[tuple[int, object], torch.Tensor] = {}


def _column(values: list[float], device) -> torch.Tensor | None:
    """A (B, 1) tensor of per-row values, None when all rows hold the neutral 1."""
    if all(v == 1.0 for v in values):
        return None
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]


def _draw(logits: torch.Tensor, u: torch.Tensor, kmax: int, temperature: torch.Tensor | None,
          k_mask: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Each row's token from logits (B, V) by inverse CDF with its uniform number u (B,): temperature (B, 1), top-k
    (kmax, and k_mask (B, kmax) for rows with a smaller k), top-p (B, 1). Row by row arithmetic only: a row's token
    does not depend on the other rows."""
    if kmax < logits.size(-1):
        values, index = logits.topk(kmax, dim=-1)  # (B, k), sorted, largest first
    else:
        values, index = logits.sort(dim=-1, descending=True)
    if temperature is not None:
        values = values / temperature
    if k_mask is not None:
        values = values.masked_fill(k_mask, float("-inf"))
    probs = values.softmax(-1)
    cdf = probs.cumsum(-1)
    if top_p is not None:
        # Keep the smallest head of the distribution whose mass reaches top_p (the top token always stays).
        probs = probs.masked_fill(cdf - probs >= top_p, 0.0)
        cdf = probs.cumsum(-1)
    # right=True never lands on a token of probability 0: it picks the first token whose cdf exceeds u * mass
    # (u < 1, so u * mass < mass).
    pick = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).clamp_(max=cdf.size(-1) - 1)
    return index.gather(1, pick).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------
# Text: incremental detokenization and stop strings


class _TextTail:
    """A sequence's completion text, grown token by token. Text is released once it is final: complete characters
    only, and never the last len(longest stop) - 1 characters, which could still turn out to start a stop string."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.released = 0
        self.stopped = False
        context = list(prompt_ids[-8:])  # a few prompt tokens, so that the first piece decodes as it would in context
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            stream = DecodeStream(ids=context, skip_special_tokens=True)
            self._decode = lambda token: stream.step(backend, token)
        else:
            self._decode = _SlowStream(tokenizer, context).step

    def push(self, token: int) -> str:
        """Add one generated token; return the text that became final."""
        piece = self._decode(token)
        if piece:
            start = max(0, len(self.text) - self.hold)  # a stop string ending in `piece` starts no earlier
            self.text += piece
            if self.stop:
                found = [at for at in (self.text.find(s, start) for s in self.stop) if at >= 0]
                if found:
                    self.text = self.text[: min(found)]
                    self.stopped = True
                    return self.finish()
        return self._release(len(self.text) - self.hold)

    def finish(self) -> str:
        """The sequence ended: release everything left."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self.released:
            return ""
        out, self.released = self.text[self.released:end], end
        return out


class _SlowStream:
    """Incremental decoding for tokenizers without a Rust backend: decode a short window and hand out what it adds,
    holding back while the window ends in an incomplete character."""

    def __init__(self, tokenizer, context: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(context)
        self.prefix = 0
        self.read = len(self.ids)

    def step(self, token: int) -> str | None:
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return None


# ---------------------------------------------------------------------------------------------------------------
# Forwards: prefill a left-padded batch, then one token per row per step


class GPT2Forward:
    """GPT-2 (`GPT2LMHeadModel`) decoding over the model's own weights with a preallocated KV cache.

    The same operations as transformers' GPT-2 with sdpa attention (addmm for its Conv1D layers, layer norms,
    scaled_dot_product_attention), minus the per-call machinery: no module calls, no per-step cache objects, the
    c_attn product written straight into the cache (out=), activations and residual additions in place, the two
    projections onto the residual stream adding their own bias (`_augmented`), the step in TorchScript. Logits may
    differ from transformers' in the last bits (the order of additions), so greedy output is token for token that
    of `model.generate` except where two logits tie within rounding (tested, and checked by the benchmark). On CPU
    it is arranged so that a row's arithmetic does not depend on the rest of its batch, which makes output
    independent of batching, bit for bit:
    - each prompt is prefilled on its own (no padding in any sum);
    - decode-step attention runs over exactly each row's own keys (rows with the same prompt length share a call);
    - decode-step matrix products always see at least 2 rows, because BLAS takes another code path (another order
      of additions) for a single row. A lone row goes through the matrix products with a copy of itself as second
      row (attention and sampling see it once);
    - which weight layout, and how many rows at most, keep every row's bits is measured on this machine, once per
      weight shape (see `_row_stable_layout`); big batches go through the products in pieces of that many rows.
      A layout is picked for speed where both keep the bits: with MKL on an AVX-512 Xeon, the transposed layout
      makes a 2-row product of the 384 x 1536 MLP weight about 15% faster than GPT-2's own, and is kept for any
      2-15 rows. (For some shapes, such as 384 x 1152 on 2 threads, the transposed layout keeps a row's bits for
      only 2-3 rows: batches would then go in pieces of 3, so it is not used there, though faster at batch 1.)
    """

    MIN_ROWS = 2
    AUGMENTED = (4, 10)
    """A block's attention and MLP output projections: multiplied with their bias as an extra row (`_augmented`)."""
    HEAD_CHUNK = 8192
    """The output projection's product goes in pieces of this many vocabulary columns, whose row-stability is
    measured (see `_plan_layouts`)."""

    @staticmethod
    def supports(model) -> bool:
        config = model.config
        return (
            type(model).__name__ == "GPT2LMHeadModel"
            and getattr(config, "model_type", None) == "gpt2"
            and not getattr(config, "add_cross_attention", False)
            and not getattr(config, "scale_attn_by_inverse_layer_idx", False)
            and not getattr(config, "reorder_and_upcast_attn", False)
            and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
            and all(_activation_name(block.mlp.act) for block in model.transformer.h)
            and not model.training
        )

    def __init__(self, model, *, batch_invariant: bool = True):
        transformer = model.transformer
        config = model.config
        self.n_head = config.n_head
        self.width = config.n_embd
        self.head_dim = self.width // self.n_head
        self.eps = config.layer_norm_epsilon
        self.scale = transformer.h[0].attn.scaling
        self.activation = _activation_name(transformer.h[0].mlp.act)
        # The weights, detached, in aligned memory where they are not (see `_aligned`).
        self.wte = _aligned(transformer.wte.weight)
        self.wpe = _aligned(transformer.wpe.weight)
        self.ln_f = (_aligned(transformer.ln_f.weight), _aligned(transformer.ln_f.bias))
        tied = model.lm_head.weight.data_ptr() == transformer.wte.weight.data_ptr()
        self.lm_head = self.wte if tied else _aligned(model.lm_head.weight)  # (V, C)
        self.invariant = batch_invariant and self.wte.device.type == "cpu"
        blocks = [
            [b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias, b.attn.c_proj.weight,
             b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias, b.mlp.c_fc.weight, b.mlp.c_fc.bias,
             b.mlp.c_proj.weight, b.mlp.c_proj.bias]
            for b in transformer.h
        ]
        head = self.lm_head.t()  # (C, V), a view
        transposed: dict[int, bool] = {}  # block matrix index -> store transposed (absent: keep the layout)
        self.max_rows = 0  # 0: any number of rows in one product
        self.head_chunk = self.HEAD_CHUNK if self.invariant else head.shape[1]  # columns per output product
        if self.invariant:
            transposed, head, self.max_rows = self._plan_layouts(blocks[0], head)
        # What `_decode_step` reads: the embeddings, the final layer norm and the output projection (C, V); then per
        # block its 12 weights, in the order of `blocks` above, matrices (K, N) in either memory layout. The two
        # projections onto the residual stream come with their bias as an extra row, (K + 1, N) (see `_augmented`):
        # their inputs end in a column of ones, and the product adds the bias.
        self.weights = [self.wte, self.wpe, *self.ln_f, head]
        self.blocks = [
            [_augmented(w, _aligned(block[i + 1]), transposed.get(i, False)) if i in self.AUGMENTED
             else _aligned(w, transposed.get(i)) for i, w in enumerate(block)]
            for block in blocks
        ]
        self.n_layer = len(transformer.h)
        self.inner = self.blocks[0][8].size(1)  # the MLP's width: c_fc is (C, inner)
        # The c_attn and c_fc biases of all blocks, (L, 1, N): a step writes them into its products' outputs in two
        # ops, where addmm would copy each in after its product, with cold caches (see `_decode_step`).
        self.biases = [torch.stack([block[i] for block in self.blocks])[:, None] for i in (3, 9)]
        self.decode_step = None  # compiled at the first step, after the first token

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, max_new: int) -> torch.Tensor:
        """Rows must come longest prompt first (so that rows of equal length sit together)."""
        batch, length = ids.shape
        self.starts = [length - n for n in mask.sum(-1).tolist()]  # column of each row's first token
        # Per layer, the c_attn output of every token: (R, T, 3C), time-major, so that the query, key and value of
        # one step are one row that addmm writes in place (out=), and a row's keys are a strided view. R >= B: the
        # physical rows of the matrix products (see `_decode_step`).
        self.rows = self._rows(batch)
        self.kv = self.wte.new_empty((self.n_layer, self.rows, length + max_new, 3 * self.width))  # (L, R, T, 3C)
        self.t = length  # the column the next token goes in, the same for every row
        logits = [self._prefill_row(ids[row, start:], row, start) for row, start in enumerate(self.starts)]
        self._arrange()
        return torch.cat(logits)

    def step(self, tokens: torch.Tensor, guess: int | None = None) -> torch.Tensor:
        """Logits (B, V) after feeding each row its next token, (B,). With a `guess` (a lone row, where
        `can_speculate`): logits (2, V) after the token and after the guessed token that follows it, which counts
        only once `accept` is called."""
        if self.decode_step is None:
            self.decode_step = _scripted(_decode_step)
        if self.lists is None:
            self.lists = self._pack(self.weights, self.layers, self.views, self.scratch, self.groups)
        weights, layers, views, scratch, groups = self.lists
        with torch.jit.optimized_execution(False):  # run the ops as written: no fusion, no specialisation
            logits = self.decode_step(tokens, self.start_columns, weights, layers, views, scratch, self.t, groups,
                                      self.rows, self.eps, self.scale, self.activation, self.max_rows,
                                      self.head_chunk, -1 if guess is None else guess)
        self.t += 1
        return logits

    def _pack(self, *lists: list) -> tuple:
        """The step's list arguments as TorchScript lists where the step is scripted: a call then hands each over
        as one value rather than converting its items, about a hundred tensors (30 us a step, with the cold caches
        after the last step's matrix products)."""
        if not isinstance(self.decode_step, torch.jit.ScriptFunction):
            return lists
        return tuple(torch.jit.script(list(values)) for values in lists)

    @property
    def can_speculate(self) -> bool:
        """One row decoding, with a spare physical row whose arithmetic is what the row's own next step would be."""
        return self.invariant and len(self.starts) == 1 and self.rows == 2

    def accept(self) -> None:
        """The guess of the last step was right: its key and value stay in the cache."""
        self.t += 1

    def select(self, rows: torch.Tensor) -> None:
        self.starts = [self.starts[i] for i in rows.tolist()]
        self.rows = self._rows(len(rows))
        if self.rows > len(rows):
            rows = rows.expand(self.rows)
        self.kv = self.kv[:, rows]
        self._arrange()

    def _plan_layouts(self, block: list[torch.nn.Parameter], head: torch.Tensor
                      ) -> tuple[dict[int, bool], torch.Tensor, int]:
        """Each matrix's memory layout for row-stable products (see `_row_stable_layout`): which of a block's
        matrices to store transposed (re-laid out in place by `_aligned`: one copy), the output projection (C, V)
        (a copy only where the embedding's own layout is not row-stable) and the most rows one product may take.
        Turns batch invariance off, with a warning, where no layout keeps a row's bits."""
        transposed, limits = {}, []
        for index in (2, 4, 8, 10):  # c_attn, attn c_proj, c_fc, mlp c_proj: the same shapes in every block
            (k, n), dtype = block[index].shape, block[index].dtype
            k += index in self.AUGMENTED
            transposed[index], rows = _row_stable_layout(k, [n], dtype)
            limits.append(rows)
        # The (V, C) embedding seen as (C, V) is already the transposed layout; the other one costs a copy. The
        # product goes in column pieces (see `_decode_step`), which are what gets measured: a vocabulary-wide
        # measurement would take most of a second for GPT-2's 50k tokens.
        (width, vocab), chunk = head.shape, self.head_chunk
        widths = [min(vocab, chunk)] + ([vocab % chunk] if vocab > chunk and vocab % chunk else [])
        head_transposed, rows = _row_stable_layout(width, widths, head.dtype)
        limits.append(rows)
        if not head_transposed:
            head = head.contiguous()
        if min(limits) < 3:
            log.warning("this machine's BLAS rounds a row differently depending on the rows around it: output may "
                        "depend on how prompts are batched (generate.batch_invariant: false silences this)")
            self.invariant = False
            self.head_chunk = vocab
            return {}, self.lm_head.t(), 0
        return transposed, head, min(limits)

    def _rows(self, batch: int) -> int:
        return max(batch, self.MIN_ROWS) if self.invariant else batch

    def _arrange(self) -> None:
        self.groups = [list(run) for run in _runs(self.starts)]
        self.start_columns = torch.tensor(self.starts, device=self.kv.device)  # (B,): a row's position is t - start
        self.lists = None  # the step's list arguments, packed at the next step (see `_pack`)
        # Per layer and group, the queries, keys and values of the group's rows as (b, H, T, D) views of the cache:
        # a step narrows them to its columns (one op each, not five).
        self.views = []
        for cache in self.kv.unbind(0):
            parts = cache.view(cache.size(0), cache.size(1), 3, self.n_head, self.head_dim).unbind(2)  # (R, T, H, D)
            self.views += [part.transpose(1, 2)[lo:end] for lo, end, _ in self.groups for part in parts]
        # A step's embeddings, MLP hidden layers and attention output, preallocated, and the views of them a step
        # uses made here once: an allocation or a view is a few microseconds of cold code after a matrix product.
        # (Layer norms allocate: their out= variant copies, and measured slower.) The inputs of the augmented
        # products end in a column of ones (see `_augmented`).
        rows, width, inner, new = self.rows, self.width, self.inner, self.wte.new_empty
        hidden, attended = self._with_ones(self.n_layer, rows, inner), self._with_ones(rows, width)
        heads = attended[:, :width].view(rows, self.n_head, 1, self.head_dim)  # as attention returns it
        self.scratch = [hidden[..., :inner], new(rows, width), new(rows, width), attended, heads, *self.biases,
                        self.kv]
        # Per block: ln_1, c_attn, attn c_proj (augmented), ln_2, c_fc, mlp c_proj (augmented); its hidden layer
        # with and without the ones.
        self.layers = [[w[0], w[1], w[2], w[4], w[6], w[7], w[8], w[10], h, h[:, :inner]]
                       for w, h in zip(self.blocks, hidden.unbind(0))]

    def _with_ones(self, *shape: int) -> torch.Tensor:
        """An input buffer for an augmented product (see `_augmented`): `shape` with one more last column, of ones."""
        buffer = self.wte.new_empty((*shape[:-1], shape[-1] + 1))
        buffer[..., -1] = 1
        return buffer

    def _prefill_row(self, ids: torch.Tensor, row: int, start: int) -> torch.Tensor:
        """Run one prompt (L,) through the blocks, filling its cache columns start..; logits (1, V). The same
        arrangement as a decode step: the projections onto x augmented and in place, the activation on a strided
        view (see `_decode_step`)."""
        (length,), width, inner, heads, eps = ids.shape, self.width, self.inner, self.n_head, self.eps
        x = F.embedding(ids, self.wte) + self.wpe[:length]  # (L, C)
        attended, hidden = self._with_ones(length, width), self._with_ones(length, inner)
        for block, cache in zip(self.blocks, self.kv.unbind(0)):
            ln1_w, ln1_b, qkv_w, qkv_b, proj_w, _, ln2_w, ln2_b, fc_w, fc_b, out_w, _ = block
            qkv = cache[row, start:start + length]  # (L, 3C)
            torch.addmm(qkv_b, torch.layer_norm(x, (width,), ln1_w, ln1_b, eps), qkv_w, out=qkv)
            q, k, v = qkv.view(1, length, 3, heads, self.head_dim).transpose(1, 3).unbind(2)  # 3 x (1, H, L, D)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, scale=self.scale)
            attended[:, :width].view(1, length, heads, self.head_dim).copy_(a.transpose(1, 2))
            torch.addmm(x, attended, proj_w, out=x)
            h = hidden[:, :inner]
            torch.addmm(fc_b, torch.layer_norm(x, (width,), ln2_w, ln2_b, eps), fc_w, out=h)
            _activate(h, self.activation)
            torch.addmm(x, hidden, out_w, out=x)
        x = torch.layer_norm(x[-1:], (width,), self.ln_f[0], self.ln_f[1], eps)  # (1, C): only the last position
        return F.linear(x, self.lm_head).float()  # (1, V)


# The decode step, in TorchScript's subset of Python: run by its interpreter, its ~100 small ops cost about 10% less
# than from Python (measured at batch 1), and they are the same ops, so the same bits. Where TorchScript is missing
# (it is deprecated), the same functions run as plain Python.


def _decode_step(tokens: torch.Tensor, starts: torch.Tensor, weights: list[torch.Tensor],
                 layers: list[list[torch.Tensor]], views: list[torch.Tensor], scratch: list[torch.Tensor], t: int,
                 groups: list[list[int]], rows: int, eps: float, scale: float, activation: str, max_rows: int,
                 head_chunk: int, guess: int) -> torch.Tensor:
    """Logits (B, V) of B rows after their next tokens (B,) at column t of the cache, each row at position t minus
    its start column (`starts`, (B,)). Matrix products see R >= B rows (a lone row doubled); each block writes the
    new tokens' query, key and value into its cache at column t. `weights`: the embeddings, the final layer norm
    and the output projection (C, V); `layers`: per block its weights and hidden-layer views (see
    GPT2Forward._arrange). `groups`: [first row, end row, first column] of the rows that share attention calls;
    `views`: their query, key and value parts of the cache as (b, H, T, D), three per group and layer. `scratch`:
    the MLP hidden layers without their column of ones (L, R, inner); x and position embeddings (R, C); attention
    output (R, C + 1) with a last column of ones, and the rest of it as (R, H, 1, D); the c_attn and c_fc biases
    (L, 1, N); the caches as one tensor (L, R, T, 3C). The output projection goes in pieces of `head_chunk`
    vocabulary columns.
    With guess >= 0 (one row, R = 2): the spare row takes `guess` as the token after the row's next one, at column
    t + 1 and the next position, and both rows' logits come back, (2, V). Each row's arithmetic is then what its own
    step would be: the same matrix-product rows, the same attention calls over the same keys."""
    hidden, x, embedded, attended, heads, qkv_bias, fc_bias, kv = scratch
    speculate = guess >= 0
    if speculate:
        tokens = torch.cat([tokens, tokens.new_full([1], guess)])
    batch = tokens.size(0)
    torch.index_select(weights[0], 0, tokens.expand(rows) if rows > batch else tokens, out=x)  # (R, C)
    if len(groups) == 1:  # one position for all rows (two in a row for a guess): a view of the table
        x += weights[1].narrow(0, t - groups[0][2], batch if speculate else 1)
    else:
        x += torch.index_select(weights[1], 0, t - starts, out=embedded)
    width = x.size(1)
    # [group, first column, query column] of each attention call
    calls = [[0, groups[0][2], t], [0, groups[0][2], t + 1]] if speculate else [[g, groups[g][2], t]
                                                                               for g in range(len(groups))]
    slots = kv[:, 0, t:t + 2] if speculate else kv.select(2, t)  # (L, R, 3C): where c_attn writes this step
    # The biases of every block's c_attn and c_fc products, in place in their outputs up front: the products then
    # add onto them (addmm with beta 1, as addmm does after copying a bias in), and no copy runs after a product.
    slots.copy_(qkv_bias)
    hidden.copy_(fc_bias)
    for layer in range(len(layers)):
        w = layers[layer]
        qkv = slots[layer]  # (R, 3C)
        _linear(qkv, torch.layer_norm(x, [width], w[0], w[1], eps), w[2], max_rows, qkv)
        parts: list[torch.Tensor] = []
        for call in calls:
            at, length = 3 * (layer * len(groups) + call[0]), call[2] + 1 - call[1]
            q = views[at].narrow(2, call[2], 1)  # (b, H, 1, D)
            k = views[at + 1].narrow(2, call[1], length)  # (b, H, L, D)
            v = views[at + 2].narrow(2, call[1], length)
            parts.append(F.scaled_dot_product_attention(q, k, v, scale=scale))
        heads.copy_(parts[0] if len(parts) == 1 else torch.cat(parts))  # (B, H, 1, D); a lone row into both rows
        # Residual additions: the products land on x directly (addmm onto itself) and add their bias themselves
        # (augmented: the input's column of ones times the bias row), so that no op runs between a matrix product
        # and the next layer norm, where ops run with cold caches.
        _linear(x, attended, w[3], max_rows, x)
        h = w[9]  # (R, inner)
        _linear(h, torch.layer_norm(x, [width], w[4], w[5], eps), w[6], max_rows, h)
        # In place on a strided view (rows of inner + 1): ATen's elementwise kernels then take their 2-D path for
        # every R >= 2, the same bits for a row whatever its batch (a contiguous tensor takes a 1-D path with other
        # bits), and for the GELU that path measured twice as fast.
        _activate(h, activation)
        _linear(x, w[8], w[7], max_rows, x)
    x = torch.layer_norm(x, [width], weights[2], weights[3], eps)
    head = weights[4]  # (C, V)
    if head_chunk >= head.size(1):
        logits = _linear(None, x, head, max_rows, None)  # (R, V)
    else:
        logits = torch.cat([_linear(None, x, head[:, j:j + head_chunk], max_rows, None)
                            for j in range(0, head.size(1), head_chunk)], 1)
    return logits[:batch].float()


def _linear(bias: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, max_rows: int,
            out: torch.Tensor | None) -> torch.Tensor:
    """bias + x @ weight, (M, K) @ (K, N), into `out` if given; in pieces of at most max_rows rows (0: no limit),
    none of them a single row when M > max_rows. `bias` is (N,) or, to accumulate onto it, (M, N)."""
    if max_rows == 0 or x.size(0) <= max_rows:
        return _addmm(bias, x, weight, out)
    pieces = (x.size(0) + max_rows - 1) // max_rows  # sizes differ by one at most
    results: list[torch.Tensor] = []
    start = 0
    for piece in x.tensor_split(pieces):
        end = start + piece.size(0)
        piece_bias, piece_out = bias, out
        if out is not None:
            piece_out = out[start:end]
        if bias is not None and bias.dim() == 2:
            # onto the output itself: the same piece, so that addmm sees one tensor and copies nothing
            piece_bias = piece_out if bias is out else bias[start:end]
        results.append(_addmm(piece_bias, piece, weight, piece_out))
        start = end
    return torch.cat(results) if out is None else out


def _addmm(bias: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return torch.mm(x, weight) if out is None else torch.mm(x, weight, out=out)
    return torch.addmm(bias, x, weight) if out is None else torch.addmm(bias, x, weight, out=out)


def _activate(h: torch.Tensor, name: str) -> torch.Tensor:
    """GPT-2's MLP activation of h, in place: the same ops as transformers' (see `_activation_name`)."""
    if name == "gelu_new":  # NewGELUActivation, op for op: (0.5 * h) * (1 + tanh(...))
        gate = 1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0)))
        return h.mul_(0.5).mul_(gate)
    return torch.ops.aten.gelu_(h, approximate=name)  # the same kernel as F.gelu, the same bits


def _activation_name(act) -> str | None:
    """`none` (exact GELU), `tanh` (torch's tanh GELU) or `gelu_new` (transformers' formula) for the activation
    modules `_activate` reproduces exactly; None for any other."""
    from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation

    inner = getattr(act, "act", None)
    if type(act) is GELUActivation and inner is F.gelu:
        return "none"
    if (type(act) is GELUTanh and isinstance(inner, functools.partial) and inner.func is F.gelu
            and not inner.args and inner.keywords == {"approximate": "tanh"}):
        return "tanh"
    if type(act) is NewGELUActivation:
        return "gelu_new"
    return None


@functools.cache
def _scripted(fn):
    """`fn` compiled by TorchScript (`_decode_step`: about 15 ms, once), or `fn` itself where that fails. The
    functions it calls are inlined: TorchScript otherwise calls them through a new interpreter frame each time, which
    made a batch-1 decode step about 6% slower (24 `_linear` calls a step)."""
    import warnings

    inline = getattr(torch._C, "_jit_get_inline_everything_mode", None)
    was = inline() if inline else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript announces its deprecation
            if inline:
                torch._C._jit_set_inline_everything_mode(True)
            return torch.jit.script(fn)
    except Exception as exc:  # a torch without (working) TorchScript: the same ops from Python
        log.debug("TorchScript unavailable for %s (%s): running it as Python", fn.__name__, exc)
        return fn
    finally:
        if inline:
            torch._C._jit_set_inline_everything_mode(was)


def _noise(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """`numel` standard normal numbers of `dtype`, the same every time: the start of one draw kept for the process."""
    global _NOISE
    if _NOISE.numel() < numel or _NOISE.dtype != dtype:
        _NOISE = torch.randn(max(numel, _NOISE.numel()), generator=torch.Generator().manual_seed(0), dtype=dtype)
    return _NOISE[:numel]


_NOISE = torch.empty(0)


def _aligned(weight: torch.nn.Parameter, transposed: bool | None = None) -> torch.Tensor:
    """`weight`, detached, moved once into 64-byte-aligned memory where it is not; a matrix also into the transposed
    memory layout (the same (K, N) matrix, stored as (N, K)) for `transposed` True, the row-major one for False, and
    either for None. transformers maps safetensors weights straight from the file at 8-byte alignment: vector loads
    then straddle cache lines, which makes a decode step about 10% slower (measured on the benchmark's model). The
    parameter itself is changed (same values, same Parameter, so tied weights stay tied and the model still works),
    so the model holds one copy, not two."""
    tensor = weight.detach()
    if tensor.device.type != "cpu":
        return tensor
    is_transposed = tensor.dim() == 2 and tensor.stride() == (1, tensor.size(0)) and not tensor.is_contiguous()
    if transposed is None:
        transposed = is_transposed
    if transposed != is_transposed or tensor.data_ptr() % 64 or not (tensor.is_contiguous() or is_transposed):
        with torch.no_grad():
            weight.data = tensor.t().contiguous().t() if transposed else tensor.clone(
                memory_format=torch.contiguous_format)
    return weight.detach()


def _augmented(weight: torch.nn.Parameter, bias: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The (K + 1, N) matrix of `weight` (K, N) with `bias` (N,) as its last row, in the given memory layout: times
    an input whose last column is ones, the product adds the bias itself. That saves a separate bias addition
    after the product before it, which with cold caches cost about as much as a layer norm (about 30 us at batch 1
    on the benchmark's model). The bias goes in as the last term of each sum, so a row's result can differ from
    transformers' addmm(bias, ...) by rounding, as with any other order of additions (the products themselves
    already differ: see GPT2Forward). The parameter becomes a view of the first K rows (one copy in memory); a
    later decoder finds it so."""
    tensor = weight.detach()
    (k, n), dtype, device = tensor.shape, tensor.dtype, tensor.device
    strides = (1, k + 1) if transposed else (n, 1)
    storage = tensor.untyped_storage()
    if (tensor.storage_offset() == 0 and tensor.stride() == strides
            and storage.nbytes() == (k + 1) * n * tensor.element_size()):
        full = tensor.new_empty(0).set_(storage, 0, (k + 1, n), strides)
        if torch.equal(full[k], bias):
            return full
    full = torch.empty_strided((k + 1, n), strides, dtype=dtype, device=device)
    with torch.no_grad():
        full[:k] = tensor
        full[k] = bias
        weight.data = full[:k]
    return full


def _row_stable_layout(rows_in: int, widths: Sequence[int], dtype: torch.dtype) -> tuple[bool, int]:
    """How to multiply by a (K, N) matrix, K = rows_in, in products as wide as each of `widths`, so that a row's
    result does not depend on the rows around it: whether to store it transposed ((N, K) in memory), and the most
    rows one product may take (1 where even 3 rows change a row's bits). The transposed layout wins where it keeps a
    row's bits for up to 8 rows or more (faster for few rows, see GPT2Forward); measured once per shape, type and
    thread count."""
    threads = torch.get_num_threads()
    transposed_rows = min(_stable_rows(rows_in, n, dtype, True, threads) for n in widths)
    if transposed_rows >= 8:
        return True, transposed_rows
    rows = min(_stable_rows(rows_in, n, dtype, False, threads) for n in widths)
    return (False, rows) if rows >= transposed_rows else (True, transposed_rows)


@functools.cache
def _stable_rows(k: int, n: int, dtype: torch.dtype, transposed: bool, threads: int, limit: int = 16) -> int:
    """The most rows m <= limit such that bias + x @ w, w (K, N) in the given memory layout, gives each row of x
    (1 < rows <= m) the bits it gets in a product of two rows. Each row count is tried from the first row, and the
    smallest ones and the largest also from the second (a piece can start anywhere; trying every count from both
    would double the time before a first token for no case seen)."""
    noise = _noise(k * n + n + (limit + 1) * k, dtype)  # (one draw: random numbers cost more than the products)
    w = noise[:k * n].view((n, k) if transposed else (k, n))
    w = w.t() if transposed else w
    bias = noise[k * n:k * n + n]
    x = noise[k * n + n:].view(limit + 1, k)
    pairs = torch.cat([torch.addmm(bias, x[i:i + 2], w) for i in range(0, limit, 2)])  # (limit, N)
    pairs = torch.cat([pairs, torch.addmm(bias, x[limit - 1:], w)[1:]])  # the last row, paired too
    for m in range(2, limit + 1):
        for start in (0, 1) if m <= 4 or m == limit else (0,):
            if not torch.equal(torch.addmm(bias, x[start:start + m], w), pairs[start:start + m]):
                return m - 1
    return limit


def _runs(starts: list[int]) -> list[tuple[int, int, int]]:
    """(first row, end row, start) for each run of consecutive rows with the same start column."""
    runs, lo = [], 0
    for i in range(1, len(starts) + 1):
        if i == len(starts) or starts[i] != starts[lo]:
            runs.append((lo, i, starts[lo]))
            lo = i
    return runs


class HFForward:
    """Any causal LM: its own forward with transformers' cache. Rows that finish are dropped from the cache when
    the cache supports it, and otherwise carried along (fed padding) and ignored."""

    def __init__(self, model):
        self.model = model
        parameters = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self.pass_positions = "position_ids" in parameters
        self.logits_to_keep = "logits_to_keep" in parameters

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, max_new: int) -> torch.Tensor:
        self.cache = None
        self.attention_mask = mask.long()  # (B, P)
        positions = self.attention_mask.cumsum(-1) - 1
        positions.masked_fill_(self.attention_mask == 0, 1)  # as transformers' generate does
        self.rows = torch.arange(ids.shape[0], device=ids.device)  # physical rows still decoding
        self.next_pos = positions[:, -1] + 1
        return self._call(ids, positions)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        batch = self.attention_mask.shape[0]
        if len(self.rows) < batch:  # finished rows the cache could not drop: feed them anything
            full = torch.zeros(batch, dtype=tokens.dtype, device=tokens.device)
            full[self.rows] = tokens
            tokens = full
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(batch, 1)], dim=1)
        positions = self.next_pos[:, None]
        self.next_pos = self.next_pos + 1
        return self._call(tokens[:, None], positions)

    def select(self, rows: torch.Tensor) -> None:
        if hasattr(self.cache, "batch_select_indices") and len(self.rows) == self.attention_mask.shape[0]:
            self.cache.batch_select_indices(rows)
            self.attention_mask = self.attention_mask[rows]
            self.next_pos = self.next_pos[rows]
            self.rows = torch.arange(len(rows), device=rows.device)
        else:
            self.rows = self.rows[rows]

    def _call(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": ids, "attention_mask": self.attention_mask, "use_cache": True,
                  self.cache_arg: self.cache}
        if self.pass_positions:
            kwargs["position_ids"] = positions
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else getattr(out, "past_key_values", None)
        logits = out.logits[:, -1].float()  # (B, V)
        return logits[self.rows] if len(self.rows) < logits.shape[0] else logits
