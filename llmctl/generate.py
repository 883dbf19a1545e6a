"""`llmctl generate`: complete prompts from the command line, a config or a stream, in input order.

`run(cfg)` yields output as it is made: text chunks (`str`) in text mode, one dict per completion in JSONL mode;
`llmctl.cli` writes them to stdout. Prompts are read in a background thread and decoded in batches
(`llmctl.core.decode`), so a person typing at a terminal gets an answer per line while a file of a million lines
streams through full batches.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from llmctl.config import Config, GenerateConfig
from llmctl.core.chat import Prompter
from llmctl.core.inputs import parse_json_object
from llmctl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

JSONL_FIELDS = ("prompt", "messages", "id", "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                "stop", "seed")
"""The keys a JSONL prompt line may hold; any other key is an error (a misspelt option must not pass silently)."""

LINGER_S = 0.05
"""How long a batch waits for more prompts once it has one: enough for a file to fill it, too short for a person
to notice."""


@dataclass
class Prompt:
    """One prompt as read, before tokenization."""

    position: int
    """0-based place among the prompts (empty and skipped lines do not count)."""
    text: str | list[dict[str, str]]
    """The prompt, or (chat, JSONL `messages`) the conversation so far."""
    id: str | int
    """The JSONL `id`, else the position."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Per-line sampling settings (JSONL)."""


@dataclass
class _Stats:
    prompts: int = 0
    completions: int = 0
    tokens: int = 0
    empty: int = 0
    malformed: list[int] = field(default_factory=list)
    truncated: int = 0


def run(cfg: Config, *, quiet: bool = False) -> Iterator[str | dict]:
    """Complete every prompt; yield text chunks (text output) or one record per completion (JSONL output)."""
    from llmctl.core.decode import Decoder
    from llmctl.core.device import pick_device, pick_dtype, set_threads
    from llmctl.core.hub import locate
    from llmctl.core.lora import find_adapter
    from llmctl.core.model import load_model, load_tokenizer, model_name

    g = cfg.generate
    name = model_name(cfg.generate.model, cfg.run.out_dir, "generate.model")
    # a directory that is neither a model nor an adapter fails here, before the tokenizer is looked for
    find_adapter(name) or locate(name, "model")
    device = pick_device(cfg.run.device)
    set_threads(cfg.run.threads)
    tokenizer = load_tokenizer(name, trust_remote_code=cfg.run.trust_remote_code)
    model = load_model(name, dtype=pick_dtype(g.precision, device), trust_remote_code=cfg.run.trust_remote_code)
    model.to(device)
    chat = Prompter.of(tokenizer, name, g.system, cfg.sft.chat_template, key="generate.chat") if g.chat else None
    decoder = Decoder(model, tokenizer, ignore_eos=g.ignore_eos, batch_invariant=g.batch_invariant,
                      speculate=g.speculate, stop_ids=chat.stop_ids if chat else (), batch_size=g.batch_size)
    log.debug("model %s on %s (%s), %s decode path", name, device, next(model.parameters()).dtype, decoder.path)
    if decoder.context_length and g.max_new_tokens >= decoder.context_length:
        raise ConfigError(
            f"generate.max_new_tokens: {g.max_new_tokens} leaves no room for a prompt in the model's "
            f"{decoder.context_length}-token context; use at most {decoder.context_length - 1}"
        )
    stats = _Stats()
    seed = g.seed if g.seed is not None else cfg.run.seed
    start = time.perf_counter()
    source = _Source(_read_prompts(g, stats, quiet), lambda batch: _requests(batch, g, seed, tokenizer, decoder,
                                                                             stats, chat))
    events = decoder.stream(source, g.batch_size, continuous=g.continuous)
    if g.output_format == "jsonl":
        yield from _records(events, source.meta, stats)
    else:
        yield from _text(events, source.meta, g.echo, stats)
    if source.failure is not None:
        raise source.failure
    _summary(stats, time.perf_counter() - start)
    if decoder.guesses:
        log.debug("speculation: %d of %d guessed tokens were right", decoder.right_guesses, decoder.guesses)


