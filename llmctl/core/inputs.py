"""Reading what users hand us: files, gzip files, stdin (`-`), JSONL and labeled TSV, with errors naming the file
and line. Shared by every command that reads text.

Every read is bounded: a line, a whole text and a whole file of lines each have a byte limit, so that a device that
never ends (`/dev/zero`), a file that is one giant line or a runaway pipe fails with a message saying how much was
read, instead of growing memory until the machine suffers. Library errors go through `llmctl.core.faults.reading`.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from llmctl.core.faults import reading
from llmctl.errors import DataError

STDIN = "-"
GZIP_MAGIC = b"\x1f\x8b"

MiB = 1 << 20
MAX_LINE_BYTES = 16 * MiB
"""Longest line any line reader accepts (a JSONL document, a labeled example)."""
MAX_PROMPT_BYTES = 1 * MiB
"""Longest prompt `generate` reads: far beyond any model's context (a 128k-token context is about 0.5 MiB of
text), and tokenizing it stays within a few hundred MB."""
MAX_TEXT_BYTES = 8 * MiB
"""Most text `eval` tokenizes in memory (one file, or the documents of a JSONL file together): byte-level
tokenizers need about 200 bytes of memory per token. Larger held-out sets go through `preprocess`, whose shards
eval reads memory-mapped."""
MAX_LINES_BYTES = 64 * MiB
"""Most a whole file of labels or labeled examples may hold."""


def human_bytes(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n:,} bytes"


def display_name(path: str | Path) -> str:
    return "<stdin>" if str(path) == STDIN else str(path)


def input_format(path: str | Path, fmt: str = "auto") -> str:
    """`jsonl` or `txt`: `fmt` (data.format) when it is not `auto`, else by the file name's extension."""
    if fmt != "auto":
        return fmt
    name = Path(path).name.lower()
    return "jsonl" if name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")) else "txt"


def open_binary(path: str | Path) -> IO[bytes]:
    """Open a file, a gzip file (recognised by its first bytes, whatever its name) or stdin, for reading bytes."""
    if str(path) == STDIN:
        if sys.stdin is None:  # started with stdin closed (`<&-`)
            raise DataError("<stdin>: stdin is closed; pass a file, or pipe the input in")
        stream = sys.stdin.buffer
        with reading(STDIN):
            head = stream.peek(2)[:2] if hasattr(stream, "peek") else b""
        return gzip.GzipFile(fileobj=stream) if head == GZIP_MAGIC else stream
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc.strerror or exc}") from None
    with reading(path):
        head = f.peek(2)[:2]
    if head == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=f, mode="rb")
    return f


def read_text(path: str | Path, limit: int = MAX_TEXT_BYTES, advice: str = "") -> str:
    """The whole of a file (or stdin) as text, at most `limit` bytes (more is a DataError saying how much was read,
    then `advice`); invalid UTF-8 is a DataError naming the file and byte offset."""
    with open_binary(path) as f, reading(path):
        data = f.read(limit + 1)
    if len(data) > limit:
        raise DataError(f"{display_name(path)}: larger than {human_bytes(limit)} (stopped after reading "
                        f"{human_bytes(limit)}){'; ' + advice if advice else ''}")
    try:
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        raise DataError(f"{display_name(path)}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def iter_lines(
    path: str | Path, errors: str = "strict", on_error: str = "fail", skipped: list[int] | None = None,
    max_line: int = MAX_LINE_BYTES, max_total: int | None = None,
) -> Iterator[tuple[int, str]]:
    """(line number from 1, line without its newline), streaming. Invalid UTF-8 is a DataError naming the line, or
    with `on_error="skip"` the line is skipped and its number appended to `skipped`. A line longer than `max_line`
    bytes, or more than `max_total` bytes in all, is a DataError (memory stays bounded whatever the input)."""
    name = display_name(path)
    total = 0
    with open_binary(path) as f, reading(path):
        number = 0
        while True:
            raw = f.readline(max_line + 1)
            if not raw:
                return
            number += 1
            total += len(raw)
            if len(raw) > max_line:
                raise DataError(f"{name}:{number}: line longer than {human_bytes(max_line)} (stopped after reading "
                                f"{human_bytes(max_line)} of it without finding its end)")
            if max_total is not None and total > max_total:
                raise DataError(f"{name}: larger than {human_bytes(max_total)} (stopped at line {number}, after "
                                f"reading {human_bytes(total)})")
            try:
                line = raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError:
                if on_error == "skip":
                    if skipped is not None:
                        skipped.append(number)
                    continue
                raise DataError(f"{name}:{number}: not UTF-8 text") from None
            yield number, line.rstrip("\r\n")


def iter_jsonl(
    path: str | Path, on_error: str = "fail", skipped: list[int] | None = None, max_total: int | None = None
) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line. A malformed line raises a DataError naming it, or with
    `on_error="skip"` is skipped and its number appended to `skipped`."""
    for number, line in iter_lines(path, errors="replace", max_total=max_total):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            if on_error == "skip":
                if skipped is not None:
                    skipped.append(number)
                continue
            raise DataError(f"{display_name(path)}:{number}: invalid JSON: {exc.msg}") from None


def parse_json_object(line: str, where: str) -> dict[str, Any]:
    """One JSONL line that must hold an object; otherwise a DataError naming `where` (`file:line`)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, not {type(obj).__name__}")
    return obj


@dataclass(frozen=True)
class Example:
    """One labeled example from a JSONL or TSV file."""

    id: str
    text: str
    label: str
    line: int


def read_labeled(
    path: str | Path, text_field: str = "text", label_field: str = "label", id_field: str = "id"
) -> list[Example]:
    """Labeled examples from JSONL (`{"text": ..., "label": ...}`) or TSV (`text<TAB>label`, an optional header
    line `text<TAB>label` is skipped). The format goes by the first non-blank character: `{` means JSONL. Parquet,
    CSV, saved datasets and `hf:` datasets are read by llmctl.core.records, by their name."""
    name = display_name(path)
    if str(path) != STDIN:
        from llmctl.core.records import read_labeled_records, record_format

        if record_format(str(path)) in ("parquet", "csv", "dataset", "hf"):
            return [Example(*row) for row in read_labeled_records(str(path), text_field, label_field, id_field)]
    lines = [(n, line) for n, line in iter_lines(path, max_total=MAX_LINES_BYTES) if line.strip()]
    if not lines:
        raise DataError(f"{name}: no examples (the file is empty)")
    examples = []
    if lines[0][1].lstrip().startswith("{"):
        for number, line in lines:
            obj = parse_json_object(line, f"{name}:{number}")
            for key in (text_field, label_field):
                if key not in obj:
                    raise DataError(f"{name}:{number}: no {key!r} field")
            if not isinstance(obj[text_field], str):
                raise DataError(f"{name}:{number}: {text_field!r} must be a string")
            label = obj[label_field]
            # A null or boolean label is almost always a data bug; str() would quietly make it the class "None".
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise DataError(f"{name}:{number}: {label_field!r} must be a string or an integer, not {label!r}")
            ident = str(obj.get(id_field, len(examples)))
            examples.append(Example(ident, obj[text_field], str(label), number))
    else:
        for number, line in lines:
            text, tab, label = line.rpartition("\t")
            if not tab:
                raise DataError(f"{name}:{number}: expected text<TAB>label")
            if number == lines[0][0] and (text.strip(), label.strip()) == (text_field, label_field):
                continue  # header
            examples.append(Example(str(len(examples)), text, label.strip(), number))
    if not examples:
        raise DataError(f"{name}: no examples")
    return examples
