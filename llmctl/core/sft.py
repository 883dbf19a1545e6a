"""Instruction data: reading prompt/completion and chat-message examples, and turning each into token ids with the
tokens that carry loss marked (the answers), as `train` (task sft) and `eval` (task sft) both need them.

Two shapes per JSONL line (field names from the `sft` section):
    {"prompt": "...", "completion": "..."}          one answer; `prompt`/`completion` may also be message lists
    {"messages": [{"role": ..., "content": ...}]}   a conversation, one answer per assistant turn

Tokenization goes piece by piece: the rendered conversation is cut into prompt and answer pieces (see
`llmctl.core.chat.segments`) and each piece is encoded alone, so a label boundary can never fall inside a token, and
the prompt is encoded exactly as `generate --chat` encodes it (the template's text, no extra special tokens). Without a
template, a prompt/completion example is `prompt + completion + end-of-text`, the prompt encoded as `generate` encodes
a plain prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llmctl.core import chat
from llmctl.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One tokenized example: `ids` (L,) and `answer` (L,), True where the token is an answer token (a target)."""

    ids: np.ndarray
    answer: np.ndarray
    where: str
    """`file:line`, for messages."""

    @property
    def targets(self) -> int:
        """Tokens that carry loss: answer tokens after the first position (the first token has no history)."""
        return int(self.answer[1:].sum())


@dataclass
class Stats:
    """What reading and fitting the examples did, reported at the start of training and in eval's result."""

    read: int = 0
    cut: int = 0
    too_long: int = 0
    no_answer: int = 0
    first_dropped: str | None = None
    tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "kept": self.read - self.too_long - self.no_answer, "cut": self.cut,
                "dropped_too_long": self.too_long, "dropped_no_answer": self.no_answer, "tokens": self.tokens}


@dataclass
class Encoder:
    """Turns raw examples into `Example`s for one tokenizer, template and set of `sft` settings."""

    tokenizer: Any
    template: chat.Template | None
    sft: Any  # llmctl.config.SftConfig
    max_tokens: int | None
    """The longest example kept whole: context + 1 tokens (inputs are all but the last, targets all but the first)."""
    stats: Stats = field(default_factory=Stats)

    def encode(self, raw: dict[str, Any], where: str) -> Example | None:
        """The example in `raw` (one JSONL object), tokenized and fitted to the context; None when dropped."""
        self.stats.read += 1
        pieces = self._pieces(raw, where)
        ids: list[int] = []
        answer: list[bool] = []
        for i, (text, is_answer) in enumerate(pieces):
            if isinstance(text, int):  # the end-of-text id closing a plain completion
                piece = [text]
            else:
                special = self.template is None and i == 0  # a plain prompt: as generate encodes it
                piece = self.tokenizer.encode(text, add_special_tokens=special) if text else []
            ids += piece
            answer += [is_answer or self.sft.train_on_prompt] * len(piece)
        example = Example(np.asarray(ids, dtype=np.int64), np.asarray(answer, dtype=bool), where)
        return self._fit(example)

    def _pieces(self, raw: dict[str, Any], where: str) -> list[tuple[str | int, bool]]:
        s = self.sft
        if s.messages_field in raw:
            messages = chat.check_messages(raw[s.messages_field], where)
        elif s.prompt_field in raw and s.completion_field in raw:
            prompt, completion = raw[s.prompt_field], raw[s.completion_field]
            if isinstance(prompt, list) and isinstance(completion, list):  # trl's conversational prompt-completion
                messages = chat.check_messages(prompt + completion, where)
            elif isinstance(prompt, str) and isinstance(completion, str):
                if not completion.strip():
                    raise DataError(f"{where}: \"{s.completion_field}\" is empty: there is no answer to learn")
                if self.template is None:
                    eos = self.tokenizer.eos_token_id
                    if eos is None:
                        raise ConfigError("the tokenizer has no end-of-text token to close a completion with; set "
                                          "sft.chat_template")
                    return [(prompt, False), (completion, True), (eos, True)]
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            else:
                raise DataError(f"{where}: \"{s.prompt_field}\" and \"{s.completion_field}\" must both be strings "
                                "(or both lists of messages)")
        else:
            raise DataError(
                f"{where}: neither {{\"{s.prompt_field}\", \"{s.completion_field}\"}} nor {{\"{s.messages_field}\"}}: "
                f"found {', '.join(repr(k) for k in list(raw)[:6]) or 'no fields'} (set sft.prompt_field, "
                "sft.completion_field or sft.messages_field to your names)"
            )
        if s.system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": s.system}, *messages]
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant turn: there is no answer to learn")
        for n, m in enumerate(messages):
            if m["role"] == "assistant" and not m["content"].strip():
                raise DataError(f"{where}: message {n} (assistant) is empty: there is no answer to learn")
        if self.template is None:
            raise ConfigError(chat.missing_template_message("this model"))
        try:
            return chat.segments(self.tokenizer, self.template, messages)
        except chat.TemplateFailed as exc:
            raise DataError(f"{where}: {exc}") from None

    def _fit(self, example: Example) -> Example | None:
        """Cut or drop an example longer than the context; drop one left without answer tokens."""
        limit = self.max_tokens
        if limit is not None and len(example.ids) > limit:
            if self.sft.truncation == "fail":
                raise DataError(
                    f"{example.where}: {len(example.ids)} tokens, more than the {limit - 1}-token context allows "
                    "(set sft.truncation: cut or drop, or raise train.context)"
                )
            if self.sft.truncation == "drop":
                return self._drop(example, "too_long")
            self.stats.cut += 1
            example = Example(example.ids[:limit], example.answer[:limit], example.where)
        if example.targets == 0:
            return self._drop(example, "no_answer")
        self.stats.tokens += len(example.ids)
        return example

    def _drop(self, example: Example, why: str) -> None:
        setattr(self.stats, why, getattr(self.stats, why) + 1)
        self.stats.first_dropped = self.stats.first_dropped or example.where
        return None


