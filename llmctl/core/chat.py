"""Chat templates: which one a model uses, rendering a conversation into text with its answers marked, and the
end-of-turn marker that closes an answer.

A template is a Jinja string in the format transformers and every chat server read (`tokenizer.chat_template`,
saved as `chat_template.jinja` beside the tokenizer). `sft.chat_template` picks it: `auto` takes the tokenizer's
own, a name takes a built-in one (`BUILTIN`), a path reads a `.jinja` file, anything else holding `{{` or `{%` is
the template itself.

Answers are found by rendering prefixes: the text of turn i's answer is what `messages[:i+1]` renders beyond what
`messages[:i]` renders with the generation prompt. That needs nothing from the template (no `{% generation %}`
markers), and works for any template whose output for a conversation starts with its output for any earlier
prefix plus generation prompt, which is what a chat template is for; one that does not is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")

BUILTIN: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}
"""Built-in templates, by name: ChatML (Qwen, OpenHermes, many fine-tunes), Llama 3's, and Zephyr's."""

MARKERS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "zephyr": ("<|system|>", "<|user|>", "<|assistant|>"),
}
"""The markers of each built-in template, added to a tokenizer that lacks them as special tokens (one id each, never
split, never produced by user text that merely looks like them... unless it spells them exactly)."""

_SENTINEL = "\u2063llmctl-answer\u2063"
MAX_TEMPLATE_BYTES = 1 << 20


@dataclass(frozen=True)
class Template:
    """A resolved chat template: its Jinja source and where it came from (for messages and provenance)."""

    source: str
    origin: str
    """`tokenizer`, `builtin:NAME`, a file path, or `config` (a Jinja string in the config)."""
    markers: tuple[str, ...] = ()
    """Marker strings a tokenizer should hold as single tokens (built-in templates only)."""


def resolve_template(setting: str, tokenizer, key: str = "sft.chat_template") -> Template | None:
    """The template `setting` names (see the module docstring); None when `auto` finds none or `setting` is `none`."""
    if setting == "none":
        return None
    if setting == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        return Template(own, "tokenizer") if isinstance(own, str) and own.strip() else None
    if setting in BUILTIN:
        return Template(BUILTIN[setting], f"builtin:{setting}", MARKERS.get(setting, ()))
    if "{{" in setting or "{%" in setting:
        return Template(setting, "config")
    path = Path(setting).expanduser()
    if path.is_file():
        from llmctl.core.inputs import read_text

        try:  # bounded, and its errors name the file (a template is a few KB; 1 MiB is plenty)
            return Template(read_text(path, limit=MAX_TEMPLATE_BYTES), str(path))
        except DataError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    raise ConfigError(
        f"{key}: {setting!r} is neither a built-in template ({', '.join(BUILTIN)}), a template file, nor a Jinja "
        "template; use auto for the tokenizer's own"
    )


def model_template(tokenizer, configured: str = "auto") -> Template | None:
    """The template a model is used with: its tokenizer's own, else the one `configured` (sft.chat_template)
    names; None when neither gives one."""
    template = resolve_template("auto", tokenizer)
    if template is None and configured not in ("auto", "none"):
        template = resolve_template(configured, tokenizer)
    return template


def missing_template_message(tokenizer_name: str, key: str = "sft.chat_template") -> str:
    return (
        f"the tokenizer of {tokenizer_name} has no chat template; set {key} to one of {', '.join(BUILTIN)}, a "
        ".jinja file or a Jinja string"
    )


def add_markers(tokenizer, template: Template) -> list[str]:
    """Add the template's markers that the tokenizer lacks as special tokens; returns those added (the model's
    embeddings must then grow to len(tokenizer))."""
    vocab = tokenizer.get_vocab()
    new = [m for m in template.markers if m not in vocab]
    if new:
        tokenizer.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
    return new


def render(tokenizer, template: Template, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
    """The conversation as text; a template that fails raises a DataError-ready message via TemplateFailed."""
    try:
        return tokenizer.apply_chat_template(
            list(messages), chat_template=template.source, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja2's TemplateError and whatever the template raises (raise_exception)
        raise TemplateFailed(_jinja_message(exc, template)) from None


class TemplateFailed(Exception):
    """The chat template could not render a conversation (the message says why and where in the template)."""


def segments(tokenizer, template: Template, messages: Sequence[dict[str, Any]]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_answer) pieces, in order: each assistant turn's answer
    (its content and the end-of-turn marker that closes it) is one piece marked True."""
    out: list[tuple[str, bool]] = []
    done = ""  # the text rendered so far, covered by `out`
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, template, messages[: i + 1], add_generation_prompt=False)
        if not (before.startswith(done) and through.startswith(before)):
            raise TemplateFailed(
                f"the chat template ({template.origin}) renders a conversation that does not begin with its "
                "rendering of the turns before: answers cannot be located"
            )
        answer = through[len(before):]
        glue = len(answer) - len(answer.rstrip("\n"))  # the line end after a marker is template glue, not answer
        answer, tail = answer[: len(answer) - glue], answer[len(answer) - glue:]
        if before[len(done):]:
            out.append((before[len(done):], False))
        out.append((answer, True))
        done = before + answer
        if tail:
            out.append((tail, False))
            done += tail
    full = render(tokenizer, template, messages, add_generation_prompt=False)
    if not full.startswith(done):
        raise TemplateFailed(f"the chat template ({template.origin}) renders the whole conversation differently "
                             "from its turns: answers cannot be located")
    if full[len(done):]:
        out.append((full[len(done):], False))
    return out