def derive_seed(seed: int, key: object) -> int:
    """A seed for one prompt (or one of its completions) from the run's seed and the prompt's position or id.
    53 bits, so that JSON readers that hold numbers as doubles keep it exact."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 11


# ---------------------------------------------------------------------------------------------------------------
# Input


def _read_prompts(g: GenerateConfig, stats: _Stats, quiet: bool) -> Iterable[Prompt]:
    if g.prompts:
        return _from_list(g.prompts, stats)
    if g.input == "-" and sys.stdin is not None and sys.stdin.isatty() and not quiet:
        end = "Ctrl-D" if sys.platform != "win32" else "Ctrl-Z, Enter"
        log.info("reading prompts from the terminal, %s; end with %s",
                 "one per line" if g.input_format != "text" else "all of it as one prompt", end)
    if g.input_format == "text":
        return _from_text(g.input, stats)
    from llmctl.core.records import record_format

    if g.input != "-" and record_format(g.input) not in ("txt", "jsonl"):
        return _Prefetch(_from_records(g, stats), maxsize=4 * g.batch_size)
    return _Prefetch(_from_lines(g, stats), maxsize=4 * g.batch_size)


def _from_records(g: GenerateConfig, stats: _Stats) -> Iterator[Prompt]:
    """Prompts from a Parquet, CSV or dataset input: its `prompt` column (or, with chat, `messages`), and `id` and the
    per-prompt sampling columns of JSONL prompts where the table has them (other columns are ignored: tables carry
    more than prompts)."""
    from llmctl.core.records import iter_records

    required = [] if g.chat else ["prompt"]
    for position, (where, record) in enumerate(iter_records(g.input, fields=required, optional=JSONL_FIELDS)):
        kept = {k: v for k, v in record.items() if k in JSONL_FIELDS and v is not None}
        text, ident, overrides = _parse_jsonl(json.dumps(kept), where, g.chat)
        stats.prompts += 1
        yield Prompt(position, text, position if ident is None else ident, overrides)


def _from_list(prompts: list[str], stats: _Stats) -> Iterator[Prompt]:
    for position, text in enumerate(prompts):
        stats.prompts += 1
        yield Prompt(position, text, position)


def _from_text(path: str, stats: _Stats) -> Iterator[Prompt]:
    from llmctl.core.inputs import MAX_PROMPT_BYTES, read_text

    text = read_text(path, MAX_PROMPT_BYTES, "a prompt this long cannot fit any model's context; cut it first")
    if not text.strip():
        stats.empty += 1
        return
    stats.prompts += 1
    yield Prompt(0, text, 0)


def _from_lines(g: GenerateConfig, stats: _Stats) -> Iterator[Prompt]:
    """Prompts from a stream of lines (plain or JSONL), skipping empty lines and, with on_error skip, bad ones."""
    from llmctl.core.inputs import MAX_PROMPT_BYTES, display_name, iter_lines

    name = display_name(g.input)
    position = 0
    for number, line in iter_lines(g.input, on_error=g.on_error, skipped=stats.malformed, max_line=MAX_PROMPT_BYTES):
        if not line.strip():
            stats.empty += 1
            continue
        text, ident, overrides = line, None, {}
        if g.input_format == "jsonl":
            try:
                text, ident, overrides = _parse_jsonl(line, f"{name}:{number}", g.chat, g)
            except DataError:
                if g.on_error != "skip":
                    raise
                stats.malformed.append(number)
                continue
        stats.prompts += 1
        yield Prompt(position, text, position if ident is None else ident, overrides)
        position += 1


def _parse_jsonl(
    line: str, where: str, chat: bool = False, g: GenerateConfig | None = None
) -> tuple[Any, str | int | None, dict[str, Any]]:
    """(prompt or messages, id, sampling overrides) from one JSONL line; a DataError naming the line if anything is
    off. With `g`, the sampling overrides must also pass the config's own range checks."""
    obj = parse_json_object(line, where)
    if "messages" in obj:
        if not chat:
            raise DataError(f"{where}: \"messages\" needs chat mode (--chat, generate.chat: true)")
        if "prompt" in obj:
            raise DataError(f"{where}: give \"prompt\" or \"messages\", not both")
        from llmctl.core.chat import check_messages

        obj["prompt"] = check_messages(obj.pop("messages"), where)
        if obj["prompt"][-1]["role"] == "assistant":
            raise DataError(f"{where}: the conversation ends with an assistant turn: nothing to answer")
    if "prompt" not in obj:
        raise DataError(f"{where}: no \"prompt\" field")
    for key in obj:
        if key not in JSONL_FIELDS:
            close = difflib.get_close_matches(key, JSONL_FIELDS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"expected {', '.join(JSONL_FIELDS)}"
            raise DataError(f"{where}: unknown field {key!r}; {hint}")
    text = obj.pop("prompt")
    if not isinstance(text, (str, list)):
        raise DataError(f"{where}: \"prompt\" must be a string")
    ident = obj.pop("id", None)
    if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (str, int))):
        raise DataError(f"{where}: \"id\" must be a string or an integer")
    overrides = {}
    for key, value in obj.items():
        problem = _check_override(key, value)
        if problem:
            raise DataError(f"{where}: \"{key}\" {problem}, not {json.dumps(value)}")
        overrides[key] = value
    if g is not None:  # the ranges of the config's own check, so that a line cannot do what --set may not
        ranged = {k: v for k, v in overrides.items() if k != "stop"}
        for problem in replace(g, **ranged).check():
            key, _, rest = problem.partition(": ")
            if key in ranged:
                raise DataError(f"{where}: \"{key}\" {rest}, not {json.dumps(ranged[key])}")
    return text, ident, overrides


