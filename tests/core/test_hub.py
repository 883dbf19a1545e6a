"""Finding models: local directories, the Hugging Face cache, and a fast clear error for anything else."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from llmctl.core.hub import locate
from llmctl.core.model import load_model, load_tokenizer
from llmctl.errors import ModelError


def test_local_directory(tiny_model_dir):
    source = locate(str(tiny_model_dir))
    assert source.local and source.local_files_only and source.ref == str(tiny_model_dir)
    assert load_model(tiny_model_dir).config.n_layer == 2
    assert load_tokenizer(tiny_model_dir).eos_token_id == 256


def test_directory_without_a_model(tmp_path, tokenizer_dir):
    with pytest.raises(ModelError, match="is a directory but holds no model"):
        locate(str(tmp_path))
    # A tokenizer-only directory (what preprocess writes) is a tokenizer but not a model.
    assert locate(str(tokenizer_dir), "tokenizer").local
    with pytest.raises(ModelError, match=r"holds no model \(config.json is missing\)"):
        load_model(tokenizer_dir)


def test_missing_paths_and_files(tmp_path):
    with pytest.raises(ModelError, match="model directory ./nope does not exist"):
        locate("./nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ModelError, match="is a file"):
        locate(str(tmp_path / "f.txt"))


def test_uncached_hub_id_fails_at_once_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelError, match="not in the Hugging Face cache.*pass a local model directory"):
        load_model("nobody/no-such-model-xyz")
    assert time.monotonic() - start < 5


def test_uncached_hub_id_without_network_fails_at_once(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    start = time.monotonic()
    with pytest.raises(ModelError, match="the hub cannot be reached; pass a local model directory"):
        locate("nobody/no-such-model-xyz")
    assert time.monotonic() - start < 5


def test_cached_hub_id_loads_offline(tmp_path, tiny_model_dir):
    """A model in the Hugging Face cache layout is found by its id without any network."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text("a" * 40)
    code = (
        "from llmctl.core.model import load_model, load_tokenizer; "
        "m = load_model('someone/tiny'); t = load_tokenizer('someone/tiny'); "
        "print(m.config.n_layer, t.eos_token_id)"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "256"]


def test_hub_ids_and_paths_are_told_apart():
    from llmctl.core.hub import _looks_like_path

    assert not _looks_like_path("gpt2") and not _looks_like_path("openai-community/gpt2")
    assert all(_looks_like_path(p) for p in ("./m", "/m", "~/m", "runs/a/b", "../m"))
