"""Checking `llmctl ...` command lines written in help texts and docs against the real CLI, without running them:
Click parses each one (command, flags, values, their types) and says what is wrong."""

from __future__ import annotations

import re
import shlex

import typer

from llmctl.cli import app

_ROOT_FLAGS = {"--version", "--install-completion", "--show-completion", "-h", "--help"}
_HELP = {"-h", "--help"}


def commands_in(text: str) -> list[str]:
    """The `llmctl ...` invocations in shell text: one per line (after `$ `, pipes, `&&`, `;` or env settings), with
    trailing comments, redirections and what follows a pipe cut off. Lines ending in `\\` are joined first."""
    text = re.sub(r"\\\n\s*", " ", text)
    text = re.sub(r"\$\(([^()]*)\)", r" ; \1 ; ", text)  # MODEL=$(llmctl train ...): the inner command
    found = []
    for line in text.splitlines():
        line = line.strip().removeprefix("$ ")
        if line.startswith("#"):
            continue
        for piece in re.split(r"\|\||&&|\||;|`", line):
            piece = piece.strip()
            piece = re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+", "", piece)  # VAR=value llmctl ...
            for prefix in ("torchrun ", "python -m ", "time "):
                if piece.startswith(prefix) and " llmctl " in f" {piece} ":
                    piece = piece[piece.index("llmctl"):]
            if re.match(r"llmctl(\s|$)", piece):
                found.append(_strip_shell(piece))
    return found


def _strip_shell(command: str) -> str:
    """Drop a trailing comment and redirections (`> out`, `< in`, `2>&1`), which are the shell's, not llmctl's."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        words = command.split()
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
            continue
        if re.fullmatch(r"\d?[<>]{1,2}(&\d)?", word):
            skip = not word.endswith(("&1", "&2"))
            continue
        if re.match(r"\d?[<>]{1,2}\S", word):
            continue
        if word == ")":
            break
        kept.append(word)
    return shlex.join(kept)


def check(command: str) -> str | None:
    """None when `command` (an `llmctl ...` line) parses against the CLI, else what Click says is wrong."""
    words = shlex.split(command)[1:]
    root = typer.main.get_command(app)
    if not words:
        return None
    if words[0].startswith("-"):
        unknown = [w for w in words if w not in _ROOT_FLAGS and w not in ("bash", "zsh", "fish", "powershell")]
        return f"unknown option(s) {unknown}" if unknown else None
    name, rest = words[0], words[1:]
    ctx = root.make_context("llmctl", [], resilient_parsing=True)  # the group's own (eager) options stay unrun
    command_obj = root.get_command(ctx, name)
    if command_obj is None:
        return f"no command {name!r}"
    if any(w in _HELP for w in rest):
        return None
    try:
        with command_obj.make_context(name, rest, parent=ctx):
            pass
    except typer.TyperException as exc:  # Typer's own (vendored) Click: usage errors, bad values
        return getattr(exc, "format_message", exc.__str__)()
    return None
