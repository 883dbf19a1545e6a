"""Records from the formats data already sits in: JSONL, Parquet, CSV/TSV, a Hugging Face `save_to_disk` directory
and `hf:NAME[:CONFIG][@SPLIT]` hub datasets. One reader for every command (preprocess, classification, SFT, eval,
generate prompts).

`iter_records(spec, fmt, fields)` yields `(where, record)`: `where` is `file:line` (JSONL, CSV) or `file:row N`
(Parquet, datasets), for messages; `record` is a dict. Memory stays bounded at any size: Parquet is read one batch
of rows at a time (within a row group), CSV line by line, datasets as an iterable (streaming, or memory-mapped
Arrow). pyarrow and datasets are optional extras (`pip install 'llmctl[data]'`), imported only when such an input
is named.

A hub dataset resolves as a hub model does (llmctl.core.hub): from the cache when it is there, from the hub when
that can be reached, otherwise it fails at once instead of retrying for half a minute.
"""

from __future__ import annotations

import contextlib
import csv
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.core.files import sha256_file, sha256_json
from llmctl.core.inputs import STDIN, display_name, iter_jsonl, open_binary
from llmctl.errors import DataError, first_line

HF_PREFIX = "hf:"
RECORD_FORMATS = ("jsonl", "parquet", "csv", "tsv", "dataset", "hf")
"""What `record_format` answers for inputs read as records; plain text (`txt`) is not among them."""
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
             ".ndjson": "jsonl"}
_BATCH_ROWS = 1024  # Parquet / Arrow rows per batch: a few MB of text, whatever the file's size
_CSV_FIELD_LIMIT = 64 << 20  # csv's own default (128 KB) is too small for whole documents in a cell
_DATA_EXTRA = "pip install 'llmctl[data]'"


