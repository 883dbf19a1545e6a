"""Reading user files: labeled JSONL/TSV, JSONL with line-numbered errors, gzip recognised by content."""

from __future__ import annotations

import gzip

import pytest

from llmctl.core.inputs import iter_jsonl, read_labeled, read_text
from llmctl.errors import DataError


def test_labeled_jsonl_and_tsv(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "good", "label": "pos", "id": "x1"}\n\n{"text": "bad", "label": 0}\n')
    examples = read_labeled(jsonl)
    assert [(e.id, e.text, e.label, e.line) for e in examples] == [("x1", "good", "pos", 1), ("1", "bad", "0", 3)]
    tsv = tmp_path / "a.tsv"
    tsv.write_text("text\tlabel\nfine day\tpos\nawful\tneg\n")
    assert [(e.text, e.label, e.line) for e in read_labeled(tsv)] == [("fine day", "pos", 2), ("awful", "neg", 3)]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "a", "label": null}\n', r"a.jsonl:1: 'label' must be a string or an integer, not None"),
        ('{"text": "a", "label": "p"}\n{"text": "b", "label": true}\n', r"a.jsonl:2: 'label' must be a string"),
        ('{"text": "a", "label": "p"}\n{"text": "b"\n', r"a.jsonl:2: invalid JSON"),
        ('{"text": "a"}\n', r"a.jsonl:1: no 'label' field"),
        ('{"text": 3, "label": "p"}\n', r"a.jsonl:1: 'text' must be a string"),
        ("\n\n", r"a.jsonl: no examples \(the file is empty\)"),
    ],
)
def test_labeled_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "a.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_labeled(path)


def test_tsv_line_without_a_tab(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text("good\tpos\nno tab here\n")
    with pytest.raises(DataError, match=r"a.tsv:2: expected text<TAB>label"):
        read_labeled(path)


def test_jsonl_skip_counts_bad_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\nnot json\n{"prompt": "b"}\n')
    skipped: list[int] = []
    assert [obj["prompt"] for _, obj in iter_jsonl(path, on_error="skip", skipped=skipped)] == ["a", "b"]
    assert skipped == [2]
    with pytest.raises(DataError, match="p.jsonl:2: invalid JSON"):
        list(iter_jsonl(path))


def test_gzip_recognised_by_content_and_crlf(tmp_path):
    path = tmp_path / "plain-name.txt"
    path.write_bytes(gzip.compress(b"one\r\ntwo\rthree\n"))
    assert read_text(path) == "one\ntwo\nthree\n"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    with pytest.raises(DataError, match=r"bad.txt: not UTF-8 text \(invalid byte at offset 3\)"):
        read_text(bad)
    with pytest.raises(DataError, match="no such file"):
        read_text(tmp_path / "missing.txt")
