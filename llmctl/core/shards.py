"""The prepared-data directory that `preprocess` writes and `train`/`eval` read.

    <data.dir>/
      train.bin, val.bin    token ids, flat, native little-endian uint16 (vocab <= 65536) or uint32
      meta.json             what the shards hold and where they came from (see ShardMeta)
      tokenizer.json, tokenizer_config.json, ...   the tokenizer, in the Hugging Face format
      config.yaml           the resolved config that produced them
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.core.files import sha256_file
from llmctl.errors import DataError

META = "meta.json"
SPLITS = ("train", "val")
FORMAT_VERSION = 1


@dataclass
class ShardMeta:
    """Contents of meta.json."""

    dtype: str
    """`uint16` or `uint32`."""
    vocab_size: int
    """Number of token ids the tokenizer can produce (special tokens included)."""
    eos_token_id: int
    """Id placed between documents."""
    tokens: dict[str, int]
    """Tokens per split."""
    documents: dict[str, int]
    """Documents per split (a document cut by a tail split counts in both)."""
    bytes: dict[str, int]
    """UTF-8 bytes of cleaned text per split (end-of-text separators excluded): the denominator of bits per byte."""
    inputs: list[dict[str, Any]]
    """One entry per input: path, size and SHA-256."""
    tokenizer_sha256: str
    """SHA-256 of tokenizer.json."""
    config_sha256: str
    """SHA-256 of the config sections that shaped the data (data, clean, tokenizer)."""
    stats: dict[str, Any] = field(default_factory=dict)
    """Counters of the cleaning stages (documents dropped, duplicates, invalid UTF-8 ...)."""
    format: int = FORMAT_VERSION
    tokenizer: str = "bytes"
    """`bytes`, `bpe` (trained here) or the pretrained model whose tokenizer was reused."""
    split: str = "tail"
    """How validation was held out: `tail` or `documents`."""
    val_fraction: float = 0.1
    """The share held out for validation."""


def read_meta(data_dir: str | Path) -> ShardMeta:
    path = Path(data_dir) / META
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{data_dir} holds no prepared data ({META} is missing); run `llmctl preprocess` first"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable: {exc}") from None
    try:
        return ShardMeta(**raw)
    except TypeError as exc:
        raise DataError(f"{path}: not a meta.json llmctl understands ({exc})") from None


def meta_sha256(data_dir: str | Path) -> str:
    """Identifies the prepared data: checkpoints record it so that resuming on other data is refused."""
    return sha256_file(Path(data_dir) / META)


def open_split(data_dir: str | Path, split: str, meta: ShardMeta | None = None) -> np.memmap:
    """The token ids of one split, memory-mapped read-only (nothing is loaded until it is indexed)."""
    meta = meta or read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    expected = meta.tokens.get(split, 0)
    if expected == 0:
        raise DataError(f"{data_dir}: the {split} split is empty")
    dtype = np.dtype(meta.dtype)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path} is missing; run `llmctl preprocess` again") from None
    if size != expected * dtype.itemsize:
        raise DataError(f"{path} holds {size // dtype.itemsize} tokens but meta.json says {expected}; rebuild it")
    return np.memmap(path, dtype=dtype, mode="r")
