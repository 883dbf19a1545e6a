"""Cleaning and encoding chunks in worker processes, results handed back in input order.

Both cores are used by processes rather than threads because cleaning is Python (the GIL) and NLTK is pure Python.
At most `2 x workers` chunks are in flight, so memory stays flat however large the input: `Pool.imap` would read the
whole input ahead. Workers are forked before any progress bar thread starts, with TOKENIZERS_PARALLELISM=false so
that a tokenizer used in the parent (training) neither deadlocks nor warns in the children.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from llmctl.core.prepare.clean import Cleaner, Doc
from llmctl.core.prepare.encode import joined_utf8_lengths, make_encoder, utf8_lengths
from llmctl.core.prepare.sources import Chunk

if TYPE_CHECKING:
    from llmctl.config import CleanConfig, DataConfig


@dataclass
class WorkerSpec:
    """Everything a worker needs, picklable (it crosses into spawned processes on platforms without fork)."""

    clean: CleanConfig
    data: DataConfig
    source_names: list[str]
    task: str
    """`sample` (cleaned text for tokenizer training), `text` (filter mode) or `encode` (token ids)."""
    punkt_params: Any = None
    encoder: str | None = None
    """`bytes`, or `tokenizer` to encode with `tokenizer_json`."""
    tokenizer_json: str | None = None
    dtype: str = "uint16"
    dedup: bool = False
    eos_id: int = 0
    layout: bool = False
    """Return ids in their final layout (shard dtype, end-of-text between documents) when the writer has no
    whole-document rule to apply (tail split, no dedup, no length limits): the main process then only writes."""


@dataclass
class ChunkResult:
    """What a worker sends back for one chunk."""

    counters: Counter
    nbytes: int
    head_piece: bool
    tail_piece: bool
    texts: list[str] | None = None
    ids: np.ndarray | None = None
    doc_tokens: np.ndarray | None = None
    """Tokens of each document (ids holds them back to back)."""
    doc_bytes: np.ndarray | None = None
    """UTF-8 bytes of each cleaned document."""
    digests: np.ndarray | None = None
    """A 64-bit hash of each document for duplicate removal (0 for pieces)."""
    piece_chars: dict[str, int] = field(default_factory=dict)
    """Characters of the head/tail piece, for the length rules on documents that span chunks."""
    piece_texts: dict[str, bytes] = field(default_factory=dict)
    """Cleaned head/tail piece (only with dedup), so the writer can hash a spanning document as a whole."""
    layout: bool = False
    """`ids` are final: shard dtype, end-of-text ids between this chunk's documents (see WorkerSpec.layout)."""


