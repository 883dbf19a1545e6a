"""Turning cleaned documents into token ids, fast.

Every encoder takes a list of documents and returns their ids concatenated (no separators: the writer places the
end-of-text ids) and the number of tokens in each document.

- `ByteEncoder`: the byte vocabulary (id == byte value) needs no tokenizer at all: the ids are the UTF-8 bytes.
- `ByteLevelBPEEncoder`: a GPT-2-style byte-level BPE. Encoding with `tokenizers` costs about 4 MB/s per core here,
  most of it pre-tokenization and building `Encoding` objects. Text splits at every space that follows a
  non-space character into pieces that the GPT-2 pre-tokenizer never merges across (its regex only puts a space
  inside a pre-token at the start, or inside a whitespace run), so the ids of a text are the concatenation of the
  ids of its pieces, and natural text repeats the same few hundred thousand pieces. A dictionary from piece to ids
  turns encoding into `str.split` plus lookups, several times faster, with the result unchanged (a test checks it
  against the tokenizer itself).
- `GenericEncoder`: any other tokenizer (a pretrained one with its own normalizer or pre-tokenizer), through
  `encode_batch_fast`.
"""

from __future__ import annotations

import json
import re
from itertools import chain, repeat

import numpy as np
from tokenizers import Tokenizer

# Marks a document boundary inside one encoded chunk (never a real id: vocabularies are far smaller).
_MARK = np.iinfo(np.uint32).max
# A space after whitespace: there the GPT-2 pre-tokenizer may keep the space inside a whitespace run.
_SPACES_AFTER_SPACE = re.compile(r"\s +")
_SPACE_AFTER_NONSPACE = re.compile(r"(?<=\S) ")
_SEP = "\x00"  # joins documents; cleaning removes control characters, and `encode` checks it is absent anyway


def utf8_lengths(texts: list[str]) -> np.ndarray:
    """UTF-8 bytes of each text."""
    if all(t.isascii() for t in texts):
        return np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    return np.fromiter((len(t.encode("utf-8", "surrogatepass")) for t in texts), dtype=np.int64, count=len(texts))


def split_joined(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of documents joined by NUL -> (the bytes without the NULs, bytes per document)."""
    seps = np.flatnonzero(data == 0)
    lengths = np.diff(np.concatenate([[-1], seps, [len(data)]])) - 1
    return (np.delete(data, seps) if len(seps) else data), lengths


def joined_utf8_lengths(text: str) -> np.ndarray:
    """UTF-8 bytes of each document in NUL-joined text."""
    return split_joined(np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8))[1]


class ByteEncoder:
    """The byte vocabulary: ids are the UTF-8 bytes of the text (returned as uint8 to halve what workers send)."""

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        data = "".join(texts).encode("utf-8", "surrogatepass")
        return np.frombuffer(data, dtype=np.uint8), utf8_lengths(texts)

    def encode_joined(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Documents joined by NUL (which none of them holds) -> (ids, tokens per document), without a Python object
        per document: the byte path's speed comes from this."""
        return split_joined(np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8))


