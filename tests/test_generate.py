"""`llmctl generate` on a tiny real model: input and output formats, order, seeds, stop strings, truncation, model
resolution and bad input, in-process through `generate.run` (fast) and through the real CLI where the behaviour is
the CLI's (exit codes, streams, pipes)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from llmctl import generate
from llmctl.config import load_config
from llmctl.errors import ConfigError, DataError, ModelError

PROMPTS = ["The cat", "A farmer sold", "My neighbour", "xy", "The old ship carried", "é"]


@pytest.fixture(autouse=True)
def _propagate_logs(caplog):
    """Let caplog see llmctl's log lines even after a test has set up the CLI's own stderr handler."""
    logger = logging.getLogger("llmctl")
    old = logger.propagate
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="llmctl")
    yield
    logger.propagate = old


def cfg(model, **values):
    return load_config(None, [], {"generate.model": str(model), "generate.max_new_tokens": 12,
                                  **{f"generate.{k}": v for k, v in values.items()}})


def run(config, stdin: str | bytes | None = None, monkeypatch=None) -> list:
    if stdin is not None:
        data = stdin.encode() if isinstance(stdin, str) else stdin
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(data))))
    return list(generate.run(config, quiet=True))


def records(config, stdin=None, monkeypatch=None) -> list[dict]:
    config.generate.output_format = "jsonl"
    out = run(config, stdin, monkeypatch)
    assert all(isinstance(r, dict) for r in out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Output formats and order


def test_jsonl_records_carry_every_field(tiny_model_dir):
    out = records(cfg(tiny_model_dir, prompts=PROMPTS[:2], num_return_sequences=2))
    assert [(r["id"], r["index"]) for r in out] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    first = out[0]
    assert set(first) == {"id", "index", "prompt", "completion", "prompt_tokens", "tokens", "finish_reason",
                          "seed", "time_s"}
    assert first["prompt"] == "The cat" and first["prompt_tokens"] == 7
    assert first["tokens"] == 12 and first["finish_reason"] in ("length", "eos")
    assert isinstance(first["completion"], str) and first["time_s"] >= 0
    assert len({r["seed"] for r in out}) == 4
    json.dumps(out)  # all plain JSON


def test_text_output_is_completions_in_order_each_on_its_line(tiny_model_dir):
    config = cfg(tiny_model_dir, prompts=PROMPTS, stop=["\n"], output_format="text")
    text = "".join(run(config))
    expected = [r["completion"] for r in records(cfg(tiny_model_dir, prompts=PROMPTS, stop=["\n"]))]
    assert text == "".join(c + "\n" for c in expected)


def test_echo_puts_the_prompt_before_its_completion(tiny_model_dir):
    plain = "".join(run(cfg(tiny_model_dir, prompts=PROMPTS[:3], stop=["\n"])))
    echoed = "".join(run(cfg(tiny_model_dir, prompts=PROMPTS[:3], stop=["\n"], echo=True)))
    assert echoed.split("\n") == [p + c for p, c in zip(PROMPTS, plain.split("\n")[:3])] + [""]


def test_a_single_prompt_streams_in_many_chunks(tiny_model_dir):
    chunks = run(cfg(tiny_model_dir, prompts=["Hello"], max_new_tokens=40, do_sample=False))
    completion = records(cfg(tiny_model_dir, prompts=["Hello"], max_new_tokens=40, do_sample=False))[0]
    assert len(chunks) > 5
    assert "".join(chunks) == completion["completion"] + "\n"


@pytest.mark.parametrize("output_format", ["text", "jsonl"])
def test_same_seed_same_bytes_whatever_the_batch_size(tiny_model_dir, output_format):
    def out(batch_size):
        config = cfg(tiny_model_dir, prompts=PROMPTS, batch_size=batch_size, seed=7, temperature=1.0, top_p=0.9,
                     output_format=output_format)
        chunks = run(config)
        text = "".join(chunks) if output_format == "text" else [{**r, "time_s": 0} for r in chunks]
        return text

    assert out(1) == out(4) == out(8)
    other_seed = records(cfg(tiny_model_dir, prompts=PROMPTS, seed=8, temperature=1.0, top_p=0.9))
    assert [r["completion"] for r in other_seed] != [r["completion"] for r in records(
        cfg(tiny_model_dir, prompts=PROMPTS, seed=7, temperature=1.0, top_p=0.9))]


@pytest.mark.parametrize("output_format", ["text", "jsonl"])
def test_continuous_batching_changes_no_byte_of_the_output(tiny_model_dir, monkeypatch, output_format):
    """Prompts with 1 to 40 new tokens and stop strings, two completions each: continuous batching (rows taken
    over as they finish) gives the bytes of static batches, at any batch size."""
    lines = "".join(json.dumps({"prompt": p, "max_new_tokens": 1 + (13 * i) % 40, **({"stop": [" ", "e"]} if i % 3
                                else {})}) + "\n" for i, p in enumerate(PROMPTS * 3))

    def out(batch_size, continuous):
        config = cfg(tiny_model_dir, input_format="jsonl", batch_size=batch_size, continuous=continuous, seed=3,
                     temperature=1.0, top_k=20, num_return_sequences=2, output_format=output_format, echo=True)
        chunks = run(config, lines, monkeypatch)
        return "".join(chunks) if output_format == "text" else [{**r, "time_s": 0} for r in chunks]

    static = out(3, False)
    assert out(3, True) == static == out(1, True) == out(8, True)
    assert len(static) > 24


def test_a_records_seed_reproduces_it_alone(tiny_model_dir, monkeypatch):
    config = cfg(tiny_model_dir, prompts=PROMPTS, num_return_sequences=2, temperature=1.0)
    out = records(config)
    pick = out[5]  # prompt 2, second completion
    line = json.dumps({"prompt": pick["prompt"], "seed": pick["seed"]}) + "\n"
    again = records(cfg(tiny_model_dir, input_format="jsonl", temperature=1.0), line, monkeypatch)
    assert again[0]["completion"] == pick["completion"] and again[0]["seed"] == pick["seed"]


def test_greedy_ignores_the_seed(tiny_model_dir):
    a = records(cfg(tiny_model_dir, prompts=PROMPTS, do_sample=False, seed=1))
    b = records(cfg(tiny_model_dir, prompts=PROMPTS, temperature=0.0, seed=2))
    assert [r["completion"] for r in a] == [r["completion"] for r in b]


def test_speculation_changes_no_byte_of_the_output(tiny_model_dir, caplog):
    caplog.set_level(logging.DEBUG, logger="llmctl")
    prompts = ["ab ab ab ab ab", "1, 2, 3, 1, 2, 3,"]
    for settings in ({"temperature": 0.0}, {"temperature": 0.1, "top_k": 10}):
        on = records(cfg(tiny_model_dir, prompts=prompts, batch_size=1, max_new_tokens=30, **settings))
        off = records(cfg(tiny_model_dir, prompts=prompts, batch_size=1, max_new_tokens=30, speculate=False,
                          **settings))
        assert on == [{**r, "time_s": o["time_s"]} for r, o in zip(off, on)]
    lines = re.findall(r"speculation: (\d+) of \d+ guessed tokens were right", caplog.text)
    assert len(lines) == 2 and int(lines[0]) > 0  # speculate=false: no guesses at all


# ---------------------------------------------------------------------------------------------------------------
# Input formats


def test_lines_from_stdin_skip_and_count_empty_lines(tiny_model_dir, monkeypatch, caplog):
    stdin = "The cat\n\n  \nxy\r\nA farmer sold\n"
    out = records(cfg(tiny_model_dir, batch_size=2), stdin, monkeypatch)
    assert [(r["id"], r["prompt"]) for r in out] == [(0, "The cat"), (1, "xy"), (2, "A farmer sold")]
    assert "skipped 2 empty input lines" in caplog.text


def test_text_format_takes_all_of_stdin_as_one_prompt(tiny_model_dir, monkeypatch):
    out = records(cfg(tiny_model_dir, input_format="text"), "line one\nline two\n", monkeypatch)
    assert [r["prompt"] for r in out] == ["line one\nline two\n"]


def test_prompts_from_a_file(tiny_model_dir, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("one\ntwo\n")
    assert [r["prompt"] for r in records(cfg(tiny_model_dir, input=str(path)))] == ["one", "two"]


def test_jsonl_lines_override_settings(tiny_model_dir, monkeypatch):
    lines = [
        {"prompt": "The cat", "id": "a", "max_new_tokens": 3},
        {"prompt": "The cat", "id": "b", "temperature": 0},
        {"prompt": "The cat", "id": "c", "seed": 42, "top_k": 5, "stop": "e"},
        {"prompt": "xy"},
    ]
    stdin = "".join(json.dumps(line) + "\n" for line in lines)
    out = records(cfg(tiny_model_dir, input_format="jsonl", batch_size=3), stdin, monkeypatch)
    assert [r["id"] for r in out] == ["a", "b", "c", 3]
    assert out[0]["tokens"] == 3
    greedy = records(cfg(tiny_model_dir, prompts=["The cat"], do_sample=False))[0]
    assert out[1]["completion"] == greedy["completion"]
    assert out[2]["seed"] == 42 and "e" not in out[2]["completion"]


def test_ids_not_positions_decide_seeds(tiny_model_dir, monkeypatch):
    stdin = '{"prompt": "The cat", "id": "k"}\n{"prompt": "xy", "id": "z"}\n'
    swapped = '{"prompt": "xy", "id": "z"}\n{"prompt": "The cat", "id": "k"}\n'
    a = records(cfg(tiny_model_dir, input_format="jsonl", temperature=1.0), stdin, monkeypatch)
    b = records(cfg(tiny_model_dir, input_format="jsonl", temperature=1.0), swapped, monkeypatch)
    assert {r["id"]: r["completion"] for r in a} == {r["id"]: r["completion"] for r in b}


def test_malformed_jsonl_line_fails_naming_it(tiny_model_dir, monkeypatch):
    stdin = '{"prompt": "ok"}\n{"prompt": oops}\n{"prompt": "fine"}\n'
    config = cfg(tiny_model_dir, input_format="jsonl", output_format="jsonl")
    produced = []
    with pytest.raises(DataError, match=r"<stdin>:2: invalid JSON"):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(stdin.encode()))))
        for record in generate.run(config, quiet=True):
            produced.append(record)
    assert [r["prompt"] for r in produced] == ["ok"]  # what came before the bad line is out


def test_malformed_lines_can_be_skipped_and_counted(tiny_model_dir, monkeypatch, caplog):
    stdin = '{"prompt": "ok"}\nnot json\n[1]\n{"prompt": "fine", "temprature": 1}\n{"prompt": "last"}\n'
    out = records(cfg(tiny_model_dir, input_format="jsonl", on_error="skip"), stdin, monkeypatch)
    assert [r["prompt"] for r in out] == ["ok", "last"]
    assert "skipped 3 malformed input lines (2, 3, 4)" in caplog.text


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "x", "temprature": 1}', "unknown field 'temprature'; did you mean 'temperature'?"),
        ('{"text": "x"}', 'no "prompt" field'),
        ('{"prompt": 3}', '"prompt" must be a string'),
        ('{"prompt": "x", "max_new_tokens": 0}', '"max_new_tokens" must be a positive integer, not 0'),
        ('{"prompt": "x", "top_p": 2}', '"top_p" must be a number above 0 and at most 1'),
        ('["x"]', "expected a JSON object"),
    ],
)
def test_bad_jsonl_lines_are_named(tiny_model_dir, monkeypatch, line, message):
    with pytest.raises(DataError) as err:
        records(cfg(tiny_model_dir, input_format="jsonl"), line + "\n", monkeypatch)
    assert str(err.value).startswith("<stdin>:1: ") and message in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# Stop strings, empty prompts, long prompts


def test_stop_string_cuts_the_completion(tiny_model_dir):
    free = records(cfg(tiny_model_dir, prompts=["The cat"], do_sample=False, max_new_tokens=40))[0]
    text = free["completion"]
    stop = next(text[i:i + 2] for i in range(5, len(text) - 4) if "\ufffd" not in text[i:i + 2])
    cut = records(cfg(tiny_model_dir, prompts=["The cat"], do_sample=False, max_new_tokens=40, stop=[stop]))[0]
    assert cut["finish_reason"] == "stop"
    assert cut["completion"] == text[: text.index(stop)]
    assert cut["tokens"] < 40


def test_an_empty_prompt_starts_from_the_start_token(tiny_model_dir):
    out = records(cfg(tiny_model_dir, prompts=[""]))
    assert out[0]["prompt_tokens"] == 1 and out[0]["tokens"] == 12


def test_long_prompts_lose_tokens_on_the_left(tiny_model_dir, caplog):
    long = "word " * 40  # 200 tokens; the tiny model sees 64
    out = records(cfg(tiny_model_dir, prompts=[long, "short"]))
    assert out[0]["prompt_tokens"] == 64 - 12 and out[0]["tokens"] == 12
    assert "keeping its last 52" in caplog.text


def test_max_new_tokens_must_leave_room_for_a_prompt(tiny_model_dir):
    with pytest.raises(ConfigError, match="at most 63"):
        records(cfg(tiny_model_dir, prompts=["x"], max_new_tokens=64))


# ---------------------------------------------------------------------------------------------------------------
# Where the model comes from


def test_model_from_the_run_directory(tiny_model_dir):
    config = load_config(None, [], {"run.out_dir": str(tiny_model_dir), "generate.prompts": ["x"],
                                    "generate.max_new_tokens": 4, "generate.output_format": "jsonl"})
    assert run(config)[0]["tokens"] == 4


def test_no_model_and_no_run_directory(tmp_path):
    config = load_config(None, [], {"run.out_dir": str(tmp_path / "nothing"), "generate.prompts": ["x"]})
    with pytest.raises(ModelError, match="pass --model"):
        run(config)


def test_a_directory_without_a_tokenizer(tiny_model_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(ModelError, match="holds no tokenizer"):
        run(cfg(tmp_path, prompts=["x"]))


# ---------------------------------------------------------------------------------------------------------------
# The real command line


def test_cli_model_flag_alone_needs_no_config(llmctl, tiny_model_dir):
    result = llmctl("generate", "--model", str(tiny_model_dir), "-p", "The cat", "-p", "xy", "-n", "5", "--greedy",
                    "-f", "jsonl")
    assert result.code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in lines] == ["The cat", "xy"] and all(r["tokens"] == 5 for r in lines)
    # stderr: a one-line summary for people, and no chatter from transformers
    assert re.fullmatch(r"2 completions, 10 tokens in [\d.]+ s \(\d+ tokens/s\)\n", result.stderr)


@pytest.mark.parametrize(
    ("args", "stdin", "code", "message", "lines_out"),
    [
        (["--model", "{tmp}"], "a\n", 1, "holds no model (config.json is missing)", 0),
        (["--input-format", "jsonl"], '{"prompt": "a"}\n{bad\n', 1, "Error: <stdin>:2: invalid JSON", 1),
        (["--max-new-tokens", "0"], "a\n", 1, "generate.max_new_tokens: must be positive", 0),
        (["--set", "generate.temprature=1"], "a\n", 1, "did you mean generate.temperature?", 0),
        (["--temprature", "1"], "a\n", 2, "No such option", 0),
    ],
    ids=["not-a-model", "bad-jsonl", "max-new-tokens", "unknown-key", "unknown-flag"],
)
def test_cli_errors(llmctl, tiny_model_dir, tmp_path, args, stdin, code, message, lines_out):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--model" not in args:
        args = ["--model", str(tiny_model_dir), *args]
    result = llmctl("generate", "-n", "4", "--stop", "\n", *args, input=stdin)
    assert result.code == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    if code == 1:
        assert result.stderr.count("\n") == 1
    assert result.stdout.count("\n") == lines_out  # what came before a bad line, and nothing else


def test_cli_broken_pipe_ends_quietly(tiny_model_dir, tmp_path):
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(400)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = (f"set -o pipefail; {sys.executable} -m llmctl generate -m {tiny_model_dir} -n 8 -b 4 -f jsonl "
              f"-i {prompts} | head -1")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert json.loads(proc.stdout)["id"] == 0


def test_cli_answers_each_line_while_stdin_is_still_open(tiny_model_dir):
    """Prompts typed (or piped slowly) get their completion at once, not when the input ends."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmctl", "generate", "-m", str(tiny_model_dir), "-n", "6", "-f", "jsonl"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        proc.stdin.write("first prompt\n")
        proc.stdin.flush()
        first = json.loads(proc.stdout.readline())
        assert first["prompt"] == "first prompt"
        assert proc.poll() is None  # still running, waiting for more input
        proc.stdin.write("second prompt\n")
        proc.stdin.close()
        second = json.loads(proc.stdout.readline())
        assert second["prompt"] == "second prompt" and second["id"] == 1
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
