"""llmctl.core.prepare: every cleaning stage, the encoders, chunking, the shard writer and skip-if-unchanged, on
small made-up text (the CLI's behaviour is in tests/test_preprocess.py)."""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from llmctl.config import config_from_dict
from llmctl.core.prepare import filter_text, prepare
from llmctl.core.prepare.clean import Cleaner
from llmctl.core.prepare.encode import _SPACE_AFTER_NONSPACE, ByteLevelBPEEncoder, _split_pieces
from llmctl.core.shards import open_split, read_meta
from llmctl.core.tokenizer import train_bpe
from llmctl.errors import ConfigError, DataError


def make_cfg(tmp_path: Path, inputs, **sections):
    raw = {
        "data": {"inputs": [str(i) for i in inputs], "dir": str(tmp_path / "prepared"), "workers": 1},
        "tokenizer": {"vocab_size": 256},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


def write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def cleaned(tmp_path: Path, raw: str | bytes, **sections) -> list[str]:
    """The documents filter mode makes of `data` (JSONL output, so documents come back exactly)."""
    path = write(tmp_path, "input.txt", raw)
    sections.setdefault("data", {})["text_format"] = "jsonl"
    cfg = make_cfg(tmp_path, [path], **sections)
    return [json.loads(line)["text"] for line in "".join(filter_text(cfg, quiet=True)).splitlines()]


def shard_documents(data_dir: Path) -> list[str]:
    """Decode both splits with the saved tokenizer (as train would load it) and cut at end-of-text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data_dir)
    meta = read_meta(data_dir)
    ids = np.concatenate([np.asarray(open_split(data_dir, s, meta)) for s in ("train", "val") if meta.tokens[s]])
    parts = np.split(ids, np.flatnonzero(ids == meta.eos_token_id))
    return [tokenizer.decode([int(i) for i in p if i != meta.eos_token_id]) for p in parts]


# ---------------------------------------------------------------------------------------------------------------
# Cleaning stages


def test_decode_replaces_invalid_utf8_and_counts_it(tmp_path):
    docs = cleaned(tmp_path, b"good line\n\nbad \xff\xfe byte\n\nfine\n")
    assert docs == ["good line", "bad \ufffd\ufffd byte", "fine"]


def test_decode_skip_drops_the_document_with_invalid_bytes(tmp_path):
    path = write(tmp_path, "in.txt", b"good line\n\nbad \xff byte\n\nfine\n")
    summary = prepare(make_cfg(tmp_path, [path], data={"encoding_errors": "skip", "val_fraction": 0.0}), quiet=True)
    assert shard_documents(tmp_path / "prepared") == ["good line", "fine"]
    assert summary["stats"]["invalid_utf8_docs"] == 1
    assert summary["stats"]["invalid_utf8_bytes"] == 1


def test_crlf_and_cr_become_lf_and_split_paragraphs(tmp_path):
    assert cleaned(tmp_path, "one\r\ntwo\r\n\r\nthree\rfour\r\rfive") == ["one\ntwo", "three\nfour", "five"]


def test_nfkc_normalization(tmp_path):
    text = "\ufb01ne \uff21\uff22\uff23 caf\u0065\u0301 \u2460"  # ligature, full-width, combining accent, circled 1
    assert cleaned(tmp_path, text) == ["fine ABC caf\u00e9 1"]
    assert cleaned(tmp_path, text, clean={"normalize": False}) == [text]


def test_cleanup_controls_trailing_spaces_and_blank_runs(tmp_path):
    text = "\ufeffbell\x07 and esc\x1b[0m   \nline\t \n\n\n\n\nnext\x01 para  "
    assert cleaned(tmp_path, text, data={"documents": "file"}) == ["bell and esc[0m\nline\n\nnext para"]
    assert cleaned(tmp_path, "a  \n\n\n\nb", clean={"cleanup": False}, data={"documents": "file"}) == ["a  \n\n\n\nb"]


def test_trailing_spaces_in_plain_ascii(tmp_path):
    text = "a   \nb \n \nc" + " \nx" * 1500 + "  "  # past 1000 lines with trailing spaces the regex takes over
    assert cleaned(tmp_path, text, data={"documents": "file"}) == ["a\nb\n\nc" + "\nx" * 1500]


def test_cleanup_of_non_ascii_text_strips_unicode_spaces(tmp_path):
    assert cleaned(tmp_path, "caf\u00e9\u3000 \nna\u00efve", clean={"normalize": False}, data={"documents": "file"}) \
        == ["caf\u00e9\nna\u00efve"]


def test_lowercase(tmp_path):
    assert cleaned(tmp_path, "Hello WORLD", clean={"lowercase": True}) == ["hello world"]


def test_document_modes_and_empty_lines(tmp_path):
    text = "a1\na2\n\n   \n\nb1\n\n\n"
    assert cleaned(tmp_path, text, data={"documents": "paragraph"}) == ["a1\na2", "b1"]
    assert cleaned(tmp_path, text, data={"documents": "line"}) == ["a1", "a2", "b1"]
    assert cleaned(tmp_path, text, data={"documents": "file"}) == ["a1\na2\n\nb1\n\n"]  # one blank line kept


def test_very_long_lines_survive_whole(tmp_path):
    long_line = " ".join(f"word{i}" for i in range(20_000))  # ~170 KB, far beyond one 4 KB chunk
    text = f"short\n{long_line}\nend\n"
    assert cleaned(tmp_path, text, data={"documents": "line", "chunk_bytes": 4096}) == ["short", long_line, "end"]


def test_length_limits(tmp_path):
    text = "a\n\nabcde\n\n" + "x" * 50
    assert cleaned(tmp_path, text, clean={"min_chars": 2, "max_chars": 10}) == ["abcde"]


def test_exact_duplicates_are_removed(tmp_path):
    text = "same\n\nother\n\nsame\n\nSame\n\nother\n"
    assert cleaned(tmp_path, text, clean={"dedup": True}) == ["same", "other", "Same"]
    assert cleaned(tmp_path, text, clean={"dedup": True, "lowercase": True}) == ["same", "other"]


def test_sentences_trained_on_the_input(tmp_path):
    text = "The cat sat. Dr. Smith arrived at noon! Did he\nsee it? Yes."
    docs = cleaned(tmp_path, text, clean={"sentences": True})
    assert docs[0].split("\n")[0] == "The cat sat."
    assert docs[0].split("\n")[-1] == "Yes."
    assert "Did he see it?" in docs[0].split("\n")


def test_a_document_cut_into_chunks_keeps_its_sentences(tmp_path):
    """A document bigger than a chunk is cut at a line end after a sentence end where there is one, so the sentence
    splitter sees every sentence whole."""
    rng = random.Random(5)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    lines = []
    for _ in range(300):  # sentences that run over line ends, and lines that end inside sentences
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "."
        half = len(sentence) // 2
        cut = sentence.index(" ", half)
        lines += [sentence[:cut], sentence[cut + 1:]] if rng.random() < 0.7 else [sentence]
    text = "\n".join(lines) + "\n"  # one paragraph of ~20 KB
    whole = cleaned(tmp_path, text, clean={"sentences": True})
    pieces = cleaned(tmp_path, text, clean={"sentences": True}, data={"chunk_bytes": 4096})
    assert pieces == whole and len(whole) == 1
    assert all(line.endswith(".") for line in whole[0].split("\n"))
    words = {"words": True, "stopwords": True}  # line by line: no two lines glued where a piece ends
    assert cleaned(tmp_path, text, clean=words, data={"chunk_bytes": 4096}) == cleaned(tmp_path, text, clean=words)


def test_words_stopwords_and_stemming(tmp_path):
    text = "The runners were running quickly, and they didn't stop."
    assert cleaned(tmp_path, text, clean={"words": True}) == [
        "The runners were running quickly , and they did n't stop ."
    ]
    no_stop = cleaned(tmp_path, text, clean={"stopwords": True})[0].split()
    assert "The" not in no_stop and "and" not in no_stop and "runners" in no_stop
    porter = cleaned(tmp_path, text, clean={"stopwords": True, "stem": "porter"})[0].split()
    assert "run" in porter and "runner" in porter and "quickli" in porter
    snowball = cleaned(tmp_path, text, clean={"stem": "snowball"})[0].split()
    assert "quick" in snowball


def test_a_document_emptied_by_stop_words_is_dropped(tmp_path):
    assert cleaned(tmp_path, "the and of\n\nreal words", clean={"stopwords": True}) == ["real words"]


def test_joined_fast_path_equals_document_path():
    """The byte path skips per-document strings; it must give exactly the documents the general path gives."""
    cfg = config_from_dict({})
    rng = random.Random(1)
    alphabet = ["a", "b", " ", "  ", "\n", "\n\n", "\n \n", "\r\n", "\t", "\u00e9", "\x07"]
    for mode in ("paragraph", "line", "file"):
        cfg.data.documents = mode
        cleaner = Cleaner(cfg.clean, cfg.data)
        for _ in range(300):
            raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))).encode()
            for cont, is_open in ((False, False), (True, False), (False, True), (True, True)):
                from collections import Counter

                joined = cleaner.joined_documents(raw, mode, cont, is_open, Counter())
                doc = cleaner.documents(raw, mode, cont, is_open, 1, "x", Counter())
                expected = "\x00".join(doc.texts)
                assert joined == expected, (mode, raw, cont, is_open)


# ---------------------------------------------------------------------------------------------------------------
# Encoders


TRICKY = [
    "Hello world, it's a test.",
    "'s at the start and 'tis",
    "ends with spaces   ",
    "ends with newlines\n\n",
    "  leading spaces",
    "tabs\tand \t mixed \n whitespace \n\n  runs",
    "numbers 12345 and 3.14, unicode caf\u00e9 \u65e5\u672c\u8a9e \U0001f600",
    "a literal <|endoftext|> in the text",
    "x",
    "",
    "    def indented():\n        return  1\n",
    "!!! ??? ... ---",
    "a\u00a0non-breaking space and a\u3000wide one",
]


@pytest.fixture(scope="module")
def small_bpe():
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(TRICKY) for _ in range(5)) for _ in range(200)]
    return train_bpe(corpus, 400, 2, ["<|endoftext|>"])


def test_piece_cache_equals_the_tokenizer(small_bpe):
    from tokenizers import Tokenizer

    encoder = ByteLevelBPEEncoder(Tokenizer.from_str(small_bpe.to_str()), np.dtype(np.uint16), max_cache=50)
    reference = Tokenizer.from_str(small_bpe.to_str())
    reference.encode_special_tokens = True
    rng = random.Random(2)
    for _ in range(60):
        docs = [rng.choice(TRICKY) + rng.choice(["", " ", "\n", "  x"]) for _ in range(rng.randint(1, 8))]
        ids, lengths = encoder.encode(docs)
        expected = [reference.encode(d, add_special_tokens=False).ids for d in docs]
        assert lengths.tolist() == [len(e) for e in expected]
        assert ids.tolist() == [i for e in expected for i in e]


def test_piece_split_matches_the_regex_split():
    rng = random.Random(3)
    for _ in range(2000):
        text = "".join(rng.choice(["a", " ", "  ", "\n", "b c", "\t", " \n ", "\x00"]) for _ in range(30))
        assert _split_pieces(text) == _SPACE_AFTER_NONSPACE.split(text)
    code = "\n".join("        x = 1" for _ in range(300))  # more than 256 spots: the regex branch
    assert _split_pieces(code) == _SPACE_AFTER_NONSPACE.split(code)


def test_bpe_shards_equal_the_saved_tokenizer(tmp_path, corpus_text):
    from transformers import AutoTokenizer

    # (a literal "<|endoftext|>" is left out: AutoTokenizer reads it as the special token, the shards as text)
    text = corpus_text + "\n\n".join(t for t in TRICKY if "<|" not in t)
    summary = prepare(make_cfg(tmp_path, [write(tmp_path, "c.txt", text)], tokenizer={"vocab_size": 300}), quiet=True)
    data_dir = tmp_path / "prepared"
    tokenizer = AutoTokenizer.from_pretrained(data_dir)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == tokenizer.eos_token
    meta = read_meta(data_dir)
    assert summary["vocab_size"] == meta.vocab_size == len(tokenizer) == 300
    ids = np.concatenate([np.asarray(open_split(data_dir, s)) for s in ("train", "val")])
    docs = shard_documents(data_dir)
    expected = []
    for i, doc in enumerate(docs):
        expected += ([meta.eos_token_id] if i else []) + tokenizer(doc, add_special_tokens=False)["input_ids"]
    assert ids.tolist() == expected
    assert sum(meta.bytes.values()) == sum(len(d.encode()) for d in docs)


@pytest.mark.parametrize("vocab_size", [256, 300])
def test_a_literal_end_of_text_in_the_corpus_is_text(tmp_path, corpus_text, vocab_size):
    text = corpus_text + "\n\nsee <|endoftext|> here\n"
    cfg = make_cfg(tmp_path, [write(tmp_path, "c.txt", text)], tokenizer={"vocab_size": vocab_size})
    prepare(cfg, quiet=True)
    docs = shard_documents(tmp_path / "prepared")
    assert docs[-1] == "see <|endoftext|> here" and len(docs) == corpus_text.count("\n\n") + 2


def test_byte_vocabulary_bypasses_the_tokenizer_with_the_same_ids(tmp_path):
    from transformers import AutoTokenizer

    text = "Caf\u00e9 \u65e5\u672c \U0001f600 plain ascii\n\nsecond document\n"
    prepare(make_cfg(tmp_path, [write(tmp_path, "c.txt", text)], data={"val_fraction": 0.0}), quiet=True)
    data_dir = tmp_path / "prepared"
    tokenizer = AutoTokenizer.from_pretrained(data_dir)
    meta = read_meta(data_dir)
    assert (meta.vocab_size, meta.eos_token_id, meta.dtype) == (257, 256, "uint16")
    assert tokenizer.eos_token_id == 256 and tokenizer.pad_token_id == 256
    ids = np.asarray(open_split(data_dir, "train")).tolist()
    docs = ["Caf\u00e9 \u65e5\u672c \U0001f600 plain ascii", "second document"]
    assert ids == tokenizer(docs[0])["input_ids"] + [256] + tokenizer(docs[1])["input_ids"]
    assert ids == list(docs[0].encode()) + [256] + list(docs[1].encode())


# ---------------------------------------------------------------------------------------------------------------
# Shards, splits and chunking


def test_tail_split_matches_nanogpt_on_one_file(tmp_path, corpus_text):
    path = write(tmp_path, "input.txt", corpus_text)
    summary = prepare(make_cfg(tmp_path, [path], data={"documents": "file", "val_fraction": 0.1}), quiet=True)
    data = corpus_text.encode()
    n = len(data)
    train = np.asarray(open_split(tmp_path / "prepared", "train")).tobytes()
    val = np.asarray(open_split(tmp_path / "prepared", "val"))
    assert bytes(val.astype(np.uint8)) == data[int(n * 0.9):]
    assert np.frombuffer(train, np.uint16).astype(np.uint8).tobytes() == data[: int(n * 0.9)]
    assert summary["documents"] == {"train": 1, "val": 1}
    assert summary["bytes"] == {"train": int(n * 0.9), "val": n - int(n * 0.9)}


def test_document_split_draws_whole_documents_by_seed(tmp_path, corpus_text):
    path = write(tmp_path, "c.txt", corpus_text)
    cfg = make_cfg(tmp_path, [path], data={"split": "documents", "val_fraction": 0.3})
    summary = prepare(cfg, quiet=True)
    paragraphs = corpus_text.strip().split("\n\n")
    meta = read_meta(tmp_path / "prepared")
    val = np.asarray(open_split(tmp_path / "prepared", "val"))
    val_texts = [bytes(p[p != 256].astype(np.uint8)).decode() for p in np.split(val, np.flatnonzero(val == 256))]
    assert val_texts and all(t in paragraphs for t in val_texts)
    assert summary["documents"]["train"] + summary["documents"]["val"] == len(paragraphs)
    assert 0.1 < meta.documents["val"] / len(paragraphs) < 0.5
    prepare(cfg, force=True, quiet=True)
    assert read_meta(tmp_path / "prepared").tokens == meta.tokens  # same seed, same split
    cfg.run.seed = 7
    prepare(cfg, quiet=True)  # the seed shapes this split: a rebuild, and another draw
    assert read_meta(tmp_path / "prepared").tokens != meta.tokens


@pytest.mark.parametrize("mode", ["paragraph", "line", "file"])
def test_chunk_size_does_not_change_the_result(tmp_path, mode):
    """Small chunks cut documents (even a huge one) into pieces; the shards must be the same as with one chunk."""
    rng = random.Random(4)
    words = ["alpha", "beta", "gamma", "delta", "\u00e9t\u00e9", "x"]
    paragraphs = []
    for i in range(120):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 4))]
        paragraphs.append("\r\n".join(lines) if i % 3 == 0 else "\n".join(lines))
    paragraphs.insert(50, "\n".join(" ".join(rng.choice(words) for _ in range(30)) for _ in range(400)))  # ~58 KB
    paragraphs.insert(10, paragraphs[50])  # a duplicate of the huge one
    paragraphs.insert(80, "\n".join(" ".join(rng.choice(words) for _ in range(20)) for _ in range(100)))  # ~12 KB
    paragraphs.insert(100, paragraphs[80])
    text = "\n\n".join(paragraphs) + "\n"
    path = write(tmp_path, "c.txt", text)
    results = []
    for chunk, workers in ((4096, 1), (4096, 2), (10_000_000, 1)):
        cfg = make_cfg(tmp_path, [path], data={"documents": mode, "chunk_bytes": chunk, "workers": workers},
                       clean={"dedup": True, "max_chars": 50_000 if mode != "file" else 0})
        summary = prepare(cfg, force=True, quiet=True)
        results.append((shard_documents(tmp_path / "prepared"), summary["tokens"], summary["documents"],
                        summary["bytes"], summary["stats"].get("duplicates"), summary["stats"].get("too_long")))
    assert results[0] == results[1] == results[2]
    if mode == "paragraph":  # the ~58 KB pair is too long; the ~12 KB one (spanning 4 KB chunks) is kept once
        assert results[0][5] == 2 and results[0][0].count(paragraphs[80]) == 1


def test_jsonl_gzip_directories_and_globs(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("from a text file\n")
    with gzip.open(root / "sub" / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "from gzipped jsonl"}) + "\n\n" + json.dumps({"body": "second record"}) + "\n")
    (root / ".hidden.txt").write_text("never read\n")
    (root / "notes.md").write_text("not matched by the glob\n")
    cfg = make_cfg(tmp_path, [root], data={"text_field": "body", "val_fraction": 0.0})
    summary = prepare(cfg, quiet=True)
    assert shard_documents(tmp_path / "prepared") == ["from a text file", "from gzipped jsonl", "second record"]
    assert [i["path"] for i in read_meta(tmp_path / "prepared").inputs] == [
        str(root / "a.txt"), str(root / "sub" / "b.jsonl.gz")]
    assert summary["stats"]["inputs"] == 2


def test_pydoc_topics_is_an_input(tmp_path):
    from pydoc_data.topics import topics

    summary = prepare(make_cfg(tmp_path, ["stdlib:pydoc-topics"], data={"split": "documents"}), quiet=True)
    assert sum(summary["documents"].values()) == len(topics)
    assert summary["input_bytes"] > 300_000
    assert read_meta(tmp_path / "prepared").inputs[0]["path"] == "stdlib:pydoc-topics"


def test_pydoc_topics_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)
    with pytest.raises(DataError, match="pydoc_data.*data.inputs"):
        prepare(make_cfg(tmp_path, ["stdlib:pydoc-topics"]), quiet=True)


def test_pretrained_tokenizer_is_reused(tmp_path, tiny_model_dir, corpus_text):
    path = write(tmp_path, "c.txt", corpus_text)
    summary = prepare(make_cfg(tmp_path, [path], tokenizer={"pretrained": str(tiny_model_dir)}), quiet=True)
    assert (summary["vocab_size"], summary["eos_token_id"], summary["tokenizer"]) == (257, 256, str(tiny_model_dir))
    assert shard_documents(tmp_path / "prepared") == corpus_text.strip().split("\n\n")


def test_a_pretrained_tokenizer_replaced_at_the_same_path_rebuilds(tmp_path, corpus_text):
    from llmctl.core.tokenizer import byte_tokenizer, to_transformers

    path = write(tmp_path, "c.txt", corpus_text)
    tokenizer_dir = tmp_path / "tok"
    to_transformers(byte_tokenizer(["<|endoftext|>"]), "<|endoftext|>").save_pretrained(tokenizer_dir)
    cfg = make_cfg(tmp_path, [path], tokenizer={"pretrained": str(tokenizer_dir)})
    assert prepare(cfg, quiet=True)["skipped"] is False
    assert prepare(cfg, quiet=True)["skipped"] is True
    to_transformers(byte_tokenizer(["<|end|>"]), "<|end|>").save_pretrained(tokenizer_dir)  # same path, new tokens
    assert prepare(cfg, quiet=True)["skipped"] is False


def test_a_pretrained_tokenizer_under_home_is_hashed_by_its_files(tmp_path, monkeypatch):
    from llmctl.core.prepare.build import _tokenizer_files_sha256
    from llmctl.core.tokenizer import byte_tokenizer, to_transformers

    to_transformers(byte_tokenizer(["<|endoftext|>"]), "<|endoftext|>").save_pretrained(tmp_path / "tok")
    monkeypatch.setenv("HOME", str(tmp_path))
    files = _tokenizer_files_sha256("~/tok")
    assert "tokenizer.json" in files and files == _tokenizer_files_sha256(str(tmp_path / "tok"))


# ---------------------------------------------------------------------------------------------------------------
# Skip-if-unchanged and atomic output


def test_unchanged_inputs_and_config_skip_and_changes_rebuild(tmp_path, corpus_text, caplog):
    path = write(tmp_path, "c.txt", corpus_text)
    cfg = make_cfg(tmp_path, [path])
    first = prepare(cfg, quiet=True)
    assert first["skipped"] is False
    meta_file = tmp_path / "prepared" / "meta.json"
    stamp = meta_file.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="llmctl"):
        again = prepare(cfg, quiet=True)
    assert again["skipped"] is True and again["tokens"] == first["tokens"]
    assert meta_file.stat().st_mtime_ns == stamp
    assert "up to date" in caplog.text
    cfg.data.workers = 2  # does not shape the data
    assert prepare(cfg, quiet=True)["skipped"] is True
    assert prepare(cfg, force=True, quiet=True)["skipped"] is False
    path.write_text(corpus_text + "\n\nOne more paragraph.\n")
    assert prepare(cfg, quiet=True)["skipped"] is False
    cfg.clean.lowercase = True
    changed = prepare(cfg, quiet=True)
    first_doc = shard_documents(tmp_path / "prepared")[0]
    assert changed["skipped"] is False and first_doc == first_doc.lower() != corpus_text.split("\n")[0]
    (tmp_path / "prepared" / "val.bin").write_bytes(b"")  # damaged shard: never "up to date"
    assert prepare(cfg, quiet=True)["skipped"] is False


def test_failed_run_leaves_the_previous_data_and_no_debris(tmp_path, corpus_text):
    good = write(tmp_path, "good.txt", corpus_text)
    cfg = make_cfg(tmp_path, [good])
    prepare(cfg, quiet=True)
    before = (tmp_path / "prepared" / "meta.json").read_text()
    bad = write(tmp_path, "bad.jsonl", '{"text": "fine"}\n' * 50 + "{not json\n")
    cfg.data.inputs = [str(good), str(bad)]
    with pytest.raises(DataError, match=r"bad.jsonl:51: invalid JSON"):
        prepare(cfg, quiet=True)
    assert (tmp_path / "prepared" / "meta.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.txt", "prepared"]


def test_output_directory_with_other_files_is_refused(tmp_path, corpus_text):
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="no prepared data"):
        prepare(make_cfg(tmp_path, [write(tmp_path, "c.txt", corpus_text)]), quiet=True)
    assert (tmp_path / "prepared" / "precious.txt").read_text() == "keep me"


def test_vocabulary_too_small_is_a_config_error():
    with pytest.raises(ConfigError, match="vocab_size: 100 is too small"):
        config_from_dict({"tokenizer": {"vocab_size": 100}})