def end_of_turn(tokenizer, template: Template) -> str | None:
    """The marker the template puts right after an answer (`<|im_end|>`, `<|eot_id|>`, `</s>`), or None."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = render(tokenizer, template, messages, add_generation_prompt=False)
    except TemplateFailed:
        return None
    at = text.find(_SENTINEL)
    if at < 0:
        return None
    tail = text[at + len(_SENTINEL):].split()
    return tail[0] if tail else None


def stop_ids_and_strings(tokenizer, template: Template) -> tuple[set[int], list[str]]:
    """What ends an answer at generation time: the end-of-turn marker as a token id when it is one token of the
    tokenizer, else as a stop string."""
    marker = end_of_turn(tokenizer, template)
    if marker is None:
        return set(), []
    ids = tokenizer.convert_tokens_to_ids(marker)
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(ids, int) and ids != unk and tokenizer.encode(marker, add_special_tokens=False) == [ids]:
        return {ids}, []
    return set(), [marker]


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """A `messages` value as chat data: a list of {role, content} with known roles and string contents."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{role, content}} objects")
    out = []
    for n, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {n} must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {n} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {n} ({role}): content must be a string, not "
                            f"{type(content).__name__ if content is not None else 'null'}")
        out.append({"role": role, "content": content})
    return out


def _jinja_message(exc: Exception, template: Template) -> str:
    line = getattr(exc, "lineno", None)
    where = f"{template.origin}" + (f":{line}" if line else "")
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"chat template {where} failed: {text}"


@dataclass
class Prompter:
    """Chat prompts for generation: each prompt rendered as a user turn (or a whole conversation so far) through
    the model's template with the generation prompt, and what ends an answer (the end-of-turn marker as a token id,
    or as a stop string where it is several tokens)."""

    tokenizer: Any
    template: Template
    system: str | None
    stop_ids: set[int]
    stop_strings: list[str]

    @classmethod
    def of(cls, tokenizer, name: str, system: str | None, configured: str = "auto", key: str = "generate.chat"):
        """The model's own template, else the one `configured` (sft.chat_template) names; a ConfigError when none."""
        template = model_template(tokenizer, configured)
        if template is None:
            raise ConfigError(
                f"{key}: model {name} has no chat template (fine-tune it with train.task: sft, or set "
                f"sft.chat_template to one of {', '.join(BUILTIN)}, a .jinja file or a Jinja string)"
            )
        if template.markers and any(m not in tokenizer.get_vocab() for m in template.markers):
            log.warning("the tokenizer of %s lacks the markers of %s: they are read as plain text", name,
                        template.origin)
        ids, strings = stop_ids_and_strings(tokenizer, template)
        return cls(tokenizer, template, system, ids, strings)

    def encode(self, prompts: Sequence[str | list[dict[str, str]]]) -> list[list[int]]:
        out = []
        for prompt in prompts:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            if self.system and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": self.system})
            try:
                text = render(self.tokenizer, self.template, messages, add_generation_prompt=True)
            except TemplateFailed as exc:
                raise DataError(str(exc)) from None
            out.append(self.tokenizer.encode(text, add_special_tokens=False))
        return out
