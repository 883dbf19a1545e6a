"""Finding the inputs and reading them as byte chunks cut at document boundaries.

An input spec is a file, a directory (searched recursively with `data.glob`), a shell pattern, `-` for stdin,
`stdlib:pydoc-topics`, or a record input read through llmctl.core.records (Parquet, CSV/TSV, a `save_to_disk`
directory, `hf:NAME[:CONFIG][@SPLIT]`), whose `data.text_field` values are re-encoded as JSONL lines. Reading never
decodes: it cuts the raw bytes into chunks of about `chunk_bytes`, each ending at a document boundary, so that
workers can clean and encode chunks independently and in any order. A document larger than a chunk (a huge file
with `documents: file`, a line without end) is cut into pieces at line boundaries;
the chunk flags `cont` and `open` tell the writer that its first/last document continues across chunks.
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import json
import os
import re
import select
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from llmctl.core.faults import reading
from llmctl.core.files import sha256_file
from llmctl.core.inputs import STDIN, input_format, open_binary
from llmctl.core.records import HF_PREFIX, iter_texts, parquet_row_groups, provenance, record_format
from llmctl.errors import DataError

PYDOC_TOPICS = "stdlib:pydoc-topics"
BUILTINS = (PYDOC_TOPICS,)

# A paragraph break: a line end, then one or more blank (whitespace-only) lines. Bytes, before decoding: CRLF and
# lone CR count as line ends too.
_PARAGRAPH_BREAK = re.compile(rb"(?:\r?\n|\r)(?:[ \t]*(?:\r?\n|\r))+")
# A blank line inside a record's text (CR line ends are checked for apart: this pattern stays cheap to search).
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
# The end of a sentence at the end of a line: . ! ? or an ellipsis, then closing quotes or brackets, then spaces.
_SENTENCE_END = re.compile(rb"(?:[.!?]|\xe2\x80\xa6)(?:[\"')\]]|\xe2\x80[\x99\x9d]|\xc2\xbb)*[ \t\r]*$")


@dataclass
class Source:
    """One input to read: a file, stdin, or a built-in corpus."""

    name: str
    """What messages and meta.json call it: the path as given or found, `<stdin>`, or the built-in's spec."""
    kind: str
    """`file`, `stdin`, `builtin`, or `records` (Parquet, CSV/TSV, datasets: read through llmctl.core.records)."""
    format: str
    """`txt` or `jsonl`."""
    path: Path | None = None
    size: int | None = None
    """Bytes on disk (compressed size for gzip files); None for stdin."""
    sha256: str | None = None
    """Of the bytes on disk (for stdin: of the bytes read, known once read)."""
    spool: Path | None = None
    """Stdin saved to a file, so that it can be read twice (tokenizer sample, then encoding)."""
    field: str | None = None
    """Records: the field (data.text_field) holding the text; `fmt` the record format given as data.format."""
    fmt: str = "auto"
    hub: dict | None = None
    """A hub dataset's name, config, split and revision (its provenance, kept in meta.json)."""

    def record(self) -> dict:
        """The entry meta.json keeps for this input."""
        return {"path": self.name, "size": self.size, "sha256": self.sha256, **(self.hub or {})}


def expand_inputs(specs: list[str], globs: list[str], fmt: str, text_field: str = "text") -> list[Source]:
    """Turn `data.inputs` into the list of sources to read, in order. No spec means stdin."""
    sources: list[Source] = []
    for spec in specs or [STDIN]:
        if spec.startswith(HF_PREFIX) or spec != STDIN and record_format(spec, fmt) == "dataset":
            sources.append(_records(spec, fmt, text_field))
        elif spec == STDIN:
            if fmt in ("parquet", "csv", "tsv"):
                raise DataError(f"data.format {fmt}: records are read from named files, not stdin; name the file")
            if any(s.kind == "stdin" for s in sources):
                raise DataError("data.inputs: `-` (stdin) is given more than once")
            sources.append(Source("<stdin>", "stdin", "jsonl" if fmt == "jsonl" else "txt"))
        elif spec.startswith("stdlib:"):
            if spec not in BUILTINS:
                raise DataError(f"data.inputs: unknown built-in corpus {spec!r}; known: {', '.join(BUILTINS)}")
            sources.append(_builtin(spec))
        else:
            sources += [_records(s.name, fmt, text_field) if _is_records(s.name, fmt) else s
                        for s in _expand_path(spec, globs, fmt)]
    for source in sources:
        if source.kind == "file":
            source.size = source.path.stat().st_size
    return sources


