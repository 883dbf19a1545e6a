"""Attention for packed rows that costs what the examples cost, not what the rows cost.

A packed row holds several examples one after another, positions restarting at 0 for each. A block-diagonal mask over
the whole row is exact but pays attention over row x row; here each example's queries, keys and values are gathered
into one (examples, longest, ...) batch, attended causally (an example's padding sits after its real tokens, so no
real query sees it), and scattered back. The projections and MLPs still run on the dense packed rows: no token of
padding passes through them.

`packed_attention` has the signature of transformers' attention functions and is registered as `llmctl_packed`;
`SFTObjective` switches a model to it for packed batches only (`attention_for`). The lean GPT-2 pass calls it
directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

NAME = "llmctl_packed"


BUCKET = 8
"""Examples attended together: sorted by length and taken this many at a time, each group padded only to its own
longest, so that attention costs about the sum of the examples' squared lengths (one group padded to the longest
example of the batch cost up to 3x that on data whose lengths vary 10x)."""


def segments(position_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For rows (B, T) whose positions restart at 0 where an example starts: groups of examples of similar length,
    each as `index` (n, L), its examples' token positions in the flattened rows (0 past an example's end), and
    `valid` (n, L)."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().squeeze(1)  # (N,): every row starts an example at position 0
    ends = torch.cat([starts[1:], starts.new_tensor([flat.numel()])])
    lengths = ends - starts
    order = torch.argsort(lengths, descending=True, stable=True)
    groups = []
    for first in range(0, len(order), BUCKET):
        pick = order[first : first + BUCKET]
        offsets = torch.arange(int(lengths[pick[0]]), device=flat.device)  # (L,): the group's longest first
        valid = offsets[None, :] < lengths[pick, None]  # (n, L)
        groups.append((torch.where(valid, starts[pick, None] + offsets[None, :], 0), valid))
    return groups


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: list[tuple[torch.Tensor, torch.Tensor]],
           dropout: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Causal attention within each example: q (B, H, T, D), k and v (B, Hkv, T, D) -> (B, T, H, D)."""
    B, H, T, D = q.shape
    qf, kf, vf = (x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (q, k, v))  # (B*T, h, D)
    flat = q.new_zeros(B * T, H, D)
    for index, valid in groups:
        out = F.scaled_dot_product_attention(qf[index].transpose(1, 2), kf[index].transpose(1, 2),
                                             vf[index].transpose(1, 2), dropout_p=dropout, is_causal=True,
                                             scale=scale, enable_gqa=k.shape[1] != H)  # (n, H, L, D)
        flat[index[valid]] = out.transpose(1, 2)[valid]  # (tokens, H, D) into place
    return flat.view(B, T, H, D)


_cache: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def _segments_cached(position_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same position_ids tensor reaches every layer: find its segments once per forward."""
    key = (position_ids.data_ptr(), tuple(position_ids.shape), position_ids._version)
    if key not in _cache:
        _cache.clear()
        _cache[key] = segments(position_ids)
    return _cache[key]


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention interface: (B, H, T, D) in, ((B, T, H, D), None) out."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None or attention_mask is not None or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if position_ids.shape[0] != query.shape[0]:
        position_ids = position_ids.expand(query.shape[0], -1)
    return attend(query, key, value, _segments_cached(position_ids), dropout, scaling), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)


@contextlib.contextmanager
def attention_for(model: torch.nn.Module, packed: bool) -> Iterator[None]:
    """While a packed batch runs, the model's attention layers use `packed_attention` (transformers reads the
    implementation from the config at every call); afterwards, its own again."""
    config = getattr(model, "config", None)
    if not packed or config is None:
        yield
        return
    register()
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
