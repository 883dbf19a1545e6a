"""`train.task: sft` end to end, and the generate --chat and eval sft/generation that follow it: real tiny GPT-2s and
Llamas on instruction data written on the fly."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_train import TINY, metrics, train_run, weights
from tests.test_train_cli import ENV, equal_weights, flags, start, wait_for

WORDS = ["red door", "quiet garden", "small box", "morning train", "empty cup", "old ship", "green hill", "lamp"]


def write_data(tmp_path: Path, n: int = 60, seed: int = 0) -> dict[str, Path]:
    """A conversations file (some multi-turn, some with a system message) and a prompt/completion file."""
    rng = random.Random(seed)
    chat, plain = tmp_path / "chat.jsonl", tmp_path / "plain.jsonl"
    with open(chat, "w") as f:
        for _ in range(n):
            w = rng.choice(WORDS)
            messages = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.3 else []
            messages += [{"role": "user", "content": f"Capitals: {w}"}, {"role": "assistant", "content": w.upper()}]
            if rng.random() < 0.4:
                messages += [{"role": "user", "content": "Reverse it"}, {"role": "assistant", "content": w[::-1]}]
            f.write(json.dumps({"messages": messages}) + "\n")
    with open(plain, "w") as f:
        for _ in range(n):
            w = rng.choice(WORDS)
            f.write(json.dumps({"prompt": f"Capitals: {w}\n", "completion": w.upper()}) + "\n")
    return {"chat": chat, "plain": plain}


def sft_config(out_dir: Path, inputs: list[Path], **sections) -> dict:
    raw = {
        "run": {"out_dir": str(out_dir), "seed": 7, "threads": 1},
        "data": {"inputs": [str(p) for p in inputs], "val_fraction": 0.2},
        "sft": {"chat_template": "chatml"},
        "model": {**TINY, "n_positions": 128},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 4},
        "train": {"task": "sft", "max_steps": 24, "batch_size": 4, "eval_interval": 8, "eval_batches": 0,
                  "log_interval": 4, "precision": "fp32"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


@pytest.fixture()
def data(tmp_path):
    return write_data(tmp_path)


def test_chat_sft_learns_and_the_run_directory_is_a_chat_model_for_plain_transformers(tmp_path, data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = train_run(sft_config(tmp_path / "run", [data["chat"]], train={"max_steps": 40}))
    losses = [r["loss"] for r in metrics(tmp_path / "run") if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    assert summary["examples"]["read"] == 60 and summary["examples"]["kept"] == 60
    run = tmp_path / "run"
    assert (run / "chat_template.jinja").is_file()
    tok = AutoTokenizer.from_pretrained(run)
    model = AutoModelForCausalLM.from_pretrained(run)
    assert model.get_input_embeddings().num_embeddings == len(tok) == 259  # bytes, <|endoftext|>, two markers
    messages = [{"role": "user", "content": "Capitals: lamp"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nCapitals: lamp<|im_end|>\n<|im_start|>assistant\n"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id  # plain model.generate stops at the end of the turn too


def test_prompt_completion_without_a_template_and_a_llama_fine_tune(tmp_path, data, tiny_llama_dir):
    plain = sft_config(tmp_path / "plain", [data["plain"]], sft={"chat_template": "none"})
    assert train_run(plain)["steps"] == 24
    assert not (tmp_path / "plain" / "chat_template.jinja").exists()
    llama = sft_config(tmp_path / "llama", [data["chat"]], model={"pretrained": str(tiny_llama_dir)},
                       train={"max_steps": 12})
    summary = train_run(llama)
    assert summary["final_val_loss"] < 10
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    assert type(model).__name__ == "LlamaForCausalLM" and model.get_input_embeddings().num_embeddings == 259


def test_packed_and_unpacked_runs_and_an_epoch_limit(tmp_path, data):
    packed = train_run(sft_config(tmp_path / "p", [data["chat"]], train={"max_steps": 0, "epochs": 1}))
    unpacked = train_run(sft_config(tmp_path / "u", [data["chat"]], sft={"chat_template": "chatml", "packing": False},
                                    train={"max_steps": 0, "epochs": 1}))
    assert unpacked["steps"] == 12  # 48 training examples, 4 a step
    assert packed["steps"] < unpacked["steps"]  # several conversations a row
    assert packed["stopped_by"] == unpacked["stopped_by"] == "epochs"


def test_sft_resume_continues_bit_identically_in_process(tmp_path, data):
    ref = sft_config(tmp_path / "ref", [data["chat"]], train={"checkpoint_interval": 6})
    train_run(ref)
    cut = sft_config(tmp_path / "cut", [data["chat"]], train={"checkpoint_interval": 6, "keep_checkpoints": 9})
    train_run(cut)
    for path in (tmp_path / "cut" / "checkpoints").iterdir():
        if path.name > "step-00000012":
            shutil.rmtree(path)
    result = train_run({**cut, "train": {**cut["train"], "resume": True}})
    assert result["resumed_from"].endswith("step-00000012")
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_sft_on_the_validation_file_is_the_trainers_validation_loss(tmp_path, data):
    from llmctl import evaluate
    from llmctl.config import config_from_dict

    val = tmp_path / "val.jsonl"
    val.write_text("".join(data["chat"].read_text().splitlines(keepends=True)[:12]))
    raw = sft_config(tmp_path / "run", [data["chat"]], sft={"chat_template": "chatml", "validation": str(val)})
    summary = train_run(raw)
    result = evaluate.run(config_from_dict({**raw, "eval": {"task": "sft", "input": str(val), "batch_size": 3}}))
    # the trainer scored packed rows, eval one example a row: the same number when packing is exact
    assert result["metrics"]["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)
    assert result["metrics"]["examples"] == 12


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny chat model, trained once for the CLI tests below."""
    tmp = tmp_path_factory.mktemp("chat-run")
    files = write_data(tmp)
    train_run(sft_config(tmp / "run", [files["chat"]], train={"max_steps": 30}))
    return tmp / "run", files


