"""Scoring text with a model: negative log-likelihood of a token stream with a sliding window, log-likelihood of
label verbalizers after a prompt (zero-shot classification), and a classifier head's label log-probabilities.

All of it runs under `torch.inference_mode()`, batched, and sums in float64 so that a long stream's total does not
drift. Callers own model loading, device choice and what the numbers mean (llmctl.core.metrics).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from itertools import groupby

import numpy as np
import torch
import torch.nn.functional as F

Progress = Callable[[int], None]
"""Called with the number of windows (or examples) just finished."""


# ---------------------------------------------------------------------------------------------------------------
# Sliding-window NLL of a token stream


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows that score a stream of `n_tokens` tokens, as (start, end, first_target) triples: the model reads
    ids[start:end] and is scored on the targets ids[first_target:end].

    This is the recipe of Hugging Face's perplexity guide: windows start every `stride` tokens and are `context`
    long; each scores only the tokens the previous window did not, so every token is scored exactly once, with at
    least `context - stride` tokens of history (all it has, near the start). Token 0 has no history and is never a
    target: a caller that wants it scored puts a beginning-of-text token in front. One departure from the guide:
    with stride == context its blocks would leave each block's first token without history, and it drops those
    tokens; here such windows advance by context - 1 instead (sharing one token), so no token goes unscored.
    A large stride is fast; a small one gives each token more history and costs more forward passes.
    """
    if context < 2:
        raise ValueError("context must be at least 2 tokens")
    if not 0 < stride <= context:
        raise ValueError(f"stride must be between 1 and context ({context}), not {stride}")
    step = min(stride, context - 1)
    windows = []
    start, prev_end = 0, 1
    while prev_end < n_tokens:
        end = min(start + context, n_tokens)
        windows.append((start, end, prev_end))
        prev_end = end
        start += step
    return windows


@torch.inference_mode()
def token_nll(
    model: torch.nn.Module,
    ids: Sequence[int] | np.ndarray | torch.Tensor,
    context: int,
    stride: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of a 1-D token stream under a causal LM, and the number of tokens scored
    (`len(ids) - 1`: every token but the first). See `sliding_windows` for which history each token gets.

    `ids` may be a list, a tensor, or a NumPy array or memmap (a prepared shard): windows are sliced from it as they
    are needed, so a large split is never copied whole. Windows of equal shape go through the model `batch_size` at a
    time; where the model supports `logits_to_keep`, only the scored positions are projected onto the vocabulary.
    The loss is transformers' own definition: mean loss = total / count equals `model(ids, labels=ids).loss` when the
    stream fits in one window.
    """
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    elif not isinstance(ids, np.ndarray):
        ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"ids must be one-dimensional, got shape {tuple(ids.shape)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stride = stride or context
    windows = sliding_windows(len(ids), context, stride)
    keep_logits = _accepts(model, "logits_to_keep")

    total, count = 0.0, 0
    # Windows of one shape (length, targets) batch together: the first, the full middle ones, and the last.
    for _, group in groupby(windows, key=lambda w: (w[1] - w[0], w[1] - w[2])):
        group = list(group)
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            n_targets = chunk[0][1] - chunk[0][2]
            x = torch.from_numpy(np.stack([np.asarray(ids[s:e], dtype=np.int64) for s, e, _ in chunk])).to(device)
            # (B, T); targets are the last n_targets tokens, predicted by the n_targets positions before the last.
            if keep_logits:
                logits = model(input_ids=x, logits_to_keep=n_targets + 1).logits[:, :-1]  # (B, n_targets, V)
            else:
                logits = model(input_ids=x).logits[:, -n_targets - 1 : -1]
            targets = x[:, -n_targets:]  # (B, n_targets)
            nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
            total += float(nll.double())
            count += targets.numel()
            if progress is not None:
                progress(len(chunk))
    return total, count


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot classification: log-likelihood of each label's verbalizer after a prompt


@torch.inference_mode()
def continuation_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    batch_size: int = 8,
    device: torch.device | str | None = None,
    pad_id: int = 0,
    progress: Progress | None = None,
) -> torch.Tensor:
    """log p(continuation | prompt) for every prompt and every continuation: a (len(prompts), len(continuations))
    float64 tensor of summed token log-probabilities (natural log). `batch_size` counts rows per forward pass: a
    (prompt, continuation) pair, or a prompt where every continuation is one token (then one pass scores them all).
    `progress` counts (prompt, continuation) pairs.

    Each prompt must hold at least one token (the continuation's first token needs something to follow). Sequences
    are right-padded, so the real tokens of each row keep positions 0.. and see no padding (causal attention).
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n_labels = len(continuations)
    scores = torch.empty(len(prompts), n_labels, dtype=torch.float64)
    if all(len(c) == 1 for c in continuations):
        # One-token continuations all follow the prompt's last position: one row per prompt, not one per label.
        targets = torch.tensor([c[0] for c in continuations], device=device)
        for b in range(0, len(prompts), batch_size):
            chunk = prompts[b : b + batch_size]
            x, mask = pad_right(chunk, pad_id, device)  # (B, T)
            logits = model(input_ids=x, attention_mask=mask).logits  # (B, T, V)
            last = torch.tensor([len(p) - 1 for p in chunk], device=device)
            logprobs = F.log_softmax(logits[torch.arange(len(chunk), device=device), last].float(), dim=-1)  # (B, V)
            scores[b : b + len(chunk)] = logprobs[:, targets].double().cpu()
            if progress is not None:
                progress(len(chunk) * n_labels)
        return scores
    pairs = [(i, j) for i in range(len(prompts)) for j in range(n_labels)]
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b : b + batch_size]
        x, mask = pad_right([list(prompts[i]) + list(continuations[j]) for i, j in chunk], pad_id, device)  # (B, T)
        logits = model(input_ids=x, attention_mask=mask).logits  # (B, T, V)
        for r, (i, j) in enumerate(chunk):
            p, c = len(prompts[i]), len(continuations[j])
            # Positions p-1 .. p+c-2 predict the continuation's tokens p .. p+c-1.
            logprobs = F.log_softmax(logits[r, p - 1 : p + c - 1].float(), dim=-1)  # (c, V)
            scores[i, j] = logprobs.gather(-1, x[r, p : p + c, None]).sum().double()
        if progress is not None:
            progress(len(chunk))
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Classification head: label log-probabilities


@torch.inference_mode()
def classifier_logprobs(
    model: torch.nn.Module,
    inputs: Sequence[Sequence[int]],
    batch_size: int = 8,
    device: torch.device | str | None = None,
    pad_id: int = 0,
    progress: Progress | None = None,
) -> torch.Tensor:
    """log-softmax of a sequence-classification model's logits for each input: (len(inputs), num_labels), float64.

    Inputs are right-padded with `pad_id`, which should be the model's `config.pad_token_id`: GPT-2-style
    classifiers pool the last token that is not padding.
    """
    if any(len(ids) == 0 for ids in inputs):
        raise ValueError("every input needs at least one token")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    out = []
    for b in range(0, len(inputs), batch_size):
        chunk = inputs[b : b + batch_size]
        x, mask = pad_right(chunk, pad_id, device)
        logits = model(input_ids=x, attention_mask=mask).logits  # (B, num_labels)
        out.append(F.log_softmax(logits.float(), dim=-1).double().cpu())
        if progress is not None:
            progress(len(chunk))
    return torch.cat(out)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row: (input_ids, attention_mask), both (B, T)."""
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        x[r, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[r, : len(row)] = 1
    return x.to(device), mask.to(device)


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