def _check_override(key: str, value: Any) -> str | None:
    """Why `value` is not valid for the per-line setting `key`, or None."""
    integer = isinstance(value, int) and not isinstance(value, bool)
    number = integer or isinstance(value, float) and math.isfinite(value)  # JSON readers accept NaN and Infinity
    if key == "max_new_tokens" and not (integer and value > 0):
        return "must be a positive integer"
    if key == "temperature" and not (number and value >= 0):
        return "must be a number, 0 or more"
    if key == "top_k" and not (integer and value >= 0):
        return "must be an integer, 0 (off) or more"
    if key == "top_p" and not (number and 0 < value <= 1):
        return "must be a number above 0 and at most 1"
    if key == "repetition_penalty" and not (number and value > 0):
        return "must be a positive number"
    if key == "seed" and not (integer and value >= 0):
        return "must be an integer, 0 or more"
    if key == "stop" and not (
        (isinstance(value, str) and value) or (isinstance(value, list) and all(isinstance(s, str) and s for s in value))
    ):
        return "must be a non-empty string or a list of them"
    return None


_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Prefetch:
    """Reads prompts in a background thread into a bounded queue: batches take what has arrived instead of waiting
    for a full batch from a slow writer, and a huge input is never held in memory. An input error reaches the
    consumer after every prompt read before it."""

    def __init__(self, items: Iterator[Prompt], maxsize: int):
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.thread = threading.Thread(target=self._fill, args=(items,), name="llmctl-prompts", daemon=True)
        self.thread.start()

    def _fill(self, items: Iterator[Prompt]) -> None:
        try:
            for item in items:
                self.queue.put(item)
        except BaseException as exc:  # handed to the consumer, raised there
            self.queue.put(_Failure(exc))
            return
        self.queue.put(_END)

    def get(self, timeout: float | None = None):
        return self.queue.get(timeout=timeout)


