"""`llmctl train` in-process: real 2-layer GPT-2s for a few dozen steps on the byte-level test corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmctl import train
from llmctl.config import config_from_dict
from llmctl.core.optim import lr_at
from llmctl.errors import CheckpointError, ConfigError, DataError, LlmctlError, ModelError

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}


def lm_config(out_dir: Path, data_dir: Path, **sections) -> dict:
    """A tiny causal-LM run as a YAML-shaped dict; `sections` override keys per section."""
    raw = {
        "run": {"out_dir": str(out_dir), "seed": 7, "threads": 1},  # tiny models: one thread is fastest
        "data": {"dir": str(data_dir)},
        "model": dict(TINY),
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 4},
        "train": {"max_steps": 24, "batch_size": 4, "context": 32, "eval_interval": 8, "eval_batches": 4,
                  "log_interval": 4, "precision": "fp32"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def train_run(raw: dict, **kwargs) -> dict:
    return train.run(config_from_dict(raw), quiet=True, **kwargs)


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_loss_decreases_and_the_run_directory_is_a_hugging_face_model(tmp_path, prepared_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    result = train_run(lm_config(out, prepared_dir, train={"max_steps": 40, "eval_interval": 20}))
    assert result["model_path"] == str(out)
    assert result["steps"] == 40 and result["tokens"] == 40 * 4 * 32
    lines = metrics(out)
    train_losses = [r["loss"] for r in lines if "loss" in r]
    val_losses = [r["val_loss"] for r in lines if "val_loss" in r]
    assert train_losses[-1] < train_losses[0] - 1.0  # from ~ln(257) = 5.55 well down
    assert val_losses[-1] < val_losses[0]
    assert result["final_val_loss"] == pytest.approx(val_losses[-1], abs=1e-5)
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed"):
        assert key in lines[0]
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file() and (out / "generation_config.json").is_file()
    assert json.loads((out / "run.json").read_text())["status"] == "finished"

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.n_layer == 2 and model.config.vocab_size == 257
    ids = tokenizer("The cat", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == ids.shape[1] + 5
    # the exported weights are the final checkpoint's
    final = weights(out / "checkpoints" / "step-00000040")
    exported = weights(out)
    shared = final.keys() & exported.keys()  # tied lm_head/wte: each file keeps one of the two names
    assert len(shared) >= len(exported) - 1 and all(torch.equal(final[k], exported[k]) for k in shared)


def test_schedule_applied_lr_in_metrics_follows_lr_at(tmp_path, prepared_dir):
    raw = lm_config(tmp_path / "run", prepared_dir, train={"max_steps": 20, "log_interval": 1, "eval_interval": 0},
                    optim={"schedule": "cosine", "warmup_steps": 5})
    train_run(raw)
    cfg = config_from_dict(raw)
    lines = [r for r in metrics(tmp_path / "run") if "lr" in r]
    assert [r["step"] for r in lines] == list(range(1, 21))
    for r in lines:  # step N reports the rate its N-th update used: lr_at(N - 1)
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, cfg.optim, 20), rel=1e-9)
    assert lines[0]["lr"] == 0.0 and max(r["lr"] for r in lines) == pytest.approx(3e-3)


def test_linear_schedule_is_get_linear_schedule_with_warmup(tmp_path, prepared_dir):
    from transformers import get_linear_schedule_with_warmup

    raw = lm_config(tmp_path / "run", prepared_dir, train={"max_steps": 12, "log_interval": 1, "eval_interval": 0},
                    optim={"schedule": "linear", "warmup_steps": 3})
    train_run(raw)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-3)
    sched = get_linear_schedule_with_warmup(opt, 3, 12)
    expected = []
    for _ in range(12):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [r["lr"] for r in metrics(tmp_path / "run") if "lr" in r] == pytest.approx(expected, abs=1e-12)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, prepared_dir):
    big = lm_config(tmp_path / "a", prepared_dir, train={"batch_size": 8, "grad_accum": 1, "max_steps": 6})
    small = lm_config(tmp_path / "b", prepared_dir, train={"batch_size": 2, "grad_accum": 4, "max_steps": 6})
    train_run(big)
    train_run(small)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_same_seed_same_weights_and_checkpoints_keep_last_k_and_best(tmp_path, prepared_dir):
    raw = lm_config(tmp_path / "a", prepared_dir, train={"eval_interval": 4, "keep_checkpoints": 2})
    result = train_run(raw)
    names = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    best = Path(result["best_checkpoint"]).name
    assert set(names) == {"step-00000020", "step-00000024", best}
    train_run(lm_config(tmp_path / "b", prepared_dir, train={"eval_interval": 4, "keep_checkpoints": 2}))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_bit_identically_in_process(tmp_path, prepared_dir):
    """Lose everything after step 12's checkpoint, resume, and end with the uninterrupted run's exact weights.
    (The SIGKILL version of this, with a real killed process, is in test_train_cli.py.)"""
    import shutil

    ref = lm_config(tmp_path / "ref", prepared_dir, train={"checkpoint_interval": 6})
    train_run(ref)
    cut = lm_config(tmp_path / "cut", prepared_dir, train={"checkpoint_interval": 6, "keep_checkpoints": 9})
    train_run(cut)
    for path in (tmp_path / "cut" / "checkpoints").iterdir():
        if path.name > "step-00000012":
            shutil.rmtree(path)
    (tmp_path / "cut" / "model.safetensors").unlink()
    result = train_run({**cut, "train": {**cut["train"], "resume": True}})
    assert result["resumed_from"].endswith("step-00000012") and result["steps"] == 24
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in metrics(tmp_path / "cut") if "loss" in r]
    assert steps == [4, 8, 12, 16, 20, 24]  # the lines of redone steps were replaced, not duplicated


def test_resume_refuses_a_changed_config_unless_forced(tmp_path, prepared_dir):
    raw = lm_config(tmp_path / "run", prepared_dir, train={"max_steps": 8})
    train_run(raw)
    changed = lm_config(tmp_path / "run", prepared_dir, train={"max_steps": 8, "resume": True}, optim={"lr": 1e-2})
    with pytest.raises(CheckpointError, match=r"config changed \(optim.lr: 0.003 -> 0.01\).*--force"):
        train_run(changed)
    result = train_run(changed, force=True)
    assert result["steps"] == 8


def test_resume_auto_starts_fresh_then_continues_then_is_done(tmp_path, prepared_dir):
    raw = lm_config(tmp_path / "run", prepared_dir, train={"max_steps": 8, "resume": "auto"})
    first = train_run(raw)
    assert first["resumed_from"] is None and first["steps"] == 8
    again = train_run(raw)  # cron runs it again: nothing left to do
    assert again["resumed_from"].endswith("step-00000008") and again["steps"] == 8
    assert again["final_val_loss"] == pytest.approx(first["final_val_loss"])
    more = train_run(lm_config(tmp_path / "run", prepared_dir, train={"max_steps": 12, "resume": "auto"}), force=True)
    assert more["steps"] == 12


def test_output_directory_holding_another_run_is_refused_and_untouched(tmp_path, prepared_dir):
    out = tmp_path / "run"
    train_run(lm_config(out, prepared_dir, train={"max_steps": 4}))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(LlmctlError, match="already holds a different run .*--force"):
        train_run(lm_config(out, prepared_dir, train={"max_steps": 4}, optim={"lr": 1e-2}))
    with pytest.raises(LlmctlError, match="already holds this run"):
        train_run(lm_config(out, prepared_dir, train={"max_steps": 4}))
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert before == after
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(LlmctlError, match="not empty and holds no llmctl run"):
        train_run(lm_config(stranger, prepared_dir, train={"max_steps": 4}))
    assert sorted(p.name for p in stranger.iterdir() if p.name != ".lock") == ["notes.txt"]


def test_nan_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path, prepared_dir):
    out = tmp_path / "run"
    raw = lm_config(out, prepared_dir, train={"max_steps": 200, "checkpoint_interval": 1, "eval_interval": 0},
                    # the most violent settings the config check allows: Adam without a second moment, no clipping
                    optim={"lr": 1.0, "warmup_steps": 0, "grad_clip": 0.0, "schedule": "constant", "beta2": 0.0,
                           "eps": 1e-30, "weight_decay": 0.0})
    with pytest.raises(LlmctlError, match=r"(loss|gradient norm) became (nan|inf) at step \d+.*optim\.eps.*continue "
                                          r"from .*step-\d+"):
        train_run(raw)
    kept = sorted((out / "checkpoints").iterdir())
    assert kept, "the checkpoints before the blow-up are kept"
    for path in kept:
        assert all(torch.isfinite(t).all() for t in weights(path).values())


def test_limits_max_tokens_and_epochs(tmp_path, prepared_dir):
    by_tokens = train_run(lm_config(tmp_path / "a", prepared_dir, train={"max_steps": 0, "max_tokens": 1000}))
    assert by_tokens["steps"] == 8 and by_tokens["stopped_by"] == "max_tokens"  # ceil(1000 / 128)
    n_train = json.loads((prepared_dir / "meta.json").read_text())["tokens"]["train"]
    by_epochs = train_run(lm_config(tmp_path / "b", prepared_dir, train={"max_steps": 0, "epochs": 0.1}))
    assert by_epochs["steps"] == -(-int(0.1 * n_train) // 128) and by_epochs["stopped_by"] == "epochs"
    timed = train_run(lm_config(tmp_path / "c", prepared_dir, train={"max_steps": 0, "max_time": 0.3}))
    assert timed["stopped_by"] == "max_time" and timed["steps"] > 0


def test_muon_trains(tmp_path, prepared_dir):
    raw = lm_config(tmp_path / "run", prepared_dir, optim={"name": "muon", "muon_lr": 0.02})
    result = train_run(raw)
    losses = [r["loss"] for r in metrics(tmp_path / "run") if "loss" in r]
    assert losses[-1] < losses[0] - 1.0 and result["final_val_loss"] < 4.0


def test_fine_tune_a_pretrained_model(tmp_path, prepared_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    raw = lm_config(tmp_path / "run", prepared_dir, model={"pretrained": str(tiny_model_dir)},
                    train={"max_steps": 8, "context": 64})
    result = train_run(raw)
    assert result["steps"] == 8
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tuned.config.n_positions == base.config.n_positions == 64
    assert not torch.equal(tuned.transformer.h[0].mlp.c_fc.weight, base.transformer.h[0].mlp.c_fc.weight)


def test_hf_forward_and_lean_forward_train_alike(tmp_path, prepared_dir):
    train_run(lm_config(tmp_path / "lean", prepared_dir, train={"max_steps": 6}))
    train_run(lm_config(tmp_path / "hf", prepared_dir, train={"max_steps": 6}, model={"lean": False}))
    a, b = weights(tmp_path / "lean"), weights(tmp_path / "hf")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one-line errors, nothing written


def test_context_longer_than_the_model_positions(tmp_path, prepared_dir):
    with pytest.raises(ConfigError, match="train.context: 128 is longer than the model's 64 positions"):
        train_run(lm_config(tmp_path / "run", prepared_dir, train={"context": 128}))
    assert not (tmp_path / "run").exists()


def test_vocabulary_mismatch_with_a_pretrained_model(tmp_path, prepared_dir, tokenizer_dir):
    from llmctl.config import ModelConfig
    from llmctl.core.model import build_model

    small = tmp_path / "small-vocab"
    build_model(ModelConfig(**TINY), 200, 199).save_pretrained(small)
    with pytest.raises(ModelError, match="vocabulary mismatch: .* uses 257 token ids but model .* has 200"):
        train_run(lm_config(tmp_path / "run", prepared_dir, model={"pretrained": str(small)}))


def test_shards_smaller_than_one_batch(tmp_path, tokenizer_dir):
    from tests.conftest import write_prepared

    data = write_prepared(tmp_path / "data", "tiny text " * 10, tokenizer_dir)
    with pytest.raises(DataError, match=r"train split holds 90 tokens, less than one batch \(4 x 1 x 32 tokens\)"):
        train_run(lm_config(tmp_path / "run", data))


def test_corrupted_checkpoint_is_a_clear_error(tmp_path, prepared_dir):
    raw = lm_config(tmp_path / "run", prepared_dir, train={"max_steps": 8, "checkpoint_interval": 4})
    train_run(raw)
    latest = tmp_path / "run" / "checkpoints" / "step-00000008"
    data = (latest / "state.pt").read_bytes()
    (latest / "state.pt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"checkpoint .*step-00000008 is corrupted: state.pt"):
        train_run({**raw, "train": {**raw["train"], "resume": True, "max_steps": 12}}, force=True)
    (latest / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="is corrupted: model.safetensors"):
        train_run({**raw, "train": {**raw["train"], "resume": True}})


def test_resume_without_a_checkpoint(tmp_path, prepared_dir):
    with pytest.raises(CheckpointError, match="no checkpoint in .* to resume from"):
        train_run(lm_config(tmp_path / "run", prepared_dir, train={"resume": True}))


def test_out_of_memory_becomes_advice():
    cfg = config_from_dict({"train": {"batch_size": 64}})
    with pytest.raises(RuntimeError) as info:
        torch.empty(1 << 50, dtype=torch.uint8)  # a real allocator failure
    assert train.is_oom(info.value)
    assert "lower train.batch_size and raise train.grad_accum" in train.oom_message(cfg, 256)
    assert not train.is_oom(RuntimeError("shape mismatch"))


# ---------------------------------------------------------------------------------------------------------------
# Classification


def write_labeled(path: Path, n: int = 80) -> Path:
    import random

    rng = random.Random(1)
    good = ["wonderful", "great", "lovely", "superb", "delightful"]
    bad = ["awful", "boring", "terrible", "dreadful", "dull"]
    lines = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        word = rng.choice(good if label == "pos" else bad)
        lines.append(json.dumps({"text": f"The film was {word}", "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_classification_counts_the_tokens_of_its_examples():
    """Without padding, and from the host's copy of the examples (no device sync)."""
    import numpy as np

    from llmctl.train.data import LabeledData

    data = LabeledData([[1, 2, 3], [4], [5, 6]], [0, 1, 0], [[7]], [1], ["a", "b"], pad_id=0, seed=0)
    assert data.tokens_of(np.array([0, 2, 2])) == 7
    padded = data.batch(np.array([0, 1]), torch.device("cpu"))
    assert data.tokens_of(np.array([0, 1])) == int(padded["attention_mask"].sum()) == 4


