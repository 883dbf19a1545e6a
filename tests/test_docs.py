"""The docs stay true: every `llmctl ...` command shown in README.md and docs/*.md parses against the real CLI
(commands, flags, values), every config key they name exists in llmctl/config.py, every local link points at a
page that exists (or will: the pages other branches write), and the README stays a front page."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from llmctl.config import SECTIONS
from tests.clicheck import check, commands_in

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
# `section.key`: not part of a path or a longer dotted name (runs/x/train.bin, tests/test_train.py).
KEY = re.compile(r"(?<![\w./-])(" + "|".join(SECTIONS) + r")\.([a-z_][a-z0-9_]*)(?:\.(\w+))?")
# Dotted words that are file names or Python attributes, not config keys.
NOT_KEYS = {"bin", "safetensors", "jsonl", "json", "py", "md", "txt", "yaml", "yml", "csv", "tsv", "parquet", "gz",
            "pt", "png", "lock", "tool", "generate", "from_pretrained", "config", "spool"}


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def _shown_commands(text: str) -> list[str]:
    """Commands in shell/text code blocks, and inline `llmctl ...` spans that are whole commands (no `...`)."""
    found = []
    for lang, body in FENCE.findall(text):
        if lang in ("", "sh", "bash", "shell", "console", "text"):
            found += commands_in(body)
    prose = FENCE.sub("", text)
    for span in SPAN.findall(prose):
        if span.startswith("llmctl") and "..." not in span and "…" not in span:
            found += commands_in(span.replace("\\|", "|"))
    return found


def _params():
    return [pytest.param(page, id=_rel(page)) for page in PAGES]


@pytest.mark.parametrize("page", _params())
def test_every_llmctl_command_shown_parses_against_the_cli(page):
    commands = _shown_commands(page.read_text())
    problems = [f"{command}\n    -> {problem}" for command in commands if (problem := check(command))]
    assert not problems, f"{_rel(page)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", _params())
def test_every_config_key_named_exists(page):
    problems = []
    # A block that shows an error may show the misspelt key that caused it.
    text = FENCE.sub(lambda m: "" if "Error:" in m.group(2) else m.group(0), page.read_text())
    for section, key, sub in KEY.findall(text):
        if key in NOT_KEYS:
            continue
        hints = typing.get_type_hints(SECTIONS[section])
        if key not in hints:
            problems.append(f"{section}.{key}")
        elif sub and typing.get_origin(hints[key]) is not dict and not sub[0].isupper() and sub not in NOT_KEYS:
            problems.append(f"{section}.{key}.{sub} ({section}.{key} has no sub-keys)")
    assert not problems, f"{_rel(page)} names config keys that do not exist: {sorted(set(problems))}"


# Pages that other work in progress writes (SFT, LoRA, reliability): linked already, checked once they exist.
EXPECTED_PAGES = {"docs/sft.md", "docs/lora.md", "docs/reliability.md"}


@pytest.mark.parametrize("page", _params())
def test_local_links_point_at_pages_that_exist(page):
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if re.match(r"\w+://", target):
            continue
        path = (page.parent / target).resolve()
        if not path.exists() and _rel_or_none(path) not in EXPECTED_PAGES:
            broken.append(target)
    assert not broken, f"{_rel(page)}: broken links {broken}"


def _rel_or_none(path: Path) -> str | None:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return None


def test_the_readme_is_a_front_page_with_the_two_setup_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    blocks = [body for lang, body in FENCE.findall(text) if lang == "sh"]
    assert "pip install -c constraints.txt -e . && llmctl train -c configs/quickstart.yaml && llmctl generate -c " \
        "configs/quickstart.yaml" in blocks[0]
    assert "pip install -c constraints.txt -e '.[test]' && python -m pytest" in blocks[1]
    for command in ("preprocess", "train", "generate", "eval"):  # the tour: one pipe per command
        assert any(f"llmctl {command}" in b and "|" in b or f"$(llmctl {command}" in b for b in blocks), command
    for page in ("preprocess", "train", "generate", "eval", "config", "exit-codes", "speed", "gpus", "formats", "sft",
                 "lora", "reliability"):
        assert f"docs/{page}.md" in text, page


def key_table() -> str:
    """docs/config.md's "Every key" section, from the schema: `python -m tests.test_docs` rewrites it."""
    import dataclasses
    import json

    from llmctl.config import Config, field_docs

    defaults = Config()
    out = ["## Every key\n", "Generated from the docstrings in `llmctl/config.py` (`llmctl train --print-config` "
           "prints the resolved values).\n"]
    for name, cls in SECTIONS.items():
        docs = field_docs(cls)
        out.append(f"\n### `{name}`\n\n| key | default | meaning |\n|---|---|---|")
        for f in dataclasses.fields(cls):
            value = getattr(getattr(defaults, name), f.name)
            shown = value if isinstance(value, str) else json.dumps(value)
            out.append(f"| `{name}.{f.name}` | `{shown}` | {docs.get(f.name, '').replace('|', chr(92) + '|')} |")
    return "\n".join(out) + "\n"


def test_the_config_page_lists_every_key_as_the_schema_documents_it():
    text = (REPO / "docs" / "config.md").read_text()
    assert text[text.index("## Every key"):] == key_table(), "docs/config.md is stale: run python -m tests.test_docs"


def test_the_checkers_catch_what_they_should():
    assert KEY.findall("`train.max_step` and runs/x/train.bin and `model.safetensors`") == [
        ("train", "max_step", ""), ("model", "safetensors", "")]
    assert _shown_commands("```sh\nllmctl train --no-such-flag\n```\nand `llmctl eval -i x` and `llmctl ... | head`") \
        == ["llmctl train --no-such-flag", "llmctl eval -i x"]
    assert check("llmctl train --no-such-flag") is not None


if __name__ == "__main__":
    page = REPO / "docs" / "config.md"
    text = page.read_text()
    page.write_text(text[: text.index("## Every key")] + key_table())