def _expand_path(spec: str, globs: list[str], fmt: str) -> list[Source]:
    path = Path(spec).expanduser()
    if path.is_dir():
        found = sorted({p for pattern in globs for p in path.rglob(pattern) if p.is_file() and not _hidden(p, path)})
        if not found:
            raise DataError(f"{spec}: no files matching {', '.join(globs)} (data.glob) in this directory")
        return [Source(str(p), "file", input_format(p, fmt), p) for p in found]
    if path.is_file():
        return [Source(spec, "file", input_format(path, fmt), path)]
    if path.exists():
        raise DataError(f"{spec}: not a regular file or directory")
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path(p) for p in globlib.glob(os.path.expanduser(spec), recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise DataError(f"{spec}: no file matches this pattern")
        return [Source(str(p), "file", input_format(p, fmt), p) for p in files]
    raise DataError(f"{spec}: no such file or directory")


def _is_records(name: str, fmt: str) -> bool:
    return record_format(name, fmt) in ("parquet", "csv", "tsv", "dataset")


def _records(spec: str, fmt: str, text_field: str) -> Source:
    """A record input: its provenance now (a hub dataset fails here at once when it cannot be had)."""
    found = provenance(spec, fmt)
    hub = {k: found[k] for k in ("dataset", "config", "split", "revision")} if "dataset" in found else None
    path = None if hub else Path(spec)
    return Source(spec, "records", "jsonl", path, found["size"], found["sha256"], field=text_field, fmt=fmt, hub=hub)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _builtin(spec: str) -> Source:
    data = _pydoc_topics_jsonl()
    return Source(spec, "builtin", "jsonl", size=len(data), sha256=hashlib.sha256(data).hexdigest())


def _pydoc_topics_jsonl() -> bytes:
    """The documentation topics every CPython carries (`help('topics')`), one JSON document per topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError(
            f"{PYDOC_TOPICS}: this Python has no pydoc_data (some distributions strip it); "
            "pass your own text in data.inputs instead"
        ) from None
    lines = (json.dumps({"text": topics[name]}, ensure_ascii=False) for name in sorted(topics))
    return ("\n".join(lines) + "\n").encode("utf-8")


def hash_sources(sources: list[Source]) -> None:
    """Fill in the SHA-256 of every file input (stdin's is known only once it has been read)."""
    for source in sources:
        if source.kind == "file" and source.sha256 is None:
            try:
                source.sha256 = sha256_file(source.path)
            except OSError as exc:
                raise DataError(f"{source.name}: cannot read: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# Reading in chunks


@dataclass
class Chunk:
    """Raw bytes of whole documents from one source (or a piece of one document too big for a chunk)."""

    source: int
    """Index of the source in the list given to `read_chunks`."""
    data: bytes
    mode: str
    """How the bytes split into documents: `file`, `paragraph`, `line` or `jsonl`."""
    line: int = 1
    """Line number (from 1) of the chunk's first line in its source, for error messages."""
    cont: bool = False
    """The first document continues the last document of the previous chunk."""
    open: bool = False
    """The last document continues in the next chunk."""
    nbytes: int = 0
    """Bytes of input this chunk accounts for (progress): len(data), or the length to read at `offset`."""
    path: str | None = None
    """For a plain file: where the worker reads the chunk itself (`data` is then empty), which spares the main
    process from sending every byte of the corpus through a pipe."""
    offset: int = 0
    row_groups: tuple[int, int] | None = None
    """For a Parquet input: the row groups [start, end) whose `field` texts the worker reads itself (`line` is then
    the number of their first row); `load` also settles `mode` (see `_record_chunk`)."""
    field: str | None = None

    def load(self) -> bytes:
        """The chunk's bytes, wherever they are."""
        if self.row_groups is not None:
            from llmctl.core.records import parquet_texts

            texts = parquet_texts(self.path, range(*self.row_groups), self.field, self.line)
            self.data, self.mode = _encode_records(texts, self.field)
            self.row_groups = None
            return self.data
        if self.path is None:
            return self.data
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), self.nbytes, self.offset)


@dataclass
class ReadStats:
    bytes: int = 0
    """Input bytes read (after gzip decompression)."""
    sources: int = 0
    per_source: list[int] = field(default_factory=list)


def read_chunks(
    sources: list[Source],
    documents: str,
    chunk_bytes: int,
    *,
    streaming: bool = False,
    stats: ReadStats | None = None,
    only: Callable[[int], bool] | None = None,
) -> Iterator[Chunk]:
    """Every source's bytes as chunks cut at document boundaries, in order.

    `streaming` hands out whatever complete documents have arrived whenever stdin has nothing more to read at the
    moment (so a filter answers line by line), instead of waiting for a full chunk. `only(i)` selects chunks by
    their running index (the tokenizer sample reads every k-th chunk); skipped chunks are still read and counted.
    """
    stats = stats if stats is not None else ReadStats()
    index = 0
    for number, source in enumerate(sources):
        mode = "jsonl" if source.format == "jsonl" else documents
        stats.sources += 1
        read = 0
        for chunk in _source_chunks(source, number, mode, chunk_bytes, streaming):
            read += chunk.nbytes
            stats.bytes += chunk.nbytes
            if only is None or only(index):
                yield chunk
            index += 1
        stats.per_source.append(read)


def _source_chunks(source: Source, number: int, mode: str, chunk_bytes: int, streaming: bool) -> Iterator[Chunk]:
    if source.kind == "builtin":
        yield from _cut(iter([_pydoc_topics_jsonl()]), source, number, mode, chunk_bytes, lambda: False)
        return
    if source.kind == "records" and record_format(source.name, source.fmt) == "parquet":
        groups = parquet_row_groups(source.name, source.field or "text")
        if max((size for _, size in groups), default=0) <= 4 * chunk_bytes:
            yield from _row_group_chunks(groups, number, source.name, source.field or "text", chunk_bytes)
            return
    if source.kind == "records":
        yield from _record_chunks(iter_texts(source.name, source.field or "text", source.fmt), number,
                                  source.field or "text", chunk_bytes)
        return
    if source.kind == "stdin" and source.spool is None:
        counter = _CountingHasher()
        blocks = _read_blocks(open_binary(STDIN), chunk_bytes, counter)
        ready = stdin_has_data if streaming else (lambda: True)
        yield from _cut(blocks, source, number, mode, chunk_bytes, lambda: not ready())
        source.sha256, source.size = counter.hasher.hexdigest(), counter.nbytes
        return
    path = source.spool or source.path
    with open_binary(path) as f:
        first = _safe_read(f, min(chunk_bytes, 1 << 16), source)
        if b"\x00" in first[:8192]:
            raise DataError(f"{source.name}: looks like a binary file (it holds NUL bytes), not text")
        # Hash a plain file while reading it rather than in a pass of its own (a gzip file is hashed compressed,
        # by hash_sources).
        hasher = hashlib.sha256() if source.sha256 is None and not isinstance(f, gzip.GzipFile) else None

        def blocks() -> Iterator[bytes]:
            block = first
            while block:
                if hasher is not None:
                    hasher.update(block)
                yield block
                block = _safe_read(f, chunk_bytes, source)

        plain = None if isinstance(f, gzip.GzipFile) else str(path)
        yield from _cut(blocks(), source, number, mode, chunk_bytes, lambda: False, plain)
        if hasher is not None:
            source.sha256 = hasher.hexdigest()


def _row_group_chunks(groups: list[tuple[int, int]], number: int, path: str, field: str,
                      chunk_bytes: int) -> Iterator[Chunk]:
    """A Parquet file as chunks of whole row groups (about `chunk_bytes` each) that the workers read and decode
    themselves, as they read plain files: the main process only hands out row-group numbers."""
    start, row, first, size = 0, 1, 1, 0
    for i, (rows, nbytes) in enumerate(groups):
        size += nbytes
        row += rows
        if size >= chunk_bytes or i == len(groups) - 1:
            yield Chunk(number, b"", "paragraph", line=first, nbytes=size, path=path, row_groups=(start, i + 1),
                        field=field)
            start, first, size = i + 1, row, 0


def _encode_records(texts: list[str], field: str) -> tuple[bytes, str]:
    """Texts, one document each, as chunk bytes and their mode: paragraphs (texts joined by blank lines: the
    workers' fast path, as for a .txt file) when that splits back into the same documents, else JSONL lines
    `{field: text}`, which keep any text whole."""
    if _paragraph_safe(texts):
        return ("\n\n".join(texts) + "\n").encode("utf-8", "surrogatepass"), "paragraph"
    return "".join(json.dumps({field: t}, ensure_ascii=False) + "\n" for t in texts).encode("utf-8"), "jsonl"


def _record_chunks(texts: Iterator[tuple[str, str]], number: int, field: str, chunk_bytes: int) -> Iterator[Chunk]:
    """Records' texts, read here, as chunks of about `chunk_bytes`, one document per record."""
    batch: list[str] = []
    size = 0

    def chunk() -> Chunk:
        data, mode = _encode_records(batch, field)
        return Chunk(number, data, mode, nbytes=len(data))

    for _, text in texts:
        batch.append(text)
        size += len(text) + 2
        if size >= chunk_bytes:
            yield chunk()
            batch, size = [], 0
    if batch:
        yield chunk()


def _paragraph_safe(texts: list[str]) -> bool:
    """Whether `texts` joined by blank lines split back into exactly these documents: none is blank, none begins
    or ends with a line break, none holds a blank line or a CR."""
    if any(not t.strip() or t[0] in "\r\n" or t[-1] in "\r\n" for t in texts):
        return False
    joined = "\x00".join(texts)
    return "\r" not in joined and _BLANK_LINE.search(joined) is None


def stdin_has_data() -> bool:
    """Whether stdin can be read right now without waiting (a pipe with data in it, or at its end)."""
    try:
        ready, _, _ = select.select([sys.stdin], [], [], 0)
    except (OSError, ValueError, TypeError):  # TypeError: stdin closed (None); reading it then says so
        return True
    return bool(ready)


class _CountingHasher:
    def __init__(self):
        self.hasher, self.nbytes = hashlib.sha256(), 0

    def update(self, data: bytes) -> None:
        self.hasher.update(data)
        self.nbytes += len(data)


def _read_blocks(stream: IO[bytes], chunk_bytes: int, counter: _CountingHasher) -> Iterator[bytes]:
    """Stdin as it arrives: read1 returns what the pipe holds instead of waiting for a full chunk."""
    read1 = getattr(stream, "read1", stream.read)
    first = True
    while True:
        with reading(STDIN):
            block = read1(chunk_bytes)
        if not block:
            break
        if first and b"\x00" in block[:8192]:
            raise DataError("<stdin>: looks like binary data (it holds NUL bytes), not text")
        first = False
        counter.update(block)
        yield block


def spool_stdin(source: Source, directory: Path) -> None:
    """Save stdin to a file in `directory`, so that it can be read twice (tokenizer sample, then encoding)."""
    counter = _CountingHasher()
    path = directory / "stdin.spool"
    with open(path, "wb") as out:
        for block in _read_blocks(open_binary(STDIN), 1 << 20, counter):
            out.write(block)
    source.spool, source.sha256, source.size = path, counter.hasher.hexdigest(), counter.nbytes


def _safe_read(f: IO[bytes], n: int, source: Source) -> bytes:
    with reading(source.name):
        return f.read(n)


def _cut(
    blocks: Iterator[bytes], source: Source, number: int, mode: str, chunk_bytes: int, idle: Callable[[], bool],
    path: str | None = None,
) -> Iterator[Chunk]:
    """Regroup raw blocks into chunks that end at document boundaries.

    `idle()` says that no more input is at hand right now: then the complete documents buffered so far go out at
    once, however few (filter mode on a pipe).
    """
    buf = b""
    line = 1
    cont = False
    offset = 0  # of buf in the source

    def chunk(data: bytes, is_open: bool) -> Chunk:
        if path is not None and mode != "jsonl":
            return Chunk(number, b"", mode, line, cont, is_open, len(data), path, offset)
        return Chunk(number, data, mode, line, cont, is_open, len(data))

    for block in blocks:
        buf = buf + block if buf else block
        while len(buf) >= chunk_bytes or (buf and idle()):
            cut = _last_boundary(buf, mode)
            is_open = False
            if cut <= 0:
                if len(buf) < chunk_bytes or mode == "jsonl":
                    break  # wait for the end of this document (a JSON line must be parsed whole)
                cut, is_open = _piece_cut(buf, chunk_bytes), True
            data, buf = buf[:cut], buf[cut:]
            yield chunk(data, is_open)
            offset += len(data)
            if mode == "jsonl":  # line numbers are only for JSON error messages
                line += data.count(b"\n")
            cont = is_open
            if len(buf) < chunk_bytes:
                break
    if buf or cont:
        yield chunk(buf, False)


def _last_boundary(buf: bytes, mode: str) -> int:
    """Offset just after the last complete document in `buf`, or 0 when it holds none. A CR at the very end is not
    trusted (the LF of a CRLF may follow in the next block); more blank lines after a paragraph break at the end
    are harmless (the next chunk strips them)."""
    end = len(buf)
    if mode == "file":
        return 0
    if mode in ("line", "jsonl"):
        p = buf.rfind(b"\n")
        if p < 0:
            p = buf.rfind(b"\r", 0, end - 1)
        return p + 1
    window = 1 << 16
    while True:
        start = max(0, end - window)
        last = None
        for match in _PARAGRAPH_BREAK.finditer(buf, start):
            if not (match.end() == end and buf.endswith(b"\r")):
                last = match
        if last is not None and (last.start() > start or start == 0):
            return last.end()
        if start == 0:
            return 0
        window *= 4


def _piece_cut(buf: bytes, chunk_bytes: int) -> int:
    """Where to cut a document too big for one chunk: after a line end inside a run of non-blank lines (so that no
    cleaning rule sees a different text on either side), preferably one that follows the end of a sentence (so
    that sentence splitting sees each sentence whole, among the last 256 such line ends: text without sentences,
    such as code, is not searched through), else at a UTF-8 character boundary."""
    limit = min(len(buf), chunk_bytes)
    low = limit // 2
    inside, tried = None, 0  # the last line end inside a run of non-blank lines; how many were looked at
    p = limit
    while tried < 256:
        p = buf.rfind(b"\n", low, p)
        if p < 0:
            break
        before, after = buf[p - 1 : p], buf[p + 1 : p + 2]
        if p > 0 and before not in (b"\n", b"\r") and after and after not in (b"\n", b"\r"):
            if _SENTENCE_END.search(buf, max(0, p - 16), p):
                return p + 1
            inside, tried = inside or p + 1, tried + 1
    if inside:
        return inside
    p = limit
    while p > 1 and (buf[p] & 0xC0) == 0x80:  # inside a multi-byte character
        p -= 1
    if buf[p - 1 : p] == b"\r" and buf[p : p + 1] == b"\n":
        p -= 1
    return p
