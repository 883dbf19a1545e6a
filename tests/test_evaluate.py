"""`llmctl eval` on language modelling: agreement with transformers, inputs, model choice, output, and gates through
the real CLI."""

import json
import math

import pytest
import torch

from llmctl import evaluate
from llmctl.config import load_config
from llmctl.errors import ConfigError, DataError, ModelError

SHORT = "The cat watched the red door."  # 29 bytes: with <|endoftext|> in front it fits one 64-token window


def _run(*sets, **values):
    return evaluate.run(load_config(None, list(sets), {f"eval.{k}": v for k, v in values.items()}), quiet=True)


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from llmctl.core.model import load_model

    return load_model(tiny_model_dir).eval()


def test_one_window_agrees_with_transformers_loss(tiny_model_dir, tmp_path, lm):
    path = tmp_path / "short.txt"
    path.write_text(SHORT)
    result = _run(model=str(tiny_model_dir), input=str(path))
    ids = torch.tensor([[256, *SHORT.encode()]])  # the byte tokenizer: <|endoftext|> then one id per byte
    expected = lm(ids, labels=ids).loss.item()
    m = result["metrics"]
    assert m["tokens"] == len(SHORT) and m["bytes"] == len(SHORT.encode())  # every byte scored, the prefix is not
    assert m["loss"] == pytest.approx(expected, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(expected * m["tokens"] / math.log(2) / m["bytes"], rel=1e-5)
    assert result["task"] == "lm" and result["settings"]["context"] == 64 and result["settings"]["add_bos"]


def test_without_bos_the_first_token_is_not_scored(tiny_model_dir, tmp_path, lm):
    path = tmp_path / "short.txt"
    path.write_text(SHORT)
    result = _run("eval.add_bos=false", model=str(tiny_model_dir), input=str(path))
    ids = torch.tensor([list(SHORT.encode())])
    assert result["metrics"]["tokens"] == len(SHORT) - 1
    assert result["metrics"]["loss"] == pytest.approx(lm(ids, labels=ids).loss.item(), rel=1e-5)


def test_long_text_uses_the_sliding_window(tiny_model_dir, corpus_file, corpus_text):
    coarse = _run(model=str(tiny_model_dir), input=str(corpus_file), stride=64)
    fine = _run(model=str(tiny_model_dir), input=str(corpus_file), stride=16, batch_size=32)
    n = len(corpus_text.encode())
    assert coarse["metrics"]["tokens"] == fine["metrics"]["tokens"] == n
    assert fine["settings"]["windows"] > coarse["settings"]["windows"] > n // 64
    assert fine["metrics"]["loss"] != pytest.approx(coarse["metrics"]["loss"], rel=1e-6)


def test_prepared_split_counts_its_tokens_and_bytes(tiny_model_dir, prepared_dir):
    from llmctl.core.shards import read_meta

    meta = read_meta(prepared_dir)
    result = _run(model=str(tiny_model_dir), input=str(prepared_dir), stride=32)
    assert result["metrics"]["tokens"] == meta.tokens["val"]  # the end-of-text prefix makes the first one count
    assert result["metrics"]["bytes"] == meta.bytes["val"]
    # data.dir is the default input
    same = evaluate.run(load_config(None, [f"data.dir={prepared_dir}", f"eval.model={tiny_model_dir}",
                                           "eval.stride=32"]), quiet=True)
    assert same["metrics"]["loss"] == pytest.approx(result["metrics"]["loss"])
    assert same["input"] == str(prepared_dir) and same["settings"]["split"] == "val"
    train = _run("eval.split=train", model=str(tiny_model_dir), input=str(prepared_dir), max_tokens=300)
    assert train["metrics"]["tokens"] == 300 and train["metrics"]["bytes"] == 300


def test_jsonl_documents_are_joined_by_end_of_text(tiny_model_dir, tmp_path):
    path = tmp_path / "held.jsonl"
    path.write_text('{"text": "first one"}\n\n{"text": "second"}\n')
    result = _run(model=str(tiny_model_dir), input=str(path))
    # 9 + 6 bytes, each one token, plus the separator between the documents
    assert result["metrics"]["tokens"] == 9 + 6 + 1 and result["metrics"]["bytes"] == 15
    path.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"held\.jsonl:2: .*'text'"):
        _run(model=str(tiny_model_dir), input=str(path))


