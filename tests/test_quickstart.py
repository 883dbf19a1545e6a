"""The README's first command, end to end through the real CLI, at a reduced step count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


@pytest.mark.slow
def test_quickstart_trains_generates_and_evaluates(llmctl, tmp_path):
    sets = [
        "--set", f"run.out_dir={tmp_path / 'run'}",
        "--set", f"data.dir={tmp_path / 'data'}",
        "--set", "train.max_steps=30",
        "--set", "train.eval_interval=15",
    ]  # fmt: skip
    trained = llmctl("train", "-c", str(QUICKSTART), *sets, cwd=tmp_path)
    assert trained.code == 0, trained.stderr
    assert trained.stdout == f"{tmp_path / 'run'}\n"  # stdout carries only the model path

    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0]  # it learned something in 30 steps

    # The run directory is a plain Hugging Face model directory.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    assert model.config.n_layer == 4 and len(tokenizer) == model.config.vocab_size == 4096
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "config.yaml").is_file()

    generated = llmctl("generate", "-c", str(QUICKSTART), *sets, "--set", "generate.max_new_tokens=20", cwd=tmp_path)
    assert generated.code == 0, generated.stderr
    assert generated.stdout.strip()

    evaluated = llmctl("eval", "-c", str(QUICKSTART), *sets, cwd=tmp_path)
    assert evaluated.code == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)  # stdout is not a terminal here, so it is JSON
    assert result["metrics"]["perplexity"] > 1

    again = llmctl("train", "-c", str(QUICKSTART), *sets, cwd=tmp_path)  # resume: auto, the run is finished
    assert again.code == 0 and again.stdout == trained.stdout
