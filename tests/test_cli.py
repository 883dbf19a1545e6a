"""The real entry point: exit codes 0/1/2, stdout vs stderr, tracebacks only with LLMCTL_DEBUG."""

from __future__ import annotations

import subprocess
import sys

import yaml

from llmctl import __version__


def test_version_and_help(llmctl):
    result = llmctl("--version")
    assert (result.code, result.stdout, result.stderr) == (0, f"llmctl {__version__}\n", "")
    result = llmctl()
    assert result.code == 0 and "Usage: llmctl" in result.stdout
    for command in ("preprocess", "train", "generate", "eval"):
        assert command in result.stdout
        assert llmctl(command, "--help").code == 0


def test_console_script_and_module_agree():
    out = subprocess.run(["llmctl", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == f"llmctl {__version__}\n"


def test_print_config_writes_resolved_yaml_to_stdout(llmctl, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("# llmctl train -c exp.yaml\ntrain:\n  max_steps: 9\n")
    result = llmctl("train", "-c", str(path), "--set", "optim.lr=0.01", "--print-config")
    assert result.code == 0 and result.stderr == ""
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["max_steps"] == 9 and resolved["optim"]["lr"] == 0.01
    from llmctl.config import SECTIONS

    assert list(resolved) == list(SECTIONS)  # every section, in the schema's order


def test_flags_reach_the_config(llmctl):
    result = llmctl("generate", "-m", "some/dir", "-p", "hi: there", "--greedy", "--print-config")
    resolved = yaml.safe_load(result.stdout)["generate"]
    assert resolved["model"] == "some/dir" and resolved["prompts"] == ["hi: there"] and resolved["do_sample"] is False
    result = llmctl("eval", "--fail-under", "accuracy=0.8", "--fail-over", "perplexity=40", "--print-config")
    resolved = yaml.safe_load(result.stdout)["eval"]
    assert resolved["fail_under"] == {"accuracy": 0.8} and resolved["fail_over"] == {"perplexity": 40.0}


def test_config_error_is_one_line_exit_1(llmctl):
    result = llmctl("train", "--set", "train.max_step=5")
    assert result.code == 1
    assert result.stderr == "Error: train.max_step: unknown key; did you mean train.max_steps?\n"
    assert result.stdout == ""


def test_several_config_problems_listed_together(llmctl, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_steps: x\noptim:\n  schedule: cosin\n")
    result = llmctl("train", "-c", str(path))
    assert result.code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == f"Error: 2 config problems in {path}:"
    assert lines[1:] == [
        "  train.max_steps: expected an integer, got a string ('x')",
        "  optim.schedule: must be one of constant, linear, cosine, not cosin; did you mean cosine?",
    ]


def test_usage_errors_exit_2(llmctl):
    result = llmctl("train", "--no-such-flag")
    assert result.code == 2 and "No such option: --no-such-flag" in result.stderr and result.stdout == ""
    assert llmctl("no-such-command").code == 2
    assert llmctl("eval", "--fail-under", "accuracy").code == 2


def test_debug_shows_the_traceback(llmctl):
    quiet = llmctl("train", "-c", "missing.yaml")
    assert quiet.code == 1 and quiet.stderr == "Error: config file missing.yaml does not exist\n"
    loud = llmctl("train", "-c", "missing.yaml", env={"LLMCTL_DEBUG": "1"})
    assert loud.code == 1 and "Traceback (most recent call last)" in loud.stderr
    assert loud.stderr.rstrip().endswith("Error: config file missing.yaml does not exist")


def test_help_does_not_import_torch():
    code = "import sys; from llmctl.cli import main; main(['--help']); print('torch' in sys.modules, file=sys.stderr)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stderr.strip() == "False"
