"""Any other causal LM (`HFForward`): its own forward and transformers' cache, with the same sampling, seeding,
stop strings and streaming as the lean path."""

from __future__ import annotations

import inspect
import logging

import torch

log = logging.getLogger(__name__)


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
