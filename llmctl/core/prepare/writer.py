"""Putting cleaned, encoded chunks in order into the shard files (or onto stdout, in filter mode).

The writer is the only place that sees every document, so it removes duplicates, draws the validation documents,
places the end-of-text id between documents, and judges a document that spans chunks once its last piece arrives
(dropping one that turns out too long, too short or a duplicate by truncating the file back to where it began).
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from llmctl.core.prepare.pipeline import ChunkResult, digest_value, doc_hasher


@dataclass
class _Span:
    """A document spanning chunks, while its pieces arrive."""

    dest: str
    start: int
    """Token offset in its file where it (with the end-of-text before it) began."""
    started_before: bool
    """Whether its file held a document before it (so truncating can restore that state)."""
    chars: int = 0
    tokens: int = 0
    bytes: int = 0
    hasher: object = None


class DocumentRules:
    """Whole-document rules that need every document: duplicates, and the length limits for spanning documents."""

    def __init__(self, dedup: bool, min_chars: int, max_chars: int):
        self.dedup = dedup
        self.min_chars = min_chars
        self.max_chars = max_chars
        self.seen: set[int] = set()
        self.counters = {"duplicates": 0, "too_short": 0, "too_long": 0}

    def is_new(self, digest: int) -> bool:
        if digest in self.seen:
            self.counters["duplicates"] += 1
            return False
        self.seen.add(digest)
        return True

    def keep_span(self, chars: int, digest: int | None) -> bool:
        if self.min_chars > 1 and chars < self.min_chars:
            self.counters["too_short"] += 1
            return False
        if self.max_chars and chars > self.max_chars:
            self.counters["too_long"] += 1
            return False
        return digest is None or self.is_new(digest)

    def new_docs_mask(self, r: ChunkResult, n: int, first: int) -> np.ndarray:
        """Which documents of a chunk to keep: duplicates out (pieces are judged when their document ends)."""
        keep = np.ones(n, dtype=bool)
        if self.dedup and r.digests is not None:
            last = n - 1 if r.tail_piece else n
            for i in range(first, last):
                if not self.is_new(int(r.digests[i])):
                    keep[i] = False
        return keep


def _new_hasher(dedup: bool):
    return doc_hasher() if dedup else None


class ShardWriter:
    """Token ids into `train.bin` (and `val.bin`), end-of-text between documents.

    With `split: tail` everything goes to one file, cut at the end (`finish`); with `split: documents` each document
    is drawn to train or val as it comes, with a generator seeded by `seed`.
    """

    def __init__(self, directory: Path, dtype: str, eos: int, split: str, val_fraction: float, seed: int,
                 rules: DocumentRules):
        self.directory = directory
        self.dtype = np.dtype(dtype)
        self.eos = eos
        self.split = split
        self.val_fraction = val_fraction
        self.rng = np.random.default_rng(seed)
        self.rules = rules
        dests = ["train"] if split == "tail" else ["train", "val"]
        self.files: dict[str, IO[bytes]] = {d: open(directory / f"{d}.bin", "wb") for d in dests}
        self.tokens = dict.fromkeys(dests, 0)
        self.docs = dict.fromkeys(dests, 0)
        self.bytes = dict.fromkeys(dests, 0)
        self.started = dict.fromkeys(dests, False)
        self.span: _Span | None = None

    def add(self, r: ChunkResult) -> None:
        lengths = r.doc_tokens
        n = len(lengths)
        if n == 0:
            return
        if r.layout:
            self._append(r, n)
            return
        first = 0
        closed_span: tuple[str, bool] | None = None  # (dest, kept) of a spanning document ending here
        keep = self.rules.new_docs_mask(r, n, 1 if r.head_piece else 0)
        middle = r.head_piece and r.tail_piece and n == 1
        if r.head_piece:
            first = 1
            span = self.span
            span.chars += r.piece_chars.get("head", 0)
            if span.hasher is not None:
                span.hasher.update(r.piece_texts.get("head", b""))
            if not middle:
                digest = digest_value(span.hasher) if span.hasher is not None else None
                kept = self.rules.keep_span(span.chars, digest)
                if not kept:
                    self._truncate(span)
                    keep[0] = False
                closed_span = (span.dest, kept)
                self.span = None
        dest = np.zeros(n, dtype=bool)  # True: validation
        if self.split == "documents":
            dest[first:] = self.rng.random(n - first) < self.val_fraction
            if r.head_piece:
                dest[0] = (closed_span[0] if closed_span else self.span.dest) == "val"
        tail_new = r.tail_piece and not middle
        for name, mask in (("train", ~dest), ("val", dest)):
            if name not in self.files:
                continue
            selected = np.flatnonzero(mask & keep)
            if len(selected) == 0:
                continue
            self._write(name, r, selected, tail_new and selected[-1] == n - 1)
        if closed_span and closed_span[1]:
            self.docs[closed_span[0]] += 1

    def _append(self, r: ChunkResult, n: int) -> None:
        """A chunk already laid out by its worker (tail split, no whole-document rules): write it as it is."""
        f = self.files["train"]
        if self.started["train"] and not r.head_piece:
            np.array([self.eos], dtype=self.dtype).tofile(f)
            self.tokens["train"] += 1
        r.ids.tofile(f)
        self.tokens["train"] += len(r.ids)
        self.bytes["train"] += int(r.doc_bytes.sum())
        middle = r.head_piece and r.tail_piece and n == 1
        # A spanning document counts once, when its last piece arrives.
        opens, closes = r.tail_piece and not middle, r.head_piece and not middle
        self.docs["train"] += n - int(r.head_piece) - int(opens) + int(closes)
        self.started["train"] = True

    def _write(self, name: str, r: ChunkResult, selected: np.ndarray, opens_span: bool) -> None:
        lengths = r.doc_tokens[selected]
        if len(selected) == len(r.doc_tokens):
            ids = r.ids
        else:
            doc_mask = np.zeros(len(r.doc_tokens), dtype=bool)
            doc_mask[selected] = True
            ids = r.ids[np.repeat(doc_mask, r.doc_tokens)]
        starts = np.cumsum(lengths) - lengths
        continues = r.head_piece and selected[0] == 0
        needs_eos = np.ones(len(selected), dtype=bool)
        needs_eos[0] = self.started[name] and not continues
        started_before = self.started[name]
        out = np.insert(ids.astype(self.dtype, copy=False), starts[needs_eos], self.eos)
        before = self.tokens[name]
        out.tofile(self.files[name])
        self.tokens[name] += len(out)
        self.started[name] = True
        piece_bytes = r.doc_bytes[selected]
        self.bytes[name] += int(piece_bytes.sum())
        complete = len(selected) - int(continues) - int(opens_span)
        self.docs[name] += complete
        if continues and self.span is not None:  # a middle piece
            self.span.tokens += int(lengths[0])
            self.span.bytes += int(piece_bytes[0])
        if opens_span:
            tail_len = int(lengths[-1]) + int(needs_eos[-1])
            span = _Span(name, before + len(out) - tail_len, started_before if len(selected) == 1 else True)
            span.chars = r.piece_chars.get("tail", 0)
            span.tokens, span.bytes = int(lengths[-1]), int(piece_bytes[-1])
            span.hasher = _new_hasher(self.rules.dedup)
            if span.hasher is not None:
                span.hasher.update(r.piece_texts.get("tail", b""))
            self.span = span

    def _truncate(self, span: _Span) -> None:
        f = self.files[span.dest]
        f.flush()
        f.truncate(span.start * self.dtype.itemsize)
        f.seek(0, 2)
        self.tokens[span.dest] = span.start
        self.bytes[span.dest] -= span.bytes
        self.started[span.dest] = span.started_before

    def finish(self, byte_table: np.ndarray) -> dict:
        """Close the files; with a tail split, move the last `val_fraction` of the tokens to val.bin. Returns the
        per-split tokens, documents and bytes."""
        for name, f in self.files.items():
            f.close()
            _check_size(self.directory / f"{name}.bin", self.tokens[name] * self.dtype.itemsize)
        if self.split == "documents":
            return {"tokens": dict(self.tokens), "documents": dict(self.docs), "bytes": dict(self.bytes)}
        return self._cut_tail(byte_table)

    def _cut_tail(self, byte_table: np.ndarray) -> dict:
        path, val_path = self.directory / "train.bin", self.directory / "val.bin"
        total = self.tokens["train"]
        # As nanoGPT: train = data[:int(n * 0.9)], val = data[int(n * 0.9):]
        cut = int(total * (1 - self.val_fraction)) if self.val_fraction > 0 else total
        val_tokens = total - cut
        eos_in_val = 0
        val_bytes = 0
        first_val = last_train = None
        mm = np.memmap(path, dtype=self.dtype, mode="r", shape=(total,)) if total else np.empty(0, self.dtype)
        with open(val_path, "wb") as out:
            step = 1 << 24
            for start in range(cut, total, step):
                block = np.asarray(mm[start : start + step])
                block.tofile(out)
                eos_in_val += int(np.count_nonzero(block == self.eos))
                val_bytes += int(byte_table[block].sum())
        _check_size(val_path, val_tokens * self.dtype.itemsize)
        if val_tokens:
            first_val = int(mm[cut])
        if cut:
            last_train = int(mm[cut - 1])
        del mm
        with open(path, "r+b") as f:
            f.truncate(cut * self.dtype.itemsize)
        total_docs = self.docs["train"]
        val_docs = 0 if not val_tokens else eos_in_val + (0 if first_val == self.eos else 1)
        straddles = bool(val_tokens and cut and first_val != self.eos and last_train != self.eos)
        train_docs = total_docs - val_docs + int(straddles)
        total_bytes = self.bytes["train"]
        return {
            "tokens": {"train": cut, "val": val_tokens},
            "documents": {"train": train_docs if cut else 0, "val": val_docs},
            "bytes": {"train": total_bytes - val_bytes, "val": val_bytes},
        }


class TextWriter:
    """Filter mode: cleaned documents as text, one per line (`lines`), separated by blank lines (`blocks`), or as
    JSON lines. A document spanning chunks streams out piece by piece unless a whole-document rule must see it
    first (dedup, length limits, JSON output): then its pieces wait in memory until it ends."""

    def __init__(self, text_format: str, text_field: str, rules: DocumentRules):
        self.format = text_format
        self.field = text_field
        self.rules = rules
        self.first = True
        self.buffer_spans = rules.dedup or rules.max_chars > 0 or rules.min_chars > 1 or text_format == "jsonl"
        self.span_parts: list[str] | None = None
        self.span_chars = 0
        self.span_hasher = None
        self.documents = 0

    def add(self, r: ChunkResult) -> str:
        texts = r.texts
        n = len(texts)
        if n == 0:
            return ""
        keep = self.rules.new_docs_mask(r, n, 1 if r.head_piece else 0)
        out: list[str] = []
        middle = r.head_piece and r.tail_piece and n == 1
        for i, text in enumerate(texts):
            is_head = i == 0 and r.head_piece
            is_tail = i == n - 1 and r.tail_piece and not middle
            if is_head:
                out.append(self._continue(text, r, ends=not middle))
            elif is_tail:
                out.append(self._open(text, r))
            elif keep[i]:
                out.append(self._start() + self._format(text) + "\n")
                self.documents += 1
        return "".join(out)

    def _start(self) -> str:
        sep = "" if self.first or self.format != "blocks" else "\n"
        self.first = False
        return sep

    def _format(self, text: str) -> str:
        if self.format == "jsonl":
            return json.dumps({self.field: text}, ensure_ascii=False)
        return text.rstrip("\n") if self.format == "blocks" else text.rstrip(" ")

    def _open(self, text: str, r: ChunkResult) -> str:
        self.span_chars = r.piece_chars.get("tail", 0)
        self.span_hasher = _new_hasher(self.rules.dedup)
        if self.span_hasher is not None:
            self.span_hasher.update(r.piece_texts.get("tail", b""))
        if self.buffer_spans:
            self.span_parts = [text]
            return ""
        self.span_parts = None
        return self._start() + text

    def _continue(self, text: str, r: ChunkResult, ends: bool) -> str:
        self.span_chars += r.piece_chars.get("head", 0)
        if self.span_hasher is not None:
            self.span_hasher.update(r.piece_texts.get("head", b""))
        if self.span_parts is not None:
            self.span_parts.append(text)
            if self.rules.max_chars and self.span_chars > self.rules.max_chars:
                self.span_parts = []  # will be dropped: stop holding it
        if not ends:
            return "" if self.span_parts is not None else text
        if self.span_parts is None:
            self.documents += 1
            return self._format(text) + "\n"
        digest = digest_value(self.span_hasher) if self.span_hasher is not None else None
        whole, self.span_parts = "".join(self.span_parts), None
        if not self.rules.keep_span(self.span_chars, digest):
            return ""
        self.documents += 1
        return self._start() + self._format(whole) + "\n"


def _check_size(path: Path, expected: int) -> None:
    """ndarray.tofile writes through C stdio, which can lose a full disk's error: a shard shorter than what was
    written is that error, raised here as the OSError it should have been."""
    size = path.stat().st_size
    if size != expected:
        from llmctl.core.faults import disk_full

        code = errno.ENOSPC if disk_full(path) else errno.EIO
        raise OSError(code, os.strerror(code), str(path))
