"""Sampling: per-sequence temperature, top-k, top-p and repetition penalty, drawn by inverse CDF from random
numbers each sequence draws up front with its own seed, so that what a sequence produces does not depend on
which others share its batch (`Sampler`)."""

from __future__ import annotations

import bisect
import itertools
import logging
import math
from collections.abc import Sequence

import torch

from llmctl.core.decode.requests import Request
from llmctl.core.decode.script import _scripted

log = logging.getLogger(__name__)


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

    def __init__(self, requests: Sequence[Request], vocab: int, device: torch.device,
                 generated: Sequence[Sequence[int]] | None = None):
        """`generated`: the tokens each request has made so far, where rows join a running batch (continuous
        batching): a row's next draw is then its number len(generated) of its own stream, and its repetition
        penalty counts them; step numbers passed to the sampler count from its making."""
        params, seeds = [r.params for r in requests], [r.seed for r in requests]
        done = [len(g) for g in generated] if generated is not None else [0] * len(requests)
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
            steps = max(p.max_new_tokens - d for p, d in zip(params, done))
            # Drawn on the CPU from each sequence's own generator: the same numbers whatever the device or batch.
            drawn = torch.stack(
                [torch.rand(d + steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64)[d:]
                 for s, d in zip(seeds, done)]
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
                seen = [*request.prompt_ids, *(generated[row] if generated is not None else ())]
                self.seen[row, torch.tensor(seen, device=device)] = True

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