class GenericEncoder:
    """Any `tokenizers.Tokenizer`, document by document."""

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype):
        self.tokenizer = tokenizer
        # A literal "<|endoftext|>" in the corpus is text, not a document boundary (as tiktoken's encode_ordinary).
        self.tokenizer.encode_special_tokens = True
        self.dtype = dtype

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=self.dtype, count=int(lengths.sum()))
        return ids, lengths

    def encode_joined(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        return self.encode(text.split(_SEP))


class ByteLevelBPEEncoder:
    """GPT-2-style byte-level BPE with a piece cache (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype, max_cache: int = 1 << 19):
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True
        self.dtype = dtype
        self.max_cache = max_cache
        self.fallback = GenericEncoder(tokenizer, dtype)
        self._reset()

    @staticmethod
    def supports(tokenizer: Tokenizer) -> bool:
        """True when the tokenizer is a plain GPT-2-style byte-level BPE, for which piece caching is exact."""
        spec = json.loads(tokenizer.to_str())
        pre = spec.get("pre_tokenizer") or {}
        model = spec.get("model") or {}
        return (
            spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)
            and model.get("type") == "BPE"
            and not model.get("dropout")
        )

    def _reset(self) -> None:
        self.index: dict[str, int] = {}
        self.flat = np.empty(0, dtype=np.uint32)  # ids of every cached piece, back to back
        self.starts = np.empty(0, dtype=np.int64)
        self.lengths = np.empty(0, dtype=np.int64)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        text = _SEP.join(texts)
        if text.count(_SEP) != len(texts) - 1:
            return self.fallback.encode(texts)  # the text itself holds NULs (cleanup off)
        return self.encode_joined(text)

    def encode_joined(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Documents joined by NUL (which none of them holds) -> (ids, tokens per document)."""
        pieces = _split_pieces(text)
        first, rest = pieces[0], pieces[1:]
        if len(self.index) > self.max_cache:
            self._reset()  # keeps memory flat on corpora with endless distinct pieces
        get = self.index.get
        idx = np.fromiter(map(get, rest, repeat(-1)), dtype=np.int64, count=len(rest))
        missing = np.flatnonzero(idx < 0)
        if len(missing):
            self._add(list(dict.fromkeys(rest[i] for i in missing)))
            get = self.index.__getitem__
            idx[missing] = [get(rest[i]) for i in missing]
        lengths, starts = self.lengths[idx], self.starts[idx]
        total = int(lengths.sum())
        # Gather the cached ids of every piece in order: position j of piece k comes from starts[k] + j.
        offsets = np.cumsum(lengths) - lengths
        gather = np.repeat(starts - offsets, lengths) + np.arange(total, dtype=np.int64)
        out = np.concatenate([self._piece_ids(first, leading_space=False), self.flat[gather]])
        marks = np.flatnonzero(out == _MARK)
        bounds = np.concatenate([[-1], marks, [len(out)]])
        doc_lengths = np.diff(bounds) - 1
        ids = np.delete(out, marks) if len(marks) else out
        return ids.astype(self.dtype, copy=False), doc_lengths

    def _add(self, keys: list[str]) -> None:
        plain = [k for k in keys if _SEP not in k]
        encodings = self.tokenizer.encode_batch_fast([" " + k for k in plain], add_special_tokens=False)
        found = dict(zip(plain, (e.ids for e in encodings)))
        for k in keys:
            if _SEP in k:
                found[k] = self._piece_ids(k, leading_space=True).tolist()
        id_lists = [found[k] for k in keys]
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        flat = np.fromiter(chain.from_iterable(id_lists), dtype=np.uint32, count=int(lengths.sum()))
        starts = len(self.flat) + np.cumsum(lengths) - lengths
        base = len(self.index)
        self.index.update(zip(keys, range(base, base + len(keys))))
        self.flat = np.concatenate([self.flat, flat])
        self.starts = np.concatenate([self.starts, starts])
        self.lengths = np.concatenate([self.lengths, lengths])

    def _piece_ids(self, piece: str, leading_space: bool) -> np.ndarray:
        """Ids of one piece that may hold document separators: each part is encoded on its own (its end is the end of
        a document), with a mark between parts."""
        parts = piece.split(_SEP)
        if leading_space:
            parts[0] = " " + parts[0]
        out: list[int] = []
        for i, part in enumerate(parts):
            if i:
                out.append(int(_MARK))
            if part:
                out += self.tokenizer.encode(part, add_special_tokens=False).ids
        return np.array(out, dtype=np.uint32)


def _split_pieces(text: str) -> list[str]:
    """`text` cut before every space that follows a non-space character (the space starts the next piece and is
    left out). `str.split(" ")` runs at memory speed but also cuts before a space that follows whitespace; such
    spots are rare in prose, so glue them back; where they are many (indented code), the regex is faster."""
    pieces = text.split(" ")
    spots = [p for m in _SPACES_AFTER_SPACE.finditer(text) for p in range(m.start() + 1, m.end())]
    if text.startswith(" "):
        spots.insert(0, 0)  # the regex does not cut at the very start either
    if not spots:
        return pieces
    if len(spots) > 256:
        return _SPACE_AFTER_NONSPACE.split(text)
    # The space at offset p separates pieces k and k+1, where k counts the spaces before p.
    ks, k, last = [], 0, 0
    for p in spots:
        k += text.count(" ", last, p)
        ks.append(k)
        last = p
    for k in reversed(ks):
        pieces[k : k + 2] = [pieces[k] + " " + pieces[k + 1]]
    return pieces


def make_encoder(kind: str, tokenizer_json: str | None, dtype: str):
    """The fastest exact encoder for a tokenizer (`kind` is `bytes` for the byte vocabulary)."""
    if kind == "bytes":
        return ByteEncoder()
    tokenizer = Tokenizer.from_str(tokenizer_json)
    np_dtype = np.dtype(dtype)
    if ByteLevelBPEEncoder.supports(tokenizer):
        return ByteLevelBPEEncoder(tokenizer, np_dtype)
    return GenericEncoder(tokenizer, np_dtype)
