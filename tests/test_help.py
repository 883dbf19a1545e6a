"""`--help` that teaches: every command's help ends with 3-5 real examples that parse against the CLI, metavars
read as a person writes them, and shell completion can be installed."""

from __future__ import annotations

import re

import pytest

from llmctl.cli import EXAMPLES
from tests.clicheck import check, commands_in

COMMANDS = ["preprocess", "train", "generate", "eval"]


def _help(llmctl, *args: str) -> str:
    result = llmctl(*args, "--help")
    assert result.code == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def helps():
    from tests.conftest import run_llmctl

    return {name: _help(run_llmctl, *([] if name == "llmctl" else [name])) for name in ["llmctl", *COMMANDS]}


@pytest.mark.parametrize("name", ["llmctl", *COMMANDS])
def test_help_ends_with_three_to_five_examples_that_parse(helps, name):
    text = helps[name]
    head, sep, tail = text.rpartition("Examples:")
    assert sep, f"{name} --help has no Examples section"
    examples = commands_in(tail)
    assert 3 <= len(examples) <= 5, examples
    assert all(line.startswith("    ") or not line.strip() for line in tail.splitlines()[1:])  # nothing after them
    for example in examples:
        assert check(example) is None, (example, check(example))


def test_every_example_is_shown_unwrapped():
    for name, epilog in EXAMPLES.items():
        for line in epilog.splitlines()[3:]:
            assert line.startswith("  llmctl ") or "| llmctl " in line, (name, line)


@pytest.mark.parametrize("name", COMMANDS)
def test_metavars_read_as_a_person_writes_them(helps, name):
    text = helps[name].rpartition("Examples:")[0]  # the examples themselves may redirect with < and >
    assert not re.search(r"<[^>]*>", text), re.findall(r"<[^>]*>", text)  # <list[str]>, <str>, <file>
    assert "KEY=VALUE" in text and "-c, --config FILE" in text
    options = [line for line in text.splitlines() if line.lstrip().startswith("-")]
    for line in options:  # an option that takes a value shows an upper-case name for it
        flag = line.split("  ")[0].strip()
        if re.search(r"\s[a-z]", flag.split(", ")[-1]):
            pytest.fail(f"lower-case metavar in {flag!r}")


def test_shell_completion_can_be_installed_and_completes_commands_and_flags(helps, llmctl):
    assert "--install-completion" in helps["llmctl"]
    shown = llmctl("--show-completion", "bash")
    assert shown.code == 0 and "_llmctl_completion" in shown.stdout
    env = {"_LLMCTL_COMPLETE": "complete_bash", "COMP_WORDS": "llmctl train --re", "COMP_CWORD": "2"}
    assert llmctl(env=env).stdout.split() == ["--resume"]


@pytest.mark.parametrize("bad", [
    "llmctl trian -c x.yaml", "llmctl train --bogus", "llmctl generate -n many", "llmctl eval --task",
    "llmctl train extra-argument",
])
def test_the_checker_itself_catches_wrong_commands(bad):
    assert check(bad) is not None


def test_the_extractor_finds_commands_in_pipes_and_comments():
    text = "cat a.txt | llmctl preprocess - --to-text > b.txt   # filter\n$ llmctl train -c x.yaml && llmctl eval"
    assert commands_in(text) == ["llmctl preprocess - --to-text", "llmctl train -c x.yaml", "llmctl eval"]
