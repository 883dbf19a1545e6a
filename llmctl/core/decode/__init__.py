"""Batched autoregressive decoding: a KV cache, left padding with attention masks, per-sequence sampling settings
and per-sequence seeded randomness, streamed text with stop strings.

Three forwards share one loop (`Decoder`, with continuous batching: a finished row takes the next request at once):
- `GPT2Forward`: a lean decode step over a GPT-2's own weights with a preallocated KV cache. On a small model
  per-token overhead dominates `model.generate` (mask building, cache classes, output dataclasses, logits
  processors, ~5x more small ops, each of which runs with cold caches after a matrix product has streamed megabytes
  of weights through them); this path runs the same ops in the same order (its step compiled by TorchScript), so
  greedy output is token-for-token that of `model.generate` (bench/bench_generate.py).
- `LlamaForward`: the same for Llama-family models (RoPE, RMSNorm, SwiGLU, grouped-query attention).
- `HFForward`: any other causal LM through its own forward and transformers' cache, with the same sampling,
  seeding, stop strings and streaming (static batches).

Reproducibility: every sequence draws its uniform random numbers up front from a generator seeded with its own seed,
and samples by inverse CDF on its own row, so what a sequence produces does not depend on which other sequences share
its batch (on CPU, where a row's arithmetic does not depend on the batch around it).

Speculation: a lone sequence on the lean path checks a guessed next token (`_Guesser`) in the spare row of its step
and keeps the following token where the guess was right: same output, up to twice the speed on repetitive text.

The package, one module per seam:
    requests.py   SamplingParams, Request, Result, the events (TextDelta, Finished) and request sources
    loop.py       Decoder: the decode loop shared by the forwards, with continuous batching
    sampling.py   Sampler: per-sequence settings and seeded draws
    text.py       incremental detokenization and stop strings
    speculate.py  guessing a lone sequence's next token
    rows.py       RowBatch: the rows of a lean path's batch (prefill, admit, drop)
    gpt2.py       GPT2Forward and its TorchScript decode step
    llama.py      LlamaForward
    layout.py     weight layouts, row plans and the probes that keep a row's bits whatever the batch
    generic.py    HFForward: any other causal LM
    script.py     TorchScript with a Python fallback
"""

from llmctl.core.decode.generic import HFForward
from llmctl.core.decode.gpt2 import GPT2Forward
from llmctl.core.decode.llama import LlamaForward
from llmctl.core.decode.loop import Decoder
from llmctl.core.decode.requests import Finished, Request, RequestList, RequestSource, Result, SamplingParams, TextDelta
from llmctl.core.decode.sampling import Sampler

__all__ = ["Decoder", "Finished", "GPT2Forward", "HFForward", "LlamaForward", "Request", "RequestList",
           "RequestSource", "Result", "SamplingParams", "Sampler", "TextDelta"]
