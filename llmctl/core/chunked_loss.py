"""Cross-entropy through a language model's output projection without its full logits (`head_cross_entropy`).

A batch of 4 x 256 tokens over GPT-2's 50,257-token vocabulary makes 206 MB of fp32 logits, and autograd keeps
them, their log-softmax and their gradient alive at once: about 620 MB, as much as all twelve blocks' activations
of a GPT-2 124M together. Here the rows go through the projection in chunks; each chunk's loss and its gradients
(with respect to the hidden states, and to the projection's weight where it trains) are made at once, and only the
gradients are kept for the backward pass. Peak memory for the head drops to one chunk's logits (a few tens of MB);
the arithmetic is the same products in another grouping, so losses agree with `F.cross_entropy` to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ROWS = 256
"""Rows per chunk: 51 MB of fp32 logits at GPT-2's vocabulary."""
MIN_VOCAB = 4096
"""Smaller vocabularies keep the plain path: their logits are small, and chunking only adds calls."""


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed next-token loss of hidden states (N, C) through the projection `weight` (V, C) (logits = hidden @
    weight.T, no bias) against `targets` (N,), -100 where no loss is taken; a float32 scalar that backpropagates to
    `hidden` and `weight`."""
    if weight.shape[0] < MIN_VOCAB or hidden.shape[0] <= CHUNK_ROWS:
        return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        with torch.no_grad():
            return sum(F.cross_entropy(F.linear(hidden[s:s + CHUNK_ROWS], weight).float(),
                                       targets[s:s + CHUNK_ROWS], reduction="sum")
                       for s in range(0, hidden.shape[0], CHUNK_ROWS))
    return _HeadCrossEntropy.apply(hidden, weight, targets)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Under autocast the products run in its dtype, as F.linear would; the softmax in float32.
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else hidden.dtype
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            h = hidden[start:start + CHUNK_ROWS].to(dtype)  # (n, C)
            t = targets[start:start + CHUNK_ROWS]
            logits = torch.mm(h, w.t()).float()  # (n, V)
            valid = t != -100
            lse = torch.logsumexp(logits, -1)  # (n,)
            picked = logits.gather(1, t.clamp(min=0)[:, None])[:, 0]
            total += ((lse - picked) * valid).sum()
            # d loss / d logits = softmax - one-hot, on rows that count; in place on the logits
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(len(t), device=t.device), t.clamp(min=0)] -= 1
            grad.mul_(valid[:, None])
            grad = grad.to(dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + CHUNK_ROWS] = torch.mm(grad, w)
            if grad_weight is not None:
                grad_weight += torch.mm(grad.t(), h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None
