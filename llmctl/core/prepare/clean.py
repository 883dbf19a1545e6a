"""The cleaning stages, in their fixed order.

    1. decode        UTF-8; invalid bytes become U+FFFD or drop their document (data.encoding_errors); CRLF/CR -> LF
    2. normalize     Unicode NFKC
    3. cleanup       drop control characters (and BOMs), strip trailing spaces, squeeze runs of blank lines
    4. lowercase
    5. documents     split into documents (data.documents: file | paragraph | line; JSONL: one per record);
                     empty documents are dropped
    6. length        min_chars / max_chars
    7. dedup         exact duplicates (decided by the writer, which sees every document)
    8. sentences     NLTK Punkt, one sentence per line
    9. words         NLTK word tokenizer, words joined by single spaces (line by line)
   10. stopwords     English stop words removed
   11. stem          Porter or Snowball

Stages 2-4 run on whole chunks of text at once (they never cross a line end, so this equals running them per
document) and skip work they can prove unnecessary: ASCII text is already NFKC, a chunk without " \\n" has no
trailing spaces. Stages 8-11 are pure-Python NLTK and run per document.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from llmctl.core.inputs import parse_json_object
from llmctl.errors import DataError

if TYPE_CHECKING:
    from llmctl.config import CleanConfig, DataConfig

log = logging.getLogger(__name__)

# C0 controls but tab and newline, DEL, C1 controls, and the byte-order mark (often left at the start of a file).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
_TRAILING = re.compile(r"[^\S\n]+(?=\n)")
_TRAILING_AT_END = re.compile(r"[^\S\n]+(?=\n|\Z)")
_BLANK_RUN = re.compile(r"\n\n\n+")  # (not \n{3,}: a literal prefix lets the regex engine skip ahead, 6x faster)
# The ASCII control characters _CONTROL removes, as bytes (CR is kept: it becomes LF at decoding).
_CONTROL_BYTES = bytes([*range(0, 9), 11, 12, *range(14, 32), 127])
_PARAGRAPH_BREAK = re.compile(r"\n(?:[^\S\n]*\n)+")
_LINE_BREAKS = re.compile(r"\n+")
_SURROGATE = re.compile("[\udc80-\udcff]")


@dataclass
class Doc:
    """The documents of one chunk after cleaning, and which of them are pieces of a document that spans chunks."""

    texts: list[str]
    head_piece: bool = False
    """texts[0] continues a document from the previous chunk."""
    tail_piece: bool = False
    """texts[-1] continues in the next chunk."""


class Cleaner:
    """Stages 1-6 and 8-11 for one chunk of raw bytes. Built once per worker process."""

    def __init__(self, clean: CleanConfig, data: DataConfig, punkt_params: Any = None):
        self.clean = clean
        self.data = data
        self.nlp = NlpStages(clean, punkt_params) if nlp_enabled(clean) else None

    # -- stages 1-4: whole-text --------------------------------------------------------------------------------

    def decode(self, raw: bytes, counters: Counter) -> str:
        if self.clean.cleanup and raw.isascii():
            # Control characters go here, on bytes, 4x faster than the regex on text (clean_text then finds none).
            before = len(raw)
            raw = raw.translate(None, _CONTROL_BYTES)
            if len(raw) != before:
                counters["control_chars"] += before - len(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", "surrogateescape")
            bad = len(_SURROGATE.findall(text))
            counters["invalid_utf8_bytes"] += bad
            if self.data.encoding_errors == "replace":
                text = _SURROGATE.sub("\ufffd", text)
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        return text

    def clean_text(self, text: str, counters: Counter, at_end: bool = True) -> str:
        """Stages 2-4 on any stretch of whole lines (a chunk, or one JSONL document)."""
        clean = self.clean
        ascii_only = text.isascii()
        if clean.normalize and not ascii_only:
            text = unicodedata.normalize("NFKC", text)
        if clean.cleanup:
            if not ascii_only and _CONTROL.search(text):
                before = len(text)
                text = _CONTROL.sub("", text)
                counters["control_chars"] += before - len(text)
            text = _strip_trailing(text, ascii_only, at_end)
            if "\n\n\n" in text:
                text = _BLANK_RUN.sub("\n\n", text)
        if clean.lowercase:
            text = text.lower()
        return text

    # -- stage 5: documents ------------------------------------------------------------------------------------

    def documents(self, raw: bytes, mode: str, cont: bool, is_open: bool, line: int, source: str,
                  counters: Counter) -> Doc:
        """Raw bytes of one chunk -> cleaned documents (stages 1-6)."""
        text = self.decode(raw, counters)
        if mode == "jsonl":
            texts = [self.clean_text(t, counters) for t in self._jsonl(text, line, source, counters)]
            doc = Doc(texts)
        else:
            text = self.clean_text(text, counters, at_end=not is_open)
            if mode == "file":
                texts = [text]
            elif mode == "line":
                texts = text.split("\n")
            else:
                texts = _paragraphs(text, cont, is_open)
            doc = Doc(texts, head_piece=cont, tail_piece=is_open)
        if self.data.encoding_errors == "skip" and counters["invalid_utf8_bytes"]:
            self._drop(doc, lambda t: _SURROGATE.search(t) is not None, "invalid_utf8_docs", counters)
        counters["documents_read"] += len(doc.texts) - doc.head_piece
        self._drop(doc, lambda t: not t, "empty", counters)
        self._length_filter(doc, counters)
        return doc

    def joined_documents(self, raw: bytes, mode: str, cont: bool, is_open: bool, counters: Counter) -> str | None:
        """Stages 1-5 for the common case, without a Python string per document: the cleaned chunk with its
        documents joined by NUL. None when a stage needs the documents one by one (JSONL, length limits, NLP,
        skipping invalid UTF-8) or the text holds NULs itself; then use `documents`."""
        if mode == "jsonl" or self.clean.min_chars > 1 or self.clean.max_chars or self.nlp is not None:
            return None
        text = self.decode(raw, counters)
        if "\x00" in text or (self.data.encoding_errors == "skip" and counters["invalid_utf8_bytes"]):
            return None
        text = self.clean_text(text, counters, at_end=not is_open)
        if mode == "file":
            n = 1
        else:
            # Blank lines (paragraph mode) or line ends (line mode) at the chunk's edges separate nothing here
            # (a piece of a spanning document keeps its edge: it is glued to the next piece).
            head = text if cont else text.lstrip("\n")
            body = head if is_open else head.rstrip("\n")
            lines = body.count("\n") + 1 if mode == "line" else 0
            if self.clean.cleanup:
                # Blank lines are empty and never more than one in a row now: plain replaces suffice.
                text = body.replace("\n\n", "\x00") if mode == "paragraph" else \
                    body.replace("\n\n", "\n").replace("\n", "\x00")
            else:
                text = (_PARAGRAPH_BREAK if mode == "paragraph" else _LINE_BREAKS).sub("\x00", body)
            n = text.count("\x00") + 1
            if mode == "line":
                counters["empty"] += lines - n
        if not text and not (cont or is_open):
            counters["empty"] += 1
            return ""
        counters["documents_read"] += n - cont
        return text

    def _jsonl(self, text: str, line: int, source: str, counters: Counter) -> list[str]:
        field = self.data.text_field
        out = []
        for number, row in enumerate(text.split("\n"), start=line):
            if not row.strip():
                continue
            obj = parse_json_object(row, f"{source}:{number}")
            if field not in obj:
                raise DataError(f"{source}:{number}: no {field!r} field (data.text_field)")
            value = obj[field]
            if not isinstance(value, str):
                raise DataError(f"{source}:{number}: {field!r} must be a string, not {type(value).__name__}")
            out.append(value.replace("\r\n", "\n").replace("\r", "\n") if "\r" in value else value)
        return out

    def _length_filter(self, doc: Doc, counters: Counter) -> None:
        low, high = self.clean.min_chars, self.clean.max_chars
        if low > 1:
            self._drop(doc, lambda t: len(t) < low, "too_short", counters)
        if high:
            self._drop(doc, lambda t: len(t) > high, "too_long", counters)

    @staticmethod
    def _drop(doc: Doc, bad: Callable[[str], bool], counter: str, counters: Counter) -> None:
        """Remove the documents `bad` picks, never a piece (the writer judges a spanning document when it ends)."""
        texts = doc.texts
        n = len(texts)
        keep = [t for i, t in enumerate(texts) if (i == 0 and doc.head_piece) or (i == n - 1 and doc.tail_piece)
                or not bad(t)]
        if len(keep) != n:
            counters[counter] += n - len(keep)
            doc.texts = keep


def _paragraphs(text: str, cont: bool, is_open: bool) -> list[str]:
    """Split at blank lines. Line ends at either end of the chunk belong to the paragraph break, except on the side
    where a piece of a spanning paragraph was cut at a line end (it is glued to the next piece)."""
    texts = _PARAGRAPH_BREAK.split(text)
    last = len(texts) - 1
    out = []
    for i, t in enumerate(texts):
        if not (i == 0 and cont):
            t = t.lstrip("\n")
        if not (i == last and is_open):
            t = t.rstrip("\n")
        out.append(t)
    # A chunk ends after a paragraph break and may start with one: no document there, nothing to count.
    if len(out) > 1 and not out[-1] and not is_open:
        out.pop()
    if len(out) > 1 and not out[0] and not cont:
        del out[0]
    return out


def _strip_trailing(text: str, ascii_only: bool, at_end: bool) -> str:
    """Strip spaces at line ends. The regex tries every space of the text (a third of the time of the whole byte
    path); in ASCII text without control characters only a space or a tab can trail, and a few rounds of
    str.replace (which run at memory speed) clear the usual one or two."""
    if ascii_only and "\t" not in text:
        parts, start, hits = [], 0, 0
        i = text.find(" \n")
        while i >= 0 and hits < 1000:  # prose has few: cut each out; else the regex below does the rest
            j = i
            while j > start and text[j - 1] == " ":
                j -= 1
            parts.append(text[start:j])
            start, hits = i + 1, hits + 1
            i = text.find(" \n", i + 2)
        if parts:
            parts.append(text[start:])
            text = "".join(parts)
        if i < 0:
            return text.rstrip(" ") if at_end else text
    return (_TRAILING_AT_END if at_end else _TRAILING).sub("", text)


def nlp_enabled(clean: CleanConfig) -> bool:
    return clean.sentences or clean.words or clean.stopwords or clean.stem != "none"


class NlpStages:
    """Sentence splitting, word tokenization, stop-word removal and stemming with NLTK (none needs downloaded data)."""

    def __init__(self, clean: CleanConfig, punkt_params: Any = None):
        from nltk.tokenize import NLTKWordTokenizer
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        self.sentences = PunktSentenceTokenizer(punkt_params) if clean.sentences else None
        self.words = NLTKWordTokenizer() if (clean.words or clean.stopwords or clean.stem != "none") else None
        self.stopwords = frozenset(stopword_list()[0]) if clean.stopwords else None
        self.stem = _stemmer(clean.stem) if clean.stem != "none" else None

    def __call__(self, text: str, counters: Counter) -> str:
        if self.sentences is not None:
            sentences = [s.replace("\n", " ") for s in self.sentences.tokenize(text)]
            counters["sentences"] += len(sentences)
            text = "\n".join(sentences)
        if self.words is None:
            return text
        lines = []
        for line in text.split("\n"):
            words = self.words.tokenize(line)
            counters["words"] += len(words)
            if self.stopwords is not None:
                kept = [w for w in words if w.lower() not in self.stopwords]
                counters["stopwords_removed"] += len(words) - len(kept)
                words = kept
            if self.stem is not None:
                words = [self.stem(w) for w in words]
            if words:
                lines.append(" ".join(words))
        return "\n".join(lines)


def _stemmer(name: str) -> Callable[[str], str]:
    from nltk.stem import PorterStemmer, SnowballStemmer

    stemmer = PorterStemmer() if name == "porter" else SnowballStemmer("english")
    # Stemming is slow pure Python and words repeat (Zipf): a cache makes it several times faster.
    return lru_cache(maxsize=1 << 17)(stemmer.stem)


def stopword_list() -> tuple[list[str], str]:
    """English stop words: NLTK's list when its data is installed, else scikit-learn's (always there)."""
    try:
        from nltk.corpus import stopwords

        return list(stopwords.words("english")), "nltk"
    except (LookupError, OSError):
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

        return sorted(ENGLISH_STOP_WORDS), "scikit-learn"


def punkt_parameters(sample: str | None) -> tuple[Any, str]:
    """Punkt's parameters: from the user's NLTK punkt data when installed, else learned from `sample` (the start of
    the input itself: Punkt is unsupervised). Returns (parameters, where they came from)."""
    from nltk.tokenize.punkt import PunktTokenizer, PunktTrainer

    try:
        return PunktTokenizer("english")._params, "nltk punkt_tab data"
    except (LookupError, OSError, ValueError):
        pass
    trainer = PunktTrainer()
    trainer.train(sample or "", finalize=True)
    return trainer.get_params(), f"trained on {len(sample or ''):,} characters of the input"
