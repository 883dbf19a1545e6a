"""`prepare(cfg)`: raw text in, a prepared-data directory out (see llmctl.core.shards for its layout); and
`filter_text(cfg)`: the same cleaning as a streaming text filter.

    inputs -> chunks (main process) -> clean + encode (worker processes) -> writer (main process) -> shards

The tokenizer is settled before encoding: the byte vocabulary needs nothing, a pretrained one is loaded, a BPE is
trained on a sample of chunks spread over the corpus (stdin is spooled to a temporary file so it can be read twice).
Everything is written into a temporary directory beside `data.dir` that replaces it only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmctl.core.faults import writing
from llmctl.core.files import atomic_dir, atomic_write_text, sha256_file, sha256_json, temporary_dir
from llmctl.core.prepare.clean import Cleaner, nlp_enabled, punkt_parameters, stopword_list
from llmctl.core.prepare.pipeline import WorkerSpec, chunk_runner, worker_count
from llmctl.core.prepare.sources import (
    Chunk,
    ReadStats,
    Source,
    expand_inputs,
    hash_sources,
    read_chunks,
    spool_stdin,
    stdin_has_data,
)
from llmctl.core.prepare.writer import DocumentRules, ShardWriter, TextWriter
from llmctl.core.shards import META, SPLITS, ShardMeta, read_meta
from llmctl.core.tokenizer import to_transformers
from llmctl.errors import ConfigError, DataError, ModelError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from llmctl.config import Config

log = logging.getLogger(__name__)

# Keys of the data section that do not change what gets written (where it goes, how fast, the filter output).
_NOT_SHAPING = {"dir", "inputs", "workers", "text_format", "label_field"}


def config_sha256(cfg: Config) -> str:
    """SHA-256 of every setting that shapes the prepared data: data (but where and how fast), clean, tokenizer,
    and the seed when it draws the validation documents."""
    shaping = {
        "data": {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in _NOT_SHAPING},
        "clean": dataclasses.asdict(cfg.clean),
        "tokenizer": dataclasses.asdict(cfg.tokenizer),
    }
    if cfg.data.split == "documents":
        shaping["seed"] = cfg.run.seed
    if cfg.tokenizer.pretrained:
        shaping["pretrained_files"] = _tokenizer_files_sha256(cfg.tokenizer.pretrained)
    return sha256_json(shaping)


_TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges*", "special_tokens_map.json", "added_tokens.json", "*.model",
                    "*.tiktoken")


def _tokenizer_files_sha256(name: str) -> dict[str, str]:
    """SHA-256 of each tokenizer file of a local pretrained tokenizer directory, so that a tokenizer replaced at the
    same path rebuilds the data; empty for a hub id (its name stands for it)."""
    directory = Path(name).expanduser()  # as hub.locate reads it
    if not directory.is_dir():
        return {}
    files = {path for pattern in _TOKENIZER_FILES for path in directory.glob(pattern) if path.is_file()}
    return {path.name: sha256_file(path) for path in sorted(files)}


# ---------------------------------------------------------------------------------------------------------------
# prepare


def prepare(cfg: Config, *, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Build `cfg.data.dir` from `cfg.data.inputs` unless it is already up to date; return the summary.

    Up to date means: the directory holds complete shards made from inputs with the same SHA-256 and the same
    shaping config (stdin is never up to date). `summary["skipped"]` tells whether anything was done.
    """
    data_dir = Path(cfg.data.dir)
    _check_output_dir(data_dir)
    sources = expand_inputs(cfg.data.inputs, cfg.data.glob, cfg.data.format, cfg.data.text_field)
    config_hash = config_sha256(cfg)
    if not force and not any(s.kind == "stdin" for s in sources) and (data_dir / META).exists():
        hash_sources(sources)
        reason = stale_reason(data_dir, sources, config_hash)
        if reason is None:
            log.info("%s is up to date (same inputs and config); nothing to do (--force rebuilds it)", data_dir)
            summary = _summary(data_dir, read_meta(data_dir), seconds=0.0, input_bytes=0)
            summary["skipped"] = True
            return summary
        log.debug("rebuilding %s: %s", data_dir, reason)
    started = time.perf_counter()
    kept = "; the prepared data there before is unchanged" if (data_dir / META).exists() else ""
    with writing(data_dir, what="data.dir: cannot write", hint=kept):
        with atomic_dir(data_dir) as tmp, temporary_dir(tmp.parent, "llmctl-spool") as spool:
            meta, input_bytes = _build(cfg, sources, config_hash, tmp, spool, quiet)
    seconds = time.perf_counter() - started
    summary = _summary(data_dir, meta, seconds, input_bytes)
    log.info(_summary_line(summary))
    return summary