def test_generate_chat_renders_the_template_and_reads_messages(chat_run, llmctl):
    run, _ = chat_run
    lines = "\n".join([json.dumps({"prompt": "Capitals: lamp"}),
                       json.dumps({"messages": [{"role": "user", "content": "Capitals: lamp"}]})]) + "\n"
    result = llmctl("generate", "-m", str(run), "--chat", "--input-format", "jsonl", "-f", "jsonl", "-n", "8",
                    "--greedy", input=lines)
    assert result.code == 0, result.stderr
    first, second = (json.loads(x) for x in result.stdout.splitlines())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run)
    rendered = tok.apply_chat_template([{"role": "user", "content": "Capitals: lamp"}], tokenize=False,
                                       add_generation_prompt=True)
    assert first["prompt_tokens"] == len(tok.encode(rendered, add_special_tokens=False))
    assert first["completion"] == second["completion"] and "messages" in second
    system = llmctl("generate", "-m", str(run), "--chat", "--system", "Be brief.", "-p", "Capitals: lamp",
                    "-f", "jsonl", "-n", "4")
    assert json.loads(system.stdout)["prompt_tokens"] > first["prompt_tokens"]
    plain = llmctl("generate", "-m", str(run), "--input-format", "jsonl", "-f", "jsonl", "-n", "2",
                   input=lines.splitlines()[1] + "\n")
    assert plain.code == 1 and "needs chat mode" in plain.stderr


def test_generation_stops_at_the_end_of_turn_token(tiny_model_dir):
    from llmctl.core.decode import Decoder, Request, SamplingParams
    from llmctl.core.model import load_model, load_tokenizer

    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    request = Request([72, 105], SamplingParams(max_new_tokens=6, temperature=0.0), 0)
    first = [e for e in Decoder(model, tok, ignore_eos=True).generate([request]) if hasattr(e, "result")][0]
    stop = first.result.token_ids[2]
    ended = [e for e in Decoder(model, tok, stop_ids=[stop]).generate([request]) if hasattr(e, "result")][0]
    assert ended.result.finish_reason == "eos" and ended.result.token_ids == first.result.token_ids[:3]


def test_eval_generation_scores_answers_writes_predictions_and_gates(chat_run, llmctl, tmp_path):
    run, files = chat_run
    preds = tmp_path / "preds.jsonl"
    result = llmctl("eval", "-m", str(run), "--task", "generation", "-i", str(files["plain"]), "--predictions-out",
                    str(preds), "--set", "eval.max_new_tokens=12", "--fail-under", "exact_match=1.01", "--json")
    assert result.code == 3, result.stderr
    out = json.loads(result.stdout)
    assert out["task"] == "generation" and out["metrics"]["examples"] == 60
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(rows) == 60 and {"reference", "prediction", "exact_match", "normalized_match"} <= rows[0].keys()
    assert out["metrics"]["exact_match"] == sum(r["exact_match"] for r in rows) / 60
    loss = llmctl("eval", "-m", str(run), "--task", "sft", "-i", str(files["chat"]), "--json", "-q")
    assert loss.code == 0 and json.loads(loss.stdout)["metrics"]["tokens"] > 0


