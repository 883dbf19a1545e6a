"""Batched autoregressive decoding: a KV cache, left padding with attention masks, per-sequence sampling settings
and per-sequence seeded randomness, streamed text with stop strings.

Two forwards share one loop:
- `GPT2Forward`: a lean decode step over a GPT-2's own modules with a preallocated KV cache. On a small model
  per-token Python overhead dominates `model.generate` (mask building, cache classes, output dataclasses, logits
  processors); this path runs the same ops in the same order, so greedy output is token-for-token that of
  `model.generate`, at about twice the speed on a 2-core CPU (bench/bench_generate.py).
- `HFForward`: any other causal LM through its own forward and transformers' cache, with the same sampling,
  seeding, stop strings and streaming.

Reproducibility: every sequence draws its uniform random numbers up front from a generator seeded with its own seed,
and samples by inverse CDF on its own row, so what a sequence produces does not depend on which other sequences share
its batch (on CPU, where a row's arithmetic does not depend on the batch around it).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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

    def __init__(self, model: torch.nn.Module, tokenizer, *, ignore_eos: bool = False, batch_invariant: bool = True):
        self.model = model.eval()
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
        self.eos_ids = set() if ignore_eos else _eos_ids(model, tokenizer, vocab)
        self.context_length = _context_length(model.config)
        self.pad_id = next(iter(self.eos_ids), None) or tokenizer.pad_token_id or 0

    @property
    def path(self) -> str:
        """`gpt2` (the lean path) or `generic`."""
        return "gpt2" if isinstance(self.forward, GPT2Forward) else "generic"

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request]) -> Iterator[TextDelta | Finished]:
        """Decode `requests` together; yield text as it becomes final and each result as its sequence ends."""
        start = time.perf_counter()
        if not requests:
            return
        # Longest prompt first: rows with equal prompt lengths then sit together (see GPT2Forward).
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt_ids))
        requests = [requests[i] for i in order]
        lengths = [len(r.prompt_ids) for r in requests]
        max_new = max(r.params.max_new_tokens for r in requests)
        if self.context_length and max(lengths) + max_new > self.context_length:
            raise ValueError("prompt + max_new_tokens exceed the context; truncate before decoding")
        ids, mask = _left_pad([r.prompt_ids for r in requests], self.pad_id, self.device)  # (B, P)
        logits = self.forward.prefill(ids, mask, max_new)  # (B, V)
        sampler = Sampler([r.params for r in requests], [r.seed for r in requests], requests, self.vocab_size,
                          self.device)
        texts = [_TextTail(self.tokenizer, r.prompt_ids, r.params.stop) for r in requests]
        generated: list[list[int]] = [[] for _ in requests]
        rows = list(range(len(requests)))  # request index of each row still decoding
        for step in range(max_new):
            tokens = sampler(logits, step)  # (B,)
            keep = []
            for j, (i, token) in enumerate(zip(rows, tokens.tolist())):
                generated[i].append(token)
                text, reason = texts[i], None
                if token in self.eos_ids:
                    reason, delta = "eos", text.finish()
                else:
                    delta = text.push(token)
                    if text.stopped:
                        reason = "stop"
                    elif len(generated[i]) >= requests[i].params.max_new_tokens:
                        reason = "length"
                        delta += text.finish()
                if delta:
                    yield TextDelta(order[i], delta)
                if reason is None:
                    keep.append(j)
                else:
                    seconds = time.perf_counter() - start
                    yield Finished(order[i], Result(generated[i], text.text, reason, seconds))
            if not keep:
                return
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=self.device)
                rows = [rows[j] for j in keep]
                tokens = tokens[index]
                self.forward.select(index)
                sampler.select(index)
            logits = self.forward.step(tokens)


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


def _context_length(config) -> int | None:
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---------------------------------------------------------------------------------------------------------------
# Sampling


class Sampler:
    """Picks each row's next token: repetition penalty, then greedy, or temperature, top-k, top-p and an inverse-CDF
    draw with the row's own uniform random number for this step."""

    def __init__(self, params: Sequence[SamplingParams], seeds: Sequence[int], requests: Sequence[Request],
                 vocab: int, device: torch.device):
        self.greedy = torch.tensor([p.greedy for p in params], device=device)
        self.all_greedy = all(p.greedy for p in params)
        self.any_greedy = any(p.greedy for p in params)
        self.uniforms = None
        if not self.all_greedy:
            steps = max(p.max_new_tokens for p in params)
            # Drawn on the CPU from each sequence's own generator: the same numbers whatever the device or batch.
            self.uniforms = torch.stack(
                [torch.rand(steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
            ).to(device=device, dtype=torch.float32)  # (B, steps)
        self.temperature = _column([p.temperature if not p.greedy else 1.0 for p in params], device)
        self.top_p = _column([p.top_p for p in params], device)
        ks = [min(p.top_k, vocab) for p in params]
        # Top-k through torch.topk when every row has a k (cheap); a full sort only when some row needs it.
        self.kmax = max(ks) if all(ks) else vocab
        self.k_mask = None
        if any(k and k < self.kmax for k in ks):
            limit = torch.tensor([k or self.kmax for k in ks], device=device)
            self.k_mask = torch.arange(self.kmax, device=device)[None, :] >= limit[:, None]  # (B, kmax)
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
        if self.all_greedy:
            tokens = logits.argmax(-1)
        else:
            tokens = self._sample(logits, self.uniforms[:, step])
            if self.any_greedy:
                tokens = torch.where(self.greedy, logits.argmax(-1), tokens)
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        return tokens

    def _sample(self, logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if self.kmax < logits.shape[-1]:
            values, index = logits.topk(self.kmax, dim=-1)  # (B, k), sorted, largest first
        else:
            values, index = logits.sort(dim=-1, descending=True)
        if self.temperature is not None:
            values = values / self.temperature
        if self.k_mask is not None:
            values = values.masked_fill(self.k_mask, float("-inf"))
        probs = values.softmax(-1)
        if self.top_p is not None:
            # Keep the smallest head of the distribution whose mass reaches top_p (the top token always stays).
            before = probs.cumsum(-1) - probs
            probs = probs.masked_fill(before >= self.top_p, 0.0)
        cdf = probs.cumsum(-1)
        # right=True never lands on a token of probability 0: it picks the first token whose cdf exceeds u * mass.
        pick = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
        return index.gather(1, pick).squeeze(1)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (the others finished)."""
        for name in ("greedy", "uniforms", "temperature", "top_p", "k_mask", "penalty", "seen"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] > 1:
                setattr(self, name, value[rows])


def _column(values: list[float], device) -> torch.Tensor | float | None:
    """A (B, 1) tensor of per-row values, a plain float when all rows agree, None when all rows hold the neutral 1."""
    if all(v == 1.0 for v in values):
        return None
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]


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
    scaled_dot_product_attention), minus the per-call machinery. On CPU it is arranged so that a row's arithmetic
    does not depend on the rest of its batch, which makes output independent of batching, bit for bit:
    - each prompt is prefilled on its own (no padding in any sum);
    - decode-step attention runs over exactly each row's own keys (rows with the same prompt length share a call);
    - decode-step matrix products always see between 2 and 16 rows, because BLAS takes another code path (another
      order of additions) for a single row and, for some shapes, for many rows: a lone row is decoded twice over
      (the copy costs little, the weights are read once either way), and big batches go in pieces;
    - the output projection uses a transposed copy of the embedding matrix, for the same reason.
    """

    MIN_ROWS, MAX_ROWS = 2, 16

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
        self.wte = transformer.wte.weight
        self.wpe = transformer.wpe.weight
        self.ln_f = (transformer.ln_f.weight, transformer.ln_f.bias)
        self.lm_head = model.lm_head.weight  # (V, C)
        self.invariant = batch_invariant and self.wte.device.type == "cpu"
        self.lm_head_t = self.lm_head.t().contiguous() if self.invariant else None  # (C, V)
        # One tuple of weights per block, and the activation's own forward (no module-call overhead).
        self.blocks = [
            (b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias, b.attn.c_proj.weight,
             b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias, b.mlp.c_fc.weight, b.mlp.c_fc.bias,
             b.mlp.c_proj.weight, b.mlp.c_proj.bias, b.mlp.act.forward)
            for b in transformer.h
        ]

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, max_new: int) -> torch.Tensor:
        """Rows must come longest prompt first (so that rows of equal length sit together)."""
        batch, length = ids.shape
        # Keys and values of a layer in one tensor, so that a step stores both with one copy.
        shape = (batch, 2, self.n_head, length + max_new, self.head_dim)
        self.cache = [self.wte.new_empty(shape) for _ in self.blocks]  # (B, 2, H, T, D) per layer
        lengths = mask.sum(-1)
        self.starts = (length - lengths).tolist()  # column of each row's first token
        self.groups = _runs(self.starts)
        self.next_pos = lengths  # (B,): the position of each row's next token
        self.t = length  # the column the next token goes in, the same for every row
        self.twice = False  # one row decoded as two identical rows
        logits = []
        for row, start in enumerate(self.starts):
            x = F.embedding(ids[row, start:], self.wte) + self.wpe[: length - start]  # (L, C)
            logits.append(self._prefill_row(x[None], row, start))
        if batch == 1:
            self.select(torch.zeros(1, dtype=torch.long, device=ids.device))
        return torch.cat(logits)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.twice:
            tokens = tokens.repeat(2)
        batch, width = tokens.shape[0], self.width
        heads, head_dim, eps, t = self.n_head, self.head_dim, self.eps, self.t
        x = F.embedding(tokens, self.wte) + F.embedding(self.next_pos, self.wpe)  # (B, C)
        for layer, (ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b, act) in (
            enumerate(self.blocks)
        ):
            h = F.layer_norm(x, (width,), ln1_w, ln1_b, eps)
            qkv = self._mm(qkv_b, h, qkv_w).view(batch, 3, heads, head_dim)
            q = qkv[:, 0, :, None]  # (B, H, 1, D)
            cache = self.cache[layer]
            cache[:, :, :, t] = qkv[:, 1:]
            parts = [
                F.scaled_dot_product_attention(
                    q[lo:hi], cache[lo:hi, 0, :, start:t + 1], cache[lo:hi, 1, :, start:t + 1], scale=self.scale
                )
                for lo, hi, start in self.groups
            ]
            a = (parts[0] if len(parts) == 1 else torch.cat(parts)).view(batch, width)  # (B, H, 1, D) -> (B, C)
            x = self._mm(proj_b, a, proj_w) + x
            h = F.layer_norm(x, (width,), ln2_w, ln2_b, eps)
            h = act(self._mm(fc_b, h, fc_w))
            x = self._mm(out_b, h, out_w) + x
        x = F.layer_norm(x, (width,), self.ln_f[0], self.ln_f[1], eps)
        self.t += 1
        self.next_pos = self.next_pos + 1
        if self.lm_head_t is None:
            logits = F.linear(x, self.lm_head)
        else:
            logits = self._mm(None, x, self.lm_head_t)
        return (logits[:1] if self.twice else logits).float()  # (B, V)

    def select(self, rows: torch.Tensor) -> None:
        if self.twice:
            rows = rows.new_zeros(len(rows))  # the only row there is
        self.twice = self.invariant and len(rows) < self.MIN_ROWS
        if self.twice:
            rows = rows.repeat(2)
        self.cache = [c[rows] for c in self.cache]
        self.next_pos = self.next_pos[rows]
        self.starts = [self.starts[i] for i in rows.tolist()]
        self.groups = _runs(self.starts)

    def _prefill_row(self, x: torch.Tensor, row: int, start: int) -> torch.Tensor:
        """Run one prompt (1, L, C) through the blocks, filling its cache columns start..; logits (1, V)."""
        _, length, width = x.shape
        heads, head_dim, eps = self.n_head, self.head_dim, self.eps
        end = start + length
        for layer, (ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b, act) in (
            enumerate(self.blocks)
        ):
            h = F.layer_norm(x, (width,), ln1_w, ln1_b, eps)
            qkv = torch.addmm(qkv_b, h.view(-1, width), qkv_w).view(1, length, 3, heads, head_dim)
            q = qkv[:, :, 0].transpose(1, 2)  # (1, H, L, D)
            keys = self.cache[layer][row:row + 1, 0, :, start:end]
            values = self.cache[layer][row:row + 1, 1, :, start:end]
            keys.copy_(qkv[:, :, 1].transpose(1, 2))
            values.copy_(qkv[:, :, 2].transpose(1, 2))
            a = F.scaled_dot_product_attention(q, keys, values, is_causal=length > 1, scale=self.scale)
            a = a.transpose(1, 2).reshape(-1, width)  # (L, C)
            x = torch.addmm(proj_b, a, proj_w).view(1, length, width) + x
            h = F.layer_norm(x, (width,), ln2_w, ln2_b, eps)
            h = act(torch.addmm(fc_b, h.view(-1, width), fc_w))
            x = torch.addmm(out_b, h, out_w).view(1, length, width) + x
        x = F.layer_norm(x[:, -1], (width,), self.ln_f[0], self.ln_f[1], eps)  # (1, C): only the last position
        return F.linear(x, self.lm_head).float()  # (1, V)

    def _mm(self, bias: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """bias + x @ weight, (M, K) @ (K, N); on CPU in pieces of at most MAX_ROWS rows."""
        if x.shape[0] > self.MAX_ROWS and self.invariant:
            pieces = -(-x.shape[0] // self.MAX_ROWS)  # sizes differ by one at most, so none is a lone row
            return torch.cat([self._mm(bias, piece, weight) for piece in x.tensor_split(pieces)])
        return torch.addmm(bias, x, weight) if bias is not None else x @ weight


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