def _check_output_dir(data_dir: Path) -> None:
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"data.dir: {data_dir} is a file, not a directory")
    if data_dir.is_dir() and any(data_dir.iterdir()) and not (data_dir / META).exists():
        # The whole directory is replaced: never do that to one that holds something else.
        raise DataError(
            f"data.dir: {data_dir} already holds files but no prepared data ({META}); choose a new or empty directory"
        )
    for parent in data_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"data.dir: {parent} is a file, not a directory")
            break


def stale_reason(data_dir: Path, sources: list[Source], config_hash: str) -> str | None:
    """Why `data_dir` must be rebuilt, or None when it is up to date. Sources must be hashed."""
    try:
        meta = read_meta(data_dir)
    except DataError as exc:
        return str(exc)
    if meta.config_sha256 != config_hash:
        return "the config changed"
    if [(i.get("path"), i.get("sha256")) for i in meta.inputs] != [(s.name, s.sha256) for s in sources]:
        return "the inputs changed"
    tokenizer_json = data_dir / "tokenizer.json"
    if not tokenizer_json.exists() or sha256_file(tokenizer_json) != meta.tokenizer_sha256:
        return "the tokenizer changed"
    itemsize = np.dtype(meta.dtype).itemsize
    for split in SPLITS:
        path = data_dir / f"{split}.bin"
        if not path.exists() or path.stat().st_size != meta.tokens.get(split, 0) * itemsize:
            return f"{split}.bin is missing or incomplete"
    return None


@dataclasses.dataclass
class _Tokenizer:
    kind: str
    """`bytes`, `bpe` or `pretrained`."""
    tokenizer: Tokenizer
    hf: Any
    """The transformers tokenizer that gets saved (made at the end when None)."""
    eos_id: int
    vocab_size: int
    name: str


def _build(cfg: Config, sources: list[Source], config_hash: str, out: Path, spool: Path,
           quiet: bool) -> tuple[ShardMeta, int]:
    dc, tc = cfg.data, cfg.tokenizer
    workers = worker_count(dc.workers)
    kind = "pretrained" if tc.pretrained else "bytes" if tc.vocab_size == 256 else "bpe"
    if kind == "bpe":
        for source in sources:
            if source.kind == "stdin":
                spool_stdin(source, spool)  # read twice: sample for the tokenizer, then everything
    chunks = read_chunks(sources, dc.documents, dc.chunk_bytes, stats=(stats := ReadStats()))
    chunks, punkt, notes = _nlp_setup(cfg, chunks)
    workers = _fit_workers(workers, sources, dc.chunk_bytes)
    tok = _settle_tokenizer(cfg, kind, sources, punkt, workers, quiet)
    if kind == "bpe":  # the sample pass consumed the first iterator
        chunks = read_chunks(sources, dc.documents, dc.chunk_bytes, stats=(stats := ReadStats()))
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    spec = WorkerSpec(
        cfg.clean, dc, [s.name for s in sources], "encode", punkt,
        encoder="bytes" if kind == "bytes" else "tokenizer",
        tokenizer_json=None if kind == "bytes" else tok.tokenizer.to_str(),
        dtype=dtype, dedup=cfg.clean.dedup, eos_id=tok.eos_id,
        layout=dc.split == "tail" and not cfg.clean.dedup and cfg.clean.min_chars <= 1 and not cfg.clean.max_chars,
    )
    rules = DocumentRules(cfg.clean.dedup, cfg.clean.min_chars, cfg.clean.max_chars)
    writer = ShardWriter(out, dtype, tok.eos_id, dc.split, dc.val_fraction, cfg.run.seed, rules)
    counters: Counter = Counter()
    total = _known_size(sources)
    with chunk_runner(spec, workers) as run, _progress("preparing", total, quiet) as progress:
        # Importing transformers (to save the tokenizer) takes ~0.5 s: do it now, beside the workers, not after.
        warm = threading.Thread(target=_import_transformers, daemon=True)
        warm.start()
        for _, result in run(chunks):
            writer.add(result)
            counters.update(result.counters)
            progress(result.nbytes, sum(writer.docs.values()), sum(writer.tokens.values()))
    hash_sources(sources)  # those not hashed while they were read (gzip files)
    splits = writer.finish(_byte_table(tok))
    docs_total = sum(splits["documents"].values())
    stats = _stage_stats(counters, rules, stats, notes)
    if splits["tokens"]["train"] == 0 or docs_total == 0:
        raise DataError(f"no documents left after cleaning ({_drop_note(stats)}); check the inputs and clean settings")
    if dc.val_fraction > 0 and splits["tokens"]["val"] == 0:
        raise DataError(
            f"the validation split is empty: {splits['tokens']['train']} tokens in {docs_total} document(s) are too "
            f"few for data.val_fraction {dc.val_fraction} with split: {dc.split}"
        )
    warm.join()
    hf = tok.hf or to_transformers(tok.tokenizer, cfg.tokenizer.eos_token)
    hf.save_pretrained(out)
    cfg.save(out / "config.yaml")
    meta = ShardMeta(
        dtype=dtype,
        vocab_size=tok.vocab_size,
        eos_token_id=tok.eos_id,
        tokens=splits["tokens"],
        documents=splits["documents"],
        bytes=splits["bytes"],
        inputs=[s.record() for s in sources],
        tokenizer_sha256=sha256_file(out / "tokenizer.json"),
        config_sha256=config_hash,
        stats=stats,
        tokenizer=tok.name,
        split=dc.split,
        val_fraction=dc.val_fraction,
    )
    atomic_write_text(out / META, json.dumps(dataclasses.asdict(meta), indent=2) + "\n")
    return meta, stats["input_bytes"]