class _Source:
    """The decoder's requests (`RequestSource`), made from prompts as they arrive: up to n at a time, those read
    so far, or with `wait` whatever arrives within LINGER_S of the first. Each batch of prompts is tokenized
    together; `meta` describes every request taken, in order. An input error ends the source (the prompts before
    it still complete) and is kept in `failure`."""

    def __init__(self, prompts: Iterable[Prompt], make: Callable[[list[Prompt]], tuple[list, list]]):
        self.prompts = prompts if isinstance(prompts, _Prefetch) else iter(prompts)
        self.make = make
        self.meta: list[_Meta] = []
        self.queued: list[tuple[Any, _Meta]] = []  # made but not taken (num_return_sequences > 1)
        self.ended = False
        self.input_ended = False
        self.failure: BaseException | None = None

    def take(self, n: int, wait: bool) -> list:
        prompts: list[Prompt] = []
        deadline = None
        while len(self.queued) + len(prompts) < n and not self.input_ended:
            item = self._next(wait and not prompts and not self.queued, deadline)
            if item is None:
                break
            prompts.append(item)
            if wait and deadline is None:
                deadline = time.monotonic() + LINGER_S
        if prompts:
            requests, meta = self.make(prompts)
            self.queued += zip(requests, meta)
        taken, self.queued = self.queued[:n], self.queued[n:]
        self.meta += [m for _, m in taken]
        self.ended = self.input_ended and not self.queued
        return [r for r, _ in taken]

    def _next(self, block: bool, deadline: float | None) -> Prompt | None:
        """The next prompt: waiting for it if `block`, until `deadline` if given, else only if it is there."""
        if not isinstance(self.prompts, _Prefetch):
            item = next(self.prompts, _END)
        else:
            try:  # block: until a prompt comes; else until the deadline, or (none) not at all
                timeout = None if block else max(0.0, deadline - time.monotonic()) if deadline else 0.0
                item = self.prompts.get(timeout=timeout)
            except queue.Empty:
                return None
        if item is _END or isinstance(item, _Failure):
            self.input_ended = True
            self.failure = item.exc if isinstance(item, _Failure) else None
            return None
        return item



# ---------------------------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class _Meta:
    prompt: Prompt
    index: int
    seed: int
    prompt_tokens: int


def _requests(batch: list[Prompt], g: GenerateConfig, seed: int, tokenizer, decoder, stats: _Stats,
              chat: Prompter | None = None):
    """Tokenize a batch of prompts and turn each into num_return_sequences decode requests."""
    from llmctl.core.decode import Request, SamplingParams

    base = SamplingParams(
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature if g.do_sample else 0.0,
        top_k=g.top_k,
        top_p=g.top_p,
        repetition_penalty=g.repetition_penalty,
        stop=tuple(g.stop) + (tuple(chat.stop_strings) if chat else ()),
    )
    if chat is not None:
        encoded = chat.encode([p.text for p in batch])
    else:
        # Text is text: a literal "<|endoftext|>" in a prompt is those characters, as preprocess reads a corpus.
        encoded = tokenizer([p.text for p in batch], split_special_tokens=True)["input_ids"]
    requests, meta = [], []
    for prompt, ids in zip(batch, encoded):
        overrides = dict(prompt.overrides)
        prompt_seed = overrides.pop("seed", None)
        if isinstance(overrides.get("stop"), str):
            overrides["stop"] = (overrides["stop"],)
        elif "stop" in overrides:
            overrides["stop"] = tuple(overrides["stop"])
        if "stop" in overrides and chat is not None:
            overrides["stop"] += tuple(chat.stop_strings)
        params = replace(base, **overrides)
        if not g.do_sample:
            params = replace(params, temperature=0.0)
        ids = _fit(list(ids), prompt, params.max_new_tokens, tokenizer, decoder, stats)
        if prompt_seed is None:
            prompt_seed = derive_seed(seed, prompt.id)
        for index in range(g.num_return_sequences):
            # Each completion's seed reproduces it alone: {"prompt": ..., "seed": <its seed>} gives it again.
            completion_seed = prompt_seed if index == 0 else derive_seed(prompt_seed, index)
            requests.append(Request(ids, params, completion_seed))
            meta.append(_Meta(prompt, index, completion_seed, len(ids)))
    return requests, meta


