"""`llmctl train` through the real entry point: stdout/stderr, exit codes, signals, SIGKILL + resume, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import lm_config, train_run

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def flags(raw: dict) -> list[str]:
    """The config dict as --set flags (what a user would type)."""
    out = []
    for section, values in raw.items():
        for key, value in values.items():
            out += ["--set", f"{section}.{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return out


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmctl", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {path.name} appeared: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.002)


def equal_weights(a: Path, b: Path, name: str = "model.safetensors") -> bool:
    wa, wb = load_file(str(a / name)), load_file(str(b / name))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_stdout_is_the_model_path_or_the_json_summary(tmp_path, prepared_dir, llmctl):
    raw = lm_config(tmp_path / "run", prepared_dir, train={"max_steps": 6})
    result = llmctl("train", *flags(raw))
    assert result.code == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'run'}\n"
    assert "training summary" in result.stderr and "final val loss" in result.stderr
    again = llmctl("train", *flags(raw), "--resume", "--json", "--quiet")  # finished: just report
    assert again.code == 0 and again.stderr == ""
    summary = json.loads(again.stdout)
    for key in ("final_val_loss", "best_val_loss", "steps", "tokens", "wall_time_s", "tokens_per_s", "model_path"):
        assert key in summary
    assert summary["steps"] == 6 and summary["model_path"] == str(tmp_path / "run")


def test_bad_input_is_one_line_and_exit_1(tmp_path, prepared_dir, llmctl):
    raw = lm_config(tmp_path / "run", prepared_dir, train={"context": 100})
    result = llmctl("train", *flags(raw))
    assert result.code == 1 and result.stdout == ""
    assert result.stderr == "Error: train.context: 100 is longer than the model's 64 positions (model.n_positions)\n"
    assert not (tmp_path / "run").exists()


def lora_sections(kind: str, base: Path, dropout: float = 0.0) -> dict:
    """Extra config sections for a LoRA run of the tiny pretrained model (`kind` "lora"), none for "full"."""
    if kind == "full":
        return {}
    return {"model": {"pretrained": str(base)}, "lora": {"enabled": True, "rank": 4, "dropout": dropout}}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_sigkill_at_any_step_then_resume_ends_bit_identical(tmp_path, prepared_dir, llmctl, tiny_model_dir, kind):
    """A real process killed with SIGKILL mid-run, resumed with --resume, ends with exactly the weights of a run
    that was never interrupted (CPU, fp32); with LoRA too (adapter dropout included)."""
    common = {"max_steps": 300, "checkpoint_interval": 10, "eval_interval": 100, "keep_checkpoints": 2}
    extra = lora_sections(kind, tiny_model_dir, dropout=0.1)  # dropout masks must be redrawn exactly too
    train_run(lm_config(tmp_path / "ref", prepared_dir, train=common, **extra))
    raw = lm_config(tmp_path / "run", prepared_dir, train=common, **extra)
    proc = start(["train", *flags(raw)])
    wait_for(tmp_path / "run" / "checkpoints" / "step-00000100", proc)
    time.sleep(0.01)  # land somewhere between checkpoints, perhaps inside a write
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "running"
    resumed = llmctl("train", *flags(raw), "--resume", "--json")
    assert resumed.code == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["steps"] == 300 and int(Path(summary["resumed_from"]).name[5:]) >= 100
    assert equal_weights(tmp_path / "ref", tmp_path / "run")
    if kind == "lora":
        assert equal_weights(tmp_path / "ref" / "adapter", tmp_path / "run" / "adapter", "adapter_model.safetensors")


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_75(tmp_path, prepared_dir, llmctl):
    raw = lm_config(tmp_path / "run", prepared_dir,
                    train={"max_steps": 100000, "checkpoint_interval": 50, "eval_interval": 0})
    proc = start(["train", *flags(raw)])
    wait_for(tmp_path / "run" / "checkpoints" / "step-00000050", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75 and out == ""
    assert "Error: interrupted at step" in err and "--resume" in err
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert status["status"] == "interrupted"
    assert (tmp_path / "run" / "checkpoints" / f"step-{status['step']:08d}" / "model.safetensors").is_file()
    # and the interrupted run continues where it stopped
    resumed = llmctl("train", *flags({**raw, "train": {**raw["train"], "max_steps": status["step"] + 5}}),
                     "--resume", "--force", "--json", "--quiet")
    assert resumed.code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["steps"] == status["step"] + 5


@pytest.mark.slow
@pytest.mark.parametrize("fsdp, kind", [(False, "full"), (True, "full"), (False, "lora")],
                         ids=["ddp", "fsdp", "ddp-lora"])
def test_two_gloo_processes_match_one_process(tmp_path, prepared_dir, tiny_model_dir, fsdp, kind):
    """torchrun, 2 CPU processes (DDP, or FSDP2 sharding; DDP with LoRA): each draws its half of the same global
    batch; losses and weights match a 1-process run."""
    train = {"max_steps": 10, "batch_size": 4, "grad_accum": 2, "eval_interval": 5, "log_interval": 1}
    extra = lora_sections(kind, tiny_model_dir)
    train_run(lm_config(tmp_path / "one", prepared_dir, train=train, **extra))
    raw = lm_config(tmp_path / "two", prepared_dir, train={**train, "fsdp": fsdp}, **extra)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "llmctl", "train", *flags(raw), "--quiet"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{tmp_path / 'two'}\n"  # rank 0 alone reports
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a, b)
    wa = load_file(str(tmp_path / "one" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "model.safetensors"))
    for name in wa.keys() & wb.keys():
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6)
    meta = json.loads((tmp_path / "two" / "checkpoints" / "step-00000010" / "meta.json").read_text())
    assert meta["world_size"] == 2
    if kind == "lora":
        adapters = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000010" / "model.safetensors"))
        assert adapters and all(".lora_" in k for k in adapters)
        name = "transformer.h.0.attn.c_attn.weight"  # merged: the adapted layer moved
        assert not torch.equal(wa[name], load_file(str(tiny_model_dir / "model.safetensors"))[name])


def test_a_second_trainer_in_the_same_run_directory_is_refused(tmp_path, prepared_dir):
    import fcntl

    from llmctl.errors import LlmctlError

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        held.write("4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(LlmctlError, match=r"another llmctl train \(pid 4242\) is running in"):
            train_run(lm_config(out, prepared_dir, train={"max_steps": 2}))
