"""What a training step reads: random windows of the prepared token shards (causal LM), or padded batches of
labeled examples (classification). Which items a step takes is a pure function of (seed, step)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmctl.config import Config
from llmctl.core.device import (
    Dist,
    derived_seed,
)
from llmctl.core.files import sha256_bytes
from llmctl.core.scoring import pad_right
from llmctl.errors import ConfigError
from llmctl.train.step import barrier

log = logging.getLogger(__name__)


@dataclass
class TokenData:
    """Random windows of `context + 1` tokens from memory-mapped shards (causal LM)."""

    train: np.ndarray
    val: np.ndarray | None
    context: int
    seed: int

    @property
    def train_items(self) -> int:
        return len(self.train)

    def items_per_step(self, global_batch: int) -> int:
        return global_batch * self.context  # tokens

    def step_items(self, step: int, count: int) -> np.ndarray:
        return batch_starts(self.seed, step, len(self.train), self.context, count)

    def batch(self, starts: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        x, y = get_batch(self.train, starts, self.context, device)
        return {"input_ids": x, "targets": y}

    def eval_batches(self, batch_size: int, n_batches: int) -> list[dict[str, torch.Tensor]]:
        """Fixed batches (the same at every evaluation): `n_batches` random windows, or 0 for the whole split
        in consecutive windows, so that every validation token is scored exactly once."""
        if self.val is None:
            return []
        if n_batches and len(self.val) > self.context:
            rng = np.random.default_rng(derived_seed(self.seed, 0xE7A1))
            starts = rng.integers(0, len(self.val) - self.context, size=n_batches * batch_size)
            return [{"starts": starts[i : i + batch_size], "length": self.context}
                    for i in range(0, len(starts), batch_size)]
        n = len(self.val)
        starts = np.arange(0, n - 1, self.context)
        full = starts[starts + self.context + 1 <= n]
        batches = [{"starts": full[i : i + batch_size], "length": self.context}
                   for i in range(0, len(full), batch_size)]
        if len(full) < len(starts):
            last = starts[len(full)]
            batches.append({"starts": np.array([last]), "length": n - 1 - last})
        return batches

    def load_eval(self, spec: dict, device: torch.device) -> dict[str, torch.Tensor]:
        x, y = get_batch(self.val, spec["starts"], spec["length"], device)
        return {"input_ids": x, "targets": y}


def batch_starts(seed: int, step: int, n_tokens: int, context: int, count: int) -> np.ndarray:
    """Where the `count` windows of optimizer step `step` start: a pure function of (seed, step)."""
    rng = np.random.default_rng(derived_seed(seed, step))
    return rng.integers(0, n_tokens - context, size=count)


def get_batch(data: np.ndarray, starts: np.ndarray, context: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Inputs and next-token targets, each (B, T), for windows of `data` beginning at `starts`."""
    rows = data[starts[:, None] + np.arange(context + 1)]  # (B, T+1), read from the memmap
    t = torch.from_numpy(rows.astype(np.int64))
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t[:, :-1], t[:, 1:]


@dataclass
class LabeledData:
    """Tokenized labeled examples, shuffled anew each epoch; batches are padded to their longest example."""

    train: list[list[int]]
    train_labels: list[int]
    val: list[list[int]]
    val_labels: list[int]
    labels: list[str]
    pad_id: int
    seed: int
    reports_accuracy = True  # estimate_loss adds val_accuracy
    _perm: tuple[int, np.ndarray] | None = None

    @property
    def train_items(self) -> int:
        return len(self.train)

    def items_per_step(self, global_batch: int) -> int:
        return global_batch  # examples

    def step_items(self, step: int, count: int) -> np.ndarray:
        """Examples of step `step`: the next `count` of an endless stream of seeded per-epoch permutations."""
        n = len(self.train)
        out = []
        for pos in range(step * count, (step + 1) * count):
            epoch, i = divmod(pos, n)
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, np.random.default_rng(derived_seed(self.seed, epoch, 0xC1A5)).permutation(n))
            out.append(self._perm[1][i])
        return np.array(out)

    def batch(self, items: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        return self._pad([self.train[i] for i in items], [self.train_labels[i] for i in items], device)

    def tokens_of(self, items: np.ndarray) -> int:
        """Tokens in these training examples, counted on the host (no device sync)."""
        return sum(len(self.train[i]) for i in items)

    def eval_batches(self, batch_size: int, n_batches: int) -> list[dict]:
        n = len(self.val) if not n_batches else min(len(self.val), n_batches * batch_size)
        return [{"items": np.arange(i, min(n, i + batch_size))} for i in range(0, n, batch_size)]

    def load_eval(self, spec: dict, device: torch.device) -> dict[str, torch.Tensor]:
        return self._pad([self.val[i] for i in spec["items"]], [self.val_labels[i] for i in spec["items"]], device)

    def _pad(self, rows: list[list[int]], labels: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        ids, mask = pad_right(rows, self.pad_id, device)  # right padding: the classifier reads the last non-pad token
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(labels, device=device)}


def load_token_data(cfg: Config, dist: Dist, quiet: bool) -> tuple[TokenData | None, Any, Any, str]:
    """Prepared shards (prepared first when data.inputs names raw text), their tokenizer, meta and hash."""
    from llmctl.core.model import load_tokenizer
    from llmctl.core.shards import meta_sha256, open_split, read_meta

    if cfg.data.inputs:
        if dist.is_main:
            try:
                from llmctl.core.prepare import prepare
            except ImportError:
                raise ConfigError("data.inputs: preparing raw text needs llmctl.core.prepare; run `llmctl "
                                  "preprocess` first and leave data.inputs empty") from None
            prepare(cfg, force=False, quiet=quiet)
        barrier(dist)
    data_dir = cfg.data.dir
    meta = read_meta(data_dir)
    train = open_split(data_dir, "train", meta)
    val = open_split(data_dir, "val", meta) if meta.tokens.get("val", 0) >= 2 else None
    if val is None:
        log.warning("%s has no validation split: no validation loss, and the last checkpoint counts as best", data_dir)
    tokenizer = load_tokenizer(data_dir)
    return TokenData(train, val, 0, cfg.run.seed), tokenizer, meta, meta_sha256(data_dir)


def load_labeled(cfg: Config) -> tuple[list, str]:
    """The labeled examples of data.inputs (JSONL or TSV) and a hash of what shaped them."""
    from llmctl.core.inputs import read_labeled
    from llmctl.core.records import provenance

    if not cfg.data.inputs:
        raise ConfigError("data.inputs: train.task classification needs a labeled file (JSONL or TSV: text, label)")
    examples, digest = [], []
    for path in cfg.data.inputs:
        if path == "-":
            raise ConfigError("data.inputs: classification reads labeled files, not stdin")
        examples += read_labeled(path, cfg.data.text_field, cfg.data.label_field)
        digest.append(provenance(path)["sha256"])  # a file's SHA-256; a hub dataset's name, split and revision
    shape = json.dumps([digest, cfg.data.text_field, cfg.data.label_field, cfg.data.val_fraction])
    return examples, sha256_bytes(shape.encode())


def split_labeled(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    order = np.random.default_rng(derived_seed(seed, 0x5B1)).permutation(len(examples))
    n_val = int(round(len(examples) * val_fraction))
    if val_fraction > 0 and len(examples) >= 2:
        n_val = min(max(n_val, 1), len(examples) - 1)
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return train, val