def _fit(ids: list[int], prompt: Prompt, max_new: int, tokenizer, decoder, stats: _Stats) -> list[int]:
    """Make a prompt decodable: a start token for an empty prompt, and no more tokens than the context leaves."""
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise DataError(f"prompt {prompt.id}: empty, and the tokenizer has no start-of-text token to begin from")
        ids = [start]
    context = decoder.context_length
    if context is None:
        return ids
    room = context - max_new
    if room < 1:
        raise DataError(
            f"prompt {prompt.id}: max_new_tokens {max_new} leaves no room for a prompt in the model's "
            f"{context}-token context; use at most {context - 1}"
        )
    if len(ids) > room:
        stats.truncated += 1
        if stats.truncated == 1:
            log.warning(
                "prompt %s has %d tokens; keeping its last %d so that %d new tokens fit the model's %d-token context",
                prompt.id, len(ids), room, max_new, context,
            )
        ids = ids[-room:]
    return ids


# ---------------------------------------------------------------------------------------------------------------
# Output


def _records(events, meta: list[_Meta], stats: _Stats) -> Iterator[dict]:
    """One record per completion, in input order, each as soon as all before it are done."""
    from llmctl.core.decode import Finished

    done: dict[int, Any] = {}
    head = 0
    for event in events:
        if not isinstance(event, Finished):
            continue
        done[event.index] = event.result
        while head in done:
            result, m = done.pop(head), meta[head]
            stats.completions += 1
            stats.tokens += len(result.token_ids)
            yield {
                "id": m.prompt.id,
                "index": m.index,
                ("prompt" if isinstance(m.prompt.text, str) else "messages"): m.prompt.text,
                "completion": result.text,
                "prompt_tokens": m.prompt_tokens,
                "tokens": len(result.token_ids),
                "finish_reason": result.finish_reason,
                "seed": m.seed,
                "time_s": round(result.seconds, 4),
            }
            head += 1


def _text(events, meta: list[_Meta], echo: bool, stats: _Stats) -> Iterator[str]:
    """Completions in input order, each followed by a newline. The first unfinished one streams as it is made;
    the others wait in memory until their turn. `meta` grows as requests are taken (it describes each one before
    its first event)."""
    from llmctl.core.decode import Finished, TextDelta

    pending: dict[int, list[str]] = {}
    done: set[int] = set()
    head, shown = 0, False  # shown: the head's prompt is echoed
    for event in events:
        if echo and not shown and head < len(meta):
            yield _shown(meta[head].prompt)
            shown = True
        if isinstance(event, TextDelta):
            if event.index == head:
                yield event.text
            else:
                pending.setdefault(event.index, []).append(event.text)
            continue
        if not isinstance(event, Finished):
            continue
        done.add(event.index)
        stats.completions += 1
        stats.tokens += len(event.result.token_ids)
        while head in done:
            yield "\n"
            head += 1
            shown = echo and head < len(meta)
            if shown or head in pending:
                yield (_shown(meta[head].prompt) if shown else "") + "".join(pending.pop(head, []))


def _shown(prompt: Prompt) -> str:
    """What --echo prints of a prompt: its text, or a conversation's last turn."""
    return prompt.text if isinstance(prompt.text, str) else prompt.text[-1]["content"]


def _summary(stats: _Stats, seconds: float) -> None:
    if stats.empty:
        log.info("skipped %d empty input %s", stats.empty, "line" if stats.empty == 1 else "lines")
    if stats.malformed:
        shown = ", ".join(str(n) for n in stats.malformed[:10]) + (", ..." if len(stats.malformed) > 10 else "")
        log.warning("skipped %d malformed input %s (%s)", len(stats.malformed),
                    "line" if len(stats.malformed) == 1 else "lines", shown)
    if stats.truncated > 1:
        log.warning("%d prompts were cut from the left to fit the context", stats.truncated)
    if stats.prompts == 0:
        log.warning("no prompts: nothing to generate")
        return
    level = logging.INFO if stats.completions > 1 else logging.DEBUG
    rate = stats.tokens / seconds if seconds > 0 else 0.0
    log.log(level, "%d %s, %d tokens in %.1f s (%.0f tokens/s)", stats.completions,
            "completion" if stats.completions == 1 else "completions", stats.tokens, seconds, rate)
