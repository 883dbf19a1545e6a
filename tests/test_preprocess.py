"""`llmctl preprocess` through the real entry point: streams, exit codes, error messages, skip-if-unchanged."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import REPO


def _one_error_line(result) -> str:
    assert result.code == 1, (result.code, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_prepare_json_summary_and_skip(llmctl, tmp_path, corpus_file):
    out = tmp_path / "data"
    first = llmctl("preprocess", str(corpus_file), "-o", str(out), "--set", "tokenizer.vocab_size=256", "--json")
    assert first.code == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["skipped"] is False and summary["vocab_size"] == 257 and summary["tokens"]["val"] > 0
    assert summary["stats"]["documents_read"] == sum(summary["documents"].values()) - 1  # one straddles the split
    assert first.stderr.count("\n") == 1 and first.stderr.startswith("prepared ")  # the one-line summary
    assert {p.name for p in out.iterdir()} >= {"train.bin", "val.bin", "meta.json", "tokenizer.json", "config.yaml"}
    again = llmctl("preprocess", str(corpus_file), "-o", str(out), "--set", "tokenizer.vocab_size=256")
    assert again.code == 0 and again.stdout == ""
    assert "up to date" in again.stderr
    quiet = llmctl("preprocess", str(corpus_file), "-o", str(out), "--set", "tokenizer.vocab_size=256", "-q", "--force")
    assert quiet.code == 0 and quiet.stderr == "" and quiet.stdout == ""


def test_stdin_is_never_up_to_date(llmctl, tmp_path, corpus_text):
    args = ("preprocess", "-o", str(tmp_path / "data"), "--set", "tokenizer.vocab_size=300", "--json")
    for _ in range(2):
        result = llmctl(*args, input=corpus_text)
        assert result.code == 0, result.stderr
        assert json.loads(result.stdout)["skipped"] is False
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["inputs"][0]["path"] == "<stdin>" and meta["inputs"][0]["size"] == len(corpus_text.encode())


def test_filter_pipe_lines_and_formats(llmctl, corpus_text):
    result = llmctl("preprocess", "--to-text", input="Hello  \r\nWorld\r\n\r\n\r\n\r\nSecond\x07 para\n")
    assert result.code == 0, result.stderr
    assert result.stdout == "Hello World\nSecond para\n"
    blocks = llmctl("preprocess", "--to-text", "--set", "data.text_format=blocks", input="a\nb\n\n\nc\n")
    assert blocks.stdout == "a\nb\n\nc\n"
    classic = llmctl("preprocess", "--to-text", "-c", str(REPO / "configs" / "classic-nlp.yaml"), "-",
                     input="The runners were running.\n\nAnd the dogs barked loudly!\n")
    assert classic.code == 0, classic.stderr
    assert classic.stdout == "runner run .\ndog bark loudli !\n"


def test_filter_streams_before_input_ends(tmp_path):
    """A line written to the filter's stdin comes out on its stdout while stdin is still open."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmctl", "preprocess", "--to-text", "--set", "data.documents=line", "-q"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        answers = []
        for line in (b"First   line\n", b"SECOND\tline  \n"):
            proc.stdin.write(line)
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, "no output while stdin is open"
            answers.append(proc.stdout.readline())
        assert answers == [b"First   line\n", b"SECOND\tline\n"]
        assert proc.poll() is None  # still running: the input has not ended
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read()


def test_missing_path(llmctl, tmp_path):
    line = _one_error_line(llmctl("preprocess", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "d")))
    assert "nope.txt: no such file or directory" in line
    assert not (tmp_path / "d").exists()


def test_empty_input(llmctl, tmp_path):
    empty = tmp_path / "blank.txt"
    empty.write_text("\n   \n\n\t\n")
    line = _one_error_line(llmctl("preprocess", str(empty), "-o", str(tmp_path / "d")))
    assert "no documents left after cleaning" in line
    assert not (tmp_path / "d").exists()
    line = _one_error_line(llmctl("preprocess", "--to-text", input=""))
    assert "no documents" in line


def test_binary_file(llmctl, tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    line = _one_error_line(llmctl("preprocess", str(binary), "-o", str(tmp_path / "d")))
    assert "model.bin: looks like a binary file" in line
    assert not (tmp_path / "d").exists()


def test_vocabulary_too_small(llmctl, tmp_path, corpus_file):
    line = _one_error_line(llmctl("preprocess", str(corpus_file), "-o", str(tmp_path / "d"),
                                  "--set", "tokenizer.vocab_size=100"))
    assert "tokenizer.vocab_size: 100 is too small" in line


def test_output_directory_is_a_file(llmctl, tmp_path, corpus_file):
    target = tmp_path / "taken"
    target.write_text("a file")
    line = _one_error_line(llmctl("preprocess", str(corpus_file), "-o", str(target)))
    assert "is a file, not a directory" in line
    line = _one_error_line(llmctl("preprocess", str(corpus_file), "-o", str(target / "sub")))
    assert "is a file, not a directory" in line
    assert target.read_text() == "a file"


def test_unwritable_directory(llmctl, tmp_path, corpus_file):
    if os.geteuid() == 0:  # root writes anywhere permissions allow: use a place the kernel refuses
        target = Path("/proc/llmctl-test/data")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "data"
    line = _one_error_line(llmctl("preprocess", str(corpus_file), "-o", str(target),
                                  "--set", "tokenizer.vocab_size=256"))
    assert "data.dir: cannot write" in line
    assert not target.exists()


def test_invalid_jsonl_names_the_line_and_leaves_nothing(llmctl, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    line = _one_error_line(llmctl("preprocess", str(bad), "-o", str(tmp_path / "d")))
    assert "bad.jsonl:2: 'text' must be a string" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_presets_load_and_start_with_their_command():
    from llmctl.config import load_config

    for name in ("shakespeare-char.yaml", "lm-bpe.yaml", "classic-nlp.yaml"):
        path = REPO / "configs" / name
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and f"llmctl preprocess -c configs/{name}" in first, first
        assert "--set" in path.read_text().split("\n\n")[0]
        cfg = load_config(path)
        assert yaml.safe_load(path.read_text())
        if name == "classic-nlp.yaml":
            assert cfg.clean.stopwords and cfg.clean.stem != "none"
        else:
            assert not cfg.clean.stopwords and cfg.clean.stem == "none"


def test_lm_preset_on_pydoc_topics_then_train_reads_it(llmctl, tmp_path):
    """The LM preset end to end on the corpus every Python carries, and the shards read back as train reads them."""
    from llmctl.core.shards import open_split, read_meta

    out = tmp_path / "pydoc"
    started = time.perf_counter()
    result = llmctl("preprocess", "-c", str(REPO / "configs" / "lm-bpe.yaml"), "stdlib:pydoc-topics", "-o", str(out),
                    "--set", "tokenizer.vocab_size=1024", "--json")
    assert result.code == 0, result.stderr
    assert time.perf_counter() - started < 60
    meta = read_meta(out)
    assert meta.vocab_size == 1024 and meta.dtype == "uint16"
    assert len(open_split(out, "train", meta)) == meta.tokens["train"] > 50_000