class Worker:
    """Cleans (and encodes) one chunk at a time."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.cleaner = Cleaner(spec.clean, spec.data, spec.punkt_params)
        self.encoder = make_encoder(spec.encoder, spec.tokenizer_json, spec.dtype) if spec.task == "encode" else None
        self.one_line = spec.task == "text" and spec.data.text_format == "lines"

    def __call__(self, chunk: Chunk) -> ChunkResult:
        counters: Counter = Counter()
        data = chunk.load()
        if self.encoder is not None and not self.spec.dedup:
            joined = self.cleaner.joined_documents(data, chunk.mode, chunk.cont, chunk.open, counters)
            if joined is not None:
                return self._encode_joined(joined, chunk, counters)
            counters = Counter()
        name = self.spec.source_names[chunk.source]
        doc = self.cleaner.documents(data, chunk.mode, chunk.cont, chunk.open, chunk.line, name, counters)
        result = ChunkResult(counters, chunk.nbytes, doc.head_piece, doc.tail_piece)
        digests = self._digests(doc, result) if self.spec.dedup else None
        if self.cleaner.nlp is not None:
            texts = [self.cleaner.nlp(t, counters) for t in doc.texts]
            if doc.tail_piece and texts and texts[-1] and doc.texts[-1].endswith("\n"):
                texts[-1] += "\n"  # cut at a line end (see sources._piece_cut): it still parts this piece's end
            doc.texts = texts
            digests = _drop_empty(doc, digests, counters)
        texts = doc.texts
        for key, i in (("head", 0), ("tail", len(texts) - 1)):
            if (doc.head_piece if key == "head" else doc.tail_piece) and texts:
                result.piece_chars[key] = len(texts[i])
        result.digests = digests
        if self.encoder is None:
            result.texts = [t.replace("\n", " ") for t in texts] if self.one_line else texts
            return result
        result.ids, result.doc_tokens = self.encoder.encode(texts)
        result.doc_bytes = result.doc_tokens if self.spec.encoder == "bytes" else utf8_lengths(texts)
        return result

    def _encode_joined(self, text: str, chunk: Chunk, counters: Counter) -> ChunkResult:
        result = ChunkResult(counters, chunk.nbytes, chunk.cont, chunk.open)
        if not text and not (chunk.cont or chunk.open):
            result.ids, result.doc_tokens = np.empty(0, np.uint8), np.empty(0, np.int64)
            result.doc_bytes = result.doc_tokens
            return result
        if self.spec.layout and self.spec.encoder == "bytes":
            # The NULs between documents become end-of-text in place: no per-document work at all.
            data = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
            separators = data == 0
            ids = data.astype(self.spec.dtype)
            ids[separators] = self.spec.eos_id
            result.ids, result.layout = ids, True
            result.doc_bytes = np.array([len(data) - int(np.count_nonzero(separators))])
            result.doc_tokens = np.zeros(int(np.count_nonzero(separators)) + 1, dtype=np.int64)  # only counted
        else:
            result.ids, result.doc_tokens = self.encoder.encode_joined(text)
            result.doc_bytes = result.doc_tokens if self.spec.encoder == "bytes" else joined_utf8_lengths(text)
            if self.spec.layout:
                starts = np.cumsum(result.doc_tokens)[:-1]
                result.ids = np.insert(result.ids.astype(self.spec.dtype, copy=False), starts, self.spec.eos_id)
                result.layout = True
        if chunk.cont or chunk.open:
            first, last = text.split("\x00", 1)[0], text.rsplit("\x00", 1)[-1]
            result.piece_chars = {"head": len(first), "tail": len(last)}
        return result

    def _digests(self, doc: Doc, result: ChunkResult) -> np.ndarray:
        texts = doc.texts
        out = np.fromiter((_digest(t) for t in texts), dtype=np.uint64, count=len(texts))
        if doc.head_piece and texts:
            out[0] = 0
            result.piece_texts["head"] = texts[0].encode("utf-8", "surrogatepass")
        if doc.tail_piece and texts:
            out[-1] = 0
            result.piece_texts["tail"] = texts[-1].encode("utf-8", "surrogatepass")
        return out


def doc_hasher(data: bytes = b""):
    """The hash that identifies a document for dedup. Whole documents are hashed here, documents spanning chunks
    piece by piece in the writer: both must use this one, or duplicates across the two would be missed."""
    return hashlib.blake2b(data, digest_size=8)


def digest_value(hasher) -> int:
    return int.from_bytes(hasher.digest(), "little")


def _digest(text: str) -> int:
    return digest_value(doc_hasher(text.encode("utf-8", "surrogatepass")))


def _drop_empty(doc: Doc, digests: np.ndarray | None, counters: Counter) -> np.ndarray | None:
    """Documents the NLP stages emptied (all stop words, say) go, pieces excepted."""
    texts, n = doc.texts, len(doc.texts)
    keep = [bool(t) or (i == 0 and doc.head_piece) or (i == n - 1 and doc.tail_piece) for i, t in enumerate(texts)]
    if all(keep):
        return digests
    counters["empty_after_nlp"] += keep.count(False)
    doc.texts = [t for t, k in zip(texts, keep) if k]
    return digests[np.array(keep)] if digests is not None else None


# ---------------------------------------------------------------------------------------------------------------
# Running workers

_worker: Worker | None = None  # the pool initializer's product: one per worker process, by multiprocessing's design


def _init_worker(spec: WorkerSpec) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = Worker(spec)


def _run_chunk(chunk: Chunk) -> ChunkResult:
    return _worker(chunk)


def worker_count(requested: int) -> int:
    return requested if requested > 0 else max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                 else (os.cpu_count() or 1))


@contextlib.contextmanager
def chunk_runner(spec: WorkerSpec, workers: int) -> Iterator[Callable[..., Iterator[tuple[Chunk, ChunkResult]]]]:
    """A function mapping chunks to (chunk, result) in order, on `workers` processes (in this process when 1).

    Start it before any progress bar: forking while other threads run is unsafe.
    """
    if workers <= 1:
        worker = Worker(spec)

        def run_inline(chunks: Iterator[Chunk], idle: Callable[[], bool] = lambda: False):
            for chunk in chunks:
                yield chunk, worker(chunk)

        yield run_inline
        return

    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = context.Pool(workers, initializer=_init_worker, initargs=(spec,))
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved

    def run_pool(chunks: Iterator[Chunk], idle: Callable[[], bool] = lambda: False):
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_run_chunk, (chunk,))))
            while pending and (len(pending) >= 2 * workers or pending[0][1].ready()):
                done, result = pending.popleft()
                yield done, result.get()
            if pending and idle():
                # Nothing more to read for now (a filter on a quiet pipe): hand out what is done before waiting.
                while pending:
                    done, result = pending.popleft()
                    yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()

    try:
        yield run_pool
    finally:
        pool.terminate()
        pool.join()