def record_format(spec: str, fmt: str = "auto") -> str:
    """How `spec` is read: one of RECORD_FORMATS, or `txt`. `fmt` (data.format) wins unless it is `auto`; then a
    `hf:` prefix, a `save_to_disk` directory, or the file extension (`.gz` ignored) decides."""
    if fmt not in ("auto", ""):
        return fmt
    if spec.startswith(HF_PREFIX):
        return "hf"
    path = Path(spec)
    if _is_saved_dataset(path):
        return "dataset"
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return _SUFFIXES.get(suffixes[-1], "txt") if suffixes else "txt"


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk` (dataset_dict.json)."""
    base = _split_spec(path)[0]
    return base.is_dir() and ((base / "state.json").is_file() or (base / "dataset_dict.json").is_file())


def _split_spec(path: Path) -> tuple[Path, str | None]:
    """`DIR@SPLIT` picks a split of a saved DatasetDict; a directory whose own name holds `@` still wins."""
    text = str(path)
    if path.exists() or "@" not in text:
        return path, None
    base, _, split = text.rpartition("@")
    return Path(base), split or None


@dataclass(frozen=True)
class HubSpec:
    name: str
    config: str | None
    split: str


def parse_hub_spec(spec: str) -> HubSpec:
    """`hf:NAME[:CONFIG][@SPLIT]`, split `train` by default."""
    rest = spec[len(HF_PREFIX):]
    rest, _, split = rest.partition("@")
    name, _, config = rest.partition(":")
    if not name or name.count("/") > 1:
        raise DataError(f"{spec}: expected hf:NAME[:CONFIG][@SPLIT], for example hf:stanfordnlp/imdb@test")
    return HubSpec(name, config or None, split or "train")


def iter_records(
    spec: str, fmt: str = "auto", fields: Iterable[str] = (), optional: Iterable[str] | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each record of `spec`, in order.

    `fields` are the columns the caller needs: a Parquet file, CSV header or dataset without one of them is a
    DataError that lists the columns it has (before any record is read); a JSONL line without one names its line.
    Parquet reads only those columns and the `optional` ones it has (every column when neither is given).
    `fmt` is data.format (`auto` goes by `record_format`).
    """
    fields = list(fields)
    kind = record_format(spec, fmt)
    if kind == "jsonl":
        yield from _jsonl(spec, fields)
    elif kind == "parquet":
        yield from _parquet(spec, fields, list(optional or []))
    elif kind in ("csv", "tsv"):
        yield from _csv(spec, fields, "\t" if kind == "tsv" else ",")
    elif kind == "dataset":
        yield from _rows(display_name(spec), _open_saved(spec), fields)
    elif kind == "hf":
        yield from _rows(spec, _open_hub(spec)[0], fields)
    else:
        raise DataError(f"{display_name(spec)}: plain text has no fields; use JSONL, Parquet, CSV/TSV or a dataset")


def iter_texts(spec: str, field: str, fmt: str = "auto") -> Iterator[tuple[str, str]]:
    """(where, text) of `field` in each record; a value that is not a string is a DataError naming its record."""
    if record_format(spec, fmt) == "parquet":  # a column at a time: no dict per row (preprocess reads GBs this way)
        name = display_name(spec)
        for first, columns in _parquet_batches(spec, [field], []):
            values = columns[field]
            if not all(type(v) is str for v in values):
                i = next(i for i, v in enumerate(values) if type(v) is not str)
                text_of({field: values[i]}, field, f"{name}:row {first + i}")  # raises, naming the row
            for i, value in enumerate(values):
                yield f"{name}:row {first + i}", value
        return
    for where, record in iter_records(spec, fmt, [field]):
        yield where, text_of(record, field, where)


def text_of(record: dict[str, Any], field: str, where: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        what = "null" if value is None else type(value).__name__
        raise DataError(f"{where}: {field!r} must be a string, not {what}")
    return value


def read_labeled_records(
    spec: str, text_field: str, label_field: str, id_field: str = "id"
) -> list[tuple[str, str, str, int]]:
    """(id, text, label, row) of each record, with the checks read_labeled makes of JSONL: text a string, label a
    string or an integer. `row` counts records from 1 (it stands in for the line in messages)."""
    out = []
    for where, record in iter_records(spec, "auto", [text_field, label_field], optional=[id_field]):
        text = text_of(record, text_field, where)
        label = record[label_field]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"{where}: {label_field!r} must be a string or an integer, not {label!r}")
        out.append((str(record.get(id_field, len(out))), text, str(label), len(out) + 1))
    if not out:
        raise DataError(f"{display_name(spec)}: no examples")
    return out


def provenance(spec: str, fmt: str = "auto") -> dict[str, Any]:
    """What identifies an input for meta.json and run hashes: a file (Parquet, CSV, ...) by its SHA-256 like any
    input, a saved dataset by the SHA-256 of its files, a hub dataset by name, config, split and revision."""
    kind = record_format(spec, fmt)
    if kind == "hf":
        _, revision, size = _open_hub(spec)
        hub = parse_hub_spec(spec)
        ident = {"dataset": hub.name, "config": hub.config, "split": hub.split, "revision": revision}
        return {"path": spec, **ident, "size": size, "sha256": sha256_json(ident)}
    if kind == "dataset":
        base, split = _split_spec(Path(spec))
        files = sorted(p for p in base.rglob("*") if p.is_file())
        digest = sha256_json({str(p.relative_to(base)): sha256_file(p) for p in files} | {"@split": split})
        return {"path": spec, "size": sum(p.stat().st_size for p in files), "sha256": digest}
    path = Path(spec)
    try:
        return {"path": spec, "size": path.stat().st_size, "sha256": sha256_file(path)}
    except FileNotFoundError:
        raise DataError(f"{spec}: no such file") from None
    except OSError as exc:
        raise DataError(f"{spec}: cannot read: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# Readers


def _jsonl(spec: str, fields: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    name = display_name(spec)
    for number, obj in iter_jsonl(spec):
        where = f"{name}:{number}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, not {type(obj).__name__}")
        for key in fields:
            if key not in obj:
                raise DataError(f"{where}: no {key!r} field")
        yield where, obj


def _missing(name: str, fields: list[str], columns: list[str], what: str = "column") -> None:
    absent = [f for f in fields if f not in columns]
    if absent:
        listed = ", ".join(columns) or "none"
        raise DataError(f"{name}: no {what} {absent[0]!r}; it has: {listed} (set data.text_field / data.label_field)")


def _parquet(spec: str, fields: list[str], optional: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    name = display_name(spec)
    for first, columns in _parquet_batches(spec, fields, optional):
        names = list(columns)
        for i, values in enumerate(zip(*columns.values())):
            yield f"{name}:row {first + i}", dict(zip(names, values))


def _parquet_batches(spec: str, fields: list[str], optional: list[str]) -> Iterator[tuple[int, dict[str, list]]]:
    """(number of the batch's first row, column name -> values) for each batch of rows: a row group is read a
    batch at a time, and only the columns asked for (all, when `fields` is empty)."""
    pq = _import("pyarrow.parquet", "Parquet")
    import pyarrow as pa

    name = display_name(spec)
    if spec == STDIN:
        raise DataError("<stdin>: Parquet cannot be read from a pipe; name the file")
    try:
        parquet = pq.ParquetFile(spec, buffer_size=1 << 20, pre_buffer=False)  # stream column chunks, not whole
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{name}: not a readable Parquet file ({first_line(exc)})") from None
    with contextlib.closing(parquet):
        columns = parquet.schema_arrow.names
        _missing(name, fields, columns)
        extra = [c for c in optional if c in columns and c not in fields]
        wanted = fields + extra if fields or extra else None
        row = 1
        try:
            for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=wanted):
                yield row, {n: batch.column(i).to_pylist() for i, n in enumerate(batch.schema.names)}
                row += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{name}: corrupt Parquet data after row {row - 1} ({first_line(exc)})") from None


def parquet_row_groups(spec: str, field: str) -> list[tuple[int, int]]:
    """(rows, uncompressed bytes) of each row group of a Parquet file whose `field` column holds strings, for
    readers that take row groups apart (preprocess workers); a DataError as `iter_texts` would raise one."""
    pq = _import("pyarrow.parquet", "Parquet")
    import pyarrow as pa

    name = display_name(spec)
    try:
        meta = pq.ParquetFile(spec).metadata
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{name}: not a readable Parquet file ({first_line(exc)})") from None
    schema = meta.schema.to_arrow_schema()
    _missing(name, [field], schema.names)
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{name}: column {field!r} holds {kind}, not text")
    return [(meta.row_group(i).num_rows, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]


def parquet_texts(spec: str, groups: range, field: str, first_row: int) -> list[str]:
    """The `field` values of row groups `groups` (rows numbered from `first_row` in messages)."""
    pq = _import("pyarrow.parquet", "Parquet")
    import pyarrow as pa

    name = display_name(spec)
    try:
        with contextlib.closing(pq.ParquetFile(spec)) as parquet:
            column = parquet.read_row_groups(list(groups), columns=[field]).column(0)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{name}: corrupt Parquet data in rows from {first_row} ({first_line(exc)})") from None
    if column.null_count:
        row = next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
        raise DataError(f"{name}:row {first_row + row}: {field!r} must be a string, not null")
    return column.to_pylist()


def _csv(spec: str, fields: list[str], delimiter: str) -> Iterator[tuple[str, dict[str, Any]]]:
    name = display_name(spec)
    csv.field_size_limit(min(_CSV_FIELD_LIMIT, sys.maxsize))
    with open_binary(spec) as raw:
        reader = csv.reader(_decoded_lines(raw, name), delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{name}: empty file (a CSV/TSV input needs a header line naming its columns)")
            header = [h.strip() for h in header]
            _missing(name, fields, header)
            for row in reader:
                if not row:
                    continue  # a blank line
                if len(row) != len(header):
                    raise DataError(
                        f"{name}:{reader.line_num}: {len(row)} fields, but the header has {len(header)} "
                        f"({', '.join(header)})"
                    )
                yield f"{name}:{reader.line_num}", dict(zip(header, row))
        except csv.Error as exc:
            raise DataError(f"{name}:{reader.line_num}: malformed CSV ({exc})") from None


def _decoded_lines(raw: Any, name: str) -> Iterator[str]:
    """Lines decoded one at a time (line ends kept, as csv wants), so that invalid UTF-8 names its line."""
    for number, line in enumerate(raw, start=1):
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{name}:{number}: not UTF-8 text") from None


def _rows(name: str, dataset: Any, fields: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    columns = list(dataset.column_names or [])
    if columns:
        _missing(name, fields, columns)
    for row, record in enumerate(_iterate(name, dataset), start=1):
        where = f"{name}:row {row}"
        for key in fields:
            if key not in record:
                raise DataError(f"{where}: no {key!r} field")
        yield where, record


def _iterate(name: str, dataset: Any) -> Iterator[dict[str, Any]]:
    try:
        yield from dataset
    except (OSError, ValueError) as exc:
        raise DataError(f"{name}: cannot read the dataset ({first_line(exc)})") from None


def _open_saved(spec: str) -> Any:
    datasets = _import_datasets()
    base, split = _split_spec(Path(spec))
    try:
        loaded = datasets.load_from_disk(str(base))
    except (OSError, ValueError) as exc:
        raise DataError(f"{base}: not a readable saved dataset ({first_line(exc)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        chosen = split or ("train" if "train" in loaded else splits[0] if len(splits) == 1 else None)
        if chosen not in loaded:
            raise DataError(f"{spec}: pick a split with {base}@SPLIT; it has: {', '.join(splits)}")
        loaded = loaded[chosen]
    elif split is not None:
        raise DataError(f"{spec}: {base} holds one dataset, not splits; drop @{split}")
    return loaded


def _open_hub(spec: str) -> tuple[Any, str | None, int | None]:
    """A streaming dataset for `hf:NAME[:CONFIG][@SPLIT]`, the revision it comes from (the commit for a hub
    dataset, the cache's hash for one read from the cache) and its size in bytes when the dataset says."""
    from llmctl.core.hub import hub_offline

    hub = parse_hub_spec(spec)
    datasets = _import_datasets()
    if hub_offline():
        datasets.config.HF_HUB_OFFLINE = True  # no retries: the cache answers, or the error comes at once
    try:
        builder = datasets.load_dataset_builder(hub.name, hub.config)
        dataset = builder.as_streaming_dataset(split=hub.split)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        reach = "not in the Hugging Face datasets cache, and the hub cannot be reached (or HF_HUB_OFFLINE is set)"
        raise DataError(
            f"{spec}: dataset {hub.name!r} is {reach}; load it once with network access, or pass a local file "
            f"(Parquet, CSV, JSONL) or a save_to_disk directory ({first_line(exc)})"
        ) from None
    except ValueError as exc:  # a split or config the dataset does not have
        raise DataError(f"{spec}: {first_line(exc)}") from None
    split = (builder.info.splits or {}).get(hub.split)
    return dataset, getattr(builder, "hash", None), getattr(split, "num_bytes", None) or None


def _import_datasets() -> Any:
    datasets = _import("datasets", "Hugging Face datasets")
    datasets.utils.logging.set_verbosity_error()  # its notes on cache hits go to stderr as warnings
    datasets.disable_progress_bars()
    return datasets


def _import(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading {what} needs the `data` extra: {_DATA_EXTRA}") from None