def read_examples(paths: list[str], encoder: Encoder, fmt: str = "auto") -> list[Example]:
    """Every example of the inputs `paths` (JSONL, Parquet, CSV/TSV, datasets: llmctl.core.records), tokenized; a
    DataError naming file:line (or row) for a bad one, or when nothing is left."""
    examples = []
    for path in paths:
        for where, obj in records_of(path, encoder.sft, fmt):
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, not {type(obj).__name__}")
            example = encoder.encode(obj, where)
            if example is not None:
                examples.append(example)
    s = encoder.stats
    if not examples:
        if s.read == 0:
            raise DataError(f"{', '.join(paths)}: no examples (the file is empty)")
        raise DataError(
            f"{', '.join(paths)}: every example was dropped ({s.too_long} longer than the context, {s.no_answer} "
            f"with no answer token left after cutting, first at {s.first_dropped}); raise train.context or "
            "shorten the examples"
        )
    if s.too_long or s.no_answer:
        log.warning("dropped %d of %d examples (%d longer than the context, %d with no answer token left after "
                    "cutting; the first at %s)", s.too_long + s.no_answer, s.read, s.too_long, s.no_answer,
                    s.first_dropped)
    if s.cut:
        log.info("cut %d examples to the context", s.cut)
    return examples


def prepare_tokenizer(tokenizer, setting: str, source: str, needs_template: bool) -> chat.Template | None:
    """Resolve the chat template and install it in the tokenizer (markers added, `chat_template` set) so that the
    run's saved tokenizer renders exactly what training saw. Returns the template, or None for plain prompt +
    completion."""
    template = chat.resolve_template(setting, tokenizer)
    if template is None and needs_template:
        raise ConfigError(chat.missing_template_message(source))
    if template is not None:
        chat.add_markers(tokenizer, template)
        tokenizer.chat_template = template.source
    return template


def records_of(path: str, sft, fmt: str = "auto"):
    """(where, record) of an instruction-data input (llmctl.core.records); a file whose name says no format is read
    as JSONL, the shape instruction data comes in."""
    from llmctl.core.records import iter_records, record_format

    if record_format(path, fmt) == "txt":
        fmt = "jsonl"
    return iter_records(path, fmt, optional=[sft.prompt_field, sft.completion_field, sft.messages_field])


def uses_messages(paths: list[str], sft, fmt: str = "auto") -> bool:
    """Whether the first example of the data is a conversation (and so needs a template)."""
    for path in paths:
        for _, obj in records_of(path, sft, fmt):
            return isinstance(obj, dict) and (
                sft.messages_field in obj or isinstance(obj.get(sft.prompt_field), list)
            )
    return False


def examples_iter(examples: list[Example]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) of each example: targets are the next tokens, -100 where no loss is taken."""
    for e in examples:
        targets = np.where(e.answer[1:], e.ids[1:], -100)
        yield e.ids[:-1], targets


def collate(rows: list[list[tuple[np.ndarray, np.ndarray]]], device: torch.device) -> dict[str, torch.Tensor]:
    """Rows of (inputs, targets) pieces -> input_ids, targets (B, T) padded on the right to the longest row, and
    position_ids restarting per piece when any row holds more than one example."""
    width = max(sum(len(x) for x, _ in row) for row in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    targets = np.full((len(rows), width), -100, dtype=np.int64)
    packed = any(len(row) > 1 for row in rows)
    positions = np.zeros((len(rows), width), dtype=np.int64) if packed else None
    for r, row in enumerate(rows):
        at = 0
        for x, y in row:
            ids[r, at : at + len(x)] = x
            targets[r, at : at + len(x)] = y
            if positions is not None:
                positions[r, at : at + len(x)] = np.arange(len(x))
            at += len(x)
        if positions is not None and at < width:  # the padding after the last example: one more "example"
            positions[r, at:] = np.arange(width - at)
    out = {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(targets)}
    if positions is not None:
        out["position_ids"] = torch.from_numpy(positions)
    return {k: v.to(device) for k, v in out.items()}
