"""Atomic writes and directories: a failure never leaves a half-written result that looks complete."""

from __future__ import annotations

import pytest

from llmctl.core.files import atomic_dir, atomic_write_text, sha256_bytes, sha256_file


def test_atomic_write_replaces_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]


def test_atomic_dir_commits_on_success(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "x").write_text("1")
        assert not final.exists()
    assert (final / "x").read_text() == "1"
    with atomic_dir(final) as tmp:
        (tmp / "y").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["y"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_keeps_old_on_failure(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "x").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("killed")
    assert (final / "x").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_hashes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_file(path) == sha256_bytes(b"abc") == expected
