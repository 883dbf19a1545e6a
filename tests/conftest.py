"""Shared fixtures: a tiny real model, tokenizer and corpus made on the fly, and ways to run the real CLI."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests must never wait on the network or write to the user's cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_SUBJECTS = ["The cat", "A farmer", "My neighbour", "The old ship", "Every child", "The river", "Her brother"]
_VERBS = ["watched", "carried", "painted", "forgot", "remembered", "followed", "built", "sold"]
_OBJECTS = ["the red door", "a quiet garden", "three small boxes", "the morning train", "an empty cup", "the hill"]
_ENDINGS = ["before dawn", "after the storm", "in the market", "with great care", "for no reason", "at noon"]


def make_corpus(n_paragraphs: int = 60, seed: int = 0) -> str:
    """Deterministic English-like text: paragraphs of simple sentences separated by blank lines."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n_paragraphs):
        sentences = [
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}."
            for _ in range(rng.randint(2, 5))
        ]
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return make_corpus()


@pytest.fixture()
def corpus_file(tmp_path: Path, corpus_text: str) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text)
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level tokenizer (ids 0..255 are bytes, 256 is <|endoftext|>) saved in the Hugging Face format."""
    from llmctl.core.tokenizer import byte_tokenizer, to_transformers

    path = tmp_path_factory.mktemp("tokenizer")
    to_transformers(byte_tokenizer(["<|endoftext|>"]), "<|endoftext|>").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir: Path) -> Path:
    """A 2-layer, 32-wide GPT-2 with random weights and the byte tokenizer, saved as a Hugging Face model directory."""
    import torch

    from llmctl.config import ModelConfig
    from llmctl.core.model import build_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(
        ModelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64), len(tokenizer), tokenizer.eos_token_id
    )
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_llmctl(*args: str, input: str | bytes | None = None, cwd: Path | None = None, env: dict | None = None,
               timeout: float = 600) -> CliResult:
    """Run the real entry point (`python -m llmctl`) in a subprocess and capture both streams."""
    full_env = {k: v for k, v in os.environ.items() if k != "LLMCTL_DEBUG"}
    full_env.update({"HF_HUB_OFFLINE": "1", **(env or {})})
    binary = isinstance(input, bytes)
    proc = subprocess.run(
        [sys.executable, "-m", "llmctl", *args],
        input=input,
        capture_output=True,
        text=not binary,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
    )
    out, err = proc.stdout, proc.stderr
    if binary:
        out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    return CliResult(proc.returncode, out, err)


@pytest.fixture()
def llmctl():
    """`llmctl(*args, input=..., cwd=...)` runs the real CLI in a subprocess."""
    return run_llmctl


def write_prepared(path: Path, text: str, tokenizer_dir: Path, val_fraction: float = 0.1) -> Path:
    """A prepared-data directory in the format `preprocess` writes (byte ids, tail split), made without preprocess,
    so that train and eval tests do not depend on it."""
    import dataclasses
    import json
    import shutil

    import numpy as np

    from llmctl.core.files import sha256_file
    from llmctl.core.shards import ShardMeta

    path.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
    n_val = int(len(ids) * val_fraction)
    splits = {"train": ids[: len(ids) - n_val], "val": ids[len(ids) - n_val :]}
    for name, arr in splits.items():
        arr.tofile(path / f"{name}.bin")
    meta = ShardMeta(
        dtype="uint16",
        vocab_size=257,
        eos_token_id=256,
        tokens={k: int(len(v)) for k, v in splits.items()},
        documents={"train": 1, "val": 1},
        bytes={k: int(len(v)) for k, v in splits.items()},
        inputs=[],
        tokenizer_sha256=sha256_file(path / "tokenizer.json"),
        config_sha256="test",
    )
    (path / "meta.json").write_text(json.dumps(dataclasses.asdict(meta), indent=2))
    return path


@pytest.fixture()
def prepared_dir(tmp_path: Path, corpus_text: str, tokenizer_dir: Path) -> Path:
    """Prepared shards of the test corpus (byte vocabulary, last 10% as validation)."""
    return write_prepared(tmp_path / "prepared", corpus_text, tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir: Path) -> Path:
    """A 2-layer, 32-wide Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention: 4 query heads sharing 2 key/value
    heads) with random weights and the byte tokenizer, saved as a Hugging Face model directory."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llmctl.core.model import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
