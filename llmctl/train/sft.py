"""What an SFT step reads: instruction examples (llmctl.core.sft), packed into context-length rows or padded one per
row, in a seeded order per epoch; and how a step's loss is weighted so that it is the mean over the step's answer
tokens on every process.

Packing (`sft.packing`, on by default) fills each row with whole examples in the epoch's order; positions restart
at 0 for each example and attention never crosses from one to the next (see `SFTObjective`), so a packed row gives
every example the loss it has alone. Unpacked, rows are one example each, grouped by length (examples of similar
length share a batch, so little is padded) and right-padded to the longest in their micro-batch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llmctl.config import Config
from llmctl.core.device import derived_seed
from llmctl.core.files import sha256_bytes
from llmctl.core.records import provenance
from llmctl.core.sft import Encoder, Example, collate, examples_iter, read_examples
from llmctl.errors import ConfigError

log = logging.getLogger(__name__)

_GROUP = 64
"""Unpacked: examples are sorted by length within windows of this many global batches, then the batches shuffled."""


@dataclass
class SftData:
    """Rows of examples for training and validation; a row is a tuple of example indices."""

    train: list[Example]
    val: list[Example]
    context: int
    packing: bool
    seed: int
    global_batch: int
    group_by_length: bool = True
    _inputs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)
    _val_inputs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)
    _n_targets: list[int] = field(default_factory=list, repr=False)
    _epochs: dict[int, list[tuple[int, ...]]] = field(default_factory=dict, repr=False)
    _starts: list[int] = field(default_factory=lambda: [0], repr=False)

    def __post_init__(self) -> None:
        self._inputs = list(examples_iter(self.train))
        self._val_inputs = list(examples_iter(self.val))
        self._n_targets = [e.targets for e in self.train]  # counted once, not every step

    # --- what the loop asks of any data ---------------------------------------------------------------------
    @property
    def train_items(self) -> int:
        return len(self._epoch(0))  # rows in an epoch (the first; packing makes each a row or so more or less)

    def items_per_step(self, global_batch: int) -> int:
        return global_batch  # rows

    def step_items(self, step: int, count: int) -> list[tuple[int, ...]]:
        """The rows of step `step`: the next `count` of an endless stream of seeded epochs."""
        out = []
        for pos in range(step * count, (step + 1) * count):
            epoch = self._epoch_of(pos)
            out.append(self._epoch(epoch)[pos - self._starts[epoch]])
        return out

    def batch(self, rows: list[tuple[int, ...]], device: torch.device) -> dict[str, torch.Tensor]:
        return collate([[self._inputs[i] for i in row] for row in rows], device)

    def micro_weights(self, micro: list[list[tuple[int, ...]]], items: list[tuple[int, ...]],
                      world_size: int) -> list[float]:
        """Each micro-batch's share of the step's answer tokens (all processes' together), times the process count
        that DDP's gradient average divides by: so the step's loss is the mean over every answer token."""
        total = max(1, self._targets(items))
        return [self._targets(rows) / total * world_size for rows in micro]

    def tokens_of_step(self, items: list[tuple[int, ...]]) -> int:
        """Real (non-padding) input tokens of the whole step, counted on the host."""
        return sum(len(self._inputs[i][0]) for row in items for i in row)

    def eval_batches(self, batch_size: int, n_batches: int) -> list[dict]:
        rows = _pack(range(len(self.val)), [len(x) for x, _ in self._val_inputs], self.context, self.packing)
        specs = [{"rows": rows[i : i + batch_size]} for i in range(0, len(rows), batch_size)]
        return specs[:n_batches] if n_batches else specs

    def load_eval(self, spec: dict, device: torch.device) -> dict[str, torch.Tensor]:
        return collate([[self._val_inputs[i] for i in row] for row in spec["rows"]], device)

    # --- epochs --------------------------------------------------------------------------------------------
    def _targets(self, rows: list[tuple[int, ...]]) -> int:
        return sum(self._n_targets[i] for row in rows for i in row)

    def _epoch_of(self, pos: int) -> int:
        while pos >= self._starts[-1] + len(self._epoch(len(self._starts) - 1)):
            self._starts.append(self._starts[-1] + len(self._epoch(len(self._starts) - 1)))
        epoch = len(self._starts) - 1
        while pos < self._starts[epoch]:
            epoch -= 1
        return epoch

    def _epoch(self, epoch: int) -> list[tuple[int, ...]]:
        """Epoch `epoch`'s rows: a pure function of (seed, epoch). Only the latest two epochs are kept."""
        if epoch not in self._epochs:
            n = len(self.train)
            order = np.random.default_rng(derived_seed(self.seed, epoch, 0x5F7)).permutation(n)
            lengths = [len(x) for x, _ in self._inputs]
            if self.packing:
                rows = _pack(order.tolist(), lengths, self.context, True)
            elif self.group_by_length:
                rows = _length_grouped(order, lengths, self.global_batch, derived_seed(self.seed, epoch, 0x6B0))
            else:
                rows = [(i,) for i in order.tolist()]
            self._epochs[epoch] = rows
            for old in [e for e in self._epochs if e < epoch - 1]:
                del self._epochs[old]
        return self._epochs[epoch]


def _pack(order, lengths: list[int], context: int, packing: bool) -> list[tuple[int, ...]]:
    """Whole examples, in `order`, into rows of at most `context` inputs; one example a row without packing."""
    if not packing:
        return [(i,) for i in order]
    rows, row, used = [], [], 0
    for i in order:
        if row and used + lengths[i] > context:
            rows.append(tuple(row))
            row, used = [], 0
        row.append(i)
        used += lengths[i]
    if row:
        rows.append(tuple(row))
    return rows


def _length_grouped(order: np.ndarray, lengths: list[int], global_batch: int, seed: int) -> list[tuple[int, ...]]:
    """One example a row; within windows of _GROUP global batches sorted by length, then whole batches shuffled, so
    that a batch holds examples of similar length and its padding stays small."""
    window = _GROUP * global_batch
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window].tolist(), key=lambda i: -lengths[i])
        batches += [chunk[i : i + global_batch] for i in range(0, len(chunk), global_batch)]
    shuffled = np.random.default_rng(seed).permutation(len(batches))
    return [(i,) for b in shuffled for i in batches[b]]