def test_lm_input_errors(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.txt: no text"):
        _run(model=str(tiny_model_dir), input=str(empty))
    with pytest.raises(DataError, match="no such file"):
        _run(model=str(tiny_model_dir), input=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="longer than model"):
        _run(model=str(tiny_model_dir), input=str(empty), context=65)
    with pytest.raises(ConfigError, match="eval.input: nothing to evaluate"):
        evaluate.run(load_config(None, [f"data.dir={tmp_path}/none", f"eval.model={tiny_model_dir}"]), quiet=True)
    with pytest.raises(ModelError, match="no model given and run.out_dir .* does not exist; pass --model"):
        evaluate.run(load_config(None, [f"run.out_dir={tmp_path}/no-run"]), quiet=True)


def test_stride_longer_than_context_is_a_config_error():
    with pytest.raises(ConfigError, match="stride: 40 is longer than the context"):
        load_config(None, ["eval.context=32", "eval.stride=40"])


def test_gate_names_are_checked_before_scoring(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="eval.fail_over.perplexty: no such metric; did you mean perplexity"):
        _run("eval.fail_over.perplexty=50", model=str(tiny_model_dir), input=str(tmp_path / "not-read.txt"))


# ---------------------------------------------------------------------------------------------------------------
# The real CLI


def test_cli_json_on_stdout_table_on_stderr_and_output_file(llmctl, tiny_model_dir, corpus_file, tmp_path):
    out = tmp_path / "result.json"
    # A random byte model has perplexity near 257: both gates pass.
    res = llmctl("eval", "--model", str(tiny_model_dir), "--input", str(corpus_file), "--stride", "32",
                 "--output", str(out), "--fail-over", "perplexity=1000", "--fail-under", "tokens=10")
    assert res.code == 0, res.stderr
    result = json.loads(res.stdout)  # stdout is not a terminal: JSON by default, nothing else on it
    assert result == json.loads(out.read_text())
    assert {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"} <= set(result["metrics"])
    assert "perplexity" in res.stderr and "bits_per_byte" in res.stderr  # the table is for people, on stderr
    assert result["gates"]["passed"] and result["gates"]["failed"] == []
    assert [g["metric"] for g in result["gates"]["checked"]] == ["tokens", "perplexity"]


def test_cli_reads_stdin_and_uses_the_config_model(llmctl, tiny_model_dir, tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(f"run:\n  out_dir: {tiny_model_dir}\neval:\n  stride: 32\n")
    res = llmctl("eval", "-c", str(config), "-i", "-", "--quiet", input=SHORT * 5)
    assert res.code == 0, res.stderr
    assert res.stderr == ""
    result = json.loads(res.stdout)
    assert result["model"] == str(tiny_model_dir) and result["input"] == "<stdin>"
    assert result["metrics"]["tokens"] == len(SHORT) * 5


def test_cli_gates_exit_codes(llmctl, tiny_model_dir, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text(SHORT * 3)
    base = ("eval", "-m", str(tiny_model_dir), "-i", str(path))
    res = llmctl(*base, "--fail-over", "perplexity=40", "--fail-under", "bits_per_byte=100", "--fail-over", "loss=99")
    assert res.code == 3, res.stderr  # the model regressed: distinct from 1 (the eval crashed)
    gates = json.loads(res.stdout)["gates"]
    assert not gates["passed"]
    assert [(g["metric"], g["op"], g["threshold"]) for g in gates["failed"]] == [
        ("bits_per_byte", "fail_under", 100.0), ("perplexity", "fail_over", 40.0)]
    assert "gate failed: bits_per_byte" in res.stderr and "perplexity" in res.stderr

    res = llmctl(*base, "--fail-under", "acuracy=0.9")
    assert res.code == 1 and res.stdout == ""
    assert res.stderr.startswith("Error: eval.fail_under.acuracy: no such metric; available: loss, perplexity")
    assert "Traceback" not in res.stderr

    res = llmctl(*base, "--fail-under", "accuracy")
    assert res.code == 2 and "METRIC=VALUE" not in res.stdout and "expected NAME=VALUE" in res.stderr


def test_prepared_data_from_another_tokenizer_is_refused(tiny_model_dir, tmp_path, corpus_text):
    from llmctl.core.tokenizer import byte_tokenizer, to_transformers
    from tests.conftest import write_prepared

    other = tmp_path / "other-tokenizer"
    to_transformers(byte_tokenizer(["<|endoftext|>", "<|sep|>"]), "<|endoftext|>").save_pretrained(other)
    prepared = write_prepared(tmp_path / "prepared", corpus_text, other)
    with pytest.raises(DataError, match="tokenized with a different tokenizer than model"):
        _run(model=str(tiny_model_dir), input=str(prepared))