def _import_transformers() -> None:
    from transformers import PreTrainedTokenizerFast  # noqa: F401


def _fit_workers(workers: int, sources: list[Source], chunk_bytes: int) -> int:
    """No process pool for input that fits in a chunk or two: starting workers would cost more than it saves."""
    size = _known_size(sources)
    if size is not None and size <= 2 * chunk_bytes:
        return 1
    return workers


def _known_size(sources: list[Source]) -> int | None:
    if any(s.size is None or s.kind == "stdin" and s.spool is None for s in sources):
        return None
    return sum(s.size for s in sources)


def _nlp_setup(cfg: Config, chunks: Iterator[Chunk]) -> tuple[Iterator[Chunk], Any, dict[str, Any]]:
    """Punkt parameters (from NLTK data, or trained on the first chunks, which are then put back in front of the
    stream) and notes for meta.json on where the NLTK resources came from."""
    clean = cfg.clean
    notes: dict[str, Any] = {}
    if clean.stopwords:
        notes["stopwords"] = stopword_list()[1]
    if clean.stem != "none":
        notes["stemmer"] = clean.stem
    if not clean.sentences:
        return chunks, None, notes
    head: list[Chunk] = []
    size = 0
    for chunk in chunks:
        head.append(chunk)
        size += chunk.nbytes
        if size >= clean.punkt_sample_bytes:
            break
    cleaner = Cleaner(clean, cfg.data)
    counters: Counter = Counter()
    sample = "\n\n".join(
        t for c in head for t in cleaner.documents(c.load(), c.mode, c.cont, c.open, c.line, "", counters).texts
    )[: clean.punkt_sample_bytes]
    params, origin = punkt_parameters(sample)
    notes["punkt"] = origin
    log.debug("sentence splitting: Punkt %s", origin)
    return chain(head, chunks), params, notes