def load_sft(cfg: Config, tokenizer, template, context: int, global_batch: int) -> tuple[SftData, str, dict]:
    """The training and validation examples of `cfg`, tokenized for `tokenizer` with `template` (None: plain prompt
    + completion), their data hash and the reading stats."""
    from llmctl.train.data import split_labeled

    s = cfg.sft
    if not cfg.data.inputs:
        raise ConfigError("data.inputs: train.task sft needs JSONL files of prompt/completion or messages examples")
    if "-" in cfg.data.inputs:
        raise ConfigError("data.inputs: sft reads files or datasets, not stdin (epochs read the data more than once)")
    encoder = Encoder(tokenizer, template, s, context + 1)
    examples = read_examples(cfg.data.inputs, encoder, cfg.data.format)
    if s.validation:
        val_encoder = Encoder(tokenizer, template, s, context + 1)
        val = read_examples([s.validation], val_encoder, cfg.data.format)
        train = examples
    else:
        train, val = split_labeled(examples, cfg.data.val_fraction, cfg.run.seed)
    if not train:
        raise ConfigError("data.val_fraction: leaves no training example; lower it or add data")
    files = [*cfg.data.inputs, *([s.validation] if s.validation else [])]
    digests = [provenance(p, cfg.data.format)["sha256"] for p in files]
    shape = json.dumps([digests, _shaping(cfg), template.source if template else None,
                        len(tokenizer), cfg.data.val_fraction])
    data = SftData(train, val, context, s.packing, cfg.run.seed, global_batch, s.group_by_length)
    stats = encoder.stats.as_dict()
    log.info("sft: %d training and %d validation examples (%s tokens), %s, %d rows per epoch", len(train), len(val),
             f"{stats['tokens']:,}", "packed" if s.packing else "one per row", data.train_items)
    return data, sha256_bytes(shape.encode()), stats


def _shaping(cfg: Config) -> dict[str, Any]:
    """The sft settings: each changes which tokens are trained on, or in which rows."""
    import dataclasses

    return dataclasses.asdict(cfg.sft)
