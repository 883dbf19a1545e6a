"""Reading what users hand us: files, gzip files, stdin (`-`), JSONL and labeled TSV, with errors naming the file
and line. Shared by every command that reads text."""

from __future__ import annotations

import gzip
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from llmctl.errors import DataError

STDIN = "-"
GZIP_MAGIC = b"\x1f\x8b"


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
        stream = sys.stdin.buffer
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
    if f.peek(2)[:2] == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=f, mode="rb")
    return f


def read_text(path: str | Path) -> str:
    """The whole of a file (or stdin) as text; invalid UTF-8 is a DataError naming the file and byte offset."""
    with open_binary(path) as f:
        data = _read_all(f, path)
    try:
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        raise DataError(f"{display_name(path)}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def _read_all(f: IO[bytes], path: str | Path) -> bytes:
    try:
        return f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{display_name(path)}: cannot read: {exc}") from None


def iter_lines(
    path: str | Path, errors: str = "strict", on_error: str = "fail", skipped: list[int] | None = None
) -> Iterator[tuple[int, str]]:
    """(line number from 1, line without its newline), streaming. Invalid UTF-8 is a DataError naming the line, or
    with `on_error="skip"` the line is skipped and its number appended to `skipped`."""
    with open_binary(path) as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError:
                if on_error == "skip":
                    if skipped is not None:
                        skipped.append(number)
                    continue
                raise DataError(f"{display_name(path)}:{number}: not UTF-8 text") from None
            yield number, line.rstrip("\r\n")


def iter_jsonl(path: str | Path, on_error: str = "fail", skipped: list[int] | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line. A malformed line raises a DataError naming it, or with
    `on_error="skip"` is skipped and its number appended to `skipped`."""
    for number, line in iter_lines(path, errors="replace"):
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
    lines = [(n, line) for n, line in iter_lines(path) if line.strip()]
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