def _settle_tokenizer(cfg: Config, kind: str, sources: list[Source], punkt: Any, workers: int,
                      quiet: bool) -> _Tokenizer:
    from llmctl.core.tokenizer import byte_tokenizer, train_bpe

    tc = cfg.tokenizer
    if kind == "bytes":
        tokenizer = byte_tokenizer([tc.eos_token])
        return _Tokenizer("bytes", tokenizer, None, 256, 257, "bytes")
    if kind == "pretrained":
        return _pretrained(tc.pretrained, cfg.run.trust_remote_code)
    if tc.vocab_size < 257:
        raise ConfigError(f"tokenizer.vocab_size: {tc.vocab_size} leaves no room for the end-of-text token; use 256 "
                          "(plain bytes) or at least 257")
    texts = _sample_texts(cfg, sources, punkt, workers, quiet)
    started = time.perf_counter()
    tokenizer = train_bpe(texts, tc.vocab_size, tc.min_frequency, [tc.eos_token])
    log.debug("trained a %d-token BPE in %.1f s", tokenizer.get_vocab_size(), time.perf_counter() - started)
    eos_id = tokenizer.token_to_id(tc.eos_token)
    return _Tokenizer("bpe", tokenizer, None, eos_id, tokenizer.get_vocab_size(), "bpe")


def _sample_texts(cfg: Config, sources: list[Source], punkt: Any, workers: int, quiet: bool) -> Iterator[str]:
    """Cleaned documents from about `tokenizer.sample_bytes` of input: every k-th chunk, spread over the corpus."""
    dc = cfg.data
    total = _known_size(sources) or 0
    every = max(1, math.ceil(total / cfg.tokenizer.sample_bytes))
    spec = WorkerSpec(cfg.clean, dc, [s.name for s in sources], "sample", punkt)
    chunks = read_chunks(sources, dc.documents, dc.chunk_bytes, only=lambda i: i % every == 0)
    with chunk_runner(spec, workers) as run, _progress("tokenizer sample", total, quiet) as progress:
        n = 0
        for chunk, result in run(chunks):
            n += 1
            progress(chunk.nbytes * every, n, 0)
            yield from result.texts


def _pretrained(name: str, trust_remote_code: bool) -> _Tokenizer:
    from llmctl.core.model import load_tokenizer

    hf = load_tokenizer(name, trust_remote_code=trust_remote_code)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"tokenizer.pretrained: {name} has no fast (Rust) tokenizer, which preprocess needs")
    if hf.eos_token_id is None:
        raise ModelError(f"tokenizer.pretrained: {name}'s tokenizer has no end-of-text token to separate documents")
    if hf.pad_token is None:
        hf.pad_token = hf.eos_token
    return _Tokenizer("pretrained", backend, hf, hf.eos_token_id, len(hf), str(name))


def _byte_table(tok: _Tokenizer) -> np.ndarray:
    """UTF-8 bytes each id stands for (0 for special tokens): to count the bytes of a split from its ids."""
    table = np.zeros(max(tok.vocab_size, tok.tokenizer.get_vocab_size(with_added_tokens=True)), dtype=np.int64)
    if tok.kind == "bytes":
        table[:256] = 1
        return table
    special = {t.content for t in tok.tokenizer.get_added_tokens_decoder().values() if t.special}
    spec = json.loads(tok.tokenizer.to_str())
    byte_level = (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel"
    for token, i in tok.tokenizer.get_vocab(with_added_tokens=True).items():
        if token in special or i >= len(table):
            continue
        # Byte-level tokens are spelled with one character per byte; others (approximately) by their decoded text.
        table[i] = len(token) if byte_level else len(tok.tokenizer.decode([i]).encode("utf-8"))
    return table


def _stage_stats(counters: Counter, rules: DocumentRules, read: ReadStats, notes: dict) -> dict[str, Any]:
    stats: dict[str, Any] = {"input_bytes": read.bytes, "inputs": read.sources}
    for key, value in counters.items():
        stats[key] = stats.get(key, 0) + value
    for key, value in rules.counters.items():
        if value:
            stats[key] = stats.get(key, 0) + value
    stats.update(notes)
    return stats


def _drop_note(stats: dict[str, Any]) -> str:
    dropped = [f"{stats[k]} {k.replace('_', ' ')}" for k in
               ("empty", "too_short", "too_long", "duplicates", "invalid_utf8_docs", "empty_after_nlp") if stats.get(k)]
    read = f"{stats.get('documents_read', 0)} read"
    return read + (", dropped: " + ", ".join(dropped) if dropped else "")


def _summary(data_dir: Path, meta: ShardMeta, seconds: float, input_bytes: int) -> dict[str, Any]:
    tokens = sum(meta.tokens.values())
    return {
        "data_dir": str(data_dir),
        "skipped": False,
        "tokenizer": meta.tokenizer,
        "vocab_size": meta.vocab_size,
        "eos_token_id": meta.eos_token_id,
        "dtype": meta.dtype,
        "tokens": meta.tokens,
        "documents": meta.documents,
        "bytes": meta.bytes,
        "input_bytes": input_bytes,
        "seconds": round(seconds, 3),
        "mb_per_s": round(input_bytes / seconds / 1e6, 2) if seconds else None,
        "tokens_per_s": round(tokens / seconds) if seconds else None,
        "stats": meta.stats,
    }


def _summary_line(s: dict[str, Any]) -> str:
    docs = sum(s["documents"].values())
    line = (
        f"prepared {s['data_dir']}: {s['input_bytes'] / 1e6:,.1f} MB in {s['seconds']:.1f} s "
        f"({s['mb_per_s'] or 0:,.1f} MB/s), {s['tokens']['train']:,} train + {s['tokens']['val']:,} val tokens, "
        f"{docs:,} documents, {s['tokenizer']} vocabulary of {s['vocab_size']:,}"
    )
    note = _drop_note(s["stats"])
    return line + (f" ({note.split(', ', 1)[1]})" if ", dropped" in note else "")


class _Progress:
    def __init__(self, description: str, total: int | None, quiet: bool):
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        from llmctl.core.console import make_progress

        self.progress = make_progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[docs]:,} docs"),
            TextColumn("{task.fields[tokens]:,} tokens"),
            TimeElapsedColumn(),
            quiet=quiet,
            transient=True,
        )
        self.task = self.progress.add_task(description, total=total, docs=0, tokens=0)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def __call__(self, nbytes: int, docs: int, tokens: int) -> None:
        self.progress.update(self.task, advance=nbytes, docs=docs, tokens=tokens)