def test_classification_fine_tune_from_scratch(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = write_labeled(tmp_path / "reviews.jsonl")
    out = tmp_path / "clf"
    raw = {
        "run": {"out_dir": str(out), "seed": 3, "threads": 1},
        "data": {"inputs": [str(data)], "val_fraction": 0.25},
        "model": dict(TINY),
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"task": "classification", "max_steps": 60, "batch_size": 8, "eval_interval": 0,
                  "log_interval": 10, "precision": "fp32"},
    }
    result = train_run(raw)
    assert result["task"] == "classification" and result["final_val_accuracy"] >= 0.9
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "neg", 1: "pos"} and model.config.pad_token_id is not None
    batch = tokenizer(["The film was superb", "The film was dull"],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    assert [model.config.id2label[i] for i in predicted] == ["pos", "neg"]


def test_classification_from_a_pretrained_causal_lm(tmp_path, tiny_model_dir):
    data = write_labeled(tmp_path / "reviews.tsv.jsonl", n=40)
    raw = {
        "run": {"out_dir": str(tmp_path / "clf"), "threads": 1},
        "data": {"inputs": [str(data)]},
        "model": {"pretrained": str(tiny_model_dir)},
        "train": {"task": "classification", "epochs": 2, "max_steps": 0, "batch_size": 6, "precision": "fp32"},
    }
    result = train_run(raw)
    assert result["stopped_by"] == "epochs" and result["steps"] == 12  # 2 x ceil(36 / 6)
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    assert config["label2id"] == {"neg": 0, "pos": 1}


def test_raw_text_in_the_config_is_prepared_first_then_reused(tmp_path, corpus_file):
    raw = lm_config(tmp_path / "run", tmp_path / "data", data={"inputs": [str(corpus_file)], "documents": "file"},
                    tokenizer={"vocab_size": 256}, train={"max_steps": 4})
    result = train_run(raw)
    assert result["steps"] == 4 and (tmp_path / "data" / "meta.json").is_file()
    stamp = (tmp_path / "data" / "train.bin").stat().st_mtime_ns
    train_run(raw, force=True)  # up to date: not prepared again
    assert (tmp_path / "data" / "train.bin").stat().st_mtime_ns == stamp