def test_normalized_match_ignores_case_punctuation_articles_and_spacing():
    from llmctl.evaluate_sft import normalize

    assert normalize("  The Red  door!") == normalize("red door") == "red door"
    assert normalize("a cat") != normalize("cats")


BAD = {
    "not-json": ('{"prompt": "a", "completion": "b"}\nnot json\n', {}, "bad.jsonl:2: invalid JSON"),
    "neither-shape": ('{"question": "a", "answer": "b"}\n', {}, "bad.jsonl:1: neither"),
    "unknown-role": ('{"messages": [{"role": "bot", "content": "a"}]}\n', {}, "bad.jsonl:1: message 0 has unknown"),
    "non-string": ('{"messages": [{"role": "user", "content": ["a"]}]}\n', {}, "content must be a string"),
    "empty-answer": ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}\n', {},
                     "bad.jsonl:1: message 1 (assistant) is empty"),
    "answer-cut-away": ('{"prompt": "' + "p" * 200 + '", "completion": "b"}\n', {}, "every example was dropped"),
    "too-long-fail": ('{"prompt": "' + "p" * 200 + '", "completion": "b"}\n', {"sft.truncation": "fail"},
                      "bad.jsonl:1: 222 tokens, more than the 128-token context"),
    "no-template": ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
                    {"sft.chat_template": "auto"}, "set sft.chat_template"),
    "template-fails": ('{"prompt": "a", "completion": "b"}\n',
                       {"sft.chat_template": "{{ raise_exception('no system role') }}"},
                       "bad.jsonl:1: chat template config failed: no system role"),
    "empty-file": ("", {}, "no examples"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_instruction_data_is_one_line_exit_1_and_nothing_written(case, tmp_path, llmctl):
    text, sets, message = BAD[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    raw = sft_config(tmp_path / "run", [bad])
    raw["sft"].update({k.split(".")[1]: v for k, v in sets.items()})
    result = llmctl("train", *flags(raw))
    assert result.code == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sft_sigkill_then_resume_ends_bit_identical(tmp_path, data, llmctl):
    common = {"max_steps": 150, "checkpoint_interval": 10, "eval_interval": 50, "keep_checkpoints": 2}
    train_run(sft_config(tmp_path / "ref", [data["chat"]], train=common))
    raw = sft_config(tmp_path / "run", [data["chat"]], train=common)
    proc = start(["train", *flags(raw)])
    wait_for(tmp_path / "run" / "checkpoints" / "step-00000050", proc)
    time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    resumed = llmctl("train", *flags(raw), "--resume", "--json")
    assert resumed.code == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["steps"] == 150 and int(Path(summary["resumed_from"]).name[5:]) >= 50
    assert equal_weights(tmp_path / "ref", tmp_path / "run")


@pytest.mark.slow
def test_sft_two_gloo_processes_match_one_process(tmp_path, data):
    train = {"max_steps": 8, "batch_size": 2, "grad_accum": 2, "eval_interval": 4, "log_interval": 1}
    train_run(sft_config(tmp_path / "one", [data["chat"]], train=train))
    raw = sft_config(tmp_path / "two", [data["chat"]], train=train)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "llmctl", "train", *flags(raw), "--quiet"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a, b)
    assert [r["tokens"] for r in one if "tokens" in r] == [r["tokens"] for r in two if "tokens" in r]


def test_sft_reads_parquet_as_it_reads_jsonl(tmp_path, data):
    """The same examples as a Parquet table (messages as a list of structs) train to the same weights."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in data["chat"].read_text().splitlines()]
    table = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table, row_group_size=16)
    train = {"max_steps": 6}
    a = train_run(sft_config(tmp_path / "jsonl", [data["chat"]], train=train))
    b = train_run(sft_config(tmp_path / "parquet", [table], train=train))
    assert a["examples"] == b["examples"] and a["final_val_loss"] == b["final_val_loss"]
    wa, wb = weights(tmp_path / "jsonl"), weights(tmp_path / "parquet")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