def _progress(description: str, total: int | None, quiet: bool) -> _Progress:
    return _Progress(description, total, quiet)


# ---------------------------------------------------------------------------------------------------------------
# filter mode


def filter_text(cfg: Config, *, quiet: bool = False) -> Iterator[str]:
    """Clean the inputs (stdin by default) and yield the text as it is ready: the first documents come out while
    the input is still arriving, and memory stays flat. Tokenizer settings are ignored: this writes text."""
    dc = cfg.data
    sources = expand_inputs(dc.inputs, dc.glob, dc.format, dc.text_field)
    streaming = any(s.kind == "stdin" for s in sources)
    chunks = read_chunks(sources, dc.documents, dc.chunk_bytes, streaming=streaming, stats=(read := ReadStats()))
    chunks, punkt, notes = _nlp_setup(cfg, chunks)
    workers = worker_count(dc.workers)
    if not nlp_enabled(cfg.clean) and not streaming:
        workers = _fit_workers(workers, sources, dc.chunk_bytes)
    elif streaming and not nlp_enabled(cfg.clean):
        workers = 1  # plain cleaning outruns a pipe; one process answers fastest
    spec = WorkerSpec(cfg.clean, dc, [s.name for s in sources], "text", punkt, dedup=cfg.clean.dedup)
    rules = DocumentRules(cfg.clean.dedup, cfg.clean.min_chars, cfg.clean.max_chars)
    writer = TextWriter(dc.text_format, dc.text_field, rules)
    counters: Counter = Counter()
    idle = _stdin_idle if streaming else (lambda: False)
    started = time.perf_counter()
    with chunk_runner(spec, workers) as run:
        for _, result in run(chunks, idle):
            counters.update(result.counters)
            text = writer.add(result)
            if text:
                yield text
    seconds = time.perf_counter() - started
    stats = _stage_stats(counters, rules, read, notes)
    if writer.documents == 0:
        raise DataError(f"no documents left after cleaning ({_drop_note(stats)}); check the inputs and clean settings")
    log.info(
        "filtered %s documents, %.1f MB in %.1f s (%.1f MB/s)%s", f"{writer.documents:,}", read.bytes / 1e6, seconds,
        read.bytes / 1e6 / seconds if seconds else 0,
        f" ({_drop_note(stats).split(', ', 1)[1]})" if ", dropped" in _drop_note(stats) else "",
    )


def _stdin_idle() -> bool:
    return not stdin_has_data()
